"""MobileOne-S4 on ImageNet: the paper's recipe, as for S2 (configs/mobileone_s2.py: AutoAugment and
progressive resizing). Paper top-1: 79.4%.

  python train.py --config=configs/mobileone_s4.py --workdir=runs/mobileone_s4
"""

from configs import mobileone_s2


def get_config():
  config = mobileone_s2.get_config()
  config.model = "MobileOne-S4"
  return config
