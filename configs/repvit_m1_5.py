"""RepViT-M1.5 on ImageNet: RepViT's recipe (configs/repvit_m0_9.py documents it and what is not reproduced).

  python train.py --config=configs/repvit_m1_5.py --workdir=runs/repvit_m1_5
"""

from configs import repvit_m0_9


def get_config():
  config = repvit_m0_9.get_config()
  config.model = "RepViT-M1.5"
  return config
