"""PyTorch state_dict <-> Flax variables: RepVGG in the official (DingXiaoH) and timm key naming, MobileOne in
apple/ml-mobileone's ("official") and timm's, QARepVGG in cxxgtxy/QARepVGG's and RepVGGplus in DingXiaoH's
(timm has neither).

Loading is strict: every missing or unexpected key and every shape mismatch is a ValueError listing them,
because silently keeping random weights for a misspelt key is the most reported bug of the official loader.
PyTorch conv kernels are OIHW and Linear weights (out, in); Flax kernels are HWIO and (in, out).
"""

import re
from collections.abc import Mapping
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from repvgg_jax import models, variants

# Flax name piece -> official name piece, per family (RepVGG's Flax names are the official ones).
_OFFICIAL_RENAMES = {"repvgg": {}, "qarepvgg": {},  # QARepVGG: cxxgtxy/QARepVGG's names, RepVGG's plus rbr_1x1.weight, bn.
                     "mobileone": {"rbr_reparam": "reparam_conv", "down": "reduce", "up": "expand"},
                     "repvggplus": {"downsample": "0", "fc": "3"}}  # Aux heads: nn.Sequential(conv_bn_relu, ...).
NO_TIMM = {"qarepvgg": "QARepVGG; give cxxgtxy/QARepVGG's", "repvggplus": "RepVGGplus; give DingXiaoH/RepVGG's"}
_LINEAR = re.compile(r"^(linear|stage\w+_aux\.3)\.")  # PyTorch Linear layers; other 2-D leaves are 1x1 convs.
# Official name piece -> timm name piece; applied to whole dot-separated components.
_TIMM_RENAMES = {
    "repvgg": {"rbr_dense": "conv_kxk", "rbr_1x1": "conv_1x1", "rbr_identity": "identity",
               "rbr_reparam": "reparam_conv", "se": "attn", "down": "fc1", "up": "fc2"},
    "mobileone": {"rbr_conv": "conv_kxk", "rbr_scale": "conv_scale", "rbr_skip": "identity", "se": "attn",
                  "reduce": "fc1", "expand": "fc2"},
}
LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
                  "var": "running_var"}
_IGNORED_SUFFIX = ".num_batches_tracked"


def _is_identity_gain(names: tuple[str, ...]) -> bool:
  """QARepVGG's identity gain (batch_stats .../rbr_identity, ones): ours alone, no PyTorch counterpart."""
  return names[0] == "batch_stats" and names[-1] == "rbr_identity"


def official_key(path: tuple[str, ...], family: str = "repvgg") -> str:  # pylint: disable=redefined-outer-name
  """Flax path, e.g. ('stage1_0', 'rbr_dense', 'bn', 'mean') -> 'stage1.0.rbr_dense.bn.running_mean';
  MobileOne's ('stage1_0', 'rbr_conv_2', 'conv', 'kernel') -> 'stage1.0.rbr_conv.2.conv.weight'; RepVGGplus's
  ('stage3_first_2', 'post_se', 'down', 'kernel') -> 'stage3_first.blocks.2.post_se.down.weight' and
  ('stage1_aux', 'fc', 'kernel') -> 'stage1_aux.3.weight'."""
  block = re.sub(r"^(stage\d(?:_first|_second)?)_(\d+)$", r"\1.blocks.\2" if family == "repvggplus" else r"\1.\2",
                 path[0])
  middle = (re.sub(r"^rbr_conv_(\d+)$", r"rbr_conv.\1", _OFFICIAL_RENAMES[family].get(p, p)) for p in path[1:-1])
  return ".".join((block, *middle, LEAF_TO_TORCH[path[-1]]))


def official_to_timm(key: str, family: str = "repvgg") -> str:  # pylint: disable=redefined-outer-name
  """'stage1.0.rbr_dense.conv.weight' -> 'stages.0.0.conv_kxk.conv.weight'; 'linear.x' -> 'head.fc.x'."""
  parts = key.split(".")
  if parts[0] == "linear":
    return ".".join(["head", "fc"] + parts[1:])
  if parts[0] == "stage0":
    head = ["stem"]
    rest = parts[1:]
  else:
    head = ["stages", str(int(parts[0][len("stage"):]) - 1), parts[1]]
    rest = parts[2:]
  return ".".join(head + [_TIMM_RENAMES[family].get(p, p) for p in rest])


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


def map_state_dict(state_dict: Mapping[str, Any], shapes: Mapping, key_of, what: str) -> dict:
  """A family's PyTorch state_dict -> the Flax tree of ``shapes`` (``jax.eval_shape`` of its init), each leaf
  from the key ``key_of(path)`` (path: the leaf's names) in Flax layout; strict: a missing, extra or reshaped key
  is a ValueError naming ``what``. ``num_batches_tracked`` buffers are ignored."""
  state = {k: _to_numpy(v) for k, v in state_dict.items() if not k.endswith(_IGNORED_SUFFIX)}
  used, problems = set(), []

  def take(path, leaf):
    key = key_of(tuple(p.key for p in path))
    if key not in state:
      problems.append(f"lacks {key}")
      return np.zeros(leaf.shape, np.float32)
    value = _torch_to_flax(state[key], leaf.shape)
    used.add(key)
    if value.shape != leaf.shape:
      problems.append(f"{key} has shape {state[key].shape}, the model's {leaf.shape}")
    return value.astype(np.float32)

  variables = jax.tree_util.tree_map_with_path(take, dict(shapes))
  if set(state) - used:
    problems.append(f"has unexpected keys {_format(set(state) - used)}")
  if problems:
    raise ValueError(f"{what}: the state_dict {'; '.join(problems[:20])}.")
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


def _naming(keys) -> str:
  return "timm" if any(k.startswith(("stem.", "stages.", "head.")) for k in keys) else "official"


def _is_deploy(keys) -> bool:
  return any(".rbr_reparam." in k or ".reparam_conv." in k for k in keys)


def _format(keys, limit: int = 20) -> str:
  keys = sorted(keys)
  more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
  return ", ".join(keys[:limit]) + more


def load_pytorch_state_dict(state_dict: Mapping[str, Any], name: str, *, num_classes: Optional[int] = None,
                            deploy: Optional[bool] = None, **overrides) -> dict:
  """A PyTorch state_dict of an official variant (its family's namings: RepVGG official or timm, MobileOne apple
  or timm, QARepVGG cxxgtxy, RepVGGplus DingXiaoH, RepViT timm; training-time or deploy) -> Flax variables.

  Args:
    state_dict: key -> torch tensor or numpy array; a ``module.`` prefix (DDP) is stripped and
      ``num_batches_tracked`` buffers are ignored.
    name: the official variant name, e.g. "RepVGG-A0", "MobileOne-S0" or "RepViT-M0.9".
    num_classes: the head size; None reads it from the checkpoint.
    deploy: expected form; None detects it from the keys. A mismatch is an error.
    **overrides: passed to ``create_model``.
  Returns:
    ``{"params": ..., "batch_stats": ...}`` for ``create_model(name, deploy=False)``, or ``{"params": ...}``
    for the deploy form.
  """
  from repvgg_jax import families  # pylint: disable=g-import-not-at-top  # The registry imports this module.
  state_dict = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
  return families.family_of(name).load_state_dict(state_dict, name, num_classes, deploy, **overrides)


def load_plain_stack_state_dict(state_dict: Mapping[str, Any], name: str, num_classes: Optional[int] = None,
                                deploy: Optional[bool] = None, *, kind: str, **overrides) -> dict:
  """``load_pytorch_state_dict`` of RepVGG, QARepVGG, MobileOne and RepVGGplus (``kind``: "repvgg", "qarepvgg",
  "mobileone" or "repvggplus", the registry's name of the family)."""
  weights = {}
  if kind in NO_TIMM and any(k.startswith(("stem.", "stages.", "head.")) for k in state_dict):
    raise ValueError(f"{name}: timm has no {NO_TIMM[kind]} (official) naming.")
  for key, value in state_dict.items():
    if not key.endswith(_IGNORED_SUFFIX):
      weights[key] = value
  naming, is_deploy = _naming(weights), _is_deploy(weights)
  if deploy is not None and deploy != is_deploy:
    found = "deploy (re-parameterized)" if is_deploy else "training-time (three-branch)"
    raise ValueError(f"deploy={deploy} was asked for, but the state_dict holds {found} weights.")
  head_key = "head.fc.weight" if naming == "timm" else "linear.weight"
  if head_key not in weights:
    raise ValueError(f"The state_dict has no {head_key!r}: not a RepVGG checkpoint in {naming} naming?")
  head_classes = int(_to_numpy(weights[head_key]).shape[0])
  if num_classes is not None and num_classes != head_classes:
    raise ValueError(f"num_classes={num_classes} but the checkpoint's head has {head_classes} classes.")

  model = models.create_plain_stack(name, variants.VARIANTS[name], num_classes=head_classes, deploy=is_deploy,
                                    dtype=jnp.float32, features_only=False, **overrides)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  to_key = ((lambda path: official_to_timm(official_key(path, kind), kind)) if naming == "timm"
            else (lambda path: official_key(path, kind)))
  expected, missing, mismatched = {}, [], []

  def convert(path, leaf):
    names = tuple(p.key for p in path)
    if _is_identity_gain(names):
      return jnp.ones(leaf.shape, leaf.dtype)
    key = to_key(names[1:])
    expected[key] = True
    if key not in weights:
      missing.append(key)
      return np.zeros(leaf.shape, leaf.dtype)
    array = _torch_to_flax(_to_numpy(weights[key]), leaf.shape)
    if array.shape != leaf.shape:
      mismatched.append(f"{key}: {tuple(_to_numpy(weights[key]).shape)} does not fit {name}'s {leaf.shape}")
      return np.zeros(leaf.shape, leaf.dtype)
    return jnp.asarray(array, leaf.dtype)

  variables = jax.tree_util.tree_map_with_path(convert, shapes)
  unexpected = sorted(set(weights) - set(expected))
  problems = []
  if missing:
    problems.append(f"missing keys: {_format(missing)}")
  if unexpected:
    problems.append(f"unexpected keys: {_format(unexpected)}")
  if mismatched:
    problems.append(f"shape mismatches: {_format(mismatched)}")
  if problems:
    raise ValueError(f"The state_dict ({naming} naming, {'deploy' if is_deploy else 'training-time'}) does not "
                     f"match {name}: " + "; ".join(problems))
  return dict(variables)


def to_numpy_state_dict(variables: Mapping, *, naming: str = "official") -> dict[str, np.ndarray]:
  """Flax variables (training-time or deploy) -> a state_dict of numpy arrays in PyTorch layout and the family's
  official (or timm) naming; no torch needed (``safetensors.numpy.save_file`` writes it).

  "official" is DingXiaoH's naming for RepVGG, cxxgtxy/QARepVGG's for QARepVGG and apple/ml-mobileone's for
  MobileOne; RepViT's is timm's (either name gives it). BatchNorm layers get the ``num_batches_tracked`` buffer
  (int64 0) PyTorch expects, so ``load_state_dict`` is strict.
  """
  from repvgg_jax import families  # pylint: disable=g-import-not-at-top  # The registry imports this module.
  if naming not in ("official", "timm"):
    raise ValueError(f"naming must be 'official' or 'timm'; got {naming!r}.")
  return families.of_params(variables["params"]).save_state_dict(variables, naming)


def plain_stack_state_dict(variables: Mapping, naming: str, *, kind: str) -> dict[str, np.ndarray]:
  """``to_numpy_state_dict`` of RepVGG, QARepVGG, MobileOne and RepVGGplus (``kind`` as for
  ``load_plain_stack_state_dict``)."""
  if kind in NO_TIMM and naming == "timm":
    raise ValueError(f"timm has no {NO_TIMM[kind]} (official) naming: use naming='official'.")
  out = state_dict_of(variables, lambda names: None if _is_identity_gain(names) else official_key(names[1:], kind),
                      _LINEAR.match)
  if naming == "timm":
    out = {official_to_timm(k, kind): v for k, v in out.items()}
  return out


def to_pytorch_state_dict(variables: Mapping, *, naming: str = "official") -> dict:
  """``to_numpy_state_dict`` as torch tensors, for ``torch.save`` and ``load_state_dict``."""
  return as_torch(to_numpy_state_dict(variables, naming=naming))


def as_torch(state_dict: Mapping[str, np.ndarray]) -> dict:
  """A numpy state_dict (``to_numpy_state_dict``) as torch tensors sharing its memory."""
  import torch  # pylint: disable=g-import-not-at-top

  return {k: torch.from_numpy(v) for k, v in state_dict.items()}
