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


def test_readme_backbone_example_runs_and_its_shapes_hold():
  with open(README) as f:
    text = f.read()
  namespace = {}
  for section in ("## Python API", "### As a backbone (detection, segmentation)"):
    example = re.search(re.escape(section) + r"\n\n.*?```python\n(.*?)```", text, re.S).group(1)
    exec(example, namespace)  # pylint: disable=exec-used
  assert [tuple(m.shape) for m in (namespace["c3"], namespace["c4"], namespace["c5"])] == [
      (2, 28, 28, 96), (2, 14, 14, 192), (2, 7, 7, 1280)]
  assert namespace["masks"].shape == (2, 28, 28, 21)
  assert namespace["backbone"].feature_info()[-1] == {"stage": 4, "num_chs": 1280, "reduction": 32}
