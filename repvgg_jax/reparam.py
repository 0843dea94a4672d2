"""Structural re-parameterization as pure functions on arrays and PyTrees.

Each branch of a training-time block is linear up to its BatchNorm, and in eval mode a BatchNorm is an
affine map per channel, so the three branches fold into one 3x3 convolution with a bias:

    W = fuse(K3, bn3) + fuse(pad(K1), bn1) + fuse(I, bn_id),   b = b3 + b1 + b_id.

Kernels are Flax HWIO arrays. Nothing here mutates its input or keeps state; ``jax.jit(reparam)`` works.
"""

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from repvgg_jax.models import BN_EPSILON

BRANCHES = ("rbr_dense", "rbr_1x1", "rbr_identity")
_BLOCK_KEYS = frozenset(BRANCHES + ("se",))


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


def pad_1x1_to_3x3(kernel):
  """(1, 1, I, O) -> (3, 3, I, O), the 1x1 kernel at the centre tap so it lines up with padding 1."""
  return jnp.pad(kernel, ((1, 1), (1, 1), (0, 0), (0, 0)))


def identity_kernel(channels: int, groups: int = 1, dtype: Any = jnp.float32):
  """The 3x3 kernel of x -> x for a grouped conv: (3, 3, channels // groups, channels).

  Output channel i reads input channel i, which within its group has index i % (channels // groups).
  """
  if channels % groups:
    raise ValueError(f"identity_kernel: {groups} groups do not divide {channels} channels.")
  per_group = channels // groups
  out = jnp.arange(channels)
  return jnp.zeros((3, 3, per_group, channels), dtype).at[1, 1, out % per_group, out].set(1)


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

  Input params: ``rbr_dense`` {conv: {kernel (3,3,I,O)}, bn: {scale, bias}}, ``rbr_1x1`` {conv: {kernel
  (1,1,I,O)}, bn}, optionally ``rbr_identity`` {scale, bias} and ``se``; batch_stats hold ``mean``/``var``
  for each BatchNorm. Output: {``rbr_reparam``: {kernel (3,3,I,O), bias (O,)}} plus ``se`` unchanged.
  ``path`` names the block in error messages.
  """
  unknown = sorted(set(block_params) - _BLOCK_KEYS)
  if unknown:
    raise ValueError(f"Block {_join(path)!r} has unexpected entries {unknown}; a RepVGG block holds "
                     f"{sorted(_BLOCK_KEYS)}.")
  for branch in ("rbr_dense", "rbr_1x1"):
    if branch not in block_params:
      raise ValueError(f"Block {_join(path)!r} is missing its {branch!r} branch.")
  stats = block_stats if block_stats is not None else {}
  extra = sorted(set(stats) - set(block_params))
  if extra:
    raise ValueError(f"batch_stats has {[_join(path + (k,)) for k in extra]} with no matching params.")

  k3, *bn3 = _bn_branch(block_params["rbr_dense"], stats.get("rbr_dense"), path + ("rbr_dense",), True)
  k1, *bn1 = _bn_branch(block_params["rbr_1x1"], stats.get("rbr_1x1"), path + ("rbr_1x1",), True)
  if k3.shape[:2] != (3, 3) or k1.shape[:2] != (1, 1) or k3.shape[2:] != k1.shape[2:]:
    raise ValueError(f"Block {_join(path)!r}: rbr_dense kernel {k3.shape} and rbr_1x1 kernel {k1.shape} do not "
                     "form a RepVGG block (expected (3, 3, I, O) and (1, 1, I, O)).")
  kernel, bias = fuse_bn(k3, *bn3, eps=eps)
  kernel_1x1, bias_1x1 = fuse_bn(pad_1x1_to_3x3(k1), *bn1, eps=eps)
  kernel, bias = kernel + kernel_1x1, bias + bias_1x1

  if "rbr_identity" in block_params:
    _, *bn_id = _bn_branch(block_params["rbr_identity"], stats.get("rbr_identity"), path + ("rbr_identity",), False)
    in_per_group, channels = k3.shape[2:]
    if channels % in_per_group:
      raise ValueError(f"Block {_join(path)!r} has an identity branch but its kernel {k3.shape} does not map "
                       f"{channels} channels to themselves.")
    kernel_id, bias_id = fuse_bn(identity_kernel(channels, channels // in_per_group, k3.dtype), *bn_id, eps=eps)
    kernel, bias = kernel + kernel_id, bias + bias_id

  fused = {"rbr_reparam": {"kernel": kernel, "bias": bias}}
  if "se" in block_params:  # Carried over like any non-block subtree (SE has no BatchNorm to fold).
    fused["se"], _ = _reparam_tree(block_params["se"], stats.get("se"), eps, path + ("se",))
  return fused


def _reparam_tree(params: Mapping, stats, eps, path: tuple[str, ...]) -> tuple[dict, int]:
  if "rbr_dense" in params or "rbr_1x1" in params:
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


def reparam(params: Mapping, batch_stats: Mapping, eps: float = BN_EPSILON) -> dict:
  """Training-form ``params`` + ``batch_stats`` -> the deploy model's ``params``, exactly.

  Every block (a subtree holding ``rbr_dense``) becomes ``{rbr_reparam: {kernel, bias}}`` (+ its ``se``);
  everything else, e.g. the ``linear`` head, is carried over. Pure and jittable. ``eps`` must equal the
  BatchNorm epsilon of the trained model. Mismatched or partial trees raise ValueError naming the path.
  """
  if not isinstance(params, Mapping) or not isinstance(batch_stats, Mapping):
    raise ValueError("reparam takes two mappings: variables['params'] and variables['batch_stats'].")
  if "params" in params:
    raise ValueError("reparam got a whole variables dict; call reparam(variables['params'], "
                     "variables['batch_stats']).")
  fused, blocks = _reparam_tree(params, batch_stats, eps, ())
  if not blocks:
    raise ValueError("reparam found no training-time RepVGG block (a subtree with 'rbr_dense') in params; "
                     "were these params already re-parameterized?")
  return fused
