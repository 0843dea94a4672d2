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
    # RandAugment's extra ops, with its grey fill:
    ("translate (5, -3)", lambda x: aa.translate(x, 5.0, -3.0, 128.0),
     lambda p: p.transform(p.size, Image.AFFINE, (1, 0, 5, 0, 1, -3), Image.NEAREST, fillcolor=(128, 128, 128)), 0),
    ("solarize_add 60", lambda x: aa.solarize_add(x, 60),
     lambda p: p.point([min(255, i + 60) if i < 128 else i for i in range(256)] * 3), 0),
])
def test_ops_are_pils(image, name, ours, reference, tolerance):
  assert _max_diff(ours(tf.constant(image)), reference(Image.fromarray(image))) <= tolerance, name


@pytest.mark.parametrize("ours, enhancer", [(aa.color, ImageEnhance.Color), (aa.contrast, ImageEnhance.Contrast),
                                            (aa.sharpness, ImageEnhance.Sharpness),
                                            (aa.brightness, ImageEnhance.Brightness)])
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


def test_shear_y_moves_columns_by_the_shear_times_their_distance_from_the_middle_and_fills_grey():
  pixels = np.zeros((16, 9, 1), np.uint8)
  pixels[7, :] = 255  # A horizontal line.
  sheared = aa.shear_y(tf.constant(pixels), 0.25, 128.0).numpy()[..., 0]
  for col in (0, 4, 8):
    assert np.flatnonzero(sheared[:, col] == 255).tolist() == [7 - round(0.25 * (col - 4))]
  assert (sheared == 128).any()  # Rows pulled in from outside the image.


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


def test_randaugment_draws_two_of_its_sixteen_ops_per_image_from_the_seed(image):
  """Every op and shape is kept; the result is a function of the seed; levels run to (M - 1) / 10."""
  for pixels in (image, image[..., :1]):
    for name in aa.RANDAUGMENT_OPS:
      for level in (0.0, 1.4):
        out = aa._randaugment_op(name, tf.constant(pixels), tf.constant(level), tf.constant([1, 2], tf.int64))
        assert out.shape == pixels.shape and out.dtype == tf.uint8, name
  seeds = [tf.constant([0, s], tf.int64) for s in range(24)]
  first = [aa.randaugment(tf.constant(image), s).numpy() for s in seeds]
  assert all((a == aa.randaugment(tf.constant(image), s).numpy()).all() for a, s in zip(first, seeds))
  assert len({a.tobytes() for a in first}) > 16
  assert all((aa.randaugment(tf.constant(image), s, magnitude=1, num_layers=0).numpy() == image).all()
             for s in seeds[:2])


def test_cutout_paints_a_clipped_square_of_the_mean_colour():
  out = aa.cutout(tf.fill((12, 12, 3), tf.constant(7, tf.uint8)), 4.0, tf.constant([5, 6], tf.int64)).numpy()
  painted = np.argwhere((out == [125, 122, 113]).all(-1))
  rows, cols = sorted(set(painted[:, 0])), sorted(set(painted[:, 1]))
  assert len(painted) == len(rows) * len(cols) and len(rows) <= 4 and len(cols) <= 4  # One axis-aligned square.
  assert ((out == 7).all(-1).sum() + len(painted)) == 144
