"""Spec of fine-tuning: ``config.init_from`` from every source, the classifier swap on a class-count change,
``init_exclude``, the strictness errors, and ``config.freeze`` (frozen leaves bit-identical after training)."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import repvgg_jax as rv
from repvgg_jax import checkpoints, cli, finetune, input_pipeline, run_layout, steps, training, weights
from repvgg_jax.families import reparam, to_numpy_state_dict
from tests.helpers import random_like, write_image_folder
from tests.test_training import tiny_config

TINY = {"num_blocks": (1, 1, 1, 1), "width_multiplier": (0.25, 0.25, 0.25, 0.5)}
CLASSES = ("ant", "bee", "cat")


def pretrained(model="RepVGG-A0", num_classes=10, channels=3, seed=1, **overrides):
  """Random training-time variables (random BN statistics too) of a model as ``tiny_config`` builds it."""
  shapes = jax.eval_shape(rv.create_model(model, num_classes=num_classes, **{**TINY, **overrides}).init,
                          jax.random.key(0), jnp.zeros((1, 32, 32, channels)))
  return random_like(dict(shapes), seed)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """Three classes, 12 training and 4 validation images each, JPEG and PNG, grey to RGBA, of several sizes."""
  root = tmp_path_factory.mktemp("folder")
  modes = ["RGB", "L", "RGBA", "P"]
  return write_image_folder(root, {"train": {name: modes * 3 for name in CLASSES},
                                   "val": {name: modes for name in CLASSES}})


def folder_config(root, **overrides):
  return tiny_config(root, dataset="folder", train_split="train", eval_split="val", image_size=16, batch_size=12,
                     num_train_steps=2, eval_every_steps=2, **overrides)


def write(kind: str, variables: dict, path) -> str:
  """``variables`` as a file of ``kind``: official .pth, timm .safetensors, or an orbax tree."""
  if kind == "official .pth":
    import torch  # pylint: disable=g-import-not-at-top
    torch.save(rv.to_pytorch_state_dict(variables), f"{path}.pth")
    return f"{path}.pth"
  if kind == "timm .safetensors":
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
    save_file(to_numpy_state_dict(variables, naming="timm"), f"{path}.safetensors")
    return f"{path}.safetensors"
  checkpoints.save_tree(str(path), variables)
  return str(path)


def initial_state(config, pretrained_variables=None):
  """The run's initial state as the loop builds it (random where nothing is loaded)."""
  source = input_pipeline.get_source(config.dataset, config.data_dir, (config.train_split, config.eval_split))
  model = training.model_from_config(config, source.num_classes)
  optimizer = steps.create_optimizer(config, optax.constant_schedule(0.1), optax.constant_schedule(1e-4))
  return steps.create_train_state(jax.random.key(config.seed), config, model,
                                  (config.image_size, config.image_size, source.channels), optimizer,
                                  pretrained=pretrained_variables)


def flat(state) -> dict:
  """{"params/stage0/rbr_dense/conv/kernel": array, "batch_stats/...": array}."""
  return {f"{c}/{name}": np.asarray(leaf) for c in ("params", "batch_stats")
          for name, leaf in finetune.named_leaves(getattr(state, c)).items()}


# --------------------------------------------------------------------------- init_from.

@pytest.mark.parametrize("kind", ["official .pth", "timm .safetensors", "orbax"])
def test_init_from_loads_every_leaf_and_reinitializes_a_classifier_of_another_class_count(kind, folder, tmp_path,
                                                                                          caplog):
  if kind.endswith(".pth"):
    pytest.importorskip("torch")
  variables = pretrained(num_classes=10)
  config = folder_config(folder, init_from=write(kind, variables, tmp_path / "weights"))
  with caplog.at_level("INFO"):
    state = initial_state(config, finetune.read_pretrained(config))
  loaded, fresh = flat(state), flat(initial_state(folder_config(folder)))
  expected = {f"{c}/{name}": leaf for c in variables for name, leaf in finetune.named_leaves(variables[c]).items()}
  for name, value in loaded.items():
    if name.startswith("params/linear/"):
      assert value.shape[-1] == len(CLASSES)
      np.testing.assert_array_equal(value, fresh[name])  # The run's own initialization.
    else:
      np.testing.assert_array_equal(value, expected[name], err_msg=name)
  assert any(f"Initialized from {config.init_from}: {len(loaded) - 2} of {len(loaded)} leaves loaded; "
             "re-initialized: linear/bias, linear/kernel." in r.getMessage() for r in caplog.records)


def test_the_moving_average_starts_at_the_loaded_weights(folder, tmp_path):
  config = folder_config(folder, ema_decay=0.9, init_from=write("orbax", pretrained(num_classes=3), tmp_path / "w"))
  state = initial_state(config, finetune.read_pretrained(config))
  jax.tree.map(np.testing.assert_array_equal, state.ema, {"params": state.params, "batch_stats": state.batch_stats})
  assert np.array_equal(state.params["linear"]["kernel"], pretrained(num_classes=3)["params"]["linear"]["kernel"])


def test_init_exclude_reinitializes_the_leaves_it_matches_and_keeps_the_rest(folder, tmp_path):
  variables = pretrained(num_classes=3)
  config = folder_config(folder, init_from=write("orbax", variables, tmp_path / "w"), init_exclude=("^stage4_",))
  loaded, fresh = flat(initial_state(config, finetune.read_pretrained(config))), flat(initial_state(folder_config(
      folder)))
  reinitialized = {name for name in loaded if name.split("/")[1].startswith("stage4_")}
  assert reinitialized and len(reinitialized) < len(loaded)
  for name in loaded:
    collection, path = name.split("/", 1)
    source = fresh[name] if name in reinitialized else finetune.named_leaves(variables[collection])[path]
    np.testing.assert_array_equal(loaded[name], source, err_msg=name)


def test_a_mobileone_in_apples_naming_loads(folder, tmp_path):
  pytest.importorskip("torch")
  overrides = {"num_blocks": (1, 1, 1, 1), "width_multiplier": (0.25, 0.25, 0.25, 0.25)}
  variables = pretrained("MobileOne-S0", num_classes=10, **overrides)
  config = folder_config(folder, model="MobileOne-S0", init_from=write("official .pth", variables, tmp_path / "s0"))
  config.model_overrides.update(overrides)
  state = initial_state(config, finetune.read_pretrained(config))
  np.testing.assert_array_equal(state.params["stage0"]["rbr_conv_0"]["conv"]["kernel"],
                                variables["params"]["stage0"]["rbr_conv_0"]["conv"]["kernel"])


def _deploy_file(tmp_path):
  variables = pretrained(num_classes=3)
  return write("orbax", reparam(variables["params"], variables["batch_stats"]), tmp_path / "deploy")


@pytest.mark.parametrize("make, message", [
    (lambda tmp: {"init_from": str(tmp / "nowhere.pth")}, "init_from={tmp}/nowhere.pth: no such file"),
    (lambda tmp: {"init_from": str(tmp / "nowhere")}, "init_from={tmp}/nowhere: no such folder"),
    (lambda tmp: {"init_from": (tmp / "random.safetensors").write_bytes(b"\0" * 64) and str(tmp / "random.safetensors")},
     "is not a safetensors"),
    (lambda tmp: {"init_from": _deploy_file(tmp)}, "holds the deploy (fused) form, which has no branches left"),
    (lambda tmp: {"init_from": write("orbax", pretrained(width_multiplier=(0.5, 0.5, 0.5, 1.0)), tmp / "wide")},
     "holds no RepVGG-A0 weights"),
    (lambda tmp: {"init_from": write("orbax", pretrained(channels=1), tmp / "grey")},
     "the weights are not this model's: params/stage0/rbr_1x1/conv/kernel has shape (1, 1, 1, 16) there, "
     "(1, 1, 3, 16) here"),
    (lambda tmp: {"init_from": write("orbax", pretrained(), tmp / "w"), "init_exclude": ("linaer",)},
     "init_exclude: 'linaer' matches no parameter path; paths look like"),
    (lambda tmp: {"init_exclude": ("[",)}, "init_exclude: '[' is not a regular expression"),
    (lambda tmp: {"init_exclude": ("linear",)}, "init_exclude names weights not to load, but init_from loads none"),
    (lambda tmp: {"freeze": ("stgae0",)}, "freeze: 'stgae0' matches no parameter path"),
    (lambda tmp: {"freeze": (".",)}, "freeze=['.'] matches every parameter; nothing would train"),
])
def test_bad_initial_weights_or_patterns_are_one_error_before_training(make, message, folder, tmp_path):
  config = folder_config(folder, **make(tmp_path))
  workdir = tmp_path / "run"
  with pytest.raises((cli.UserError, training.ConfigError)) as error:
    training.train_and_evaluate(config, str(workdir))
  assert message.format(tmp=tmp_path) in str(error.value)
  assert not (workdir / run_layout.CHECKPOINTS).exists() or not list((workdir / run_layout.CHECKPOINTS).iterdir())


# --------------------------------------------------------------------------- freeze.

def test_frozen_leaves_get_no_step_no_weight_decay_and_no_optimizer_state():
  config = tiny_config("", freeze=("^stem/",), weight_decay=0.1)
  params = {"stem": {"kernel": jnp.ones((3, 3))}, "linear": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}}
  optimizer = steps.create_optimizer(config, optax.constant_schedule(0.5), optax.constant_schedule(0.1))
  opt_state = optimizer.init(params)
  updates, _ = optimizer.update(jax.tree.map(jnp.ones_like, params), opt_state, params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(new["stem"]["kernel"], params["stem"]["kernel"])
  assert not np.allclose(new["linear"]["kernel"], params["linear"]["kernel"])
  momentum_sizes = sorted(np.size(x) for x in jax.tree.leaves(opt_state) if np.ndim(x))
  assert momentum_sizes == [2, 6]  # linear's bias and kernel; none for the frozen stem.


@pytest.fixture(scope="module")
def pretrained_run(fmnist_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("pretrained"))
  training.train_and_evaluate(tiny_config(fmnist_dir, num_train_steps=2, export_onnx=False), workdir)
  return workdir


def _run_weights(workdir) -> dict:
  variables = weights.load_workdir("RepVGG-A0", workdir, **TINY)
  return {f"{c}/{name}": np.asarray(leaf) for c in variables for name, leaf in finetune.named_leaves(variables[c]).items()}


@pytest.mark.parametrize("freeze, optimizer, ema_decay", [
    (("^(?!linear/)",), "adamw", 0.5),  # A linear probe, evaluated on its moving average.
    (("^stage0/", "^stage1_"), "sgd", 0.0),  # The first layers frozen, the rest fine-tuned.
])
def test_frozen_leaves_and_their_batchnorm_statistics_are_bit_identical_after_training(
    freeze, optimizer, ema_decay, pretrained_run, fmnist_dir, tmp_path, caplog):
  config = tiny_config(fmnist_dir, init_from=pretrained_run, freeze=freeze, optimizer=optimizer, ema_decay=ema_decay,
                       num_train_steps=3, export_onnx=False)
  with caplog.at_level("INFO"):
    training.train_and_evaluate(config, str(tmp_path))
  before, after = _run_weights(pretrained_run), _run_weights(str(tmp_path))
  assert any(f"Initialized from {pretrained_run}: {len(before)} of {len(before)} leaves loaded; re-initialized: "
             "none." in r.getMessage() for r in caplog.records)
  frozen = {name for name in before if any(re.search(p, name.split("/", 1)[1]) for p in freeze)}
  assert frozen and frozen != set(before)
  for name in before:
    if name in frozen:
      np.testing.assert_array_equal(after[name], before[name], err_msg=name)
  changed = {name for name in before if not np.array_equal(after[name], before[name])}
  assert changed == set(before) - frozen  # Every trained leaf moved (BN statistics of trained layers too).


def test_a_resumed_run_ignores_init_from_and_says_so(fmnist_dir, tmp_path, caplog):
  training.train_and_evaluate(tiny_config(fmnist_dir, num_train_steps=2, export_onnx=False), str(tmp_path))
  config = tiny_config(fmnist_dir, num_train_steps=4, export_onnx=False, init_from=str(tmp_path / "gone.pth"))
  with caplog.at_level("INFO"):
    result = training.train_and_evaluate(config, str(tmp_path))
  assert result["step"] == 4
  assert any(f"Resumed from step 2; init_from={tmp_path}/gone.pth is ignored" in r.getMessage()
             for r in caplog.records)


# --------------------------------------------------------------------------- Evaluation without training.

def test_weights_evaluate_without_training_as_the_run_that_made_them_did(pretrained_run, fmnist_dir, tmp_path):
  from repvgg_jax import evaluate  # pylint: disable=g-import-not-at-top
  config = tiny_config(fmnist_dir)
  deploy_line = [json.loads(line) for line in open(os.path.join(pretrained_run, "metrics.jsonl"))][-1]
  from_workdir = evaluate.evaluate_weights(config, pretrained_run)
  assert from_workdir["deploy"]["accuracy"] == deploy_line["accuracy"]
  assert from_workdir["deploy"]["top5_accuracy"] == deploy_line["top5_accuracy"]
  assert from_workdir["train_form"]["accuracy"] == deploy_line["train_form_accuracy"]
  assert from_workdir["max_relative_error"] < 1e-4
  deploy = evaluate.evaluate_weights(config, os.path.join(pretrained_run, "deploy"))  # The fused form alone.
  assert deploy["train_form"] is None and deploy["deploy"]["accuracy"] == deploy_line["accuracy"]
