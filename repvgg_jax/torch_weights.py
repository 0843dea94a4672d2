"""PyTorch state_dict <-> Flax variables, for a family by its namings (``plan.Family.namings``: RepVGG
DingXiaoH's "official" and timm's, MobileOne apple/ml-mobileone's and timm's, QARepVGG cxxgtxy/QARepVGG's,
RepVGGplus DingXiaoH's, RepViT timm's).

A naming maps each Flax leaf to its key; the loader finds the naming and form (training-time or deploy) whose keys
the state_dict holds, and loads strictly: every missing or unexpected key and every shape mismatch is a ValueError
listing them, because silently keeping random weights for a misspelt key is the most reported bug of the official
loader. PyTorch conv kernels are OIHW and Linear weights (out, in); Flax kernels are HWIO and (in, out).
The functions here take the family's record; the registry (``families``) finds it for a name or a tree.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
                 "var": "running_var"}
_IGNORED_SUFFIX = ".num_batches_tracked"


@dataclasses.dataclass(frozen=True)
class Naming:
  """One PyTorch key naming of a family. ``key(names, deploy)``: a Flax leaf's names (collection first) in the
  training (``deploy`` False) or deploy form -> its key, or None for a leaf PyTorch has no counterpart of, which
  loads as ``absent(shape)``; ``linear(key)``: whether a 2-D Flax kernel is a PyTorch Linear weight (else a 1x1
  conv's)."""

  key: Callable[[tuple[str, ...], bool], Optional[str]]
  linear: Callable[[str], Any]
  absent: Optional[Callable[[tuple[int, ...]], Any]] = None


def _to_numpy(value) -> np.ndarray:
  if hasattr(value, "detach"):  # A torch tensor; torch itself is only needed by whoever made it.
    value = value.detach().cpu().numpy()
  return np.asarray(value)


def _torch_to_flax(array: np.ndarray, flax_shape: tuple[int, ...]) -> np.ndarray:
  """One tensor from PyTorch layout into the Flax leaf's layout (shape checked by the caller)."""
  if len(flax_shape) == 4 and array.ndim == 4:  # conv OIHW -> HWIO
    return array.transpose(2, 3, 1, 0)
  if len(flax_shape) == 2 and array.ndim in (2, 4):  # Linear (out, in) or 1x1 conv (out, in, 1, 1) -> (in, out)
    return array.reshape(array.shape[:2]).T
  return array


def _flax_to_torch(array: np.ndarray, linear: bool) -> np.ndarray:
  """One Flax leaf in PyTorch layout: HWIO -> OIHW; a 2-D kernel as a Linear weight (out, in) where ``linear``,
  else as the 1x1 conv it is in PyTorch (SE layers)."""
  if array.ndim == 4:
    return array.transpose(3, 2, 0, 1)
  if array.ndim == 2:
    return array.T if linear else array.T[:, :, None, None]
  return array


def map_state_dict(state_dict: Mapping[str, Any], shapes: Mapping, key_of, what: str, absent=None) -> dict:
  """A PyTorch state_dict -> the Flax tree of ``shapes`` (``jax.eval_shape`` of an init), each leaf from the key
  ``key_of(names)`` (names: the leaf's, collection first) in Flax layout, or ``absent(shape)`` where the key is
  None; strict: missing, unexpected and reshaped keys are one ValueError naming ``what``. ``num_batches_tracked``
  buffers are ignored."""
  state = {k: _to_numpy(v) for k, v in state_dict.items() if not k.endswith(_IGNORED_SUFFIX)}
  used, missing, mismatched = set(), [], []

  def take(path, leaf):
    key = key_of(tuple(p.key for p in path))
    if key is None:
      return np.asarray(absent(leaf.shape), np.float32)
    if key not in state:
      missing.append(key)
      return np.zeros(leaf.shape, np.float32)
    value = _torch_to_flax(state[key], leaf.shape)
    used.add(key)
    if value.shape != leaf.shape:
      mismatched.append(f"{key}: {state[key].shape} does not fit the model's {leaf.shape}")
    return value.astype(np.float32)

  variables = jax.tree_util.tree_map_with_path(take, dict(shapes))
  problems = [f"{label}: {_format(keys)}" for label, keys in (
      ("missing keys", missing), ("unexpected keys", set(state) - used), ("shape mismatches", mismatched)) if keys]
  if problems:
    lead = ""
    if missing:  # The first one in words, then the lists.
      lead = f"it lacks {min(missing)}" + (f" and {len(missing) - 1} more keys" if len(missing) > 1 else "") + "; "
    raise ValueError(f"{what}: {lead}" + "; ".join(problems))
  return variables


def state_dict_of(variables: Mapping, key_of, is_linear) -> dict[str, np.ndarray]:
  """The reverse of ``map_state_dict``: numpy arrays in PyTorch layout at ``key_of(path)`` (None: a leaf PyTorch
  has no counterpart of), 2-D kernels as Linear weights where ``is_linear(key)`` and as 1x1 conv weights
  elsewhere, with the ``num_batches_tracked`` buffer (int64 0) beside each BatchNorm's running mean, so that
  PyTorch loads it strictly."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(dict(variables))[0]:
    names = tuple(p.key for p in path)
    key = key_of(names)
    if key is None:
      continue
    if names[-1] == "mean":
      out[key.replace("running_mean", "num_batches_tracked")] = np.zeros((), np.int64)
    out[key] = np.array(_flax_to_torch(np.asarray(leaf), bool(is_linear(key))), order="C")  # Writable, contiguous.
  return out


def _format(keys, limit: int = 20) -> str:
  keys = sorted(keys)
  more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
  return ", ".join(keys[:limit]) + more


def _leaf_names(family, name: str, deploy: bool, overrides) -> list[tuple[str, ...]]:
  """The names (collection first) of every leaf of ``name``'s variables in one form."""
  model = family.create(name, family.variants[name], num_classes=1, deploy=deploy, dtype=jnp.float32,
                        features_only=False, **overrides)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  return [tuple(p.key for p in path) for path, _ in jax.tree_util.tree_flatten_with_path(dict(shapes))[0]]


def from_state_dict(family, state_dict: Mapping[str, Any], name: str, *, num_classes: Optional[int] = None,
                    deploy: Optional[bool] = None, **overrides) -> dict:
  """``families.load_pytorch_state_dict`` for the variant ``name`` of ``family`` (its ``plan.Family`` record)."""
  state_dict = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()
                if not k.endswith(_IGNORED_SUFFIX)}
  # The naming and form whose keys the state_dict holds most of; the strict check below names what differs.
  leaves = {form: _leaf_names(family, name, form, overrides) for form in (False, True)}
  candidates = [(label, form, {key: n for n in leaves[form] if (key := naming.key(n, form)) is not None})
                for label, naming in family.namings.items() for form in (False, True)]
  label, is_deploy, keys = max(candidates, key=lambda c: len(set(c[2]) & set(state_dict)))
  if not set(keys) & set(state_dict):
    missing = "" if "timm" in family.namings else f"; timm has no {family.network.__name__} naming"
    raise ValueError(f"{name}: the state_dict is in none of its family's namings ({', '.join(family.namings)})"
                     f"{missing}; its keys begin {_format(list(state_dict)[:3])}.")
  if deploy is not None and deploy != is_deploy:
    found = "deploy (re-parameterized)" if is_deploy else "training-time (multi-branch)"
    raise ValueError(f"deploy={deploy} was asked for, but the state_dict holds {found} weights.")
  head = family.network.head
  head_key = next(k for k, n in keys.items() if n[:2] == ("params", head) and n[-1] == "kernel")
  if head_key not in state_dict:
    raise ValueError(f"The state_dict has no {head_key!r}: not a {name} checkpoint in {label} naming?")
  classes = int(_to_numpy(state_dict[head_key]).shape[0])
  if num_classes is not None and num_classes != classes:
    raise ValueError(f"num_classes={num_classes} but the checkpoint's head has {classes} classes.")
  model = family.create(name, family.variants[name], num_classes=classes, deploy=is_deploy, dtype=jnp.float32,
                        features_only=False, **overrides)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  naming = family.namings[label]
  form = "deploy" if is_deploy else "training-time"
  return map_state_dict(state_dict, shapes, lambda names: naming.key(names, is_deploy),
                        f"The state_dict ({label} naming, {form}) does not match {name}", naming.absent)


def to_state_dict(family, variables: Mapping, naming: str) -> dict[str, np.ndarray]:
  """``families.to_numpy_state_dict`` for variables of ``family`` (its ``plan.Family`` record)."""
  if naming not in ("official", "timm"):
    raise ValueError(f"naming must be 'official' or 'timm'; got {naming!r}.")
  if naming not in family.namings:
    title, other = family.network.__name__, next(iter(family.namings))
    raise ValueError(f"timm has no {title}: use naming={other!r}." if naming == "timm" else
                     f"{title} has no {naming} naming: use naming={other!r}.")
  deploy = "batch_stats" not in variables
  chosen = family.namings[naming]
  return state_dict_of(variables, lambda names: chosen.key(names, deploy), chosen.linear)


def as_torch(state_dict: Mapping[str, np.ndarray]) -> dict:
  """A numpy state_dict (``to_state_dict``) as torch tensors sharing its memory."""
  import torch  # pylint: disable=g-import-not-at-top

  return {k: torch.from_numpy(v) for k, v in state_dict.items()}
