"""Each image's top-k classes, from a finished run's deploy model or from converted ImageNet weights.

  python -m repvgg_jax.predict --workdir=runs/flowers photo.jpg more/*.png [--top_k=5] [--engine=jax|onnx|int8]
  python -m repvgg_jax.predict --model=RepVGG-A0 --pth=RepVGG-A0-train.pth photo.jpg   # ImageNet's 1,000 classes

A run's images go through its evaluation preprocessing (the centre crop of eval_crop_ratio, resized to the eval
size, normalized as in training; ``<workdir>/inference.json``) and its class names are ``<workdir>/labels.txt``.
``--engine``: the deploy params in JAX, ``deploy.onnx`` or ``deploy_int8.onnx`` (``repvgg_jax.quantize``) in
onnxruntime. Converted weights (``--pth`` or ``--orbax``, either form) run in JAX at 224 px, crop 0.875, with
ImageNet's normalization and class names (tensorflow-datasets' list; with timm installed, its descriptions too).
"""

import dataclasses
import json
import os
from typing import Callable, Sequence

import jax
import numpy as np
import tensorflow as tf
from absl import app, flags

from repvgg_jax import checkpoints, cli, export, families, input_pipeline, run_layout, weights
from repvgg_jax.models import given_overrides

ENGINE_FILES = {"onnx": run_layout.DEPLOY_ONNX, "int8": run_layout.DEPLOY_INT8_ONNX}
ENGINES = ("jax",) + tuple(ENGINE_FILES)


@dataclasses.dataclass(frozen=True)
class Predictor:
  """A model's logits of preprocessed images, (N, size, size, channels) -> (N, classes), with what its inputs
  need (``input_pipeline.image_files``' arguments) and its class names in label order."""

  logits: Callable[[np.ndarray], np.ndarray]
  classes: tuple[str, ...]
  channels: int
  image_size: int
  crop_ratio: float
  mean: tuple[float, ...]
  std: tuple[float, ...]


def _deploy_model(name: str, overrides: dict, num_classes: int):
  return families.create_model(name, num_classes=num_classes, deploy=True, **given_overrides(overrides))


def _jax_logits(model, params) -> Callable[[np.ndarray], np.ndarray]:
  forward = jax.jit(lambda images: model.apply({"params": params}, images))
  return lambda images: np.asarray(forward(images))


def _onnx_logits(path: str) -> Callable[[np.ndarray], np.ndarray]:
  try:
    session = export.onnx_session(path)
  except ImportError as e:
    raise cli.UserError("the onnx engines need onnxruntime: pip install 'repvgg-jax[onnx]'.") from e
  return lambda images: session.run(["logits"], {"images": images.transpose(0, 3, 1, 2)})[0]


def from_workdir(workdir: str, engine: str = "jax") -> Predictor:
  """The deploy model of the finished run in ``workdir``, run by ``engine`` (one of ``ENGINES``)."""
  record_path = run_layout.path(workdir, run_layout.INFERENCE)
  if not os.path.isfile(record_path):
    raise cli.UserError(f"{workdir} holds no finished run ({run_layout.INFERENCE}, written when train.py ends, "
                        "is missing).")
  with open(record_path) as f:
    record = json.load(f)
  labels_path = run_layout.path(workdir, run_layout.LABELS)
  classes = tuple(f"class {i}" for i in range(record["num_classes"]))
  if os.path.isfile(labels_path):
    with open(labels_path) as f:
      classes = tuple(line.rstrip("\n") for line in f)
  if engine == "jax":
    model = _deploy_model(record["model"], record["model_overrides"], record["num_classes"])
    logits = _jax_logits(model, checkpoints.load_tree(run_layout.path(workdir, run_layout.DEPLOY)))
  else:
    path = run_layout.path(workdir, ENGINE_FILES[engine])
    if not os.path.isfile(path):
      make = ("python -m repvgg_jax.quantize --config=<the run's config> --workdir=" + workdir if engine == "int8"
              else "train with export_onnx=True and the onnx extra")
      raise cli.UserError(f"{path} does not exist ({make}); or use --engine=jax.")
    logits = _onnx_logits(path)
  return Predictor(logits, classes, record["channels"], record["image_size"], record["crop_ratio"],
                   tuple(record["mean"]), tuple(record["std"]))


def imagenet_classes() -> tuple[str, ...]:
  """ImageNet-1k's class names in label order: WordNet ids from tensorflow-datasets, with timm's descriptions
  where timm is installed ("tench, Tinca tinca (n01440764)")."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  synsets = (tfds.core.tfds_path() / "datasets" / "imagenet2012" / "labels.txt").read_text().split()
  try:
    from timm.data import ImageNetInfo  # pylint: disable=g-import-not-at-top
  except ImportError:
    return tuple(synsets)
  info = ImageNetInfo()
  return tuple(f"{info.label_name_to_description(s)} ({s})" for s in synsets)


def from_weights(model: str, path: str, flag: str = "--pth", image_size: int = 224,
                 crop_ratio: float = 0.875) -> Predictor:
  """Converted ImageNet weights (a .pth / .safetensors file or an orbax tree, either form) of ``model``;
  ``flag`` names the path in the messages."""
  try:
    _deploy_model(model, {}, 1000)
  except ValueError as e:
    raise cli.UserError(f"--model: {e}") from e
  params = weights.fused(model, weights.load_any(model, path, flag))
  num_classes = families.num_classes(params)
  classes = imagenet_classes() if num_classes == 1000 else tuple(f"class {i}" for i in range(num_classes))
  return Predictor(_jax_logits(_deploy_model(model, {}, num_classes), params), classes, 3, image_size, crop_ratio,
                   input_pipeline.IMAGENET_MEAN, input_pipeline.IMAGENET_STD)


def check_images(paths: Sequence[str]) -> None:
  """UserError for the first path that is missing or not a JPEG or PNG file."""
  for path in paths:
    if not os.path.isfile(path):
      raise cli.UserError(f"{path}: no such file.")
    if not input_pipeline.starts_as_an_image(path):
      raise cli.UserError(f"{path} is not a JPEG or PNG image (its first bytes say otherwise).")


def read_images(predictor: Predictor, paths: Sequence[str]) -> np.ndarray:
  """The images as ``predictor``'s model takes them; a missing file or one that is not an image: UserError."""
  check_images(paths)
  try:
    return input_pipeline.image_files(paths, predictor.channels, predictor.image_size, predictor.crop_ratio,
                                      predictor.mean, predictor.std)
  except tf.errors.OpError as e:
    raise cli.UserError(f"an image does not decode ({cli.one_line(e)[:200]}).") from e


def predict(predictor: Predictor, paths: Sequence[str], top_k: int = 5,
            batch_size: int = 32) -> list[list[tuple[str, float]]]:
  """Each image's ``top_k`` (class name, probability), most probable first."""
  results = []
  for start in range(0, len(paths), batch_size):
    logits = np.asarray(predictor.logits(read_images(predictor, paths[start:start + batch_size])), np.float64)
    probabilities = np.exp(logits - logits.max(-1, keepdims=True))
    probabilities /= probabilities.sum(-1, keepdims=True)
    for row in probabilities:
      best = np.argsort(-row, kind="stable")[:top_k]
      results.append([(predictor.classes[i], float(row[i])) for i in best])
  return results


def main(argv):
  flags_ = flags.FLAGS
  images = argv[1:]
  if not images:
    raise app.UsageError("Give one or more image files.")
  if bool(flags_.workdir) == bool(flags_.model):
    raise app.UsageError("Give --workdir (a finished run) or --model with --pth or --orbax (converted weights).")
  if flags_.top_k < 1:
    raise app.UsageError("--top_k must be >= 1.")
  check_images(images)  # Before any model is read.
  if flags_.workdir:
    if flags_.pth or flags_.orbax:
      raise app.UsageError("--pth and --orbax go with --model, not --workdir.")
    predictor = from_workdir(flags_.workdir, flags_.engine)
  else:
    if bool(flags_.pth) == bool(flags_.orbax):
      raise app.UsageError("--model needs exactly one of --pth or --orbax.")
    if flags_.engine != "jax":
      raise app.UsageError("converted weights run in JAX; for onnxruntime, write an ONNX file with "
                           "python -m repvgg_jax.convert --to_onnx, or fine-tune a run.")
    predictor = from_weights(flags_.model, flags_.pth or flags_.orbax, "--pth" if flags_.pth else "--orbax")
  for path, best in zip(images, predict(predictor, images, flags_.top_k)):
    print(path + "".join(f"\t{p:.4f} {name}" for name, p in best))


def _define_flags():
  flags.DEFINE_string("workdir", None, "A finished run's workdir (holds inference.json, labels.txt, deploy/).")
  flags.DEFINE_enum("engine", "jax", list(ENGINES), "jax: the deploy params; onnx: deploy.onnx; int8: "
                    "deploy_int8.onnx (both in onnxruntime).")
  flags.DEFINE_integer("top_k", 5, "Classes shown per image.")
  flags.DEFINE_string("model", None, "Without a run: the official variant name of --pth / --orbax, e.g. RepVGG-A0.")
  flags.DEFINE_string("pth", None, "Without a run: a .pth / .pt / .safetensors file of ImageNet weights.")
  flags.DEFINE_string("orbax", None, "Without a run: an orbax tree (convert --out's train/ or deploy/).")


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
