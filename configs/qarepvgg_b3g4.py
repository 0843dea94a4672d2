"""QARepVGG-B3g4 on ImageNet, the official QARepVGG recipe (cxxgtxy/QARepVGG: plain weight decay 4e-5, no custom
L2, 120 epochs; otherwise RepVGG's: SGD nesterov momentum 0.9, lr 0.1 per 256 images, cosine, label smoothing 0.1).

  python train.py --config=configs/qarepvgg_b3g4.py --workdir=runs/qarepvgg_b3g4
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model = "QARepVGG-B3g4"
  config.weight_decay = 4e-5
  config.num_epochs = 120
  return config
