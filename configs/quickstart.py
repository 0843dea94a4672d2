"""Quickstart: a quarter-width RepVGG-A0 on Fashion-MNIST, offline, in minutes on 2 CPU cores.

  apt-get install -y dataset-fashion-mnist
  python train.py --config=configs/quickstart.py --workdir=runs/quickstart

The network is RepVGG-A0's depths (2, 4, 14, 1) at a = 0.25, b = 0.5 (stage widths 16, 32, 64, 256) instead
of a = 0.75, b = 2.5: full A0 trains at ~580 images/s at 28 px on 2 cores, this one ~4x faster. The data
is the Debian package's IDX files, read through the same tf.data path as ImageNet.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model = "RepVGG-A0"
  config.model_overrides.width_multiplier = (0.25, 0.25, 0.25, 0.5)
  config.dataset = "fashion_mnist"
  config.train_split = "train"
  config.eval_split = "test"
  config.image_size = 28
  config.crop_area_min = 1.0          # no crops: five epochs of 28 px images gain more from seeing it whole
  config.eval_crop_ratio = 1.0        # evaluate on the whole image
  config.shuffle_buffer = 60000
  config.cache = True
  config.batch_size = 128
  config.num_epochs = 6
  config.warmup_epochs = 0.5
  config.learning_rate = 0.2          # per 256 images
  config.label_smoothing = 0.1
  config.log_every_steps = 100
  config.checkpoint_every_steps = 500
  return config
