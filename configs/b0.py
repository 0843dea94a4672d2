"""RepVGG-B0 on ImageNet, the official 120-epoch recipe.

  python train.py --config=configs/b0.py --workdir=runs/b0
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model = "RepVGG-B0"
  return config
