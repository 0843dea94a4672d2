"""The registry of model families, and the entry points that look a model up in it: ``create_model`` by name,
``reparam`` and ``fuse_block`` by the tree or block they are given, PyTorch weights in (by name) and out (by tree).

A family enters with one line in ``FAMILIES``: its ``plan.Family`` record (variants, network, fusion, PyTorch
weights). Nothing else in the shared code names a family; the machinery the entry points dispatch to (``reparam``'s
pure functions, ``torch_weights``' key maps) sits below the family modules and knows no registry.
"""

import difflib
from collections.abc import Mapping
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from repvgg_jax import mobileone, plan, qarepvgg, repvgg, repvggplus, repvit, torch_weights
from repvgg_jax.models import BN_EPSILON
from repvgg_jax.reparam import at_highest_precision

FAMILIES: tuple[plan.Family, ...] = (repvgg.FAMILY, mobileone.FAMILY, repvggplus.FAMILY, qarepvgg.FAMILY,
                                     repvit.FAMILY)


def list_models() -> list[str]:
  """The official variant names, family by family, each in its paper's order."""
  return [name for family in FAMILIES for name in family.variants]


def family_of(name: str) -> plan.Family:
  """The family of an official model name; an unknown name raises ValueError naming the closest ones."""
  for family in FAMILIES:
    if name in family.variants:
      return family
  known = list_models()
  by_lower = {k.lower(): k for k in known}
  close = [by_lower[m] for m in difflib.get_close_matches(name.lower(), by_lower, n=3, cutoff=0.5)]
  hint = f" Did you mean {', '.join(close)}?" if close else ""
  raise ValueError(f"Unknown model {name!r}.{hint} Known models: {', '.join(known)}.")


def fuse_rules() -> tuple[plan.FuseRule, ...]:
  """Every family's block kinds' fuse rules, the last family's first: a family built on an earlier one's block
  (RepVGGplus's and QARepVGG's on RepVGG's) claims its own blocks before the earlier family's rule can."""
  return tuple(rule for family in reversed(FAMILIES) for rule in family.fuse_rules)


def timm_name(name: str) -> Optional[str]:
  """timm's model name of an official variant, or None where timm has none."""
  return family_of(name).timm_names.get(name)


def top1(name: str) -> Optional[float]:
  """The published ImageNet top-1 (%) of an official variant, or None where the registry has none."""
  return family_of(name).top1.get(name)


def of_params(params: Mapping) -> plan.Family:
  """The family a params tree (either form) belongs to; trees that none claims go to the first family, whose
  checks then name what is wrong with them."""
  return next((family for family in FAMILIES if family.owns(params)), FAMILIES[0])


def num_classes(params: Mapping) -> int:
  """The class count of a params tree of either form: the output axis of the classifier's kernel (under its
  network's ``head``)."""
  head = params[of_params(params).network.head]
  return next(int(np.shape(leaf)[-1]) for path, leaf in jax.tree_util.tree_flatten_with_path(head)[0]
              if path[-1].key == "kernel")


def create_model(name: str, *, num_classes: int = 1000, deploy: bool = False, dtype: Any = jnp.float32,
                 features_only: bool = False, out_indices: Optional[Sequence[int]] = None, **overrides):
  """Builds an official variant by name, e.g. ``create_model("RepVGG-A0")`` or ``create_model("RepViT-M0.9")``.

  ``deploy=True`` gives the plain form whose parameters ``reparam`` produces. ``dtype`` is the compute dtype
  (e.g. ``jnp.bfloat16``); parameters and BatchNorm statistics stay float32. ``features_only=True`` makes a
  backbone returning the stage outputs ``out_indices`` (None = every stage: RepVGG's five from the stem at
  stride 2 to stride 32, RepViT's four from stride 4) instead of logits; it takes the full model's variables (the
  head is ignored), and ``model.feature_info()`` gives their channels and strides. ``overrides`` replace fields
  of the variant or the network (each family's ``create``: ``repvgg.create``, ``repvit.create``, ...), e.g.
  ``bn_momentum``, ``bn_epsilon``, ``bn_axis_name``; an unknown one is a ValueError listing those allowed.
  """
  family = family_of(name)
  if num_classes < 1:
    raise ValueError(f"num_classes must be positive; got {num_classes}.")
  kwargs = {} if out_indices is None else {"out_indices": out_indices}
  return family.create(name, family.variants[name], num_classes=num_classes, deploy=deploy, dtype=dtype,
                       features_only=features_only, **kwargs, **overrides)


@at_highest_precision
def fuse_block(block_params: Mapping, block_stats: Mapping, eps: float = BN_EPSILON,
               path: tuple[str, ...] = ()) -> dict:
  """One training-time block's params and batch_stats -> the plain block's params, by the fuse rule of the
  block kind that claims it (``fuse_rules``): e.g. a RepVGG block {rbr_dense, rbr_1x1, rbr_identity, se} ->
  {rbr_reparam: {kernel (3,3,I,O), bias (O,)}, se}. ``path`` names the block in errors."""
  rules = fuse_rules()
  rule = next((r for r in rules if r.claims(block_params)), rules[-1])  # The first family's checks name the problem.
  return rule.fuse(block_params, block_stats, eps, path)


@at_highest_precision
def reparam(params: Mapping, batch_stats: Mapping, eps: float = BN_EPSILON) -> dict:
  """Training-form ``params`` + ``batch_stats`` -> the deploy model's ``params``, exactly, by the fuse rules of
  the family the tree belongs to (``of_params``). Pure and jittable. ``eps`` must equal the BatchNorm epsilon of
  the trained model. Mismatched or partial trees raise ValueError naming the path.
  """
  if not isinstance(params, Mapping) or not isinstance(batch_stats, Mapping):
    raise ValueError("reparam takes two mappings: variables['params'] and variables['batch_stats'].")
  if "params" in params:
    raise ValueError("reparam got a whole variables dict; call reparam(variables['params'], "
                     "variables['batch_stats']).")
  return of_params(params).reparam(params, batch_stats, eps)


def load_pytorch_state_dict(state_dict: Mapping[str, Any], name: str, *, num_classes: Optional[int] = None,
                            deploy: Optional[bool] = None, **overrides) -> dict:
  """A PyTorch state_dict of an official variant, in one of its family's namings and either form -> Flax
  variables.

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
  return torch_weights.from_state_dict(family_of(name), state_dict, name, num_classes=num_classes, deploy=deploy,
                                       **overrides)


def to_numpy_state_dict(variables: Mapping, *, naming: str = "official") -> dict[str, np.ndarray]:
  """Flax variables (training-time or deploy) -> a state_dict of numpy arrays in PyTorch layout and one of the
  family's namings ("official": DingXiaoH's for RepVGG and RepVGGplus, cxxgtxy/QARepVGG's for QARepVGG,
  apple/ml-mobileone's for MobileOne; "timm": RepVGG, MobileOne and RepViT, whose only naming it is); no torch
  needed (``safetensors.numpy.save_file`` writes it). BatchNorm layers get the ``num_batches_tracked`` buffer
  (int64 0) PyTorch expects, so ``load_state_dict`` is strict.
  """
  return torch_weights.to_state_dict(of_params(variables["params"]), variables, naming)


def to_pytorch_state_dict(variables: Mapping, *, naming: str = "official") -> dict:
  """``to_numpy_state_dict`` as torch tensors, for ``torch.save`` and ``load_state_dict``."""
  return torch_weights.as_torch(to_numpy_state_dict(variables, naming=naming))
