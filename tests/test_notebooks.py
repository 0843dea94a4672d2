"""The notebooks execute top to bottom on CPU with tiny settings, so they cannot rot, and at emulated accelerator
precision (the Colab notebook runs on TPUs), so their equivalence checks must run at HIGHEST to pass."""

import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

from tests import precision_emulation  # pylint: disable=wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")


def _execute(name, tmp_path):
  notebook = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  notebook.cells.insert(0, nbformat.v4.new_code_cell(precision_emulation.notebook_cell(ROOT)))
  nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": NOTEBOOKS}}).execute()
  return notebook


def _outputs(notebook):
  return "\n".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
                   for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs)


@pytest.fixture
def smoke_env(fmnist_dir, tmp_path, monkeypatch):
  monkeypatch.setenv("REPVGG_NOTEBOOK_SMOKE", "1")
  monkeypatch.setenv("REPVGG_DATA_DIR", fmnist_dir)
  monkeypatch.setenv("REPVGG_NOTEBOOK_FIGURE", str(tmp_path / "fusion.png"))
  return tmp_path


@pytest.mark.slow
def test_colab_training_notebook_trains_reparameterizes_and_verifies(smoke_env):
  text = _outputs(_execute("colab_tpu_training.ipynb", smoke_env))
  assert "CpuDevice" in text and "deploy_accuracy" in text and "max |train - deploy|" in text


def test_fusion_walkthrough_draws_the_kernels_and_checks_the_fused_block(smoke_env):
  text = _outputs(_execute("fusion_walkthrough.ipynb", smoke_env))
  assert "max |train - plain|" in text
  assert (smoke_env / "fusion.png").stat().st_size > 10_000
