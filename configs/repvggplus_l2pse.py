"""RepVGGplus-L2pse on ImageNet, the official recipe (DingXiaoH/RepVGG README and main.py): 300 epochs, SGD
momentum 0.9, lr 0.1 per 256 images with cosine decay, weight decay 4e-5, label smoothing 0.1, mixup 0.2,
RandAugment at magnitude 15 (``raug15``), training at 256 px and testing at 320 px; the auxiliary heads' losses
join the main one at weight 0.1 each (train.py does so for any model that has them).

  python train.py --config=configs/repvggplus_l2pse.py --workdir=runs/repvggplus_l2pse

Left as RepVGG's: nesterov momentum, 5 warm-up epochs, random resized crops and flips, the eval crop ratio.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model = "RepVGGplus-L2pse"
  config.num_epochs = 300
  config.weight_decay = 4e-5
  config.mixup_alpha = 0.2
  config.randaugment_magnitude = 15
  config.image_size = 256
  config.eval_image_size = 320
  return config
