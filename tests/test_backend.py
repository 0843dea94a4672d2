"""Spec of the backend module: the XLA:CPU flag (the user's own choice always wins), and the CPU-only paths,
which compute exactly the plain convolution and mean and are taken only on the CPU."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import repvgg_jax as rv
from repvgg_jax import backend
from tests.helpers import numpy_conv, stablehlo_op_counts

NEW_JAXLIB = (0, 10)


def test_flag_is_appended_to_the_users_other_flags():
  environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  assert backend.prefer_eigen_convolutions(environ, NEW_JAXLIB)
  assert environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {backend.FLAG}"


def test_flag_is_set_when_xla_flags_is_unset():
  environ = {}
  assert backend.prefer_eigen_convolutions(environ, NEW_JAXLIB)
  assert environ == {"XLA_FLAGS": backend.FLAG}


@pytest.mark.parametrize("environ", [
    {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=+INDIVIDUAL_CONVOLUTION"},
    {"XLA_FLAGS": "", backend.OPT_OUT: "1"},
])
def test_users_own_setting_or_opt_out_leaves_xla_flags_alone(environ):
  before = dict(environ)
  assert not backend.prefer_eigen_convolutions(environ, NEW_JAXLIB)
  assert environ == before


def test_jaxlib_without_the_flag_is_left_alone():
  environ = {}
  assert not backend.prefer_eigen_convolutions(environ, (0, 8))
  assert not environ


def _ynn_fusion_bodies(hlo_text: str) -> list[str]:
  """The called computations of every ``__ynn_fusion`` in optimized HLO text."""
  names = re.findall(r'calls=%([\w.\-]+)[^\n]*"kind":"__ynn_fusion"', hlo_text)
  return [re.search(rf"\n%{re.escape(name)} .*?\n}}", hlo_text, re.S).group(0) for name in names]


@pytest.mark.skipif(jax.default_backend() != "cpu" or backend._jaxlib_version() < backend.FIRST_JAXLIB,  # pylint: disable=protected-access
                    reason="an XLA:CPU flag of jaxlib >= 0.9")
@pytest.mark.parametrize("name", ["RepVGG-A0", "RepVGG-D2se"])
def test_compiled_convolutions_stay_out_of_ynnpack(name):
  deploy = rv.create_model(name, num_classes=10, width_multiplier=(0.25, 0.25, 0.25, 0.25), deploy=True)
  x = jnp.zeros((2, 32, 32, 3))
  variables = jax.eval_shape(lambda: deploy.init(jax.random.key(0), x))
  hlo = jax.jit(deploy.apply).lower(variables, x).compile().as_text()
  assert " convolution(" in hlo
  assert not any(" convolution(" in body for body in _ynn_fusion_bodies(hlo))


def test_global_average_pool_is_the_spatial_mean():
  x = np.random.default_rng(0).normal(size=(3, 7, 5, 4))
  with jax.enable_x64():
    np.testing.assert_allclose(backend.global_average_pool(jnp.asarray(x)), x.mean(axis=(1, 2)), rtol=1e-13)
  bf16 = backend.global_average_pool(jnp.asarray(x, jnp.bfloat16))
  assert bf16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(bf16, np.float64), x.astype(jnp.bfloat16).astype(np.float64).mean(axis=(1, 2)),
                             rtol=2 ** -8, atol=2 ** -8)


@pytest.mark.parametrize("size,stride,kernel_size", [(1, 1, 3), (2, 1, 3), (2, 2, 3), (3, 2, 3), (4, 2, 3),
                                                     (1, 1, 1), (2, 2, 1), (3, 1, 3), (5, 1, 3)])
def test_conv2d_equals_a_padded_reference_convolution_on_every_map_size(size, stride, kernel_size):
  """Small maps take the shifted-matmul path (batch large enough), larger ones lax.conv; both are the same
  convolution."""
  rng = np.random.default_rng(size * 10 + stride)
  x, k = rng.normal(size=(backend.MIN_MATMUL_ROWS, size, size, 5)), rng.normal(size=(kernel_size, kernel_size, 5, 4))
  with jax.enable_x64(True):
    y = np.asarray(backend.conv2d(jnp.asarray(x), jnp.asarray(k), stride))
    grads = jax.grad(lambda x, k: jnp.sum(jnp.sin(backend.conv2d(x, k, stride))), argnums=(0, 1))(jnp.asarray(x), jnp.asarray(k))
    reference = jax.grad(lambda x, k: jnp.sum(jnp.sin(jax.lax.conv_general_dilated(
        x, k, (stride, stride), [(kernel_size // 2,) * 2] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC")))),
                         argnums=(0, 1))(jnp.asarray(x), jnp.asarray(k))
  np.testing.assert_allclose(y, numpy_conv(x, k, stride, kernel_size // 2), atol=1e-12)
  for got, want in zip(grads, reference):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-12)


def _lowered_ops(fn, *args) -> set[str]:
  # A fresh function each time: JAX caches traces by function, and SPECIAL_PATHS is read when tracing.
  return set(stablehlo_op_counts(jax.jit(lambda *a: fn(*a)).lower(*args).as_text()))


def test_platforms_outside_special_paths_take_the_plain_convolution_and_mean(monkeypatch):
  here = jax.export.default_export_platform()
  monkeypatch.setattr(backend, "SPECIAL_PATHS", {here})
  x, k = jnp.ones((backend.MIN_MATMUL_ROWS, 2, 2, 8)), jnp.ones((3, 3, 8, 4))
  assert _lowered_ops(backend.conv2d, x, k) == {"dot_general"}  # The CPU's shifted matmuls at a 2x2 map.
  assert _lowered_ops(backend.global_average_pool, x) == {"dot_general"}
  cpu_results = backend.conv2d(x, k), backend.global_average_pool(x)
  monkeypatch.setattr(backend, "SPECIAL_PATHS", set())
  assert _lowered_ops(backend.conv2d, x, k) == {"convolution"}
  assert _lowered_ops(backend.global_average_pool, x) == {"reduce"}
  for got, cpu in zip((backend.conv2d(x, k), backend.global_average_pool(x)), cpu_results):
    np.testing.assert_allclose(got, cpu, rtol=1e-6)


def test_the_unfused_bias_keeps_its_barrier_only_where_lowered_for_a_listed_platform(monkeypatch):
  y, b = jnp.ones((2, 3, 3, 4)), jnp.arange(4.0)
  lowered = lambda: jax.jit(lambda y, b: backend.add_bias(y, b)).lower(y, b).as_text()
  assert "optimization_barrier" not in lowered()
  monkeypatch.setattr(backend, "UNFUSED_BIAS", {jax.export.default_export_platform()})
  assert "optimization_barrier" in lowered()
  np.testing.assert_array_equal(backend.add_bias(y, b), y + b)
  monkeypatch.setattr(backend, "UNFUSED_BIAS", {"tpu"})
  assert "optimization_barrier" not in lowered()
