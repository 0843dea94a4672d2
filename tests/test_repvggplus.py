"""Spec of RepVGGplus-L2pse (DingXiaoH/RepVGG, repvggplus.py): RepVGG blocks with SE after the ReLU, stage3 in two
halves, auxiliary heads in the training form only; both forms through the same pure reparam."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import repvgg_jax as rv
from repvgg_jax import equivalence, export
from tests import wellposed
from tests.helpers import random_variables
from tests.precision_emulation import emulated_accelerator_precision

NAME = "RepVGGplus-L2pse"
SHALLOW = dict(num_blocks=(1, 1, 2, 1))  # L2pse's widths, one block per stage (stage3: one per half).
SMALL = dict(SHALLOW, width_multiplier=(0.25, 0.25, 0.25, 0.5))


def _shapes(model, size=32):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))


def _independent_count(classes: int) -> tuple[int, int]:
  """Parameters (training form, deploy form) from the layout rules alone: per block a 3x3 and a 1x1 conv with
  their BNs, an identity BN where in == out and stride 1, post SE C -> C/4 -> C with biases; deploy: one 3x3
  conv with bias and the SE; aux heads: 3x3 conv + BN at the stage's width and a Linear."""
  layers = [(3, 64, 2)] + [(64, 160, 2)] + [(160, 160, 1)] * 7 + [(160, 320, 2)] + [(320, 320, 1)] * 13
  layers += [(320, 640, 2)] + [(640, 640, 1)] * 23 + [(640, 2560, 2)]
  se = lambda c: 2 * c * (c // 4) + c // 4 + c
  train = sum(9 * i * o + 2 * o + i * o + 2 * o + (2 * o if i == o and s == 1 else 0) + se(o) for i, o, s in layers)
  deploy = sum(9 * i * o + o + se(o) for i, o, _ in layers)
  head = 2560 * classes + classes
  aux = sum(9 * c * c + 2 * c + c * classes + classes for c in (160, 320, 640))
  return train + head + aux, deploy + head


def test_layout_follows_the_official_repvggplus():
  """Depths (8, 14, 24, 1), widths 160, 320, 640, 2560 (stem 64), stage3 split 12 + 12, post SE at C/4."""
  params = _shapes(rv.create_model(NAME))["params"]
  for stage, depth in [("stage1", 8), ("stage2", 14), ("stage3_first", 12), ("stage3_second", 12), ("stage4", 1)]:
    assert sorted(k for k in params if k.startswith(stage + "_") and not k.endswith("_aux")) == sorted(
        f"{stage}_{i}" for i in range(depth))
  assert params["stage0"]["rbr_dense"]["conv"]["kernel"].shape == (3, 3, 3, 64)
  assert params["stage3_first_0"]["post_se"]["down"]["kernel"].shape == (640, 160)
  assert params["stage4_0"]["rbr_dense"]["conv"]["kernel"].shape == (3, 3, 640, 2560)
  assert "rbr_identity" in params["stage3_second_0"] and "rbr_identity" not in params["stage3_first_0"]
  assert params["stage3_first_aux"]["downsample"]["conv"]["kernel"].shape == (3, 3, 640, 640)
  assert params["stage1_aux"]["fc"]["kernel"].shape == (160, 1000)
  deploy = _shapes(rv.create_model(NAME, deploy=True))["params"]
  assert not any(k.endswith("_aux") for k in deploy) and "post_se" in deploy["stage2_13"]
  count = lambda tree: sum(leaf.size for leaf in jax.tree.leaves(tree))
  assert (count(params), count(deploy)) == _independent_count(1000)
  with pytest.raises(ValueError, match="stage3 into two halves"):
    rv.create_model(NAME, num_blocks=(1, 1, 3, 1))


def test_both_forms_are_the_same_function_in_float64():
  reference, got, mutated = wellposed.train_vs_deploy(NAME, **SMALL)
  wellposed.assert_equal_functions(got, reference)
  for logits in mutated.values():
    wellposed.assert_caught(logits, reference)


def test_both_forms_and_onnx_agree_at_highest_precision_under_the_accelerator_emulation():
  """L2pse's widths at one block per stage, float32 as trained; then onnxruntime against the deploy form."""
  model, deploy = rv.create_model(NAME, num_classes=10, **SHALLOW), rv.create_model(NAME, num_classes=10,
                                                                                     deploy=True, **SHALLOW)
  variables = wellposed.well_posed_variables(model, (32, 32, 3), dtype=np.float32)
  x = wellposed.images((4, 32, 32, 3), 3).astype(np.float32)
  plain = rv.reparam(variables["params"], variables["batch_stats"])
  with emulated_accelerator_precision():
    assert equivalence.check_equivalence(model, variables, deploy, plain, x) < equivalence.RTOL
  if importlib.util.find_spec("onnxruntime"):  # The ONNX graph of the deploy form, post SE included.
    assert export.check_onnx(export.to_onnx(deploy, plain), deploy, plain, x) < equivalence.RTOL


def test_return_aux_gives_the_three_auxiliary_logits_in_the_training_form_only():
  model = rv.create_model(NAME, num_classes=10, **SMALL)
  variables = random_variables(model, (1, 32, 32, 3))
  x = jnp.ones((2, 32, 32, 3))
  logits, aux = model.apply(variables, x, return_aux=True)
  assert sorted(aux) == ["stage1_aux", "stage2_aux", "stage3_first_aux"]
  assert all(a.shape == (2, 10) for a in aux.values())
  np.testing.assert_array_equal(logits, model.apply(variables, x))  # The main logits, with or without aux.
  deploy = rv.create_model(NAME, num_classes=10, deploy=True, **SMALL)
  with pytest.raises(ValueError, match="return_aux=True needs the training form"):
    deploy.apply({"params": rv.reparam(variables["params"], variables["batch_stats"])}, x, return_aux=True)
  with pytest.raises(ValueError, match="return_aux=True needs the training form"):
    rv.create_model("RepVGG-A0").apply(random_variables(rv.create_model("RepVGG-A0"), (1, 32, 32, 3)), x,
                                       return_aux=True)


def test_official_state_dict_layout_round_trips_strictly_in_both_forms():
  """DingXiaoH/RepVGG's keys: stage0.*, stageN.blocks.i.*, stage3_first/second.blocks.i.*, post_se.down/up (1x1
  convs), stage1_aux.0.conv/bn and stage1_aux.3 (the Linear); deploy: rbr_reparam, no aux heads."""
  model = rv.create_model(NAME, num_classes=10, **SMALL)
  v = random_variables(model, (1, 32, 32, 3))
  state_dict = rv.to_numpy_state_dict(v)
  expected_shapes = {"stage0.rbr_dense.conv.weight": (16, 3, 3, 3), "stage0.post_se.down.weight": (4, 16, 1, 1),
                     "stage1.blocks.0.rbr_1x1.bn.running_var": (16,), "stage3_first.blocks.0.post_se.up.bias": (64,),
                     "stage3_second.blocks.0.rbr_identity.weight": (64,), "stage4.blocks.0.rbr_dense.bn.weight": (256,),
                     "stage1_aux.0.conv.weight": (16, 16, 3, 3), "stage2_aux.0.bn.num_batches_tracked": (),
                     "stage3_first_aux.3.weight": (10, 64), "stage3_first_aux.3.bias": (10,), "linear.weight": (10, 256)}
  assert {k: state_dict[k].shape for k in expected_shapes} == expected_shapes
  back = rv.load_pytorch_state_dict(state_dict, NAME, **SMALL)
  jax.tree.map(np.testing.assert_array_equal, back, v)
  misspelt = dict(state_dict)
  misspelt["stage1_aux.3.wieght"] = misspelt.pop("stage1_aux.3.weight")
  with pytest.raises(ValueError, match=r"missing keys: stage1_aux\.3\.weight.*unexpected keys"):
    rv.load_pytorch_state_dict(misspelt, NAME, **SMALL)
  plain = rv.reparam(v["params"], v["batch_stats"])
  deploy_sd = rv.to_numpy_state_dict({"params": plain})
  assert "stage3_second.blocks.0.rbr_reparam.weight" in deploy_sd and not any("aux" in k for k in deploy_sd)
  jax.tree.map(np.testing.assert_array_equal,
               rv.load_pytorch_state_dict(deploy_sd, NAME, deploy=True, **SMALL), {"params": plain})
  with pytest.raises(ValueError, match="timm has no RepVGGplus"):
    rv.to_numpy_state_dict(v, naming="timm")


def test_training_adds_the_auxiliary_losses_at_weight_0_1():
  """The aux heads' biases get gradient only from their own loss: their update scales with its weight."""
  import functools  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from configs import quickstart  # pylint: disable=g-import-not-at-top
  from repvgg_jax import steps, training  # pylint: disable=g-import-not-at-top
  config = quickstart.get_config()
  config.model, config.model_overrides.num_blocks = NAME, SMALL["num_blocks"]
  model = training.model_from_config(config, num_classes=10)
  learning_rate = optax.constant_schedule(0.1)
  state = steps.create_train_state(jax.random.key(0), config, model, (16, 16, 1),
                                   steps.create_optimizer(config, learning_rate, optax.constant_schedule(0.0)))
  rng = np.random.default_rng(0)
  batch = steps.shard({"image": rng.normal(size=(8, 16, 16, 1)).astype(np.float32),
                       "label": rng.integers(0, 10, size=8)})

  def aux_bias_update(weight):
    step = jax.pmap(functools.partial(steps.train_step, learning_rate=learning_rate, num_classes=10,
                                      aux_loss_weight=weight), axis_name=steps.AXIS)
    new, metrics = step(steps.replicate(state), batch)
    return np.asarray(new.params["stage2_aux"]["fc"]["bias"][0] - state.params["stage2_aux"]["fc"]["bias"]), metrics

  (tenth, m1), (fifth, m2) = (aux_bias_update(w) for w in (steps.AUX_LOSS_WEIGHT, 0.2))
  assert steps.AUX_LOSS_WEIGHT == 0.1 and np.abs(tenth).max() > 1e-4
  np.testing.assert_allclose(fifth, 2 * tenth, rtol=1e-4, atol=1e-7)
  np.testing.assert_array_equal(m1["loss"], m2["loss"])  # The reported loss is the main head's alone.


@pytest.mark.slow  # The loop's aux losses: the step test above; the ONNX graph: the emulation test.
def test_a_run_trains_with_the_aux_heads_and_deploys_without_them(fmnist_dir, tmp_path):
  from tests.test_training import tiny_config  # pylint: disable=g-import-not-at-top
  from repvgg_jax import checkpoints, training  # pylint: disable=g-import-not-at-top
  config = tiny_config(fmnist_dir, model=NAME, num_train_steps=2, eval_every_steps=100)
  config.model_overrides.num_blocks = SMALL["num_blocks"]
  result = training.train_and_evaluate(config, str(tmp_path))
  assert result["step"] == 2 and result["max_relative_error"] < equivalence.RTOL
  assert result["onnx_relative_error"] < equivalence.RTOL  # deploy.onnx: post SE included, checked in onnxruntime.
  deploy = checkpoints.load_tree(str(tmp_path / "deploy"))
  assert "post_se" in deploy["stage3_second_0"] and not any(k.endswith("_aux") for k in deploy)
