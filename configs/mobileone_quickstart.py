"""Quickstart: a small MobileOne-S0 on Fashion-MNIST, offline, in minutes on 2 CPU cores.

  apt-get install -y dataset-fashion-mnist
  python train.py --config=configs/mobileone_quickstart.py --workdir=runs/mobileone_quickstart

MobileOne-S0's block (k = 4 over-parameterized branches in every layer) at half width (stage widths 32, 64,
128, 512) and depths (1, 2, 4, 1) instead of (2, 8, 10, 1); the recipe is the RepVGG quickstart's.
"""

from configs import quickstart


def get_config():
  config = quickstart.get_config()
  config.model = "MobileOne-S0"
  config.model_overrides.width_multiplier = (0.5, 0.5, 0.5, 1.0)
  config.model_overrides.num_blocks = (1, 2, 4, 1)
  return config
