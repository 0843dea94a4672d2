"""RepViT against timm on well-posed float64 networks, every variant: both forms' errors, printed as a table.

  python benchmarks/repvit_table.py [--models=RepViT-M0.9,...]

The networks of tests/wellposed.py (timm's model with random BN affine maps, BN statistics calibrated on random
images, weights rounded to float32, float64 arithmetic), 64 px, batch 4, 10 classes. Columns: timm's input
dependence (the logits' spread over the batch / their largest value), and relative to that spread the error of
our training form (timm's weights loaded), of our deploy form from our ``reparam``, and of our deploy form from
timm's fused weights against timm's fused model. tests/test_repvit.py asserts the same on M0.9 and M1.5.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # pylint: disable=wrong-import-position
import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
from timm.utils.model import reparameterize_model  # pylint: disable=wrong-import-position
import repvgg_jax as rv  # pylint: disable=wrong-import-position
from repvgg_jax import repvit  # pylint: disable=wrong-import-position
from tests import wellposed  # pylint: disable=wrong-import-position
from tests.test_repvit import float64_logits, well_posed_timm  # pylint: disable=wrong-import-position

_MODELS = flags.DEFINE_list("models", list(repvit.VARIANTS), "RepViT variants.")


def main(argv):
  del argv
  print("| model | input dependence | training form vs timm | deploy form (our reparam) vs timm | "
        "deploy form (timm's fused weights) vs timm's fused |")
  print("|---|---|---|---|---|")
  for name in _MODELS.value:
    model = well_posed_timm(name)
    x = wellposed.images((4, 64, 64, 3), seed=1)
    expected = wellposed.torch_logits(model, x)
    variables = rv.load_pytorch_state_dict(model.state_dict(), name)
    with jax.enable_x64(True):
      as64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
      plain = jax.tree.map(np.asarray, rv.reparam(as64["params"], as64["batch_stats"]))
    fused = reparameterize_model(model).double()
    loaded = rv.load_pytorch_state_dict(fused.state_dict(), name)
    errors = (wellposed.spread_error(float64_logits(name, variables, x), expected),
              wellposed.spread_error(float64_logits(name, {"params": plain}, x, deploy=True), expected),
              wellposed.spread_error(float64_logits(name, loaded, x, deploy=True), wellposed.torch_logits(fused, x)))
    dependence = wellposed.spread(expected) / float(np.abs(expected).max())
    print(f"| {name} | {dependence:.2f} | " + " | ".join(f"{e:.1e}" for e in errors) + " |", flush=True)


if __name__ == "__main__":
  app.run(main)
