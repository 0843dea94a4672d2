"""Spec of the pure fusion functions: each piece, one block of each kind in float64, and bad input."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax import lax

import repvgg_jax as rv
from repvgg_jax import models, repvgg
from repvgg_jax.families import fuse_block, reparam
from repvgg_jax.reparam import fuse_bn, identity_kernel, pad_1x1_to_3x3
from tests.helpers import (FAMILY_TREES, FLOAT32_FOLD, float64_fold, leaf_errors, numpy_block, numpy_conv,
                           random_variables)

EXACT_F64 = 1e-12


def test_fuse_bn_equals_conv_then_batchnorm():
  rng = np.random.default_rng(0)
  x, k = rng.normal(size=(2, 5, 5, 3)), rng.normal(size=(3, 3, 3, 4))
  scale, bias, mean = rng.normal(size=(3, 4))
  var = rng.uniform(0.5, 2, size=4)
  eps = 1e-3
  expected = (numpy_conv(x, k, padding=1) - mean) / np.sqrt(var + eps) * scale + bias
  with jax.enable_x64(True):
    fk, fb = fuse_bn(k, scale, bias, mean, var, eps)
    np.testing.assert_allclose(numpy_conv(x, fk, padding=1) + np.asarray(fb), expected, atol=EXACT_F64, rtol=0)


def test_pad_1x1_to_3x3_puts_the_kernel_at_the_centre_tap():
  k1 = np.arange(1, 7, dtype=np.float32).reshape(1, 1, 2, 3)
  k3 = np.asarray(pad_1x1_to_3x3(k1))
  assert k3.shape == (3, 3, 2, 3)
  np.testing.assert_array_equal(k3[1, 1], k1[0, 0])
  assert np.count_nonzero(k3) == k1.size
  x = np.random.default_rng(0).normal(size=(1, 6, 6, 2))
  np.testing.assert_allclose(numpy_conv(x, k3, stride=2, padding=1), numpy_conv(x, k1, stride=2), atol=1e-6)


@pytest.mark.parametrize("channels,groups", [(4, 1), (6, 2), (8, 4), (8, 8)])
def test_identity_kernel_is_the_identity_map(channels, groups):
  k = np.asarray(identity_kernel(channels, groups))
  assert k.shape == (3, 3, channels // groups, channels)
  expected = np.zeros_like(k)
  for i in range(channels):
    expected[1, 1, i % (channels // groups), i] = 1
  np.testing.assert_array_equal(k, expected)
  x = np.random.default_rng(1).normal(size=(2, 5, 5, channels))
  np.testing.assert_allclose(numpy_conv(x, k, padding=1, groups=groups), x, atol=1e-6)


def test_identity_kernel_rejects_groups_that_do_not_divide():
  with pytest.raises(ValueError, match="do not divide"):
    identity_kernel(6, 4)


BLOCK_KINDS = {
    # name: (in_channels, features, stride, groups, use_se)
    "plain": (4, 8, 1, 1, False),
    "identity": (8, 8, 1, 1, False),
    "stride2": (8, 8, 2, 1, False),
    "groups2": (8, 8, 1, 2, False),
    "groups4": (8, 16, 1, 4, False),
    "groups4_identity": (8, 8, 1, 4, False),
    "se": (32, 32, 1, 1, True),
}


@pytest.mark.parametrize("kind", BLOCK_KINDS)
def test_block_fusion_is_exact_in_float64(kind):
  cin, cout, stride, groups, use_se = BLOCK_KINDS[kind]
  eps = models.BN_EPSILON
  train = repvgg.RepVGGBlock(cout, stride, groups, use_se, dtype=jnp.float64)
  plain = models.PlainBlock(cout, stride, groups, use_se, dtype=jnp.float64)
  with jax.enable_x64(True):
    x = jnp.asarray(np.random.default_rng(7).normal(size=(2, 9, 9, cin)))
    variables = random_variables(train, x.shape, seed=3, dtype=np.float64)
    assert ("rbr_identity" in variables["params"]) == (cin == cout and stride == 1)
    fused = fuse_block(variables["params"], variables["batch_stats"], eps)
    y_plain = np.asarray(plain.apply({"params": fused}, x))
    y_train = np.asarray(train.apply(variables, x, train=False))
  y_ref = numpy_block(x, variables["params"], variables["batch_stats"], stride, groups, eps, use_se)
  assert y_plain.dtype == np.float64
  assert np.abs(y_ref).max() > 0.1  # Not a degenerate all-zero comparison.
  np.testing.assert_allclose(y_plain, y_ref, atol=EXACT_F64, rtol=0)
  np.testing.assert_allclose(y_train, y_ref, atol=EXACT_F64, rtol=0)


def _lax_conv(x, kernel, stride, padding, groups):
  return lax.conv_general_dilated(x, kernel, (stride, stride), [(padding, padding)] * 2,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)


@settings(max_examples=25, deadline=None)
@given(groups=st.sampled_from([1, 2, 3, 4]), in_per_group=st.integers(1, 3), out_per_group=st.integers(1, 3),
       stride=st.sampled_from([1, 2]), size=st.integers(1, 7), eps=st.floats(1e-6, 1e-1),
       seed=st.integers(0, 2**16))
def test_fuse_block_matches_branchwise_lax_reference(groups, in_per_group, out_per_group, stride, size, eps, seed):
  """Property: for any block shape, fused conv == sum of separately computed branches (float64)."""
  cin, cout = groups * in_per_group, groups * out_per_group
  block = repvgg.RepVGGBlock(cout, stride, groups, norm=models.batch_norm(epsilon=eps))
  with jax.enable_x64(True):
    x = jnp.asarray(np.random.default_rng(seed).normal(size=(2, size, size, cin)))
    v = random_variables(block, x.shape, seed=seed, dtype=np.float64)
    p, s = v["params"], v["batch_stats"]

    def bn(y, bp, bs):
      return (y - bs["mean"]) / jnp.sqrt(bs["var"] + eps) * bp["scale"] + bp["bias"]

    expected = bn(_lax_conv(x, p["rbr_dense"]["conv"]["kernel"], stride, 1, groups), p["rbr_dense"]["bn"],
                  s["rbr_dense"]["bn"])
    expected += bn(_lax_conv(x, p["rbr_1x1"]["conv"]["kernel"], stride, 0, groups), p["rbr_1x1"]["bn"],
                   s["rbr_1x1"]["bn"])
    if cin == cout and stride == 1:
      expected += bn(x, p["rbr_identity"], s["rbr_identity"])
    fused = fuse_block(p, s, eps)["rbr_reparam"]
    got = _lax_conv(x, fused["kernel"], stride, 1, groups) + fused["bias"]
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-11, rtol=0)


def test_reparam_respects_a_non_default_bn_epsilon():
  block_eps = 1e-2
  net = repvgg.RepVGGBlock(4, norm=models.batch_norm(epsilon=block_eps), dtype=jnp.float64)
  with jax.enable_x64(True):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 5, 5, 4)))
    v = random_variables(net, x.shape, dtype=np.float64)
    y = net.apply(v, x)
    plain = models.PlainBlock(4, dtype=jnp.float64)
    right = plain.apply({"params": fuse_block(v["params"], v["batch_stats"], block_eps)}, x)
    wrong = plain.apply({"params": fuse_block(v["params"], v["batch_stats"])}, x)
  np.testing.assert_allclose(right, y, atol=EXACT_F64)
  assert np.abs(np.asarray(wrong) - np.asarray(y)).max() > 1e-4


# Bad input: a ValueError that names the offending path, never a traceback from inside JAX.

def _tiny_variables():
  model = rv.create_model("RepVGG-A0", num_classes=3, width_multiplier=(0.25, 0.25, 0.25, 0.25),
                              num_blocks=(2, 1, 1, 1))
  return random_variables(model, (1, 32, 32, 3))


def test_reparam_rejects_params_without_batch_stats():
  v = _tiny_variables()
  with pytest.raises(ValueError, match="stage0/rbr_dense"):
    reparam(v["params"], {})


def test_reparam_rejects_the_whole_variables_dict():
  v = _tiny_variables()
  with pytest.raises(ValueError, match="variables\\['params'\\]"):
    reparam(v, v["batch_stats"])


def test_reparam_rejects_stats_of_another_tree():
  v = _tiny_variables()
  stats = dict(v["batch_stats"])
  stats["stage9_0"] = stats.pop("stage1_1")
  with pytest.raises(ValueError, match="stage9_0"):
    reparam(v["params"], stats)


def test_reparam_rejects_a_block_with_a_missing_branch():
  v = _tiny_variables()
  params = dict(v["params"])
  params["stage1_1"] = {k: b for k, b in params["stage1_1"].items() if k != "rbr_1x1"}
  with pytest.raises(ValueError, match="stage1_1.*rbr_1x1"):
    reparam(params, v["batch_stats"])


def test_reparam_rejects_a_missing_running_statistic():
  v = _tiny_variables()
  stats = jax.tree.map(lambda a: a, v["batch_stats"])
  del stats["stage1_1"]["rbr_identity"]["var"]
  with pytest.raises(ValueError, match="stage1_1/rbr_identity/var"):
    reparam(v["params"], stats)


def test_reparam_rejects_statistics_of_the_wrong_shape():
  v = _tiny_variables()
  stats = jax.tree.map(lambda a: a, v["batch_stats"])
  stats["stage2_0"]["rbr_1x1"]["bn"]["mean"] = jnp.zeros(3)
  with pytest.raises(ValueError, match="stage2_0/rbr_1x1/bn/mean"):
    reparam(v["params"], stats)


def test_reparam_rejects_already_fused_params():
  v = _tiny_variables()
  fused = reparam(v["params"], v["batch_stats"])
  with pytest.raises(ValueError, match="already re-parameterized"):
    reparam(fused, {})


def test_reparam_does_not_mutate_its_input():
  v = _tiny_variables()
  before = jax.tree.map(np.array, v)
  reparam(v["params"], v["batch_stats"])
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, v), before)


# --------------------------------------------------------------------------- Accelerator precision.

@pytest.mark.parametrize("name,overrides", FAMILY_TREES, ids=[name for name, _ in FAMILY_TREES])
def test_every_fused_leaf_is_the_exact_fold_at_accelerator_precision(name, overrides, accelerator_precision):
  """jit(reparam) at the accelerator's default precision (emulated on the CPU: float32 operands of every
  convolution and dot, ``@``/``jnp.matmul``/``jnp.einsum`` included, rounded to bfloat16 unless at HIGHEST) gives
  the float64 fold to float32 rounding, leaf by leaf; RepViT's head fold at the default precision does not."""
  variables = random_variables(rv.create_model(name, num_classes=10, **overrides), (1, 32, 32, 3))
  exact = float64_fold(variables)
  fused = jax.jit(reparam)(variables["params"], variables["batch_stats"])
  errors = leaf_errors(fused, exact)
  worst = max(errors, key=errors.get)
  assert errors[worst] <= FLOAT32_FOLD, (worst, errors[worst])
  if name.startswith("RepViT") and jax.default_backend() != "gpu":  # TPU's one bf16 pass, or its emulation.
    at_default = jax.jit(reparam.__wrapped__)(variables["params"], variables["batch_stats"])
    errors = leaf_errors(at_default, exact)
    assert errors["['head']['bias']"] > 100 * FLOAT32_FOLD
