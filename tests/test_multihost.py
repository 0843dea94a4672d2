"""Two processes on localhost (CPU, gloo collectives) train one model together, each on its own data shard."""

import os
import socket
import subprocess
import sys

import pytest

from tests.test_training import ROOT, read_metrics, tiny_flags


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_one_model_and_only_process_0_writes(fmnist_dir, tmp_path):
  workdir = str(tmp_path / "run")
  address = f"localhost:{_free_port()}"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  procs = [subprocess.Popen(
      [sys.executable, "train.py", "--config=configs/quickstart.py", f"--workdir={workdir}",
       *tiny_flags(fmnist_dir, coordinator_address=address, num_processes=2, process_id=i)],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-4000:]
  assert "step 6 eval accuracy" in outputs[0][1]
  assert "eval accuracy" not in outputs[1][1]  # Process 1 stays quiet.
  lines = read_metrics(workdir)
  deploy = [line for line in lines if line["split"] == "deploy"]
  assert len(deploy) == 1 and deploy[0]["count"] == 72  # Both shards evaluated, each example once.
  assert len([line for line in lines if line["split"] == "eval"]) == 2  # One writer, two evals (steps 3, 6).
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints")))[-1] == "6"
