"""Spec of QARepVGG (Chu et al., "Make RepVGG Greater Again", cxxgtxy/QARepVGG ``QARepVGGBlockV2``): RepVGG's
shapes with the quantization-friendly block, folded exactly by the same pure reparam, BN after the sum included.
Network-level equality of both forms: tests/test_equivalence.py and tests/test_models.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import repvgg_jax as rv
from repvgg_jax import models, qarepvgg
from repvgg_jax.families import fuse_block
from repvgg_jax.reparam import fuse_bn_after_sum
from tests.helpers import numpy_bn, numpy_conv, random_variables

EXACT_F64 = 1e-10
QA_NAMES = [n for n in rv.list_models() if n.startswith("QARepVGG-")]


def _count_m(model) -> float:
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  return sum(leaf.size for leaf in jax.tree.leaves(shapes["params"])) / 1e6


def test_every_repvgg_shape_but_d2se_has_a_qarepvgg_variant():
  assert QA_NAMES == ["QA" + n for n in rv.list_models() if n.startswith("RepVGG-") and n != "RepVGG-D2se"]
  with pytest.raises(ValueError, match="Did you mean QARepVGG-B1g4"):
    rv.create_model("QARepVGG-B1G4x")


@pytest.mark.parametrize("name", QA_NAMES)
def test_deploy_form_is_repvggs_and_the_training_form_lacks_the_branch_bns(name):
  qa, plain = rv.create_model(name), rv.create_model(name[2:])
  assert _count_m(rv.create_model(name, deploy=True)) == _count_m(rv.create_model(name[2:], deploy=True))
  # Per block QARepVGG drops the 1x1 branch's BN and the identity BN and adds one BN after the sum.
  assert _count_m(qa) < _count_m(plain)


def test_block_layout_follows_qarepvggblockv2():
  variables = jax.eval_shape(lambda: rv.create_model("QARepVGG-A0").init(jax.random.key(0),
                                                                          jnp.zeros((1, 32, 32, 3))))
  block, stats = variables["params"]["stage1_1"], variables["batch_stats"]["stage1_1"]
  assert sorted(block) == ["bn", "rbr_1x1", "rbr_dense"]
  assert block["rbr_1x1"]["kernel"].shape == (1, 1, 48, 48) and "bias" not in block["rbr_1x1"]
  assert sorted(stats) == ["bn", "rbr_dense", "rbr_identity"]  # The identity's gain: with the statistics.
  assert "rbr_identity" not in variables["batch_stats"]["stage1_0"]  # Stride 2: no identity, as in RepVGG.


def _numpy_qa_block(x, p, s, stride, groups, eps):
  """ReLU(BN(BN3(conv3x3(x)) + conv1x1(x) + x)) in float64 numpy, each term computed on its own."""
  y = numpy_bn(numpy_conv(x, p["rbr_dense"]["conv"]["kernel"], stride, 1, groups), p["rbr_dense"]["bn"],
               s["rbr_dense"]["bn"], eps)
  y = y + numpy_conv(x, p["rbr_1x1"]["kernel"], stride, 0, groups)
  if "rbr_identity" in s:
    y = y + np.asarray(x, np.float64)
  return np.maximum(numpy_bn(y, p["bn"], s["bn"], eps), 0)


@settings(max_examples=25, deadline=None)
@given(groups=st.sampled_from([1, 2, 4]), stride=st.sampled_from([1, 2]), widen=st.booleans(),
       seed=st.integers(0, 2**16))
def test_fusion_matches_the_termwise_reference_in_float64(groups, stride, widen, seed):
  cin = 8
  cout = 2 * cin if widen else cin
  block = qarepvgg.QARepVGGBlock(cout, stride, groups, dtype=jnp.float64)
  plain = models.PlainBlock(cout, stride, groups, dtype=jnp.float64)
  with jax.enable_x64(True):
    x = np.random.default_rng(seed).normal(size=(2, 7, 7, cin))
    v = random_variables(block, x.shape, seed=seed, dtype=np.float64)
    assert ("rbr_identity" in v["batch_stats"]) == (not widen and stride == 1)
    fused = fuse_block(v["params"], v["batch_stats"])
    y_plain = np.asarray(plain.apply({"params": fused}, jnp.asarray(x)))
    y_train = np.asarray(block.apply(v, jnp.asarray(x)))
  y_ref = _numpy_qa_block(x, v["params"], v["batch_stats"], stride, groups, 1e-5)
  assert np.abs(y_ref).max() > 0.1
  np.testing.assert_allclose(y_train, y_ref, atol=EXACT_F64, rtol=0)
  np.testing.assert_allclose(y_plain, y_ref, atol=EXACT_F64, rtol=0)


def test_fuse_bn_after_sum_is_the_official_formula():
  """K' = K g/s, b' = beta + (b - mu) g/s with s = sqrt(var + eps) (cxxgtxy/QARepVGG _fuse_extra_bn_tensor)."""
  rng = np.random.default_rng(0)
  kernel, bias, g, beta, mu = rng.normal(size=(3, 3, 2, 4)), *rng.normal(size=(4, 4))
  var = rng.uniform(0.5, 2, size=4)
  with jax.enable_x64(True):
    k, b = fuse_bn_after_sum(jnp.asarray(kernel), jnp.asarray(bias), jnp.asarray(g), jnp.asarray(beta),
                             jnp.asarray(mu), jnp.asarray(var), eps=1e-5)
  t = g / np.sqrt(var + 1e-5)
  np.testing.assert_allclose(k, kernel * t, rtol=1e-14)
  np.testing.assert_allclose(b, beta + (bias - mu) * t, rtol=1e-14)


def test_qarepvgg_has_no_se_and_a_partial_tree_is_refused():
  with pytest.raises(ValueError, match="QARepVGG blocks have no SE"):
    rv.create_model("QARepVGG-A0", use_se=True).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  model = rv.create_model("QARepVGG-A0", num_classes=10, width_multiplier=(0.25, 0.25, 0.25, 0.5))
  v = random_variables(model, (1, 32, 32, 3))
  stats = dict(v["batch_stats"])
  stats["stage1_1"] = {k: s for k, s in stats["stage1_1"].items() if k != "bn"}
  with pytest.raises(ValueError, match="stage1_1/bn"):
    rv.reparam(v["params"], stats)


def test_official_state_dict_layout_round_trips_strictly_in_both_forms():
  """cxxgtxy/QARepVGG's keys: stageN.i.rbr_dense.conv/bn, rbr_1x1.weight (no BN), bn; deploy rbr_reparam."""
  pytest.importorskip("torch")
  small = dict(num_classes=10, width_multiplier=(0.25, 0.25, 0.25, 0.5))
  model = rv.create_model("QARepVGG-A0", **small)
  v = random_variables(model, (1, 32, 32, 3))
  state_dict = rv.to_pytorch_state_dict(v)
  assert {"stage1.1.rbr_dense.conv.weight", "stage1.1.rbr_dense.bn.running_var", "stage1.1.rbr_1x1.weight",
          "stage1.1.bn.weight", "stage1.1.bn.running_mean", "stage1.1.bn.num_batches_tracked",
          "linear.weight"} <= set(state_dict)
  assert not any("identity" in k for k in state_dict) and "stage1.1.rbr_1x1.bn.weight" not in state_dict
  assert tuple(state_dict["stage1.1.rbr_1x1.weight"].shape) == (16, 16, 1, 1)  # OIHW.
  back = rv.load_pytorch_state_dict(state_dict, "QARepVGG-A0", **small)
  jax.tree.map(np.testing.assert_array_equal, back, v)  # The identity gains come back as ones.
  misspelt = dict(state_dict)
  misspelt["stage1.1.rbr_1x1.wieght"] = misspelt.pop("stage1.1.rbr_1x1.weight")
  with pytest.raises(ValueError, match=r"missing keys: stage1\.1\.rbr_1x1\.weight.*unexpected keys"):
    rv.load_pytorch_state_dict(misspelt, "QARepVGG-A0", **small)
  plain = rv.reparam(v["params"], v["batch_stats"])
  deploy_sd = rv.to_pytorch_state_dict({"params": plain})
  assert "stage1.1.rbr_reparam.weight" in deploy_sd
  jax.tree.map(np.testing.assert_array_equal,
               rv.load_pytorch_state_dict(deploy_sd, "QARepVGG-A0", deploy=True, **small), {"params": plain})
  with pytest.raises(ValueError, match="timm has no QARepVGG"):
    rv.to_pytorch_state_dict(v, naming="timm")
