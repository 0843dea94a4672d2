"""AutoAugment's ImageNet policy (Cubuk et al., CVPR 2019) and RandAugment (Cubuk et al., 2020) as stateless
tf.data ops on one set of image operations, AutoAugment with a strength knob.

MobileOne trains S2-S4 with AutoAugment and raises its strength during training (EfficientNetV2's progressive
learning). A magnitude bin m in 0..9 of the policy is scaled by ``strength`` and mapped linearly from the
identity (0) to the op's largest change at m = 9: shear 0.3, rotation 30 degrees, colour/contrast/sharpness
factors 1 +- 0.9, posterize down to 4 bits, solarize threshold down to 0; geometric and enhancement changes
take a random sign. AutoContrast, Equalize and Invert have no magnitude. Images are uint8 (H, W, C), C = 1 or 3.

RandAugment as RepVGGplus trains with it (DingXiaoH/RepVGG train/randaug.py, ``raug15``): per image two layers,
each one of 16 ops drawn uniformly, always applied, at a level m / 10 with m drawn uniformly from 0..M-1 (M =
15, so levels run past 1 as there): rotate +-30 L degrees, shear +-0.3 L, translate +-0.45 L of the side (fill
grey 128), enhancements (colour, contrast, brightness, sharpness) by the factor 0.1 + 1.8 L, posterize to
int(4 L) bits, solarize at 256 L, solarize-add of 110 L below 128, a cutout square of max(2, 40 L) pixels
(filled with ImageNet's mean colour), and AutoContrast, Equalize, Invert.
"""

import math

import tensorflow as tf

MAX_BIN = 9
# (op, probability, magnitude bin) pairs of the 25 sub-policies learnt on ImageNet (the paper's Table 9).
IMAGENET_POLICY = (
    (("posterize", 0.4, 8), ("rotate", 0.6, 9)), (("solarize", 0.6, 5), ("autocontrast", 0.6, 0)),
    (("equalize", 0.8, 0), ("equalize", 0.6, 0)), (("posterize", 0.6, 7), ("posterize", 0.6, 6)),
    (("equalize", 0.4, 0), ("solarize", 0.2, 4)), (("equalize", 0.4, 0), ("rotate", 0.8, 8)),
    (("solarize", 0.6, 3), ("equalize", 0.6, 0)), (("posterize", 0.8, 5), ("equalize", 1.0, 0)),
    (("rotate", 0.2, 3), ("solarize", 0.6, 8)), (("equalize", 0.6, 0), ("posterize", 0.4, 6)),
    (("rotate", 0.8, 8), ("color", 0.4, 0)), (("rotate", 0.4, 9), ("equalize", 0.6, 0)),
    (("equalize", 0.0, 0), ("equalize", 0.8, 0)), (("invert", 0.6, 0), ("equalize", 1.0, 0)),
    (("color", 0.6, 4), ("contrast", 1.0, 8)), (("rotate", 0.8, 8), ("color", 1.0, 2)),
    (("color", 0.8, 8), ("solarize", 0.8, 7)), (("sharpness", 0.4, 7), ("invert", 0.6, 0)),
    (("shear_x", 0.6, 5), ("equalize", 1.0, 0)), (("color", 0.4, 0), ("equalize", 0.6, 0)),
    (("equalize", 0.4, 0), ("solarize", 0.2, 4)), (("solarize", 0.6, 5), ("autocontrast", 0.6, 0)),
    (("invert", 0.6, 0), ("equalize", 1.0, 0)), (("color", 0.6, 4), ("contrast", 1.0, 8)),
    (("equalize", 0.8, 0), ("equalize", 0.6, 0)),
)


# --------------------------------------------------------------------------- Ops: uint8 image -> uint8 image.

def _blend(degenerate, image, factor):
  """PIL's ImageEnhance: degenerate + factor * (image - degenerate), rounded and clipped to uint8."""
  d, x = tf.cast(degenerate, tf.float32), tf.cast(image, tf.float32)
  return tf.saturate_cast(tf.round(d + factor * (x - d)), tf.uint8)


def _grayscale(image):
  """(H, W, C) -> (H, W, 1) float32 luma (ITU-R 601-2, PIL's "L"); a 1-channel image is its own luma."""
  x = tf.cast(image, tf.float32)
  if image.shape[-1] == 1:
    return x
  return tf.reduce_sum(x * tf.constant([0.299, 0.587, 0.114]), axis=-1, keepdims=True)


def color(image, factor):
  return _blend(tf.broadcast_to(tf.round(_grayscale(image)), tf.shape(image)), image, factor)


def contrast(image, factor):
  return _blend(tf.fill(tf.shape(image), tf.round(tf.reduce_mean(_grayscale(image)))), image, factor)


def sharpness(image, factor):
  """Blends with PIL's SMOOTH filter (3x3, centre weight 5, sum 13); the border pixels stay as they are."""
  x = tf.cast(image, tf.float32)[None]
  kernel = tf.constant([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
  channels = image.shape[-1]
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, channels, 1])
  smooth = tf.round(tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], "VALID"))[0]
  degenerate = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
  interior = tf.pad(tf.ones_like(smooth), [[1, 1], [1, 1], [0, 0]]) > 0
  return _blend(tf.where(interior, degenerate, x[0]), image, factor)


def posterize(image, bits):
  shift = tf.cast(8 - bits, tf.uint8)
  return tf.bitwise.left_shift(tf.bitwise.right_shift(image, shift), shift)


def solarize(image, threshold):
  return tf.where(tf.cast(image, tf.float32) < threshold, image, 255 - image)


def invert(image):
  return 255 - image


def autocontrast(image):
  """Per channel, stretches [min, max] to [0, 255]; a constant channel is left alone."""
  x = tf.cast(image, tf.float32)
  lo, hi = tf.reduce_min(x, axis=(0, 1)), tf.reduce_max(x, axis=(0, 1))
  scale = tf.where(hi > lo, 255.0 / tf.maximum(hi - lo, 1.0), 1.0)
  offset = tf.where(hi > lo, lo, 0.0)
  return tf.saturate_cast(tf.round((x - offset) * scale), tf.uint8)


def _equalize_channel(channel):
  """PIL's ImageOps.equalize on one (H, W) uint8 channel."""
  histogram = tf.math.bincount(tf.cast(channel, tf.int32), minlength=256, maxlength=256)
  last = tf.gather(histogram, tf.reduce_max(tf.where(histogram > 0)))  # the last occupied bin
  step = (tf.reduce_sum(histogram) - last) // 255
  lut = (tf.concat([[0], tf.cumsum(histogram)[:-1]], 0) + step // 2) // tf.maximum(step, 1)
  equalized = tf.gather(tf.clip_by_value(lut, 0, 255), tf.cast(channel, tf.int32))
  return tf.where(step > 0, tf.cast(equalized, tf.uint8), channel)


def equalize(image):
  return tf.stack([_equalize_channel(image[:, :, c]) for c in range(image.shape[-1])], axis=-1)


def _affine(image, transform, fill=0.0):
  """Output pixel (x, y) reads input (a0 x + a1 y + a2, b0 x + b1 y + b2), nearest; outside is ``fill``."""
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=tf.cast(image, tf.float32)[None], transforms=tf.cast(tf.concat([transform, [0.0, 0.0]], 0)[None],
                                                                  tf.float32),
      output_shape=tf.shape(image)[:2], interpolation="NEAREST", fill_mode="CONSTANT", fill_value=fill)
  return tf.cast(out[0], tf.uint8)


def rotate(image, degrees, fill=0.0):
  """Rotation about the image centre."""
  theta = degrees * math.pi / 180.0
  h, w = tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)
  cx, cy = (w - 1) / 2, (h - 1) / 2
  cos, sin = tf.cos(theta), tf.sin(theta)
  return _affine(image, tf.stack([cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy]), fill)


def shear_x(image, shear, fill=0.0):
  """Horizontal shear about the image's middle row."""
  cy = (tf.cast(tf.shape(image)[0], tf.float32) - 1) / 2
  return _affine(image, tf.stack([1.0, shear, -shear * cy, 0.0, 1.0, 0.0]), fill)


def shear_y(image, shear, fill=0.0):
  """Vertical shear about the image's middle column."""
  cx = (tf.cast(tf.shape(image)[1], tf.float32) - 1) / 2
  return _affine(image, tf.stack([1.0, 0.0, 0.0, shear, 1.0, -shear * cx]), fill)


def translate(image, dx, dy, fill=0.0):
  """Shifts the content by (-dx, -dy) pixels (output (x, y) reads input (x + dx, y + dy)), as PIL's affine."""
  return _affine(image, tf.stack([1.0, 0.0, dx, 0.0, 1.0, dy]), fill)


def brightness(image, factor):
  return _blend(tf.zeros_like(image), image, factor)


def solarize_add(image, addition, threshold=128):
  added = tf.saturate_cast(tf.cast(image, tf.int32) + tf.cast(addition, tf.int32), tf.uint8)
  return tf.where(image < threshold, added, image)


def cutout(image, size, seed):
  """A size x size square (clipped at the borders) around a uniformly drawn centre, set to ImageNet's mean
  colour (125, 122, 113; grey 122 for one channel)."""
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  centre = tf.random.stateless_uniform([2], seed, 0, tf.int32.max, tf.int32) % tf.stack([h, w])
  half = tf.cast(size, tf.int32) // 2
  rows, cols = tf.range(h)[:, None, None], tf.range(w)[None, :, None]
  inside = ((rows >= centre[0] - half) & (rows < centre[0] + half) & (cols >= centre[1] - half)
            & (cols < centre[1] + half))
  colour = tf.constant([125, 122, 113] if image.shape[-1] == 3 else [122], tf.uint8)
  return tf.where(inside, tf.broadcast_to(colour, tf.shape(image)), image)


# --------------------------------------------------------------------------- Magnitudes and the policy.

def _signed(value, sign_seed):
  return tf.where(tf.random.stateless_uniform([], sign_seed) < 0.5, -value, value)


def _op(name: str, image, level, sign_seed):
  """Applies op ``name`` at ``level`` in [0, 1] (bin / MAX_BIN times strength)."""
  if name in ("color", "contrast", "sharpness"):
    return {"color": color, "contrast": contrast, "sharpness": sharpness}[name](
        image, 1.0 + _signed(0.9 * level, sign_seed))
  if name == "rotate":
    return rotate(image, _signed(30.0 * level, sign_seed))
  if name == "shear_x":
    return shear_x(image, _signed(0.3 * level, sign_seed))
  if name == "posterize":
    return posterize(image, 8 - tf.cast(tf.round(4.0 * level), tf.int32))
  if name == "solarize":
    return solarize(image, 256.0 * (1.0 - level))
  return {"autocontrast": autocontrast, "equalize": equalize, "invert": invert}[name](image)


def autoaugment(image, seed, strength=1.0, policy=IMAGENET_POLICY):
  """One sub-policy drawn uniformly, each of its ops applied with its probability. seed: stateless (2,) int."""
  choice_seed, *op_seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 1 + 2 * len(policy[0])))
  index = tf.random.stateless_uniform([], choice_seed, 0, len(policy), tf.int32)

  def sub_policy(ops):
    def apply(image=image):
      for (name, probability, magnitude), apply_seed, sign_seed in zip(ops, op_seeds[::2], op_seeds[1::2]):
        level = tf.minimum(strength * magnitude / MAX_BIN, 1.0)
        image = tf.cond(tf.random.stateless_uniform([], apply_seed) < probability,
                        lambda name=name, image=image, level=level: _op(name, image, level, sign_seed),
                        lambda image=image: image)
      return image
    return apply

  return tf.ensure_shape(tf.switch_case(index, [sub_policy(ops) for ops in policy]), image.shape)


# --------------------------------------------------------------------------- RandAugment.

RANDAUGMENT_OPS = ("autocontrast", "equalize", "invert", "rotate", "posterize", "solarize", "solarize_add", "color",
                   "contrast", "brightness", "sharpness", "shear_x", "shear_y", "translate_x", "translate_y",
                   "cutout")
RANDAUGMENT_LEVEL_DIVISOR = 10.0  # m / 10: the official _MAX_LEVEL, not clipped.
RANDAUGMENT_FILL = 128.0  # Geometric ops fill with grey, as the official hparams.


def _randaugment_op(name: str, image, level, seed):
  """Op ``name`` of RandAugment at ``level`` (m / 10, may exceed 1); ``seed`` draws its sign or cutout centre."""
  h, w = tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)
  if name in ("color", "contrast", "brightness", "sharpness"):
    return {"color": color, "contrast": contrast, "brightness": brightness, "sharpness": sharpness}[name](
        image, 0.1 + 1.8 * level)
  if name == "rotate":
    return rotate(image, _signed(30.0 * level, seed), RANDAUGMENT_FILL)
  if name in ("shear_x", "shear_y"):
    return (shear_x if name == "shear_x" else shear_y)(image, _signed(0.3 * level, seed), RANDAUGMENT_FILL)
  if name == "translate_x":
    return translate(image, _signed(0.45 * level * w, seed), 0.0, RANDAUGMENT_FILL)
  if name == "translate_y":
    return translate(image, 0.0, _signed(0.45 * level * h, seed), RANDAUGMENT_FILL)
  if name == "posterize":
    bits = tf.cast(tf.floor(4.0 * level), tf.int32)
    return tf.cond(bits >= 8, lambda: image, lambda: posterize(image, bits))
  if name == "solarize":
    return solarize(image, tf.floor(256.0 * level))
  if name == "solarize_add":
    return solarize_add(image, tf.floor(110.0 * level))
  if name == "cutout":
    return cutout(image, tf.maximum(2.0, 40.0 * level), seed)
  return {"autocontrast": autocontrast, "equalize": equalize, "invert": invert}[name](image)


def randaugment(image, seed, magnitude: int = 15, num_layers: int = 2):
  """``num_layers`` ops drawn uniformly from RANDAUGMENT_OPS, each at m / 10 with m uniform in 0..magnitude-1.
  image: uint8 (H, W, C); seed: stateless (2,) int."""
  for layer_seed in tf.unstack(tf.random.experimental.stateless_split(seed, num_layers)):
    op_seed, magnitude_seed, arg_seed = tf.unstack(tf.random.experimental.stateless_split(layer_seed, 3))
    index = tf.random.stateless_uniform([], op_seed, 0, len(RANDAUGMENT_OPS), tf.int32)
    level = tf.cast(tf.random.stateless_uniform([], magnitude_seed, 0, magnitude, tf.int32),
                    tf.float32) / RANDAUGMENT_LEVEL_DIVISOR
    image = tf.ensure_shape(tf.switch_case(index, [
        lambda name=name, image=image: _randaugment_op(name, image, level, arg_seed) for name in RANDAUGMENT_OPS]),
        image.shape)
  return image
