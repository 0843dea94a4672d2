"""RepVGG-A0 on ImageNet, the official 120-epoch recipe.

  python train.py --config=configs/a0.py --workdir=runs/a0
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model = "RepVGG-A0"
  return config
