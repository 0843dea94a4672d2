"""The benchmark CLI runs end to end on a tiny configuration and prints its table (numbers are not asserted)."""

import os
import subprocess
import sys

from tests.test_training import ROOT


def test_bench_cli_prints_a_table_and_writes_a_plot(tmp_path):
  plot = str(tmp_path / "bench.png")
  # 64 px, not 32: full-width A0's batch-2 training step compiles about twice as fast (tiny maps make many
  # small convolutions and dots, which XLA:CPU compiles slowly).
  result = subprocess.run([sys.executable, "-m", "repvgg_jax.bench", "--models=RepVGG-A0", "--batch_sizes=2",
                           "--image_size=64", "--repeats=2", "--dtypes=float32,bfloat16", "--train_step",
                           f"--plot={plot}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  table = [line for line in result.stdout.splitlines() if line.startswith("| RepVGG-A0 | 2 |")]
  assert len(table) == 2 and "bfloat16" in table[1]
  assert "deploy/train" in result.stdout and "train step img/s" in result.stdout
  assert os.path.getsize(plot) > 5_000
