"""The pieces every family's network is built of: the convolution, the BatchNorm partial, conv+BN, SE, the
multi-branch block body, the plain deploy block (one convolution with a bias, SE, ReLU) with its ONNX emitter,
and the two networks the families specialise: ``Network`` (what every network has) and ``PlainStackNetwork`` (a
stack of re-parameterizable blocks driven by a list of ``BlockSpec``, a pool and a dense head).

Layout is NHWC; kernels are HWIO. The families' own blocks, variants and key names live in their modules
(``repvgg``, ``qarepvgg``, ``mobileone``, ``repvggplus``, ``repvit``).
"""

import dataclasses
import functools
import re
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from repvgg_jax.backend import add_bias, conv2d, global_average_pool
from repvgg_jax.plan import BlockKind, Layer

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


def batch_norm(momentum: float = BN_MOMENTUM, epsilon: float = BN_EPSILON, axis_name: Optional[str] = None,
               dtype: Any = None) -> Callable[..., nn.BatchNorm]:
  """The ``norm`` a network hands its blocks: ``nn.BatchNorm`` with every setting but its mode, which goes with
  each call (``use_running_average``), so that a method interceptor can run one layer on its running statistics
  (``finetune.frozen_batch_norm``)."""
  return functools.partial(nn.BatchNorm, momentum=momentum, epsilon=epsilon, axis_name=axis_name, dtype=dtype)


def norm_of(module: nn.Module, train: bool, name: str) -> Callable[[jax.Array], jax.Array]:
  """``module.norm`` named ``name``, in the mode of ``train``; created inside the module's compact call."""
  return functools.partial(module.norm(name=name), use_running_average=not train)


class ConvBN(nn.Module):
  """One branch: a bias-free k x k convolution followed by BatchNorm. (N, H, W, Cin) -> (N, H', W', features)."""

  features: int
  kernel_size: int
  strides: int = 1
  groups: int = 1
  norm: Callable[..., nn.Module] = batch_norm()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = Conv(self.features, self.kernel_size, self.strides, self.groups, dtype=self.dtype, name="conv")(x)
    return norm_of(self, train, "bn")(x)


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


def branches_se_relu(block: nn.Module, x, train: bool, conv_names, kernel_size: int, small_name: str,
                      identity_name: str):
  """A RepVGG-style training-time block's body: the k x k conv+BN branches ``conv_names``, a 1x1 conv+BN
  branch where k > 1, an identity BN where in == out channels and stride 1, summed; then SE, ReLU.
  Called inside ``block``'s compact ``__call__`` (its fields: features, strides, groups, use_se, norm)."""
  branch = functools.partial(ConvBN, block.features, strides=block.strides, groups=block.groups, norm=block.norm,
                             dtype=block.dtype)
  y = sum(branch(kernel_size=kernel_size, name=name)(x, train) for name in conv_names)
  if kernel_size > 1:
    y = y + branch(kernel_size=1, name=small_name)(x, train)
  if x.shape[-1] == block.features and block.strides == 1:
    y = y + norm_of(block, train, identity_name)(x)
  if block.use_se:
    y = SEBlock(dtype=block.dtype, name="se")(y)
  return nn.relu(y)


class PlainBlock(nn.Module):
  """The deploy-time block of the plain stacks: ReLU(SE(convkxk(x) + bias)). (N, H, W, Cin) -> (N, H/s, W/s,
  features)."""

  features: int
  strides: int = 1
  groups: int = 1
  use_se: bool = False
  dtype: Any = jnp.float32
  kernel_size: int = 3

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # A plain block has no BatchNorm; the argument keeps both forms' call signatures alike.
    y = Conv(self.features, self.kernel_size, self.strides, self.groups, use_bias=True, dtype=self.dtype,
             name="rbr_reparam")(x)
    if self.use_se:
      y = SEBlock(dtype=self.dtype, name="se")(y)
    return nn.relu(y)


def emit_plain_block(graph, x: str, path: str, *, features: int, strides: int, groups: int, use_se: bool,
                     kernel_size: int) -> str:
  """``PlainBlock`` as ONNX nodes: Conv (the fused kernel and bias, the block's stride and groups), SE, Relu."""
  del features, kernel_size  # The fused kernel's shape holds both.
  y = graph.conv(x, f"{path}/rbr_reparam", strides, groups)
  if use_se:
    y = graph.squeeze_excite(y, f"{path}/se", "down", "up")
  return graph.relu(y, f"{path}/relu")


PLAIN = BlockKind(PlainBlock, emit_plain_block)


def check_images(x) -> None:
  if x.ndim != 4:
    raise ValueError(f"Expected NHWC images of shape (batch, height, width, channels); got shape {x.shape}.")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"Expected float images (normalised); got dtype {x.dtype}. Convert first, "
                     "e.g. x.astype(jnp.float32) / 255.")


class Network(nn.Module):
  """What every family's network has: its head size, its form (``deploy``), its outputs (logits, or with
  ``features_only`` the stage outputs ``out_indices``), its compute dtype, and the BatchNorm settings, which
  reach its blocks once, as ``norm()``. A family's network adds ``deploy_plan()``, ``head`` (the classifier's
  parameter subtree), ``quantized_modules`` (``plan.layer_key``), ``feature_info()`` and ``aux_heads()``."""

  num_classes: int = 1000
  deploy: bool = False
  features_only: bool = False
  out_indices: Sequence[int] = (0, 1, 2, 3, 4)
  dtype: Any = jnp.float32
  bn_momentum: float = BN_MOMENTUM
  bn_epsilon: float = BN_EPSILON
  bn_axis_name: Optional[str] = None

  def norm(self) -> Callable[..., nn.BatchNorm]:
    """The BatchNorm every block of this network uses (``batch_norm`` of the network's settings)."""
    return batch_norm(self.bn_momentum, self.bn_epsilon, self.bn_axis_name, self.dtype)

  def aux_heads(self) -> dict[str, str]:
    """Block name -> the name of the auxiliary head after it (training form only, deep supervision); none by
    default."""
    return {}

  def aux_head(self, name: str) -> nn.Module:
    """The auxiliary head ``name`` (one of ``aux_heads()``), (N, H, W, C) -> (N, num_classes)."""
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """One block of a plain stack: its parameter-tree name, output channels, stride, groups, kernel size, number of
  kxk conv branches and whether it has SE (before its ReLU)."""
  name: str
  features: int
  strides: int
  groups: int
  kernel_size: int = 3
  num_conv_branches: int = 1
  use_se: bool = False

  @property
  def stage(self) -> int:
    """0 for the stem, 1..4 for the stages: the digit after 'stage' in the name."""
    return int(self.name[len("stage")])


class PlainStackNetwork(Network):
  """A stack of re-parameterizable blocks (``plan()``), global average pool, a dense head ``linear``.

  ``deploy=False`` builds the multi-branch training form, ``deploy=True`` the plain form whose parameters
  ``reparam`` produces. Input: float images (N, H, W, C). Output: logits (N, num_classes), float32 (float64
  where ``dtype`` is float64); with ``features_only``, the list of the selected stages' outputs (N, H/r, W/r,
  C) for r in 2, 4, 8, 16, 32 (``out_indices`` 0..4), and no head (a full model's ``linear`` is ignored).
  """

  head = "linear"  # The classifier's parameter subtree.
  quantized_modules = r"(.+)/rbr_reparam|(linear)"  # INT8 layers (``plan.layer_key``): each block's conv, the head.

  def plan(self) -> list[BlockSpec]:
    raise NotImplementedError

  def deploy_plan(self) -> list[Layer]:
    """The plain network's blocks, one ``PlainBlock`` per block of ``plan()``."""
    return [Layer(PLAIN, spec.name, spec.stage, dict(features=spec.features, strides=spec.strides, groups=spec.groups,
                                                      use_se=spec.use_se, kernel_size=spec.kernel_size))
            for spec in self.plan()]

  def training_block(self, spec: BlockSpec, norm: Callable[..., nn.Module]) -> nn.Module:
    raise NotImplementedError

  def feature_info(self) -> list[dict]:
    """Per selected stage (``out_indices``), without running the model: ``stage``, ``num_chs`` (its output
    channels) and ``reduction`` (its stride w.r.t. the input), as timm's ``feature_info``."""
    info, reduction = {}, 1
    for spec in self.plan():
      reduction *= spec.strides
      info[spec.stage] = {"stage": spec.stage, "num_chs": spec.features, "reduction": reduction}
    return [info[i] for i in self.out_indices]

  @nn.compact
  def __call__(self, x, train: bool = False, return_aux: bool = False):
    check_images(x)
    aux_after = {} if self.deploy else self.aux_heads()
    if return_aux and (not aux_after or self.features_only):
      raise ValueError("return_aux=True needs the training form of a model with auxiliary heads (RepVGGplus), "
                       "not features_only.")
    x = x.astype(self.dtype)
    out_dtype = jnp.promote_types(self.dtype, jnp.float32)  # bf16 -> float32 outputs; float64 stays.
    stage_outputs, aux = {}, {}
    for spec, layer in zip(self.plan(), self.deploy_plan()):
      if self.deploy:
        block = layer.kind.module(**layer.attrs, dtype=self.dtype, name=layer.name)
      else:
        block = self.training_block(spec, self.norm())
      x = block(x, train)
      stage_outputs[spec.stage] = x  # The last block of each stage writes last.
      if spec.name in aux_after and (return_aux or self.is_initializing()):  # Created at init, run when asked.
        aux[aux_after[spec.name]] = self.aux_head(aux_after[spec.name])(x, train).astype(out_dtype)
    if self.features_only:
      return [stage_outputs[i].astype(out_dtype) for i in self.out_indices]
    x = global_average_pool(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="linear")(x)
    return (x.astype(out_dtype), aux) if return_aux else x.astype(out_dtype)


def given_overrides(overrides: Mapping[str, Any]) -> dict:
  """The ``create_model`` overrides a config or a JSON record sets: unset (None) fields dropped, lists (what
  JSON gives back) as tuples."""
  return {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items() if v is not None}


def overridable(network: type) -> tuple[str, ...]:
  """The fields of a network class that ``create_model``'s overrides may set."""
  return tuple(f.name for f in dataclasses.fields(network)
               if f.name not in ("num_classes", "deploy", "dtype", "features_only", "out_indices", "parent", "name"))


def create_network(network: type, name: str, fields: Mapping[str, Any], overrides: Mapping[str, Any],
                   **settings) -> Network:
  """``network(**settings, **fields)`` with the user's ``overrides`` replacing ``fields`` (a variant's); an override
  that is not a field of ``network`` is a ValueError listing those allowed (``name``: the model, for the
  message)."""
  allowed = overridable(network)
  unknown = sorted(set(overrides) - set(allowed))
  if unknown:
    raise ValueError(f"Unknown override(s) {unknown} for {name}; allowed: {', '.join(allowed)}.")
  return network(**settings, **{**fields, **overrides})


def create_plain_stack(network: type, name: str, variant, *, num_classes: int, deploy: bool, dtype: Any,
                       features_only: bool, out_indices: Sequence[int] = (0, 1, 2, 3, 4),
                       **overrides) -> PlainStackNetwork:
  """The ``network`` (a ``PlainStackNetwork``) of a variant whose record holds its fields, ``num_blocks`` and
  ``width_multiplier`` among them (``families.create_model`` documents the arguments; ``out_indices``: 0 = the
  stem (stride 2) .. 4 = stride 32). The plan is built once here, so that a layout the overrides make impossible
  fails at creation, not inside init."""
  fields = dataclasses.asdict(variant)
  for key in ("num_blocks", "width_multiplier"):
    if key in overrides:
      overrides = {**overrides, key: tuple(overrides[key])}
    if len(overrides.get(key, fields[key])) != 4:
      raise ValueError(f"{key} must have 4 entries (stage1..stage4); got {overrides.get(key, fields[key])}.")
  out_indices = tuple(out_indices)
  if not out_indices or not set(out_indices) <= set(range(5)) or len(set(out_indices)) != len(out_indices):
    raise ValueError(f"out_indices must be distinct stages among 0..4 (0 = the stem); got {out_indices}.")
  model = create_network(network, name, fields, overrides, num_classes=num_classes, deploy=deploy, dtype=dtype,
                         features_only=features_only, out_indices=out_indices)
  model.plan()
  return model


def is_plain_stack(params: Mapping, blocks: str, fuse_rule, deploy_sizes: Callable[[set], bool],
                   others: str = "linear") -> bool:
  """Whether ``params`` is a plain stack of one family: every top-level entry is a block (its name matches the
  regex ``blocks``) or one of ``others`` (a regex: the head, training-only heads), and the blocks are either all
  training-form blocks that ``fuse_rule`` (a ``plan.FuseRule``) claims, or all plain blocks whose set of kernel
  sizes passes ``deploy_sizes``."""
  layers = [block for name, block in params.items() if re.fullmatch(blocks, name)]
  if not layers or not all(re.fullmatch(blocks, name) or re.fullmatch(others, name) for name in params):
    return False
  if all(isinstance(b, Mapping) and "rbr_reparam" in b for b in layers):
    return deploy_sizes({int(np.shape(b["rbr_reparam"]["kernel"])[0]) for b in layers})
  return all(isinstance(b, Mapping) and fuse_rule.claims(b) for b in layers)


def check_variables(model: nn.Module, variables, channels: int) -> None:
  """Raises ValueError unless ``variables`` ({'params'[, 'batch_stats']}) hold exactly ``model``'s leaves, with
  its shapes, for ``channels``-channel images (a features-only model ignores the head ``linear``); the message
  names the first five differences."""
  expected = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, channels)))
  if model.features_only:
    variables = {**variables, "params": {k: v for k, v in variables["params"].items() if k != "linear"}}
  expected_paths, got_paths = ({jax.tree_util.keystr(p): tuple(np.shape(leaf))
                                 for p, leaf in jax.tree_util.tree_flatten_with_path(dict(tree))[0]}
                                for tree in (expected, variables))
  problems = [f"missing {p}" for p in sorted(set(expected_paths) - set(got_paths))]
  problems += [f"unexpected {p}" for p in sorted(set(got_paths) - set(expected_paths))]
  problems += [f"{p} has shape {got_paths[p]}, the model's is {shape}" for p, shape in sorted(expected_paths.items())
               if p in got_paths and got_paths[p] != shape]
  if problems:
    raise ValueError(f"variables do not match the model: {'; '.join(problems[:5])}"
                     + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "") + ".")


def input_channels(model, params: Mapping) -> int:
  """The image channels the params take: the input side of the first deploy layer's kernel."""
  name = model.deploy_plan()[0].name
  first = params.get(name) if isinstance(params, Mapping) else None
  kernels = [leaf for leaf in jax.tree.leaves(first) if np.ndim(leaf) == 4] if isinstance(first, Mapping) else []
  if not kernels:
    raise ValueError(f"params hold no kernel under {name!r}: not the params of this model.")
  return int(np.shape(kernels[0])[2])
