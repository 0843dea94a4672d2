"""QARepVGG (Chu et al., "Make RepVGG Greater Again: A Quantization-aware Approach", 2022; cxxgtxy/QARepVGG
``QARepVGGBlockV2``): RepVGG's shapes with a quantization-friendly block.

The block is ReLU(BN(BN3(conv3x3(x)) + conv1x1(x) + x)): the 1x1 conv has neither BN nor bias and the identity no
BN, so no branch carries its own affine map into the sum, and the one BN after the sum folds into the fused
kernel too: K = K3 t3 + pad(K1) + I, b = beta3 - mu3 t3, then ``fuse_bn_after_sum``. QARepVGG-A0 .. B3g4 are
RepVGG's variants but D2se, whose SE would sit between the branch sum and the block's BN, which no fusion can fold.
The deploy form is RepVGG's plain stack; the keys are cxxgtxy/QARepVGG's (RepVGG's plus ``rbr_1x1.weight`` and
``bn``); timm has no QARepVGG.
"""

import functools
from collections.abc import Mapping
from typing import Any, Callable, Optional

import flax.linen as nn
import jax.numpy as jnp

from repvgg_jax import models, plan, repvgg, reparam, torch_weights
from repvgg_jax.models import BlockSpec, batch_norm

VARIANTS = {"QA" + name: variant for name, variant in repvgg.VARIANTS.items() if not variant.use_se}


class QARepVGGBlock(nn.Module):
  """ReLU(BN(BN3(conv3x3(x)) + conv1x1(x) + x)), the identity where input and output channels match and the
  stride is 1; its gain (ones, shape (features,)) is kept with the BN statistics so that the tree says the block
  has one. No SE: the official D2se-style placement (``bn(se(sum))``) has no exact deploy form.
  (N, H, W, Cin) -> (N, H/s, W/s, features)."""

  features: int
  strides: int = 1
  groups: int = 1
  norm: Callable[..., nn.Module] = batch_norm()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    y = models.ConvBN(self.features, 3, self.strides, self.groups, norm=self.norm, dtype=self.dtype,
                      name="rbr_dense")(x, train)
    y = y + models.Conv(self.features, 1, self.strides, self.groups, dtype=self.dtype, name="rbr_1x1")(x)
    if x.shape[-1] == self.features and self.strides == 1:
      gain = self.variable("batch_stats", "rbr_identity", jnp.ones, (self.features,), jnp.float32)
      y = y + x * gain.value.astype(y.dtype)
    return nn.relu(models.norm_of(self, train, "bn")(y))


def fuse_block(params: Mapping, stats: Optional[Mapping], eps: float, path: tuple[str, ...]) -> dict:
  """{rbr_dense: {conv, bn}, rbr_1x1: {kernel (1,1,I,O)}, bn} + batch_stats {rbr_dense: {bn}, bn, rbr_identity
  (ones, where the block has an identity)} -> {rbr_reparam: {kernel (3,3,I,O), bias (O,)}}."""
  stats = stats or {}
  reparam.check_entries(params, {k: v for k, v in stats.items() if k != "rbr_identity"}, "rbr_dense|rbr_1x1|bn",
                        path, "rbr_dense, rbr_1x1 and bn")
  kernel, bn3 = reparam.conv_bn(reparam.child(params, "rbr_dense", path), stats.get("rbr_dense"),
                                path + ("rbr_dense",))
  kernel, bias = reparam.fuse_bn(kernel, *bn3, eps=eps)
  k1 = reparam.child(reparam.child(params, "rbr_1x1", path), "kernel", path + ("rbr_1x1",))
  if k1.shape != (1, 1) + kernel.shape[2:]:
    raise ValueError(f"Block {reparam.join_path(path)!r}: rbr_dense kernel {kernel.shape} and rbr_1x1 kernel {k1.shape} do "
                     f"not form a block (expected (1, 1) + {kernel.shape[2:]}).")
  kernel = kernel + reparam.pad_1x1_to_3x3(k1)
  if "rbr_identity" in stats:
    in_per_group, channels = kernel.shape[2:]
    gain = stats["rbr_identity"]
    if jnp.shape(gain) != (channels,) or channels % in_per_group:
      raise ValueError(f"Block {reparam.join_path(path)!r} has an identity (batch_stats 'rbr_identity' of shape "
                       f"{jnp.shape(gain)}) but its kernel {kernel.shape} does not map {channels} channels to "
                       "themselves.")
    kernel = kernel + reparam.identity_kernel(channels, channels // in_per_group, kernel.dtype) * gain
  bn = reparam.batch_norm(reparam.child(params, "bn", path), stats.get("bn"), path + ("bn",))
  kernel, bias = reparam.fuse_bn_after_sum(kernel, bias, *bn, eps=eps)
  return {"rbr_reparam": {"kernel": kernel, "bias": bias}}


FUSE = plan.FuseRule(lambda block: "bn" in block, fuse_block)


class QARepVGG(repvgg.RepVGG):
  """QARepVGG: RepVGG's stages of QARepVGG blocks, global average pool, a dense head."""

  def training_block(self, spec: BlockSpec, norm: Callable[..., nn.Module]) -> nn.Module:
    if spec.use_se:
      raise ValueError("QARepVGG blocks have no SE: its official placement (BN after SE) cannot be fused exactly.")
    return QARepVGGBlock(features=spec.features, strides=spec.strides, groups=spec.groups, norm=norm,
                         dtype=self.dtype, name=spec.name)


def _official_key(names: tuple[str, ...], deploy: bool) -> Optional[str]:
  del deploy
  if names[0] == "batch_stats" and names[-1] == "rbr_identity":
    return None  # The identity gain is ours alone: cxxgtxy/QARepVGG's identity has no parameter.
  return repvgg.official_key(names)


NAMINGS = {"official": torch_weights.Naming(_official_key, repvgg.LINEAR.match, absent=jnp.ones)}


def create(name: str, variant: repvgg.Variant, **kwargs) -> QARepVGG:
  """``families.create_model`` of a QARepVGG variant; overrides as RepVGG's (``use_se`` cannot be set)."""
  return models.create_plain_stack(QARepVGG, name, variant, **kwargs)


FAMILY = plan.Family(
    name="qarepvgg", network=QARepVGG, variants=VARIANTS, create=create, overridable=models.overridable(QARepVGG),
    fuse_rules=(FUSE,), reparam=functools.partial(reparam.fuse_layers, rules=(FUSE,)),
    owns=lambda params: models.is_plain_stack(params, repvgg.BLOCKS, FUSE, lambda sizes: False),
    namings=NAMINGS, decays=repvgg.official_decay)
