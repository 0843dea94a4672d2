"""Spec of the equivalence check: both forms at HIGHEST precision, a tight bound, on every backend.

The CPU computes float32 exactly, so these tests run under an emulation of accelerator precision
(tests/precision_emulation.py): there, a check at the default precision fails and the project's check holds.
On a GPU or TPU the same tests see the real reduced precision.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import repvgg_jax as rv
from repvgg_jax import equivalence
from repvgg_jax.equivalence import EquivalenceError, check_equivalence
from tests import wellposed
from tests.helpers import random_variables

SMALL = dict(num_classes=10, width_multiplier=(0.5, 0.5, 0.5, 1.0))


def _forms(name="RepVGG-A0", eps=rv.models.BN_EPSILON):
  model, deploy = rv.create_model(name, **SMALL), rv.create_model(name, deploy=True, **SMALL)
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  v = random_variables(model, x.shape)
  return model, v, deploy, rv.reparam(v["params"], v["batch_stats"], eps=eps), x


MATMULS = {"@": lambda a, b: a @ b, "jnp.matmul": jnp.matmul, "jnp.dot": jnp.dot,
           "jnp.einsum": lambda a, b: jnp.einsum("nij,jk->nik", a, b),
           "lax.dot_general": lambda a, b: jax.lax.dot_general(a, b, (((2,), (0,)), ((), ())))}


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the emulation is of accelerators, on the CPU")
@pytest.mark.parametrize("spelling", MATMULS)
def test_the_emulation_rounds_every_spelling_of_a_product_and_spares_highest(spelling, accelerator_precision):
  """It replaces the lowering of the primitive every spelling reaches, not the names: ``@``, ``jnp.matmul``,
  ``jnp.dot`` and ``jnp.einsum`` are rounded as ``lax.dot_general`` is, eager and jitted, and spared at HIGHEST
  (also when set by ``jax.default_matmul_precision`` inside the jitted function, as ``reparam`` does)."""
  product = MATMULS[spelling]
  x, w = jax.random.normal(jax.random.key(0), (2, 3, 64)), jax.random.normal(jax.random.key(1), (64, 8))
  bf16 = jnp.matmul(x.astype(jnp.bfloat16).astype(jnp.float32), w.astype(jnp.bfloat16).astype(jnp.float32),
                    precision="highest")
  exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64)

  def at_highest(a, b):
    with jax.default_matmul_precision("highest"):
      return product(a, b)

  for default in (product(x, w), jax.jit(product)(x, w)):
    assert float(jnp.abs(default - exact).max()) > 1e-3
    assert float(jnp.abs(default - bf16).max()) < 1e-5
  assert float(np.abs(np.asarray(jax.jit(at_highest)(x, w)) - exact).max()) < 1e-5


def test_a_default_precision_comparison_fails_where_the_check_holds(accelerator_precision):
  model, v, deploy, plain, x = _forms("RepVGG-B1g4")  # Grouped: the widest gap between the two precisions.
  y_train = jax.jit(lambda v, x: model.apply(v, x))(v, x)
  y_deploy = jax.jit(lambda p, x: deploy.apply({"params": p}, x))(plain, x)
  assert equivalence.max_relative_error(y_deploy, y_train) > equivalence.RTOL  # What a GPU user saw.
  assert check_equivalence(model, v, deploy, plain, x) < 1e-5


def test_a_bn_epsilon_twice_the_models_is_caught_on_a_well_posed_network(accelerator_precision):
  model, deploy = rv.create_model("RepVGG-A0", **SMALL), rv.create_model("RepVGG-A0", deploy=True, **SMALL)
  v = wellposed.well_posed_variables(model, (32, 32, 3), dtype=np.float32)
  x = jnp.asarray(wellposed.images((4, 32, 32, 3), seed=1), jnp.float32)
  assert check_equivalence(model, v, deploy, rv.reparam(v["params"], v["batch_stats"]), x) < equivalence.RTOL
  wrong = rv.reparam(v["params"], v["batch_stats"], eps=wellposed.WRONG_EPSILON)  # The model was built with 1e-5.
  with pytest.raises(EquivalenceError, match="largest logit"):
    check_equivalence(model, v, deploy, wrong, x)


# --------------------------------------------------------------------------- Well-posed networks, float64.

# A0 and QARepVGG-A0 at full size, and every distinct layout (depths, groups, branches, SE) at reduced width: at equal
# reduced widths A1, A2 are A0, B1-B3 are B0, the g2 and g4 variants B1g4's layout with other groups, and
# MobileOne-S2, S3 are S1 (QARepVGG likewise).
# Every variant at full size: benchmarks/equivalence_table.py (its table is in benchmarks/RESULTS.md).
LAYOUTS = ["RepVGG-B0", "RepVGG-B1g4", "RepVGG-D2se", "MobileOne-S0", "MobileOne-S1", "MobileOne-S4",
           "QARepVGG-B1g4"]
# B0 slow: A0's blocks at B depths; the full-size A0 and B1g4 (B depths, groups) hold it at CI's cost.
CASES = [pytest.param("RepVGG-A0", {}, id="RepVGG-A0-full"), pytest.param("QARepVGG-A0", {}, id="QARepVGG-A0-full")]
CASES += [pytest.param(name, wellposed.reduced_width(name), id=name,
                       marks=[pytest.mark.slow] if name == "RepVGG-B0" else []) for name in LAYOUTS]


@pytest.mark.parametrize("name,overrides", CASES)
def test_deploy_form_computes_the_training_form_on_a_well_posed_network(name, overrides):
  """float64, calibrated BN statistics, error against the logits' spread; the mutations must fail it."""
  reference, got, mutated = wellposed.train_vs_deploy(name, **overrides)
  wellposed.assert_equal_functions(got, reference)
  for y in mutated.values():
    wellposed.assert_caught(y, reference)
