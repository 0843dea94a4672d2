"""Train form == deploy form, checked at full float32 precision on every backend.

At JAX's default precision a float32 convolution or matmul multiplies operands rounded to about bfloat16 on
GPUs (TF32-like) and TPUs (one bf16 pass). The two forms then differ by ~1e-3 of the largest logit (A0:
8.9e-4 on an H200) although the fusion is exact; at ``Precision.HIGHEST`` they differ by float32 rounding
(~4e-7). So every check computes both forms at HIGHEST and keeps a tight bound, which still catches a wrong
BatchNorm epsilon (~1e-5). Training and inference themselves keep the backend's fast default.
"""

import functools
from typing import Any, Mapping

import chex
import jax
import jax.numpy as jnp

RTOL = 1e-4  # Relative to the largest logit (and elementwise): float32 re-association over <= 48 blocks.


class EquivalenceError(AssertionError):
  """The deploy form does not compute the training form's function."""


def logits_at_full_precision(model, variables: Mapping, images, **kwargs):
  """``model.apply(variables, images, **kwargs)`` with every convolution and matmul at HIGHEST precision."""
  with jax.default_matmul_precision("highest"):
    return jax.jit(functools.partial(model.apply, **kwargs))(variables, images)


def max_relative_error(y, reference) -> float:
  """max |y - reference| / max |reference|."""
  scale = float(jnp.abs(reference).max()) or 1.0
  return float(jnp.abs(y - reference).max()) / scale


def check_equivalence(train_model, variables: Mapping[str, Any], deploy_model, deploy_params: Mapping, images,
                      rtol: float = RTOL) -> float:
  """Asserts eval-mode train form == deploy form on ``images``, both at HIGHEST precision.

  ``train_model``/``deploy_model`` are a network or a single block in its two forms; ``variables`` holds
  ``params`` and ``batch_stats``. Returns the max error relative to the largest logit; raises
  ``EquivalenceError`` where an element differs by more than ``rtol`` (relative, plus ``rtol`` times the
  largest logit).
  """
  y_train = logits_at_full_precision(train_model, variables, images, train=False)
  y_deploy = logits_at_full_precision(deploy_model, {"params": deploy_params}, images)
  scale = float(jnp.abs(y_train).max()) or 1.0
  try:
    chex.assert_trees_all_close(y_deploy, y_train, rtol=rtol, atol=rtol * scale)
  except AssertionError as e:
    raise EquivalenceError(f"the deploy form differs from the training form (eval mode, HIGHEST precision) "
                           f"by {max_relative_error(y_deploy, y_train):.2e} of the largest logit: {e}") from e
  return max_relative_error(y_deploy, y_train)
