"""Backend-specific measures, each applied only on the backend where it was measured to help.

The model calls ``conv2d`` and ``global_average_pool``; what they lower to depends on the platform the
computation is lowered for (``lax.platform_dependent``), not on the host that traces it: a ``jax.export`` for
("cpu", "cuda", "tpu") made on a CPU host holds the CPU paths for the CPU alone. Measurements:
benchmarks/RESULTS.md.

XLA:CPU (measured on the project's 2-core machines):
- XLA_FLAGS ``--xla_cpu_experimental_ynn_fusion_type=-INDIVIDUAL_CONVOLUTION``. Since jaxlib 0.9, XLA:CPU
  hands convolutions to YNNPACK, which ran each on one thread: 145 GFLOP/s for a 32x56x56x64 3x3 convolution
  against 266 GFLOP/s in XLA's multi-threaded Eigen kernels; deploy A0 1.7x faster at batch 32, its 224 px
  training step 1.3x. XLA reads XLA_FLAGS once, when JAX starts its CPU backend, so ``import repvgg_jax``
  appends the flag before any computation runs; the user's own ``xla_cpu_experimental_ynn_fusion_type``,
  or REPVGG_JAX_KEEP_XLA_FLAGS=1, leaves XLA_FLAGS alone. GPU and TPU compilations ignore it.
- Convolutions whose output map has at most SMALL_MAP_PIXELS pixels as k*k shifted matmuls, skipping taps that
  only read padding: XLA:CPU's convolution and its gradient are ~3x slower there (quickstart step 1.76x).
  Only for dots of at least MIN_MATMUL_ROWS rows (batch * pixels): XLA:CPU compiles smaller dots into inline
  code, and A0's training step at batch 2-8 took ~87 s to compile instead of ~30 s.
- Depthwise convolutions (one input channel per group, one output channel per input channel: MobileOne's
  3x3 and 1x1 "scale" branches) as k*k per-channel multiply-adds of shifted views: XLA:CPU's grouped
  convolution is 20-60x slower forward and 3-40x slower in its gradients (3x3 at 32x56x56x48: 95 ms
  forward against 4 ms, gradients 163 ms against 50 ms). configs/mobileone_quickstart.py's training step:
  350 -> 1,805 images/s. The padded input is materialized once (an optimization barrier): fused into each
  tap, its producer was recomputed per tap and branch (quarter-width S0 step: 280 -> 324 images/s).
- The global average pool as a contraction with ones: as a reduce, YNNPACK's reduction fusion pulled the
  producing convolutions into one single-threaded YNNPACK graph (A0's stages 3-4 ran 1.5x slower).

On GPU and TPU both functions are the plain ``lax.conv_general_dilated`` and ``jnp.mean``. SPECIAL_PATHS
lists the lowering platforms ("cpu", "cuda", "rocm", "tpu") that take the CPU paths; benchmarks/gpu_check.py
measures them on a GPU too.

``add_bias`` is where the deploy form's bias joins its convolution. XLA:GPU fuses conv + bias + ReLU into
one cuDNN call, and cuDNN's legacy fused conv-bias-activation supports only the IMPLICIT_PRECOMP_GEMM
algorithm, a suspect for RepVGG-B3's deploy form running slower than its training form on an H200 (whose
bias-free convolutions may take any algorithm). UNFUSED_BIAS lists the backends where an optimization
barrier keeps the bias out of the convolution's fusion (lowering platforms, as SPECIAL_PATHS); it is empty
until benchmarks/gpu_check.py, which times both, shows that it helps.
"""

import contextlib
import importlib.metadata
import os
from typing import MutableMapping

import jax.numpy as jnp
from jax import lax

FLAG_NAME = "xla_cpu_experimental_ynn_fusion_type"
FLAG = f"--{FLAG_NAME}=-INDIVIDUAL_CONVOLUTION"
OPT_OUT = "REPVGG_JAX_KEEP_XLA_FLAGS"
FIRST_JAXLIB = (0, 9)  # XLA aborts on flags it does not know; 0.8 has no YNNPACK fusion flag.

SPECIAL_PATHS = {"cpu"}
UNFUSED_BIAS: set[str] = set()
SMALL_MAP_PIXELS = 4
MIN_MATMUL_ROWS = 64


def _jaxlib_version() -> tuple[int, ...]:
  try:
    release = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return ()
  return tuple(int(part) for part in release.split(".")[:2] if part.isdigit())


def prefer_eigen_convolutions(environ: MutableMapping[str, str] = os.environ,
                              jaxlib_version: tuple[int, ...] | None = None) -> bool:
  """Appends FLAG to ``environ["XLA_FLAGS"]`` unless the user chose otherwise; True when it did."""
  version = _jaxlib_version() if jaxlib_version is None else jaxlib_version
  flags = environ.get("XLA_FLAGS", "")
  if environ.get(OPT_OUT) or FLAG_NAME in flags or version < FIRST_JAXLIB:
    return False
  environ["XLA_FLAGS"] = f"{flags} {FLAG}".strip()
  return True


_plain = False


@contextlib.contextmanager
def plain_convolutions():
  """While models are traced in this context, every convolution is one ``lax.conv_general_dilated`` and the pool
  a mean, on every platform: quantization must see one op per convolution (not per tap), and the
  accelerator-precision emulation the convolutions an accelerator runs."""
  global _plain  # pylint: disable=global-statement
  previous, _plain = _plain, True
  try:
    yield
  finally:
    _plain = previous


def _by_platform(platforms, special, plain, *args):
  """``special(*args)`` where the computation is lowered for one of ``platforms``, else ``plain(*args)`` (also
  where ``special`` is None). The choice is made when the computation is lowered, not when it is traced: an export
  for several platforms made on a CPU host gets the plain form in its CUDA and TPU lowerings, and no conditional
  reaches any compiler."""
  if special is None or not platforms:
    return plain(*args)
  return lax.platform_dependent(*args, default=plain, **{p: special for p in platforms})


def _special_paths() -> set[str]:
  return set() if _plain else SPECIAL_PATHS


def conv2d(x, kernel, strides: int = 1, groups: int = 1):
  """k x k convolution with symmetric padding k // 2 (PyTorch's ``padding=k//2``; 'SAME' would pad (0, 1) at
  stride 2 and misalign the 1x1 branch with the 3x3 window's centre). x (N, H, W, Cin), kernel HWIO."""
  k, p, s = kernel.shape[0], kernel.shape[0] // 2, strides
  ho, wo = (x.shape[1] + 2 * p - k) // s + 1, (x.shape[2] + 2 * p - k) // s + 1

  def plain(x, kernel):
    return lax.conv_general_dilated(x, kernel, (s, s), [(p, p), (p, p)], dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    feature_group_count=groups)

  def depthwise_taps(x, kernel):
    return sum(tap * kernel[i, j, 0] for i, j, tap in _taps(x, k, s, ho, wo))

  def matmul_taps(x, kernel):
    return sum(tap @ kernel[i, j] for i, j, tap in _taps(x, k, s, ho, wo))

  few_rows = not isinstance(x.shape[0], int) or x.shape[0] * ho * wo < MIN_MATMUL_ROWS  # symbolic: unknown
  if groups > 1 and kernel.shape[2] == 1 and kernel.shape[3] == groups:
    special = depthwise_taps
  elif groups == 1 and ho * wo <= SMALL_MAP_PIXELS and not few_rows:
    special = matmul_taps
  else:
    special = None
  return _by_platform(_special_paths(), special, plain, x, kernel)


def _taps(x, k: int, s: int, ho: int, wo: int):
  """(i, j, the (N, ho, wo, C) input pixels that kernel tap (i, j) multiplies), for the taps that read data."""
  p = k // 2
  # Materialized once: otherwise XLA fuses the producer (the previous block's BN, branch sum and ReLU) into
  # every tap's slice and recomputes it k*k times per branch.
  xp = lax.optimization_barrier(jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0))))

  def sees_data(tap, size, out):  # Does this kernel row/column ever read a non-padding pixel?
    return any(p <= tap + s * r < p + size for r in range(out))

  for i in range(k):
    for j in range(k):
      if sees_data(i, x.shape[1], ho) and sees_data(j, x.shape[2], wo):
        yield i, j, xp[:, i:i + s * (ho - 1) + 1:s, j:j + s * (wo - 1) + 1:s, :]


def global_average_pool(x):
  """Mean over H and W, (N, H, W, C) -> (N, C), accumulated in at least float32; dtype kept."""
  accumulate = jnp.promote_types(x.dtype, jnp.float32)

  def mean(x):
    return jnp.mean(x, axis=(1, 2), dtype=accumulate).astype(x.dtype)

  def contraction(x):
    n, h, w, c = x.shape
    total = jnp.einsum("npc,p->nc", x.reshape(n, h * w, c), jnp.ones((h * w,), x.dtype),
                       preferred_element_type=accumulate)
    return (total / (h * w)).astype(x.dtype)

  return _by_platform(_special_paths(), contraction, mean, x)


def add_bias(y, bias):
  """y + bias (broadcast over the last axis), outside the convolution's fusion where lowered for a platform in
  UNFUSED_BIAS."""
  return _by_platform(UNFUSED_BIAS, lambda y, b: lax.optimization_barrier(y) + b, lambda y, b: y + b, y, bias)
