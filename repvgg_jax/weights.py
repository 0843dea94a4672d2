"""Reading a model's weights from disk as Flax variables: PyTorch .pth / .safetensors files (official, timm or
apple naming), orbax trees, and a run's workdir. Every reader raises ``cli.UserError`` with one line naming the
file for a file that is missing, unreadable, or holds weights of another model.

``convert`` and ``predict`` read their ``--pth`` / ``--orbax`` through these, the training loop its
``config.init_from`` (``finetune``).
"""

import os

import jax
import orbax.checkpoint as ocp

from repvgg_jax import checkpoints, cli, run_layout
from repvgg_jax.equivalence import check_equivalence
from repvgg_jax.families import create_model, load_pytorch_state_dict, num_classes, reparam
from repvgg_jax.models import check_variables, input_channels

NEEDS_TORCH = ("a .pth file needs torch (pip install 'repvgg-jax[torch]'); .safetensors files need no torch "
               "(timm's hub files are .safetensors).")
PYTORCH_SUFFIXES = (".pth", ".pt", ".safetensors")


def unwrap_state_dict(obj) -> dict:
  """A .pth holds a state_dict, or a training checkpoint {'state_dict'|'model': state_dict, ...}."""
  for key in ("state_dict", "model"):
    if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
      return obj[key]
  return obj


def _read_state_dict(path: str) -> dict:
  """The state_dict in a .safetensors file (numpy, no torch) or a .pth/.pt file (torch)."""
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    return load_file(path)
  import torch  # pylint: disable=g-import-not-at-top
  return unwrap_state_dict(torch.load(path, map_location="cpu", weights_only=True))


def load_pth(model: str, pth: str, num_classes=None, flag: str = "--pth", **overrides) -> dict:
  """A .pth or .safetensors file's weights as Flax variables ({'params'[, 'batch_stats']}) of
  ``create_model(model, **overrides)``; ``flag`` names the setting in the messages."""
  if not os.path.isfile(pth):
    raise cli.UserError(f"{flag}={pth}: no such file.")
  try:
    state_dict = _read_state_dict(pth)
  except ImportError as e:
    raise cli.UserError(f"{flag}={pth}: {NEEDS_TORCH}") from e
  except Exception as e:  # pylint: disable=broad-except  # Whatever the reader fails on, the file is the cause.
    reason = cli.one_line(e).split(". ")[0][:200]
    kind = "safetensors" if pth.endswith(".safetensors") else "PyTorch checkpoint torch can read"
    raise cli.UserError(f"{flag}={pth} is not a {kind} ({reason}); is the download complete, and is it a "
                        ".pth/.pt or .safetensors file?") from e
  try:
    return load_pytorch_state_dict(state_dict, model, num_classes=num_classes, **overrides)
  except ValueError as e:
    raise cli.UserError(f"{flag}={pth}: {e}") from e


def _check(model: str, variables: dict, where: str, overrides: dict) -> dict:
  """``variables`` if they are exactly ``model``'s leaves (any head size, any image channels), else UserError."""
  try:
    network = create_model(model, num_classes=num_classes(variables["params"]), deploy="batch_stats" not in variables,
                           **overrides)
    check_variables(network, variables, input_channels(network, variables["params"]))
  except (KeyError, TypeError, ValueError, StopIteration) as e:
    raise cli.UserError(f"{where} holds no {model} weights: {cli.one_line(e)}") from e
  return variables


def load_orbax(model: str, orbax_path: str, flag: str = "--orbax", **overrides) -> dict:
  """An orbax tree (training-time variables or deploy params) of ``model`` as Flax variables."""
  if not os.path.isdir(orbax_path):
    raise cli.UserError(f"{flag}={orbax_path}: no such folder; give the folder train.py or --out wrote (e.g. "
                        "<workdir>/deploy).")
  try:
    tree = checkpoints.load_tree(orbax_path)
  except Exception as e:  # pylint: disable=broad-except  # orbax's errors for a folder it cannot read vary.
    raise cli.UserError(f"{flag}={orbax_path} is not an orbax checkpoint ({cli.one_line(e)[:200]}); give the "
                        "folder train.py or --out wrote (e.g. <workdir>/deploy).") from e
  return _check(model, tree if "params" in tree else {"params": tree}, f"{flag}={orbax_path}", overrides)


def is_workdir(path: str) -> bool:
  """Whether ``path`` is a training run's workdir (it holds ``checkpoints/``)."""
  return os.path.isdir(run_layout.path(path, run_layout.CHECKPOINTS))


def load_workdir(model: str, workdir: str, flag: str = "--workdir", **overrides) -> dict:
  """The evaluated variables of a run's newest checkpoint (its moving average where the run kept one), as
  {'params', 'batch_stats'}; a checkpoint of another model is refused."""
  with checkpoints.reader(workdir) as manager:
    step = manager.latest_step()
    if step is None:
      raise cli.UserError(f"{flag}={workdir} holds no checkpoint yet.")
    try:
      saved = manager.restore(step, args=ocp.args.Composite(**{checkpoints.STATE: ocp.args.StandardRestore(),
                                                                checkpoints.META: ocp.args.JsonRestore()}))
    except Exception as e:  # pylint: disable=broad-except  # orbax's errors for a damaged step vary.
      raise cli.UserError(f"{flag}={workdir}: its checkpoint {step} does not read ({cli.one_line(e)[:200]}).") from e
  trained = saved[checkpoints.META].get("model")
  if trained != model:
    raise cli.UserError(f"{flag}={workdir} is a run of {trained}, not {model}.")
  state = saved[checkpoints.STATE]
  variables = state["ema"] if state.get("ema") else {"params": state["params"], "batch_stats": state["batch_stats"]}
  return _check(model, dict(variables), f"{flag}={workdir} (step {step})", overrides)


def load_any(model: str, path: str, flag: str, **overrides) -> dict:
  """Weights from a .pth / .pt / .safetensors file, a run's workdir, or an orbax tree, told apart by the path."""
  if path.endswith(PYTORCH_SUFFIXES) or os.path.isfile(path):
    return load_pth(model, path, flag=flag, **overrides)
  if is_workdir(path):
    return load_workdir(model, path, flag=flag, **overrides)
  return load_orbax(model, path, flag=flag, **overrides)


VERIFY_SHAPE = (2, 64, 64, 3)  # Random images on which a converted training-time model must equal its fusion.


def fused(model: str, variables: dict) -> dict:
  """Deploy params of loaded weights: training-time ones are fused and checked (HIGHEST precision) first, with
  one line saying how closely they agree."""
  if "batch_stats" not in variables:
    return variables["params"]
  deploy_params = reparam(variables["params"], variables["batch_stats"])
  classes = num_classes(variables["params"])
  error = check_equivalence(create_model(model, num_classes=classes), variables,
                            create_model(model, num_classes=classes, deploy=True), deploy_params,
                            jax.random.normal(jax.random.key(0), VERIFY_SHAPE))
  print(f"verified: the fused model equals the training-time model to {error:.1e} of the largest logit")
  return deploy_params
