"""INT8 of the plain (deploy) model with Qwix: post-training quantization, quantization-aware training, and an
INT8 ONNX graph that onnxruntime runs with the same numbers.

  python -m repvgg_jax.quantize --config=configs/quickstart.py --workdir=runs/quickstart [--qat_epochs=1]

reads ``<workdir>/deploy`` (a finished run, or converted weights saved there), calibrates on training images,
evaluates float32 / PTQ / QAT on the eval split, and writes ``<workdir>/int8_metrics.json`` and
``<workdir>/deploy_int8.onnx`` (only once onnxruntime agrees with the JAX fake-quantized logits).
``--weight_bits=4`` is the W4A8 stress setting in JAX fake quantization only (``w4a8_metrics.json``, no ONNX).

The scheme (Qwix's numerics, google/qwix ``QtProvider``): every block's fused convolution (``rbr_reparam``) and
the head (``linear``) take int8 weights, symmetric per output channel (scale = max |w| / 127.5 over the
channel, values in [-127, 127]), and int8 inputs, asymmetric per tensor with a static range (the mean over
calibration images of each image's min and max; after a ReLU the min is 0, so 256 steps cover [0, max]);
values are rounded half to even. The global pool's input (the last block's output) sits on such a static grid
too, calibrated the same way (``POOL``): Qwix sees no matmul there, but an integer engine needs it to keep the last
convolution integer (onnxruntime otherwise runs it in float). SE layers stay float. Each convolution is one
quantized op: the CPU paths of ``backend`` are off while a quantized model is traced. Gradients are Qwix's
straight-through ones, except that grouped convolutions take the float convolution's (``_QtProvider``).
"""

import contextlib
import functools
import json
import os
import time
from typing import Any, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import qwix

from repvgg_jax import backend, families
from repvgg_jax.export import POOL  # The global pool's input: its statistics in the last block's quant_stats.
from repvgg_jax.plan import layer_key

STAT = "conv_general_dilated0_lhs", "dot_general0_lhs"  # Qwix's names of a layer's input statistics.


def _symmetric(bits: int) -> tuple[float, int]:
  """Qwix's symmetric integer grid: scale = absmax / (qmax + 0.5) (the largest bucket covers [qmax - 0.5,
  qmax + 0.5)), values rounded half to even and saturated to [-qmax, qmax]."""
  qmax = 2 ** (bits - 1) - 1
  return qmax + 0.5, qmax


def _symmetric_grid(x, bits: int, axis=None, xp=np):
  """(integers, scale) of ``x`` on Qwix's symmetric grid, per tensor or per slice along ``axis`` kept;
  ``xp`` is numpy or jax.numpy (inside a traced function)."""
  bound, qmax = _symmetric(bits)
  reduce = None if axis is None else tuple(a for a in range(x.ndim) if a != axis % x.ndim)
  absmax = xp.max(xp.abs(x), axis=reduce, keepdims=True)
  scale = xp.where(absmax > 0, absmax / bound, 1.0)
  return xp.clip(xp.round(x / scale), -qmax, qmax), scale


class _QtProvider(qwix.QtProvider):
  """Qwix's QtProvider, but a grouped convolution (MobileOne's depthwise, g2/g4) takes its gradients from the
  float convolution of the same operands (straight through both): Qwix 0.1.8's backward pass ignores
  feature_group_count and fails on it. The values stay Qwix's; ungrouped convolutions are Qwix's throughout."""

  def conv_general_dilated(self, lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                           dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                           preferred_element_type=None, out_sharding=None):
    args = (window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
            batch_group_count, precision, preferred_element_type, out_sharding)
    quantized = super().conv_general_dilated(lhs, rhs, *args)
    if feature_group_count == 1:
      return quantized
    return _with_float_gradients(jax.lax.stop_gradient(quantized), lhs, rhs,
                                 lambda a, b: jax.lax.conv_general_dilated(a, b, *args))


def _with_float_gradients(value, lhs, rhs, conv):
  """``value`` (the quantized ``conv(lhs, rhs)``), differentiated as the float ``conv(lhs, rhs)``; the float
  convolution runs only in the backward pass."""

  @jax.custom_vjp
  def straight_through(value, lhs, rhs):
    del lhs, rhs
    return value

  def forward(value, lhs, rhs):
    return value, (value, lhs, rhs)

  def backward(residuals, g):
    value, lhs, rhs = residuals
    return (jnp.zeros_like(value), *jax.vjp(conv, lhs, rhs)[1](g))

  straight_through.defvjp(forward, backward)
  return straight_through(value, lhs, rhs)


def fake_quantized(deploy_model):
  """The deploy model with Qwix W8A8 fake quantization (static activation ranges)."""
  rule = qwix.QtRule(module_path=deploy_model.quantized_modules, weight_qtype=jnp.int8, act_qtype=jnp.int8,
                     act_static_scale=True, act_calibration_method="minmax")
  return qwix.quantize_model(deploy_model, _QtProvider([rule]))


def quantize_weights(params: Mapping, bits: int) -> dict:
  """The W4A8 stress setting: every quantized layer's kernel fake-quantized to ``bits`` per output channel
  (Qwix's symmetric grid; straight-through gradients), to be fed to the W8A8 model of ``fake_quantized``.
  Qwix 0.1.8's convolution refuses int8 activations with int4 weights, so the 4-bit grid is applied here;
  the W8A8 model then re-rounds it by at most half an int8 step (1/36 of a 4-bit step). ``bits >= 8``: as is."""
  if bits >= 8:
    return dict(params)

  def quantized(kernel):
    integers, scale = _symmetric_grid(kernel, bits, axis=-1, xp=jnp)
    return kernel + jax.lax.stop_gradient(integers * scale - kernel)

  out = dict(params)
  for _, path, tree in quantized_layers(params):
    parent = out
    for key in path[:-1]:
      parent[key] = dict(parent[key])
      parent = parent[key]
    parent[path[-1]] = {**tree, "kernel": quantized(tree["kernel"])}
  return out


def _on_the_asymmetric_grid(x, scale, zero, xp=np):
  """``x`` fake-quantized on the asymmetric int8 grid (scale, zero point): round half to even, saturate."""
  return (xp.clip(xp.round(x / scale) + zero, -128, 127) - zero) * scale


def _asymmetric_grid(low, high, xp=np):
  """Qwix's asymmetric int8 grid of a calibrated range [low <= 0, high >= 0]: (scale, zero point), scale =
  (high - low) / 255 (1 for an empty range), zero point round(-128 - low / scale); after a ReLU (low = 0) the
  zero point is -128 and the grid [0, 255 steps], which is also what lets onnxruntime drop the ReLU into its
  integer convolution. ``xp``: numpy or jax.numpy."""
  scale = (high - low) / 255.0
  scale = xp.where(scale > 0, scale, 1.0)
  return scale, xp.clip(xp.round(-128 - low / scale), -128, 127)


def _static_range(module: nn.Module, x):
  """Qwix's static "minmax" calibration of an activation Qwix does not see (per tensor): running sums of each
  image's min (<= 0) and max (>= 0) in ``module``'s quant_stats ``POOL``, updated where that collection is
  mutable. Returns the mean (low, high), this batch included."""
  zero = jnp.zeros((), jnp.float32)
  stat = module.variable("quant_stats", POOL, lambda: {"count": jnp.zeros((), jnp.int32), "sum_of_min": zero,
                                                       "sum_of_max": zero})
  if module.is_mutable_collection("quant_stats") and not module.is_initializing():
    x = jax.lax.stop_gradient(x).astype(jnp.float32)
    per_image = tuple(range(1, x.ndim))
    stat.value = {"count": stat.value["count"] + 1,
                  "sum_of_min": stat.value["sum_of_min"] + jnp.mean(jnp.minimum(x.min(per_image), 0)),
                  "sum_of_max": stat.value["sum_of_max"] + jnp.mean(jnp.maximum(x.max(per_image), 0))}
  count = jnp.maximum(stat.value["count"], 1).astype(jnp.float32)
  return stat.value["sum_of_min"] / count, stat.value["sum_of_max"] / count


def _pool_input_on_the_grid(last_block: str):
  """A flax method interceptor: the output of the top-level block ``last_block`` (the pool's input) fake-
  quantized on its static int8 grid, straight-through gradients."""

  def interceptor(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    if context.method_name != "__call__" or context.module.path != (last_block,):
      return y
    scale, zero = _asymmetric_grid(*_static_range(context.module, y), xp=jnp)
    y_quantized = _on_the_asymmetric_grid(y, scale, zero, xp=jnp).astype(y.dtype)
    return y + jax.lax.stop_gradient(y_quantized - y)

  return interceptor


@contextlib.contextmanager
def _tracing(qmodel):
  """Where a fake-quantized model runs: plain convolutions (one quantized op each) and the pool's input grid."""
  with backend.plain_convolutions(), nn.intercept_methods(_pool_input_on_the_grid(qmodel.deploy_plan()[-1].name)):
    yield


def _apply(qmodel, params, quant_stats, images, update: bool):
  with _tracing(qmodel):
    if update:
      return qmodel.apply({"params": params, "quant_stats": quant_stats}, images, mutable=["quant_stats"])
    return qmodel.apply({"params": params, "quant_stats": quant_stats}, images)


def calibrate(qmodel, params: Mapping, batches: Iterable) -> dict:
  """The static activation statistics of ``qmodel`` (from ``fake_quantized``) over the image batches
  (N, H, W, C): per quantized layer, Qwix's running means of each image's min and max."""
  params = jax.tree.map(jnp.asarray, params)  # Qwix finds a kernel among the params by identity: no numpy copies.
  batches = iter(batches)
  first = next(batches)
  with _tracing(qmodel):
    stats = qmodel.init(jax.random.key(0), first)["quant_stats"]
  # Eager: under jit, Qwix's statistics update inside its custom-VJP convolution leaks a tracer (qwix 0.1.8).
  step = functools.partial(_apply, qmodel, update=True)
  for images in [first, *batches]:
    _, updates = step(params, stats, images)
    stats = updates["quant_stats"]
  return stats


def logits(qmodel, params: Mapping, quant_stats: Mapping, images):
  """Fake-quantized logits with the calibrated static scales (the statistics are not updated)."""
  return _jit_apply(qmodel)(params, quant_stats, images)


@functools.lru_cache(maxsize=8)
def _jit_apply(qmodel):
  return jax.jit(functools.partial(_apply, qmodel, update=False))


def int8_layers(params: Mapping, quant_stats: Mapping) -> dict[str, dict]:
  """Per quantized layer (``quantized_layers``: 'stage0', ..., 'linear'): the input scale (per tensor) and the
  integer weights with their per-output-channel scales, exactly as the fake-quantized JAX model uses them; and ``POOL``, the global
  pool's input grid (no weights).

  Returns {layer: {"input_scale": float, "input_zero_point": int, "weight": int8 array of the kernel's shape,
  "weight_scale": (O,)}}.
  """
  layers = {}
  for name, path, tree in quantized_layers(params):
    stats = functools.reduce(lambda tree, key: tree[key], path, quant_stats)
    integers, scale = _symmetric_grid(np.asarray(tree["kernel"], np.float64), 8, axis=-1)
    layers[name] = {**_input_grid(next(stats[k] for k in STAT if k in stats)), "weight": integers.astype(np.int8),
                    "weight_scale": scale.reshape(-1).astype(np.float32)}
  layers[POOL] = _input_grid(next(stats[POOL] for stats in quant_stats.values() if POOL in stats))
  return layers


def _input_grid(stat: Mapping) -> dict:
  """{"input_scale", "input_zero_point"} of a layer's running statistics, in float32 as the JAX model computes."""
  count = np.float32(np.asarray(stat["count"]))
  low, high = (np.float32(np.asarray(stat[f"sum_of_{k}"]).reshape(())) / count for k in ("min", "max"))
  scale, zero = _asymmetric_grid(low, high)
  return {"input_scale": float(np.float32(scale)), "input_zero_point": int(zero)}


def quantized_layers(params: Mapping):
  """The INT8 layers of a deploy params tree, in tree order: (name, path, {kernel, bias}) for each layer that its
  network's ``quantized_modules`` names (``plan.layer_key``)."""
  return _layers(params, families.of_params(params).network.quantized_modules, ())


def _layers(tree: Mapping, pattern: str, path: tuple[str, ...]):
  for key, value in tree.items():
    if not isinstance(value, Mapping):
      continue
    name = layer_key(pattern, "/".join(path + (key,))) if "kernel" in value else None
    if name is not None:
      yield name, path + (key,), value
    else:
      yield from _layers(value, pattern, path + (key,))


def sqnr_db(x, x_quantized) -> float:
  """Signal-to-quantization-noise ratio, 10 log10(sum x^2 / sum (x - x_q)^2), in dB."""
  x, x_quantized = np.asarray(x, np.float64), np.asarray(x_quantized, np.float64)
  noise = float(np.sum((x - x_quantized) ** 2))
  return float("inf") if noise == 0 else 10 * np.log10(float(np.sum(x ** 2)) / noise)


def quantize_symmetric(x, bits: int = 8, axis=None):
  """Symmetric fake quantization of ``x`` (per tensor, or per slice along ``axis`` kept): Qwix's numerics."""
  integers, scale = _symmetric_grid(np.asarray(x, np.float64), bits, axis)
  return integers * scale


def kernel_sqnr(params: Mapping, bits: int = 8) -> dict[str, tuple[float, float]]:
  """Per fused kernel: (SQNR per tensor, SQNR per output channel) in dB, the weight side of the mechanism
  the QARepVGG paper names (wide fused-kernel ranges)."""
  return {name: (sqnr_db(tree["kernel"], quantize_symmetric(tree["kernel"], bits)),
                 sqnr_db(tree["kernel"], quantize_symmetric(tree["kernel"], bits, axis=-1)))
          for name, _, tree in quantized_layers(params)}


def kernel_absmax(params: Mapping) -> dict[str, float]:
  """Per fused kernel: max |w|. One outlier sets a per-tensor scale for the whole layer (MobileOne's fused
  depthwise kernels are reported to reach above 100), which is what per-channel scales avoid."""
  return {name: float(np.max(np.abs(np.asarray(tree["kernel"])))) for name, _, tree in quantized_layers(params)}


def activation_sqnr(deploy_model, params: Mapping, quant_stats: Mapping, images) -> dict[str, float]:
  """Per quantized layer: the SQNR (dB) of its float input activations on ``images`` quantized with the
  calibrated static scale, the activation side of the mechanism (wide ranges of the fused blocks' outputs)."""
  layers, inputs, last = int8_layers(params, quant_stats), {}, deploy_model.deploy_plan()[-1].name

  def record(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    if context.method_name == "__call__":
      name = layer_key(deploy_model.quantized_modules, "/".join(context.module.path))
      if name is not None:
        inputs[name] = np.asarray(args[0])
      if context.module.path == (last,):
        inputs[POOL] = np.asarray(y)
    return y

  with nn.intercept_methods(record):
    deploy_model.apply({"params": params}, images)
  return {name: sqnr_db(x, _on_the_asymmetric_grid(x, layers[name]["input_scale"], layers[name]["input_zero_point"]))
          for name, x in inputs.items()}


def qat(qmodel, params: Mapping, quant_stats: Mapping, batches: Iterable, learning_rate: float,
        num_steps: int, label_smoothing: float = 0.0, log_every: int = 100, log=print,
        weight_bits: int = 8) -> tuple[dict, dict]:
  """Quantization-aware fine-tuning of the deploy params through the fake quantization (straight-through
  gradients; ``weight_bits`` < 8 through ``quantize_weights`` too), SGD with momentum 0.9 and a cosine schedule
  to 0; the activation statistics keep being averaged. ``batches`` yield {"image", "label"}. Returns (params,
  quant_stats), the params before ``quantize_weights``."""
  optimizer = optax.sgd(optax.cosine_decay_schedule(learning_rate, max(num_steps, 1)), momentum=0.9)
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state, stats, images, labels):
    def loss_fn(p):
      y, updates = _apply(qmodel, quantize_weights(p, weight_bits), stats, images, update=True)
      targets = optax.smooth_labels(jax.nn.one_hot(labels, y.shape[-1]), label_smoothing)
      return optax.softmax_cross_entropy(y, targets).mean(), updates["quant_stats"]
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, stats, loss

  start = time.time()
  for i, batch in zip(range(num_steps), batches):
    params, opt_state, quant_stats, loss = step(params, opt_state, quant_stats, batch["image"], batch["label"])
    if (i + 1) % log_every == 0 or i + 1 == num_steps:
      if not np.isfinite(float(loss)):
        raise FloatingPointError(f"QAT diverged: the loss is {float(loss)} by step {i + 1}; try a lower "
                                 "--qat_learning_rate.")
      log(f"QAT step {i + 1}/{num_steps}: loss {float(loss):.4f}, {(i + 1) / (time.time() - start):.1f} steps/s")
  return params, quant_stats


def accuracy(predict, batches: Iterable) -> float:
  """Top-1 accuracy of ``predict(images) -> logits`` over padded eval batches ({"image", "label", "mask"})."""
  correct = count = 0.0
  for batch in batches:
    hit = np.asarray(jnp.argmax(predict(batch["image"]), -1) == batch["label"])
    mask = np.asarray(batch["mask"]) > 0
    correct += float(hit[mask].sum())
    count += float(mask.sum())
  return correct / count


def write_metrics(path: str, metrics: Mapping[str, Any]) -> None:
  with open(path, "w") as f:
    json.dump(dict(metrics), f, indent=1)
    f.write("\n")


# --------------------------------------------------------------------------- The command line.

# onnxruntime's integer kernels round and saturate like Qwix except at the edges (its int8 grid is [-128, 127],
# its bias is int32 at the input scale times the weight scale, its requantization fixed-point), so a few
# activations land one step apart; in a deep net these steps add up. The bound is on what a user sees: the
# same predicted class on held-out images, and logits within a fraction of their spread.
ONNX_ARGMAX_AGREEMENT = 0.98
ONNX_SPREAD_FRACTION = 0.1


def check_int8_onnx(proto, qmodel, params: Mapping, quant_stats: Mapping, images) -> dict:
  """onnxruntime's INT8 logits vs the JAX fake-quantized ones on NHWC ``images``: {"argmax_agreement",
  "max_error_vs_spread"}; raises ``equivalence.EquivalenceError`` outside the bounds above."""
  from repvgg_jax import equivalence, export  # pylint: disable=g-import-not-at-top
  images = np.asarray(images, np.float32)
  expected = np.asarray(logits(qmodel, params, quant_stats, images))
  got = export.onnx_session(proto).run(["logits"], {"images": images.transpose(0, 3, 1, 2)})[0]
  agreement = float(np.mean(got.argmax(-1) == expected.argmax(-1)))
  spread = float(np.abs(expected - expected.mean(0)).max()) or 1.0
  error = float(np.abs(got - expected).max()) / spread
  if agreement < ONNX_ARGMAX_AGREEMENT or error > ONNX_SPREAD_FRACTION:
    raise equivalence.EquivalenceError(
        f"onnxruntime's INT8 logits differ from the JAX fake-quantized model's: same class on {agreement:.1%} of "
        f"the held-out images (bound {ONNX_ARGMAX_AGREEMENT:.0%}), max error {error:.3f} of the logits' spread "
        f"(bound {ONNX_SPREAD_FRACTION}).")
  return {"argmax_agreement": agreement, "max_error_vs_spread": error}


def main(argv):
  from absl import app, flags, logging  # pylint: disable=g-import-not-at-top,redefined-outer-name
  from repvgg_jax import checkpoints, cli, equivalence, export, input_pipeline, training  # pylint: disable=g-import-not-at-top
  flags_ = flags.FLAGS
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config, workdir = flags_.config, flags_.workdir
  if flags_.weight_bits not in (4, 8) or flags_.qat_epochs < 0 or flags_.calibration_batches < 1:
    raise app.UsageError("--weight_bits must be 8 or 4, --qat_epochs >= 0 and --calibration_batches >= 1.")
  deploy_dir = os.path.join(workdir, "deploy")
  if not os.path.isdir(deploy_dir):
    raise cli.UserError(f"{deploy_dir} does not exist: quantize a finished run (train.py writes it), or save "
                        "converted deploy params there (python -m repvgg_jax.convert ... --out=<workdir>).")
  source = input_pipeline.get_source(config.dataset, config.data_dir, (config.train_split, config.eval_split))
  deploy = training.model_from_config(config, source.num_classes, deploy=True, half_precision=False)
  params = jax.tree.map(jnp.asarray, checkpoints.load_tree(deploy_dir))
  try:
    export.check_deploy_params(deploy, params)
  except ValueError as e:
    raise cli.UserError(f"{deploy_dir} holds no deploy params of the config's model: {e}") from e
  batch = min(config.batch_size, 256)
  qmodel, bits = fake_quantized(deploy), flags_.weight_bits

  def eval_accuracy(predict):
    return accuracy(predict, input_pipeline.eval_batches(source, config, batch))

  metrics = {"weight_bits": bits, "act_bits": 8}
  forward = jax.jit(lambda x: deploy.apply({"params": params}, x))
  metrics["float32"] = eval_accuracy(forward)
  logging.info("float32 deploy model: eval accuracy %.4f", metrics["float32"])
  train = input_pipeline.train_dataset(source, config, batch, seed=config.seed).as_numpy_iterator()
  ptq_params = quantize_weights(params, bits)  # Once, not per batch.
  stats = calibrate(qmodel, ptq_params, (next(train)["image"] for _ in range(flags_.calibration_batches)))
  metrics["ptq"] = eval_accuracy(lambda x: logits(qmodel, ptq_params, stats, x))
  logging.info("PTQ (W%dA8, %d calibration batches of %d training images): eval accuracy %.4f", bits,
               flags_.calibration_batches, batch, metrics["ptq"])
  metrics["kernel_sqnr_db"] = {k: {"per_tensor": t, "per_channel": c} for k, (t, c) in kernel_sqnr(params).items()}
  metrics["kernel_absmax"] = kernel_absmax(params)
  held_out = next(input_pipeline.eval_batches(source, config, batch))["image"]
  metrics["activation_sqnr_db"] = activation_sqnr(deploy, params, stats, held_out)
  if flags_.qat_epochs > 0:
    steps = int(flags_.qat_epochs * source.num_examples(config.train_split) // batch)
    try:
      params, stats = qat(qmodel, params, stats, train, flags_.qat_learning_rate, steps, config.label_smoothing,
                          log=logging.info, weight_bits=bits)
    except FloatingPointError as e:  # PTQ's results stand; the QAT ones are not written.
      raise cli.UserError(f"{e} (PTQ: eval accuracy {metrics['ptq']:.4f}; nothing written)") from e
    qat_params = quantize_weights(params, bits)
    metrics["qat"] = eval_accuracy(lambda x: logits(qmodel, qat_params, stats, x))
    metrics["qat_epochs"] = flags_.qat_epochs
    logging.info("QAT (%s epochs): eval accuracy %.4f", flags_.qat_epochs, metrics["qat"])
  if bits == 8:
    proto = export.to_onnx(deploy, jax.device_get(params), int8=int8_layers(params, stats))
    try:
      metrics["onnx_vs_jax"] = check_int8_onnx(proto, qmodel, params, stats, held_out)
    except equivalence.EquivalenceError as e:
      raise cli.UserError(f"deploy_int8.onnx not written: {e}") from e
    path = os.path.join(workdir, "deploy_int8.onnx")
    export.save_onnx(proto, path, source.classes)
    session = export.onnx_session(path)
    metrics["onnx_int8"] = eval_accuracy(
        lambda x: session.run(["logits"], {"images": np.asarray(x, np.float32).transpose(0, 3, 1, 2)})[0])
    logging.info("Wrote %s: onnxruntime INT8 eval accuracy %.4f; vs JAX %s", path, metrics["onnx_int8"],
                 metrics["onnx_vs_jax"])
  path = os.path.join(workdir, "int8_metrics.json" if bits == 8 else "w4a8_metrics.json")
  write_metrics(path, metrics)
  logging.info("Wrote %s", path)


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "The run's training configuration file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "The run's workdir (holds deploy/); int8 outputs are written there.")
  flags.DEFINE_float("qat_epochs", 0, "Quantization-aware fine-tuning epochs; 0 = post-training quantization only.")
  flags.DEFINE_float("qat_learning_rate", 1e-3, "Peak learning rate of the fine-tuning (cosine to 0).")
  flags.DEFINE_integer("calibration_batches", 8, "Training batches for the static activation scales.")
  flags.DEFINE_integer("weight_bits", 8, "Weight bits, 8 or 4 (activations: 8); 4 is JAX-only (no ONNX).")
  flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
  from repvgg_jax import cli  # pylint: disable=g-import-not-at-top
  _define_flags()
  cli.run(main)
