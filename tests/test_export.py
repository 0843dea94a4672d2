"""Spec of the deploy export: a jax.export artifact that runs without the model code, for any batch size, and an
ONNX graph that onnxruntime runs with the JAX deploy model's logits."""

import collections
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import repvgg_jax as rv
from repvgg_jax import backend, checkpoints, equivalence, export
from tests import wellposed
from tests.helpers import random_variables, stablehlo_op_counts

SMALL = dict(num_classes=7, width_multiplier=(0.25, 0.25, 0.25, 0.5), num_blocks=(2, 2, 2, 1))

pytestmark = pytest.mark.usefixtures("full_precision")


@pytest.fixture(scope="module")
def trained():
  model = rv.create_model("RepVGG-B1g2", **SMALL)
  variables = random_variables(model, (1, 32, 32, 3))
  deploy = rv.create_model("RepVGG-B1g2", deploy=True, **SMALL)
  return model, variables, deploy, rv.reparam(variables["params"], variables["batch_stats"])


def test_exported_deploy_model_round_trips_for_any_batch(trained, tmp_path):
  model, variables, deploy, plain = trained
  path = str(tmp_path / "repvgg.jaxexport")
  # For the platform this runs on and the CPU: the artifact a GPU host would ship to CPU servers too.
  here = jax.export.default_export_platform()
  export.save(path, export.export_deploy(deploy, plain, (32, 32, 3), platforms=dict.fromkeys((here, "cpu"))))
  run = export.load(path)  # Nothing from repvgg_jax's models is used from here on.
  for batch in (1, 5):
    x = jax.random.normal(jax.random.key(batch), (batch, 32, 32, 3))
    expected = deploy.apply({"params": plain}, x)
    chex.assert_trees_all_close(run(x), expected, rtol=1e-6, atol=1e-6)
    # And it is the training model's function, too.
    y_train = model.apply(variables, x)
    chex.assert_trees_all_close(run(x), y_train, rtol=1e-5, atol=1e-5 * float(np.abs(y_train).max()))


def _op_counts(artifact: bytes) -> collections.Counter:
  return stablehlo_op_counts(jax.export.deserialize(bytearray(artifact)).mlir_module(),
                             ("convolution", "dot_general", "reduce", "multiply"))


def test_an_export_for_accelerators_made_on_any_host_holds_their_plain_convolutions():
  """MobileOne's depthwise convolutions and the pool take other paths on the CPU (``backend``); an artifact for
  CUDA or TPU must not carry them, whichever host lowers it, and a three-platform one runs here."""
  overrides = dict(num_classes=10, width_multiplier=(0.5,) * 4, num_blocks=(1, 1, 1, 1))
  deploy = rv.create_model("MobileOne-S0", deploy=True, **overrides)
  plain = rv.reparam(*(random_variables(rv.create_model("MobileOne-S0", **overrides), (1, 32, 32, 3))[k]
                       for k in ("params", "batch_stats")))
  with backend.plain_convolutions():
    reference = _op_counts(export.export_deploy(deploy, plain, (32, 32, 3), platforms=("cuda",)))
  assert reference["convolution"] > 0 and reference["reduce"] >= 1
  for platform in ("cuda", "tpu"):
    assert _op_counts(export.export_deploy(deploy, plain, (32, 32, 3), platforms=(platform,))) == reference
  cpu = _op_counts(export.export_deploy(deploy, plain, (32, 32, 3), platforms=("cpu",)))
  assert cpu["convolution"] < reference["convolution"] and cpu["dot_general"] > reference["dot_general"]
  everywhere = export.export_deploy(deploy, plain, (32, 32, 3), platforms=("cpu", "cuda", "tpu"))
  assert _op_counts(everywhere)["convolution"] >= reference["convolution"]
  x = jax.random.normal(jax.random.key(0), (3, 32, 32, 3))
  chex.assert_trees_all_close(jax.export.deserialize(bytearray(everywhere)).call(x),
                              deploy.apply({"params": plain}, x), rtol=1e-5, atol=1e-5)


def test_exporting_the_training_time_graph_is_refused(trained):
  model, variables, deploy, _ = trained
  with pytest.raises(ValueError, match=r"export takes the deploy-form model: create_model\(name, deploy=True\)"):
    export.export_deploy(model, variables["params"], (32, 32, 3))
  with pytest.raises(ValueError, match="training-time branch"):
    export.export_deploy(deploy, variables["params"], (32, 32, 3))


# --------------------------------------------------------------------------- ONNX.

ONNX_CASES = [("RepVGG-A0", {}), ("RepVGG-B1g4", {}), ("RepVGG-D2se", dict(width_multiplier=(0.25, 0.25, 0.25, 0.5))),
              pytest.param("MobileOne-S0", {}, marks=pytest.mark.slow)]
# MobileOne-S4's SE is D2se's graph (same SE nodes, 1x1 convs as S0's); MobileOne-S0's depthwise and 1x1 layers
# are also in its INT8 graph, checked in onnxruntime by tests/test_quantize.py.


def _plain(name, overrides, seed=0):
  model = rv.create_model(name, num_classes=10, **overrides)
  variables = random_variables(model, (1, 32, 32, 3), seed=seed)
  return rv.create_model(name, num_classes=10, deploy=True, **overrides), rv.reparam(variables["params"],
                                                                                       variables["batch_stats"])


@pytest.mark.parametrize("name,overrides", ONNX_CASES)
def test_onnx_graph_runs_in_onnxruntime_with_the_jax_deploy_logits(name, overrides):
  pytest.importorskip("onnxruntime")
  deploy, plain = _plain(name, overrides)
  proto = export.to_onnx(deploy, plain)
  ops = {n.op_type for n in proto.graph.node}
  assert ops <= {"Conv", "Relu", "GlobalAveragePool", "Flatten", "Gemm", "Sigmoid", "Mul"}  # No Transpose.
  assert ("Sigmoid" in ops) == (name in ("RepVGG-D2se", "MobileOne-S4"))
  dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
  assert dims == ["batch", 3, "height", "width"]
  session = export.onnx_session(proto)
  for batch, size in [(1, 32), (3, 48)]:
    x = np.asarray(jax.random.normal(jax.random.key(batch), (batch, size, size, 3)))
    got = session.run(["logits"], {"images": x.transpose(0, 3, 1, 2)})[0]
    with jax.default_matmul_precision("highest"):
      expected = np.asarray(deploy.apply({"params": plain}, x))
    assert got.shape == (batch, 10)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
  if name != "RepVGG-A0":  # One well-posed case (reduced D2se: 1.6e-4 of the spread, float32 conditioning).
    return
  # On a well-posed network (tests/wellposed.py; calibrated for 32 px): the error against the logits' spread.
  model = rv.create_model(name, num_classes=10, **overrides)
  variables = wellposed.well_posed_variables(model, (32, 32, 3), dtype=np.float32)
  plain = rv.reparam(variables["params"], variables["batch_stats"])
  x = np.asarray(wellposed.images((4, 32, 32, 3), seed=1), np.float32)
  run = lambda p: export.onnx_session(export.to_onnx(deploy, p)).run(["logits"], {"images": x.transpose(0, 3, 1, 2)})[0]
  with jax.default_matmul_precision("highest"):
    expected = deploy.apply({"params": plain}, x)
  # Two float32 engines; calibrated deep SE nets amplify float32 rounding (reduced D2se: 1.6e-4 of the spread).
  wellposed.assert_equal_functions(run(plain), expected, bound=1e-3)
  wellposed.assert_caught(run(wellposed.mutations(plain)["kh and kw swapped"]), expected, bound=1e-3)


def test_onnx_export_refuses_training_form_and_mismatched_params(trained):
  pytest.importorskip("onnx")
  model, variables, deploy, plain = trained
  with pytest.raises(ValueError, match="deploy-form model"):
    export.to_onnx(model, variables["params"])
  with pytest.raises(ValueError, match="training-time branch"):
    export.to_onnx(deploy, variables["params"])
  other = rv.create_model("RepVGG-B1g2", deploy=True, **{**SMALL, "num_classes": 5})
  with pytest.raises(ValueError, match=r"variables do not match the model: \['params'\]\['linear'\]\['bias'\] has shape"):
    export.to_onnx(other, plain)


def test_a_wrong_onnx_graph_fails_the_check():
  pytest.importorskip("onnxruntime")
  deploy, plain = _plain("RepVGG-A0", {})
  _, other = _plain("RepVGG-A0", {}, seed=1)
  with pytest.raises(equivalence.EquivalenceError, match="onnxruntime's logits differ"):
    export.check_onnx(export.to_onnx(deploy, other), deploy, plain, jnp.ones((2, 32, 32, 3)))


def test_convert_cli_writes_a_checked_onnx_file_from_orbax_and_refuses_a_mismatch(trained, tmp_path):
  pytest.importorskip("onnxruntime")
  model = rv.create_model("RepVGG-A0", num_classes=10)
  variables = random_variables(model, (1, 32, 32, 3))
  checkpoints.save_tree(str(tmp_path / "train"), jax.device_get(variables))
  checkpoints.save_tree(str(tmp_path / "small"), jax.device_get(trained[3]))
  convert = lambda *args: subprocess.run([sys.executable, "-m", "repvgg_jax.convert", "--model=RepVGG-A0", *args],
                                         capture_output=True, text=True, timeout=300)
  onnx_path = str(tmp_path / "a0.onnx")
  result = convert(f"--orbax={tmp_path}/train", f"--to_onnx={onnx_path}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "verified: the fused model equals" in result.stdout and "onnxruntime vs JAX" in result.stdout
  x = np.asarray(jax.random.normal(jax.random.key(3), (2, 40, 40, 3)))
  got = export.onnx_session(onnx_path).run(["logits"], {"images": x.transpose(0, 3, 1, 2)})[0]
  expected = np.asarray(model.apply(variables, x))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
  result = convert(f"--orbax={tmp_path}/small", f"--to_onnx={tmp_path}/small.onnx")
  assert result.returncode != 0 and "variables do not match the model" in result.stderr
  assert "Traceback" not in result.stderr and not os.path.exists(tmp_path / "small.onnx")
