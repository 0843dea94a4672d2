"""RepViT (Wang et al., "RepViT: Revisiting Mobile CNN From ViT Perspective", CVPR 2024), as timm's ``repvit_*``.

A MobileNetV3-style network rebuilt with a ViT's macro design. The stem is two 3x3 stride-2 conv+BN layers with a
GELU between them; four stages follow. A RepViT block is a token mixer, RepVGGDW (a 3x3 depthwise conv+BN, a 1x1
depthwise conv with a bias and the identity, summed, then one BN), squeeze-and-excitation on every other block,
and a residual channel mixer, the FFN (1x1 conv+BN to twice the width, GELU, 1x1 conv+BN back). Stages 2-4 open
with a downsample: a block without SE, a 3x3 depthwise stride-2 conv+BN, a 1x1 conv+BN to the stage's width and a
residual FFN. The classifier is BN + Linear, twice (the distillation head); at inference it is their mean.

The deploy form (``reparam``) is the same network with every conv+BN one convolution with a bias (``fuse_bn``),
each RepVGGDW one depthwise 3x3 convolution (``pad_1x1_to_3x3``, ``identity_kernel`` with one group per channel
and ``fuse_bn_after_sum``), the FFN's GELU and residual kept, and the two BN + Linear heads one Dense, as timm's
``fuse`` does. Layout NHWC, kernels HWIO; module names are timm's, so that its keys map one to one.
"""

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from repvgg_jax import models, plan, reparam, torch_weights
from repvgg_jax.backend import global_average_pool
from repvgg_jax.models import BN_EPSILON, Conv, Network, check_images
from repvgg_jax.reparam import fuse_bn, fuse_bn_after_sum, identity_kernel, pad_1x1_to_3x3

MLP_RATIO = 2  # The FFN's hidden width, in units of the block's width (timm's default for every variant).
SE_RATIO = 0.25  # timm's SqueezeExcite(dim, 0.25): hidden channels make_divisible(dim / 4, 8).
HEADS = ("head", "head_dist")  # The classifier and its distillation twin, averaged at inference.


@dataclasses.dataclass(frozen=True)
class RepViTVariant:
  widths: tuple[int, int, int, int]
  depths: tuple[int, int, int, int]
  timm_name: str


VARIANTS = {
    "RepViT-M0.9": RepViTVariant((48, 96, 192, 384), (2, 2, 14, 2), "repvit_m0_9"),
    "RepViT-M1.0": RepViTVariant((56, 112, 224, 448), (2, 2, 14, 2), "repvit_m1_0"),
    "RepViT-M1.1": RepViTVariant((64, 128, 256, 512), (2, 2, 12, 2), "repvit_m1_1"),
    "RepViT-M1.5": RepViTVariant((64, 128, 256, 512), (4, 4, 24, 4), "repvit_m1_5"),
    "RepViT-M2.3": RepViTVariant((80, 160, 320, 640), (6, 6, 34, 2), "repvit_m2_3"),
}


def se_hidden(channels: int, divisor: int = 8) -> int:
  """timm's make_divisible(channels * SE_RATIO, 8): the nearest multiple of 8, at least 8."""
  return max(divisor, int(channels * SE_RATIO + divisor / 2) // divisor * divisor)


def gelu(x):
  return nn.gelu(x, approximate=False)  # PyTorch's nn.GELU() is the exact (erf) one.


class ConvNorm(nn.Module):
  """k x k conv (padding k // 2) + BN, timm's ConvNorm ``c``, ``bn``; with ``norm`` None (the deploy form) one conv
  ``c`` with a bias; then GELU where ``gelu`` (the stem's first layer). (N, H, W, Cin) -> (N, H / strides,
  W / strides, features)."""

  features: int
  kernel_size: int = 1
  strides: int = 1
  groups: int = 1
  norm: Optional[Callable[..., nn.Module]] = None
  dtype: Any = jnp.float32
  gelu: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    y = Conv(self.features, self.kernel_size, self.strides, self.groups, use_bias=self.norm is None,
             dtype=self.dtype, name="c")(x)
    y = y if self.norm is None else self.norm(name="bn")(y, use_running_average=not train)
    return gelu(y) if self.gelu else y


def emit_conv_norm(graph, x: str, path: str, *, features: int, kernel_size: int = 1, strides: int = 1,
                   groups: int = 1, gelu: bool = False) -> str:  # pylint: disable=redefined-outer-name
  """The deploy ``ConvNorm`` as ONNX: Conv (the folded kernel and bias), Gelu where ``gelu``."""
  del features, kernel_size  # The kernel's shape holds both.
  y = graph.conv(x, f"{path}/c", strides, groups)
  return graph.gelu(y, f"{path}/gelu") if gelu else y


class RepVGGDW(nn.Module):
  """The token mixer: BN(DWConvBN3x3(x) + DWConv1x1(x) + x); deploy: one depthwise 3x3 conv ``conv`` with a bias.
  Shape-preserving."""

  norm: Optional[Callable[..., nn.Module]] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    c = x.shape[-1]
    if self.norm is None:
      return Conv(c, 3, groups=c, use_bias=True, dtype=self.dtype, name="conv")(x)
    y = ConvNorm(c, 3, groups=c, norm=self.norm, dtype=self.dtype, name="conv")(x, train)
    y = y + Conv(c, 1, groups=c, use_bias=True, dtype=self.dtype, name="conv1")(x) + x
    return self.norm(name="bn")(y, use_running_average=not train)


class SqueezeExcite(nn.Module):
  """timm's SqueezeExcite: x * sigmoid(fc2(relu(fc1(mean_hw(x))))), fc1/fc2 1x1 convs with biases."""

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    s = global_average_pool(x)[:, None, None, :]
    s = nn.relu(Conv(se_hidden(c), 1, use_bias=True, dtype=self.dtype, name="fc1")(s))
    return x * nn.sigmoid(Conv(c, 1, use_bias=True, dtype=self.dtype, name="fc2")(s))


class FFN(nn.Module):
  """The channel mixer, residual: x + ConvNorm1x1(GELU(ConvNorm1x1(x))), width C -> MLP_RATIO C -> C (in both
  forms: its BNs fold, the GELU and the residual stay)."""

  norm: Optional[Callable[..., nn.Module]] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    c = x.shape[-1]
    y = gelu(ConvNorm(c * MLP_RATIO, norm=self.norm, dtype=self.dtype, name="conv1")(x, train))
    return x + ConvNorm(c, norm=self.norm, dtype=self.dtype, name="conv2")(y, train)


def _emit_ffn(graph, x: str, path: str) -> str:
  y = graph.gelu(graph.conv(x, f"{path}/conv1/c"), f"{path}/gelu")
  return graph.add(x, graph.conv(y, f"{path}/conv2/c"), f"{path}/residual")


class RepViTBlock(nn.Module):
  """token mixer, SE where ``use_se``, residual FFN (timm names ``token_mixer``, ``se``, ``channel_mixer``)."""

  use_se: bool
  norm: Optional[Callable[..., nn.Module]] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = RepVGGDW(self.norm, self.dtype, name="token_mixer")(x, train)
    if self.use_se:
      x = SqueezeExcite(self.dtype, name="se")(x)
    return FFN(self.norm, self.dtype, name="channel_mixer")(x, train)


def emit_block(graph, x: str, path: str, *, use_se: bool) -> str:
  """The deploy ``RepViTBlock`` as ONNX: the fused depthwise 3x3 token mixer, SE where ``use_se``, the FFN."""
  mixer = f"{path}/token_mixer/conv"
  x = graph.conv(x, mixer, groups=graph.out_channels(mixer))
  if use_se:
    x = graph.squeeze_excite(x, f"{path}/se", "fc1", "fc2")
  return _emit_ffn(graph, x, f"{path}/channel_mixer")


class Downsample(nn.Module):
  """A block without SE, 3x3 depthwise stride-2 ConvNorm, 1x1 ConvNorm to ``features``, residual FFN.
  (N, H, W, C) -> (N, H / 2, W / 2, features)."""

  features: int
  norm: Optional[Callable[..., nn.Module]] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    c = x.shape[-1]
    x = RepViTBlock(False, self.norm, self.dtype, name="pre_block")(x, train)
    x = ConvNorm(c, 3, 2, groups=c, norm=self.norm, dtype=self.dtype, name="spatial_downsample")(x, train)
    x = ConvNorm(self.features, norm=self.norm, dtype=self.dtype, name="channel_downsample")(x, train)
    return FFN(self.norm, self.dtype, name="ffn")(x, train)


def emit_downsample(graph, x: str, path: str, *, features: int) -> str:
  """The deploy ``Downsample`` as ONNX, layer by layer as the module."""
  x = emit_block(graph, x, f"{path}/pre_block", use_se=False)
  channels = graph.out_channels(f"{path}/spatial_downsample/c")
  x = emit_conv_norm(graph, x, f"{path}/spatial_downsample", features=channels, kernel_size=3, strides=2,
                     groups=channels)
  x = emit_conv_norm(graph, x, f"{path}/channel_downsample", features=features)
  return _emit_ffn(graph, x, f"{path}/ffn")


CONV_NORM = plan.BlockKind(ConvNorm, emit_conv_norm)
BLOCK = plan.BlockKind(RepViTBlock, emit_block)
DOWNSAMPLE = plan.BlockKind(Downsample, emit_downsample)


class NormLinear(nn.Module):
  """BN then Linear (timm's ``bn``, ``l``), (N, C) -> (N, num_classes)."""

  num_classes: int
  norm: Callable[..., nn.Module]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = self.norm(name="bn")(x, use_running_average=not train)
    return nn.Dense(self.num_classes, dtype=self.dtype, name="l")(x)


class RepViT(Network):
  """RepViT, both forms: the blocks of ``deploy_plan()`` (with BatchNorms in the training form), global average
  pool, the classifier. (N, H, W, 3) -> (N, num_classes) logits, or with ``features_only`` the outputs of the
  stages ``out_indices`` (0..3: strides 4, 8, 16, 32)."""

  widths: Sequence[int] = dataclasses.field(kw_only=True)
  depths: Sequence[int] = dataclasses.field(kw_only=True)
  out_indices: Sequence[int] = (0, 1, 2, 3)

  head = "head"  # The deploy classifier's parameter subtree.
  # INT8 layers (``plan.layer_key``): every convolution but SE's, named by its ConvNorm or token mixer, and the head.
  quantized_modules = r"(.+)/c|(.+/token_mixer)/conv|(head)"

  def deploy_plan(self) -> list[plan.Layer]:
    """The stem's two ConvNorms (GELU between them), then per stage its downsample (stages 1-3) and its blocks, SE
    on every other one."""
    layers = [plan.Layer(CONV_NORM, "stem_conv1", None, dict(features=self.widths[0] // 2, kernel_size=3, strides=2,
                                                             gelu=True)),
              plan.Layer(CONV_NORM, "stem_conv2", None, dict(features=self.widths[0], kernel_size=3, strides=2))]
    for i, (width, depth) in enumerate(zip(self.widths, self.depths)):
      if i > 0:
        layers.append(plan.Layer(DOWNSAMPLE, f"stages_{i}_downsample", i, dict(features=width)))
      layers += [plan.Layer(BLOCK, f"stages_{i}_blocks_{j}", i, dict(use_se=j % 2 == 0)) for j in range(depth)]
    return layers

  def feature_info(self) -> list[dict]:
    """Per selected stage: ``stage``, ``num_chs`` and ``reduction`` (4, 8, 16, 32), as timm's ``feature_info``."""
    return [{"stage": i, "num_chs": self.widths[i], "reduction": 4 * 2 ** i} for i in self.out_indices]

  @nn.compact
  def __call__(self, x, train: bool = False):
    check_images(x)
    norm = None if self.deploy else self.norm()
    x = x.astype(self.dtype)
    out_dtype = jnp.promote_types(self.dtype, jnp.float32)
    features = {}
    for layer in self.deploy_plan():  # norm=None makes each layer its deploy form.
      x = layer.kind.module(**layer.attrs, norm=norm, dtype=self.dtype, name=layer.name)(x, train)
      if layer.stage is not None:
        features[layer.stage] = x
    if self.features_only:
      return [features[i].astype(out_dtype) for i in self.out_indices]
    x = global_average_pool(x)
    if self.deploy:
      return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x).astype(out_dtype)
    heads = [NormLinear(self.num_classes, norm, self.dtype, name=name)(x, train) for name in HEADS]
    return ((heads[0] + heads[1]) / 2).astype(out_dtype)


OVERRIDABLE = ("widths", "depths", "bn_momentum", "bn_epsilon", "bn_axis_name")


def create(name: str, variant: RepViTVariant, *, num_classes: int = 1000, deploy: bool = False,
           dtype: Any = jnp.float32, features_only: bool = False, out_indices: Sequence[int] = (0, 1, 2, 3),
           **overrides) -> RepViT:
  """The network of a RepViT variant; ``overrides``: ``widths`` and ``depths`` (4 stages each) and the BatchNorms'
  ``bn_momentum``, ``bn_epsilon``, ``bn_axis_name``; ``out_indices`` among 0..3 (strides 4..32)."""
  overrides = {k: tuple(v) if k in ("widths", "depths") else v for k, v in overrides.items()}
  for key in ("widths", "depths"):
    value = overrides.get(key, getattr(variant, key))
    if len(value) != 4 or min(value) < 1:
      raise ValueError(f"{key} must be 4 positive entries (stage1..stage4); got {value}.")
  out_indices = tuple(out_indices)
  if not out_indices or not set(out_indices) <= set(range(4)) or len(set(out_indices)) != len(out_indices):
    raise ValueError(f"out_indices must be distinct stages among 0..3 (strides 4..32); got {out_indices}.")
  return models.create_network(RepViT, name, {"widths": variant.widths, "depths": variant.depths}, overrides,
                               num_classes=num_classes, deploy=deploy, features_only=features_only,
                               out_indices=out_indices, dtype=dtype)


# --------------------------------------------------------------------------- fusion, one rule per block kind.

def fuse_conv_norm(params: Mapping, stats: Optional[Mapping], eps: float, path: tuple[str, ...]) -> dict:
  """ConvNorm {c: {kernel}, bn} -> {c: {kernel, bias}}."""
  kernel, bias = reparam.fuse_conv_bn(params, stats, eps, path, conv="c")
  reparam.check_entries(params, stats, "c|bn", path, "c and bn")
  return {"c": {"kernel": kernel, "bias": bias}}


def fuse_repvgg_dw(params: Mapping, stats: Optional[Mapping], eps: float, path: tuple[str, ...]) -> dict:
  """RepVGGDW {conv: ConvNorm, conv1: {kernel, bias}, bn} -> {conv: {kernel (3,3,1,C), bias}}: BN(fuse_bn(K3) +
  pad(K1) + I, b3 + b1)."""
  stats = stats or {}
  reparam.check_entries(params, stats, "conv|conv1|bn", path, "conv, conv1 and bn")
  kernel, bias = reparam.fuse_conv_bn(reparam.child(params, "conv", path), stats.get("conv"), eps, path + ("conv",),
                                      conv="c")
  conv1 = reparam.child(params, "conv1", path)
  channels = kernel.shape[-1]
  kernel = (kernel + pad_1x1_to_3x3(reparam.child(conv1, "kernel", path + ("conv1",)))
            + identity_kernel(channels, channels, kernel.dtype))
  bn = reparam.batch_norm(reparam.child(params, "bn", path), stats.get("bn"), path + ("bn",))
  kernel, bias = fuse_bn_after_sum(kernel, bias + reparam.child(conv1, "bias", path + ("conv1",)), *bn, eps=eps)
  return {"conv": {"kernel": kernel, "bias": bias}}


def _fuse_parts(params: Mapping, stats: Optional[Mapping], eps: float, path: tuple[str, ...],
                parts: Mapping[str, Callable]) -> dict:
  """A block whose entries are the named ``parts``, each fused by its rule (None: carried over, e.g. SE)."""
  stats = stats or {}
  reparam.check_entries(params, stats, "|".join(parts), path, ", ".join(parts))
  for k in (k for k, rule in parts.items() if rule is not None):
    reparam.child(params, k, path)
  return {k: (reparam.carry_over if parts[k] is None else functools.partial(parts[k], eps=eps))(
      v, stats.get(k), path=path + (k,)) for k, v in params.items()}


def fuse_ffn(params, stats, eps, path):
  """FFN {conv1, conv2: ConvNorm} -> its two convs with biases."""
  return _fuse_parts(params, stats, eps, path, {"conv1": fuse_conv_norm, "conv2": fuse_conv_norm})


def fuse_block(params, stats, eps, path):
  """RepViTBlock {token_mixer, se (optional), channel_mixer} -> the fused token mixer, SE, the fused FFN."""
  return _fuse_parts(params, stats, eps, path, {"token_mixer": fuse_repvgg_dw, "se": None, "channel_mixer": fuse_ffn})


def fuse_downsample(params, stats, eps, path):
  """Downsample {pre_block, spatial_downsample, channel_downsample, ffn} -> each part fused."""
  return _fuse_parts(params, stats, eps, path, {"pre_block": fuse_block, "spatial_downsample": fuse_conv_norm,
                                                "channel_downsample": fuse_conv_norm, "ffn": fuse_ffn})


FUSE_RULES = (plan.FuseRule(lambda block: "c" in block, fuse_conv_norm),
              plan.FuseRule(lambda block: "token_mixer" in block, fuse_block),
              plan.FuseRule(lambda block: "pre_block" in block, fuse_downsample))


def _fuse_norm_linear(params: Mapping, stats: Optional[Mapping], eps: float, path: tuple[str, ...]):
  """BN then Linear -> (kernel, bias) of one Linear: the BN's per-feature affine map x t + shift (``fuse_bn`` of a
  unit kernel) folded into the kernel's rows and the bias."""
  bn = reparam.batch_norm(reparam.child(params, "bn", path), reparam.child(stats, "bn", path, "batch_stats"),
                          path + ("bn",))
  t, shift = fuse_bn(jnp.ones_like(bn[0]), *bn, eps=eps)
  linear = reparam.child(params, "l", path)
  kernel = reparam.child(linear, "kernel", path + ("l",))
  return kernel * t[:, None], shift @ kernel + reparam.child(linear, "bias", path + ("l",))


def fuse(params: Mapping, batch_stats: Mapping, eps: float = BN_EPSILON) -> dict:
  """Training-form RepViT params and batch_stats -> the deploy form's params (pure, jittable): every layer by its
  kind's rule (``FUSE_RULES``), the two BN + Linear heads averaged into one Dense ``head``. ``eps`` must be the
  BatchNorms' epsilon, as for ``repvgg_jax.reparam``; a tree lacking a layer raises ValueError naming it."""
  body = {k: v for k, v in params.items() if k not in HEADS}
  heads = [_fuse_norm_linear(reparam.child(params, h, ()), reparam.child(batch_stats, h, (), "batch_stats"), eps,
                             (h,)) for h in HEADS]
  fused = reparam.fuse_layers(body, {k: v for k, v in batch_stats.items() if k not in HEADS}, eps, rules=FUSE_RULES)
  return {**fused, "head": {"kernel": (heads[0][0] + heads[1][0]) / 2, "bias": (heads[0][1] + heads[1][1]) / 2}}


# --------------------------------------------------------------------------- timm's keys.


def timm_key(path: tuple[str, ...], deploy: bool) -> str:
  """A Flax leaf's path (collection first) -> timm's key, training form or fused (``timm.utils.reparameterize_model``):
  ('params', 'stages_1_blocks_0', 'token_mixer', 'conv', 'c', 'kernel') -> 'stages.1.blocks.0.token_mixer.conv.c.weight';
  fused, ('params', 'stages_1_blocks_0', 'token_mixer', 'conv', 'kernel') -> 'stages.1.blocks.0.token_mixer.weight'."""
  _, top, *middle, leaf = path
  if top.startswith(("stem_", "stages_")):
    top = top.replace("_", ".")
  elif top in HEADS:
    top = "head" if deploy else f"head.{top}"
  if deploy and middle and (middle[-1] == "c" or middle[-2:] == ["token_mixer", "conv"]):
    middle = middle[:-1]  # timm's fused ConvNorm and RepVGGDW are one bare Conv2d each.
  return ".".join([top, *middle, torch_weights.LEAF_TO_TORCH[leaf]])


def _decays(path: tuple[str, ...], leaf) -> bool:
  """timm's optimizer (``filter_bias_and_bn``), as THU-MIG/RepViT trains: decay on kernels, none on 1-D
  parameters (biases, BN scales and shifts)."""
  del path
  return np.ndim(leaf) > 1


FAMILY = plan.Family(
    name="repvit", network=RepViT, variants=VARIANTS, create=create, overridable=OVERRIDABLE, fuse_rules=FUSE_RULES,
    reparam=fuse, owns=lambda params: "stem_conv1" in params,
    namings={"timm": torch_weights.Naming(timm_key, lambda key: True)}, decays=_decays,
    timm_names={name: variant.timm_name for name, variant in VARIANTS.items()},
    params_m={"RepViT-M0.9": "5.1", "RepViT-M1.0": "6.8", "RepViT-M1.1": "8.2", "RepViT-M1.5": "14.0",
              "RepViT-M2.3": "22.9"})  # As the paper reports them (the deploy form).
