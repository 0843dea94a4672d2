"""Structural re-parameterization as pure functions on arrays and PyTrees, for RepVGG, QARepVGG and MobileOne
blocks.

Each branch of a training-time block is linear up to its BatchNorm, and in eval mode a BatchNorm is an
affine map per channel, so the branches fold into one k x k convolution with a bias:

    W = sum_i fuse(K_i, bn_i) + fuse(pad(K1), bn1) + fuse(I, bn_id),   b = sum_i b_i + b1 + b_id,

with the k x k conv branches K_i (RepVGG: one, ``rbr_dense``; MobileOne: ``rbr_conv_i``), the 1x1 branch
padded to the centre (``rbr_1x1`` / ``rbr_scale``) and the identity (``rbr_identity`` / ``rbr_skip``), for
any groups, depthwise included. A QARepVGG block sums BN3(conv3x3), a bare 1x1 conv and the bare identity,
then applies one BN: the sum's kernel K3 t3 + pad(K1) + I and bias b3 fold with that BN (``fuse_bn_after_sum``).
Kernels are Flax HWIO arrays. Nothing here mutates its input or keeps
state; ``jax.jit(reparam)`` works.
"""

import re

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from repvgg_jax.models import AUX_SUFFIX, BN_EPSILON

CONV_BRANCH = re.compile(r"rbr_dense|rbr_conv_\d+")  # k x k conv + BN.
SMALL_BRANCHES = ("rbr_1x1", "rbr_scale")  # 1x1 conv + BN, padded to the centre of the k x k kernel.
IDENTITY_BRANCHES = ("rbr_identity", "rbr_skip")  # BN alone.


KEPT = ("se", "post_se")  # SE blocks have no BatchNorm to fold: the plain block keeps them.


def _is_block_key(key: str) -> bool:
  return bool(CONV_BRANCH.fullmatch(key)) or key in SMALL_BRANCHES + IDENTITY_BRANCHES + KEPT


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


def _join(path: tuple[str, ...]) -> str:
  return "/".join(path) or "<root>"


def _child(tree, key: str, path: tuple[str, ...], what: str):
  if not isinstance(tree, Mapping) or key not in tree:
    raise ValueError(f"{what} is missing {_join(path + (key,))!r}.")
  return tree[key]


def _bn_branch(params, stats, path, has_conv: bool):
  """Validated (kernel or None, scale, bias, mean, var) of one branch of a block."""
  bn_params = _child(params, "bn", path, "params") if has_conv else params
  bn_path = path + ("bn",) if has_conv else path
  if stats is None:
    raise ValueError(f"batch_stats is missing {_join(path)!r}: params without their batch_stats "
                     "(pass variables['batch_stats'] from the same model).")
  bn_stats = _child(stats, "bn", path, "batch_stats") if has_conv else stats
  scale, bias = (_child(bn_params, k, bn_path, "params") for k in ("scale", "bias"))
  mean, var = (_child(bn_stats, k, bn_path, "batch_stats") for k in ("mean", "var"))
  kernel = _child(_child(params, "conv", path, "params"), "kernel", path + ("conv",), "params") if has_conv else None
  out_channels = kernel.shape[-1] if has_conv else scale.shape[-1]
  for name, leaf in (("scale", scale), ("bias", bias), ("mean", mean), ("var", var)):
    if jnp.shape(leaf) != (out_channels,):
      raise ValueError(f"{_join(bn_path + (name,))!r} has shape {jnp.shape(leaf)}; expected ({out_channels},) "
                       "to match the branch's output channels.")
  return kernel, scale, bias, mean, var


def fuse_block(block_params: Mapping, block_stats: Mapping, eps: float = BN_EPSILON,
               path: tuple[str, ...] = ()) -> dict:
  """One training-time block's params and batch_stats -> the plain block's params.

  Input params (RepVGG / MobileOne names): k x k conv branches ``rbr_dense`` / ``rbr_conv_0``,
  ``rbr_conv_1``, ... {conv: {kernel (k,k,I,O)}, bn: {scale, bias}}; a 1x1 branch ``rbr_1x1`` /
  ``rbr_scale`` {conv: {kernel (1,1,I,O)}, bn} (required in RepVGG blocks, present in MobileOne's where
  k > 1); optionally an identity ``rbr_identity`` / ``rbr_skip`` {scale, bias}, and ``se``. batch_stats hold
  ``mean``/``var`` for each BatchNorm. Output: {``rbr_reparam``: {kernel (k,k,I,O), bias (O,)}} plus ``se``
  unchanged. ``path`` names the block in error messages.
  """
  if "bn" in block_params:
    return _fuse_quantization_friendly_block(block_params, block_stats, eps, path)
  unknown = sorted(k for k in block_params if not _is_block_key(k))
  if unknown:
    raise ValueError(f"Block {_join(path)!r} has unexpected entries {unknown}; a re-parameterizable block "
                     f"holds k x k conv branches (rbr_dense or rbr_conv_i), {list(SMALL_BRANCHES)}, "
                     f"{list(IDENTITY_BRANCHES)}, se and post_se.")
  if "rbr_dense" in block_params and "rbr_1x1" not in block_params:
    raise ValueError(f"Block {_join(path)!r} is missing its 'rbr_1x1' branch.")
  convs = sorted((k for k in block_params if CONV_BRANCH.fullmatch(k)), key=lambda k: (len(k), k))
  if not convs:
    raise ValueError(f"Block {_join(path)!r} is missing its 'rbr_dense' branch (or MobileOne's 'rbr_conv_0').")
  stats = block_stats if block_stats is not None else {}
  extra = sorted(set(stats) - set(block_params))
  if extra:
    raise ValueError(f"batch_stats has {[_join(path + (k,)) for k in extra]} with no matching params.")

  kernel = bias = None
  for name in convs:
    k, *bn = _bn_branch(block_params[name], stats.get(name), path + (name,), True)
    if kernel is not None and k.shape != kernel.shape:
      raise ValueError(f"Block {_join(path)!r}: {name} kernel {k.shape} differs from {convs[0]}'s {kernel.shape}.")
    k, b = fuse_bn(k, *bn, eps=eps)
    kernel, bias = (k, b) if kernel is None else (kernel + k, bias + b)
  size, (in_per_group, channels) = kernel.shape[0], kernel.shape[2:]
  for name in (n for n in SMALL_BRANCHES if n in block_params):
    k1, *bn1 = _bn_branch(block_params[name], stats.get(name), path + (name,), True)
    if k1.shape != (1, 1) + kernel.shape[2:]:
      raise ValueError(f"Block {_join(path)!r}: {convs[0]} kernel {kernel.shape} and {name} kernel {k1.shape} do "
                       f"not form a block (expected (1, 1, {in_per_group}, {channels})).")
    k1, b1 = fuse_bn(pad_to_center(k1, size), *bn1, eps=eps)
    kernel, bias = kernel + k1, bias + b1

  for name in (n for n in IDENTITY_BRANCHES if n in block_params):
    _, *bn_id = _bn_branch(block_params[name], stats.get(name), path + (name,), False)
    if channels % in_per_group:
      raise ValueError(f"Block {_join(path)!r} has an identity branch but its kernel {kernel.shape} does not map "
                       f"{channels} channels to themselves.")
    kernel_id, bias_id = fuse_bn(identity_kernel(channels, channels // in_per_group, kernel.dtype, size), *bn_id,
                                 eps=eps)
    kernel, bias = kernel + kernel_id, bias + bias_id

  fused = {"rbr_reparam": {"kernel": kernel, "bias": bias}}
  for name in (n for n in KEPT if n in block_params):  # Carried over like any non-block subtree.
    fused[name], _ = _reparam_tree(block_params[name], stats.get(name), eps, path + (name,))
  return fused


def _fuse_quantization_friendly_block(block_params: Mapping, block_stats, eps: float, path: tuple[str, ...]) -> dict:
  """QARepVGG: {rbr_dense: {conv, bn}, rbr_1x1: {kernel (1,1,I,O)}, bn} + batch_stats {rbr_dense: {bn},
  bn, rbr_identity (ones, where the block has an identity)} -> {rbr_reparam: {kernel (3,3,I,O), bias (O,)}}:
  K = K3 t3 + pad(K1) + I, b = beta3 - mu3 t3, then the BN after the sum folded in."""
  unknown = sorted(set(block_params) - {"rbr_dense", "rbr_1x1", "bn"})
  if unknown:
    raise ValueError(f"Block {_join(path)!r} has unexpected entries {unknown}; a QARepVGG block holds rbr_dense, "
                     "rbr_1x1 and bn.")
  stats = block_stats if block_stats is not None else {}
  extra = sorted(set(stats) - {"rbr_dense", "bn", "rbr_identity"})
  if extra:
    raise ValueError(f"batch_stats has {[_join(path + (k,)) for k in extra]} with no matching params.")
  kernel, *bn3 = _bn_branch(_child(block_params, "rbr_dense", path, "params"), stats.get("rbr_dense"),
                            path + ("rbr_dense",), True)
  kernel, bias = fuse_bn(kernel, *bn3, eps=eps)
  k1 = _child(_child(block_params, "rbr_1x1", path, "params"), "kernel", path + ("rbr_1x1",), "params")
  if k1.shape != (1, 1) + kernel.shape[2:]:
    raise ValueError(f"Block {_join(path)!r}: rbr_dense kernel {kernel.shape} and rbr_1x1 kernel {k1.shape} do not "
                     f"form a block (expected (1, 1) + {kernel.shape[2:]}).")
  kernel = kernel + pad_1x1_to_3x3(k1)
  if "rbr_identity" in stats:
    in_per_group, channels = kernel.shape[2:]
    gain = stats["rbr_identity"]
    if jnp.shape(gain) != (channels,) or channels % in_per_group:
      raise ValueError(f"Block {_join(path)!r} has an identity (batch_stats 'rbr_identity' of shape "
                       f"{jnp.shape(gain)}) but its kernel {kernel.shape} does not map {channels} channels to themselves.")
    kernel = kernel + identity_kernel(channels, channels // in_per_group, kernel.dtype) * gain
  _, *bn = _bn_branch(block_params["bn"], stats.get("bn"), path + ("bn",), False)
  kernel, bias = fuse_bn_after_sum(kernel, bias, *bn, eps=eps)
  return {"rbr_reparam": {"kernel": kernel, "bias": bias}}


def _reparam_tree(params: Mapping, stats, eps, path: tuple[str, ...]) -> tuple[dict, int]:
  if any(CONV_BRANCH.fullmatch(k) or k in SMALL_BRANCHES for k in params):
    return fuse_block(params, stats, eps, path), 1
  stats = stats if stats is not None else {}
  extra = sorted(set(stats) - set(params))
  if extra:
    raise ValueError(f"batch_stats has {[_join(path + (k,)) for k in extra]} with no matching params.")
  out, blocks = {}, 0
  for key, value in params.items():
    if isinstance(value, Mapping):
      out[key], n = _reparam_tree(value, stats.get(key), eps, path + (key,))
      blocks += n
    elif key in stats:
      raise ValueError(f"batch_stats has {_join(path + (key,))!r} where params hold an array.")
    else:
      out[key] = value
  return out, blocks


def fuse_plain_stack(params: Mapping, batch_stats: Mapping, eps: float = BN_EPSILON) -> dict:
  """``reparam`` of a RepVGG, QARepVGG, MobileOne or RepVGGplus tree: every block (a subtree holding ``rbr_dense``
  or ``rbr_conv_0``) becomes ``{rbr_reparam: {kernel, bias}}`` (+ its ``se`` or ``post_se``); RepVGGplus's
  auxiliary heads (``*_aux``) are dropped; everything else, e.g. the ``linear`` head, is carried over."""
  drop_aux = lambda tree: {k: v for k, v in tree.items() if not k.endswith(AUX_SUFFIX)}  # Training form only.
  fused, blocks = _reparam_tree(drop_aux(params), drop_aux(batch_stats), eps, ())
  if not blocks:
    raise ValueError("reparam found no training-time block (a subtree with 'rbr_dense' or 'rbr_conv_0') in "
                     "params; were these params already re-parameterized?")
  return fused


def reparam(params: Mapping, batch_stats: Mapping, eps: float = BN_EPSILON) -> dict:
  """Training-form ``params`` + ``batch_stats`` -> the deploy model's ``params``, exactly, by the fuse rules of
  the family the tree belongs to (``families.of_params``). Pure and jittable. ``eps`` must equal the BatchNorm
  epsilon of the trained model. Mismatched or partial trees raise ValueError naming the path.
  """
  from repvgg_jax import families  # pylint: disable=g-import-not-at-top  # The registry imports every family's rules.
  if not isinstance(params, Mapping) or not isinstance(batch_stats, Mapping):
    raise ValueError("reparam takes two mappings: variables['params'] and variables['batch_stats'].")
  if "params" in params:
    raise ValueError("reparam got a whole variables dict; call reparam(variables['params'], "
                     "variables['batch_stats']).")
  return families.of_params(params).reparam(params, batch_stats, eps)
