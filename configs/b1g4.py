"""RepVGG-B1g4 on ImageNet, the official 120-epoch recipe.

  python train.py --config=configs/b1g4.py --workdir=runs/b1g4
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model = "RepVGG-B1g4"
  return config
