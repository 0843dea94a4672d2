"""RepVGGplus-L2pse (DingXiaoH/RepVGG, ``repvggplus.py``): RepVGG blocks at depths (8, 14, 24, 1) and widths (2.5,
2.5, 2.5, 5) with squeeze-and-excitation after each block's ReLU ("post SE", C -> C/4 -> C, kept in the deploy
form). Stage3 is split into halves ``stage3_first`` and ``stage3_second``, and the training form adds auxiliary
classifiers after stage1, stage2 and stage3_first (deep supervision; dropped by ``reparam``). A block's branches
fuse as RepVGG's (``repvgg.fuse_block``) and its post SE is kept, so the deploy block is one convolution with a
bias, ReLU and the post SE (``PostSEBlock``); the keys are DingXiaoH's (``stageN.blocks.i``; aux heads
``nn.Sequential``), and timm has no RepVGGplus.
"""

import dataclasses
import functools
import re
from collections.abc import Mapping
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from repvgg_jax import models, plan, repvgg, reparam, torch_weights
from repvgg_jax.backend import global_average_pool
from repvgg_jax.models import BlockSpec, batch_norm
from repvgg_jax.plan import Layer

STAGES = ("stage1", "stage2", "stage3_first", "stage3_second", "stage4")
AUX_AFTER = ("stage1", "stage2", "stage3_first")
AUX_SUFFIX = "_aux"


@dataclasses.dataclass(frozen=True)
class Variant:
  num_blocks: tuple[int, int, int, int] = repvgg.D_DEPTHS
  width_multiplier: tuple[float, float, float, float] = (2.5, 2.5, 2.5, 5)
  use_post_se: bool = True


VARIANTS = {"RepVGGplus-L2pse": Variant()}


def block_plan(num_blocks, width_multiplier) -> list[BlockSpec]:
  """RepVGGplus's blocks as the official ``RepVGGplus`` lays them out: ``stage0``, then ``{stage}_{i}`` (the
  official ``{stage}.blocks.{i}``) for stage1, stage2, stage3_first, stage3_second (each half of stage3's
  blocks; only the first halves the resolution) and stage4."""
  if num_blocks[2] % 2:
    raise ValueError(f"RepVGGplus splits stage3 into two halves: num_blocks[2] must be even; got {num_blocks[2]}.")
  a = width_multiplier
  widths = (int(64 * a[0]), int(128 * a[1]), int(256 * a[2]), int(256 * a[2]), int(512 * a[3]))
  depths = (num_blocks[0], num_blocks[1], num_blocks[2] // 2, num_blocks[2] // 2, num_blocks[3])
  blocks = [BlockSpec("stage0", min(64, int(64 * a[0])), 2, 1)]
  for stage, depth, width in zip(STAGES, depths, widths):
    first_stride = 1 if stage == "stage3_second" else 2
    blocks += [BlockSpec(f"{stage}_{i}", width, first_stride if i == 0 else 1, 1) for i in range(depth)]
  return blocks


def _post_se(block: nn.Module, y):
  """SE after the ReLU (C -> C/4 -> C), named ``post_se``."""
  return models.SEBlock(reduction=4, dtype=block.dtype, name="post_se")(y)


class RepVGGplusBlock(repvgg.RepVGGBlock):
  """The training-time block: RepVGG's (its fields; ``use_se`` stays False, RepVGGplus has no SE before the
  ReLU), ReLU(BN(conv3x3(x)) + BN(conv1x1(x)) + BN(x)), then the post SE. (N, H, W, Cin) -> (N, H/s, W/s,
  features)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    return _post_se(self, models.branches_se_relu(self, x, train, ["rbr_dense"], 3, "rbr_1x1", "rbr_identity"))


class PostSEBlock(nn.Module):
  """The deploy block: ReLU(conv3x3(x) + bias) (``rbr_reparam``), then the post SE."""

  features: int
  strides: int = 1
  groups: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # No BatchNorm.
    y = models.Conv(self.features, 3, self.strides, self.groups, use_bias=True, dtype=self.dtype,
                    name="rbr_reparam")(x)
    return _post_se(self, nn.relu(y))


def emit_post_se_block(graph, x: str, path: str, *, features: int, strides: int, groups: int) -> str:
  """``PostSEBlock`` as ONNX nodes: Conv, Relu, the SE."""
  del features  # The fused kernel's shape holds it.
  y = graph.relu(graph.conv(x, f"{path}/rbr_reparam", strides, groups), f"{path}/relu")
  return graph.squeeze_excite(y, f"{path}/post_se", "down", "up")


POST_SE = plan.BlockKind(PostSEBlock, emit_post_se_block)


def fuse_block(params: Mapping, stats: Optional[Mapping], eps: float, path: tuple[str, ...]) -> dict:
  """A RepVGGplus block: RepVGG's branches fused (``repvgg.fuse_block``), ``post_se`` unchanged."""
  stats = stats or {}
  branches = {k: v for k, v in params.items() if k != "post_se"}
  fused = repvgg.fuse_block(branches, {k: v for k, v in stats.items() if k != "post_se"}, eps, path)
  if "post_se" not in params:
    return fused
  return {**fused, "post_se": reparam.carry_over(params["post_se"], stats.get("post_se"), path + ("post_se",))}


FUSE = plan.FuseRule(lambda block: "rbr_dense" in block and "post_se" in block, fuse_block)


class AuxiliaryHead(nn.Module):
  """Deep supervision after a stage: ReLU(BN(conv3x3 stride 2)) at the stage's width (``downsample``), global
  average pool, a dense layer (``fc``). (N, H, W, C) -> (N, num_classes)."""

  num_classes: int
  norm: Callable[..., nn.Module] = batch_norm()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    y = models.ConvBN(x.shape[-1], 3, 2, 1, norm=self.norm, dtype=self.dtype, name="downsample")(x, train)
    return nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(global_average_pool(nn.relu(y)))


class RepVGGplus(models.PlainStackNetwork):
  """RepVGGplus: RepVGG blocks with post SE in stage0, stage1, stage2, stage3_first, stage3_second, stage4, global
  average pool, a dense head; the training form adds auxiliary heads after stage1, stage2 and stage3_first
  (``return_aux=True`` returns their logits too)."""

  num_blocks: Sequence[int] = dataclasses.field(kw_only=True)
  width_multiplier: Sequence[float] = dataclasses.field(kw_only=True)
  use_post_se: bool = True

  def plan(self) -> list[BlockSpec]:
    return block_plan(self.num_blocks, self.width_multiplier)

  def deploy_plan(self) -> list[Layer]:
    """One ``PostSEBlock`` per block (without post SE: RepVGG's ``PlainBlock``)."""
    if not self.use_post_se:
      return super().deploy_plan()
    return [Layer(POST_SE, spec.name, spec.stage, dict(features=spec.features, strides=spec.strides,
                                                       groups=spec.groups)) for spec in self.plan()]

  def training_block(self, spec: BlockSpec, norm: Callable[..., nn.Module]) -> nn.Module:
    if not self.use_post_se:
      return repvgg.RepVGGBlock(features=spec.features, strides=spec.strides, groups=spec.groups, norm=norm,
                                dtype=self.dtype, name=spec.name)
    return RepVGGplusBlock(features=spec.features, strides=spec.strides, groups=spec.groups, norm=norm,
                           dtype=self.dtype, name=spec.name)

  def aux_heads(self) -> dict[str, str]:
    last = {spec.name.rsplit("_", 1)[0]: spec.name for spec in self.plan()}
    return {last[stage]: stage + AUX_SUFFIX for stage in AUX_AFTER}

  def aux_head(self, name: str) -> nn.Module:
    return AuxiliaryHead(self.num_classes, norm=self.norm(), dtype=self.dtype, name=name)


BLOCKS = r"stage0|(stage1|stage2|stage3_first|stage3_second|stage4)_\d+"
LINEAR = re.compile(r"^(linear|stage\w+_aux\.3)\.")  # PyTorch Linear layers; other 2-D leaves (SE) are 1x1 convs.
BLOCK_KEY = (r"^(stage\d(?:_first|_second)?)_(\d+)$", r"\1.blocks.\2")  # stage3_first_2 -> stage3_first.blocks.2
RENAMES = {"downsample": "0", "fc": "3"}  # The aux heads: nn.Sequential(conv_bn_relu, pool, flatten, linear).

NAMINGS = {"official": torch_weights.Naming(
    lambda names, deploy: repvgg.official_key(names, RENAMES, BLOCK_KEY), LINEAR.match)}


def create(name: str, variant: Variant, **kwargs) -> RepVGGplus:
  """``families.create_model`` of RepVGGplus; overrides: ``num_blocks`` (stage3's even: two halves),
  ``width_multiplier``, ``use_post_se`` and the BatchNorms' ``bn_momentum``, ``bn_epsilon``, ``bn_axis_name``."""
  return models.create_plain_stack(RepVGGplus, name, variant, **kwargs)


FAMILY = plan.Family(
    name="repvggplus", network=RepVGGplus, variants=VARIANTS, create=create,
    overridable=models.overridable(RepVGGplus), fuse_rules=(FUSE,),
    reparam=functools.partial(reparam.fuse_layers, rules=(FUSE, repvgg.FUSE), drop=r"\w+" + AUX_SUFFIX),
    owns=lambda params: "stage3_first_0" in params and models.is_plain_stack(
        params, BLOCKS, repvgg.FUSE, lambda sizes: sizes == {3}, others=r"linear|\w+" + AUX_SUFFIX),
    namings=NAMINGS, decays=repvgg.official_decay)
