"""Test-session set-up."""

# torchvision segfaults when it is imported after TensorFlow in one process (seen with tensorflow-cpu 2.21 and
# torchvision 0.29), so the optional PyTorch stack, when installed, is loaded first.
try:
  import timm  # noqa: F401  pylint: disable=unused-import
except ImportError:
  pass
