"""RepVGG and structural re-parameterization in JAX/Flax."""

from repvgg_jax.models import create_model
from repvgg_jax.reparam import reparam
from repvgg_jax.variants import list_models

__all__ = ["create_model", "list_models", "reparam"]
