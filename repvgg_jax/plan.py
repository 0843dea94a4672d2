"""What a model family tells the shared code: its record in the registry (``Family``) and its deploy plan.

A deploy plan is the list of a network's blocks in forward order (``Layer``), each of a ``BlockKind``: the
block's Flax module and its ONNX emitter, written side by side in the family's module. The Flax network builds
its deploy form by walking the plan, and ``export.to_onnx`` emits the ONNX graph (float or INT8) by walking the
same plan, so a block kind is written once per backend and the two cannot drift apart. The classifier after
the plan (global average pool, then the dense layer ``head`` of the network) is shared by every family.
"""

import dataclasses
import re
from collections.abc import Mapping
from typing import Any, Callable, Optional


@dataclasses.dataclass(frozen=True)
class BlockKind:
  """One kind of deploy block. ``module``: its Flax module, built as ``module(**layer.attrs, name=layer.name)``
  (plus the network's ``dtype``); ``emit(graph, x, path, **layer.attrs)``: the same computation as ONNX nodes on
  ``graph`` (an ``export.OnnxGraph``), from the tensor named ``x``, with the block's parameters under ``path``;
  returns the output tensor's name."""

  module: type
  emit: Callable[..., str]


@dataclasses.dataclass(frozen=True)
class Layer:
  """One block of a deploy plan: its kind, its parameter subtree ``name``, the feature stage its output belongs to
  (``features_only``: the last layer of a stage gives that stage's map; None: none) and its kind's keywords."""

  kind: BlockKind
  name: str
  stage: Optional[int]
  attrs: Mapping[str, Any]


def layer_key(quantized_modules: str, path: str) -> Optional[str]:
  """The INT8 name of the layer at module ``path`` ("stage1_0/rbr_reparam" -> "stage1_0"), or None where it stays
  float: a network's ``quantized_modules`` regex matches the paths of its INT8 layers, and its first group that
  matched names the layer."""
  match = re.fullmatch(quantized_modules, path)
  return next((g for g in match.groups() if g is not None), path) if match else None


@dataclasses.dataclass(frozen=True)
class FuseRule:
  """How one kind of training-time block becomes its deploy block: ``claims(params)`` tells whether a block's
  params tree is of this kind, ``fuse(params, batch_stats, eps, path)`` gives its deploy params (composed of
  ``reparam``'s pure functions; ``path`` names the block in errors)."""

  claims: Callable[[Mapping], bool]
  fuse: Callable[..., dict]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Family:
  """A model family as the registry (``families``) lists it, built by keyword in the family's module.

  ``name``: the registry's name of the family ("repvgg", "mobileone", ...). ``network``: the class (or base class)
  of its networks, whose ``deploy_plan()``, ``head`` and ``quantized_modules`` the shared code reads.
  ``variants``: official name -> variant record. ``create(name, variant, **kwargs)``: the network (kwargs:
  num_classes, deploy, dtype, features_only, out_indices and the user's overrides; a bad override is a
  ValueError). ``overridable``: the overrides it accepts. ``fuse_rules``: its training-time block kinds' fuse
  rules. ``reparam(params, batch_stats, eps)``: the training form's variables -> the deploy form's params.
  ``owns(params)``: whether a params tree of either form is one of this family's. ``namings``: its PyTorch key
  namings ("official", "timm"; ``torch_weights.Naming``), both forms, in and out. ``decays(path, leaf)``: whether
  its recipe puts weight decay on a parameter (path: the leaf's names). ``timm_names``: official name -> timm's
  model name, where timm has the variant; ``top1``: the published ImageNet top-1 (%), and ``params_m``: the
  published parameter count of the deploy form (millions, as printed: "8.31", "14.0"), where known.
  """

  name: str
  network: type
  variants: Mapping[str, Any]
  create: Callable[..., Any]
  overridable: tuple[str, ...]
  fuse_rules: tuple[FuseRule, ...]
  reparam: Callable[..., dict]
  owns: Callable[[Mapping], bool]
  namings: Mapping[str, Any]
  decays: Callable[[tuple[str, ...], Any], bool]
  timm_names: Mapping[str, str] = dataclasses.field(default_factory=dict)
  top1: Mapping[str, float] = dataclasses.field(default_factory=dict)
  params_m: Mapping[str, str] = dataclasses.field(default_factory=dict)
