"""Converts RepVGG weights between PyTorch .pth files and orbax checkpoints, and exports the plain model to ONNX.

  # PyTorch -> orbax: <out>/train (params + batch_stats, training-time weights only) and <out>/deploy
  python -m repvgg_jax.convert --model=RepVGG-A0 --pth=RepVGG-A0-train.pth --out=converted/a0
  # orbax -> PyTorch (official naming; --naming=timm for timm's)
  python -m repvgg_jax.convert --model=RepVGG-A0 --orbax=runs/a0/deploy --to_pth=a0_deploy.pth
  # -> ONNX (the plain model, checked in onnxruntime against JAX), from orbax or straight from PyTorch
  python -m repvgg_jax.convert --model=RepVGG-A0 --orbax=runs/a0/deploy --to_onnx=a0.onnx
  python -m repvgg_jax.convert --model=RepVGG-A0 --pth=RepVGG-A0-train.pth --to_onnx=a0.onnx

.pth files need the `torch` extra, ONNX the `onnx` extra: pip install -e '.[torch,onnx]'. .safetensors files (timm's
hub format) need neither torch nor anything beyond the core install:
  python -m repvgg_jax.convert --model=RepVGG-A0 --pth=model.safetensors --out=converted/a0
  python -m repvgg_jax.convert --model=RepVGG-A0 --orbax=runs/a0/deploy --to_pth=a0_deploy.safetensors
"""

import os

import jax
from absl import app, flags

from repvgg_jax import checkpoints, cli, export, run_layout
from repvgg_jax.families import create_model, load_pytorch_state_dict, num_classes, to_numpy_state_dict
from repvgg_jax.models import input_channels
from repvgg_jax.torch_weights import as_torch
from repvgg_jax.weights import NEEDS_TORCH, VERIFY_SHAPE, fused, load_orbax, load_pth

flags.DEFINE_string("model", None, "Official variant name, e.g. RepVGG-A0.")
flags.DEFINE_string("pth", None, "PyTorch checkpoint (.pth, .pt) or .safetensors file to read (official or timm "
                    "naming, training-time or deploy).")
flags.DEFINE_string("out", None, "Folder for the orbax checkpoints written from --pth.")
flags.DEFINE_string("orbax", None, "orbax checkpoint to read: training-time variables or deploy params.")
flags.DEFINE_string("to_pth", None, "PyTorch file to write from --orbax; a name ending .safetensors writes that.")
flags.DEFINE_string("to_onnx", None, "ONNX file of the plain model to write from --orbax or --pth.")
flags.DEFINE_enum("naming", "official", ["official", "timm"], "Key naming of the written .pth.")
flags.DEFINE_integer("num_classes", None, "Expected head size; default: read from the checkpoint.")
FLAGS = flags.FLAGS


def write_orbax(variables: dict, deploy_params: dict, out: str) -> list[str]:
  """Writes <out>/train (for training-time variables) and <out>/deploy; returns the folders written."""
  written = []
  if "batch_stats" in variables:
    checkpoints.save_tree(os.path.join(out, "train"), jax.device_get(variables))
    written.append(os.path.join(out, "train"))
  deploy_dir = run_layout.path(out, run_layout.DEPLOY)
  checkpoints.save_tree(deploy_dir, jax.device_get(deploy_params))
  return written + [deploy_dir]


def write_pth(model: str, variables: dict, to_pth: str, naming: str = "official") -> None:
  """Writes training-time variables ({'params', 'batch_stats'}) or deploy params ({'params'}) as a .pth file, or
  as .safetensors (numpy, no torch) where ``to_pth`` ends so."""
  try:
    state_dict = to_numpy_state_dict(variables, naming=naming)
  except ValueError as e:  # A naming the family has none of (timm for QARepVGG, official for RepViT).
    raise cli.UserError(f"--naming={naming}: {e}") from e
  load_pytorch_state_dict(state_dict, model)  # Strict check that these are weights of ``model``.
  if to_pth.endswith(".safetensors"):
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
    save_file(state_dict, to_pth)
  else:
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise cli.UserError(f"--to_pth={to_pth}: {NEEDS_TORCH}") from e
    torch.save(as_torch(state_dict), to_pth)


def write_onnx(model: str, deploy_params: dict, to_onnx: str) -> float:
  """Writes the plain model to ``to_onnx``, checked in onnxruntime first; returns the error."""
  deploy = create_model(model, num_classes=num_classes(deploy_params), deploy=True)
  channels = input_channels(deploy, deploy_params)
  images = jax.random.normal(jax.random.key(1), VERIFY_SHAPE[:3] + (channels,))
  return export.save_checked_onnx(deploy, deploy_params, images, to_onnx)


def main(argv):
  del argv
  if not FLAGS.model:
    raise app.UsageError("--model is required.")
  if bool(FLAGS.pth) == bool(FLAGS.orbax):
    raise app.UsageError("Give exactly one of --pth or --orbax.")
  if (FLAGS.pth and not (FLAGS.out or FLAGS.to_onnx)) or (FLAGS.orbax and not (FLAGS.to_pth or FLAGS.to_onnx)):
    raise app.UsageError("--pth needs --out and/or --to_onnx; --orbax needs --to_pth and/or --to_onnx.")
  try:
    create_model(FLAGS.model)
  except ValueError as e:
    raise cli.UserError(f"--model: {e}") from e
  variables = load_pth(FLAGS.model, FLAGS.pth, FLAGS.num_classes) if FLAGS.pth else load_orbax(FLAGS.model,
                                                                                               FLAGS.orbax)
  # Fused (and checked) once, for whichever outputs need the plain model.
  deploy_params = fused(FLAGS.model, variables) if FLAGS.out or FLAGS.to_onnx else None
  if FLAGS.pth and FLAGS.out:
    for path in write_orbax(variables, deploy_params, FLAGS.out):
      print(f"wrote {path}")
  if FLAGS.orbax and FLAGS.to_pth:
    write_pth(FLAGS.model, variables, FLAGS.to_pth, FLAGS.naming)
    print(f"wrote {FLAGS.to_pth}")
  if FLAGS.to_onnx:
    error = write_onnx(FLAGS.model, deploy_params, FLAGS.to_onnx)
    print(f"wrote {FLAGS.to_onnx} (onnxruntime vs JAX: {error:.1e} of the largest logit)")


if __name__ == "__main__":
  cli.run(main)
