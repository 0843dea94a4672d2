"""Does pretraining help on a small dataset? Fine-tuning, a linear probe and training from scratch, on real images.

  python benchmarks/finetune_fashion_mnist.py [--out=/tmp/finetune] [--seeds=0,1,2] [--per_class=10,50,500]

Fashion-MNIST (Debian's dataset-fashion-mnist) written as two image folders of grey PNGs (the layout
``config.dataset="folder"`` reads; grey becomes RGB): "pretrain", the 30,000 training images of classes 0-4
(T-shirt/top, Trouser, Pullover, Dress, Coat) with their 5,000 test images; and "target" with classes 5-9 (Sandal,
Shirt, Sneaker, Bag, Ankle boot): ``--per_class`` training images per class (the same ones for every method and
seed) and all 5,000 test images.

The quickstart model (RepVGG-A0's depths at a quarter width) is pretrained on "pretrain" with the quickstart
recipe (``--pretrain_epochs``). Then, for each training-set size, three runs per seed with the same recipe and
number of steps (``--steps`` of batch ``--batch``, SGD with Nesterov momentum, cosine learning rate, label
smoothing 0.1, flips): fine-tuning from the pretrained run (``init_from``, the classifier re-initialized), a
linear probe (``init_from`` with ``freeze`` on everything but the classifier) and from scratch. Prints the deploy
model's test accuracy on the 5,000 target test images (mean and spread over seeds) and writes ``results.json``.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import quickstart  # noqa: E402  pylint: disable=wrong-import-position
from repvgg_jax import input_pipeline, training  # noqa: E402  pylint: disable=wrong-import-position

PRETRAIN_CLASSES, TARGET_CLASSES = range(0, 5), range(5, 10)
METHODS = {"fine-tune": {}, "linear probe": {"freeze": ("^(?!linear/)",)}, "scratch": None}


def write_folder(root: str, images: np.ndarray, labels: np.ndarray, classes, split: str, per_class=None) -> None:
  """``root/split/<class name>/<index>.png``; ``per_class`` keeps the first that many of each class."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for label in classes:
    folder = os.path.join(root, split, input_pipeline.FASHION_MNIST_CLASSES[label].replace("/", "-"))
    os.makedirs(folder, exist_ok=True)
    for index in np.flatnonzero(labels == label)[:per_class]:
      Image.fromarray(images[index], mode="L").save(os.path.join(folder, f"{index:05d}.png"))


def fashion_mnist(split: str):
  images, labels = input_pipeline._fashion_mnist_paths(input_pipeline.FASHION_MNIST_DIR, split)  # pylint: disable=protected-access
  return input_pipeline.read_idx(images), input_pipeline.read_idx(labels)


def recipe(data_dir: str, **fields):
  """The quickstart recipe on an image folder (3-channel RGB from the grey PNGs, ImageNet's normalization)."""
  config = quickstart.get_config()
  config.update(dataset="folder", data_dir=data_dir, train_split="train", eval_split="test", export_onnx=False,
                log_every_steps=50, **fields)
  return config


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="/tmp/finetune")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--per_class", default="10,50,500")
  parser.add_argument("--pretrain_epochs", type=float, default=3)
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--batch", type=int, default=50)
  args = parser.parse_args()
  seeds, sizes = [int(s) for s in args.seeds.split(",")], [int(n) for n in args.per_class.split(",")]
  (train_x, train_y), (test_x, test_y) = fashion_mnist("train"), fashion_mnist("test")

  pretrain_dir = os.path.join(args.out, "data", "pretrain")
  if not os.path.isdir(pretrain_dir):
    write_folder(pretrain_dir, train_x, train_y, PRETRAIN_CLASSES, "train")
    write_folder(pretrain_dir, test_x, test_y, PRETRAIN_CLASSES, "test")
  pretrained = os.path.join(args.out, "runs", "pretrain")
  start = time.time()
  result = training.train_and_evaluate(recipe(pretrain_dir, num_epochs=args.pretrain_epochs), pretrained)
  print(f"pretrained on classes 0-4 ({len(np.flatnonzero(train_y < 5))} images, {args.pretrain_epochs} epochs): "
        f"test accuracy {result['deploy_accuracy']:.4f} ({time.time() - start:.0f} s)", flush=True)

  results = {"pretrain_accuracy": result["deploy_accuracy"], "runs": []}
  for n in sizes:
    target_dir = os.path.join(args.out, "data", f"target_{n}")
    if not os.path.isdir(target_dir):
      write_folder(target_dir, train_x, train_y, TARGET_CLASSES, "train", per_class=n)
      write_folder(target_dir, test_x, test_y, TARGET_CLASSES, "test")
    for method, fields in METHODS.items():
      for seed in seeds:
        initial = {} if fields is None else {"init_from": pretrained, **fields}
        config = recipe(target_dir, seed=seed, num_train_steps=args.steps, batch_size=min(args.batch, 5 * n),
                        warmup_epochs=0.0, eval_every_steps=args.steps, checkpoint_every_steps=args.steps,
                        **initial)
        workdir = os.path.join(args.out, "runs", f"{n}_{method.replace(' ', '_')}_{seed}")
        accuracy = training.train_and_evaluate(config, workdir)["deploy_accuracy"]
        results["runs"].append({"per_class": n, "method": method, "seed": seed, "accuracy": accuracy})
        print(f"{n} per class, {method}, seed {seed}: test accuracy {accuracy:.4f}", flush=True)

  print(f"\n| training images per class (classes 5-9) | {' | '.join(METHODS)} |")
  print("|---|" + "---|" * len(METHODS))
  for n in sizes:
    cells = []
    for method in METHODS:
      values = [r["accuracy"] for r in results["runs"] if r["per_class"] == n and r["method"] == method]
      cells.append(f"{np.mean(values):.1%} ({min(values):.1%}-{max(values):.1%})")
    print(f"| {n} | " + " | ".join(cells) + " |")
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump({**results, "args": vars(args)}, f, indent=1)


if __name__ == "__main__":
  main()
