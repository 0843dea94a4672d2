"""The accelerator check runs end to end where the GPU machines' image lacks what it lacks (TensorFlow,
tensorflow-datasets, ml_collections, qwix: blocked), at its smoke sizes on the CPU, and writes its report."""

import os
import subprocess
import sys

from tests.test_training import ROOT


def test_gpu_check_runs_every_part_without_the_packages_the_gpu_image_lacks(tmp_path):
  """Its tests are collected in that environment (the default suite runs them; the by-hand rehearsal in a
  virtual environment of the image's packages ran them there: benchmarks/RESULTS.md)."""
  command = [sys.executable, "tests/no_tensorflow.py", "--also=ml_collections,qwix", "benchmarks/gpu_check.py",
             "--smoke", "--tests=collect", f"--out={tmp_path}"]
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  with open(os.path.join(tmp_path, "gpu_check.md")) as f:
    report = f.read()
  with open(os.path.join(tmp_path, "tests.log")) as f:
    assert not [line for line in f if line.startswith(("ERROR", "FAILED"))]
  assert "tests collected" in report and "(exit status 0" in report
  assert ": failed" not in report, report  # A part's error is reported and skipped on the GPU; here it fails.
  for part in ("2. The two forms against timm (1 rows)", "3. Table 4's pairs", "4. Backend paths",
               "4. Peak activation memory", "## Done"):
    assert part in report, part
  assert "| RepVGG-A0 | float32 |" in report and "| RepVGG-A0 | ResNet-18 | float32 | 2 |" in report
  assert "flags:" in report  # The host CPU's model and vector extensions beside its figures.
