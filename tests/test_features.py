"""Spec of the backbone form: ``features_only=True`` returns the five stage outputs (strides 2 .. 32), takes the
full model's variables unchanged, is the same function in both forms for every family (RepVGGplus: stage 3 ends
with stage3_second), matches timm's ``features_only`` and exports to ONNX with one output per map."""

import importlib.util
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import repvgg_jax as rv
from repvgg_jax import equivalence, export
from tests import wellposed

SIZE, BATCH = 32, 4  # The stride-32 map is 1 x 1: still a function of the image.
# Full-size A0 against timm below; here each family's layout at reduced width.
BACKBONES = [("RepVGG-A0", wellposed.reduced_width("RepVGG-A0")),
             ("QARepVGG-A0", wellposed.reduced_width("QARepVGG-A0")),
             ("RepVGGplus-L2pse", dict(wellposed.reduced_width("RepVGG-A0"), num_blocks=(1, 1, 2, 1))),
             ("MobileOne-S1", wellposed.reduced_width("MobileOne-S1"))]


def _well_posed(name, overrides):
  """(float64 variables of the full training-form model, images)."""
  with jax.enable_x64(True):
    model = rv.create_model(name, num_classes=10, dtype=jnp.float64, **overrides)
    variables = wellposed.well_posed_variables(model, (SIZE, SIZE, 3))
  return variables, wellposed.images((BATCH, SIZE, SIZE, 3), 1)


@pytest.mark.parametrize("name,overrides", BACKBONES, ids=[n for n, _ in BACKBONES])
def test_features_equal_in_both_forms_and_end_where_the_classifier_pools(name, overrides):
  variables, x = _well_posed(name, overrides)
  train = wellposed.float64_apply(name, 10, features_only=True, **overrides)(variables, x)
  with jax.enable_x64(True):
    plain = rv.reparam(variables["params"], variables["batch_stats"])
  deploy = wellposed.float64_apply(name, 10, deploy=True, features_only=True, **overrides)({"params": plain}, x)
  info = rv.create_model(name, features_only=True, **overrides).feature_info()
  assert [i["reduction"] for i in info] == [2, 4, 8, 16, 32]
  for got, expected, i in zip(deploy, train, info, strict=True):
    assert expected.shape == (BATCH, SIZE // i["reduction"], SIZE // i["reduction"], i["num_chs"])
    wellposed.assert_equal_functions(got, expected)
  head = jax.tree.map(np.asarray, variables["params"]["linear"])
  logits = wellposed.float64_apply(name, 10, **overrides)(variables, x)
  wellposed.assert_equal_functions(train[-1].mean(axis=(1, 2)) @ head["kernel"] + head["bias"], logits)


def test_out_indices_pick_stages_and_bad_ones_are_refused():
  variables, x = _well_posed("RepVGG-A0", wellposed.reduced_width("RepVGG-A0"))
  overrides = wellposed.reduced_width("RepVGG-A0")
  every = wellposed.float64_apply("RepVGG-A0", 10, features_only=True, **overrides)(variables, x)
  some = wellposed.float64_apply("RepVGG-A0", 10, features_only=True, out_indices=(1, 4), **overrides)(variables, x)
  assert len(some) == 2 and np.array_equal(some[0], every[1]) and np.array_equal(some[1], every[4])
  model = rv.create_model("RepVGG-A0", features_only=True, out_indices=(1, 4), **overrides)
  assert [i["stage"] for i in model.feature_info()] == [1, 4]
  for bad in [(), (5,), (1, 1), (-1,)]:
    with pytest.raises(ValueError, match="out_indices must be distinct stages among 0..4"):
      rv.create_model("RepVGG-A0", features_only=True, out_indices=bad)


def test_a_features_model_exports_to_onnx_with_one_checked_output_per_map(tmp_path):
  pytest.importorskip("onnxruntime")
  overrides = wellposed.reduced_width("RepVGG-A0")
  model = rv.create_model("RepVGG-A0", num_classes=10, **overrides)
  variables = wellposed.well_posed_variables(model, (SIZE, SIZE, 3), dtype=np.float32)
  plain = rv.reparam(variables["params"], variables["batch_stats"])  # The full model's params, head included.
  backbone = rv.create_model("RepVGG-A0", deploy=True, features_only=True, out_indices=(1, 3, 4), **overrides)
  x = wellposed.images((2, SIZE, SIZE, 3), 2).astype(np.float32)
  error = export.save_checked_onnx(backbone, plain, x, str(tmp_path / "backbone.onnx"))
  assert error < equivalence.RTOL
  session = export.onnx_session(str(tmp_path / "backbone.onnx"))
  assert [o.name for o in session.get_outputs()] == ["features_0", "features_1", "features_2"]
  x = wellposed.images((2, 64, 32, 3), 3).astype(np.float32)  # Any size: the dimensions are symbolic.
  assert [m.shape for m in session.run(None, {"images": x.transpose(0, 3, 1, 2)})] == [
      (2, 16, 16, 8), (2, 64, 4, 2), (2, 256, 2, 1)]
  other = rv.reparam(*(wellposed.well_posed_variables(model, (SIZE, SIZE, 3), seed=5, dtype=np.float32)[k]
                       for k in ("params", "batch_stats")))
  with pytest.raises(equivalence.EquivalenceError, match="onnxruntime's feature maps differ"):
    export.check_onnx(export.to_onnx(backbone, other), backbone, plain, x)


@pytest.mark.skipif(not importlib.util.find_spec("timm"), reason="needs timm")
def test_features_match_timms_features_only_with_the_same_weights():
  """timm's repvgg_a0 with features_only=True, the full model's well-posed float64 weights loaded into both."""
  import timm  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  full = wellposed.well_posed_torch(timm.create_model("repvgg_a0", num_classes=10), (3, SIZE, SIZE))
  backbone = timm.create_model("repvgg_a0", features_only=True).double().eval()
  weights = full.state_dict()  # The features wrapper names stages.N stages_N and has no head.
  backbone.load_state_dict({k: weights[re.sub(r"^stages_(\d+)", r"stages.\1", k)] for k in backbone.state_dict()},
                           strict=True)
  x = wellposed.images((BATCH, SIZE, SIZE, 3), 3)
  with torch.no_grad():
    expected = [m.numpy().transpose(0, 2, 3, 1) for m in backbone(torch.from_numpy(x.transpose(0, 3, 1, 2)))]
  variables = rv.load_pytorch_state_dict(full.state_dict(), "RepVGG-A0")
  ours = wellposed.float64_apply("RepVGG-A0", 10, features_only=True)(variables, x)
  for got, reference in zip(ours, expected, strict=True):
    wellposed.assert_equal_functions(got, reference)
  swapped = wellposed.mutations(variables["params"])["kh and kw swapped"]
  stem = wellposed.float64_apply("RepVGG-A0", 10, features_only=True, out_indices=(0,))
  wellposed.assert_caught(stem({**variables, "params": swapped}, x)[0], expected[0])
  assert [i["num_chs"] for i in rv.create_model("RepVGG-A0", features_only=True).feature_info()] == (
      backbone.feature_info.channels())
  for timm_name, name in [("mobileone_s0", "MobileOne-S0"), ("repvgg_b1g4", "RepVGG-B1g4")]:
    info = timm.create_model(timm_name, features_only=True).feature_info
    ours = rv.create_model(name, features_only=True).feature_info()
    assert [i["num_chs"] for i in ours] == info.channels() and [i["reduction"] for i in ours] == info.reduction()
