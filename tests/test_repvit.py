"""Spec of RepViT (repvgg_jax/repvit.py): timm's weights load strictly in both forms and save back; the training
form and the deploy form of ``reparam`` give timm's logits on well-posed float64 networks (tests/wellposed.py),
which a broken model fails; the deploy form has timm's parameter count after ``reparameterize_model``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from repvgg_jax import repvit
from repvgg_jax.reparam import identity_kernel
from tests import wellposed

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
from timm.utils.model import reparameterize_model  # pylint: disable=g-import-not-at-top,wrong-import-position

IMAGE = (3, 64, 64)


def float64_logits(name, variables, x, deploy=False, **kwargs):
  with jax.enable_x64(True):
    model = repvit.create_repvit(name, num_classes=10, deploy=deploy, dtype=jnp.float64, **kwargs)
    variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
    return jax.tree.map(np.asarray, jax.jit(model.apply)(variables, jnp.asarray(x, jnp.float64)))


def well_posed_timm(name):
  torch.manual_seed(0)
  model = timm.create_model(repvit.VARIANTS[name].timm_name, num_classes=10)
  return wellposed.well_posed_torch(model, IMAGE)


@pytest.mark.parametrize("name", ["RepViT-M0.9", pytest.param("RepViT-M1.5", marks=pytest.mark.slow)])
def test_both_forms_give_timms_logits_and_a_broken_model_does_not(name):
  model = well_posed_timm(name)
  x = wellposed.images((4, 64, 64, 3), seed=1)
  expected = wellposed.torch_logits(model, x)
  variables = repvit.from_timm_state_dict(model.state_dict(), name)
  wellposed.assert_equal_functions(float64_logits(name, variables, x), expected)
  with jax.enable_x64(True):
    as64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
    plain = jax.tree.map(np.asarray, repvit.reparam(as64["params"], as64["batch_stats"]))
  wellposed.assert_equal_functions(float64_logits(name, {"params": plain}, x, deploy=True), expected)
  # timm's fused model holds float32 weights (its fuse makes new float32 layers): its own logits are the reference.
  fused = reparameterize_model(model).double()
  loaded = repvit.from_timm_state_dict(fused.state_dict(), name)
  wellposed.assert_equal_functions(float64_logits(name, loaded, x, deploy=True), wellposed.torch_logits(fused, x))
  # Mutations: kh and kw swapped; the FFN's residual dropped (a deploy block's output without its input).
  swapped = jax.tree.map(lambda a: np.swapaxes(a, 0, 1) if a.ndim == 4 else a, plain)
  wellposed.assert_caught(float64_logits(name, {"params": swapped}, x, deploy=True), expected)
  wellposed.assert_caught(float64_logits(name, variables, x, bn_epsilon=wellposed.WRONG_EPSILON), expected)
  no_identity = {**plain, "stages_0_blocks_0": {**plain["stages_0_blocks_0"], "token_mixer": {"conv": {
      "kernel": plain["stages_0_blocks_0"]["token_mixer"]["conv"]["kernel"] - np.asarray(
          identity_kernel(repvit.VARIANTS[name].widths[0], repvit.VARIANTS[name].widths[0], np.float32)),
      "bias": plain["stages_0_blocks_0"]["token_mixer"]["conv"]["bias"]}}}}
  wellposed.assert_caught(float64_logits(name, {"params": no_identity}, x, deploy=True), expected)


@pytest.mark.parametrize("name", list(repvit.VARIANTS))
def test_every_variant_loads_timms_weights_strictly_in_both_forms_and_saves_them_back(name):
  model = timm.create_model(repvit.VARIANTS[name].timm_name).eval()
  for deploy, torch_model in ((False, model), (True, reparameterize_model(model))):
    state_dict = torch_model.state_dict()
    variables = repvit.from_timm_state_dict(state_dict, name)
    params = variables["params"]
    assert sum(np.size(a) for a in jax.tree.leaves(params)) == sum(p.numel() for p in torch_model.parameters())
    saved = repvit.to_timm_state_dict(variables, deploy)
    assert set(saved) == set(state_dict)
    for key, value in saved.items():
      np.testing.assert_array_equal(value, state_dict[key].numpy(), err_msg=key)
    missing = next(k for k in state_dict if k.endswith("weight"))
    with pytest.raises(ValueError, match=f"lacks {missing}"):
      repvit.from_timm_state_dict({k: v for k, v in state_dict.items() if k != missing}, name)


def test_reparam_of_our_own_initialisation_gives_the_deploy_tree():
  model, deploy = repvit.create_repvit("RepViT-M0.9", 10), repvit.create_repvit("RepViT-M0.9", 10, deploy=True)
  x = jnp.zeros((1, 64, 64, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  expected = jax.eval_shape(deploy.init, jax.random.key(0), x)["params"]
  got = jax.eval_shape(repvit.reparam, variables["params"], variables["batch_stats"])
  assert jax.tree.map(lambda a: a.shape, got) == jax.tree.map(lambda a: a.shape, expected)


def test_features_only_gives_the_four_stages_at_timms_strides():
  model = repvit.create_repvit("RepViT-M0.9", features_only=True)
  features = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x)[0], jnp.zeros((2, 64, 64, 3)))
  timm_model = timm.create_model("repvit_m0_9", features_only=True)
  assert [f.shape for f in features] == [(2, 64 // r, 64 // r, c) for r, c in zip(
      timm_model.feature_info.reduction(), timm_model.feature_info.channels())]
