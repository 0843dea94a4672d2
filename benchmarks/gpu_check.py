"""The accelerator check: what a lent GPU runs, from the checkout, in one command that fits the loan.

  python benchmarks/gpu_check.py --out=$OUT            # on an H100/H200: <= 8 minutes, compilation included
  python benchmarks/gpu_check.py --smoke --out=/tmp/c  # anywhere (the CPU): every part at tiny sizes

Runs on the GPU machines' image as it is (jax with CUDA, flax, optax, chex, orbax-checkpoint, torch, timm, pytest,
onnx, onnxruntime; no TensorFlow, tensorflow-datasets, ml_collections or qwix, and nothing can be installed): the
repository is put on sys.path, not installed. JAX allocates GPU memory as it needs it (no preallocation), so torch
and JAX share the card. Parts, in priority order; each starts only while the time budget (--budget_s) allows, and
the report (OUT/gpu_check.md) is rewritten after each, so a run cut short keeps what it measured; a part that fails
is reported with its error and the next one starts:

1. The model, reparam, equivalence, backend and export tests, serially (one process on the one GPU) at the device's
   default precision, with TensorFlow, tensorflow-datasets, ml_collections and qwix blocked (tests/no_tensorflow.py)
   as the image lacks them; the log in OUT/tests.log.
2. RepVGG-A0 and RepVGG-B3 at the paper's protocol (batch 128, 224 px), float32 and bfloat16: training form, deploy
   form, timm eager and torch.compile'd, the training step of both, and the train/deploy error at HIGHEST.
3. Table 4's pairs at batch 128, float32 (RepVGG deploy vs ResNet with BN folded; timm's pair beside).
4. Whatever time remains: the backend paths (the CPU-only paths and the unfused bias timed on this device, with
   the cuDNN calls XLA chose) and Figure 3's peak activation memory.

--tests=collect only collects part 1's tests in the blocked environment (CI: the default suite runs them); the
smoke run's sizes are 2 images of 64 px, float32 only, and A0 alone in part 2.
"""

import argparse
import collections
import functools
import importlib.util
import os
import re
import subprocess
import sys
import time
import traceback
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# Before JAX starts: memory on demand, so that torch's allocator gets its share of the same card.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

TESTS = ["tests/test_models.py", "tests/test_reparam.py", "tests/test_equivalence.py", "tests/test_backend.py",
         "tests/test_export.py"]
NOT_ON_THE_IMAGE = "ml_collections,qwix"  # Beside TensorFlow and tensorflow-datasets, which no_tensorflow blocks.
PAIR_MODELS = ("RepVGG-A0", "RepVGG-B3")


class Report:
  """The check's markdown report, rewritten to ``path`` after every part."""

  def __init__(self, path: str, start: float):
    self.path, self.start, self.sections = path, start, []

  def elapsed(self) -> float:
    return time.time() - self.start

  def add(self, title: str, body: str) -> None:
    self.sections.append(f"## {title} ({self.elapsed():.0f} s in)\n\n{body}\n")
    with open(self.path, "w") as f:
      f.write("\n".join(self.sections))
    print(f"\n## {title} ({self.elapsed():.0f} s in)\n\n{body}", flush=True)

  def attempt(self, title: str, measure) -> Optional[object]:
    """``measure()``, or None with its failure in the report: one loan, so one part's error (an out-of-memory, a
    compiler's refusal) must not cost the parts after it."""
    try:
      return measure()
    except Exception as e:  # pylint: disable=broad-except
      self.add(f"{title}: failed", f"`{type(e).__name__}: {' '.join(str(e).split())[:500]}`\n\n```\n"
                                   f"{traceback.format_exc()[-3000:]}```")
      return None


def run_tests(mode: str, timeout_s: float, log_path: str) -> str:
  """Part 1: pytest on TESTS, one process, the packages the image lacks blocked; the summary line."""
  serial = ["-n", "0"] if importlib.util.find_spec("xdist") else []  # pyproject's -n 2 is replaced below anyway.
  command = [sys.executable, os.path.join("tests", "no_tensorflow.py"), f"--also={NOT_ON_THE_IMAGE}", "-m", "pytest",
             *serial, "-q", "-p", "no:cacheprovider", "-o", "addopts=-ra -m 'not slow'", *TESTS]
  if mode == "collect":
    command.append("--collect-only")
  start = time.time()
  with open(log_path, "w") as log:
    try:
      code = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s,
                            check=False).returncode
    except subprocess.TimeoutExpired:
      code = None
  with open(log_path) as log:
    lines = [line.strip() for line in log if line.strip()]
  summary = next((line for line in reversed(lines) if re.search(r"\b(passed|failed|error|tests? collected)\b", line)),
                 None)
  if summary is None:  # Stopped: pytest's progress characters so far.
    progress = "".join(re.sub(r"\s*\[\s*\d+%\]$", "", line) for line in lines
                       if re.fullmatch(r"[.FEsx]+(\s*\[\s*\d+%\])?", line))
    summary = f"{progress.count('.')} passed, {progress.count('F')} failed, {progress.count('E')} errors so far"
  failed = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
  status = f"stopped at the {timeout_s:.0f} s limit" if code is None else f"exit status {code}"
  return "\n".join([f"`{summary}` ({status}, {time.time() - start:.0f} s)", *(f"- {line}" for line in failed)])


def forms_table(rows: list[dict]) -> str:
  """Part 2's rows as one table: images/s of each form and engine, the steps, and the HIGHEST-precision error."""
  from repvgg_jax import bench  # pylint: disable=g-import-not-at-top
  lines = [bench.format_table(rows), "",
           "| model | dtype | deploy / train | deploy / timm deploy | deploy / compiled timm deploy | "
           "JAX step / timm step | train vs deploy, max rel err (HIGHEST) |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    rate = lambda key: r[key]["img_s"] if key in r else None  # pylint: disable=cell-var-from-loop
    ratio = lambda a, b: f"{rate(a) / rate(b):.2f}x" if rate(a) and rate(b) else "-"
    lines.append(f"| {r['model']} | {r['dtype']} | {ratio('jax deploy', 'jax train')} | "
                 f"{ratio('jax deploy', 'torch deploy')} | {ratio('jax deploy', 'torch compiled deploy')} | "
                 f"{ratio('jax step', 'torch step')} | {r['equivalence']:.1e} |")
  return "\n".join(lines)


def cudnn_calls(model, variables, x) -> str:
  """The cuDNN custom calls in the optimized HLO, counted by target (conv vs fused conv-bias-activation)."""
  import jax  # pylint: disable=g-import-not-at-top
  hlo = jax.jit(model.apply).lower(variables, x).compile().as_text()
  counts = collections.Counter(re.findall(r'custom_call_target="(__cudnn\$\w+)"', hlo))
  return ", ".join(f"{k.removeprefix('__cudnn$')} x{v}" for k, v in sorted(counts.items())) or "none"


def backend_paths(names, batch: int, size: int, repeats: int, dtypes) -> str:
  """Deploy img/s with each of the backend module's measures switched on for this device's platform, timed
  interleaved with the default in one run."""
  import jax  # pylint: disable=g-import-not-at-top
  import repvgg_jax as rv  # pylint: disable=g-import-not-at-top
  from repvgg_jax import backend, bench  # pylint: disable=g-import-not-at-top

  here = jax.export.default_export_platform()
  settings = {"default": {}, "CPU paths": {"SPECIAL_PATHS": backend.SPECIAL_PATHS | {here}},
              "unfused bias": {"UNFUSED_BIAS": backend.UNFUSED_BIAS | {here}}}
  lines = ["| model | dtype | " + " | ".join(f"{s} img/s" for s in settings) + " | cuDNN calls (default) |",
           "|---|---|" + "---|" * (len(settings) + 1)]
  for name in names:
    for dtype in dtypes:
      deploy = rv.create_model(name, deploy=True, dtype=dtype)
      x = jax.random.normal(jax.random.key(1), (batch, size, size, 3))
      params = jax.jit(deploy.init)(jax.random.key(0), x[:1])
      calls = {}
      for setting, overrides in settings.items():
        saved = {k: getattr(backend, k) for k in overrides}
        for k, v in overrides.items():
          setattr(backend, k, v)
        fn = jax.jit(lambda p, x: deploy.apply(p, x))  # Traced now, under this setting.
        jax.block_until_ready(fn(params, x))
        calls[setting] = functools.partial(lambda f: jax.block_until_ready(f(params, x)), fn)
        for k, v in saved.items():
          setattr(backend, k, v)
      times = bench.time_calls(calls, repeats)
      rates = [batch / sorted(t)[len(t) // 2] for t in times.values()]
      lines.append(f"| {name} | {dtype} | " + " | ".join(f"{r:,.0f}" for r in rates)
                   + f" | {cudnn_calls(deploy, params, x)} |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="folder for gpu_check.md (the report) and tests.log")
  parser.add_argument("--smoke", action="store_true", help="every part at tiny sizes (the CPU, minutes)")
  parser.add_argument("--tests", choices=("run", "collect"), default="run")
  parser.add_argument("--budget_s", type=float, default=None,
                      help="no part starts after this many seconds; default 330 s, with --smoke 1800 s")
  parser.add_argument("--tests_limit_s", type=float, default=None,
                      help="part 1 is stopped after this long; default 200 s, with --smoke 900 s (the CPU is slower)")
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  report = Report(os.path.join(args.out, "gpu_check.md"), time.time())
  limit = args.tests_limit_s or (900.0 if args.smoke else 200.0)
  budget = args.budget_s or (1800.0 if args.smoke else 330.0)
  tests = run_tests(args.tests, limit, os.path.join(args.out, "tests.log"))

  import jax  # pylint: disable=g-import-not-at-top
  from repvgg_jax import bench  # pylint: disable=g-import-not-at-top

  versions = f"jax {jax.__version__}"
  vs_torch = importlib.util.find_spec("timm") is not None
  if vs_torch:
    import timm  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    versions += f", torch {torch.__version__}, timm {timm.__version__}"
  engines = ("jax", "torch") if vs_torch else ("jax",)
  batch, size, repeats = (2, 64, 2) if args.smoke else (128, 224, 10)
  dtypes = ("float32",) if args.smoke else ("float32", "bfloat16")
  report.add("Device", f"{jax.devices()[0].device_kind} ({jax.default_backend()}); {versions}; host: "
                       f"{bench.cpu_description()}; {'smoke sizes' if args.smoke else f'batch {batch}, {size} px'}")
  report.add("1. Tests (serial, the image's packages, the device's default precision)", tests)

  def time_left(part: str) -> bool:
    if report.elapsed() < budget:
      return True
    report.add(part, f"skipped: {report.elapsed():.0f} s used of the {budget:.0f} s budget")
    return False

  rows = []
  for name in PAIR_MODELS[:1] if args.smoke else PAIR_MODELS:  # B3 takes A0's code path, at 10x the CPU time.
    for dtype in dtypes:
      if not time_left(f"2. {name} {dtype}"):
        continue
      row = report.attempt(f"2. {name} {dtype}", lambda: bench.bench_one(  # pylint: disable=cell-var-from-loop
          name, batch, size, dtype, repeats, engines, train_step=True, torch_compile=vs_torch))
      if row is not None:
        rows.append(row)
        report.add(f"2. The two forms against timm ({len(rows)} rows)", forms_table(rows))

  pair_rows = []
  for pair in bench.PAPER_PAIRS[:1] if args.smoke else bench.PAPER_PAIRS:
    if not time_left(f"3. {pair[0]} vs {pair[1]}"):
      break
    row = report.attempt(f"3. {pair[0]} vs {pair[1]}", lambda: bench.bench_pair(  # pylint: disable=cell-var-from-loop
        *pair, batch, size, "float32", repeats, engines))
    if row is not None:
      pair_rows.append(row)
      report.add(f"3. Table 4's pairs, float32 ({len(pair_rows)} of {len(bench.PAPER_PAIRS)})",
                 bench.format_pairs(pair_rows))

  if time_left("4. Backend paths"):
    paths = report.attempt("4. Backend paths", lambda: backend_paths(PAIR_MODELS[:1], batch, size, repeats, dtypes))
    if paths is not None:
      report.add("4. Backend paths (deploy img/s)", paths)
  if time_left("4. Peak activation memory"):
    memory = report.attempt("4. Peak activation memory", lambda: bench.activation_memory(
        ["RepVGG-A0", "ResNet-18"], (1, 2) if args.smoke else (1, 32, 128), size))
    if memory is not None:
      report.add("4. Peak activation memory (float32, MB)", memory)
  report.add("Done", f"{report.elapsed():.0f} s in all")


if __name__ == "__main__":
  main()
