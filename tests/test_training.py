"""Spec of training: the recipe's pieces, data parallelism, checkpoints and resume, the deploy hand-off, errors."""

import collections
import errno
import functools
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from etils import epath

import repvgg_jax as rv
from configs import default, quickstart
from repvgg_jax import checkpoints, equivalence, input_pipeline, steps, training
from repvgg_jax.equivalence import EquivalenceError
from tests.helpers import FAMILY_TREES, write_image_folder
from tests.precision_emulation import emulated_accelerator_precision

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
shutil_usage = collections.namedtuple("usage", "total used free")


def tiny_config(data_dir, **overrides):
  """Quickstart on the fake files, with a 4-block network and a few steps."""
  config = quickstart.get_config()
  config.data_dir = data_dir
  config.model_overrides.num_blocks = (1, 1, 1, 1)
  config.shuffle_buffer = 256
  config.batch_size = 32
  config.num_train_steps = 6
  config.log_every_steps = 2
  config.eval_every_steps = 3
  config.checkpoint_every_steps = 2
  config.update(overrides)
  return config


def family_run_config(name, data_dir):
  """A few steps of the quickstart recipe (RepViT: its own quickstart's optimizer) for a variant of
  ``helpers.FAMILY_TREES``, at that tree's size."""
  config = tiny_config(data_dir, model=name, num_train_steps=4, eval_every_steps=100, checkpoint_every_steps=100)
  config.model_overrides.num_blocks = None
  config.model_overrides.update(dict(FAMILY_TREES)[name])
  if name.startswith("RepViT"):
    config.model_overrides.width_multiplier = None
    config.update(optimizer="adamw", learning_rate=2e-3, weight_decay=0.025)
  return config


def tiny_flags(data_dir, **overrides):
  flags = {"data_dir": data_dir, "model_overrides.num_blocks": "(1,1,1,1)", "shuffle_buffer": 256,
           "batch_size": 32, "num_train_steps": 6, "log_every_steps": 2, "eval_every_steps": 3,
           "checkpoint_every_steps": 2}
  flags.update(overrides)
  return [f"--config.{k}={v}" for k, v in flags.items()]


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


# --------------------------------------------------------------------------- The recipe.

def test_weight_decay_skips_biases_and_the_conv_branches_bn_scales_only():
  model = rv.create_model("RepVGG-D2se", num_classes=3, width_multiplier=(0.25, 0.25, 0.25, 0.25),
                          num_blocks=(2, 1, 1, 1))
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  mask = steps.weight_decay_mask(params)
  block = mask["stage1_1"]
  assert block["rbr_dense"]["conv"]["kernel"] and block["rbr_1x1"]["conv"]["kernel"]
  assert not block["rbr_dense"]["bn"]["scale"] and not block["rbr_1x1"]["bn"]["scale"]
  assert not block["rbr_dense"]["bn"]["bias"] and not block["rbr_identity"]["bias"]
  assert block["rbr_identity"]["scale"]  # As in the official code: the identity BN's scale is decayed.
  assert block["se"]["down"]["kernel"] and not block["se"]["down"]["bias"]
  assert mask["linear"]["kernel"] and not mask["linear"]["bias"]


def test_qarepvgg_decays_the_kernels_and_not_the_post_sum_bn_as_the_official_sgd_optimizer():
  # cxxgtxy/QARepVGG trains with RepVGG's sgd_optimizer: no decay where the name holds "bn" or "bias".
  model = rv.create_model("QARepVGG-A0", num_classes=3, width_multiplier=(0.25, 0.25, 0.25, 0.25))
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  block = steps.weight_decay_mask(params)["stage1_1"]
  assert block["rbr_dense"]["conv"]["kernel"] and block["rbr_1x1"]["kernel"]
  assert not any(jax.tree.leaves(block["rbr_dense"]["bn"])) and not any(jax.tree.leaves(block["bn"]))


def test_learning_rate_warms_up_linearly_then_decays_to_zero_by_cosine():
  config = default.get_config()
  config.batch_size = 512
  schedule = steps.learning_rate_schedule(config, steps_per_epoch=100, num_steps=1000)
  peak = 0.1 * 512 / 256
  assert float(schedule(0)) == 0.0
  assert float(schedule(250)) == pytest.approx(peak / 2)
  assert float(schedule(500)) == pytest.approx(peak)
  assert float(schedule(750)) == pytest.approx(peak / 2, rel=1e-4)  # Half-way through the cosine.
  assert float(schedule(1000)) == pytest.approx(0.0, abs=1e-9)


def test_weight_decay_is_constant_or_cosine_annealed_to_its_final_value():
  config = default.get_config()
  assert float(steps.weight_decay_schedule(config, 1000)(700)) == pytest.approx(1e-4)  # RepVGG: constant.
  config.final_weight_decay = 1e-5  # MobileOne: 1e-4 -> 1e-5 by cosine over the run.
  schedule = steps.weight_decay_schedule(config, 1000)
  assert [float(schedule(t)) for t in (0, 500, 1000)] == pytest.approx([1e-4, 5.5e-5, 1e-5])


def test_the_optimizer_decays_weights_by_the_schedule_of_the_step():
  config = default.get_config()
  config.momentum, config.nesterov = 0.0, False  # So that an update is -learning_rate * decay * weight.
  params = {"conv": {"kernel": jnp.ones(3)}}
  optimizer = steps.create_optimizer(config, optax.constant_schedule(1.0), lambda step: 0.1 * (step + 1))
  state = optimizer.init(params)
  zero_grads = {"conv": {"kernel": jnp.zeros(3)}}
  first, state = optimizer.update(zero_grads, state, params)
  second, _ = optimizer.update(zero_grads, state, params)
  assert float(first["conv"]["kernel"][0]) == pytest.approx(-0.1)
  assert float(second["conv"]["kernel"][0]) == pytest.approx(-0.2)


def test_adamw_decays_the_masked_leaves_by_learning_rate_times_decay_and_sgd_stays_the_recipe():
  config = default.get_config()
  config.optimizer = "adamw"
  params = {"conv": {"kernel": jnp.ones(3), "bias": jnp.ones(3)}}
  optimizer = steps.create_optimizer(config, optax.constant_schedule(0.5), optax.constant_schedule(0.1))
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  update, _ = optimizer.update(zero_grads, optimizer.init(params), params)
  assert float(update["conv"]["kernel"][0]) == pytest.approx(-0.05)  # Decoupled: -lr * decay * weight.
  assert float(update["conv"]["bias"][0]) == 0.0  # The recipe's mask: no decay on biases.
  grads = {"conv": {"kernel": jnp.full(3, 1e-3), "bias": jnp.full(3, -4.0)}}
  update, _ = optimizer.update(grads, optimizer.init(params), params)
  assert float(update["conv"]["bias"][0]) == pytest.approx(0.5, rel=1e-4)  # Adam's first step: lr * sign.
  config.optimizer = "sgd"
  sgd = steps.create_optimizer(config, optax.constant_schedule(0.5), optax.constant_schedule(0.0))
  sgd_update, _ = sgd.update(grads, sgd.init(params), params)
  assert float(sgd_update["conv"]["bias"][0]) == pytest.approx(3.8)  # Nesterov's first step: lr * 1.9 * -grad.


def test_every_field_of_the_recipe_is_read_by_the_library():
  """A config field nothing reads would be a setting that silently does nothing."""
  import ast  # pylint: disable=g-import-not-at-top
  sources = [os.path.join(ROOT, "train.py")] + [os.path.join(ROOT, "repvgg_jax", f)
                                                for f in os.listdir(os.path.join(ROOT, "repvgg_jax"))
                                                if f.endswith(".py")]
  read = set()
  for path in sources:
    with open(path) as f:
      tree = ast.parse(f.read())
    read |= {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
             and isinstance(node.ctx, ast.Load)}
  config = default.get_config()
  unread = sorted(set(config.keys()) - read - {"model_overrides"})
  assert not unread, f"config fields no library code reads: {unread}"


def test_model_overrides_offer_every_override_create_model_accepts():
  from repvgg_jax import families  # pylint: disable=g-import-not-at-top
  accepted = set().union(*(family.overridable for family in families.FAMILIES))
  offered = set(default.get_config().model_overrides.keys())
  # The loop sets the axis of its own pmap.
  assert offered == accepted - {"bn_axis_name"}
  config = quickstart.get_config()
  config.model = "RepVGGplus-L2pse"
  config.model_overrides.use_post_se = False
  config.model_overrides.bn_epsilon = 1e-3
  model = training.model_from_config(config, num_classes=10)
  assert (model.use_post_se, model.bn_epsilon) == (False, 1e-3)


def test_a_step_moves_the_moving_average_towards_the_new_weights_and_statistics():
  config = quickstart.get_config()
  config.model_overrides.num_blocks = (1, 1, 1, 1)
  config.ema_decay = 0.9
  model = training.model_from_config(config, num_classes=10)
  learning_rate = optax.constant_schedule(0.1)
  state = steps.create_train_state(jax.random.key(0), config, model, (16, 16, 1),
                                   steps.create_optimizer(config, learning_rate, optax.constant_schedule(1e-4)))
  jax.tree.map(np.testing.assert_array_equal, state.ema["params"], state.params)  # Starts at the init.
  rng = np.random.default_rng(0)
  batch = steps.shard({"image": rng.normal(size=(8, 16, 16, 1)).astype(np.float32),
                       "label": rng.integers(0, 10, size=8)})
  step = jax.pmap(functools.partial(steps.train_step, learning_rate=learning_rate, num_classes=10, ema_decay=0.9),
                  axis_name=steps.AXIS)
  new = jax.tree.map(lambda x: x[0], step(steps.replicate(state), batch)[0])
  for key, old in (("params", state.params), ("batch_stats", state.batch_stats)):
    expected = jax.tree.map(lambda e, v: 0.9 * e + 0.1 * v, old, getattr(new, key))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), new.ema[key], expected)
  assert new.eval_variables() is new.ema
  assert state.replace(ema=None).eval_variables()["params"] is state.params


def test_progressive_learning_grows_the_crops_by_stage_and_resumes_inside_a_stage(fmnist_dir):
  config = tiny_config(fmnist_dir, progressive_learning=((0, 16, 0.0), (1.5, 24, 0.5), (2, 28, 1.0)))
  source = input_pipeline.get_source("fashion_mnist", fmnist_dir)
  whole = list(training.train_batches(source, config, 8, 0, 6, steps_per_epoch=2))
  assert [b["image"].shape[2] for b in whole] == [16, 16, 16, 24, 28, 28]
  resumed = list(training.train_batches(source, config, 8, 4, 6, steps_per_epoch=2))
  for expected, got in zip(whole[4:], resumed, strict=True):
    np.testing.assert_array_equal(got["image"], expected["image"])


@pytest.mark.slow  # The moving average's update and its use for eval: the step test above; MobileOne's fusion: test_mobileone.py.
def test_a_mobileone_run_with_the_recipe_deploys_its_moving_average(fmnist_dir, tmp_path, monkeypatch):
  """EMA, annealed weight decay and two progressive-learning stages (16 px, then 28 px with AutoAugment)."""
  config = tiny_config(fmnist_dir, model="MobileOne-S0", ema_decay=0.5, final_weight_decay=1e-5, export_onnx=False,
                       progressive_learning=((0, 16, 0.0), (0.5, 28, 0.5)))  # 8 steps an epoch: 16 px for 4.
  config.model_overrides.num_blocks = (1, 1, 1, 1)
  config.model_overrides.width_multiplier = (0.25, 0.25, 0.25, 0.25)
  finished = []

  def finish(*args):  # Keeps the final state (its 4th argument) for the checks below.
    finished.append(args[3])
    return _real_finish(*args)

  monkeypatch.setattr(training, "finish", finish)
  result = training.train_and_evaluate(config, str(tmp_path))
  state = finished[0]
  assert result["max_relative_error"] < equivalence.RTOL and int(state.step) == 6
  assert not np.allclose(state.ema["params"]["linear"]["kernel"], state.params["linear"]["kernel"])
  expected = jax.jit(rv.reparam)(state.ema["params"], state.ema["batch_stats"])  # Jitted, as the loop's.
  jax.tree.map(np.testing.assert_array_equal, checkpoints.load_tree(str(tmp_path / "deploy")),
               jax.device_get(expected))


_real_finish = training.finish


@pytest.mark.slow  # ~1.5 min on 2 cores; CI runs it on Python 3.13, and configs/repvit_quickstart.py is measured.
def test_a_repvit_run_with_its_recipe_trains_deploys_and_exports(fmnist_dir, tmp_path):
  """RepViT through the same loop with its recipe's optimizer (AdamW, mixup, EMA): the deploy form it writes
  equals the training form, and its ONNX graph is checked in onnxruntime, as every family's."""
  from configs import repvit_m0_9  # pylint: disable=g-import-not-at-top
  recipe = repvit_m0_9.get_config()
  config = tiny_config(fmnist_dir, model="RepViT-M0.9", optimizer=recipe.optimizer, weight_decay=recipe.weight_decay,
                       learning_rate=recipe.learning_rate, mixup_alpha=recipe.mixup_alpha, ema_decay=0.5)
  config.model_overrides.num_blocks = config.model_overrides.width_multiplier = None
  config.model_overrides.depths, config.model_overrides.widths = (1, 1, 1, 1), (16, 32, 48, 64)
  result = training.train_and_evaluate(config, str(tmp_path))
  assert result["max_relative_error"] < equivalence.RTOL
  deploy = checkpoints.load_tree(str(tmp_path / "deploy"))
  assert set(deploy["head"]) == {"kernel", "bias"} and "bn" not in deploy["stem_conv1"]
  assert os.path.exists(tmp_path / "deploy.onnx")


def test_repvit_configs_hold_the_papers_recipe():
  import importlib  # pylint: disable=g-import-not-at-top
  keys = default.get_config().keys()
  for name in (n for n in rv.list_models() if n.startswith("RepViT")):
    config = importlib.import_module(f"configs.repvit_m{name[len('RepViT-M'):].replace('.', '_')}").get_config()
    assert config.model == name and set(config.keys()) == set(keys)
    assert (config.optimizer, config.num_epochs, config.batch_size, config.learning_rate) == ("adamw", 300, 2048, 5e-4)
    assert (config.weight_decay, config.label_smoothing, config.mixup_alpha, config.ema_decay) == (0.025, 0.1, 0.8,
                                                                                                    0.99996)
    training.validate_config(config, keys)
  from configs import repvit_quickstart  # pylint: disable=g-import-not-at-top
  small = repvit_quickstart.get_config()  # Its run is in benchmarks/RESULTS.md; here, that it builds.
  training.validate_config(small, keys)
  model = training.model_from_config(small, num_classes=10)
  assert (model.widths, model.depths) == ((24, 48, 96, 192), (1, 1, 2, 1))


@pytest.mark.parametrize("field, value, message", [
    ("ema_decay", 1.0, "ema_decay must be in [0, 1)"),
    ("autoaugment_strength", -0.5, "autoaugment_strength must be >= 0"),
    ("final_weight_decay", 1e-3, "exceeds weight_decay"),
    ("progressive_learning", ((1, 16, 0.0),), "progressive_learning must be"),
    ("progressive_learning", ((0, 16, 0.0), (0, 24, 0.0)), "increasing epochs"),
    ("progressive_learning", ((0, 16),), "progressive_learning must be"),
    ("optimizer", "lamb", "optimizer must be one of sgd, adamw; got 'lamb'"),
    ("input_threads", -1, "input_threads must be >= 0"),
])
def test_impossible_recipe_settings_are_refused(field, value, message):
  config = quickstart.get_config()
  config[field] = value
  with pytest.raises(training.ConfigError, match=re.escape(message)):
    training.validate_config(config)


def test_official_configs_hold_the_recipe():
  config = default.get_config()
  assert (config.momentum, config.nesterov, config.learning_rate, config.weight_decay) == (0.9, True, 0.1, 1e-4)
  assert (config.label_smoothing, config.warmup_epochs, config.num_epochs, config.image_size) == (0.1, 5, 120, 224)
  import importlib  # pylint: disable=g-import-not-at-top
  for name in (n for n in rv.list_models() if n.startswith("RepVGG-")):
    module = importlib.import_module(f"configs.{name.split('-')[1].lower()}")
    variant = module.get_config()
    assert variant.model == name
    long_recipe = name in ("RepVGG-B2", "RepVGG-B2g2", "RepVGG-B2g4", "RepVGG-B3", "RepVGG-B3g2", "RepVGG-B3g4",
                           "RepVGG-D2se")
    assert variant.num_epochs == (200 if long_recipe else 120)
    assert set(variant.keys()) == set(config.keys())
  for name in (n for n in rv.list_models() if n.startswith("QARepVGG")):  # cxxgtxy/QARepVGG's recipe.
    variant = importlib.import_module(f"configs.qarepvgg_{name.split('-')[1].lower()}").get_config()
    assert variant.model == name and set(variant.keys()) == set(config.keys())
    assert (variant.weight_decay, variant.num_epochs, variant.mixup_alpha) == (4e-5, 120, 0.0)
    assert (variant.momentum, variant.learning_rate, variant.label_smoothing) == (0.9, 0.1, 0.1)
  for name in (n for n in rv.list_models() if n.startswith("MobileOne")):
    variant = importlib.import_module(f"configs.mobileone_{name.split('-')[1].lower()}").get_config()
    assert variant.model == name and set(variant.keys()) == set(config.keys())
    assert (variant.num_epochs, variant.batch_size, variant.learning_rate, variant.momentum) == (300, 256, 0.1, 0.9)
    assert (variant.weight_decay, variant.final_weight_decay, variant.label_smoothing) == (1e-4, 1e-5, 0.1)
    assert variant.ema_decay == 0.9995
    augmented = name in ("MobileOne-S2", "MobileOne-S3", "MobileOne-S4")
    assert bool(variant.progressive_learning) == augmented and variant.autoaugment_strength == 0
    if augmented:
      assert variant.progressive_learning[-1][1:] == (224, 1.0) == (variant.image_size, 1.0)
  from configs import repvggplus_l2pse  # pylint: disable=g-import-not-at-top
  plus = repvggplus_l2pse.get_config()
  assert plus.model == "RepVGGplus-L2pse" and set(plus.keys()) == set(config.keys())
  assert (plus.num_epochs, plus.learning_rate, plus.weight_decay, plus.label_smoothing) == (300, 0.1, 4e-5, 0.1)
  assert (plus.mixup_alpha, plus.randaugment_magnitude, plus.image_size, plus.eval_image_size) == (0.2, 15, 256, 320)
  from configs import mobileone_quickstart  # pylint: disable=g-import-not-at-top
  small = mobileone_quickstart.get_config()  # Its 6-minute run is in benchmarks/RESULTS.md; here, that it builds.
  training.validate_config(small, config.keys())
  model = training.model_from_config(small, num_classes=10)
  assert (model.num_conv_branches, model.num_blocks) == (4, (1, 2, 4, 1))


# --------------------------------------------------------------------------- Data parallelism.

def test_eight_devices_compute_the_same_step_as_one_device():
  result = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "multidevice_step.py")],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert "OK 8 devices == 1 device" in result.stdout and "OK QAT on 8 devices == the whole batch on each" in result.stdout


# --------------------------------------------------------------------------- Bad input, before compilation.

def test_unknown_config_field_is_refused(fmnist_dir, tmp_path):
  config = tiny_config(fmnist_dir)
  config.batchsize = 64
  with pytest.raises(training.ConfigError, match="batchsize"):
    training.train_and_evaluate(config, str(tmp_path), known_fields=default.get_config().keys())


def test_batch_not_divisible_by_the_devices_is_refused(fmnist_dir, tmp_path, monkeypatch):
  monkeypatch.setattr(jax, "device_count", lambda: 8)
  with pytest.raises(training.ConfigError, match="not divisible by the 8 devices"):
    training.train_and_evaluate(tiny_config(fmnist_dir, batch_size=36), str(tmp_path))



def test_unknown_model_in_config_is_a_config_error(fmnist_dir, tmp_path):
  with pytest.raises(training.ConfigError, match="RepVGG-A0"):
    training.train_and_evaluate(tiny_config(fmnist_dir, model="RepVGG-AO"), str(tmp_path))


# --------------------------------------------------------------------------- A whole run, in process.

@pytest.fixture(scope="module")
def trained_workdir(fmnist_dir, tmp_path_factory):
  """A whole run at emulated accelerator precision, as on a GPU or TPU: its final check must still hold."""
  workdir = str(tmp_path_factory.mktemp("run"))
  with emulated_accelerator_precision():
    result = training.train_and_evaluate(tiny_config(fmnist_dir), workdir)
  return workdir, result


@pytest.mark.slow  # ~30-60 s each; the default suite holds the property in parts: each family's fold leaf by leaf
# (tests/test_reparam.py) and the run's check at HIGHEST (trained_workdir), both under the emulation.
@pytest.mark.parametrize("name", [name for name, _ in FAMILY_TREES if not name.startswith("RepVGG-")])
def test_a_short_run_of_every_family_ends_verified_at_accelerator_precision(name, fmnist_dir, tmp_path):
  """As trained_workdir for RepVGG: each family's fold and check run at HIGHEST, so its run's own check holds."""
  with emulated_accelerator_precision():
    result = training.train_and_evaluate(family_run_config(name, fmnist_dir), str(tmp_path))
  assert result["max_relative_error"] < equivalence.RTOL


def test_a_run_ends_with_a_verified_evaluated_deploy_model(trained_workdir):
  workdir, result = trained_workdir
  lines = read_metrics(workdir)
  assert {"train", "eval", "deploy"} <= {line["split"] for line in lines}
  train_line = next(line for line in lines if line["split"] == "train")
  assert {"step", "loss", "accuracy", "learning_rate", "images_per_sec"} <= set(train_line)
  deploy = [line for line in lines if line["split"] == "deploy"]
  assert len(deploy) == 1 and deploy[0]["step"] == 6 and deploy[0]["accuracy"] == result["deploy_accuracy"]
  assert deploy[0]["count"] == 72  # The whole eval split: the accuracy is a count of 72 images.
  assert deploy[0]["accuracy"] * 72 == pytest.approx(round(deploy[0]["accuracy"] * 72), abs=1e-6)
  assert result["max_relative_error"] < equivalence.RTOL
  if importlib.util.find_spec("onnxruntime"):  # The onnx extra: the run also leaves a checked ONNX graph.
    assert os.path.getsize(os.path.join(workdir, "deploy.onnx")) > 0 and result["onnx_relative_error"] < 1e-5
  # Train and deploy forms agree on the whole eval split (up to float ties).
  assert abs(result["deploy_accuracy"] - result["train_form_accuracy"]) <= 1 / 72
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(os.path.join(workdir, "tensorboard")))


def test_evaluation_counts_top1_and_top5_over_real_examples_only():
  logits = np.tile(np.arange(10, dtype=np.float32), (4, 1))  # Class 9 first, then 8, 7, 6, 5: the top five.
  batch = {"image": logits, "label": np.array([9, 5, 4, 7], np.int32), "mask": np.array([1, 1, 1, 0], np.float32)}
  step = jax.pmap(functools.partial(steps.eval_step, lambda variables, x, train: x), axis_name=steps.AXIS)
  sums = jax.tree.map(float, steps.unreplicate(step(steps.replicate({}), steps.shard(batch))))
  assert (sums["correct"], sums["correct_top5"], sums["count"]) == (1.0, 2.0, 3.0)


def test_the_deploy_line_reports_top5_beside_top1(trained_workdir):
  workdir, result = trained_workdir
  deploy = next(line for line in read_metrics(workdir) if line["split"] == "deploy")
  assert deploy["accuracy"] <= deploy["top5_accuracy"] == result["deploy_top5_accuracy"] <= 1.0
  assert all("top5_accuracy" in line for line in read_metrics(workdir) if line["split"] == "eval")


def test_deploy_params_are_saved_and_load_into_the_deploy_model(trained_workdir, fmnist_dir):
  workdir, result = trained_workdir
  params = checkpoints.load_tree(os.path.join(workdir, "deploy"))
  config = tiny_config(fmnist_dir)
  deploy = training.model_from_config(config, 10, deploy=True)
  expected = jax.eval_shape(deploy.init, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
  assert jax.tree.structure(params) == jax.tree.structure(expected)
  assert "rbr_reparam" in params["stage1_0"] and "rbr_dense" not in params["stage1_0"]


def test_a_run_keeps_its_newest_checkpoints(trained_workdir):
  workdir, _ = trained_workdir
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
  assert steps[-1] == 6 and 1 <= len(steps) <= 2


def test_checkpoints_keep_the_newest_two_and_the_best_by_accuracy(tmp_path):
  """The best (step 2) is neither of the newest two, so only the keep-best policy can keep it."""
  manager = checkpoints.checkpoint_manager(str(tmp_path), keep=2)
  state = {"w": np.zeros(3, np.float32)}
  for step, accuracy in zip(range(1, 6), (0.1, 0.9, 0.3, 0.2, 0.4)):
    checkpoints.save(manager, step, state, {"model": "RepVGG-A0"}, accuracy)
  assert sorted(manager.all_steps()) == [2, 4, 5]
  assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()) == [2, 4, 5]


def test_a_workdir_of_another_variant_is_refused(trained_workdir, fmnist_dir):
  workdir, _ = trained_workdir
  config = tiny_config(fmnist_dir, model="RepVGG-B0")
  with pytest.raises(training.ConfigError, match="RepVGG-A0"):
    training.train_and_evaluate(config, workdir)


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(fmnist_dir, tmp_path):
  workdir = str(tmp_path)
  training.train_and_evaluate(tiny_config(fmnist_dir, num_train_steps=2, eval_every_steps=100), workdir)
  with pytest.raises(FloatingPointError, match=r"non-finite at step \d+.*last good checkpoint \(step 2\)") as error:
    training.train_and_evaluate(tiny_config(fmnist_dir, learning_rate=1e38, warmup_epochs=0.0,
                                            checkpoint_every_steps=1, eval_every_steps=100), workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]
  assert "step 3" in str(error.value)  # The very first update blew up, and nothing after step 2 was saved.


@pytest.mark.slow  # The same property at the check itself: tests/test_equivalence.py (default precision fails).
def test_a_training_run_whose_check_ran_at_default_precision_fails(fmnist_dir, tmp_path, monkeypatch,
                                                                     accelerator_precision):
  """The run's own check, with its HIGHEST context removed, fails under the emulation: the emulation sees it.
  (The same run with the real check passes: trained_workdir above.)"""
  def at_default_precision(model, variables, images, **kwargs):
    return jax.jit(lambda v, x: model.apply(v, x, **kwargs))(variables, images)

  monkeypatch.setattr(equivalence, "logits_at_full_precision", at_default_precision)
  with pytest.raises(EquivalenceError):
    training.train_and_evaluate(tiny_config(fmnist_dir, num_train_steps=2, eval_every_steps=100), str(tmp_path))


# --------------------------------------------------------------------------- Damaged checkpoints, up-front checks.

def _damage(checkpoint_dir):
  """Truncates every data file of a checkpoint, as a full disk or an interrupted copy leaves them."""
  for root, _, files in os.walk(checkpoint_dir):
    for name in files:
      if not name.endswith((".json", "_METADATA", "_CHECKPOINT_METADATA")):
        with open(os.path.join(root, name), "r+b") as f:
          f.truncate(os.path.getsize(f.name) // 3)


def test_a_damaged_newest_checkpoint_is_set_aside_and_the_run_resumes_from_an_older_one(fmnist_dir, tmp_path, caplog):
  workdir = str(tmp_path)
  training.train_and_evaluate(tiny_config(fmnist_dir, num_train_steps=4, eval_every_steps=100), workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]  # keep_checkpoints = 2.
  _damage(os.path.join(workdir, "checkpoints", "4"))
  with caplog.at_level("INFO"):
    result = training.train_and_evaluate(tiny_config(fmnist_dir, num_train_steps=6, eval_every_steps=100), workdir)
  damaged = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
  assert len(damaged) == 1 and "checkpoints/4 is damaged" in damaged[0] and "\n" not in damaged[0]
  assert any("Resumed from step 2" in r.getMessage() for r in caplog.records)
  assert result["step"] == 6
  assert os.listdir(os.path.join(workdir, "checkpoints_damaged")) == ["4"]


def test_no_intact_checkpoint_is_one_clear_error(fmnist_dir, tmp_path):
  workdir = str(tmp_path)
  training.train_and_evaluate(tiny_config(fmnist_dir, num_train_steps=2, eval_every_steps=100), workdir)
  _damage(os.path.join(workdir, "checkpoints", "2"))
  with pytest.raises(checkpoints.CheckpointError, match="none of the checkpoints.*could be read.*Run again"):
    training.train_and_evaluate(tiny_config(fmnist_dir, num_train_steps=4), workdir)


def test_a_checkpoint_of_another_optimizer_is_refused_not_taken_for_damage(fmnist_dir, tmp_path, monkeypatch):
  workdir = str(tmp_path)
  training.train_and_evaluate(tiny_config(fmnist_dir, num_train_steps=2, eval_every_steps=100), workdir)
  monkeypatch.setattr(training, "create_optimizer", lambda config, learning_rate, weight_decay: optax.adam(learning_rate))
  with pytest.raises(training.ConfigError, match="state_layout"):
    training.train_and_evaluate(tiny_config(fmnist_dir, num_train_steps=4), workdir)
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["2"]


def test_an_unwritable_workdir_is_refused_before_anything_compiles(fmnist_dir, tmp_path, monkeypatch):
  (tmp_path / "a_file").write_text("")
  def too_far(*args, **kwargs):
    raise AssertionError("got past the up-front checks")

  monkeypatch.setattr(checkpoints, "checkpoint_manager", too_far)  # Before any checkpoint, state or compile.
  with pytest.raises(checkpoints.CheckpointError, match="cannot write to workdir"):
    training.train_and_evaluate(tiny_config(fmnist_dir), str(tmp_path / "a_file" / "run"))


def test_too_little_free_disk_for_a_checkpoint_is_refused(fmnist_dir, tmp_path, monkeypatch):
  monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda path: shutil_usage(total=10**9, used=10**9, free=10**5))
  with pytest.raises(checkpoints.CheckpointError, match=r"0\.1 MiB free but a checkpoint of this run takes"):
    training.train_and_evaluate(tiny_config(fmnist_dir), str(tmp_path))
  assert not os.path.exists(tmp_path / "checkpoints")


def test_a_disk_that_fills_during_a_save_stops_the_run_and_the_same_command_resumes(fmnist_dir, tmp_path,
                                                                                    monkeypatch, caplog):
  """Step 4's checkpoint write raises ENOSPC part-way: its arrays and metadata are on disk, the commit marks not."""
  workdir, config = str(tmp_path), tiny_config(fmnist_dir, num_train_steps=4, eval_every_steps=100)
  write_text = epath.Path.write_text

  def full_at_step_4(self, *args, **kwargs):
    if "/checkpoints/4." in str(self) and str(self).endswith("commit_success.txt"):  # orbax's last writes.
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
    return write_text(self, *args, **kwargs)

  monkeypatch.setattr(epath.Path, "write_text", full_at_step_4)
  with pytest.raises(checkpoints.CheckpointError, match=r"disk filled up while writing \S*/checkpoints/4 .*intact"):
    training.train_and_evaluate(config, workdir)
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["2"]  # Step 2 whole, nothing of step 4 left.
  monkeypatch.undo()
  with caplog.at_level("INFO"):
    assert training.train_and_evaluate(config, workdir)["step"] == 4
  assert any("Resumed from step 2" in r.getMessage() for r in caplog.records)
  assert not os.path.exists(os.path.join(workdir, checkpoints.DAMAGED))


def test_the_library_stands_alone_without_the_repositorys_configs(tmp_path):
  code = ("import sys, repvgg_jax as rv\nfrom repvgg_jax import training\n"
          "assert callable(rv.load_pytorch_state_dict) and callable(rv.to_pytorch_state_dict)\n"
          "assert 'configs' not in sys.modules and 'torch' not in sys.modules")
  result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ""})
  assert result.returncode == 0, result.stderr[-3000:]


# --------------------------------------------------------------------------- The command line, killed and resumed.

def _train_command(workdir, data_dir, **overrides):
  return [sys.executable, "train.py", "--config=configs/quickstart.py", f"--workdir={workdir}",
          *tiny_flags(data_dir, **overrides)]



LONG_RUN = dict(num_train_steps=60, eval_every_steps=1000, log_every_steps=1, checkpoint_every_steps=10)


def _deploy_params(workdir):
  return jax.tree.leaves(checkpoints.load_tree(os.path.join(workdir, "deploy")))


def _start_and_stop(command, workdir, at_step, send):
  """Starts a training command, sends ``send`` once its metrics reach ``at_step``; returns (status, stderr)."""
  process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline, metrics = time.time() + 300, os.path.join(workdir, "metrics.jsonl")
  while time.time() < deadline and process.poll() is None:
    if os.path.exists(metrics) and any(line["step"] >= at_step for line in read_metrics(workdir)):
      break
    time.sleep(0.05)
  assert process.poll() is None, "training ended before it could be stopped"
  process.send_signal(send)
  _, stderr = process.communicate(timeout=300)
  return process.returncode, stderr


@pytest.fixture(scope="module")
def uninterrupted_run(fmnist_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  result = subprocess.run(_train_command(workdir, fmnist_dir, **LONG_RUN), cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return _deploy_params(workdir)


def _resume_and_compare(command, workdir, uninterrupted):
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  resumed = [line for line in result.stderr.splitlines() if "Resumed from step" in line]
  assert resumed, result.stderr[-3000:]
  final = [line for line in read_metrics(workdir) if line["split"] == "deploy"]
  assert len(final) == 1 and final[0]["step"] == 60
  for got, expected in zip(_deploy_params(workdir), uninterrupted, strict=True):  # Bit-identical.
    np.testing.assert_array_equal(got, expected)
  return int(resumed[0].rsplit(" ", 1)[-1])


def test_sigterm_saves_the_step_reached_and_the_resumed_run_ends_bit_identical(fmnist_dir, tmp_path,
                                                                               uninterrupted_run):
  workdir = str(tmp_path / "run")
  command = _train_command(workdir, fmnist_dir, **LONG_RUN)
  status, stderr = _start_and_stop(command, workdir, at_step=13, send=signal.SIGTERM)
  assert status == 128 + signal.SIGTERM
  reached = max(line["step"] for line in read_metrics(workdir))
  assert 13 <= reached < 60
  checkpoint = os.path.join(os.path.abspath(workdir), "checkpoints", str(reached))
  assert f"Preempted at step {reached}; checkpoint saved to {checkpoint}" in stderr
  assert os.path.isdir(checkpoint) and "Traceback" not in stderr
  assert _resume_and_compare(command, workdir, uninterrupted_run) == reached


@pytest.mark.slow
def test_kill_9_then_the_same_command_resumes_and_ends_bit_identical(fmnist_dir, tmp_path, uninterrupted_run):
  workdir = str(tmp_path / "run")
  command = _train_command(workdir, fmnist_dir, **LONG_RUN)
  _start_and_stop(command, workdir, at_step=25, send=signal.SIGKILL)
  killed_at = max(line["step"] for line in read_metrics(workdir))
  resumed_step = _resume_and_compare(command, workdir, uninterrupted_run)
  assert resumed_step >= 20 and killed_at - resumed_step <= 10  # At most one checkpoint interval lost.


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz"),
                    reason="needs `apt-get install dataset-fashion-mnist`")
def test_shortened_quickstart_learns_real_fashion_mnist(tmp_path):
  workdir = str(tmp_path / "quickstart")
  result = subprocess.run([sys.executable, "train.py", "--config=configs/quickstart.py", f"--workdir={workdir}",
                           "--config.num_train_steps=150", "--config.eval_every_steps=1000"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  deploy = [line for line in read_metrics(workdir) if line["split"] == "deploy"]
  assert len(deploy) == 1 and deploy[0]["count"] == 10000
  assert deploy[0]["accuracy"] > 0.6  # 150 steps of 128 images: well above chance (0.1).


def test_an_image_that_does_not_decode_mid_run_is_named_and_the_checkpoints_are_kept(tmp_path):
  root = write_image_folder(tmp_path / "data", {"train": {c: ["RGB", "L", "RGBA"] * 2 for c in "ab"},
                                                "val": {c: ["RGB"] for c in "ab"}})
  config = tiny_config(root, dataset="folder", train_split="train", eval_split="val", image_size=16, batch_size=6,
                       num_train_steps=2, eval_every_steps=2, export_onnx=False)
  workdir = str(tmp_path / "run")
  training.train_and_evaluate(config, workdir)
  bad = tmp_path / "data" / "train" / "b" / "3.jpg"  # A JPEG's first bytes (the up-front check passes), no image.
  bad.write_bytes(input_pipeline.JPEG_MAGIC + bytes(200))
  config.num_train_steps = 6
  with pytest.raises(input_pipeline.DatasetError) as error:
    training.train_and_evaluate(config, workdir)
  assert f"{bad} does not decode" in str(error.value) and "Stopped at step 2 with its checkpoint kept" in str(
      error.value)
  assert checkpoints.checkpoint_manager(workdir).latest_step() == 2
