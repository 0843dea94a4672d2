"""Spec of the XLA:CPU setting: convolutions leave YNNPACK, the user's own choice always wins."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import repvgg_jax as rv
from repvgg_jax import models, xla_cpu

NEW_JAXLIB = (0, 10)


def test_flag_is_appended_to_the_users_other_flags():
  environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  assert xla_cpu.prefer_eigen_convolutions(environ, NEW_JAXLIB)
  assert environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {xla_cpu.FLAG}"


def test_flag_is_set_when_xla_flags_is_unset():
  environ = {}
  assert xla_cpu.prefer_eigen_convolutions(environ, NEW_JAXLIB)
  assert environ == {"XLA_FLAGS": xla_cpu.FLAG}


@pytest.mark.parametrize("environ", [
    {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=+INDIVIDUAL_CONVOLUTION"},
    {"XLA_FLAGS": "", xla_cpu.OPT_OUT: "1"},
])
def test_users_own_setting_or_opt_out_leaves_xla_flags_alone(environ):
  before = dict(environ)
  assert not xla_cpu.prefer_eigen_convolutions(environ, NEW_JAXLIB)
  assert environ == before


def test_jaxlib_without_the_flag_is_left_alone():
  environ = {}
  assert not xla_cpu.prefer_eigen_convolutions(environ, (0, 8))
  assert not environ


def _ynn_fusion_bodies(hlo_text: str) -> list[str]:
  """The called computations of every ``__ynn_fusion`` in optimized HLO text."""
  names = re.findall(r'calls=%([\w.\-]+)[^\n]*"kind":"__ynn_fusion"', hlo_text)
  return [re.search(rf"\n%{re.escape(name)} .*?\n}}", hlo_text, re.S).group(0) for name in names]


@pytest.mark.skipif(jax.default_backend() != "cpu" or xla_cpu._jaxlib_version() < xla_cpu.FIRST_JAXLIB,  # pylint: disable=protected-access
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
    np.testing.assert_allclose(models.global_average_pool(jnp.asarray(x)), x.mean(axis=(1, 2)), rtol=1e-13)
  bf16 = models.global_average_pool(jnp.asarray(x, jnp.bfloat16))
  assert bf16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(bf16, np.float64), x.astype(jnp.bfloat16).astype(np.float64).mean(axis=(1, 2)),
                             rtol=2 ** -8, atol=2 ** -8)
