"""Spec of PyTorch interop, against the real thing: timm's RepVGG with random weights and BN statistics."""

import dataclasses
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import repvgg_jax as rv
from repvgg_jax.families import load_pytorch_state_dict, to_pytorch_state_dict
from tests import wellposed
from tests.helpers import randomize_torch_batchnorms

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
from timm.utils.model import reparameterize_model  # pylint: disable=g-import-not-at-top,wrong-import-position

NUM_CLASSES = 10
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTOL = 1e-4  # Relative to the largest logit: two float32 implementations of the same network.

pytestmark = pytest.mark.usefixtures("full_precision")


def timm_model(timm_name, seed=0):
  """timm's model in eval mode, its BatchNorms given random affine parameters and running statistics."""
  torch.manual_seed(seed)
  return randomize_torch_batchnorms(timm.create_model(timm_name, pretrained=False, num_classes=NUM_CLASSES), seed)


def timm_to_official(key):
  """Renames, written independently of the package: timm's keys -> the official repository's."""
  key = re.sub(r"^stem\.", "stage0.", key)
  key = re.sub(r"^stages\.(\d+)\.", lambda m: f"stage{int(m.group(1)) + 1}.", key)
  key = key.replace("head.fc.", "linear.")
  for timm_name, official in (("conv_kxk", "rbr_dense"), ("conv_1x1", "rbr_1x1"), ("identity", "rbr_identity"),
                              ("reparam_conv", "rbr_reparam"), ("attn.fc1", "se.down"), ("attn.fc2", "se.up")):
    key = key.replace(f".{timm_name}.", f".{official}.")
  return key


def logits_close(jax_logits, torch_logits):
  jax_logits, torch_logits = np.asarray(jax_logits), np.asarray(torch_logits)
  scale = float(np.abs(torch_logits).max())
  assert scale > 1e-3
  err = float(np.abs(jax_logits - torch_logits).max())
  assert err <= RTOL * scale, f"max abs error {err:.3g} vs largest logit {scale:.3g}"
  return err, err / scale


def _images(seed=1, size=32):
  return np.random.default_rng(seed).normal(size=(2, 3, size, size)).astype(np.float32)


def _timm_repvgg(timm_name, width_multiplier=None):
  """timm's RepVGG, at other widths (a, a, a, b) where given: its own config with the channels replaced."""
  if width_multiplier is None:
    return timm.create_model(timm_name, pretrained=False, num_classes=NUM_CLASSES)
  from timm.models import byobnet  # pylint: disable=g-import-not-at-top
  cfg = byobnet.model_cfgs[timm_name]
  blocks = tuple(dataclasses.replace(b, c=base * w) for b, base, w in zip(cfg.blocks, (64, 128, 256, 512),
                                                                          width_multiplier))
  cfg = dataclasses.replace(cfg, blocks=blocks, stem_chs=min(64, int(64 * width_multiplier[0])))
  return byobnet.ByobNet(cfg, num_classes=NUM_CLASSES)


# Plain (full size), grouped, SE. D2se at reduced width: at full width its 48 calibrated blocks amplify float64
# rounding to ~1e-5 of the logits' spread (timm's float64 against ours), a test-network artefact, not an error.
QUARTER = (0.25, 0.25, 0.25, 0.5)
# B1g4 slow: its grouped keys load strictly and back into timm in test_flax_variables_load_strictly_into_pytorch,
# grouped fusion is exact in tests/test_equivalence.py.
VARIANTS = [("repvgg_a0", "RepVGG-A0", {}),
            pytest.param("repvgg_b1g4", "RepVGG-B1g4", dict(width_multiplier=QUARTER), marks=pytest.mark.slow),
            ("repvgg_d2se", "RepVGG-D2se", dict(width_multiplier=QUARTER))]


@pytest.mark.parametrize("timm_name,name,overrides", VARIANTS)
def test_timm_and_official_weights_give_timms_logits_in_both_forms(timm_name, name, overrides):
  """On well-posed float64 networks (tests/wellposed.py); swapped kernel axes, a zeroed stem or a wrong BN
  epsilon on our side fail the same comparison."""
  torch.manual_seed(0)
  model = wellposed.well_posed_torch(_timm_repvgg(timm_name, overrides.get("width_multiplier")), (3, 32, 32))
  x = wellposed.images((4, 32, 32, 3), seed=1)
  state_dict = model.state_dict()
  ours = wellposed.float64_apply(name, NUM_CLASSES, **overrides)
  wellposed.assert_equal_functions(ours(load_pytorch_state_dict(state_dict, name, **overrides), x),
                                   wellposed.torch_logits(model, x))
  official = {"module." + timm_to_official(k): v for k, v in state_dict.items()}  # As saved under DDP.
  variables = load_pytorch_state_dict(official, name, num_classes=NUM_CLASSES, deploy=False, **overrides)
  wellposed.assert_matches_torch_in_both_forms(model, name, variables, x, NUM_CLASSES, **overrides)


def test_flax_variables_load_strictly_into_pytorch():
  name, model = "RepVGG-B1g4", timm_model("repvgg_b1g4", seed=3)
  variables = load_pytorch_state_dict(model.state_dict(), name)
  variables = jax.tree.map(lambda a: a * 1.01, variables)  # Not what timm started with.
  target = timm_model("repvgg_b1g4", seed=4)
  target.load_state_dict(to_pytorch_state_dict(variables, naming="timm"), strict=True)
  official = to_pytorch_state_dict(variables)
  assert "stage1.0.rbr_dense.conv.weight" in official and "linear.weight" in official
  assert {timm_to_official(k) for k in target.state_dict()} == set(official)
  x = _images(seed=5)
  with torch.no_grad():
    expected = target(torch.from_numpy(x)).numpy()
  logits_close(rv.create_model(name, num_classes=NUM_CLASSES).apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1))),
               expected)


def test_loading_is_strict():
  state_dict = timm_model("repvgg_a0").state_dict()
  misspelt = dict(state_dict)
  misspelt["stages.0.0.conv_kxk.conv.wieght"] = misspelt.pop("stages.0.0.conv_kxk.conv.weight")
  with pytest.raises(ValueError, match=r"missing keys: stages\.0\.0\.conv_kxk\.conv\.weight.*unexpected keys: "
                                       r"stages\.0\.0\.conv_kxk\.conv\.wieght"):
    load_pytorch_state_dict(misspelt, "RepVGG-A0")
  with pytest.raises(ValueError, match="shape mismatches"):
    load_pytorch_state_dict(state_dict, "RepVGG-A1")
  with pytest.raises(ValueError, match="deploy=True was asked for.*training-time"):
    load_pytorch_state_dict(state_dict, "RepVGG-A0", deploy=True)
  with pytest.raises(ValueError, match="num_classes=1000 but the checkpoint's head has 10"):
    load_pytorch_state_dict(state_dict, "RepVGG-A0", num_classes=1000)


def test_convert_cli_round_trips_safetensors_without_torch_and_pth_with_it(tmp_path):
  """timm's hub format (.safetensors, timm naming, training form) -> orbax -> .safetensors with ``import torch``
  blocked; -> .pth (official naming) with torch; both load strictly into timm's fused model and give its logits."""
  import subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  model = timm_model("repvgg_a0", seed=7)
  hub_file = str(tmp_path / "model.safetensors")
  save_file({k: v.numpy() for k, v in model.state_dict().items()}, hub_file)
  out = str(tmp_path / "converted")

  def run(*args, torch_blocked=False):
    prefix = ["tests/no_tensorflow.py", "--also=torch", "-m"] if torch_blocked else ["-m"]
    return subprocess.run([sys.executable, *prefix, "repvgg_jax.convert", "--model=RepVGG-A0", *args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)

  result = run(f"--pth={hub_file}", f"--out={out}", torch_blocked=True)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "verified: the fused model equals the training-time model" in result.stdout
  x = _images(seed=8)
  with torch.no_grad():
    expected = reparameterize_model(timm_model("repvgg_a0", seed=7))(torch.from_numpy(x)).numpy()
  for written, naming, blocked in (("deploy.safetensors", "timm", True), ("deploy.pth", "official", False)):
    result = run(f"--orbax={out}/deploy", f"--to_pth={tmp_path / written}", f"--naming={naming}", torch_blocked=blocked)
    assert result.returncode == 0, result.stderr[-3000:]
    state_dict = (load_file(str(tmp_path / written)) if written.endswith(".safetensors")
                  else torch.load(tmp_path / written, weights_only=True))
    fused = reparameterize_model(timm_model("repvgg_a0", seed=1))
    if naming == "official":
      to_timm = {timm_to_official(k): k for k in fused.state_dict()}
      state_dict = {to_timm[k]: v for k, v in state_dict.items()}
    fused.load_state_dict({k: torch.as_tensor(v) for k, v in state_dict.items()}, strict=True)
    with torch.no_grad():
      logits_close(fused(torch.from_numpy(x)).numpy(), expected)
  result = run(f"--pth={tmp_path / 'deploy.pth'}", f"--out={tmp_path / 'again'}", torch_blocked=True)
  assert result.returncode == 1 and "a .pth file needs torch" in result.stderr  # torch really was blocked.
  assert run(f"--pth={hub_file}", f"--out={out}", "--num_classes=1000").returncode != 0
