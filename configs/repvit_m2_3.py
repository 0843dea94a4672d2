"""RepViT-M2.3 on ImageNet: RepViT's recipe (configs/repvit_m0_9.py documents it and what is not reproduced).

  python train.py --config=configs/repvit_m2_3.py --workdir=runs/repvit_m2_3
"""

from configs import repvit_m0_9


def get_config():
  config = repvit_m0_9.get_config()
  config.model = "RepViT-M2.3"
  return config
