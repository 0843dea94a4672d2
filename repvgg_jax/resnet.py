"""ResNet-18/34/50/101/152 (He et al., CVPR 2016), the baselines of RepVGG's speed comparison (its Table 4), in the
torchvision / timm ``resnet*`` layout: 7x7 stem, 3x3 max pool, basic or bottleneck blocks with a 1x1 projection
where the shape changes, stride on the 3x3 convolution (ResNet v1.5), global pool, fc.

Benchmark baselines, not a family to train here: the training form (conv + BN) loads timm's weights strictly
and equals timm's logits (tests/test_resnet.py); the inference form has each BatchNorm folded into the
convolution before it (``fuse_bn``, as any deployment engine does), so that RepVGG's deploy form is compared
with a ResNet given the same treatment. Both run through the same convolution helper as RepVGG (``backend``).
"""

import functools
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from repvgg_jax import torch_weights
from repvgg_jax.backend import global_average_pool
from repvgg_jax.models import BN_EPSILON, Conv
from repvgg_jax.reparam import fuse_bn

# name -> (bottleneck, blocks per stage, timm name)
RESNETS = {"ResNet-18": (False, (2, 2, 2, 2), "resnet18"), "ResNet-34": (False, (3, 4, 6, 3), "resnet34"),
           "ResNet-50": (True, (3, 4, 6, 3), "resnet50"), "ResNet-101": (True, (3, 4, 23, 3), "resnet101"),
           "ResNet-152": (True, (3, 8, 36, 3), "resnet152")}
WIDTHS = (64, 128, 256, 512)


class ConvBN(nn.Module):
  """k x k convolution then BatchNorm (eval statistics); in the inference form, one convolution with a bias."""

  features: int
  kernel_size: int
  strides: int = 1
  deploy: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.deploy:
      return Conv(self.features, self.kernel_size, self.strides, use_bias=True, dtype=self.dtype, name="conv")(x)
    x = Conv(self.features, self.kernel_size, self.strides, dtype=self.dtype, name="conv")(x)
    return nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, dtype=self.dtype, name="bn")(x)


class Block(nn.Module):
  """A basic (3x3, 3x3) or bottleneck (1x1, 3x3, 1x1 at 4x width) block with its shortcut; (N, H, W, C) ->
  (N, H / strides, W / strides, features * expansion)."""

  features: int
  strides: int
  bottleneck: bool
  conv_bn: Any

  @nn.compact
  def __call__(self, x):
    expansion = 4 if self.bottleneck else 1
    if self.bottleneck:
      y = nn.relu(self.conv_bn(self.features, 1, name="conv1")(x))
      y = nn.relu(self.conv_bn(self.features, 3, self.strides, name="conv2")(y))
      y = self.conv_bn(self.features * expansion, 1, name="conv3")(y)
    else:
      y = nn.relu(self.conv_bn(self.features, 3, self.strides, name="conv1")(x))
      y = self.conv_bn(self.features, 3, name="conv2")(y)
    if self.strides != 1 or x.shape[-1] != self.features * expansion:
      x = self.conv_bn(self.features * expansion, 1, self.strides, name="downsample")(x)
    return nn.relu(x + y)


def max_pool_3x3_s2(x):
  """PyTorch's MaxPool2d(3, stride 2, padding 1): padding by -inf, so it never wins."""
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class ResNet(nn.Module):
  """(N, H, W, 3) -> (N, num_classes) logits."""

  bottleneck: bool
  num_blocks: Sequence[int]
  num_classes: int = 1000
  deploy: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # Inference only: the benchmark's baseline.
    conv_bn = functools.partial(ConvBN, deploy=self.deploy, dtype=self.dtype)
    x = max_pool_3x3_s2(nn.relu(conv_bn(64, 7, 2, name="stem")(x.astype(self.dtype))))
    for stage, (width, blocks) in enumerate(zip(WIDTHS, self.num_blocks)):
      for i in range(blocks):
        x = Block(width, 2 if i == 0 and stage > 0 else 1, self.bottleneck, conv_bn, name=f"layer{stage + 1}_{i}")(x)
    return nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(global_average_pool(x))


def create_resnet(name: str, num_classes: int = 1000, deploy: bool = False, dtype: Any = jnp.float32) -> ResNet:
  if name not in RESNETS:
    raise ValueError(f"Unknown ResNet {name!r}; choose from {', '.join(RESNETS)}.")
  bottleneck, blocks, _ = RESNETS[name]
  return ResNet(bottleneck, blocks, num_classes, deploy, dtype)


def _torch_key(path: tuple[str, ...]) -> str:
  """('layer1_0', 'downsample', 'bn', 'mean') -> 'layer1.0.downsample.1.running_mean'; the stem is conv1/bn1."""
  *modules, leaf = path
  names = []
  for module in modules:
    names += module.split("_") if module.startswith("layer") else [module]
  if names[0] == "stem":
    names = ["conv1" if names[-1] == "conv" else "bn1"]
  elif len(names) > 1 and names[-2] == "downsample":
    names[-1] = "0" if names[-1] == "conv" else "1"
  elif names[-1] in ("conv", "bn"):
    names = names[:-2] + [("conv" if names[-1] == "conv" else "bn") + names[-2][-1]]
  return ".".join(names + [torch_weights.LEAF_TO_TORCH[leaf]])


def from_timm_state_dict(state_dict: Mapping[str, Any], name: str) -> dict:
  """timm's / torchvision's ``resnet*`` state_dict (tensors or arrays) -> {'params', 'batch_stats'} of
  ``create_resnet(name)`` with its class count; strict: a missing, extra or reshaped key is a ValueError."""
  model = create_resnet(name, num_classes=np.shape(state_dict["fc.weight"])[0])
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  return torch_weights.map_state_dict(state_dict, shapes, lambda path: _torch_key(path[1:]), name)


def fold_batch_norms(variables: Mapping) -> dict:
  """Training-form variables -> the inference form's params: every conv + BN as one convolution with a bias."""
  def fold(params, stats):
    if "bn" in params:
      kernel, bias = fuse_bn(params["conv"]["kernel"], params["bn"]["scale"], params["bn"]["bias"],
                             stats["bn"]["mean"], stats["bn"]["var"])
      return {"conv": {"kernel": kernel, "bias": bias}}
    return {k: fold(v, stats.get(k, {})) if isinstance(v, Mapping) else v for k, v in params.items()}

  return fold(variables["params"], variables["batch_stats"])
