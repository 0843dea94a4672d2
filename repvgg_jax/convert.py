"""Converts RepVGG weights between PyTorch .pth files and orbax checkpoints.

  # PyTorch -> orbax: <out>/train (params + batch_stats, training-time weights only) and <out>/deploy
  python -m repvgg_jax.convert --model=RepVGG-A0 --pth=RepVGG-A0-train.pth --out=converted/a0
  # orbax -> PyTorch (official naming; --naming=timm for timm's)
  python -m repvgg_jax.convert --model=RepVGG-A0 --orbax=runs/a0/deploy --to_pth=a0_deploy.pth

Needs the `torch` extra: pip install -e '.[torch]'.
"""

import os

import jax
from absl import app, flags

from repvgg_jax import checkpoints
from repvgg_jax.equivalence import check_equivalence
from repvgg_jax.models import create_model
from repvgg_jax.reparam import reparam
from repvgg_jax.torch_weights import load_pytorch_state_dict, to_pytorch_state_dict

flags.DEFINE_string("model", None, "Official variant name, e.g. RepVGG-A0.")
flags.DEFINE_string("pth", None, "PyTorch checkpoint to read (official or timm naming, training-time or deploy).")
flags.DEFINE_string("out", None, "Folder for the orbax checkpoints written from --pth.")
flags.DEFINE_string("orbax", None, "orbax checkpoint to read: training-time variables or deploy params.")
flags.DEFINE_string("to_pth", None, "PyTorch file to write from --orbax.")
flags.DEFINE_enum("naming", "official", ["official", "timm"], "Key naming of the written .pth.")
flags.DEFINE_integer("num_classes", None, "Expected head size; default: read from the checkpoint.")
FLAGS = flags.FLAGS


def unwrap_state_dict(obj) -> dict:
  """A .pth holds a state_dict, or a training checkpoint {'state_dict'|'model': state_dict, ...}."""
  for key in ("state_dict", "model"):
    if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
      return obj[key]
  return obj


VERIFY_SHAPE = (2, 64, 64, 3)  # Random images on which a converted training-time model must equal its fusion.


def pth_to_orbax(model: str, pth: str, out: str, num_classes=None) -> list[str]:
  """Writes <out>/train (if the .pth is training-time) and <out>/deploy; returns the folders written.

  Training-time weights are fused, and the fused model is checked against them (HIGHEST precision) first.
  """
  import torch  # pylint: disable=g-import-not-at-top

  state_dict = unwrap_state_dict(torch.load(pth, map_location="cpu", weights_only=True))
  variables = load_pytorch_state_dict(state_dict, model, num_classes=num_classes)
  written = []
  if "batch_stats" in variables:
    checkpoints.save_tree(os.path.join(out, "train"), jax.device_get(variables))
    written.append(os.path.join(out, "train"))
    deploy_params = reparam(variables["params"], variables["batch_stats"])
    classes = variables["params"]["linear"]["kernel"].shape[-1]
    error = check_equivalence(create_model(model, num_classes=classes), variables,
                              create_model(model, num_classes=classes, deploy=True), deploy_params,
                              jax.random.normal(jax.random.key(0), VERIFY_SHAPE))
    print(f"verified: the fused model equals the training-time model to {error:.1e} of the largest logit")
  else:
    deploy_params = variables["params"]
  checkpoints.save_tree(os.path.join(out, "deploy"), jax.device_get(deploy_params))
  return written + [os.path.join(out, "deploy")]


def orbax_to_pth(model: str, orbax_path: str, to_pth: str, naming: str = "official") -> None:
  """Reads training-time variables ({'params', 'batch_stats'}) or deploy params and writes a .pth."""
  import torch  # pylint: disable=g-import-not-at-top

  tree = checkpoints.load_tree(orbax_path)
  state_dict = to_pytorch_state_dict(tree if "params" in tree else {"params": tree}, naming=naming)
  load_pytorch_state_dict(state_dict, model)  # Strict check that these are weights of ``model``.
  torch.save(state_dict, to_pth)


def main(argv):
  del argv
  if not FLAGS.model:
    raise app.UsageError("--model is required.")
  if bool(FLAGS.pth) == bool(FLAGS.orbax):
    raise app.UsageError("Give exactly one of --pth (with --out) or --orbax (with --to_pth).")
  if FLAGS.pth:
    if not FLAGS.out:
      raise app.UsageError("--pth needs --out.")
    try:
      for path in pth_to_orbax(FLAGS.model, FLAGS.pth, FLAGS.out, FLAGS.num_classes):
        print(f"wrote {path}")
    except ValueError as e:
      raise app.UsageError(str(e)) from e
  else:
    if not FLAGS.to_pth:
      raise app.UsageError("--orbax needs --to_pth.")
    try:
      orbax_to_pth(FLAGS.model, FLAGS.orbax, FLAGS.to_pth, FLAGS.naming)
    except ValueError as e:
      raise app.UsageError(str(e)) from e
    print(f"wrote {FLAGS.to_pth}")


if __name__ == "__main__":
  app.run(main)
