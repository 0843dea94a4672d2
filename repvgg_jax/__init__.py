"""RepVGG and structural re-parameterization in JAX/Flax."""

from repvgg_jax import backend

backend.prefer_eigen_convolutions()

from repvgg_jax.families import (create_model, list_models, load_pytorch_state_dict, reparam,  # pylint: disable=g-import-not-at-top,wrong-import-position
                                 to_numpy_state_dict, to_pytorch_state_dict)

__all__ = ["create_model", "list_models", "load_pytorch_state_dict", "reparam", "to_numpy_state_dict",
           "to_pytorch_state_dict"]
