"""RepVGG in Flax: the three-branch training-time block, the network, and its plain deploy form.

Layout is NHWC; kernels are HWIO. Parameter names follow the official PyTorch code (``rbr_dense``,
``rbr_1x1``, ``rbr_identity``, ``rbr_reparam``, ``se.down``/``se.up``, ``linear``) so that weights map
one to one.
"""

import dataclasses
import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from repvgg_jax import variants
from repvgg_jax.backend import add_bias, conv2d, global_average_pool

BN_MOMENTUM = 0.9  # Flax convention: running = momentum * running + (1 - momentum) * batch (PyTorch 0.1).
BN_EPSILON = 1e-5


class Conv(nn.Module):
  """k x k convolution (NHWC, HWIO kernel, padding k // 2), parameters named and initialised as ``nn.Conv``'s."""

  features: int
  kernel_size: int
  strides: int = 1
  groups: int = 1
  use_bias: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1] // self.groups, self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,)) if self.use_bias else None
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = conv2d(x, kernel, self.strides, self.groups)
    return y if bias is None else add_bias(y, bias)


def _batch_norm(module: nn.Module, train: bool, name: str) -> nn.BatchNorm:
  """A BatchNorm configured from ``module``'s bn_* and dtype fields; created inside its compact call."""
  return nn.BatchNorm(use_running_average=not train, momentum=module.bn_momentum, epsilon=module.bn_epsilon,
                      axis_name=module.bn_axis_name, dtype=module.dtype, name=name)


class ConvBN(nn.Module):
  """One branch: a bias-free k x k convolution followed by BatchNorm. (N, H, W, Cin) -> (N, H', W', features)."""

  features: int
  kernel_size: int
  strides: int = 1
  groups: int = 1
  bn_momentum: float = BN_MOMENTUM
  bn_epsilon: float = BN_EPSILON
  bn_axis_name: Optional[str] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = Conv(self.features, self.kernel_size, self.strides, self.groups, dtype=self.dtype, name="conv")(x)
    return _batch_norm(self, train, "bn")(x)


class SEBlock(nn.Module):
  """Squeeze-and-excitation: channel gates from the global mean, C -> C // reduction -> C. Shape-preserving."""

  reduction: int = 16
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    s = global_average_pool(x)
    s = nn.relu(nn.Dense(channels // self.reduction, dtype=self.dtype, name="down")(s))
    s = nn.sigmoid(nn.Dense(channels, dtype=self.dtype, name="up")(s))
    return x * s[:, None, None, :]


class RepVGGBlock(nn.Module):
  """The training-time block: ReLU(SE(BN(conv3x3(x)) + BN(conv1x1(x)) + BN(x))).

  The identity branch exists only where input and output channels match and the stride is 1; the 1x1
  branch has padding 0 and the 3x3 branch's stride and groups. (N, H, W, Cin) -> (N, H/s, W/s, features).
  """

  features: int
  strides: int = 1
  groups: int = 1
  use_se: bool = False
  bn_momentum: float = BN_MOMENTUM
  bn_epsilon: float = BN_EPSILON
  bn_axis_name: Optional[str] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    branch = functools.partial(ConvBN, self.features, strides=self.strides, groups=self.groups,
                               bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon,
                               bn_axis_name=self.bn_axis_name, dtype=self.dtype)
    y = branch(kernel_size=3, name="rbr_dense")(x, train) + branch(kernel_size=1, name="rbr_1x1")(x, train)
    if x.shape[-1] == self.features and self.strides == 1:
      y = y + _batch_norm(self, train, "rbr_identity")(x)
    if self.use_se:
      y = SEBlock(dtype=self.dtype, name="se")(y)
    return nn.relu(y)


class RepVGGPlainBlock(nn.Module):
  """The deploy-time block: ReLU(SE(conv3x3(x) + bias)). (N, H, W, Cin) -> (N, H/s, W/s, features)."""

  features: int
  strides: int = 1
  groups: int = 1
  use_se: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # A plain block has no BatchNorm; the argument keeps both forms' call signatures alike.
    y = Conv(self.features, 3, self.strides, self.groups, use_bias=True, dtype=self.dtype, name="rbr_reparam")(x)
    if self.use_se:
      y = SEBlock(dtype=self.dtype, name="se")(y)
    return nn.relu(y)


class RepVGG(nn.Module):
  """The network: stage0..stage4 of RepVGG blocks, global average pool, a dense head.

  ``deploy=False`` builds the three-branch training form, ``deploy=True`` the plain 3x3-conv form whose
  parameters ``reparam`` produces. Input: float images (N, H, W, C). Output: float32 logits (N, num_classes).
  """

  num_blocks: Sequence[int]
  width_multiplier: Sequence[float]
  groups: int = 1
  use_se: bool = False
  num_classes: int = 1000
  deploy: bool = False
  dtype: Any = jnp.float32
  bn_momentum: float = BN_MOMENTUM
  bn_epsilon: float = BN_EPSILON
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    if x.ndim != 4:
      raise ValueError(f"RepVGG expects NHWC images of shape (batch, height, width, channels); got shape {x.shape}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"RepVGG expects float images (normalised); got dtype {x.dtype}. Convert first, "
                       "e.g. x.astype(jnp.float32) / 255.")
    x = x.astype(self.dtype)
    for spec in variants.block_plan(self.num_blocks, self.width_multiplier, self.groups):
      if self.deploy:
        block = RepVGGPlainBlock(spec.features, spec.strides, spec.groups, self.use_se, self.dtype, name=spec.name)
      else:
        block = RepVGGBlock(spec.features, spec.strides, spec.groups, self.use_se, self.bn_momentum,
                            self.bn_epsilon, self.bn_axis_name, self.dtype, name=spec.name)
      x = block(x, train)
    x = global_average_pool(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="linear")(x)
    return x.astype(jnp.float32)


_OVERRIDABLE = tuple(f.name for f in dataclasses.fields(RepVGG)
                     if f.name not in ("num_classes", "deploy", "dtype", "parent", "name"))


def create_model(name: str, *, num_classes: int = 1000, deploy: bool = False, dtype: Any = jnp.float32,
                 **overrides) -> RepVGG:
  """Builds an official variant by name, e.g. ``create_model("RepVGG-A0")``.

  ``overrides`` replace fields of the variant or of the network: ``num_blocks``, ``width_multiplier``
  (a, a, a, b), ``groups``, ``use_se``, ``bn_momentum``, ``bn_epsilon``, ``bn_axis_name``. ``dtype`` is the
  compute dtype (e.g. ``jnp.bfloat16``); parameters and BatchNorm statistics stay float32.
  """
  unknown = sorted(set(overrides) - set(_OVERRIDABLE))
  if unknown:
    raise ValueError(f"Unknown override(s) {unknown} for {name}; allowed: {', '.join(_OVERRIDABLE)}.")
  fields = dataclasses.asdict(variants.get_variant(name))
  fields.update(overrides)
  for key in ("num_blocks", "width_multiplier"):
    fields[key] = tuple(fields[key])
    if len(fields[key]) != 4:
      raise ValueError(f"{key} must have 4 entries (stage1..stage4); got {fields[key]}.")
  if num_classes < 1:
    raise ValueError(f"num_classes must be positive; got {num_classes}.")
  return RepVGG(num_classes=num_classes, deploy=deploy, dtype=dtype, **fields)
