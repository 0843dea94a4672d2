"""The registry of model families, and the entry points that look a model up in it.

A family enters with one line in ``FAMILIES``: its ``plan.Family`` record (variants, network, fusion, PyTorch
weights). Nothing else in the shared code names a family.
"""

import difflib
from collections.abc import Mapping
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from repvgg_jax import mobileone, plan, qarepvgg, repvgg, repvggplus, repvit

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
