"""RepVGG-A2 on ImageNet, the official 120-epoch recipe.

  python train.py --config=configs/a2.py --workdir=runs/a2
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model = "RepVGG-A2"
  return config
