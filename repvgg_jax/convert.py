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

from repvgg_jax import checkpoints, cli, export
from repvgg_jax.equivalence import check_equivalence
from repvgg_jax.models import check_variables, create_model
from repvgg_jax.reparam import reparam
from repvgg_jax.torch_weights import as_torch, load_pytorch_state_dict, to_numpy_state_dict

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


NEEDS_TORCH = ("a .pth file needs torch (pip install 'repvgg-jax[torch]'); .safetensors files need no torch "
               "(timm's hub files are .safetensors).")


def unwrap_state_dict(obj) -> dict:
  """A .pth holds a state_dict, or a training checkpoint {'state_dict'|'model': state_dict, ...}."""
  for key in ("state_dict", "model"):
    if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
      return obj[key]
  return obj


VERIFY_SHAPE = (2, 64, 64, 3)  # Random images on which a converted training-time model must equal its fusion.


def _deploy_params(model: str, variables: dict) -> dict:
  """Deploy params of loaded weights: training-time ones are fused and checked (HIGHEST precision) first."""
  if "batch_stats" not in variables:
    return variables["params"]
  deploy_params = reparam(variables["params"], variables["batch_stats"])
  classes = variables["params"]["linear"]["kernel"].shape[-1]
  error = check_equivalence(create_model(model, num_classes=classes), variables,
                            create_model(model, num_classes=classes, deploy=True), deploy_params,
                            jax.random.normal(jax.random.key(0), VERIFY_SHAPE))
  print(f"verified: the fused model equals the training-time model to {error:.1e} of the largest logit")
  return deploy_params


def _read_state_dict(path: str) -> dict:
  """The state_dict in a .safetensors file (numpy, no torch) or a .pth/.pt file (torch)."""
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    return load_file(path)
  import torch  # pylint: disable=g-import-not-at-top
  return unwrap_state_dict(torch.load(path, map_location="cpu", weights_only=True))


def load_pth(model: str, pth: str, num_classes=None) -> dict:
  """A .pth or .safetensors file's weights as Flax variables ({'params'[, 'batch_stats']}); a file that cannot be
  read, or weights of another model, raise ``cli.UserError``."""
  if not os.path.isfile(pth):
    raise cli.UserError(f"--pth={pth}: no such file.")
  try:
    state_dict = _read_state_dict(pth)
  except ImportError as e:
    raise cli.UserError(f"--pth={pth}: {NEEDS_TORCH}") from e
  except Exception as e:  # pylint: disable=broad-except  # Whatever the reader fails on, the file is the cause.
    reason = cli.one_line(e).split(". ")[0][:200]
    kind = "safetensors" if pth.endswith(".safetensors") else "PyTorch checkpoint torch can read"
    raise cli.UserError(f"--pth={pth} is not a {kind} ({reason}); is the download complete, and is it a "
                        ".pth/.pt or .safetensors file?") from e
  try:
    return load_pytorch_state_dict(state_dict, model, num_classes=num_classes)
  except ValueError as e:
    raise cli.UserError(f"--pth={pth}: {e}") from e


def load_orbax(model: str, orbax_path: str) -> dict:
  """An orbax tree (training-time variables or deploy params) of ``model`` as Flax variables; a folder that is not
  such a checkpoint raises ``cli.UserError``."""
  if not os.path.isdir(orbax_path):
    raise cli.UserError(f"--orbax={orbax_path}: no such folder; give the folder train.py or --out wrote (e.g. "
                        "<workdir>/deploy).")
  try:
    tree = checkpoints.load_tree(orbax_path)
  except Exception as e:  # pylint: disable=broad-except  # orbax's errors for a folder it cannot read vary.
    raise cli.UserError(f"--orbax={orbax_path} is not an orbax checkpoint ({cli.one_line(e)[:200]}); give the "
                        "folder train.py or --out wrote (e.g. <workdir>/deploy).") from e
  variables = tree if "params" in tree else {"params": tree}
  try:
    classes = variables["params"]["linear"]["kernel"].shape[-1]
    stem = jax.tree_util.tree_flatten_with_path(variables["params"]["stage0"])[0]
    channels = next(leaf.shape[2] for path, leaf in stem if path[-1].key == "kernel")  # (kh, kw, image channels, out)
    check_variables(create_model(model, num_classes=classes, deploy="batch_stats" not in variables), variables,
                    channels)
  except (KeyError, TypeError, ValueError, StopIteration) as e:
    raise cli.UserError(f"--orbax={orbax_path} holds no {model} weights: {cli.one_line(e)}") from e
  return variables


def write_orbax(variables: dict, deploy_params: dict, out: str) -> list[str]:
  """Writes <out>/train (for training-time variables) and <out>/deploy; returns the folders written."""
  written = []
  if "batch_stats" in variables:
    checkpoints.save_tree(os.path.join(out, "train"), jax.device_get(variables))
    written.append(os.path.join(out, "train"))
  checkpoints.save_tree(os.path.join(out, "deploy"), jax.device_get(deploy_params))
  return written + [os.path.join(out, "deploy")]


def write_pth(model: str, variables: dict, to_pth: str, naming: str = "official") -> None:
  """Writes training-time variables ({'params', 'batch_stats'}) or deploy params ({'params'}) as a .pth file, or
  as .safetensors (numpy, no torch) where ``to_pth`` ends so."""
  state_dict = to_numpy_state_dict(variables, naming=naming)
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
  deploy = create_model(model, num_classes=deploy_params["linear"]["kernel"].shape[-1], deploy=True)
  channels = deploy_params["stage0"]["rbr_reparam"]["kernel"].shape[2]
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
  deploy_params = _deploy_params(FLAGS.model, variables) if FLAGS.out or FLAGS.to_onnx else None
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
