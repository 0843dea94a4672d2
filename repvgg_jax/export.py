"""Export of the plain (deploy) model as a serialized ``jax.export`` artifact (StableHLO).

The artifact holds the weights and the computation, with a symbolic batch dimension; loading and running it
needs only JAX, not this package's model code.
"""

from collections.abc import Mapping
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import export as jax_export


def _assert_plain(params: Mapping, path: str = "") -> None:
  for key, value in params.items():
    if key in ("rbr_dense", "rbr_1x1", "rbr_identity"):
      raise ValueError(f"{path + key!r} is a training-time branch: export the plain model, i.e. "
                       "reparam(params, batch_stats) into create_model(name, deploy=True).")
    if isinstance(value, Mapping):
      _assert_plain(value, f"{path}{key}/")


def export_deploy(model, params: Mapping, image_shape: tuple[int, int, int], dtype: Any = jnp.float32,
                  platforms: tuple[str, ...] = ("cpu",)) -> bytes:
  """Serializes ``model.apply({"params": params}, x)`` for x of shape (batch, *image_shape), any batch.

  ``model`` must be a deploy-form network (``create_model(name, deploy=True)``) and ``params`` its plain
  parameters; a training-form tree is refused. ``platforms`` lists where the artifact may run
  (e.g. ("cpu", "cuda", "tpu")).
  """
  if not getattr(model, "deploy", False):
    raise ValueError("export_deploy takes the deploy-form model: create_model(name, deploy=True).")
  _assert_plain(params)
  batch = jax_export.symbolic_shape("batch")[0]
  spec = jax.ShapeDtypeStruct((batch,) + tuple(image_shape), dtype)
  forward = jax.jit(lambda x: model.apply({"params": params}, x))
  return jax_export.export(forward, platforms=platforms)(spec).serialize()


def save(path: str, artifact: bytes) -> None:
  with open(path, "wb") as f:
    f.write(artifact)


def load(path: str) -> Callable[[jax.Array], jax.Array]:
  """Loads an exported model: returns f(images (batch, H, W, C)) -> logits (batch, num_classes)."""
  with open(path, "rb") as f:
    exported = jax_export.deserialize(bytearray(f.read()))
  return exported.call
