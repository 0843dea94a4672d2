"""Spec of RepViT (repvgg_jax/repvit.py): timm's weights load strictly in both forms and save back; the training
form and the deploy form of ``reparam`` give timm's logits on well-posed float64 networks (tests/wellposed.py),
which a broken model fails; the deploy form has timm's parameter count after ``reparameterize_model``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import repvgg_jax as rv
from repvgg_jax import repvit
from repvgg_jax.reparam import identity_kernel
from tests import wellposed

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
from timm.utils.model import reparameterize_model  # pylint: disable=g-import-not-at-top,wrong-import-position

IMAGE = (3, 64, 64)


def float64_logits(name, variables, x, deploy=False, **kwargs):
  with jax.enable_x64(True):
    model = rv.create_model(name, num_classes=10, deploy=deploy, dtype=jnp.float64, **kwargs)
    variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
    return jax.tree.map(np.asarray, jax.jit(model.apply)(variables, jnp.asarray(x, jnp.float64)))


def well_posed_timm(name, depths=None):
  """timm's model of ``name`` (its stages ``depths`` blocks deep where given) as a well-posed network."""
  torch.manual_seed(0)
  model = timm.create_model(repvit.VARIANTS[name].timm_name, num_classes=10, **({"depth": depths} if depths else {}))
  return wellposed.well_posed_torch(model, IMAGE)


# Every block kind at M0.9's widths, two blocks a stage (SE and none); every variant at full depth in the slow
# case and in benchmarks/repvit_table.py.
@pytest.mark.parametrize("name,depths", [("RepViT-M0.9", (2, 2, 2, 2)),
                                         pytest.param("RepViT-M1.5", None, marks=pytest.mark.slow)])
def test_both_forms_give_timms_logits_and_a_broken_model_does_not(name, depths):
  model = well_posed_timm(name, depths)
  shape = {"depths": depths} if depths else {}
  x = wellposed.images((4, 64, 64, 3), seed=1)
  expected = wellposed.torch_logits(model, x)
  variables = rv.load_pytorch_state_dict(model.state_dict(), name, **shape)
  wellposed.assert_equal_functions(float64_logits(name, variables, x, **shape), expected)
  with jax.enable_x64(True):
    as64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
    plain = jax.tree.map(np.asarray, repvit.fuse(as64["params"], as64["batch_stats"]))
  wellposed.assert_equal_functions(float64_logits(name, {"params": plain}, x, deploy=True, **shape), expected)
  # timm's fused model holds float32 weights (its fuse makes new float32 layers): its own logits are the reference.
  fused = reparameterize_model(model).double()
  loaded = rv.load_pytorch_state_dict(fused.state_dict(), name, **shape)
  wellposed.assert_equal_functions(float64_logits(name, loaded, x, deploy=True, **shape), wellposed.torch_logits(fused, x))
  # Mutations: kh and kw swapped, a wrong BN epsilon, the token mixer's identity dropped.
  swapped = jax.tree.map(lambda a: np.swapaxes(a, 0, 1) if a.ndim == 4 else a, plain)
  wellposed.assert_caught(float64_logits(name, {"params": swapped}, x, deploy=True, **shape), expected)
  wellposed.assert_caught(float64_logits(name, variables, x, bn_epsilon=wellposed.WRONG_EPSILON, **shape), expected)
  no_identity = {**plain, "stages_0_blocks_0": {**plain["stages_0_blocks_0"], "token_mixer": {"conv": {
      "kernel": plain["stages_0_blocks_0"]["token_mixer"]["conv"]["kernel"] - np.asarray(
          identity_kernel(repvit.VARIANTS[name].widths[0], repvit.VARIANTS[name].widths[0], np.float32)),
      "bias": plain["stages_0_blocks_0"]["token_mixer"]["conv"]["bias"]}}}}
  wellposed.assert_caught(float64_logits(name, {"params": no_identity}, x, deploy=True, **shape), expected)


@pytest.mark.parametrize("name", list(repvit.VARIANTS))
def test_every_variant_loads_timms_weights_strictly_in_both_forms_and_saves_them_back(name):
  model = timm.create_model(repvit.VARIANTS[name].timm_name).eval()
  for deploy, torch_model in ((False, model), (True, reparameterize_model(model))):
    state_dict = torch_model.state_dict()
    variables = rv.load_pytorch_state_dict(state_dict, name)
    params = variables["params"]
    assert sum(np.size(a) for a in jax.tree.leaves(params)) == sum(p.numel() for p in torch_model.parameters())
    saved = rv.to_numpy_state_dict(variables, naming="timm")
    assert set(saved) == set(state_dict)
    for key, value in saved.items():
      np.testing.assert_array_equal(value, state_dict[key].numpy(), err_msg=key)
    missing = next(k for k in state_dict if k.endswith("weight"))
    with pytest.raises(ValueError, match=f"lacks {missing}"):
      rv.load_pytorch_state_dict({k: v for k, v in state_dict.items() if k != missing}, name)


def test_reparam_of_our_own_initialisation_gives_the_deploy_tree():
  model, deploy = rv.create_model("RepViT-M0.9", num_classes=10), rv.create_model("RepViT-M0.9", num_classes=10, deploy=True)
  x = jnp.zeros((1, 64, 64, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  expected = jax.eval_shape(deploy.init, jax.random.key(0), x)["params"]
  got = jax.eval_shape(repvit.fuse, variables["params"], variables["batch_stats"])
  assert jax.tree.map(lambda a: a.shape, got) == jax.tree.map(lambda a: a.shape, expected)


def test_features_only_gives_the_four_stages_at_timms_strides():
  model = rv.create_model("RepViT-M0.9", features_only=True)
  features = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x)[0], jnp.zeros((2, 64, 64, 3)))
  timm_model = timm.create_model("repvit_m0_9", features_only=True)
  assert [f.shape for f in features] == [(2, 64 // r, 64 // r, c) for r, c in zip(
      timm_model.feature_info.reduction(), timm_model.feature_info.channels())]


def test_the_registry_builds_repvit_and_reparam_fuses_it_like_the_family_function():
  assert rv.list_models()[-5:] == list(repvit.VARIANTS)
  model = rv.create_model("RepViT-M0.9", num_classes=10, depths=(1, 1, 1, 1))
  variables = wellposed.well_posed_variables(model, (64, 64, 3), dtype=np.float32)
  fused = rv.reparam(variables["params"], variables["batch_stats"])
  for got, expected in zip(jax.tree.leaves(fused), jax.tree.leaves(repvit.fuse(variables["params"],
                                                                                    variables["batch_stats"]))):
    np.testing.assert_array_equal(got, expected)
  with pytest.raises(ValueError, match="Unknown override"):
    rv.create_model("RepViT-M0.9", groups=2)
  with pytest.raises(ValueError, match="out_indices must be distinct stages among 0..3"):
    rv.create_model("RepViT-M0.9", features_only=True, out_indices=(4,))
  with pytest.raises(ValueError, match="missing 'stem_conv1/bn'"):
    rv.reparam({**variables["params"], "stem_conv1": {"c": variables["params"]["stem_conv1"]["c"]}},
               variables["batch_stats"])
  backbone = rv.create_model("RepViT-M0.9", features_only=True, out_indices=(1, 3), depths=(1, 1, 1, 1))
  maps = backbone.apply(variables, jnp.zeros((1, 64, 64, 3)))
  assert [m.shape for m in maps] == [(1, 8, 8, 96), (1, 2, 2, 384)]
  assert [(i["num_chs"], i["reduction"]) for i in backbone.feature_info()] == [(96, 8), (384, 32)]


@pytest.mark.slow  # ~2 min on 2 cores (calibration and two onnxruntime sessions); CI runs it on Python 3.13.
def test_onnx_float_and_int8_graphs_give_the_jax_deploy_models_logits():
  """The ONNX graph walks the deploy plan block kind by block kind (the FFN's GELU and residual included): float
  against the JAX deploy model on a well-posed network, and a broken graph (kernels swapped) caught; INT8 against
  the JAX fake-quantized model on a shallow one (as tests/test_quantize.py's families), integer convolutions."""
  pytest.importorskip("onnxruntime")
  quantization = pytest.importorskip("repvgg_jax.quantization")
  from repvgg_jax import export  # pylint: disable=g-import-not-at-top
  model = rv.create_model("RepViT-M0.9", num_classes=10, depths=(1, 1, 1, 1))
  deploy = rv.create_model("RepViT-M0.9", num_classes=10, deploy=True, depths=(1, 1, 1, 1))
  variables = wellposed.well_posed_variables(model, (64, 64, 3), dtype=np.float32)
  plain = jax.device_get(rv.reparam(variables["params"], variables["batch_stats"]))
  x = wellposed.images((4, 64, 64, 3), seed=1).astype(np.float32)
  run = lambda p, **kw: export.onnx_session(export.to_onnx(deploy, p, **kw)).run(
      ["logits"], {"images": x.transpose(0, 3, 1, 2)})[0]
  with jax.default_matmul_precision("highest"):
    expected = np.asarray(deploy.apply({"params": plain}, x))
  wellposed.assert_equal_functions(run(plain), expected, bound=1e-4)
  wellposed.assert_caught(run(wellposed.mutations(plain)["kh and kw swapped"]), expected, bound=1e-4)

  qmodel = quantization.fake_quantized(deploy)
  calibration = [wellposed.images((16, 64, 64, 3), s).astype(np.float32) for s in (2, 3)]
  stats = quantization.calibrate(qmodel, plain, calibration)
  layers = quantization.int8_layers(plain, stats)
  assert {"stem_conv1", "stages_0_blocks_0/token_mixer", "stages_0_blocks_0/channel_mixer/conv2", "head",
          quantization.POOL} <= set(layers) and not any("/se" in k for k in layers)  # SE stays float.
  proto = export.to_onnx(deploy, plain, int8=layers)
  got = export.onnx_session(proto).run(["logits"], {"images": x.transpose(0, 3, 1, 2)})[0]
  expected_int8 = np.asarray(quantization.logits(qmodel, plain, stats, x))
  assert np.abs(got - expected_int8).max() < quantization.ONNX_SPREAD_FRACTION * wellposed.spread(expected_int8)


def test_weight_decay_falls_on_kernels_only_as_in_timms_optimizer():
  from repvgg_jax import steps  # pylint: disable=g-import-not-at-top
  model = rv.create_model("RepViT-M0.9", num_classes=10, depths=(1, 1, 1, 1))
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"]
  mask = steps.weight_decay_mask(params)
  assert mask["stem_conv1"]["c"]["kernel"] and mask["head"]["l"]["kernel"]
  assert not mask["stem_conv1"]["bn"]["scale"] and not mask["head"]["bn"]["scale"] and not mask["head"]["l"]["bias"]
  assert not mask["stages_0_blocks_0"]["token_mixer"]["conv1"]["bias"]  # RepVGGDW's 1x1 conv has a bias.
  assert all(decays == (leaf.ndim > 1) for decays, leaf in zip(jax.tree.leaves(mask), jax.tree.leaves(params)))
