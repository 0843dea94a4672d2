"""Runs a module or a script with ``import tensorflow`` failing, as on a JAX-only accelerator image; ``--also``
blocks more packages (e.g. torch, as on a TPU VM).

  python tests/no_tensorflow.py -m repvgg_jax.bench --models=RepVGG-A0 ...
  python tests/no_tensorflow.py -c "import repvgg_jax"
  python tests/no_tensorflow.py --also=torch -m repvgg_jax.convert ...
  python tests/no_tensorflow.py --also=ml_collections,qwix benchmarks/gpu_check.py --smoke ...   # a script
"""

import importlib.abc
import importlib.util
import runpy
import sys

BLOCKED = ["tensorflow", "tensorflow_datasets"]


def _blocked(name: str) -> bool:
  return name.split(".")[0] in BLOCKED


class BlockTensorFlow(importlib.abc.MetaPathFinder):

  def find_spec(self, fullname, path, target=None):
    del path, target
    if _blocked(fullname):
      raise ModuleNotFoundError(f"No module named {fullname!r} (blocked by tests/no_tensorflow.py)")
    return None


def _find_spec_without_tensorflow(find_spec):
  """``importlib.util.find_spec`` answers None for the blocked packages, as when they are not installed."""
  def wrapped(name, package=None):
    return None if _blocked(name) else find_spec(name, package)
  return wrapped


def main():
  importlib.util.find_spec = _find_spec_without_tensorflow(importlib.util.find_spec)
  sys.meta_path.insert(0, BlockTensorFlow())
  argv = sys.argv[1:]
  if argv and argv[0].startswith("--also="):
    BLOCKED.extend(argv.pop(0)[len("--also="):].split(","))
  mode, *rest = argv
  if mode.endswith(".py"):
    sys.argv = [mode, *rest]
    runpy.run_path(mode, run_name="__main__")
    return
  target, *args = rest
  sys.argv = [target, *args]
  if mode == "-m":
    runpy.run_module(target, run_name="__main__", alter_sys=True)
  elif mode == "-c":
    exec(compile(target, "<no_tensorflow -c>", "exec"), {"__name__": "__main__"})  # pylint: disable=exec-used
  else:
    raise SystemExit(f"usage: {__doc__}")

if __name__ == "__main__":
  main()
