"""Spec of prediction: a fine-tuned run's images classified by name through its eval preprocessing, the same
top-1 from the JAX deploy params, deploy.onnx and deploy_int8.onnx; converted ImageNet weights without a run."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import repvgg_jax as rv
from repvgg_jax import export, input_pipeline, predict, run_layout, training
from tests.helpers import random_variables
from tests.test_training import tiny_config, tiny_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLOURS = {"blue": (20, 40, 220), "green": (30, 200, 40), "red": (230, 30, 20)}


def write_colour_folder(root, per_class=(12, 4)) -> str:
  """Noisy images of one colour per class, JPEG and PNG, of several sizes: a task 30 steps learn."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for split, count in zip(("train", "val"), per_class):
    for name, colour in COLOURS.items():
      os.makedirs(root / split / name)
      for i in range(count):
        h, w = 20 + 3 * i, 24 + 2 * i
        pixels = np.clip(np.array(colour) + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / split / name / f"{i}.{'png' if i % 2 else 'jpg'}")
  return str(root)


FOLDER_FLAGS = {"dataset": "folder", "train_split": "train", "eval_split": "val", "image_size": 16,
                "batch_size": 12, "num_train_steps": 30, "eval_every_steps": 30, "checkpoint_every_steps": 30,
                "learning_rate": 0.05}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A fine-tuned run: random 10-class weights in a .pth (the head swapped for 3 classes), 30 steps on the
  colour folder, deploy.onnx, then the quantize command's deploy_int8.onnx."""
  pytest.importorskip("onnxruntime")
  pytest.importorskip("torch")
  pytest.importorskip("qwix")
  import torch  # pylint: disable=g-import-not-at-top
  tmp = tmp_path_factory.mktemp("predict")
  data = write_colour_folder(tmp / "data")
  pth = tmp / "pretrained.pth"
  config = tiny_config(data, init_from=str(pth), **FOLDER_FLAGS)
  torch.save(rv.to_pytorch_state_dict(random_variables(
      training.model_from_config(config, 10, half_precision=False), (1, 16, 16, 3))), pth)
  workdir = str(tmp / "run")
  result = training.train_and_evaluate(config, workdir)
  flags = tiny_flags(data, **FOLDER_FLAGS)
  quantized = subprocess.run([sys.executable, "-m", "repvgg_jax.quantize", "--config=configs/quickstart.py",
                              f"--workdir={workdir}", "--calibration_batches=2", *flags], cwd=ROOT,
                             capture_output=True, text=True, timeout=600)
  assert quantized.returncode == 0, quantized.stderr[-3000:]
  images = sorted(os.path.join(root, f) for root, _, files in os.walk(os.path.join(data, "val")) for f in files)
  return workdir, images, result


def test_a_run_names_its_classes_in_labels_txt_and_in_both_onnx_files(run):
  onnx = pytest.importorskip("onnx")
  workdir, _, _ = run
  assert open(os.path.join(workdir, run_layout.LABELS)).read() == "blue\ngreen\nred\n"
  for name in ("deploy.onnx", "deploy_int8.onnx"):
    props = {p.key: p.value for p in onnx.load(os.path.join(workdir, name)).metadata_props}
    assert json.loads(props[export.LABELS_KEY]) == ["blue", "green", "red"]


def test_the_three_engines_give_each_image_the_same_top_1(run):
  workdir, images, result = run
  assert result["deploy_accuracy"] == 1.0  # The colours are learnt: top-1 margins are not a coin's toss.
  answers = {engine: predict.predict(predict.from_workdir(workdir, engine), images, top_k=3)
             for engine in predict.ENGINES}
  expected = [os.path.basename(os.path.dirname(path)) for path in images]
  for engine, best in answers.items():
    assert [b[0][0] for b in best] == expected, engine
    assert all(abs(sum(p for _, p in b) - 1) < 1e-5 for b in best)
  for jax_best, onnx_best in zip(answers["jax"], answers["onnx"]):  # Float32 twice: the same probabilities.
    assert [n for n, _ in jax_best] == [n for n, _ in onnx_best]
    np.testing.assert_allclose([p for _, p in jax_best], [p for _, p in onnx_best], atol=1e-5)


def test_prediction_preprocesses_as_evaluation_does(run):
  workdir, images, _ = run
  config = tiny_config(os.path.dirname(os.path.dirname(os.path.dirname(images[0]))),
                       **FOLDER_FLAGS)
  source = input_pipeline.get_source("folder", config.data_dir, ("train", "val"))
  batch = next(input_pipeline.eval_batches(source, config, 12))
  predictor = predict.from_workdir(workdir)
  np.testing.assert_array_equal(predict.read_images(predictor, images[:12]), batch["image"])


def test_the_command_prints_each_images_top_k_names_and_probabilities(run):
  workdir, images, _ = run
  result = subprocess.run([sys.executable, "-m", "repvgg_jax.predict", f"--workdir={workdir}", "--engine=int8",
                           "--top_k=2", *images[:2]], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  assert [line.split("\t")[0] for line in lines] == images[:2]
  for line, path in zip(lines, images[:2]):
    fields = line.split("\t")[1:]
    assert len(fields) == 2 and fields[0].split(" ", 1)[1] == os.path.basename(os.path.dirname(path))
    assert float(fields[0].split()[0]) >= float(fields[1].split()[0])


def test_converted_imagenet_weights_predict_imagenet_names_as_the_training_form_does(tmp_path):
  torch = pytest.importorskip("torch")
  model = rv.create_model("RepVGG-A0", num_classes=1000)
  variables = random_variables(model, (1, 32, 32, 3))
  torch.save(rv.to_pytorch_state_dict(variables), tmp_path / "a0.pth")
  from PIL import Image  # pylint: disable=g-import-not-at-top
  Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(tmp_path / "x.jpg")
  predictor = predict.from_weights("RepVGG-A0", str(tmp_path / "a0.pth"))
  best = predict.predict(predictor, [str(tmp_path / "x.jpg")], top_k=5)[0]
  image = predict.read_images(predictor, [str(tmp_path / "x.jpg")])
  assert image.shape == (1, 224, 224, 3)
  with jax.default_matmul_precision("highest"):
    logits = np.asarray(model.apply(variables, image, train=False))[0]
  classes = predict.imagenet_classes()
  assert len(classes) == 1000 and classes[0].endswith("(n01440764)")
  assert [name for name, _ in best] == [classes[i] for i in np.argsort(-logits)[:5]]
