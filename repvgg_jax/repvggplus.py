"""RepVGGplus-L2pse (DingXiaoH/RepVGG, ``repvggplus.py``): RepVGG blocks at depths (8, 14, 24, 1) and widths (2.5,
2.5, 2.5, 5) with squeeze-and-excitation after each block's ReLU ("post SE", C -> C/4 -> C, kept in the deploy
form). Stage3 is split into halves ``stage3_first`` and ``stage3_second``, and the training form adds auxiliary
classifiers after stage1, stage2 and stage3_first (deep supervision; dropped by ``reparam``). The blocks fuse as
RepVGG's (``repvgg.FUSE``); the keys are DingXiaoH's (``stageN.blocks.i``; aux heads ``nn.Sequential``), and timm
has no RepVGGplus.
"""

import dataclasses
import functools
import re
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from repvgg_jax import models, plan, repvgg, reparam, torch_weights
from repvgg_jax.backend import global_average_pool
from repvgg_jax.models import BlockSpec, batch_norm

STAGES = ("stage1", "stage2", "stage3_first", "stage3_second", "stage4")
AUX_AFTER = ("stage1", "stage2", "stage3_first")
AUX_SUFFIX = "_aux"


@dataclasses.dataclass(frozen=True)
class Variant:
  num_blocks: tuple[int, int, int, int] = repvgg.D_DEPTHS
  width_multiplier: tuple[float, float, float, float] = (2.5, 2.5, 2.5, 5)
  use_post_se: bool = True


VARIANTS = {"RepVGGplus-L2pse": Variant()}


def block_plan(num_blocks, width_multiplier, use_post_se: bool = True) -> list[BlockSpec]:
  """RepVGGplus's blocks as the official ``RepVGGplus`` lays them out: ``stage0``, then ``{stage}_{i}`` (the
  official ``{stage}.blocks.{i}``) for stage1, stage2, stage3_first, stage3_second (each half of stage3's
  blocks; only the first halves the resolution) and stage4."""
  if num_blocks[2] % 2:
    raise ValueError(f"RepVGGplus splits stage3 into two halves: num_blocks[2] must be even; got {num_blocks[2]}.")
  a = width_multiplier
  widths = (int(64 * a[0]), int(128 * a[1]), int(256 * a[2]), int(256 * a[2]), int(512 * a[3]))
  depths = (num_blocks[0], num_blocks[1], num_blocks[2] // 2, num_blocks[2] // 2, num_blocks[3])
  blocks = [BlockSpec("stage0", min(64, int(64 * a[0])), 2, 1, post_se=use_post_se)]
  for stage, depth, width in zip(STAGES, depths, widths):
    first_stride = 1 if stage == "stage3_second" else 2
    blocks += [BlockSpec(f"{stage}_{i}", width, first_stride if i == 0 else 1, 1, post_se=use_post_se)
               for i in range(depth)]
  return blocks


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
    return block_plan(self.num_blocks, self.width_multiplier, self.use_post_se)

  def training_block(self, spec: BlockSpec, norm: Callable[..., nn.Module]) -> nn.Module:
    return repvgg.RepVGGBlock(features=spec.features, strides=spec.strides, groups=spec.groups, use_se=spec.use_se,
                              norm=norm, dtype=self.dtype, post_se=spec.post_se, name=spec.name)

  def aux_heads(self) -> dict[str, str]:
    last = {spec.name.rsplit("_", 1)[0]: spec.name for spec in self.plan()}
    return {last[stage]: stage + AUX_SUFFIX for stage in AUX_AFTER}

  def aux_head(self, name: str) -> nn.Module:
    return AuxiliaryHead(self.num_classes, norm=self.norm(), dtype=self.dtype, name=name)


BLOCKS = r"stage0|(stage1|stage2|stage3_first|stage3_second|stage4)_\d+"
LINEAR = re.compile(r"^(linear|stage\w+_aux\.3)\.")  # PyTorch Linear layers; other 2-D leaves (SE) are 1x1 convs.
RENAMES = {"downsample": "0", "fc": "3"}  # The aux heads: nn.Sequential(conv_bn_relu, pool, flatten, linear).

NAMINGS = {"official": torch_weights.Naming(
    lambda names, deploy: repvgg.official_key(names, RENAMES, blocks=r"\1.blocks.\2"), LINEAR.match)}


def create(name: str, variant: Variant, **kwargs) -> RepVGGplus:
  """``families.create_model`` of RepVGGplus; overrides: ``num_blocks`` (stage3's even: two halves),
  ``width_multiplier``, ``use_post_se`` and the BatchNorms' ``bn_momentum``, ``bn_epsilon``, ``bn_axis_name``."""
  return models.create_plain_stack(RepVGGplus, name, variant, **kwargs)


FAMILY = plan.Family(
    name="repvggplus", network=RepVGGplus, variants=VARIANTS, create=create,
    overridable=models.overridable(RepVGGplus), fuse_rules=(repvgg.FUSE,),
    reparam=functools.partial(reparam.fuse_layers, rules=(repvgg.FUSE,), drop=r"\w+" + AUX_SUFFIX),
    owns=lambda params: "stage3_first_0" in params and models.is_plain_stack(
        params, BLOCKS, repvgg.FUSE, lambda sizes: sizes == {3}, others=r"linear|\w+" + AUX_SUFFIX),
    namings=NAMINGS, decays=repvgg.official_decay)
