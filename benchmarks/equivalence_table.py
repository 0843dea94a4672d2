"""Train form vs deploy form of every variant on well-posed float64 test networks, printed as a table.

  python benchmarks/equivalence_table.py [--models=RepVGG-A0,...]
  python benchmarks/equivalence_table.py --sensitivity

--sensitivity: what ``check_equivalence`` (float32, HIGHEST, bound ``equivalence.RTOL``) catches, on random-
statistics and on well-posed float32 networks (A0 full size, the others at reduced width): its train vs
deploy error, the smallest BN epsilon mismatch it catches (the deploy params fused with eps 1e-5 (1 + d)) and
the smallest scaling of the stem kernel (by 1 + d), d in powers of 2 from 1 down; "-" where d = 1 passes.

The networks of tests/wellposed.py (random weights, random BN affine maps, BN statistics calibrated on
random images, float64), 32 px, batch 4, 10 classes. Columns: the reference's input dependence (spread over
the batch / largest logit), the deploy form's error and each mutated deploy form's error, relative to the
spread. The tests assert the same quantities (tests/test_equivalence.py).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # pylint: disable=wrong-import-position
import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import repvgg_jax as rv  # pylint: disable=wrong-import-position
from repvgg_jax import equivalence  # pylint: disable=wrong-import-position
from tests import wellposed  # pylint: disable=wrong-import-position
from tests.helpers import random_variables  # pylint: disable=wrong-import-position

_MODELS = flags.DEFINE_list("models", None, "Variants (default: all).")
_SENSITIVITY = flags.DEFINE_bool("sensitivity", False, "Print what check_equivalence catches instead.")


def smallest_caught(deploy_logits, y_train) -> str:
  """The smallest d = 2^-k for which ``deploy_logits(d)`` fails check_equivalence's criterion."""
  caught = "-"
  for k in range(24):
    try:
      equivalence.assert_close_logits(deploy_logits(2.0 ** -k), y_train)
    except equivalence.EquivalenceError:
      caught = f"{2.0 ** -k:.1e}"
      continue
    break
  return caught


def sensitivity():
  print(f"| model | test network | train vs deploy | smallest eps mismatch caught | smallest stem scaling caught |")
  print("|---|---|---|---|---|")
  cases = [("RepVGG-A0", {})] + [(n, wellposed.reduced_width(n)) for n in ("RepVGG-B1g4", "RepVGG-D2se", "MobileOne-S0")]
  for name, overrides in cases:
    model = rv.create_model(name, num_classes=10, **overrides)
    deploy = rv.create_model(name, num_classes=10, deploy=True, **overrides)
    x = jnp.asarray(wellposed.images((4, 32, 32, 3), 1), jnp.float32)
    for kind in ("random statistics", "well-posed"):
      v = (wellposed.well_posed_variables(model, (32, 32, 3), dtype=np.float32) if kind == "well-posed"
           else random_variables(model, x.shape))
      with jax.default_matmul_precision("highest"):
        y_train = jax.jit(model.apply)(v, x)
        run = jax.jit(lambda p: deploy.apply({"params": p}, x))
        plain = rv.reparam(v["params"], v["batch_stats"])
        error = equivalence.max_relative_error(run(plain), y_train)
        eps = smallest_caught(lambda d: run(rv.reparam(v["params"], v["batch_stats"], eps=1e-5 * (1 + d))), y_train)

        def scaled_stem(d):
          stem = {**plain["stage0"], "rbr_reparam": {**plain["stage0"]["rbr_reparam"]}}
          stem["rbr_reparam"]["kernel"] = stem["rbr_reparam"]["kernel"] * (1 + d)
          return run({**plain, "stage0": stem})
        stem = smallest_caught(scaled_stem, y_train)
      size = "" if not overrides else " (reduced width)"
      print(f"| {name}{size} | {kind} | {error:.1e} | {eps} | {stem} |", flush=True)


def main(argv):
  del argv
  if _SENSITIVITY.value:
    sensitivity()
    return
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
