"""Spec of MobileOne (Vasu et al., CVPR 2023): the variants' sizes, exact fusion of every block kind through the
same pure reparam as RepVGG's, train form == deploy form for every variant, and timm's weights in both forms."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import repvgg_jax as rv
from repvgg_jax import mobileone, models
from repvgg_jax.families import fuse_block
from tests import wellposed
from tests.helpers import MOBILEONE_SCALES, numpy_bn, numpy_conv, random_variables, randomize_torch_batchnorms

NAMES = [f"MobileOne-S{i}" for i in range(5)]
# (train-time, deploy) parameters in millions, 1000 classes: timm 1.0.31's mobileone_s* before and after
# reparameterize_model (the paper rounds the deploy ones: 2.1, 4.8, 7.8, 10.1, 14.8).
PARAM_COUNTS_M = {"MobileOne-S0": (5.293, 2.079), "MobileOne-S1": (4.825, 4.765), "MobileOne-S2": (7.885, 7.808),
                  "MobileOne-S3": (10.171, 10.078), "MobileOne-S4": (14.951, 14.838)}
EXACT_F64 = 1e-10


def _count_m(model) -> float:
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  return sum(leaf.size for leaf in jax.tree.leaves(shapes["params"])) / 1e6


def test_list_models_has_the_five_mobileones_after_repvgg():
  names = rv.list_models()
  assert names[names.index("RepVGG-D2se") + 1:][:5] == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_parameter_counts_match_timm(name):
  train_m, deploy_m = PARAM_COUNTS_M[name]
  assert _count_m(rv.create_model(name)) == pytest.approx(train_m, abs=0.001)
  assert _count_m(rv.create_model(name, deploy=True)) == pytest.approx(deploy_m, abs=0.001)


def test_layout_follows_the_paper():
  params = jax.eval_shape(lambda: rv.create_model("MobileOne-S0").init(jax.random.key(0),
                                                                       jnp.zeros((1, 64, 64, 3))))["params"]
  assert params["stage0"]["rbr_conv_0"]["conv"]["kernel"].shape == (3, 3, 3, 48) and "rbr_conv_1" not in params["stage0"]
  depthwise, pointwise = params["stage1_0"], params["stage1_1"]
  assert sorted(k for k in depthwise if k.startswith("rbr_conv_")) == [f"rbr_conv_{i}" for i in range(4)]
  assert depthwise["rbr_conv_0"]["conv"]["kernel"].shape == (3, 3, 1, 48)  # depthwise
  assert depthwise["rbr_scale"]["conv"]["kernel"].shape == (1, 1, 1, 48)
  assert "rbr_skip" not in depthwise  # stride 2
  # Stage 1 is 64 * 0.75 = 48 wide, as the stem: its pointwise blocks keep the width and have the identity.
  assert pointwise["rbr_conv_0"]["conv"]["kernel"].shape == (1, 1, 48, 48) and "rbr_scale" not in pointwise
  assert "rbr_skip" in pointwise and "rbr_skip" in params["stage1_2"]
  assert params["stage2_1"]["rbr_conv_0"]["conv"]["kernel"].shape == (1, 1, 48, 128)
  assert "rbr_skip" not in params["stage2_1"]
  assert params["linear"]["kernel"].shape == (1024, 1000)
  s4 = jax.eval_shape(lambda: rv.create_model("MobileOne-S4").init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  with_se = sorted(k for k, v in s4["params"].items() if isinstance(v, dict) and "se" in v)
  assert with_se == sorted([f"stage3_{j}" for j in range(10, 20)] + ["stage4_0", "stage4_1"])


def _numpy_block(x, p, s, stride, groups, eps, use_se):
  """The training-time MobileOne block in eval mode, branch by branch, in float64 numpy."""
  convs = sorted((k for k in p if k.startswith("rbr_conv_")), key=lambda k: int(k.split("_")[-1]))
  y = 0
  for name in convs + [k for k in ("rbr_scale",) if k in p]:
    kernel = p[name]["conv"]["kernel"]
    y = y + numpy_bn(numpy_conv(x, kernel, stride, kernel.shape[0] // 2, groups), p[name]["bn"], s[name]["bn"], eps)
  if "rbr_skip" in p:
    y = y + numpy_bn(np.asarray(x, np.float64), p["rbr_skip"], s["rbr_skip"], eps)
  if use_se:
    se = {k: {n: np.asarray(a, np.float64) for n, a in v.items()} for k, v in p["se"].items()}
    g = np.maximum(y.mean(axis=(1, 2)) @ se["down"]["kernel"] + se["down"]["bias"], 0)
    y = y / (1 + np.exp(-(g @ se["up"]["kernel"] + se["up"]["bias"])))[:, None, None, :]
  return np.maximum(y, 0)


BLOCK_KINDS = {  # (channels in, out, kernel, stride, groups, branches, SE)
    "depthwise k=1": (32, 32, 3, 1, 32, 1, False), "depthwise k=4": (32, 32, 3, 1, 32, 4, False),
    "depthwise stride 2": (32, 32, 3, 2, 32, 4, False), "pointwise k=1": (32, 32, 1, 1, 1, 1, False),
    "pointwise k=4, widening": (16, 32, 1, 1, 1, 4, False), "depthwise with SE": (32, 32, 3, 1, 32, 1, True),
    "pointwise with SE": (32, 32, 1, 1, 1, 1, True)}


@pytest.mark.parametrize("kind", BLOCK_KINDS)
def test_every_block_kind_fuses_exactly_in_float64(kind):
  cin, cout, k, stride, groups, branches, use_se = BLOCK_KINDS[kind]
  block = mobileone.MobileOneBlock(cout, k, stride, groups, branches, use_se, dtype=jnp.float64)
  plain = models.PlainBlock(cout, stride, groups, use_se, dtype=jnp.float64, kernel_size=k)
  with jax.enable_x64(True):
    x = np.random.default_rng(1).normal(size=(2, 7, 7, cin))
    v = random_variables(block, x.shape, dtype=np.float64)
    fused = fuse_block(v["params"], v["batch_stats"])
    assert fused["rbr_reparam"]["kernel"].shape == (k, k, cin // groups, cout)
    y_plain = np.asarray(plain.apply({"params": fused}, jnp.asarray(x)))
    y_train = np.asarray(block.apply(v, jnp.asarray(x)))
  y_ref = _numpy_block(x, v["params"], v["batch_stats"], stride, groups, 1e-5, use_se)
  assert np.abs(y_ref).max() > 0.1
  np.testing.assert_allclose(y_train, y_ref, atol=EXACT_F64, rtol=0)
  np.testing.assert_allclose(y_plain, y_ref, atol=EXACT_F64, rtol=0)


@settings(max_examples=30, deadline=None)
@given(branches=st.integers(1, 4), kernel=st.sampled_from([1, 3, 5]), groups=st.sampled_from([1, 2, "depthwise"]),
       stride=st.sampled_from([1, 2]), widen=st.booleans(), seed=st.integers(0, 2**16))
def test_fuse_block_matches_the_branchwise_reference_for_any_shape(branches, kernel, groups, stride, widen, seed):
  """Property: any k, kernel size, groups (depthwise included) and stride: fused == sum of branches (float64)."""
  cin = 4
  cout = cin if groups == "depthwise" or not widen else 2 * cin
  groups = cin if groups == "depthwise" else groups
  block = mobileone.MobileOneBlock(cout, kernel, stride, groups, branches, dtype=jnp.float64)
  with jax.enable_x64(True):
    x = np.random.default_rng(seed).normal(size=(1, 6, 6, cin))
    v = random_variables(block, x.shape, seed=seed, dtype=np.float64)
    fused = fuse_block(v["params"], v["batch_stats"])["rbr_reparam"]
  got = np.maximum(numpy_conv(x, fused["kernel"], stride, kernel // 2, groups) + np.asarray(fused["bias"]), 0)
  np.testing.assert_allclose(got, _numpy_block(x, v["params"], v["batch_stats"], stride, groups, 1e-5, False),
                             atol=EXACT_F64, rtol=0)


# Every variant's two forms on well-posed float64 networks: tests/test_equivalence.py.


# --------------------------------------------------------------------------- timm's and apple's weights.

def _timm_model(index, seed=0):
  """timm's mobileone_s{index} in eval mode, random BN affine parameters (scales in [0.2, 0.5]) and statistics."""
  torch, timm = pytest.importorskip("torch"), pytest.importorskip("timm")
  torch.manual_seed(seed)
  return randomize_torch_batchnorms(timm.create_model(f"mobileone_s{index}", pretrained=False, num_classes=10),
                                    seed, scale_range=MOBILEONE_SCALES)


# S4: SE blocks; S0 (k = 4 branches, whose key mapping the apple-naming test also checks) is slow to compile.
@pytest.mark.parametrize("index", [pytest.param(0, marks=pytest.mark.slow), 4])
def test_timm_weights_give_timms_logits_in_both_forms(index):
  """On well-posed float64 networks (tests/wellposed.py); swapped kernel axes, a zeroed stem or a wrong BN
  epsilon on our side fail the same comparison."""
  torch, timm = pytest.importorskip("torch"), pytest.importorskip("timm")
  torch.manual_seed(0)
  name = f"MobileOne-S{index}"
  model = wellposed.well_posed_torch(timm.create_model(f"mobileone_s{index}", pretrained=False, num_classes=10),
                                     (3, 32, 32))
  variables = rv.load_pytorch_state_dict(model.state_dict(), name)
  wellposed.assert_matches_torch_in_both_forms(model, name, variables, wellposed.images((4, 32, 32, 3), seed=1), 10)


def test_apple_naming_round_trips_strictly_and_timm_loads_ours():
  pytest.importorskip("torch")
  name, model = "MobileOne-S0", _timm_model(0, seed=3)
  variables = rv.load_pytorch_state_dict(model.state_dict(), name)
  apple = rv.to_pytorch_state_dict(variables)
  # apple/ml-mobileone's names: stage{s}.{j}.rbr_conv.{i}.conv/bn, rbr_scale, rbr_skip, se.reduce/expand, linear.
  assert {"stage0.rbr_conv.0.conv.weight", "stage1.0.rbr_conv.3.bn.running_var", "stage1.0.rbr_scale.conv.weight",
          "stage1.1.rbr_skip.running_mean", "linear.weight"} <= set(apple)
  chex.assert_trees_all_equal(rv.load_pytorch_state_dict(apple, name), variables)
  misspelt = dict(apple)
  misspelt["stage1.0.rbr_scale.conv.wieght"] = misspelt.pop("stage1.0.rbr_scale.conv.weight")
  with pytest.raises(ValueError, match=r"missing keys: stage1\.0\.rbr_scale\.conv\.weight.*unexpected keys"):
    rv.load_pytorch_state_dict(misspelt, name)
  target = _timm_model(0, seed=4)
  target.load_state_dict(rv.to_pytorch_state_dict(variables, naming="timm"), strict=True)
  s4 = _timm_model(4)
  deploy_apple = rv.to_pytorch_state_dict({"params": rv.reparam(**rv.load_pytorch_state_dict(s4.state_dict(),
                                                                                             "MobileOne-S4"))})
  assert "stage3.19.se.reduce.weight" in deploy_apple and "stage0.reparam_conv.weight" in deploy_apple
