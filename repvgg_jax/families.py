"""The registry of model families, and the entry points that look a model up in it.

A family enters with one line in ``FAMILIES``: its ``plan.Family`` record (variants, network, fusion, PyTorch
weights). Nothing else in the shared code names a family.
"""

import difflib
import functools
import re
from collections.abc import Mapping
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from repvgg_jax import models, plan, reparam, repvit, torch_weights, variants


def _plain_stack(kind: str, variant_type: type, owns, quantization_friendly: bool = False) -> plan.Family:
  """A family of RepVGG-style stacks (one re-parameterizable block kind per family, one fused convolution each):
  the shared network, fusion and PyTorch machinery, with the family's variants and key names (``kind``)."""
  return plan.Family(kind, models.PlainStackNetwork, variants.of_kind(variant_type, quantization_friendly),
                     models.create_plain_stack, reparam.fuse_plain_stack, owns,
                     functools.partial(torch_weights.load_plain_stack_state_dict, kind=kind),
                     functools.partial(torch_weights.plain_stack_state_dict, kind=kind), _official_decay)


def _official_decay(path: tuple[str, ...], _) -> bool:
  """RepVGG's official train.py: every kernel and the identity branch's BN scale; not biases, nor the BN scales
  of the conv branches (``.../bn/scale``)."""
  return path[-1] != "bias" and not (path[-1] == "scale" and "bn" in path)


def _is_repvggplus(params: Mapping) -> bool:
  return "stage0" in params and any(block.startswith("stage3_first") for block in params)


def _is_qarepvgg(params: Mapping) -> bool:
  """A training-form block with a BN of its own, after the branch sum (``stageN_i/bn``)."""
  return "stage0" in params and any(isinstance(block, Mapping) and "bn" in block for block in params.values())


_MOBILEONE_BRANCH = re.compile(r"rbr_conv_\d+|rbr_scale|rbr_skip")


def _is_mobileone(params: Mapping) -> bool:
  """MobileOne's branch names, or (deploy) a fused 1x1 kernel, which RepVGG never has."""
  blocks = [block for block in params.values() if isinstance(block, Mapping)]
  return "stage0" in params and (any(_MOBILEONE_BRANCH.fullmatch(key) for block in blocks for key in block) or any(
      np.shape(block["rbr_reparam"]["kernel"])[0] == 1 for block in blocks if "rbr_reparam" in block))


def _is_repvgg(params: Mapping) -> bool:
  return "stage0" in params and not (_is_repvggplus(params) or _is_qarepvgg(params) or _is_mobileone(params))


FAMILIES: tuple[plan.Family, ...] = (
    _plain_stack("repvgg", variants.Variant, _is_repvgg),
    _plain_stack("mobileone", variants.MobileOneVariant, _is_mobileone),
    _plain_stack("repvggplus", variants.RepVGGplusVariant, _is_repvggplus),
    _plain_stack("qarepvgg", variants.Variant, _is_qarepvgg, quantization_friendly=True),
    repvit.FAMILY,
)


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


def get_variant(name: str) -> Any:
  """The variant record of an official model name (ValueError as ``family_of``)."""
  return family_of(name).variants[name]


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
  of the variant or the network (per family: ``models.create_plain_stack``, ``repvit.create``), e.g.
  ``bn_momentum``, ``bn_epsilon``, ``bn_axis_name``; an unknown one is a ValueError listing those allowed.
  """
  family = family_of(name)
  if num_classes < 1:
    raise ValueError(f"num_classes must be positive; got {num_classes}.")
  kwargs = {} if out_indices is None else {"out_indices": out_indices}
  return family.create(name, family.variants[name], num_classes=num_classes, deploy=deploy, dtype=dtype,
                       features_only=features_only, **kwargs, **overrides)
