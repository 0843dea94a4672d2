"""INT8 of the plain (deploy) model with Qwix: post-training quantization, quantization-aware training (through
the training loop's own ``steps.train_step``), and what an INT8 ONNX graph needs to run with the same numbers.
The command line over it is ``python -m repvgg_jax.quantize``.

The scheme. The layers a network's ``quantized_modules`` names (a RepVGG-style block's fused convolution
``rbr_reparam`` and the head ``linear``; RepViT's every convolution but SE's, and its head) take int8 weights,
symmetric per output channel on a 7-bit grid (``INT8_WEIGHT_BITS``: scale = max |w| / 63 over the channel, values
in [-63, 63]), and int8 inputs, asymmetric per tensor with a static range: the mean over calibration batches of
each batch's min and max (onnxruntime's MinMax calibration with its moving average; after a ReLU the min is 0, so
256 steps cover [0, max]); values are rounded half to even. The weights are put on their grid here
(``quantize_weights``, straight-through gradients) and the inputs by Qwix (``QtProvider``: its static-scale
calibration, rounding and straight-through gradients), so the JAX model multiplies exactly the integers and
scales that ``int8_layers`` hands to the ONNX graph. The global pool's input (the last block's output) sits on
such a static grid too, calibrated the same way (``POOL``): Qwix sees no matmul there, but an integer engine needs
it to keep the last convolution integer (onnxruntime otherwise runs it in float). SE layers stay float. Each
convolution is one quantized op: the CPU paths of ``backend`` are off while a quantized model is traced. Grouped
convolutions take the float convolution's gradients (``_QtProvider``).
"""

import contextlib
import dataclasses
import functools
import json
from typing import Any, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import qwix

from repvgg_jax import backend, equivalence, export, families, steps
from repvgg_jax.export import POOL  # The global pool's input: its statistics in the last block's quant_stats.
from repvgg_jax.plan import layer_key

STAT = "conv_general_dilated0_lhs", "dot_general0_lhs"  # Qwix's names of a layer's input statistics.


# The INT8 weights' grid: int8 storage, 7 bits of range. x86 CPUs without VNNI (AVX2, AVX-512 before Cascade Lake)
# multiply u8 activations by s8 weights with VPMADDUBSW, which adds each pair of products in 16 bits and saturates:
# 2 x 255 x 127 overflows, 2 x 255 x 63 does not (onnxruntime counts constant weights within [-64, 63] as safe, its
# PR #12088; OpenVINO's workaround is the same 7 bits). Full-range weights stored as uint8 also avoid the overflow,
# but run on onnxruntime's u8 x u8 kernels, slower than float32 at batch 32 (benchmarks/RESULTS.md).
INT8_WEIGHT_BITS = 7


def _symmetric_grid(x, bits: int, axis=None, xp=np):
  """(integers, scale) of ``x`` on the symmetric ``bits``-bit grid, per tensor or per slice along ``axis`` kept:
  scale = absmax / qmax (qmax = 2^(bits - 1) - 1, so the largest |x| is qmax, not a rounding tie), integers
  x qmax / absmax rounded half to even, in [-qmax, qmax]. ``xp`` is numpy or jax.numpy (inside a traced
  function); float32 numpy computes the same bits as XLA: the divisions are written as multiplications by a
  reciprocal, which XLA would otherwise choose for some programs and not others."""
  qmax = 2 ** (bits - 1) - 1
  reduce = None if axis is None else tuple(a for a in range(x.ndim) if a != axis % x.ndim)
  absmax = xp.max(xp.abs(x), axis=reduce, keepdims=True)
  nonzero = absmax > 0
  per_unit = xp.where(nonzero, qmax / xp.where(nonzero, absmax, 1), 1)
  scale = xp.where(nonzero, absmax * (1 / qmax), 1)
  return xp.clip(xp.round(x * per_unit), -qmax, qmax), scale


def _batch_extreme(x, kind: str, axes):
  """The batch's ``kind`` ("min" or "max") of per-image statistics ``x`` over ``axes`` (kept), across the devices
  of the training and evaluation steps' pmap axis (``steps.AXIS``) where that axis is bound: each device sees its
  share of the batch, and QAT on N devices must compute what one device computes with the whole batch."""
  reduce, across = (jnp.min, jax.lax.pmin) if kind == "min" else (jnp.max, jax.lax.pmax)
  x = jax.lax.stop_gradient(reduce(x, axis=axes, keepdims=True))  # A statistic (and pmin has no derivative).
  try:
    return across(x, steps.AXIS)
  except NameError:  # Not under the steps' pmap (calibration, the checks): this batch is the whole batch.
    return x


class _QtProvider(qwix.QtProvider):
  """Qwix's QtProvider for the inputs only. Weights reach it already on their grid (``quantize_weights``), so
  its own weight quantization is off (it would round them again on Qwix's int8 grid). A batch's range is its
  extremes (``_batch_extreme``), where Qwix takes the mean of each image's; the running mean over batches is
  Qwix's. A grouped convolution (MobileOne's depthwise, g2/g4) takes its gradients from the float convolution of
  the same operands (straight through both): Qwix 0.1.8's backward pass ignores feature_group_count and fails
  on it."""

  def _update_and_get_quant_stat(self, name, batch_axes, calibration):
    calibration = {kind: _batch_extreme(x, kind, batch_axes) for kind, x in calibration.items()}
    return super()._update_and_get_quant_stat(name, batch_axes, calibration)  # Its own mean is now over one entry.

  # Flax's Conv and Dense pass the kernel as the right-hand operand.
  def _create_conv_general_qt_config(self, *args):
    return dataclasses.replace(super()._create_conv_general_qt_config(*args), rhs_qtype=None)

  def _create_dot_general_qt_config(self, *args):
    return dataclasses.replace(super()._create_dot_general_qt_config(*args), rhs_qtype=None)

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
  """The deploy model with Qwix's int8 fake quantization of the quantized layers' inputs (static ranges); their
  weights are put on their grid by ``_apply``. (The rule names a weight type because Qwix quantizes nothing of an
  op without one; ``_QtProvider`` then leaves the weights as they come.)"""
  rule = qwix.QtRule(module_path=deploy_model.quantized_modules, weight_qtype=jnp.int8, act_qtype=jnp.int8,
                     act_static_scale=True, act_calibration_method="minmax")
  return qwix.quantize_model(deploy_model, _QtProvider([rule]))


def _straight_through(x, x_quantized):
  """``x_quantized`` in the forward pass, exactly (x - x is 0), and the identity's gradient in the backward pass."""
  return x - jax.lax.stop_gradient(x) + jax.lax.stop_gradient(x_quantized)


def quantize_weights(params: Mapping, bits: int = INT8_WEIGHT_BITS) -> dict:
  """``params`` with every quantized layer's kernel (``quantized_layers``) on the symmetric ``bits``-bit grid per
  output channel (``_symmetric_grid``: integers times scales, exactly), straight-through gradients; biases and
  other layers as they are. ``INT8_WEIGHT_BITS`` is the INT8 graph's grid; 4 the W4A8 stress setting (JAX only:
  no ONNX engine runs it)."""

  def quantized(kernel):
    integers, scale = _symmetric_grid(kernel, bits, axis=-1, xp=jnp)
    return _straight_through(kernel, integers * scale)

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
  """The inputs' static range (as ``_QtProvider``'s) of an activation Qwix does not see (per tensor): running sums
  of each batch's min (<= 0) and max (>= 0) over its images and the devices, in ``module``'s quant_stats ``POOL``,
  updated where that collection is mutable. Returns the mean (low, high), this batch included."""
  zero = jnp.zeros((), jnp.float32)
  stat = module.variable("quant_stats", POOL, lambda: {"count": jnp.zeros((), jnp.int32), "sum_of_min": zero,
                                                       "sum_of_max": zero})
  if module.is_mutable_collection("quant_stats") and not module.is_initializing():
    x = jax.lax.stop_gradient(x).astype(jnp.float32)
    per_image = tuple(range(1, x.ndim))
    low = _batch_extreme(jnp.minimum(x.min(per_image), 0), "min", 0).reshape(())
    high = _batch_extreme(jnp.maximum(x.max(per_image), 0), "max", 0).reshape(())
    stat.value = {"count": stat.value["count"] + 1, "sum_of_min": stat.value["sum_of_min"] + low,
                  "sum_of_max": stat.value["sum_of_max"] + high}
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
    return _straight_through(y, _on_the_asymmetric_grid(y, scale, zero, xp=jnp).astype(y.dtype))

  return interceptor


@contextlib.contextmanager
def _tracing(qmodel):
  """Where a fake-quantized model runs: plain convolutions (one quantized op each) and the pool's input grid."""
  with backend.plain_convolutions(), nn.intercept_methods(_pool_input_on_the_grid(qmodel.deploy_plan()[-1].name)):
    yield


def _apply(qmodel, params, quant_stats, images, update: bool, weight_bits: int = INT8_WEIGHT_BITS):
  """``qmodel`` on ``images``, its weights from ``params`` through ``quantize_weights`` (Qwix finds each kernel among
  the params it is given by identity, so they are quantized before, not inside, the model)."""
  variables = {"params": quantize_weights(params, weight_bits), "quant_stats": quant_stats}
  with _tracing(qmodel):
    if update:
      return qmodel.apply(variables, images, mutable=["quant_stats"])
    return qmodel.apply(variables, images)


def calibrate(qmodel, params: Mapping, batches: Iterable, weight_bits: int = INT8_WEIGHT_BITS) -> dict:
  """The static activation statistics of ``qmodel`` (from ``fake_quantized``) over the image batches
  (N, H, W, C), the weights on their ``weight_bits`` grid: per quantized layer, running sums of each batch's min
  and max."""
  params = jax.tree.map(jnp.asarray, params)
  batches = iter(batches)
  first = next(batches)
  with _tracing(qmodel):
    stats = qmodel.init(jax.random.key(0), first)["quant_stats"]
  # Eager: under jit, Qwix's statistics update inside its custom-VJP convolution leaks a tracer (qwix 0.1.8).
  step = functools.partial(_apply, qmodel, update=True, weight_bits=weight_bits)
  for images in [first, *batches]:
    _, updates = step(params, stats, images)
    stats = updates["quant_stats"]
  return stats


def logits(qmodel, params: Mapping, quant_stats: Mapping, images, weight_bits: int = INT8_WEIGHT_BITS):
  """Fake-quantized logits with the calibrated static scales (the statistics are not updated)."""
  return _jit_apply(qmodel, weight_bits)(params, quant_stats, images)


@functools.lru_cache(maxsize=8)
def _jit_apply(qmodel, weight_bits: int):
  return jax.jit(functools.partial(_apply, qmodel, update=False, weight_bits=weight_bits))


def fake_quantized_apply(qmodel, weight_bits: int = INT8_WEIGHT_BITS):
  """``apply_fn(variables, images, train=False, mutable=())`` of ``qmodel`` (``fake_quantized``) in the shape of a
  Flax model's ``apply``, the activation statistics standing where BatchNorm statistics are (``variables`` =
  {"params": the deploy params, "batch_stats": quant_stats}), the weights on their ``weight_bits`` grid; with
  ``mutable``, the statistics are updated and returned as ``{"batch_stats": ...}``. The training loop's
  ``steps.train_step`` and ``steps.eval_step`` take it as they take a model's."""

  def apply_fn(variables, images, train: bool = False, mutable=()):
    del train  # The deploy form has no BatchNorm.
    if mutable:
      y, updates = _apply(qmodel, variables["params"], variables["batch_stats"], images, True, weight_bits)
      return y, {"batch_stats": updates["quant_stats"]}
    return _apply(qmodel, variables["params"], variables["batch_stats"], images, False, weight_bits)

  return apply_fn


def qat_state(qmodel, params: Mapping, quant_stats: Mapping, optimizer: optax.GradientTransformation,
              weight_bits: int = INT8_WEIGHT_BITS) -> steps.TrainState:
  """Quantization-aware training as a ``steps.TrainState`` of ``fake_quantized_apply``: ``steps.train_step`` (the
  training loop's own step: its loss, label smoothing, gradient averaging and finiteness flag) then fine-tunes the
  deploy ``params`` through the fake quantization (straight-through gradients), and the activation statistics keep
  being averaged. The state's params are those before ``quantize_weights``."""
  return steps.TrainState.create(apply_fn=fake_quantized_apply(qmodel, weight_bits), params=dict(params),
                                 tx=optimizer, batch_stats=quant_stats, rng=jax.random.key_data(jax.random.key(0)))


def int8_layers(params: Mapping, quant_stats: Mapping) -> dict[str, dict]:
  """Per quantized layer (``quantized_layers``: 'stage0', ..., 'linear'): the input scale (per tensor) and the
  integer weights (``INT8_WEIGHT_BITS``) with their per-output-channel scales, exactly as the fake-quantized JAX
  model uses them; and ``POOL``, the global pool's input grid (no weights).

  Returns {layer: {"input_scale": float, "input_zero_point": int, "weight": int8 array of the kernel's shape,
  "weight_scale": (O,)}}.
  """
  layers = {}
  for name, path, tree in quantized_layers(params):
    stats = functools.reduce(lambda tree, key: tree[key], path, quant_stats)
    integers, scale = _symmetric_grid(np.asarray(tree["kernel"], np.float32), INT8_WEIGHT_BITS, axis=-1)
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
  """Symmetric fake quantization of ``x`` (per tensor, or per slice along ``axis`` kept), in float64."""
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


def write_metrics(path: str, metrics: Mapping[str, Any]) -> None:
  with open(path, "w") as f:
    json.dump(dict(metrics), f, indent=1)
    f.write("\n")


# onnxruntime multiplies the same integers, but its bias is int32 at the input scale times the weight scale and its
# requantization fixed-point, so a few activations that sit near a rounding edge land one step apart; in a deep
# net these steps add up. The bound is on what a user sees: the same predicted class on held-out images, and logits
# within a fraction of their spread.
ONNX_ARGMAX_AGREEMENT = 0.98
ONNX_SPREAD_FRACTION = 0.1


def check_int8_onnx(proto, qmodel, params: Mapping, quant_stats: Mapping, images) -> dict:
  """onnxruntime's INT8 logits vs the JAX fake-quantized ones on NHWC ``images``: {"argmax_agreement",
  "max_error_vs_spread"}; raises ``equivalence.EquivalenceError`` outside the bounds above."""
  images = np.asarray(images, np.float32)
  with jax.default_matmul_precision("highest"):  # ORT computes in full float32 (and integers); so must the reference.
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
