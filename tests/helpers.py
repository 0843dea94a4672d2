"""Random weights and random BatchNorm statistics for equivalence tests.

Init values (scale 1, bias 0, mean 0, var 1) would make every BatchNorm an identity and hide fusion bugs,
so every leaf is drawn afresh, with numpy, from the shapes of the model's variables.
"""

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np


# BN scales that keep deep random MobileOnes O(1) (with [0.5, 1], timm's own float32 S4 is 2.3e-3 from float64).
MOBILEONE_SCALES = (0.2, 0.5)


def random_like(shapes, seed: int = 0, dtype=np.float32, scale_range=(0.4, 1.2)):
  """A tree of random arrays shaped like ``shapes`` (a tree of arrays or ShapeDtypeStructs).

  Kernels ~ N(0, 1/fan_in); BN scale ~ U(scale_range); bias, mean ~ 0.1 N(0, 1); var ~ U(0.5, 2); QARepVGG's
  identity gains stay 1.
  """
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    shape = leaf.shape
    if name == "kernel":
      x = rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))
    elif name == "scale":
      x = rng.uniform(*scale_range, size=shape)
    elif name == "var":
      x = rng.uniform(0.5, 2.0, size=shape)
    elif name in ("bias", "mean"):
      x = 0.1 * rng.normal(size=shape)
    elif name == "rbr_identity":  # QARepVGG's identity gain: a constant, not a statistic.
      x = np.ones(shape)
    else:
      raise ValueError(f"unexpected leaf {path}")
    return jnp.asarray(x.astype(dtype))

  return jax.tree_util.tree_map_with_path(draw, shapes)


def random_variables(model, input_shape, seed: int = 0, dtype=np.float32, scale_range=(0.4, 1.2)):
  """Random variables of ``model`` for inputs of ``input_shape``, without running its initializers."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(input_shape, dtype), train=False))
  return random_like(shapes, seed, dtype, scale_range)


# One variant of each family, at a size where its fold holds every block kind it has (MobileOne-S4: SE;
# RepVGGplus: its post SE and aux heads; RepViT: the BN + Linear head, the fold that multiplies matrices).
FAMILY_TREES = [("RepVGG-B1g2", dict(width_multiplier=(0.25, 0.25, 0.25, 0.5))),
                ("QARepVGG-A0", dict(width_multiplier=(0.25, 0.25, 0.25, 0.5))),
                ("MobileOne-S4", dict(width_multiplier=(0.5,) * 4, num_blocks=(1, 1, 1, 1))),
                ("RepVGGplus-L2pse", dict(width_multiplier=(0.25, 0.25, 0.25, 0.5), num_blocks=(1, 1, 2, 1))),
                ("RepViT-M0.9", dict(depths=(1, 1, 1, 1)))]
FLOAT32_FOLD = 1e-6  # Of a fused leaf's largest entry: float32 rounding; a bfloat16 or TF32 product is ~1e-3.


def float64_fold(variables) -> dict:
  """``reparam`` of ``variables`` computed in float64, as numpy: the exact fold a float32 one is compared with."""
  import repvgg_jax as rv  # pylint: disable=g-import-not-at-top
  with jax.enable_x64(True):
    as64 = jax.tree.map(lambda leaf: jnp.asarray(leaf, jnp.float64), variables)
    return jax.tree.map(np.asarray, rv.reparam(as64["params"], as64["batch_stats"]))


def stablehlo_op_counts(text: str, ops=("convolution", "dot_general", "reduce")) -> collections.Counter:
  """How often each of ``ops`` occurs in a lowered module's StableHLO text."""
  return collections.Counter(re.findall(rf"stablehlo\.({'|'.join(ops)})\b", text))


def leaf_errors(tree, exact) -> dict[str, float]:
  """Per leaf path of ``tree``, max |leaf - exact| / max |exact| (``exact``: the same tree, e.g. in float64)."""
  flat_exact = dict(jax.tree_util.tree_flatten_with_path(exact)[0])
  return {jax.tree_util.keystr(path): float(np.abs(np.asarray(leaf, np.float64) - np.asarray(flat_exact[path])).max()
                                            / max(float(np.abs(np.asarray(flat_exact[path])).max()), 1e-30))
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def numpy_conv(x, kernel, stride: int = 1, padding: int = 0, groups: int = 1):
  """Reference grouped 2-D convolution in numpy: x (N, H, W, Cin), kernel (kh, kw, Cin/groups, Cout), NHWC out."""
  x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
  kh, kw, cin_g, cout = kernel.shape
  cout_g = cout // groups
  xp = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  ho = (xp.shape[1] - kh) // stride + 1
  wo = (xp.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], ho, wo, cout))
  for i in range(kh):
    for j in range(kw):
      patch = xp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride, :]
      for g in range(groups):
        out[..., g * cout_g:(g + 1) * cout_g] += patch[..., g * cin_g:(g + 1) * cin_g] @ kernel[i, j, :, g * cout_g:(g + 1) * cout_g]
  return out


def numpy_bn(y, bn_params, bn_stats, eps):
  """Eval-mode BatchNorm in float64 numpy."""
  p = {k: np.asarray(v, np.float64) for k, v in bn_params.items()}
  s = {k: np.asarray(v, np.float64) for k, v in bn_stats.items()}
  return (y - s["mean"]) / np.sqrt(s["var"] + eps) * p["scale"] + p["bias"]


def numpy_block(x, params, stats, stride, groups, eps, use_se=False):
  """The training-time RepVGG block in eval mode, each branch computed on its own, in float64 numpy."""
  dense, one = params["rbr_dense"], params["rbr_1x1"]
  y = numpy_bn(numpy_conv(x, dense["conv"]["kernel"], stride, 1, groups), dense["bn"], stats["rbr_dense"]["bn"], eps)
  y += numpy_bn(numpy_conv(x, one["conv"]["kernel"], stride, 0, groups), one["bn"], stats["rbr_1x1"]["bn"], eps)
  if "rbr_identity" in params:
    y += numpy_bn(np.asarray(x, np.float64), params["rbr_identity"], stats["rbr_identity"], eps)
  if use_se:
    se = {k: {n: np.asarray(a, np.float64) for n, a in v.items()} for k, v in params["se"].items()}
    s = np.maximum(y.mean(axis=(1, 2)) @ se["down"]["kernel"] + se["down"]["bias"], 0)
    y = y / (1 + np.exp(-(s @ se["up"]["kernel"] + se["up"]["bias"])))[:, None, None, :]
  return np.maximum(y, 0)


def write_idx(path: str, array: np.ndarray) -> None:
  """Writes a uint8 array as a gzipped IDX file, the format of (Fashion-)MNIST."""
  import gzip  # pylint: disable=g-import-not-at-top

  header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + np.ascontiguousarray(array, np.uint8).tobytes())


def write_fake_fashion_mnist(directory, num_train: int = 256, num_test: int = 72, seed: int = 0) -> str:
  """Small Fashion-MNIST-shaped IDX files whose class is visible (a bright row at 2 * label), in ``directory``."""
  rng = np.random.default_rng(seed)
  for prefix, n in (("train", num_train), ("t10k", num_test)):
    labels = rng.integers(0, 10, size=n).astype(np.uint8)
    images = rng.integers(0, 60, size=(n, 28, 28)).astype(np.uint8)
    images[np.arange(n), 2 * labels + 4, :] = 255
    write_idx(f"{directory}/{prefix}-images-idx3-ubyte.gz", images)
    write_idx(f"{directory}/{prefix}-labels-idx1-ubyte.gz", labels)
  return str(directory)


def randomize_torch_batchnorms(model, seed: int, scale_range=(0.4, 1.2)):
  """Gives every BatchNorm2d of a PyTorch model random affine parameters (scales in ``scale_range``) and
  running statistics, so that no BN is the identity; returns the model in eval mode."""
  import torch  # pylint: disable=g-import-not-at-top

  gen = torch.Generator().manual_seed(seed)
  low, high = scale_range
  for module in model.modules():
    if isinstance(module, torch.nn.BatchNorm2d):
      n = module.num_features
      module.weight.data = torch.rand(n, generator=gen) * (high - low) + low
      module.bias.data = torch.randn(n, generator=gen) * 0.1
      module.running_mean.data = torch.randn(n, generator=gen) * 0.1
      module.running_var.data = torch.rand(n, generator=gen) * 1.5 + 0.5
  return model.eval()


def write_image_folder(root, layout, size=(40, 30)):
  """layout: {split: {class: [mode, ...]}}, one image per mode ("L" grey JPEG, "RGB" JPEG, "RGBA" PNG, "P" PNG),
  each of another size, so that crops and resizing are exercised."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for split, classes in layout.items():
    for name, modes in classes.items():
      folder = root / split / name
      folder.mkdir(parents=True, exist_ok=True)
      for i, mode in enumerate(modes):
        w, h = size[0] + 7 * i, size[1] + 3 * i
        image = Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).convert(mode)
        image.save(folder / f"{i}.{'png' if mode in ('RGBA', 'P') else 'jpg'}")
  return str(root)
