"""Well-posed test networks: network-level equivalence checks that a broken model fails.

Random BatchNorm statistics make a deep random network compute a near-constant function (its logits move
with the image by 1e-8..1e-4 of their size for MobileOne and D2se), and a comparison of two near-constant
functions passes whatever the first layers do. So a test network here gets

  * random weights and a random BN affine map (scales in ``BN_SCALES``), and, as running statistics, what
    each BatchNorm really sees: the mean and (biased) variance of its input over one train-mode pass on a
    batch of random images (``calibrate``; ``calibrate_torch`` for a PyTorch model);
  * float64 arithmetic (``jax.enable_x64`` and ``dtype=jnp.float64``), because such networks amplify
    rounding: 48-block D2se with BN scales near 1 turns float64 rounding into 1e-4 of its logits' spread;
  * errors measured against the reference logits' spread over the batch, max |y - ref| / max |ref -
    mean_batch(ref)|, not against the largest logit, which a constant offset inflates; and a check that the
    reference depends on the input at all (``MIN_INPUT_DEPENDENCE``).

``assert_equal_functions`` does the comparison; ``assert_caught`` shows that a mutated model (``mutations``:
zeroed stem kernel, kh and kw swapped; a wrong BN epsilon) fails the same bound.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from tests.helpers import random_like

# Measured on full-size D2se, 32 px (float64 train vs deploy, relative to the spread): scales U(0.5, 1.5)
# 8.5e-5, U(0.2, 0.5) 9e-8; A0, B1g4, MobileOne S0/S4 are far below either. Input dependence stays 0.2-0.75.
BN_SCALES = (0.2, 0.5)
CALIBRATION_BATCH = 8
# A channel that the calibration batch leaves (nearly) dead would get var ~ 0, and its BN would multiply what
# other images put there by up to 1/sqrt(eps) = 316: deep nets then blow up (reduced D2se: logits ~1e6).
MIN_VARIANCE = 1e-2
# The reference logits' spread over the batch must be at least this fraction of their size.
MIN_INPUT_DEPENDENCE = 0.05
# Float64 train vs deploy (or vs timm in float64): measured <= 1e-7 of the spread on every variant
# (benchmarks/equivalence_table.py), while the mutations move the logits by > 1e-3 of it.
FLOAT64_BOUND = 1e-6
WRONG_EPSILON = 2e-5  # Twice the models' 1e-5: the smallest mismatch a user is likely to make.


def reduced_width(name: str) -> dict:
  """Overrides that keep a variant's layout at a fraction of its width: RepVGG's and QARepVGG's depths and
  groups; MobileOne's branches and SE with one block pair per stage (its training form is slow on XLA:CPU)."""
  if name.startswith("MobileOne"):
    return dict(width_multiplier=(0.5,) * 4, num_blocks=(1, 1, 1, 1))
  return dict(width_multiplier=(0.25, 0.25, 0.25, 0.5))


def images(shape, seed: int) -> np.ndarray:
  """Standard-normal float64 NHWC images."""
  return np.random.default_rng(seed).normal(size=shape)


def calibrate(model, variables: Mapping, calibration_images) -> dict:
  """``variables`` with ``batch_stats`` replaced by the statistics each BatchNorm sees on the images: one
  train-mode pass of ``model`` with BN momentum 0, so running statistics = this batch's statistics."""
  _, updates = jax.jit(lambda v, x: model.clone(bn_momentum=0.0).apply(v, x, train=True, mutable=["batch_stats"]))(
      variables, calibration_images)
  stats = jax.tree_util.tree_map_with_path(
      lambda path, a: jnp.maximum(a, MIN_VARIANCE) if path[-1].key == "var" else a, updates["batch_stats"])
  return {"params": variables["params"], "batch_stats": stats}


def well_posed_variables(model, image_shape, seed: int = 0, dtype=np.float64) -> dict:
  """Random weights and BN affine maps for ``model`` (a training form), BN statistics calibrated on
  ``CALIBRATION_BATCH`` random images of ``image_shape`` (H, W, C). Call under ``jax.enable_x64`` for float64."""
  shape = (CALIBRATION_BATCH,) + tuple(image_shape)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape, dtype), train=False))
  variables = random_like(shapes, seed, dtype, scale_range=BN_SCALES)
  return calibrate(model, variables, jnp.asarray(images(shape, seed + 1000), dtype))


def calibrate_torch(model, calibration_images):
  """A PyTorch model's BatchNorms get the statistics of their inputs on the images (NCHW): reset, cumulative
  average over one train-mode pass. Returns the model in eval mode."""
  import torch  # pylint: disable=g-import-not-at-top
  norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]  # pylint: disable=protected-access
  for m in norms:
    m.reset_running_stats()
    m.momentum = None
  model.train()
  with torch.no_grad():
    model(calibration_images)
  return model.eval()


def spread(reference) -> float:
  """max |ref - mean over the batch of ref|: how much the logits move with the image."""
  reference = np.asarray(reference, np.float64)
  return float(np.abs(reference - reference.mean(axis=0)).max())


def spread_error(y, reference) -> float:
  """max |y - ref| relative to the reference's spread over the batch."""
  return float(np.abs(np.asarray(y, np.float64) - np.asarray(reference, np.float64)).max()) / spread(reference)


def assert_equal_functions(y, reference, bound: float = FLOAT64_BOUND) -> float:
  """Asserts that ``reference`` depends on the input and that ``y`` is within ``bound`` of its spread;
  returns the error."""
  size = float(np.abs(np.asarray(reference)).max())
  assert spread(reference) >= MIN_INPUT_DEPENDENCE * size, (
      f"ill-posed test: the reference's spread over the batch is {spread(reference) / size:.1e} of its size")
  error = spread_error(y, reference)
  assert error < bound, f"max |y - ref| = {error:.2e} of the reference's spread (bound {bound:.0e})"
  return error


def assert_caught(y_mutated, reference, bound: float = FLOAT64_BOUND) -> float:
  """The comparison fails on a mutated model: its error exceeds ``bound``. Returns the error."""
  error = spread_error(y_mutated, reference)
  assert error > bound, f"a mutated model passed: {error:.2e} of the spread (bound {bound:.0e})"
  return error


def mutations(tree: Mapping) -> dict[str, dict]:
  """Broken copies of a params tree: "zeroed stem kernel" (every kernel under ``stage0``) and "kh and kw
  swapped" (in every 4-D kernel)."""
  def zero_stem(path, leaf):
    keys = [getattr(k, "key", None) for k in path]
    return jnp.zeros_like(leaf) if keys[0] == "stage0" and keys[-1] == "kernel" else leaf

  def swap(path, leaf):
    return jnp.swapaxes(leaf, 0, 1) if path[-1].key == "kernel" and leaf.ndim == 4 else leaf

  return {"zeroed stem kernel": jax.tree_util.tree_map_with_path(zero_stem, tree),
          "kh and kw swapped": jax.tree_util.tree_map_with_path(swap, tree)}


def train_vs_deploy(name: str, image_size: int = 32, batch: int = 4, seed: int = 0, **overrides):
  """Variant ``name``'s two forms on a well-posed float64 network: (reference = training form in eval mode,
  deploy form of ``reparam``'s params, {mutation: deploy form of the mutated params}), logits as numpy."""
  import repvgg_jax as rv  # pylint: disable=g-import-not-at-top
  with jax.enable_x64(True):
    model = rv.create_model(name, num_classes=10, dtype=jnp.float64, **overrides)
    deploy = jax.jit(rv.create_model(name, num_classes=10, dtype=jnp.float64, deploy=True, **overrides).apply)
    variables = well_posed_variables(model, (image_size, image_size, 3), seed)
    x = jnp.asarray(images((batch, image_size, image_size, 3), seed + 1))
    reference = jax.jit(model.apply)(variables, x)
    plain = rv.reparam(variables["params"], variables["batch_stats"])
    mutated = {what: deploy({"params": p}, x) for what, p in mutations(plain).items()}
    mutated["wrong BN epsilon"] = deploy({"params": rv.reparam(variables["params"], variables["batch_stats"],
                                                               eps=WRONG_EPSILON)}, x)
    got = deploy({"params": plain}, x)
  return np.asarray(reference), np.asarray(got), {k: np.asarray(v) for k, v in mutated.items()}


def well_posed_torch(model, image_shape, seed: int = 0):
  """A PyTorch model made a well-posed float64 test network: random BN affine maps (scales in BN_SCALES), BN
  statistics calibrated on random images of ``image_shape`` (C, H, W); every value then rounded to float32,
  so that the float32 weights this package loads are exactly the ones the float64 reference computes with.
  Returns the model in eval mode."""
  import torch  # pylint: disable=g-import-not-at-top
  from tests.helpers import randomize_torch_batchnorms  # pylint: disable=g-import-not-at-top
  model = randomize_torch_batchnorms(model, seed, scale_range=BN_SCALES).double()
  calibrate_torch(model, torch.from_numpy(images((CALIBRATION_BATCH,) + tuple(image_shape), seed + 1000)))
  return model.float().double().eval()


def torch_logits(model, x_nhwc) -> np.ndarray:
  """A float64 PyTorch model's logits on NHWC numpy images."""
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    return model(torch.from_numpy(np.ascontiguousarray(np.asarray(x_nhwc, np.float64).transpose(0, 3, 1, 2)))).numpy()


def float64_apply(model_name: str, num_classes: int, deploy: bool = False, **overrides):
  """A jitted float64 ``(variables, images) -> logits`` (or feature maps, with ``features_only=True`` among the
  overrides) of a variant, variables and images cast to float64."""
  import repvgg_jax as rv  # pylint: disable=g-import-not-at-top
  with jax.enable_x64(True):
    model = rv.create_model(model_name, num_classes=num_classes, deploy=deploy, dtype=jnp.float64, **overrides)
    apply = jax.jit(model.apply)

  def run(variables, x):
    with jax.enable_x64(True):
      return jax.tree.map(np.asarray, apply(jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables),
                                            jnp.asarray(x, jnp.float64)))
  return run


def assert_matches_torch_in_both_forms(torch_model, name: str, variables: Mapping, x, num_classes: int,
                                       **overrides) -> None:
  """``variables``: this package's load of the well-posed float64 timm ``torch_model``'s weights. Asserts that
  the training form gives timm's logits on NHWC ``x`` and that the mutations and a wrong BN epsilon fail that
  comparison; then that the deploy form gives timm's re-parameterized logits, from our ``reparam`` and from
  loading timm's fused weights."""
  import repvgg_jax as rv  # pylint: disable=g-import-not-at-top
  from timm.utils.model import reparameterize_model  # pylint: disable=g-import-not-at-top
  expected = torch_logits(torch_model, x)
  ours = float64_apply(name, num_classes, **overrides)
  assert_equal_functions(ours(variables, x), expected)
  for mutated in mutations(variables["params"]).values():
    assert_caught(ours({**variables, "params": mutated}, x), expected)
  assert_caught(float64_apply(name, num_classes, bn_epsilon=WRONG_EPSILON, **overrides)(variables, x), expected)
  deploy = float64_apply(name, num_classes, deploy=True, **overrides)
  with jax.enable_x64(True):
    plain = rv.reparam(*(jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables[k])
                         for k in ("params", "batch_stats")))
  assert_equal_functions(deploy({"params": plain}, x), torch_logits(reparameterize_model(torch_model), x))
  fused = reparameterize_model(torch_model).float().double()  # Loaded as float32: the reference uses those values.
  assert_equal_functions(deploy(rv.load_pytorch_state_dict(fused.state_dict(), name, deploy=True, **overrides), x),
                         torch_logits(fused, x))
