"""Spec of INT8 (repvgg_jax/quantization.py and its command line, repvgg_jax/quantize.py): Qwix fake quantization
of the deploy form with one quantized op per convolution, integer weights and scales exactly as the JAX model uses them, and an INT8 ONNX graph that
onnxruntime runs with the JAX model's predictions, written by the command line only after that check."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import repvgg_jax as rv
from repvgg_jax import models
from repvgg_jax.plan import Layer
from tests import wellposed
from tests.helpers import random_variables

pytest.importorskip("qwix")  # The quant extra.
from repvgg_jax import quantization  # pylint: disable=g-import-not-at-top,wrong-import-position
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(num_classes=10, width_multiplier=(0.25, 0.25, 0.25, 0.5), num_blocks=(1, 2, 2, 1))


@pytest.mark.parametrize("name,overrides", [("RepVGG-A0", TINY),
                                            ("MobileOne-S0", dict(num_classes=10, width_multiplier=(0.5,) * 4,
                                                                  num_blocks=(1, 1, 1, 1)))])
def test_each_convolution_is_one_quantized_op_even_where_the_cpu_splits_it(name, overrides):
  """On the CPU, small maps run as shifted matmuls and depthwise convolutions as multiply-adds (backend.py);
  quantized, every fused convolution must be one conv_general_dilated with one input statistic."""
  deploy = rv.create_model(name, deploy=True, **overrides)
  model = rv.create_model(name, **overrides)
  v = random_variables(model, (2, 32, 32, 3))
  plain = rv.reparam(v["params"], v["batch_stats"])
  stats = quantization.calibrate(quantization.fake_quantized(deploy), plain, [jnp.ones((2, 32, 32, 3))])
  blocks = [k for k in plain if k != "linear"]
  assert sorted(stats) == sorted(blocks + ["linear"])
  for block in blocks:
    assert list(stats[block]["rbr_reparam"]) == ["conv_general_dilated0_lhs"], block
  assert list(stats["linear"]) == ["dot_general0_lhs"]
  assert list(stats[blocks[-1]]) == ["rbr_reparam", quantization.POOL]  # The global pool's input grid.


@pytest.mark.parametrize("name,overrides", [
    ("RepVGG-D2se", dict(width_multiplier=(0.25, 0.25, 0.25, 0.5), num_blocks=(1, 1, 1, 1))),  # SE before ReLU.
    ("RepVGGplus-L2pse", dict(width_multiplier=(0.25, 0.25, 0.25, 0.5), num_blocks=(1, 1, 2, 1))),  # SE after.
    ("MobileOne-S0", dict(width_multiplier=(0.5,) * 4, num_blocks=(1, 1, 1, 1)))])  # Depthwise.
def test_int8_onnx_gives_the_jax_models_logits_for_every_family(name, overrides):
  """The INT8 graph of each family (SE kept float, before or after the ReLU and at the pool's input; depthwise
  convolutions) against the JAX fake-quantized model, on shallow well-posed networks (the command's own check,
  >= 98% the same class, is for trained networks' margins). Random networks at full
  depth are chaotic (at D2se's depth the float model itself moves 0.3 of the logits' spread under input noise
  of 1e-4), so depth is checked on trained ones, by the command line."""
  pytest.importorskip("onnxruntime")
  from repvgg_jax import export  # pylint: disable=g-import-not-at-top
  model = rv.create_model(name, num_classes=10, **overrides)
  deploy = rv.create_model(name, num_classes=10, deploy=True, **overrides)
  variables = wellposed.well_posed_variables(model, (32, 32, 3), dtype=np.float32)
  params = rv.reparam(variables["params"], variables["batch_stats"])
  qmodel = quantization.fake_quantized(deploy)
  calibration = [wellposed.images((16, 32, 32, 3), seed).astype(np.float32) for seed in (1, 2)]
  stats = quantization.calibrate(qmodel, params, calibration)
  proto = export.to_onnx(deploy, jax.device_get(params), int8=quantization.int8_layers(params, stats))
  images = wellposed.images((32, 32, 32, 3), 7).astype(np.float32)
  expected = np.asarray(quantization.logits(qmodel, params, stats, images))
  got = export.onnx_session(proto).run(["logits"], {"images": images.transpose(0, 3, 1, 2)})[0]
  error = np.abs(got - expected).max()
  assert error < quantization.ONNX_SPREAD_FRACTION * wellposed.spread(expected)  # The command's bound.
  # A random network's top two logits are often closer than that: the class must agree wherever they are not.
  top2 = np.sort(expected, -1)[:, -2:]
  clear = top2[:, 1] - top2[:, 0] > 2 * error
  assert clear.mean() > 0.5 and (got.argmax(-1) == expected.argmax(-1))[clear].all()


class _OneConv(nn.Module):
  groups: int = 1

  @nn.compact
  def __call__(self, x):
    return models.PlainBlock(8, groups=self.groups, name="stage0")(x)

  quantized_modules = models.PlainStackNetwork.quantized_modules

  def deploy_plan(self):  # As the networks': the last block's output is the global pool's input.
    return [Layer(models.PLAIN, "stage0", 0, {})]


def _on_the_grid(x, low, high):
  """``x`` fake-quantized on Qwix's asymmetric int8 grid of the range [low, high] (float64 numpy)."""
  scale = (high - low) / 255
  zero = round(-128 - low / scale)
  return (np.clip(np.round(np.asarray(x, np.float64) / scale) + zero, -128, 127) - zero) * scale


def test_int8_layers_are_the_integers_and_scales_the_jax_model_computes_with():
  net = _OneConv()
  x = jax.random.normal(jax.random.key(0), (4, 6, 6, 3))
  params = net.init(jax.random.key(1), x)["params"]
  params = jax.tree.map(lambda a: a + 0.1, params)  # A non-zero bias too.
  qmodel = quantization.fake_quantized(net)
  stats = quantization.calibrate(qmodel, params, [x, 2 * x])
  layers = quantization.int8_layers(params, stats)
  layer = layers["stage0"]
  # Weights: int8 on the 7-bit grid, each output channel's largest |w| at 63, the rest within half a step.
  kernel = np.asarray(params["stage0"]["rbr_reparam"]["kernel"], np.float64)
  assert layer["weight"].dtype == np.int8
  np.testing.assert_array_equal(np.abs(layer["weight"]).reshape(-1, 8).max(0), 63)
  step = np.abs(kernel).reshape(-1, 8).max(0) / 63
  np.testing.assert_allclose(layer["weight_scale"], step, rtol=1e-6)
  assert np.abs(layer["weight"] - kernel / step).max() <= 0.5 + 1e-5
  # Static range: the mean over the two batches of each batch's min and max, 255 steps, zero point
  # -128 - min / scale.
  low, high = float(np.asarray(x).min()), float(np.asarray(x).max())
  s, zero = layer["input_scale"], layer["input_zero_point"]
  assert s == pytest.approx(1.5 * (high - low) / 255, rel=1e-6) and zero == round(-128 - 1.5 * low / s)
  w = layer["weight"] * layer["weight_scale"]

  def block(images, scale):  # The block on its input grid, the range scaled as the running mean was.
    y = lax.conv_general_dilated(jnp.asarray(_on_the_grid(images, scale * low, scale * high), jnp.float32),
                                 jnp.asarray(w, jnp.float32), (1, 1), [(1, 1), (1, 1)],
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"), precision="highest")
    return np.asarray(jnp.maximum(y + params["stage0"]["rbr_reparam"]["bias"], 0), np.float64)

  # The pool's input grid, calibrated the same way on the block's output: Qwix updates the running mean, then
  # quantizes with it, so the first batch saw its own input range and the second the mean of both.
  pool_high = np.mean([block(x, 1.0).max(), block(2 * x, 1.5).max()])
  assert layers[quantization.POOL]["input_scale"] == pytest.approx(pool_high / 255, rel=1e-6)
  assert layers[quantization.POOL]["input_zero_point"] == -128  # After a ReLU: 256 steps over [0, max].
  expected = _on_the_grid(block(x, 1.5), 0.0, pool_high)
  got = quantization.logits(qmodel, params, stats, x)
  np.testing.assert_allclose(got, expected, atol=2e-6 * float(np.abs(expected).max()))
  assert len(np.unique(np.round(np.asarray(got) / (pool_high / 255), 3) % 1)) == 1  # On the grid.


def test_the_exported_weights_are_bit_for_bit_those_every_jax_program_multiplies():
  """``int8_layers`` computes the weight grid in float32 numpy; the JAX model computes it inside whichever XLA
  program runs it (eager, jitted, pmapped, differentiated), and XLA may turn a division into a multiplication by
  the reciprocal in one program and not in another. On a kernel built of rounding ties (w = (k + 1/2) steps),
  every program must dequantize to exactly the exported integers times the exported scales."""
  rng = np.random.default_rng(0)
  absmax = rng.uniform(0.01, 3.0, size=8).astype(np.float32)
  kernel = ((rng.integers(-63, 63, size=(3, 3, 8, 8)) + 0.5) * (absmax / 63)).astype(np.float32)
  kernel[0, 0, 0] = absmax * np.where(np.arange(8) % 2, 1, -1)  # Each channel's largest |w|, both signs.
  params = {"stage0": {"rbr_reparam": {"kernel": jnp.asarray(kernel), "bias": jnp.zeros(8)}}}
  near_tie = np.abs(np.abs(kernel / (absmax / 63)) % 1 - 0.5) < 1e-4
  assert near_tie.mean() > 0.9
  qmodel = quantization.fake_quantized(_OneConv())
  layer = quantization.int8_layers(params, quantization.calibrate(qmodel, params, [jnp.ones((1, 4, 4, 8))]))["stage0"]
  exported = layer["weight"].astype(np.float32) * layer["weight_scale"]  # DequantizeLinear, in float32.
  kernel_of = lambda p: quantization.quantize_weights(p)["stage0"]["rbr_reparam"]["kernel"]
  programs = {"eager": kernel_of(params), "jit": jax.jit(kernel_of)(params),
              "pmap": jax.pmap(kernel_of)(jax.tree.map(lambda a: a[None], params))[0],
              "grad": jax.jit(lambda p: jax.vjp(kernel_of, p)[0])(params)}
  for name, got in programs.items():
    np.testing.assert_array_equal(np.asarray(got), exported, err_msg=name)


# onnxruntime in a subprocess: the INT8 graph's logits on saved images (one thread, as the emulator is slow).
_ORT_LOGITS = """
import sys, numpy as np, onnxruntime as ort
options = ort.SessionOptions()
options.intra_op_num_threads = 1
if sys.argv[4:] == ["float"]:  # The QDQ graph as written, in float: no integer kernels, nothing saturates.
  options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
np.save(sys.argv[3], session.run(["logits"], {"images": np.load(sys.argv[2])})[0])
"""
CPU_WITHOUT_VNNI = "EPYC-Milan"  # AMD family 25 model 1: AVX2, no AVX-512, no VNNI (QEMU's CPU model).


def test_the_int8_graph_computes_the_same_logits_on_a_cpu_without_vnni(tmp_path):
  """x86 CPUs without VNNI multiply u8 activations by s8 weights in pairs added in 16 bits, saturating. The
  graph's 7-bit weights never reach that bound: onnxruntime on an AVX2 CPU (emulated by QEMU's user mode, which
  reports EPYC-Milan's CPUID, so onnxruntime picks its AVX2 kernels) gives exactly the logits of this machine's
  kernels, and those of the graph evaluated in float up to requantization. The same graph with full-range int8
  weights saturates there (the mutation the test must catch, whatever this machine's CPU)."""
  import shutil  # pylint: disable=g-import-not-at-top
  pytest.importorskip("onnxruntime")
  if shutil.which("qemu-x86_64") is None:
    pytest.skip("needs QEMU's user mode (apt-get install qemu-user)")
  from repvgg_jax import export  # pylint: disable=g-import-not-at-top
  overrides = dict(num_classes=10, width_multiplier=(0.5,) * 4, num_blocks=(1, 1, 1, 1))
  model, deploy = rv.create_model("MobileOne-S0", **overrides), rv.create_model("MobileOne-S0", deploy=True, **overrides)
  variables = wellposed.well_posed_variables(model, (32, 32, 3), dtype=np.float32)
  params = rv.reparam(variables["params"], variables["batch_stats"])
  qmodel = quantization.fake_quantized(deploy)
  stats = quantization.calibrate(qmodel, params, [wellposed.images((16, 32, 32, 3), s).astype(np.float32)
                                                  for s in (1, 2)])
  layers = quantization.int8_layers(params, stats)
  full_range = {name: dict(grid) for name, grid in layers.items()}
  for name, _, tree in quantization.quantized_layers(params):
    integers, scale = quantization._symmetric_grid(np.asarray(tree["kernel"], np.float32), 8, axis=-1)
    full_range[name].update(weight=integers.astype(np.int8), weight_scale=scale.reshape(-1))
  np.save(tmp_path / "images.npy", wellposed.images((32, 32, 32, 3), 7).astype(np.float32).transpose(0, 3, 1, 2))
  (tmp_path / "logits.py").write_text(_ORT_LOGITS)

  graphs = {}
  for name, int8 in (("7-bit", layers), ("full range", full_range)):
    graphs[name] = str(tmp_path / f"{name.replace(' ', '_')}.onnx")
    export.to_onnx(deploy, jax.device_get(params), graphs[name], int8=int8)

  def logits(graph: str, emulated: bool = False, integer: bool = True):
    emulator = ["qemu-x86_64", "-cpu", CPU_WITHOUT_VNNI] if emulated else []
    result = subprocess.run([*emulator, sys.executable, str(tmp_path / "logits.py"), graphs[graph],
                             str(tmp_path / "images.npy"), str(tmp_path / "logits.npy"), *([] if integer else ["float"])],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return np.load(tmp_path / "logits.npy")

  avx2 = logits("7-bit", emulated=True)
  np.testing.assert_array_equal(avx2, logits("7-bit"))  # Exact integers on both machines' kernels.
  assert wellposed.spread_error(avx2, logits("7-bit", integer=False)) < 0.05  # Measured 0.009.
  saturated = wellposed.spread_error(logits("full range", emulated=True), logits("full range", integer=False))
  assert saturated > 0.1  # Measured 0.66 (this machine's kernels, with VNNI: 0.006).


def test_a_grouped_convolution_trains_with_the_gradients_of_its_dense_equivalent():
  """Qwix 0.1.8's backward pass fails on grouped convolutions (MobileOne's depthwise, g2/g4); ours takes the float
  convolution's gradient, straight through: it must give Qwix's own values, and Qwix's own gradients of the same
  convolution written densely (block-diagonal kernel, the same per-channel scales) up to the rounding of the
  operands that Qwix's backward pass uses. (Inputs beyond the calibrated range differ more: Qwix's kernel gradient
  sees them clipped, ours as they are.)"""
  x = jax.random.normal(jax.random.key(0), (4, 6, 6, 8))
  weights = jax.random.normal(jax.random.key(2), (4, 6, 6, 8))
  grouped = _OneConv(groups=4).init(jax.random.key(1), x)["params"]
  kernel = grouped["stage0"]["rbr_reparam"]["kernel"]  # (3, 3, 2, 8): output channel o reads inputs 2 (o // 2) + i.
  dense_kernel = jnp.zeros((3, 3, 8, 8))
  for g in range(4):
    dense_kernel = dense_kernel.at[:, :, 2 * g:2 * g + 2, 2 * g:2 * g + 2].set(kernel[..., 2 * g:2 * g + 2])
  dense = {"stage0": {"rbr_reparam": {**grouped["stage0"]["rbr_reparam"], "kernel": dense_kernel}}}

  def values_and_gradients(net, params):
    qmodel = quantization.fake_quantized(net)
    stats = quantization.calibrate(qmodel, params, [x])
    inside = 0.6 * x  # Within the calibrated range: nothing clipped.
    loss = lambda p: jnp.sum(weights * quantization._apply(qmodel, p, stats, inside, update=False))  # As qat's step.
    return quantization.logits(qmodel, params, stats, x), jax.grad(loss)(params)["stage0"]["rbr_reparam"]

  y, grads = values_and_gradients(_OneConv(groups=4), grouped)
  y_dense, grads_dense = values_and_gradients(_OneConv(), dense)
  np.testing.assert_allclose(y, y_dense, atol=1e-6 * float(jnp.abs(y_dense).max()))
  diagonal = jnp.stack([grads_dense["kernel"][:, :, 2 * (o // 2):2 * (o // 2) + 2, o] for o in range(8)], -1)
  np.testing.assert_allclose(grads["kernel"], diagonal, atol=0.02 * float(jnp.abs(diagonal).max()))
  np.testing.assert_allclose(grads["bias"], grads_dense["bias"], rtol=1e-5)


def test_per_channel_scales_beat_per_tensor_on_a_kernel_with_an_outlier_channel():
  kernel = np.random.default_rng(0).normal(size=(3, 3, 16, 8))
  kernel[..., 0] *= 100  # As a fused identity or 1x1 branch can make one channel's centre tap dominate.
  per_tensor = quantization.sqnr_db(kernel[..., 1:], quantization.quantize_symmetric(kernel)[..., 1:])
  per_channel = quantization.sqnr_db(kernel[..., 1:], quantization.quantize_symmetric(kernel, axis=-1)[..., 1:])
  assert per_channel > 40 > per_tensor + 20


def test_kernel_absmax_reports_each_fused_kernels_largest_weight():
  kernel = np.random.default_rng(0).normal(size=(3, 3, 1, 8)) * 0.1
  kernel[1, 1, 0, 3] = -140.0  # A depthwise centre tap as MobileOne's fused identity and 1x1 branches can make.
  params = {"stage1_0": {"rbr_reparam": {"kernel": kernel, "bias": np.zeros(8)}},
            "linear": {"kernel": np.full((8, 10), 0.5), "bias": np.zeros(10)}}
  assert quantization.kernel_absmax(params) == {"stage1_0": 140.0, "linear": 0.5}


def test_w4_weights_sit_on_a_4_bit_grid_per_channel_with_straight_through_gradients():
  params = {"stage0": {"rbr_reparam": {"kernel": jax.random.normal(jax.random.key(0), (3, 3, 4, 6)),
                                       "bias": jnp.ones(6)}},
            "linear": {"kernel": jax.random.normal(jax.random.key(1), (6, 10)), "bias": jnp.zeros(10)}}
  w4 = quantization.quantize_weights(params, 4)
  for kernel, original in ((w4["stage0"]["rbr_reparam"]["kernel"], params["stage0"]["rbr_reparam"]["kernel"]),
                           (w4["linear"]["kernel"], params["linear"]["kernel"])):
    for c in range(kernel.shape[-1]):
      steps = np.asarray(kernel[..., c]) / (np.abs(np.asarray(original[..., c])).max() / 7)
      np.testing.assert_allclose(steps, np.round(steps), atol=1e-4)  # Integers ...
      assert np.abs(np.round(steps)).max() <= 7  # ... in [-7, 7].
  assert w4["stage0"]["rbr_reparam"]["bias"] is params["stage0"]["rbr_reparam"]["bias"]
  grad = jax.grad(lambda p: quantization.quantize_weights(p, 4)["linear"]["kernel"].sum())(params)
  np.testing.assert_array_equal(grad["linear"]["kernel"], np.ones((6, 10)))


def onnxruntime_kernels(path, tmp_path) -> list[str]:
  """The op types of onnxruntime's optimized graph (its portable optimizations: no layout transforms)."""
  import onnx  # pylint: disable=g-import-not-at-top
  import onnxruntime as ort  # pylint: disable=g-import-not-at-top
  options = ort.SessionOptions()
  options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
  options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
  ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
  return [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]


def test_the_command_quantizes_a_finished_run_and_writes_a_checked_int8_onnx(tmp_path, fmnist_dir):
  """Tiny run on the fake Fashion-MNIST, then PTQ and half a QAT epoch: metrics and the INT8 ONNX are written,
  and onnxruntime's INT8 graph gives the JAX fake-quantized model's predictions."""
  pytest.importorskip("onnxruntime")
  from repvgg_jax import training  # pylint: disable=g-import-not-at-top
  from tests.test_training import tiny_config, tiny_flags  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  training.train_and_evaluate(tiny_config(fmnist_dir, num_train_steps=16, eval_every_steps=16), workdir)
  result = subprocess.run([sys.executable, "-m", "repvgg_jax.quantize", "--config=configs/quickstart.py",
                           f"--workdir={workdir}", "--qat_epochs=0.5", "--calibration_batches=2",
                           *tiny_flags(fmnist_dir)], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(workdir, "int8_metrics.json")) as f:
    metrics = json.load(f)
  assert {"float32", "ptq", "qat", "onnx_int8", "onnx_vs_jax", "kernel_sqnr_db",
          "kernel_absmax", "activation_sqnr_db"} <= set(metrics)
  assert metrics["onnx_vs_jax"]["argmax_agreement"] >= quantization.ONNX_ARGMAX_AGREEMENT
  assert os.path.getsize(os.path.join(workdir, "deploy_int8.onnx")) > 0
  import onnx  # pylint: disable=g-import-not-at-top
  ops = [n.op_type for n in onnx.load(os.path.join(workdir, "deploy_int8.onnx")).graph.node]
  # One per block (stage0, one per stage), the pool, and the head's input before and after Flatten.
  assert ops.count("QuantizeLinear") == 5 + 1 + 2
  assert set(onnxruntime_kernels(os.path.join(workdir, "deploy_int8.onnx"), tmp_path)) == {
      "QuantizeLinear", "QLinearConv", "QLinearGlobalAveragePool", "Flatten", "QGemm"}  # Integer from end to end.
  assert "PTQ (W8A8" in result.stderr and "QAT step 4/4" in result.stderr  # Progress lines, as training's.
