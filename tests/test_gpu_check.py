"""The accelerator check script runs end to end (on the CPU, at its smoke sizes) and ends with its summary."""

import subprocess
import sys

import pytest

from tests.test_training import ROOT


@pytest.mark.slow  # Runs a test subset and the bench, both checked on their own in the default run.
def test_gpu_check_script_runs_and_prints_its_summary_last():
  result = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--smoke"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  tail = result.stdout[result.stdout.index("## Summary"):]
  assert "tests: 1 passed" in tail
  assert "| RepVGG-A0 | float32 |" in tail
  assert "CPU paths img/s" in result.stdout and "unfused bias img/s" in result.stdout
  assert "| RepVGG-A0 | ResNet-18 | float32 | 2 |" in result.stdout and "maps per image" in result.stdout
