"""Fusion at emulated accelerator precision, per family (and train vs deploy per variant), printed as tables.

  python benchmarks/emulated_precision.py                  # per family: fused leaves and a short run
  python benchmarks/emulated_precision.py --every_variant  # also train vs deploy for every variant

The emulation (tests/precision_emulation.py) rounds float32 operands of every convolution and dot to bfloat16
unless run at HIGHEST, as a TPU's default precision does (a GPU's TF32 keeps 3 more bits).

Per family (one tree each, tests.helpers.FAMILY_TREES, random weights and BN statistics): the largest error of a
fused leaf against the float64 fold, relative to the leaf's largest entry, for the fold at the default precision
("before": ``reparam`` without its HIGHEST context) and as shipped ("after"); then a short training run of the
family on generated Fashion-MNIST-shaped files under the emulation, and its end-of-run check (train vs deploy,
HIGHEST, relative to the largest logit; "fails" where it exceeds equivalence.RTOL and the run stops) with each
fold.

Per variant (--every_variant): max error relative to the largest logit at the default precision under the
emulation, the project's check (HIGHEST) under the emulation, the check on the CPU without emulation, and the
float32 deploy form against the training form computed in float64; 32 px, batch 2, 10 classes.
"""

import argparse
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=wrong-import-position

import repvgg_jax as rv  # pylint: disable=wrong-import-position
from repvgg_jax import equivalence, training  # pylint: disable=wrong-import-position
from tests.helpers import (FAMILY_TREES, MOBILEONE_SCALES, float64_fold,  # pylint: disable=wrong-import-position
                           leaf_errors, random_variables, write_fake_fashion_mnist)
from tests.precision_emulation import emulated_accelerator_precision  # pylint: disable=wrong-import-position
from tests.test_training import family_run_config  # pylint: disable=wrong-import-position
from tests.wellposed import float64_apply  # pylint: disable=wrong-import-position

AT_DEFAULT_PRECISION = rv.reparam.__wrapped__  # The fold without its HIGHEST context: what ran before.


def leaf_errors_under_emulation(fold, variables, exact) -> dict[str, float]:
  with emulated_accelerator_precision():
    return leaf_errors(jax.jit(fold)(variables["params"], variables["batch_stats"]), exact)


def end_of_run_error(fold, name: str, data_dir: str) -> str:
  """The run's own check (train vs deploy at HIGHEST, of the largest logit), or how it failed."""
  saved, training.reparam = training.reparam, fold
  try:
    with emulated_accelerator_precision():
      result = training.train_and_evaluate(family_run_config(name, data_dir), tempfile.mkdtemp())
    return f"{result['max_relative_error']:.1e}"
  except equivalence.EquivalenceError as e:
    return "fails: " + re.search(r"by (\S+) of the largest logit", str(e)).group(1)
  finally:
    training.reparam = saved


def families():
  data_dir = write_fake_fashion_mnist(tempfile.mkdtemp())
  print("| family (tree) | worst fused leaf | its error before | after | end-of-run error before | after |")
  print("|---|---|---|---|---|---|")
  for name, overrides in FAMILY_TREES:
    variables = random_variables(rv.create_model(name, num_classes=10, **overrides), (1, 32, 32, 3))
    exact = float64_fold(variables)
    before = leaf_errors_under_emulation(AT_DEFAULT_PRECISION, variables, exact)
    leaf = max(before, key=before.get)
    before, after = before[leaf], max(leaf_errors_under_emulation(rv.reparam, variables, exact).values())
    run_before, run_after = (end_of_run_error(fold, name, data_dir) for fold in (AT_DEFAULT_PRECISION, rv.reparam))
    print(f"| {name} | `{leaf}` | {before:.1e} | {after:.1e} | {run_before} | {run_after} |", flush=True)


def every_variant():
  print("| model | default precision (emulated) | HIGHEST (emulated) | CPU float32 | vs float64 training form |")
  print("|---|---|---|---|---|")
  for name in rv.list_models():
    model, deploy = rv.create_model(name, num_classes=10), rv.create_model(name, num_classes=10, deploy=True)
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    scales = MOBILEONE_SCALES if name.startswith("MobileOne") else (0.4, 1.2)
    v = random_variables(model, x.shape, scale_range=scales)
    plain = rv.reparam(v["params"], v["batch_stats"])
    exact = equivalence.check_equivalence(model, v, deploy, plain, x)
    with emulated_accelerator_precision():
      yt = jax.jit(lambda v, x: model.apply(v, x))(v, x)  # pylint: disable=cell-var-from-loop
      yd = jax.jit(lambda p, x: deploy.apply({"params": p}, x))(plain, x)  # pylint: disable=cell-var-from-loop
      default = equivalence.max_relative_error(yd, yt)
      highest = equivalence.check_equivalence(model, v, deploy, plain, x)
    with jax.default_matmul_precision("highest"):
      vs64 = equivalence.max_relative_error(deploy.apply({"params": plain}, x), float64_apply(name, 10)(v, x))
    print(f"| {name} | {default:.2e} | {highest:.2e} | {exact:.2e} | {vs64:.2e} |", flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--every_variant", action="store_true")
  args = parser.parse_args()
  families()
  if args.every_variant:
    every_variant()


if __name__ == "__main__":
  main()
