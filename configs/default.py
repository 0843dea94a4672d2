"""The official RepVGG ImageNet recipe (Ding et al., CVPR 2021, Sec. 4.1; official train.py).

  python train.py --config=configs/default.py --workdir=runs/a0
"""

import ml_collections
from ml_collections.config_dict import placeholder


def get_config():
  config = ml_collections.ConfigDict()
  # Model.
  config.model = "RepVGG-A0"                 # an official name, see repvgg_jax.list_models()
  # create_model overrides of the variant; None keeps the official value.
  config.model_overrides = ml_collections.ConfigDict({
      "num_blocks": placeholder(tuple),        # blocks in stage1..stage4
      "width_multiplier": placeholder(tuple),  # RepVGG (a, a, a, b); MobileOne one per stage
      "groups": placeholder(int),              # RepVGG: groups of layers 2, 4, ..., 26
      "use_se": placeholder(bool),             # RepVGG
      "num_conv_branches": placeholder(int),   # MobileOne: k, the conv+BN branches per layer
      "se_blocks": placeholder(tuple),         # MobileOne: SE in the last n blocks of stage1..stage4
      "use_post_se": placeholder(bool),        # RepVGGplus: SE after every block's ReLU
      "widths": placeholder(tuple),            # RepViT: channels of stage1..stage4
      "depths": placeholder(tuple),            # RepViT: blocks in stage1..stage4
      "bn_momentum": placeholder(float),       # every BatchNorm (Flax terms: 0.9 = PyTorch's 0.1)
      "bn_epsilon": placeholder(float),        # every BatchNorm; reparam folds with the same one
  })
  # Initial weights (fine-tuning); a run resuming from its own checkpoint ignores them.
  config.init_from = ""                      # "" = random; a .pth / .safetensors file (official, timm or apple
                                             # naming, training form), an orbax tree (convert --out's train/) or
                                             # a finished run's workdir (its evaluated weights: the EMA if kept)
  config.init_exclude = ()                   # regular expressions over parameter paths re-initialized instead
                                             # (the classifier is, by itself, when the class counts differ)
  config.freeze = ()                         # regular expressions over parameter paths that get no update (and
                                             # frozen BNs keep their statistics); linear probe: ("^(?!linear/)",)
  config.half_precision = False              # bf16 compute; params and BN statistics stay float32
  # Data.
  config.dataset = "imagenet2012"            # a TFDS name, "fashion_mnist" (local IDX files) or "folder"
                                             # (data_dir/<split>/<class>/<image>, JPEG or PNG)
  config.data_dir = ""                       # TFDS data_dir / IDX folder; "" = the library default
  config.train_split = "train"
  config.eval_split = "validation"
  config.image_size = 224                    # RandomResizedCrop output and eval crop size
  config.eval_image_size = 0                 # > 0: eval crop size instead of image_size (e.g. train 256, test 320)
  config.autoaugment_strength = 0.0          # > 0: AutoAugment's ImageNet policy, magnitudes scaled by this
  config.randaugment_magnitude = 0           # > 0: RandAugment, two ops per image at levels m / 10, m < this
  config.progressive_learning = ()           # ((0, size, strength), (epoch, size, strength), ...): training
                                             # crop size and AutoAugment strength from each epoch on; () = the two above
  config.crop_area_min = 0.08                # RandomResizedCrop area range (min, 1)
  config.eval_crop_ratio = 0.875             # eval: resize, then centre crop of 224 / 256 of the short side
  config.random_flip = True                  # horizontal flip in training
  config.shuffle_buffer = 16 * 1024          # tf.data shuffle buffer, in examples
  config.cache = False                       # cache the decoded training split in memory
  config.input_threads = 0                   # decoding threads; 0 = the host's rule (all usable cores beside an
                                             # accelerator, half of them where JAX runs on the CPU); > 0 caps it
  # Optimisation.
  config.batch_size = 256                    # global batch, over all devices and hosts
  config.num_epochs = 120                    # 120 for A0-A2, B0, B1; 200 for the Table-5 models
  config.num_train_steps = -1                # > 0 overrides num_epochs
  config.optimizer = "sgd"                   # "sgd" (with momentum, the official recipe) or "adamw"
  config.momentum = 0.9                      # sgd only
  config.nesterov = True                     # sgd only
  config.learning_rate = 0.1                 # per 256 images; scaled by batch_size / 256
  config.warmup_epochs = 5.0                 # linear warm-up, then cosine decay to 0
  config.weight_decay = 1e-4                 # not on biases nor on the 3x3/1x1 branches' BN scales
  config.final_weight_decay = -1.0           # >= 0: weight decay cosine-annealed to this (MobileOne); < 0: constant
  config.label_smoothing = 0.1
  config.mixup_alpha = 0.0                   # > 0 enables mixup (the 200-epoch recipe uses 0.2)
  config.ema_decay = 0.0                     # > 0: evaluate and deploy a moving average of the weights (MobileOne)
  # Bookkeeping.
  config.seed = 0
  config.log_every_steps = 100
  config.eval_every_steps = -1               # -1 = once per epoch
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 2                # newest checkpoints kept, plus the best by eval accuracy
  config.export_onnx = True                  # also write <workdir>/deploy.onnx (needs the onnx extra)
  config.steps_per_eval = -1                 # -1 = the whole eval split
  # Multi-host (jax.distributed.initialize); empty = single process or auto-detected cluster.
  config.coordinator_address = ""
  config.num_processes = 1
  config.process_id = 0
  return config
