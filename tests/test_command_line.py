"""Spec of the command-line entry points' edges: a user's mistake is one line ``error: ...`` on stderr and exit
status 1, naming the file or field and what to do; a workdir serves one live run at a time.

Every command runs as a user would type it, four at a time (each pays for its own imports).
"""

import concurrent.futures
import os
import signal
import subprocess
import sys
import time

import pytest

from repvgg_jax import run_layout, workdir_lock
from tests.test_training import tiny_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = [sys.executable, "train.py", "--config=configs/quickstart.py"]
CONVERT = [sys.executable, "-m", "repvgg_jax.convert"]
PREDICT = [sys.executable, "-m", "repvgg_jax.predict"]


def _write_pth(path, model):
  """Random weights of ``model`` (full size) as an official-naming .pth."""
  import torch  # pylint: disable=g-import-not-at-top
  import repvgg_jax as rv  # pylint: disable=g-import-not-at-top
  from tests.helpers import random_variables  # pylint: disable=g-import-not-at-top
  variables = random_variables(rv.create_model(model, num_classes=10), (1, 32, 32, 3))
  torch.save(rv.to_pytorch_state_dict(variables), path)


def _cases(tmp, fmnist_dir, holder_pid):
  """name -> (command, text the one error line must hold)."""
  a0_pth = tmp / "a0.pth"
  (tmp / "truncated.pth").write_bytes(a0_pth.read_bytes()[:a0_pth.stat().st_size // 2])
  (tmp / "random.pth").write_bytes(os.urandom(4096))
  (tmp / "a_file").write_text("")
  (tmp / "text_folder").mkdir()
  (tmp / "text_folder" / "notes.txt").write_text("not a checkpoint")
  (tmp / "empty").mkdir()
  from PIL import Image  # pylint: disable=g-import-not-at-top
  Image.new("RGB", (8, 8)).save(tmp / "photo.png")
  train = lambda workdir, *flags: TRAIN + [f"--workdir={workdir}", *tiny_flags(fmnist_dir), *flags]
  return {
      # The six inputs the issue found answered with a traceback.
      "misspelt config field": (train(tmp / "w1", "--config.modle=RepVGG-A0"),
                                'names no field of the config: \'modle\' Did you mean "model"'),
      "random bytes as .pth": (CONVERT + ["--model=RepVGG-A0", f"--pth={tmp}/random.pth", f"--out={tmp}/c1"],
                               f"--pth={tmp}/random.pth is not a PyTorch checkpoint torch can read"),
      "half a .pth": (CONVERT + ["--model=RepVGG-A0", f"--pth={tmp}/truncated.pth", f"--out={tmp}/c2"],
                      f"--pth={tmp}/truncated.pth is not a PyTorch checkpoint torch can read"),
      "missing orbax folder": (CONVERT + ["--model=RepVGG-A0", f"--orbax={tmp}/nowhere", f"--to_pth={tmp}/x.pth"],
                               f"--orbax={tmp}/nowhere: no such folder"),
      "orbax folder of text": (CONVERT + ["--model=RepVGG-A0", f"--orbax={tmp}/text_folder", f"--to_pth={tmp}/y.pth"],
                               f"--orbax={tmp}/text_folder is not an orbax checkpoint"),
      "unknown model in bench": ([sys.executable, "-m", "repvgg_jax.bench", "--models=RepVGG-A9", "--batch_sizes=1"],
                                 "--models: Unknown model 'RepVGG-A9'. Did you mean RepVGG-A2"),
      # The ones that were already one line.
      "unknown model": (train(tmp / "w2", "--config.model=RepVGG-AO"), "RepVGG-AO"),
      "negative batch": (train(tmp / "w3", "--config.batch_size=-4"), "batch_size must be positive; got -4"),
      "workdir that is a file": (train(tmp / "a_file" / "run"), "cannot write to workdir"),
      "missing data_dir": (train(tmp / "w4", f"--config.data_dir={tmp}/no_data"), "apt-get install dataset-fashion-mnist"),
      "absent ImageNet": (train(tmp / "w5", "--config.dataset=imagenet2012", f"--config.data_dir={tmp}/empty"),
                          "Prepare ImageNet once from the manual download"),
      "weights of another model": (CONVERT + ["--model=RepVGG-A1", f"--pth={a0_pth}", f"--out={tmp}/c3"],
                                   "shape mismatches"),
      # New edges.
      "workdir of a live run": (train(tmp / "held"), f"is in use by another run (pid {holder_pid} on host"),
      "quantize without a run": ([sys.executable, "-m", "repvgg_jax.quantize", "--config=configs/quickstart.py",
                                  f"--workdir={tmp}/empty"], "deploy does not exist: quantize a finished run"),
      "missing init_from": (train(tmp / "w6", f"--config.init_from={tmp}/nope.pth"),
                            f"init_from={tmp}/nope.pth: no such file"),
      "init_from of another model": (train(tmp / "w7", f"--config.init_from={a0_pth}"),
                                     f"init_from={a0_pth}: The state_dict (official naming, training-time) does not match RepVGG-A0"),
      "freeze matching nothing": (train(tmp / "w8", "--config.freeze=('stgae1',)"),
                                  "freeze: 'stgae1' matches no parameter path"),
      "predict a missing image": (PREDICT + [f"--workdir={tmp}/empty", f"{tmp}/nope.jpg"], f"{tmp}/nope.jpg: no such file"),
      "predict a text file": (PREDICT + [f"--workdir={tmp}/empty", f"{tmp}/text_folder/notes.txt"],
                              "notes.txt is not a JPEG or PNG image"),
      "predict without a run": (PREDICT + [f"--workdir={tmp}/empty", f"{tmp}/photo.png"],
                                f"{tmp}/empty holds no finished run"),
  }


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, fmnist_dir):
  """name -> (case, CompletedProcess), all run while another process holds ``<tmp>/held``; that process is
  killed with -9 afterwards. Also returns the folder."""
  pytest.importorskip("torch")
  tmp = tmp_path_factory.mktemp("cli")
  _write_pth(tmp / "a0.pth", "RepVGG-A0")
  (tmp / "held").mkdir()
  code = ("import sys, time\nfrom repvgg_jax import workdir_lock\n"
          "with workdir_lock.hold(sys.argv[1]):\n  print('held', flush=True)\n  time.sleep(600)")
  holder = subprocess.Popen([sys.executable, "-c", code, str(tmp / "held")], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    cases = _cases(tmp, fmnist_dir, holder.pid)
    run = lambda command: subprocess.run([str(c) for c in command], cwd=ROOT, capture_output=True, text=True,
                                         timeout=300)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
      results = dict(zip(cases, pool.map(run, (command for command, _ in cases.values()))))
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  return tmp, {name: (cases[name], results[name]) for name in cases}


NAMES = ["misspelt config field", "random bytes as .pth", "half a .pth", "missing orbax folder",
         "orbax folder of text", "unknown model in bench", "unknown model", "negative batch", "workdir that is a file",
         "missing data_dir", "absent ImageNet", "weights of another model", "workdir of a live run",
         "quantize without a run", "missing init_from", "init_from of another model", "freeze matching nothing",
         "predict a missing image", "predict a text file", "predict without a run"]


@pytest.mark.parametrize("name", NAMES)
def test_a_users_mistake_is_one_error_line(outcomes, name):
  (_, expected), result = outcomes[1][name]
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 1, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  assert lines[-1].startswith("error: ") and expected in lines[-1], lines[-1]


def test_the_cases_cover_every_name(outcomes):
  assert sorted(outcomes[1]) == sorted(NAMES)


def test_a_lock_left_by_a_killed_run_does_not_block_the_restart(outcomes):
  held = str(outcomes[0] / "held")
  assert "pid" in open(os.path.join(held, run_layout.LOCK)).read()  # The dead run's record is still there.
  start = time.time()
  with workdir_lock.hold(held):
    with pytest.raises(workdir_lock.WorkdirInUse, match=f"pid {os.getpid()} on host"):
      with workdir_lock.hold(held):  # A second run, while this one holds it.
        pass
  with workdir_lock.hold(held):  # Released at the end of the with-block.
    pass
  assert time.time() - start < 5
