"""RepVGG-B3g2 on ImageNet: the paper's Table-5 recipe, 200 epochs with stronger augmentation.

  python train.py --config=configs/b3g2.py --workdir=runs/b3g2
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model = "RepVGG-B3g2"
  config.num_epochs = 200
  config.mixup_alpha = 0.2
  return config
