"""Train form == deploy form, checked at full float32 precision on every backend.

At JAX's default precision a float32 convolution or matmul multiplies operands rounded to about bfloat16 on
GPUs (TF32-like) and TPUs (one bf16 pass). The two forms then differ by ~1e-3 of the largest logit (A0:
8.9e-4 on an H200) although the fusion is exact; at ``Precision.HIGHEST`` they differ by float32 rounding
(~4e-7). So every check computes both forms at HIGHEST and keeps a tight bound (RTOL). Training and inference
themselves keep the backend's fast default.

What the bound catches (``python benchmarks/equivalence_table.py --sensitivity``, float32, 32 px, batch 4;
d is the relative change): on well-posed networks (BN statistics those of the layers' real inputs) train vs
deploy is 1.8e-6..6.4e-6 and a BN epsilon of 1e-5 (1 + d) is caught from d = 1.6e-2 (A0, B1g4), 3.9e-3
(MobileOne-S0), 1.2e-4 (D2se), a stem kernel scaled by 1 + d from d = 1.2e-7 (D2se) .. 7.6e-6 (A0). On
networks with random BN statistics, which compute a near-constant function, it catches an epsilon only from
d = 0.25..0.5 and the stem from d = 6e-5..1.2e-4, and on such a D2se neither at d = 1: the check is as strong
as the images and weights it is given make the function input-dependent.
"""

import functools
from typing import Any, Mapping

import chex
import jax
import jax.numpy as jnp

from repvgg_jax.errors import EquivalenceError

RTOL = 2e-5  # Relative to the largest logit (and elementwise); measured sensitivity: benchmarks/equivalence_table.py.


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
  return assert_close_logits(y_deploy, y_train, rtol)


def assert_close_logits(y_deploy, y_train, rtol: float = RTOL) -> float:
  """``check_equivalence``'s criterion on computed logits: raises EquivalenceError where an element differs by
  more than ``rtol`` relative plus ``rtol`` times the largest logit; returns the max error relative to it."""
  scale = float(jnp.abs(y_train).max()) or 1.0
  try:
    chex.assert_trees_all_close(y_deploy, y_train, rtol=rtol, atol=rtol * scale)
  except AssertionError as e:
    raise EquivalenceError(f"the deploy form differs from the training form (eval mode, HIGHEST precision) "
                           f"by {max_relative_error(y_deploy, y_train):.2e} of the largest logit: {e}") from e
  return max_relative_error(y_deploy, y_train)
