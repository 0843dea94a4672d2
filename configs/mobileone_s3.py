"""MobileOne-S3 on ImageNet: the paper's recipe, as for S2 (configs/mobileone_s2.py: AutoAugment and
progressive resizing). Paper top-1: 78.1%.

  python train.py --config=configs/mobileone_s3.py --workdir=runs/mobileone_s3
"""

from configs import mobileone_s2


def get_config():
  config = mobileone_s2.get_config()
  config.model = "MobileOne-S3"
  return config
