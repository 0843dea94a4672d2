"""MobileOne-S1 on ImageNet: the paper's recipe, as for S0 (configs/mobileone_s0.py). Paper top-1: 75.9%.

  python train.py --config=configs/mobileone_s1.py --workdir=runs/mobileone_s1
"""

from configs import mobileone_s0


def get_config():
  config = mobileone_s0.get_config()
  config.model = "MobileOne-S1"
  return config
