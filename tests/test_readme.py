"""The README's Python API example runs as written and its comment holds; its main job installs what it runs."""

import os
import re

import chex
import jax.numpy as jnp

from configs import quickstart

README = os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")


def test_readme_python_api_example_runs_and_deploy_equals_train():
  with open(README) as f:
    example = re.search(r"## Python API\n\n```python\n(.*?)```", f.read(), re.S).group(1)
  namespace = {}
  exec(example, namespace)  # pylint: disable=exec-used
  y_train = namespace["model"].apply(namespace["variables"], namespace["x"], train=False)
  scale = float(jnp.abs(y_train).max())
  chex.assert_trees_all_close(namespace["y"], y_train, rtol=1e-5, atol=1e-5 * scale)


def test_the_main_job_installs_the_onnx_export_its_config_asks_for():
  """A newcomer's first run writes deploy.onnx without a 'pip install' warning."""
  with open(README) as f:
    command = re.search(r"## Set-up and main job\n\n```bash\n(.*?)```", f.read(), re.S).group(1)
  assert "--config=configs/quickstart.py" in command and quickstart.get_config().export_onnx
  assert "pip install -e '.[onnx]'" in command
