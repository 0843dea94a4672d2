"""The INT8 results of finished runs, side by side: accuracy (float32, PTQ, QAT, onnxruntime INT8) at W8A8 and the
W4A8 stress setting, and the per-layer quantization error (SQNR) of fused kernels and activations.

  python -m repvgg_jax.quantize --config=configs/quickstart.py --workdir=W --qat_epochs=1 [--weight_bits=4]
  python benchmarks/int8_table.py --workdirs=runs/quickstart,runs/qarepvgg_quickstart

Reads ``<workdir>/int8_metrics.json`` and ``<workdir>/w4a8_metrics.json``; prints markdown tables.
"""

import argparse
import json
import os

import numpy as np


def load(workdir: str, name: str):
  path = os.path.join(workdir, name)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def cell(metrics, key: str) -> str:
  return "-" if metrics is None or metrics.get(key) is None else f"{metrics[key]:.4f}"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdirs", required=True, help="comma-separated run folders")
  args = parser.parse_args()
  runs = {w: (load(w, "int8_metrics.json"), load(w, "w4a8_metrics.json")) for w in args.workdirs.split(",")}
  print("| run | float32 | W8A8 PTQ | W8A8 QAT | onnxruntime INT8 | ORT vs JAX: same class, max err / spread "
        "| W4A8 PTQ | W4A8 QAT |")
  print("|---|---|---|---|---|---|---|---|")
  for workdir, (w8, w4) in runs.items():
    agree = (f"{w8['onnx_vs_jax']['argmax_agreement']:.1%}, {w8['onnx_vs_jax']['max_error_vs_spread']:.3f}"
             if w8 and "onnx_vs_jax" in w8 else "-")
    print(f"| {workdir} | {cell(w8, 'float32')} | {cell(w8, 'ptq')} | {cell(w8, 'qat')} | {cell(w8, 'onnx_int8')} "
          f"| {agree} | {cell(w4, 'ptq')} | {cell(w4, 'qat')} |")
  print()
  print("Per-layer SQNR (dB) of the PTQ model, W8: fused kernels per tensor and per output channel, and the static-"
        "range activations at each layer's input (mean over layers; min and its layer)")
  print()
  print("| run | kernels per tensor: mean / min | kernels per channel: mean / min | activations: mean / min "
        "| largest fused weight: max abs (layer) |")
  print("|---|---|---|---|---|")
  for workdir, (w8, _) in runs.items():
    if not w8:
      continue
    kernels = w8["kernel_sqnr_db"]
    tensor = {k: v["per_tensor"] for k, v in kernels.items()}
    channel = {k: v["per_channel"] for k, v in kernels.items()}
    cells = []
    for values in (tensor, channel, w8["activation_sqnr_db"]):
      worst = min(values, key=values.get)
      cells.append(f"{np.mean(list(values.values())):.1f} / {values[worst]:.1f} ({worst})")
    absmax = w8.get("kernel_absmax")
    largest = max(absmax, key=absmax.get) if absmax else None
    cells.append(f"{absmax[largest]:.1f} ({largest})" if largest else "-")
    print(f"| {workdir} | {' | '.join(cells)} |")


if __name__ == "__main__":
  main()
