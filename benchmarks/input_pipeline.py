"""Input pipeline throughput on ImageNet-like JPEGs, and the host cores that feeding an accelerator takes.

  python benchmarks/input_pipeline.py [--images=256] [--threads=1,2] [--out=benchmarks/input_pipeline.json]

Writes ``--images`` generated 500x375 JPEGs (quality 90, ImageNet's typical size) as an image folder
(<tmp>/train/<class>/<image>.jpg, the layout ``config.dataset="folder"`` reads), then times the project's own
pipelines (``input_pipeline.train_dataset`` / ``eval_batches``, 224 px, the fused JPEG decode-and-crop) at each
thread count: training (RandomResizedCrop + flip), training with AutoAugment, with RandAugment, and eval (centre
crop). From the one-thread figure (images/s per core) it prints the cores needed to feed one and eight
accelerators at the training-step rates recorded on one H200 (A0, batch 256: 8,489 img/s fp32, 14,276 bf16), and
the host side of the copy to the device: bytes per second per accelerator, and the host re-stack that flax's
``prefetch_to_device`` would add per batch.
"""

import argparse
import json
import math
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import default  # noqa: E402  pylint: disable=wrong-import-position
from repvgg_jax import input_pipeline as ip  # noqa: E402  pylint: disable=wrong-import-position

H200_STEP_RATES = {"fp32": 8489, "bf16": 14276}  # A0 training step, batch 256 (benchmarks/RESULTS.md).
BATCH = 32


def write_jpegs(root: str, count: int, classes: int = 4) -> None:
  """Smooth random fields plus grain: JPEG sizes like photographs' (~100-150 KB at quality 90), not flat."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for i in range(count):
    coarse = rng.uniform(0, 255, size=(12, 16, 3)).astype(np.float32)
    image = tf.image.resize(coarse[None], (375, 500), method="bicubic")[0].numpy()
    image = np.clip(image + rng.normal(0, 18, size=image.shape), 0, 255).astype(np.uint8)
    for split in ("train", "validation"):
      folder = os.path.join(root, split, f"class_{i % classes}")
      os.makedirs(folder, exist_ok=True)
      with open(os.path.join(folder, f"{i:05d}.jpg"), "wb") as f:
        f.write(tf.io.encode_jpeg(image, quality=90).numpy())


def config_for(mode: str, threads: int):
  config = default.get_config()
  config.dataset, config.shuffle_buffer, config.input_threads = "folder", 1024, threads
  config.autoaugment_strength = 1.0 if mode == "train + AutoAugment" else 0.0
  config.randaugment_magnitude = 10 if mode == "train + RandAugment" else 0
  return config


def images_per_second(source, mode: str, threads: int, count: int) -> float:
  config = config_for(mode, threads)
  if mode == "eval":
    def run():
      return sum(len(b["label"]) for b in ip.eval_batches(source, config, BATCH))
  else:
    def run():
      batches = ip.train_dataset(source, config, BATCH, seed=0).take(count // BATCH)
      return sum(len(b["label"]) for b in batches.as_numpy_iterator())
  run()  # Warm-up: tracing, and the files into the page cache.
  start = time.perf_counter()
  images = run()
  return images / (time.perf_counter() - start)


def restack_seconds(batch: int = 256) -> float:
  """flax's prefetch_to_device does np.stack(list(x)) on each sharded batch: one host copy."""
  x = np.ones((1, batch, 224, 224, 3), np.float32)
  np.stack(list(x))
  start = time.perf_counter()
  for _ in range(5):
    np.stack(list(x))
  return (time.perf_counter() - start) / 5


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=256)
  parser.add_argument("--threads", default="1,2")
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  thread_counts = [int(t) for t in args.threads.split(",")]
  ip.configure_host(max(thread_counts))
  modes = ("train", "train + AutoAugment", "train + RandAugment", "eval")
  with tempfile.TemporaryDirectory() as root:
    write_jpegs(root, args.images)
    source = ip.get_source("folder", root, ("train", "validation"))
    rates = {(m, t): images_per_second(source, m, t, args.images) for m in modes for t in thread_counts}
  print(f"Input pipeline, {args.images} JPEGs 500x375 q90 -> 224 px, batch {BATCH}, {ip.usable_cores()} usable "
        "cores, images/s:")
  print(f"| preprocessing | {' | '.join(f'{t} thread' + ('s' if t > 1 else '') for t in thread_counts)} "
        "| per core (1 thread) |")
  print("|---|" + "---|" * (len(thread_counts) + 1))
  for m in modes:
    print(f"| {m} | {' | '.join(f'{rates[m, t]:,.0f}' for t in thread_counts)} | {rates[m, thread_counts[0]] / thread_counts[0]:,.0f} |")
  print("\nHost cores to feed H200s at the recorded A0 training-step rates (per-core figure above, linear):")
  print("| preprocessing | " + " | ".join(f"1 GPU {k} | 8 GPUs {k}" for k in H200_STEP_RATES) + " |")
  print("|---|" + "---|" * (2 * len(H200_STEP_RATES)))
  for m in modes[:3]:
    per_core = rates[m, thread_counts[0]] / thread_counts[0]
    cells = [str(math.ceil(n * rate / per_core)) for rate in H200_STEP_RATES.values() for n in (1, 8)]
    print(f"| {m} | {' | '.join(cells)} |")
  restack = restack_seconds()
  image_bytes = 224 * 224 * 3 * 4
  print(f"\nHost to device: {image_bytes / 1e3:.0f} KB per float32 image, so "
        + ", ".join(f"{rate * image_bytes / 1e9:.1f} GB/s per H200 ({k})" for k, rate in H200_STEP_RATES.items())
        + f"; flax's host re-stack of a 256-image batch: {restack * 1e3:.0f} ms "
        f"(the H200 fp32 step: {256 / H200_STEP_RATES['fp32'] * 1e3:.0f} ms); steps.prefetch_to_device has none.")
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"rates": {f"{m} @ {t}": r for (m, t), r in rates.items()}, "restack_s": restack}, f, indent=1)


if __name__ == "__main__":
  main()
