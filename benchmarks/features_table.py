"""``features_only=True`` against timm's ``features_only=True`` with the same weights, per stage, as a table.

  python benchmarks/features_table.py [--models=repvgg_a0:RepVGG-A0,...] [--size=64]

The full-size models of tests/wellposed.py (random weights and BN affine maps, BN statistics calibrated on
random images, float64, loaded into timm and into ours), 4 random images. Per stage output: the reference's
input dependence (spread over the batch / largest value) and our training form's and deploy form's error
relative to the spread; tests/test_features.py asserts the same for A0.
"""

import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # pylint: disable=wrong-import-position
import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import repvgg_jax as rv  # pylint: disable=wrong-import-position
from tests import wellposed  # pylint: disable=wrong-import-position

_MODELS = flags.DEFINE_list("models", ["repvgg_a0:RepVGG-A0", "repvgg_b1g4:RepVGG-B1g4", "mobileone_s0:MobileOne-S0"],
                            "timm_name:our_name pairs.")
_SIZE = flags.DEFINE_integer("size", 64, "Image size.")


def main(argv):
  del argv
  import timm  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  size = _SIZE.value
  print("| model | stage | stride | channels | input dependence | train form vs timm | deploy form vs timm |")
  print("|---|---|---|---|---|---|---|")
  for pair in _MODELS.value:
    timm_name, name = pair.split(":")
    full = wellposed.well_posed_torch(timm.create_model(timm_name, num_classes=10), (3, size, size))
    weights = full.state_dict()
    backbone = timm.create_model(timm_name, features_only=True).double().eval()
    backbone.load_state_dict({k: weights[re.sub(r"^stages_(\d+)", r"stages.\1", k)] for k in backbone.state_dict()})
    x = wellposed.images((4, size, size, 3), 3)
    with torch.no_grad():
      expected = [m.numpy().transpose(0, 2, 3, 1) for m in backbone(torch.from_numpy(x.transpose(0, 3, 1, 2)))]
    variables = rv.load_pytorch_state_dict(weights, name)
    train = wellposed.float64_apply(name, 10, features_only=True)(variables, x)
    with jax.enable_x64(True):
      plain = rv.reparam(*(jax.tree.map(lambda a: np.asarray(a, np.float64), variables[k])
                           for k in ("params", "batch_stats")))
    deploy = wellposed.float64_apply(name, 10, deploy=True, features_only=True)({"params": plain}, x)
    info = rv.create_model(name, features_only=True).feature_info()
    for i, (ref, t, d) in enumerate(zip(expected, train, deploy, strict=True)):
      dependence = wellposed.spread(ref) / float(np.abs(ref).max())
      print(f"| {name} | {i} | {info[i]['reduction']} | {info[i]['num_chs']} | {dependence:.2f} | "
            f"{wellposed.spread_error(t, ref):.1e} | {wellposed.spread_error(d, ref):.1e} |", flush=True)


if __name__ == "__main__":
  app.run(main)
