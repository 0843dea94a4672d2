"""Accelerator matmul precision, emulated on XLA:CPU.

On a GPU (TF32-like) or TPU (one bfloat16 pass) a float32 convolution or dot at the default precision
multiplies operands rounded to about bfloat16; only ``Precision.HIGHEST`` multiplies them in full float32.
XLA:CPU always computes in float32, so a CPU test cannot tell whether a check ran at HIGHEST. Under
``emulated_accelerator_precision()`` the CPU lowering of ``dot_general`` and ``conv_general_dilated`` rounds
float32 operands to bfloat16 (``lax.reduce_precision``, which XLA keeps) unless the operation's precision is
HIGHEST for both operands, then computes as before. A check that forgets HIGHEST then fails on the CPU too.

JAX caches lowered and compiled computations, so the caches are cleared on entry and exit.
"""

import contextlib

import jax
import jax.numpy as jnp
from jax import lax
from jax._src.interpreters import mlir  # The lowering registry has no public read access.

from repvgg_jax import backend

PLATFORM = "cpu"
PRIMITIVES = (lax.dot_general_p, lax.conv_general_dilated_p)
BF16_EXPONENT_BITS, BF16_MANTISSA_BITS = 8, 7


def _runs_at_highest(precision) -> bool:
  return isinstance(precision, tuple) and all(p == lax.Precision.HIGHEST for p in precision)


def _round_to_bf16(x):
  if x.dtype != jnp.float32:
    return x
  return lax.reduce_precision(x, exponent_bits=BF16_EXPONENT_BITS, mantissa_bits=BF16_MANTISSA_BITS)


def _emulating_rule(primitive, original):
  rounded = mlir.lower_fun(
      lambda lhs, rhs, **params: primitive.bind(_round_to_bf16(lhs), _round_to_bf16(rhs), **params),
      multiple_results=False)

  def rule(ctx, lhs, rhs, *, precision, **params):
    if _runs_at_highest(precision):
      return original.rule(ctx, lhs, rhs, precision=precision, **params)
    # The inner bind is marked HIGHEST so that lowering it reaches the original rule.
    return rounded(ctx, lhs, rhs, precision=(lax.Precision.HIGHEST,) * 2, **params)

  return rule


def _original(primitive):
  return mlir._platform_specific_lowerings[PLATFORM].get(primitive) or mlir._lowerings[primitive]  # pylint: disable=protected-access


def install() -> None:
  """Emulates accelerator precision in this process from now on (e.g. in a notebook kernel)."""
  for primitive in PRIMITIVES:
    original = _original(primitive)
    if getattr(original.rule, "emulates_accelerator_precision", False):
      continue
    rule = _emulating_rule(primitive, original)
    rule.emulates_accelerator_precision = True
    rule.original = original
    mlir.register_lowering(primitive, rule, platform=PLATFORM, inline=original.inline)
  jax.clear_caches()


def uninstall() -> None:
  table = mlir._platform_specific_lowerings[PLATFORM]  # pylint: disable=protected-access
  for primitive in PRIMITIVES:
    entry = table.get(primitive)
    if entry is not None and getattr(entry.rule, "emulates_accelerator_precision", False):
      original = entry.rule.original
      if original is mlir._lowerings.get(primitive):  # pylint: disable=protected-access
        del table[primitive]
      else:
        table[primitive] = original
  jax.clear_caches()


@contextlib.contextmanager
def emulated_accelerator_precision():
  """Within the block, CPU convolutions and dots round float32 operands to bf16 unless run at HIGHEST; models
  take the plain convolutions an accelerator runs (backend.plain_convolutions), not the CPU's multiply-add
  paths, which would escape the emulation."""
  install()
  try:
    with backend.plain_convolutions():
      yield
  finally:
    uninstall()


def notebook_cell(root: str) -> str:
  """Source of a first notebook cell that installs the emulation in the kernel (the repository at ``root``)."""
  return f"import sys\nsys.path.insert(0, {root!r})\nfrom tests import precision_emulation\nprecision_emulation.install()"

