"""Spec of AutoAugment: each op is PIL's (the reference implementation of the policy's ops), the policy is
seeded and stateless, and its strength scales the magnitudes from the identity up."""

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from repvgg_jax import autoaugment as aa


@pytest.fixture(scope="module")
def image():
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
  pixels[..., 2] = pixels[..., 2] // 3 + 40  # One channel with a narrow range, for autocontrast/equalize.
  return pixels


def _max_diff(ours, pil_image) -> int:
  return int(np.abs(np.asarray(ours).astype(int) - np.asarray(pil_image).astype(int)).max())


@pytest.mark.parametrize("name, ours, reference, tolerance", [
    ("equalize", aa.equalize, ImageOps.equalize, 0),
    ("autocontrast", aa.autocontrast, ImageOps.autocontrast, 1),  # PIL rounds its lookup table in integers.
    ("invert", aa.invert, ImageOps.invert, 0),
    ("posterize 5 bits", lambda x: aa.posterize(x, 5), lambda p: ImageOps.posterize(p, 5), 0),
    ("solarize at 100", lambda x: aa.solarize(x, 100.0), lambda p: ImageOps.solarize(p, 100), 0),
    ("rotate 20 degrees", lambda x: aa.rotate(x, 20.0), lambda p: p.rotate(20, resample=Image.NEAREST), 0),
    ("rotate -13 degrees", lambda x: aa.rotate(x, -13.0), lambda p: p.rotate(-13, resample=Image.NEAREST), 0),
])
def test_ops_are_pils(image, name, ours, reference, tolerance):
  assert _max_diff(ours(tf.constant(image)), reference(Image.fromarray(image))) <= tolerance, name


@pytest.mark.parametrize("ours, enhancer", [(aa.color, ImageEnhance.Color), (aa.contrast, ImageEnhance.Contrast),
                                            (aa.sharpness, ImageEnhance.Sharpness)])
@pytest.mark.parametrize("factor", [0.3, 1.7])
def test_enhancements_are_pils_up_to_its_fixed_point_grayscale(image, ours, enhancer, factor):
  ours_image = ours(tf.constant(image), factor)
  assert _max_diff(ours_image, enhancer(Image.fromarray(image)).enhance(factor)) <= 2
  assert _max_diff(ours_image, image) > 10  # The op did something.


def test_shear_moves_rows_by_the_shear_times_their_distance_from_the_middle():
  pixels = np.zeros((9, 16, 1), np.uint8)
  pixels[:, 7] = 255  # A vertical line.
  sheared = aa.shear_x(tf.constant(pixels), 0.25).numpy()[..., 0]
  for row in (0, 4, 8):
    assert np.flatnonzero(sheared[row]).tolist() == [7 - round(0.25 * (row - 4))]


def test_every_op_keeps_shape_and_dtype_of_grayscale_and_rgb(image):
  for pixels in (image, image[..., :1]):
    for name in ("color", "contrast", "sharpness", "rotate", "shear_x", "posterize", "solarize", "autocontrast",
                 "equalize", "invert"):
      out = aa._op(name, tf.constant(pixels), tf.constant(0.5), tf.constant([1, 2], tf.int64))
      assert out.shape == pixels.shape and out.dtype == tf.uint8, name


def test_the_policy_is_a_function_of_the_seed(image):
  seeds = [tf.constant([0, s], tf.int64) for s in range(16)]
  first = [aa.autoaugment(tf.constant(image), s).numpy() for s in seeds]
  again = [aa.autoaugment(tf.constant(image), s).numpy() for s in seeds]
  assert all((a == b).all() for a, b in zip(first, again))
  assert len({a.tobytes() for a in first}) > 8  # Sub-policies and their coin flips vary with the seed.


def test_strength_scales_magnitudes_from_the_identity(image):
  policy = ((("rotate", 1.0, 9), ("solarize", 1.0, 9)), (("color", 1.0, 9), ("posterize", 1.0, 9)))
  seed = tf.constant([3, 4], tf.int64)
  weak = [aa.autoaugment(tf.constant(image), tf.constant([0, s], tf.int64), 0.0, policy).numpy() for s in range(4)]
  assert all((w == image).all() for w in weak)
  full = aa.autoaugment(tf.constant(image), seed, 1.0, policy).numpy()
  half = aa.autoaugment(tf.constant(image), seed, 0.5, policy).numpy()
  assert np.abs(full.astype(int) - image).mean() > np.abs(half.astype(int) - image).mean() > 0
