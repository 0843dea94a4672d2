"""Spec of the suite's warning policy: a deprecation raised from the project's own code fails the suite (pyproject's
filterwarnings); one raised from a third-party package stays a visible warning."""

import warnings

import pytest


@pytest.mark.parametrize("module", ["repvgg_jax.training", "repvgg_jax", "tests.test_training", "configs.a0"])
@pytest.mark.parametrize("category", [DeprecationWarning, FutureWarning])
def test_a_deprecation_from_our_code_is_an_error(module, category):
  with pytest.raises(category):
    warnings.warn_explicit("an API going away", category, f"{module.replace('.', '/')}.py", 1, module=module)


@pytest.mark.parametrize("module", ["qwix.core", "tensorflow.python.autograph", "repvgg_jaxx"])
def test_a_deprecation_from_another_package_stays_a_warning(module):
  with pytest.warns(DeprecationWarning):
    warnings.warn_explicit("their API going away", DeprecationWarning, f"{module}.py", 1, module=module)
