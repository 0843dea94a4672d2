"""Train form vs deploy form for every variant at emulated accelerator precision, printed as a table.

  python benchmarks/emulated_precision.py

Columns: max error relative to the largest logit at the default precision under the emulation of
tests/precision_emulation.py (float32 operands of convolutions and dots rounded to bfloat16 unless run at
HIGHEST), the project's check (HIGHEST) under the emulation, and the check on the CPU without emulation.
32 px, batch 2, 10 classes, random weights and random BN statistics.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=wrong-import-position
import repvgg_jax as rv  # pylint: disable=wrong-import-position
from repvgg_jax import equivalence  # pylint: disable=wrong-import-position
from tests.helpers import random_variables  # pylint: disable=wrong-import-position
from tests.precision_emulation import emulated_accelerator_precision  # pylint: disable=wrong-import-position


def main():
  print("| model | default precision (emulated) | HIGHEST (emulated) | CPU float32 |")
  print("|---|---|---|---|")
  for name in rv.list_models():
    model, deploy = rv.create_model(name, num_classes=10), rv.create_model(name, num_classes=10, deploy=True)
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    v = random_variables(model, x.shape)
    plain = rv.reparam(v["params"], v["batch_stats"])
    exact = equivalence.check_equivalence(model, v, deploy, plain, x)
    with emulated_accelerator_precision():
      yt = jax.jit(lambda v, x: model.apply(v, x))(v, x)
      yd = jax.jit(lambda p, x: deploy.apply({"params": p}, x))(plain, x)
      default = equivalence.max_relative_error(yd, yt)
      highest = equivalence.check_equivalence(model, v, deploy, plain, x)
    print(f"| {name} | {default:.2e} | {highest:.2e} | {exact:.2e} |", flush=True)


if __name__ == "__main__":
  main()
