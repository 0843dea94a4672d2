"""RepVGG-A1 on ImageNet, the official 120-epoch recipe.

  python train.py --config=configs/a1.py --workdir=runs/a1
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model = "RepVGG-A1"
  return config
