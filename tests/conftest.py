"""Test-session set-up."""

# torchvision segfaults when it is imported after TensorFlow in one process (seen with tensorflow-cpu 2.21 and
# torchvision 0.29), so the optional PyTorch stack, when installed, is loaded first.
try:
  import timm  # noqa: F401  pylint: disable=unused-import
except ImportError:
  pass


import atexit  # pylint: disable=g-import-not-at-top,wrong-import-position
import os  # pylint: disable=g-import-not-at-top,wrong-import-position
import shutil  # pylint: disable=g-import-not-at-top,wrong-import-position
import tempfile  # pylint: disable=g-import-not-at-top,wrong-import-position

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

# Many tests compile the same computations (every tiny training run, every command-line run in a subprocess):
# one persistent compilation cache for the session, this process and its subprocesses, compiles each once.
# Its key is the lowered program, so the precision emulation's programs are cached apart.
_COMPILATION_CACHE = tempfile.mkdtemp(prefix="repvgg_jax_test_compilations_")
atexit.register(shutil.rmtree, _COMPILATION_CACHE, ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = _COMPILATION_CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
jax.config.update("jax_compilation_cache_dir", _COMPILATION_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

from tests.helpers import write_fake_fashion_mnist  # pylint: disable=g-import-not-at-top,wrong-import-position
from tests.precision_emulation import emulated_accelerator_precision  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope="session")
def fmnist_dir(tmp_path_factory):
  """Small Fashion-MNIST-shaped IDX files (256 train, 72 test) with a visible class pattern."""
  return write_fake_fashion_mnist(tmp_path_factory.mktemp("fmnist"))


@pytest.fixture
def accelerator_precision():
  """CPU convolutions and dots round float32 operands to bf16 unless run at HIGHEST, as GPUs and TPUs do
  (on a GPU or TPU, the real thing)."""
  if jax.default_backend() != "cpu":
    yield
    return
  with emulated_accelerator_precision():
    yield


@pytest.fixture
def full_precision():
  """Comparisons with an independent computation (timm, float64 numpy) at HIGHEST precision on any backend."""
  with jax.default_matmul_precision("highest"):
    yield
