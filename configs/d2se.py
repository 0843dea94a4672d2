"""RepVGG-D2se on ImageNet: the paper's Table-5 recipe, 200 epochs with stronger augmentation.

  python train.py --config=configs/d2se.py --workdir=runs/d2se
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model = "RepVGG-D2se"
  config.num_epochs = 200
  config.mixup_alpha = 0.2
  return config
