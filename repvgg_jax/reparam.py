"""Structural re-parameterization as pure functions on arrays and PyTrees.

In eval mode a BatchNorm is an affine map per channel, so a conv+BN is one convolution with a bias (``fuse_bn``),
and the linear branches of a training-time block that are summed fold into one k x k kernel:

    W = sum_i fuse(K_i, bn_i) + fuse(pad(K1), bn1) + fuse(I, bn_id),   b = sum_i b_i + b1 + b_id,

with the 1x1 kernels padded to the centre (``pad_to_center``) and the identity as a kernel (``identity_kernel``),
for any groups, depthwise included (``fuse_branches``); a BN after such a sum folds into it too
(``fuse_bn_after_sum``). Kernels are Flax HWIO arrays.

The entry points (``reparam`` and ``fuse_block``, in the registry, ``families``, since they dispatch over every
family's rules) compute at ``Precision.HIGHEST`` (``at_highest_precision``): a fold that multiplies
matrices (RepViT's BN + Linear head: ``shift @ kernel``) would otherwise round its operands to bfloat16 on a TPU
and to TF32 on a GPU, inside ``jax.jit(reparam)`` too: under a CPU emulation of a TPU's precision its bias was
1.7e-3 of its size off the exact fold, and a short RepViT run failed its own end-of-run check.

Which branches a block has, and under which names, is its family's knowledge: each family's block kinds carry a
fuse rule (``plan.FuseRule``) composed of the functions here, and ``fuse_layers`` walks a tree layer by layer,
fusing each layer by the rule that claims it. Nothing here knows the registry, mutates its input or keeps state;
``jax.jit(reparam)`` works.
"""

import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp

from repvgg_jax import plan
from repvgg_jax.models import BN_EPSILON

BatchNorm = tuple[Any, Any, Any, Any]  # scale, bias, mean, var: (C,) each.


def fuse_bn(kernel, scale, bias, mean, var, eps: float = BN_EPSILON):
  """Folds an eval-mode BatchNorm into the bias-free conv before it.

  Args:
    kernel: (kh, kw, Cin/groups, Cout) conv kernel.
    scale, bias, mean, var: (Cout,) BatchNorm parameters and running statistics.
    eps: the BatchNorm's epsilon; must be the one the model was built with.
  Returns:
    (kernel', bias') with kernel' of the kernel's shape and bias' of shape (Cout,), such that
    conv(x, kernel') + bias' == BN(conv(x, kernel)).
  """
  t = scale / jnp.sqrt(var + eps)
  return kernel * t, bias - mean * t


def fuse_bn_after_sum(kernel, bias, scale, bn_bias, mean, var, eps: float = BN_EPSILON):
  """Folds an eval-mode BatchNorm that follows conv(x, kernel) + bias (QARepVGG's BN after the branch sum).

  kernel (kh, kw, Cin/groups, Cout), bias and the BN's arrays (Cout,). Returns (kernel * t, beta + (bias - mean)
  * t) with t = scale / sqrt(var + eps): ``fuse_bn`` with the mean shifted by the bias.
  """
  return fuse_bn(kernel, scale, bn_bias, mean - bias, var, eps)


def pad_to_center(kernel, size: int):
  """(k, k, I, O) -> (size, size, I, O), the kernel at the centre taps (size - k even), so that with padding
  size // 2 it reads the same pixels as before with padding k // 2."""
  pad = (size - kernel.shape[0]) // 2
  return jnp.pad(kernel, ((pad, pad), (pad, pad), (0, 0), (0, 0)))


def pad_1x1_to_3x3(kernel):
  """(1, 1, I, O) -> (3, 3, I, O), the 1x1 kernel at the centre tap so it lines up with padding 1."""
  return pad_to_center(kernel, 3)


def identity_kernel(channels: int, groups: int = 1, dtype: Any = jnp.float32, size: int = 3):
  """The size x size kernel of x -> x for a grouped conv: (size, size, channels // groups, channels).

  Output channel i reads input channel i, which within its group has index i % (channels // groups);
  ``groups == channels`` is the depthwise case.
  """
  if channels % groups:
    raise ValueError(f"identity_kernel: {groups} groups do not divide {channels} channels.")
  per_group = channels // groups
  out = jnp.arange(channels)
  return jnp.zeros((size, size, per_group, channels), dtype).at[size // 2, size // 2, out % per_group, out].set(1)


def join_path(path: tuple[str, ...]) -> str:
  """A tree path for messages: ("stage1_0", "rbr_dense") -> "stage1_0/rbr_dense"."""
  return "/".join(path) or "<root>"


def child(tree, key: str, path: tuple[str, ...], what: str = "params"):
  """``tree[key]``, or a ValueError naming ``path/key`` as missing from ``what`` (params or batch_stats)."""
  if not isinstance(tree, Mapping) or key not in tree:
    raise ValueError(f"{what} is missing {join_path(path + (key,))!r}.")
  return tree[key]


def _check_channels(bn: BatchNorm, channels: int, path: tuple[str, ...]) -> None:
  for name, leaf in zip(("scale", "bias", "mean", "var"), bn):
    if jnp.shape(leaf) != (channels,):
      raise ValueError(f"{join_path(path + (name,))!r} has shape {jnp.shape(leaf)}; expected ({channels},) "
                       "to match the branch's output channels.")


def _stats(stats: Optional[Mapping], path: tuple[str, ...]) -> Mapping:
  if stats is None:
    raise ValueError(f"batch_stats is missing {join_path(path)!r}: params without their batch_stats "
                     "(pass variables['batch_stats'] from the same model).")
  return stats


def batch_norm(params: Mapping, stats: Optional[Mapping], path: tuple[str, ...]) -> BatchNorm:
  """A BatchNorm's validated (scale, bias, mean, var), from its params {scale, bias} and batch_stats {mean, var}
  at ``path``."""
  scale, bias = (child(params, k, path) for k in ("scale", "bias"))
  bn = (scale, bias, *(child(_stats(stats, path), k, path, "batch_stats") for k in ("mean", "var")))
  _check_channels(bn, jnp.shape(scale)[-1], path)
  return bn


def conv_bn(params: Mapping, stats: Optional[Mapping], path: tuple[str, ...], conv: str = "conv",
            norm: str = "bn") -> tuple[Any, BatchNorm]:
  """A conv+BN branch's validated (kernel (k, k, I, O), its BN), from {conv: {kernel}, norm: {scale, bias}} and
  batch_stats {norm: {mean, var}}."""
  kernel = child(child(params, conv, path), "kernel", path + (conv,))
  bn = batch_norm(child(params, norm, path), child(_stats(stats, path), norm, path, "batch_stats"), path + (norm,))
  _check_channels(bn, kernel.shape[-1], path + (norm,))
  return kernel, bn


def fuse_conv_bn(params: Mapping, stats: Optional[Mapping], eps: float, path: tuple[str, ...], conv: str = "conv",
                 norm: str = "bn"):
  """``fuse_bn`` of a conv+BN subtree (``conv_bn``): (kernel (k, k, I, O), bias (O,))."""
  kernel, bn = conv_bn(params, stats, path, conv, norm)
  return fuse_bn(kernel, *bn, eps=eps)


def fuse_branches(path: tuple[str, ...], convs: Sequence[tuple[str, Any, BatchNorm]],
                  small: Sequence[tuple[str, Any, BatchNorm]] = (), identity: Optional[tuple[str, BatchNorm]] = None,
                  eps: float = BN_EPSILON):
  """The sum of a block's linear branches as one conv: ``convs`` the k x k conv+BN branches (name, kernel
  (k, k, I, O), BN), ``small`` 1x1 conv+BN branches (padded to the centre), ``identity`` a BN of the input
  (name, BN; the identity kernel of the kernel's groups). Returns (kernel (k, k, I, O), bias (O,)); shapes that do
  not form one block raise ValueError naming the block at ``path``."""
  if not convs:
    raise ValueError(f"Block {join_path(path)!r} has no k x k conv branch.")
  kernel = bias = None
  for name, k, bn in convs:
    if kernel is not None and k.shape != kernel.shape:
      raise ValueError(f"Block {join_path(path)!r}: {name} kernel {k.shape} differs from {convs[0][0]}'s {kernel.shape}.")
    k, b = fuse_bn(k, *bn, eps=eps)
    kernel, bias = (k, b) if kernel is None else (kernel + k, bias + b)
  size, (in_per_group, channels) = kernel.shape[0], kernel.shape[2:]
  for name, k1, bn1 in small:
    if k1.shape != (1, 1) + kernel.shape[2:]:
      raise ValueError(f"Block {join_path(path)!r}: {convs[0][0]} kernel {kernel.shape} and {name} kernel {k1.shape} do "
                       f"not form a block (expected (1, 1, {in_per_group}, {channels})).")
    k1, b1 = fuse_bn(pad_to_center(k1, size), *bn1, eps=eps)
    kernel, bias = kernel + k1, bias + b1
  if identity is not None:
    name, bn_id = identity
    _check_channels(bn_id, channels, path + (name,))
    if channels % in_per_group:
      raise ValueError(f"Block {join_path(path)!r} has an identity branch but its kernel {kernel.shape} does not map "
                       f"{channels} channels to themselves.")
    kernel_id, bias_id = fuse_bn(identity_kernel(channels, channels // in_per_group, kernel.dtype, size), *bn_id,
                                 eps=eps)
    kernel, bias = kernel + kernel_id, bias + bias_id
  return kernel, bias


def check_entries(params: Mapping, stats: Optional[Mapping], allowed: str, path: tuple[str, ...],
                  holds: str) -> None:
  """A block's params may hold only entries matching the regex ``allowed`` (``holds`` says which, for the
  message), and its batch_stats only entries its params have."""
  unknown = sorted(k for k in params if not re.fullmatch(allowed, k))
  if unknown:
    raise ValueError(f"Block {join_path(path)!r} has unexpected entries {unknown}; it holds {holds}.")
  extra = sorted(set(stats or {}) - set(params))
  if extra:
    raise ValueError(f"batch_stats has {[join_path(path + (k,)) for k in extra]} with no matching params.")


def carry_over(params, stats: Optional[Mapping], path: tuple[str, ...]):
  """A subtree with nothing to fold (SE, a classifier), as it is; batch_stats under it are an error."""
  if isinstance(params, Mapping):
    return {k: carry_over(v, (stats or {}).get(k), path + (k,)) for k, v in params.items()}
  if stats is not None:
    raise ValueError(f"batch_stats has {join_path(path)!r} where params hold an array.")
  return params


def fuse_layers(params: Mapping, batch_stats: Mapping, eps: float = BN_EPSILON, *,
                rules: Sequence[plan.FuseRule], drop: str = "$^") -> dict:
  """A training-form tree -> the deploy form's params, layer by layer (the tree's top-level entries): each layer
  claimed by one of ``rules`` fused by it, those whose names match the regex ``drop`` (training-only heads) left
  out, the rest (e.g. the classifier) carried over. At least one layer must be fused."""
  extra = sorted(set(batch_stats) - set(params))
  if extra:
    raise ValueError(f"batch_stats has {extra} with no matching params.")
  out, fused = {}, 0
  for name, layer in params.items():
    if re.fullmatch(drop, name):
      continue
    rule = next((r for r in rules if isinstance(layer, Mapping) and r.claims(layer)), None)
    if rule is None:
      out[name] = carry_over(layer, batch_stats.get(name), (name,))
    else:
      out[name] = rule.fuse(layer, batch_stats.get(name), eps, (name,))
      fused += 1
  if not fused:
    raise ValueError("reparam found no training-time block in params; were these params already "
                     "re-parameterized?")
  return out


def at_highest_precision(fold):
  """``fold`` with every matmul and convolution it traces at HIGHEST precision, whatever the backend's default
  (the context is read when each operation is traced, so it holds under ``jax.jit`` too)."""

  @functools.wraps(fold)
  def wrapped(*args, **kwargs):
    with jax.default_matmul_precision("highest"):
      return fold(*args, **kwargs)

  return wrapped
