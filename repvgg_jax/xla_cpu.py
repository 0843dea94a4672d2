"""XLA:CPU setting that makes RepVGG's convolutions fast on CPU.

Since jaxlib 0.9, XLA:CPU hands convolutions to YNNPACK, which runs each of them on one thread on this
project's 2-core machines: 145 GFLOP/s for a 32x56x56x64 3x3 convolution against 266 GFLOP/s for XLA's
multi-threaded Eigen convolution, and 1.5-5x slower weight gradients (benchmarks/RESULTS.md). Taking
convolutions out of YNNPACK's fusion types keeps its fast reductions (BatchNorm statistics) and matmuls.

XLA reads XLA_FLAGS once, when JAX first starts its CPU backend, so ``import repvgg_jax`` appends the flag
before any computation runs. Setting ``xla_cpu_experimental_ynn_fusion_type`` yourself, or
REPVGG_JAX_KEEP_XLA_FLAGS=1, leaves XLA_FLAGS untouched. GPU and TPU compilations ignore the flag.
"""

import importlib.metadata
import os
from typing import MutableMapping

FLAG_NAME = "xla_cpu_experimental_ynn_fusion_type"
FLAG = f"--{FLAG_NAME}=-INDIVIDUAL_CONVOLUTION"
OPT_OUT = "REPVGG_JAX_KEEP_XLA_FLAGS"
FIRST_JAXLIB = (0, 9)  # XLA aborts on flags it does not know; 0.8 has no YNNPACK fusion flag.


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
