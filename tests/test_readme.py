"""The README's Python API example runs as written and its comment holds."""

import os
import re

import chex
import jax.numpy as jnp


def test_readme_python_api_example_runs_and_deploy_equals_train():
  with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")) as f:
    example = re.search(r"## Python API\n\n```python\n(.*?)```", f.read(), re.S).group(1)
  namespace = {}
  exec(example, namespace)  # pylint: disable=exec-used
  y_train = namespace["model"].apply(namespace["variables"], namespace["x"], train=False)
  scale = float(jnp.abs(y_train).max())
  chex.assert_trees_all_close(namespace["y"], y_train, rtol=1e-5, atol=1e-5 * scale)
