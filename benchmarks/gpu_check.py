"""The accelerator check: tests, the bench table and the backend-path measurements, on one GPU, in one go.

  python benchmarks/gpu_check.py            # on an H100/H200 with JAX, torch and timm (TensorFlow not needed)
  python benchmarks/gpu_check.py --smoke    # anywhere: tiny sizes, float32 only, proves the script runs

1. The model, reparam, equivalence, backend and export tests, with TensorFlow blocked (tests/no_tensorflow.py).
2. The bench at the paper's protocol (batch 128, 224 px), float32 and bfloat16, against timm on the same
   device, eager and torch.compile'd, with the equivalence error at HIGHEST precision.
3. The backend paths: deploy throughput with the CPU-only paths (backend.SPECIAL_PATHS) and the unfused
   bias (backend.UNFUSED_BIAS) switched on for this backend, and the cuDNN calls in XLA's optimized HLO.
4. The paper's headline at its protocol: Table 4's pairs (RepVGG deploy vs ResNet, BN folded; and timm's pair)
   at batch 128 and batch 1, float32 and bfloat16, and the peak activation memory at batch 1, 32, 128.
Prints a short summary table last. Numbers go into benchmarks/RESULTS.md with the card's name.
"""

import argparse
import collections
import functools
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TESTS = ["tests/test_models.py", "tests/test_reparam.py", "tests/test_equivalence.py", "tests/test_backend.py",
         "tests/test_export.py"]


def run_tests(smoke: bool) -> str:
  command = [sys.executable, "tests/no_tensorflow.py", "-m", "pytest", "-q", "-p", "no:cacheprovider"]
  command += ["tests/test_equivalence.py", "-k", "bn_epsilon_twice"] if smoke else TESTS
  start = time.time()
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
  summary = (result.stdout.strip().splitlines() or ["(no output)"])[-1]
  print(result.stdout[-4000:], result.stderr[-2000:], sep="\n", flush=True)
  return f"{summary} ({time.time() - start:.0f} s)"


def cudnn_calls(model, variables, x) -> str:
  """The cuDNN custom calls in the optimized HLO, counted by target (conv vs fused conv-bias-activation)."""
  import jax  # pylint: disable=g-import-not-at-top
  hlo = jax.jit(model.apply).lower(variables, x).compile().as_text()
  counts = collections.Counter(re.findall(r'custom_call_target="(__cudnn\$\w+)"', hlo))
  return ", ".join(f"{k.removeprefix('__cudnn$')} x{v}" for k, v in sorted(counts.items())) or "none"


def backend_paths(names, batch: int, size: int, repeats: int, dtypes) -> list[str]:
  """Deploy img/s per backend setting, each timed interleaved with the default in one run."""
  import jax  # pylint: disable=g-import-not-at-top
  import repvgg_jax as rv  # pylint: disable=g-import-not-at-top
  from repvgg_jax import backend, bench  # pylint: disable=g-import-not-at-top

  here = jax.default_backend()
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
  return lines


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--smoke", action="store_true", help="tiny sizes, no torch.compile: proves the script runs")
  parser.add_argument("--models", default="RepVGG-A0,RepVGG-B0,RepVGG-B1g4,RepVGG-B3")
  args = parser.parse_args()
  start = time.time()
  tests = run_tests(args.smoke)

  import jax  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  from repvgg_jax import bench  # pylint: disable=g-import-not-at-top

  names = ["RepVGG-A0"] if args.smoke else args.models.split(",")
  batch, size, repeats = (2, 64, 2) if args.smoke else (128, 224, 20)
  vs_torch = importlib.util.find_spec("timm") is not None
  engines = ("jax", "torch") if vs_torch else ("jax",)
  dtypes = ("float32",) if args.smoke else ("float32", "bfloat16")
  rows = []
  for name in names:
    for dtype in dtypes:
      rows.append(bench.bench_one(name, batch, size, dtype, repeats, engines,
                                  torch_compile=vs_torch and not args.smoke))
      print(f"done: {name} {dtype} ({time.time() - start:.0f} s)", flush=True)
  paths = backend_paths(["RepVGG-A0"] if args.smoke else ["RepVGG-A0", "RepVGG-B3"], batch, size, repeats, dtypes)
  pairs = bench.PAPER_PAIRS[:1] if args.smoke else bench.PAPER_PAIRS
  pair_rows = [bench.bench_pair(*pair, b, size, dtype, repeats, engines)
               for pair in pairs for b in (1, batch) for dtype in dtypes]
  pair_models = list(dict.fromkeys(name for pair in pairs for name in pair))
  memory = bench.activation_memory(pair_models, (1, 2) if args.smoke else (1, 32, 128), size)
  print(f"done: pairs and memory ({time.time() - start:.0f} s)", flush=True)

  print(f"\n## {jax.devices()[0].device_kind}: jax {jax.__version__}, batch {batch}, {size} px\n")
  print(bench.format_table(rows))
  print("\n" + "\n".join(paths))
  print(f"\n### The paper's pairs (Table 4: 1080Ti, batch 128, fp32)\n\n{bench.format_pairs(pair_rows)}")
  print(f"\n### Peak activation memory (float32)\n\n{memory}")
  print(f"\n## Summary ({time.time() - start:.0f} s in all)\n\ntests: {tests}\n")
  print("| model | dtype | deploy/train | deploy ours/timm | deploy ours/compiled timm | max rel err (HIGHEST) |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    deploy = r["jax deploy"]["img_s"]
    ratio = lambda key: f"{deploy / r[key]['img_s']:.2f}x" if key in r else "-"  # pylint: disable=cell-var-from-loop
    print(f"| {r['model']} | {r['dtype']} | {deploy / r['jax train']['img_s']:.2f}x | {ratio('torch deploy')} | "
          f"{ratio('torch compiled deploy')} | {r['equivalence']:.1e} |")


if __name__ == "__main__":
  main()
