"""RepViT-M0.9 on ImageNet: the paper's recipe as far as this loop supports it (Wang et al., CVPR 2024, Sec. 4.1;
THU-MIG/RepViT main.py defaults, trained on 8 GPUs x 256 images).

  python train.py --config=configs/repvit_m0_9.py --workdir=runs/repvit_m0_9

From the paper and main.py: AdamW, 300 epochs, global batch 2048, learning rate 1e-3 per 512 images (5e-4 per 256
here) with 5 warm-up epochs and a cosine schedule, weight decay 0.025 (none on biases and BatchNorm parameters,
as timm's optimizer: the RepViT family's decay rule), label smoothing 0.1, RandAugment
(timm's rand-m9-mstd0.5: magnitude 9 here), mixup 0.8, EMA of the weights (decay 0.99996).

Not supported here, so not reproduced: the knowledge distillation from a RegNetY-16GF teacher (hard distillation
into ``head_dist``; without a teacher both heads learn the labels), CutMix (1.0) and its switching with mixup,
random erasing (0.25), adaptive gradient clipping (AGC 0.02), repeated augmentation, bicubic resizing, and timm's
eval crop of 0.95 (the paper's own evaluation uses 0.875, as here). Paper top-1 with distillation, 300 epochs:
M0.9 78.7%, M1.0 80.0%, M1.1 80.7%, M1.5 82.3%, M2.3 83.3%.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model = "RepViT-M0.9"
  config.num_epochs = 300
  config.batch_size = 2048
  config.optimizer = "adamw"
  config.learning_rate = 5e-4          # per 256 images: 1e-3 per 512
  config.warmup_epochs = 5.0
  config.weight_decay = 0.025
  config.label_smoothing = 0.1
  config.randaugment_magnitude = 9
  config.mixup_alpha = 0.8
  config.ema_decay = 0.99996
  return config
