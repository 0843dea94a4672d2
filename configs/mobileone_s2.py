"""MobileOne-S2 on ImageNet: the paper's recipe of S0 (configs/mobileone_s0.py) plus AutoAugment and
progressive resizing, as for S3 and S4. Paper top-1: 77.4%.

  python train.py --config=configs/mobileone_s2.py --workdir=runs/mobileone_s2

The paper trains S2, S3 and S4 with AutoAugment, raising its strength and the image resolution during
training (EfficientNetV2's progressive learning). It gives no stage boundaries; these are the reproduction's
in mmpretrain: 160 px crops from epoch 0, 192 px from epoch 37, 224 px from epoch 112, at 0.3, 0.7 and 1.0
of the augmentation's magnitudes (mmpretrain scales RandAugment, its stand-in; here AutoAugment's ImageNet
policy, as in the paper: repvgg_jax/autoaugment.py). Evaluation is at 224 px throughout.
"""

from configs import mobileone_s0


def get_config():
  config = mobileone_s0.get_config()
  config.model = "MobileOne-S2"
  config.progressive_learning = ((0, 160, 0.3), (37, 192, 0.7), (112, 224, 1.0))
  return config
