"""Train form vs deploy form for every variant at emulated accelerator precision, printed as a table.

  python benchmarks/emulated_precision.py

Columns: max error relative to the largest logit at the default precision under the emulation of
tests/precision_emulation.py (float32 operands of convolutions and dots rounded to bfloat16 unless run at
HIGHEST), the project's check (HIGHEST) under the emulation, the check on the CPU without emulation, and the
float32 deploy form against the training form computed in float64. 32 px, batch 2, 10 classes, random
weights and random BN statistics (MobileOne's BN scales in tests.helpers.MOBILEONE_SCALES).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=wrong-import-position
import repvgg_jax as rv  # pylint: disable=wrong-import-position
from repvgg_jax import equivalence  # pylint: disable=wrong-import-position
from tests.helpers import MOBILEONE_SCALES, random_variables  # pylint: disable=wrong-import-position
from tests.wellposed import float64_apply  # pylint: disable=wrong-import-position
from tests.precision_emulation import emulated_accelerator_precision  # pylint: disable=wrong-import-position


def main():
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
      yt = jax.jit(lambda v, x: model.apply(v, x))(v, x)
      yd = jax.jit(lambda p, x: deploy.apply({"params": p}, x))(plain, x)
      default = equivalence.max_relative_error(yd, yt)
      highest = equivalence.check_equivalence(model, v, deploy, plain, x)
    with jax.default_matmul_precision("highest"):
      vs64 = equivalence.max_relative_error(deploy.apply({"params": plain}, x), float64_apply(name, 10)(v, x))
    print(f"| {name} | {default:.2e} | {highest:.2e} | {exact:.2e} | {vs64:.2e} |", flush=True)


if __name__ == "__main__":
  main()
