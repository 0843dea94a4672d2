"""The notebooks execute top to bottom on CPU with tiny settings, so they cannot rot: from the checkout at emulated
accelerator precision (the Colab notebook runs on TPUs), so their equivalence checks must run at HIGHEST to pass; and
as on Colab (a stand-in ``google.colab`` module, a fresh virtual environment that the first cell installs the
project into, cloned from this checkout's last commit)."""

import json
import os
import site
import subprocess
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

from tests import precision_emulation  # pylint: disable=wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")


def _execute(name, first_cell=None, kernel_name="python3", folder=NOTEBOOKS):
  """The notebook executed in a kernel started in ``folder``, after ``first_cell`` (default: the emulation)."""
  notebook = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  notebook.cells.insert(0, nbformat.v4.new_code_cell(first_cell or precision_emulation.notebook_cell(ROOT)))
  nbclient.NotebookClient(notebook, timeout=600, kernel_name=kernel_name,
                          resources={"metadata": {"path": str(folder)}}).execute()
  return notebook


def _colab_kernel(tmp_path, monkeypatch) -> str:
  """A kernel as on Colab: a fresh virtual environment (the packages of this interpreter visible, as Colab's are) with
  a stand-in ``google.colab`` package on its path. Returns the kernel's name."""
  venv, stand_in = tmp_path / "venv", tmp_path / "colab_stand_in"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
  # This interpreter's packages (a venv's, in CI's 3.13 job; --system-site-packages would give the base Python's).
  venv_site = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             check=True, capture_output=True, text=True).stdout.strip()
  with open(os.path.join(venv_site, "here.pth"), "w") as f:
    f.write("\n".join(site.getsitepackages()) + "\n")
  (stand_in / "google" / "colab").mkdir(parents=True)
  for module in ("__init__", "output"):  # JAX's debugger imports google.colab.output where google.colab is.
    (stand_in / "google" / "colab" / f"{module}.py").write_text('"""Stands in for Colab\'s own package."""\n')
  spec = tmp_path / "jupyter" / "kernels" / "colab"
  spec.mkdir(parents=True)
  spec.joinpath("kernel.json").write_text(json.dumps({
      "argv": [str(venv / "bin" / "python"), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "colab stand-in", "language": "python", "env": {"PYTHONPATH": str(stand_in)}}))
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  monkeypatch.setenv("REPVGG_JAX_SOURCE", ROOT)
  monkeypatch.setenv("REPVGG_COLAB_HOME", str(tmp_path))
  return "colab"


def _run_as_on_colab(name, tmp_path, monkeypatch):
  notebook = _execute(name, "import google.colab  # Colab imports it before any cell.",
                      _colab_kernel(tmp_path, monkeypatch), folder=tmp_path)
  assert f"repvgg-jax from {tmp_path / 'repvgg-jax'}" in _outputs(notebook)
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


def test_colab_training_notebook_installs_trains_reparameterizes_and_verifies_as_on_colab(smoke_env, monkeypatch):
  text = _outputs(_run_as_on_colab("colab_tpu_training.ipynb", smoke_env, monkeypatch))
  assert "CpuDevice" in text and "deploy_accuracy" in text and "max |train - deploy|" in text


def test_fusion_walkthrough_draws_the_kernels_and_checks_the_fused_block(smoke_env):
  text = _outputs(_execute("fusion_walkthrough.ipynb"))
  assert "max |train - plain|" in text
  assert (smoke_env / "fusion.png").stat().st_size > 10_000


def test_fusion_walkthrough_installs_the_project_and_runs_as_on_colab(smoke_env, monkeypatch):
  text = _outputs(_run_as_on_colab("fusion_walkthrough.ipynb", smoke_env, monkeypatch))
  assert "max |train - plain|" in text


def test_the_colab_set_up_stops_with_one_line_when_no_source_is_set(smoke_env, monkeypatch):
  kernel = _colab_kernel(smoke_env, monkeypatch)
  monkeypatch.setenv("REPVGG_JAX_SOURCE", "")
  with pytest.raises(nbclient.exceptions.CellExecutionError, match="Set REPVGG_JAX_SOURCE at the top of this cell"):
    _execute("fusion_walkthrough.ipynb", "import google.colab", kernel, folder=smoke_env)
  assert not (smoke_env / "repvgg-jax").exists()
