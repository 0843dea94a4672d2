"""Train form vs deploy form of every variant on well-posed float64 test networks, printed as a table.

  python benchmarks/equivalence_table.py [--models=RepVGG-A0,...]

The networks of tests/wellposed.py (random weights, random BN affine maps, BN statistics calibrated on
random images, float64), 32 px, batch 4, 10 classes. Columns: the reference's input dependence (spread over
the batch / largest logit), the deploy form's error and each mutated deploy form's error, relative to the
spread. The tests assert the same quantities (tests/test_equivalence.py).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import repvgg_jax as rv  # pylint: disable=wrong-import-position
from tests import wellposed  # pylint: disable=wrong-import-position

_MODELS = flags.DEFINE_list("models", None, "Variants (default: all).")


def main(argv):
  del argv
  names = _MODELS.value or rv.list_models()
  print("| model | input dependence | deploy (float64) | zeroed stem kernel | kh and kw swapped | wrong BN epsilon |")
  print("|---|---|---|---|---|---|")
  for name in names:
    reference, got, mutated = wellposed.train_vs_deploy(name)
    dependence = wellposed.spread(reference) / float(np.abs(reference).max())
    cells = [f"{wellposed.spread_error(y, reference):.1e}" for y in [got, *mutated.values()]]
    print(f"| {name} | {dependence:.2f} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
  app.run(main)
