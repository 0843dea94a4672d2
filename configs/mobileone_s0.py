"""MobileOne-S0 on ImageNet: the paper's recipe (Vasu et al., CVPR 2023, Sec. 4.1).

  python train.py --config=configs/mobileone_s0.py --workdir=runs/mobileone_s0

From the paper: SGD with momentum 0.9, 300 epochs, batch 256, label smoothing 0.1, learning rate 0.1 with
a cosine schedule; weight decay 1e-4 cosine-annealed to 1e-5 over the run; EMA of the weights with decay
0.9995 (the averaged model is the one evaluated and re-parameterized); S0 and S1 train on RandomResizedCrop
and horizontal flips. The paper names no warm-up; the 5 epochs here are the reproduction's in open-mmlab's
mmpretrain (configs/mobileone), as is the EMA of the BatchNorm statistics. Paper top-1: S0 71.4%.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model = "MobileOne-S0"
  config.num_epochs = 300
  config.batch_size = 256
  config.learning_rate = 0.1
  config.nesterov = False            # the paper's SGD with momentum; RepVGG's official recipe uses Nesterov
  config.weight_decay = 1e-4
  config.final_weight_decay = 1e-5
  config.label_smoothing = 0.1
  config.ema_decay = 0.9995
  return config
