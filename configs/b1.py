"""RepVGG-B1 on ImageNet, the official 120-epoch recipe.

  python train.py --config=configs/b1.py --workdir=runs/b1
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model = "RepVGG-B1"
  return config
