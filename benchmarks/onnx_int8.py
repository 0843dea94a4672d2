"""Post-training static INT8 quantization of the exported quickstart model, measured honestly.

  python train.py --config=configs/quickstart.py --workdir=runs/quickstart
  python benchmarks/onnx_int8.py --workdir=runs/quickstart
  python benchmarks/onnx_int8.py --workdir=runs/mobileone_quickstart --config=configs/mobileone_quickstart.py
  python benchmarks/onnx_int8.py --speed_model=RepVGG-A0 --image_size=224 --repeats=10

Exports the run's deploy params to ONNX (float32), quantizes it with ``onnxruntime.quantization`` (QDQ,
uint8 activations, int8 weights, MinMax calibration on training images), once with per-tensor and once
with per-channel weight scales, then prints accuracy on the whole Fashion-MNIST test split and onnxruntime
throughput (batch 1 and 32, interleaved, non-spinning sessions) for each, and the same for
``<workdir>/deploy_int8.onnx`` where ``python -m repvgg_jax.quantize`` wrote one (its 7-bit weights and ranges),
with the CPU's model and flags (``bench.cpu_description``): what is fastest on one CPU kind says little about
another. RepVGG is known to lose accuracy under naive INT8: the fused kernels' value ranges are wide (identity and 1x1 branches summed
into the centre tap). ``--speed_model`` times the same graphs of an untrained full-size model.
"""

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from repvgg_jax import bench, checkpoints, export, input_pipeline, run_layout, training  # pylint: disable=wrong-import-position


OURS = "ours (int8, 7-bit weights)"  # python -m repvgg_jax.quantize's graph (quantization.py's scheme).


def batches(source, config, split: str, batch_size: int, limit: int = -1):
  """(images NCHW float32, labels, mask) of a split, normalised as for evaluation."""
  config = config.copy_and_resolve_references()
  config.eval_split, config.steps_per_eval = split, limit
  for batch in input_pipeline.eval_batches(source, config, batch_size):
    yield batch["image"].transpose(0, 3, 1, 2), batch["label"], batch["mask"]


class Calibration:  # onnxruntime's CalibrationDataReader protocol, over NCHW float32 batches.

  def __init__(self, nchw_batches):
    self._it = iter(nchw_batches)

  def get_next(self):
    images = next(self._it, None)
    return None if images is None else {"images": np.ascontiguousarray(images)}


def accuracy(session, source, config) -> float:
  correct = total = 0
  for images, labels, mask in batches(source, config, config.eval_split, 500):
    logits = session.run(["logits"], {"images": images})[0]
    correct += float(np.sum((logits.argmax(-1) == labels) * mask))
    total += float(mask.sum())
  return correct / total


def throughput(sessions: dict, batch: int, repeats: int, shape=(1, 28, 28)) -> dict:
  """images/s per session (median), timed round by round, each timed call after one untimed call; the sessions
  do not spin (``export.onnx_session``), so none steals the cores of the next."""
  x = {"images": np.random.default_rng(0).normal(size=(batch,) + tuple(shape)).astype(np.float32)}
  times = {name: [] for name in sessions}
  for _ in range(repeats):
    for name, session in sessions.items():
      session.run(["logits"], x)
      start = time.perf_counter()
      session.run(["logits"], x)
      times[name].append(time.perf_counter() - start)
  return {name: batch / statistics.median(t) for name, t in times.items()}


def onnxruntime_ptq(fp32: str, tmp: str, calibration) -> dict[str, str]:
  """onnxruntime's own static quantization of the float graph ``fp32`` (QDQ, uint8 activations, int8 weights,
  MinMax), per tensor and per channel; ``calibration()`` gives a fresh CalibrationDataReader. Returns the paths."""
  from onnxruntime import quantization as q  # pylint: disable=g-import-not-at-top
  pre = os.path.join(tmp, "pre.onnx")
  q.quant_pre_process(fp32, pre)
  paths = {}
  for name, per_channel in (("ORT PTQ per-tensor", False), ("ORT PTQ per-channel", True)):
    paths[name] = os.path.join(tmp, f"{name.replace(' ', '_')}.onnx")
    q.quantize_static(pre, paths[name], calibration(), quant_format=q.QuantFormat.QDQ, per_channel=per_channel,
                      activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8)
  return paths


def speed_table(sessions: dict, repeats: int, shape) -> str:
  """Markdown: images/s at batch 1 and 32 of each session, against float32 and against ORT's per-channel PTQ."""
  speeds = {b: throughput(sessions, b, repeats, shape) for b in (1, 32)}
  lines = ["| graph | img/s batch 1 | img/s batch 32 | vs float32 (1 / 32) | vs ORT PTQ per-channel (1 / 32) |",
           "|---|---|---|---|---|"]
  for graph in sessions:
    ratio = lambda ref: " / ".join(f"{speeds[b][graph] / speeds[b][ref]:.2f}x" for b in (1, 32))
    lines.append(f"| {graph} | {speeds[1][graph]:,.1f} | {speeds[32][graph]:,.1f} | {ratio('float32')} | "
                 f"{ratio('ORT PTQ per-channel')} |")
  return "\n".join(lines)


def speed_only(name: str, image_size: int, repeats: int) -> None:
  """onnxruntime float32, its own PTQ and our INT8 graph (both calibrated on the same random images)
  of an untrained full-size model: speed only, as accuracy needs ImageNet."""
  import jax  # pylint: disable=g-import-not-at-top
  import repvgg_jax as rv  # pylint: disable=g-import-not-at-top
  from repvgg_jax import quantization  # pylint: disable=g-import-not-at-top
  model, deploy = rv.create_model(name), rv.create_model(name, deploy=True)
  variables = model.init(jax.random.key(0), np.zeros((1, image_size, image_size, 3), np.float32))
  params = rv.reparam(variables["params"], variables["batch_stats"])
  images = [np.random.default_rng(i).normal(size=(8, image_size, image_size, 3)).astype(np.float32) for i in range(2)]
  stats = quantization.calibrate(quantization.fake_quantized(deploy), params, images)
  threads = os.cpu_count() or 1
  with tempfile.TemporaryDirectory() as tmp:
    fp32 = os.path.join(tmp, "fp32.onnx")
    export.to_onnx(deploy, params, fp32)
    paths = {"float32": fp32, **onnxruntime_ptq(fp32, tmp, lambda: Calibration(x.transpose(0, 3, 1, 2) for x in images))}
    sessions = {graph: export.onnx_session(path, threads) for graph, path in paths.items()}
    sessions[OURS] = export.onnx_session(
        export.to_onnx(deploy, params, int8=quantization.int8_layers(params, stats)), threads)
    print(f"\n{name}, {image_size} px, untrained weights, onnxruntime, {threads} threads, non-spinning sessions; "
          f"{bench.cpu_description()}\n")
    print(speed_table(sessions, repeats, (3, image_size, image_size)))


def main():
  import onnxruntime  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", help="a finished run (holds deploy/)")
  parser.add_argument("--config", default=os.path.join(ROOT, "configs", "quickstart.py"), help="the run's config file (28 px models)")
  parser.add_argument("--calibration_batches", type=int, default=16, help="batches of 64 training images")
  parser.add_argument("--repeats", type=int, default=30)
  parser.add_argument("--speed_model", help="instead: float32 vs INT8 speed of this untrained model, e.g. RepVGG-A0")
  parser.add_argument("--image_size", type=int, default=224, help="with --speed_model")
  args = parser.parse_args()
  if args.speed_model:
    speed_only(args.speed_model, args.image_size, args.repeats)
    return
  if not args.workdir:
    parser.error("--workdir or --speed_model is required")
  spec = importlib.util.spec_from_file_location("run_config", args.config)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  source = input_pipeline.get_source(config.dataset, config.data_dir)
  deploy = training.model_from_config(config, source.num_classes, deploy=True)
  params = checkpoints.load_tree(run_layout.path(args.workdir, run_layout.DEPLOY))
  threads = os.cpu_count() or 1
  with tempfile.TemporaryDirectory() as tmp:
    fp32 = os.path.join(tmp, "fp32.onnx")
    export.to_onnx(deploy, params, fp32)
    paths = {"float32": fp32, **onnxruntime_ptq(fp32, tmp, lambda: Calibration(
        images for images, _, _ in batches(source, config, "train", 64, args.calibration_batches)))}
    ours = run_layout.path(args.workdir, run_layout.DEPLOY_INT8_ONNX)  # python -m repvgg_jax.quantize's graph, if written.
    if os.path.exists(ours):
      paths[OURS] = ours
    sessions = {name: export.onnx_session(path, threads) for name, path in paths.items()}
    sizes = {name: os.path.getsize(path) / 2**20 for name, path in paths.items()}
    accuracies = {name: accuracy(session, source, config) for name, session in sessions.items()}
    print(f"\nonnxruntime {onnxruntime.__version__}, {threads} threads, non-spinning sessions, "
          f"{args.calibration_batches * 64} calibration images, Fashion-MNIST test split "
          f"({source.num_examples(config.eval_split)} images); {bench.cpu_description()}\n")
    print("| model | file MB | test accuracy |\n|---|---|---|")
    for name in sessions:
      print(f"| {name} | {sizes[name]:.2f} | {accuracies[name]:.4f} |")
    print(f"\n{speed_table(sessions, args.repeats, (1, 28, 28))}")


if __name__ == "__main__":
  main()
