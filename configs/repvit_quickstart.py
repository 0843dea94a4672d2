"""Quickstart: a small RepViT on Fashion-MNIST, offline, in minutes on 2 CPU cores.

  apt-get install -y dataset-fashion-mnist
  python train.py --config=configs/repvit_quickstart.py --workdir=runs/repvit_quickstart

RepViT-M0.9's blocks at half width (stage widths 24, 48, 96, 192) and depths (1, 1, 2, 1) instead of (2, 2, 14,
2); the data and schedule are the RepVGG quickstart's, the optimizer RepViT's (AdamW, weight decay 0.025 on
kernels only) at a learning rate for a short run.
"""

from configs import quickstart


def get_config():
  config = quickstart.get_config()
  config.model = "RepViT-M0.9"
  config.model_overrides.width_multiplier = None
  config.model_overrides.widths = (24, 48, 96, 192)
  config.model_overrides.depths = (1, 1, 2, 1)
  config.optimizer = "adamw"
  config.learning_rate = 2e-3          # per 256 images
  config.weight_decay = 0.025
  return config
