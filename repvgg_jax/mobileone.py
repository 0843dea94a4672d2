"""MobileOne (Vasu et al., "MobileOne: An Improved One millisecond Mobile Backbone", CVPR 2023; apple/ml-mobileone,
timm ``mobileone_s*``).

A 3x3 stride-2 stem block of min(64, 64 w1) channels, then per stage (depths 2, 8, 10, 1; widths 64 w1, 128 w2,
256 w3, 512 w4) pairs of a depthwise 3x3 block (stride 2 for a stage's first pair) and a pointwise 1x1 block.
Every block trains with ``num_conv_branches`` (k) conv+BN branches, a 1x1 "scale" branch (3x3 blocks only) and an
identity BN where shapes allow, summed, then SE (the last ``se_blocks`` pairs of a stage) and ReLU; S0 uses k = 4,
S1-S4 k = 1, S4 puts SE on the last 5 pairs of stage3 and on stage4. Each block fuses into one convolution with a
bias (``reparam.fuse_branches``): the deploy form is a plain stack. Names are apple/ml-mobileone's (``rbr_conv.i``,
``rbr_scale``, ``rbr_skip``; deploy ``reparam_conv``), timm's renamed from them.
"""

import dataclasses
import functools
import re
from collections.abc import Mapping
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from repvgg_jax import models, plan, repvgg, reparam, torch_weights
from repvgg_jax.models import BlockSpec, batch_norm


@dataclasses.dataclass(frozen=True)
class Variant:
  width_multiplier: tuple[float, float, float, float]
  num_conv_branches: int = 1
  se_blocks: tuple[int, int, int, int] = (0, 0, 0, 0)
  num_blocks: tuple[int, int, int, int] = (2, 8, 10, 1)


VARIANTS = {
    "MobileOne-S0": Variant((0.75, 1.0, 1.0, 2.0), num_conv_branches=4),
    "MobileOne-S1": Variant((1.5, 1.5, 2.0, 2.5)),
    "MobileOne-S2": Variant((1.5, 2.0, 2.5, 4.0)),
    "MobileOne-S3": Variant((2.0, 2.5, 3.0, 4.0)),
    "MobileOne-S4": Variant((3.0, 3.5, 3.5, 4.0), se_blocks=(0, 0, 5, 1)),
}
TIMM_NAMES = {name: name.replace("MobileOne-S", "mobileone_s") for name in VARIANTS}
TOP1 = {"MobileOne-S0": 71.4, "MobileOne-S1": 75.9, "MobileOne-S2": 77.4, "MobileOne-S3": 78.1,
        "MobileOne-S4": 79.4}  # The paper's Table 2 (ImageNet top-1, %),
PARAMS_M = {"MobileOne-S0": "2.1", "MobileOne-S1": "4.8", "MobileOne-S2": "7.8", "MobileOne-S3": "10.1",
            "MobileOne-S4": "14.8"}  # and its parameters (re-parameterized).


def block_plan(num_blocks, width_multiplier, num_conv_branches: int = 1, se_blocks=(0, 0, 0, 0)) -> list[BlockSpec]:
  """MobileOne's blocks, stem first, as apple/ml-mobileone lays them out: ``stage{s}_{j}`` is its
  ``stage{s}.{j}``, even j a depthwise 3x3 block, odd j the pointwise 1x1 block after it."""
  w = width_multiplier
  channels = min(64, int(64 * w[0]))
  blocks = [BlockSpec("stage0", channels, 2, 1)]  # The stem has one conv branch in every variant.
  for stage, (depth, width, se) in enumerate(zip(num_blocks, (64, 128, 256, 512), se_blocks), start=1):
    out = int(width * w[stage - 1])
    for i in range(depth):
      use_se = i >= depth - se
      blocks.append(BlockSpec(f"stage{stage}_{2 * i}", channels, 2 if i == 0 else 1, channels, 3, num_conv_branches,
                              use_se))
      blocks.append(BlockSpec(f"stage{stage}_{2 * i + 1}", out, 1, 1, 1, num_conv_branches, use_se))
      channels = out
  return blocks


class MobileOneBlock(nn.Module):
  """MobileOne's training-time block: ReLU(SE(sum_i BN(convkxk_i(x)) + BN(conv1x1(x)) + BN(x))).

  ``num_conv_branches`` kxk conv+BN branches (``rbr_conv_i``); the 1x1 "scale" branch only where k > 1;
  the identity BN (``rbr_skip``) only where input and output channels match and the stride is 1. All
  branches share the stride and groups (``groups`` = channels for the depthwise blocks).
  """

  features: int
  kernel_size: int = 3
  strides: int = 1
  groups: int = 1
  num_conv_branches: int = 1
  use_se: bool = False
  norm: Callable[..., nn.Module] = batch_norm()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    convs = [f"rbr_conv_{i}" for i in range(self.num_conv_branches)]
    return models.branches_se_relu(self, x, train, convs, self.kernel_size, "rbr_scale", "rbr_skip")


_CONV = re.compile(r"rbr_conv_\d+")


def fuse_block(params: Mapping, stats: Optional[Mapping], eps: float, path: tuple[str, ...]) -> dict:
  """{rbr_conv_0, rbr_conv_1, ...: {conv, bn}, rbr_scale: {conv, bn} (k x k blocks), rbr_skip (a BN, optional),
  se (optional)} -> {rbr_reparam: {kernel (k,k,I,O), bias (O,)}} plus ``se`` unchanged."""
  stats = stats or {}
  reparam.check_entries(params, stats, r"rbr_conv_\d+|rbr_scale|rbr_skip|se", path,
                        "rbr_conv_i, rbr_scale, rbr_skip and se")
  branch = lambda name: (name, *reparam.conv_bn(params[name], stats.get(name), path + (name,)))
  convs = [branch(k) for k in sorted((k for k in params if _CONV.fullmatch(k)), key=lambda k: (len(k), k))]
  if not convs:
    raise ValueError(f"Block {reparam.join_path(path)!r} is missing its 'rbr_conv_0' branch.")
  identity = None
  if "rbr_skip" in params:
    identity = ("rbr_skip", reparam.batch_norm(params["rbr_skip"], stats.get("rbr_skip"), path + ("rbr_skip",)))
  small = [branch("rbr_scale")] if "rbr_scale" in params else []
  kernel, bias = reparam.fuse_branches(path, convs, small, identity, eps)
  kept = {"se": reparam.carry_over(params["se"], stats.get("se"), path + ("se",))} if "se" in params else {}
  return {"rbr_reparam": {"kernel": kernel, "bias": bias}, **kept}


FUSE = plan.FuseRule(lambda block: any(_CONV.fullmatch(k) for k in block), fuse_block)


class MobileOne(models.PlainStackNetwork):
  """MobileOne: a stem block, then per stage pairs of depthwise 3x3 and pointwise 1x1 MobileOne blocks,
  global average pool, a dense head."""

  width_multiplier: Sequence[float] = dataclasses.field(kw_only=True)
  num_conv_branches: int = 1
  se_blocks: Sequence[int] = (0, 0, 0, 0)
  num_blocks: Sequence[int] = (2, 8, 10, 1)

  def plan(self) -> list[BlockSpec]:
    return block_plan(self.num_blocks, self.width_multiplier, self.num_conv_branches, self.se_blocks)

  def training_block(self, spec: BlockSpec, norm: Callable[..., nn.Module]) -> nn.Module:
    return MobileOneBlock(features=spec.features, kernel_size=spec.kernel_size, strides=spec.strides,
                          groups=spec.groups, num_conv_branches=spec.num_conv_branches, use_se=spec.use_se,
                          norm=norm, dtype=self.dtype, name=spec.name)


# apple/ml-mobileone's name pieces for ours, and timm's for apple's.
APPLE_RENAMES = {"rbr_reparam": "reparam_conv", "down": "reduce", "up": "expand"}
TIMM_RENAMES = {"rbr_conv": "conv_kxk", "rbr_scale": "conv_scale", "rbr_skip": "identity", "se": "attn",
                "reduce": "fc1", "expand": "fc2"}


def apple_key(names: tuple[str, ...], deploy: bool = False) -> str:
  """('params', 'stage1_0', 'rbr_conv_2', 'conv', 'kernel') -> 'stage1.0.rbr_conv.2.conv.weight'."""
  del deploy
  return re.sub(r"\.rbr_conv_(\d+)\.", r".rbr_conv.\1.", repvgg.official_key(names, APPLE_RENAMES))


NAMINGS = {"official": torch_weights.Naming(apple_key, repvgg.LINEAR.match),
           "timm": torch_weights.Naming(lambda names, deploy: repvgg.official_to_timm(apple_key(names), TIMM_RENAMES),
                                        repvgg.TIMM_LINEAR.match)}


def create(name: str, variant: Variant, **kwargs) -> MobileOne:
  """``families.create_model`` of a MobileOne variant; overrides: ``num_blocks``, ``width_multiplier`` (one per
  stage), ``num_conv_branches``, ``se_blocks`` and the BatchNorms' ``bn_momentum``, ``bn_epsilon``,
  ``bn_axis_name``."""
  return models.create_plain_stack(MobileOne, name, variant, **kwargs)


FAMILY = plan.Family(
    name="mobileone", network=MobileOne, variants=VARIANTS, create=create, overridable=models.overridable(MobileOne),
    fuse_rules=(FUSE,), reparam=functools.partial(reparam.fuse_layers, rules=(FUSE,)),
    owns=lambda params: models.is_plain_stack(params, repvgg.BLOCKS, FUSE, lambda sizes: 1 in sizes),
    namings=NAMINGS, decays=repvgg.official_decay, timm_names=TIMM_NAMES, top1=TOP1, params_m=PARAMS_M)
