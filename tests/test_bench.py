"""The benchmark CLI runs end to end on a tiny configuration, without TensorFlow, and prints its table
(numbers are not asserted)."""

import importlib.util
import os
import subprocess
import sys

import pytest

from tests.test_training import ROOT


def test_bench_cli_runs_without_tensorflow_prints_a_table_and_writes_a_plot(tmp_path):
  plot = str(tmp_path / "bench.png")
  has_timm = importlib.util.find_spec("timm") is not None
  has_ort = importlib.util.find_spec("onnxruntime") is not None
  engines = ",".join(["jax"] + ["onnxruntime"] * has_ort + ["torch"] * has_timm)
  # 64 px, not 32: full-width A0's batch-2 training step compiles about twice as fast (tiny maps make many
  # small convolutions and dots, which XLA:CPU compiles slowly).
  result = subprocess.run([sys.executable, "tests/no_tensorflow.py", "-m", "repvgg_jax.bench", "--models=RepVGG-A0",
                           "--batch_sizes=2", "--image_size=64", "--repeats=2", "--dtypes=float32",
                           "--train_step", f"--plot={plot}", f"--engines={engines}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  table = [line for line in result.stdout.splitlines() if line.startswith("| RepVGG-A0 | 2 |")]
  assert len(table) == 1 and "float32" in table[0]  # bf16 compute: tests/test_models.py.
  assert "deploy/train" in result.stdout and "train step img/s" in result.stdout
  assert "max rel err (HIGHEST)" in result.stdout and "JAX on cpu" in result.stdout
  if has_timm:
    assert "timm deploy img/s" in result.stdout and "timm train step img/s" in result.stdout and " on cpu (" in result.stdout
  if has_ort:
    assert "ort (our onnx) img/s" in result.stdout and ("ort ours/timm" in result.stdout) == has_timm
  assert os.path.getsize(plot) > 5_000


LIBRARY_WITHOUT_TENSORFLOW = """
import sys, functools
import jax, jax.numpy as jnp, optax
import repvgg_jax as rv
from repvgg_jax import equivalence, export, reparam, steps
model = rv.create_model("RepVGG-A0", num_classes=10, width_multiplier=(0.25, 0.25, 0.25, 0.5), num_blocks=(1, 1, 1, 1))
deploy = model.clone(deploy=True)
x = jnp.ones((2, 32, 32, 3))
variables = model.init(jax.random.key(0), x)
plain = rv.reparam(variables["params"], variables["batch_stats"])
print("error", equivalence.check_equivalence(model, variables, deploy, plain, x))
artifact = export.export_deploy(deploy, plain, (32, 32, 3))
state = steps.TrainState.create(apply_fn=model.clone(bn_axis_name=steps.AXIS).apply, params=variables["params"],
                                tx=optax.sgd(0.1), batch_stats=variables["batch_stats"],
                                rng=jax.random.key_data(jax.random.key(0)))
step = jax.pmap(functools.partial(steps.train_step, learning_rate=optax.constant_schedule(0.1), num_classes=10),
                axis_name=steps.AXIS)
state, metrics = step(steps.replicate(state), {"image": x[None], "label": jnp.zeros((1, 2), jnp.int32)})
print("loss", float(metrics["loss"][0]), "artifact", len(artifact))
assert not any(m.split(".")[0] == "tensorflow" for m in sys.modules)
"""


def test_library_export_and_training_step_need_no_tensorflow():
  result = subprocess.run([sys.executable, "tests/no_tensorflow.py", "-c", LIBRARY_WITHOUT_TENSORFLOW], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "loss" in result.stdout and "error" in result.stdout


def test_the_blocker_really_blocks_tensorflow():
  result = subprocess.run([sys.executable, "tests/no_tensorflow.py", "-c", "import tensorflow"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode != 0 and "blocked by tests/no_tensorflow.py" in result.stderr


@pytest.mark.slow  # Compiles four networks; the bench CLI itself is covered by the test above.
def test_paper_pairs_print_repvgg_beside_resnet_with_the_papers_ratio_and_the_memory_table(tmp_path):
  plot = str(tmp_path / "pairs.png")
  result = subprocess.run([sys.executable, "tests/no_tensorflow.py", "-m", "repvgg_jax.bench", "--paper_pairs",
                           "--models=RepVGG-A0,ResNet-18", "--batch_sizes=2", "--image_size=32", "--repeats=2",
                           "--memory_batches=1,4", f"--plot={plot}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  pairs = result.stdout.split("The paper's pairs")[1].split("Peak activation memory")[0]
  rows = [line.split(" | ") for line in pairs.splitlines() if line.startswith("| RepVGG-A0 | ResNet-18 |")]
  assert [row[3] for row in rows] == ["2"]  # Batch 1 is measured too, for the latency column only.
  assert rows[0][7] == f"{3256 / 2442:.2f}x"  # The paper's ratio (Table 4).
  memory = [line.split(" | ") for line in result.stdout.split("Peak activation memory")[1].splitlines()
            if line.startswith("| RepVGG-A0 |") or line.startswith("| ResNet-18 |")]
  assert [(row[0], row[1]) for row in memory] == [("| RepVGG-A0", "1"), ("| RepVGG-A0", "4"),
                                                 ("| ResNet-18", "1"), ("| ResNet-18", "4")]
  deploy_mb = {(row[0], row[1]): float(row[2].split(" / ")[1]) for row in memory}
  assert deploy_mb[("| RepVGG-A0", "4")] > deploy_mb[("| RepVGG-A0", "1")]  # Activations grow with the batch.
  assert os.path.getsize(plot) > 5_000

