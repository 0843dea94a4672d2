"""Spec of the ResNet baselines: timm's weights load strictly, and both forms (conv + BN, and BN folded) give
timm's logits on well-posed float64 networks (tests/wellposed.py), which a broken model fails."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from repvgg_jax import resnet
from tests import wellposed

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")


def _float64_logits(name, variables, x, deploy=False):
  with jax.enable_x64(True):
    model = resnet.create_resnet(name, num_classes=10, deploy=deploy, dtype=jnp.float64)
    variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
    return np.asarray(jax.jit(model.apply)(variables, jnp.asarray(x, jnp.float64)))


@pytest.mark.parametrize("name", ["ResNet-18", "ResNet-50"])  # A basic and a bottleneck network.
def test_both_forms_give_timms_logits_and_a_broken_model_does_not(name):
  torch.manual_seed(0)
  model = wellposed.well_posed_torch(timm.create_model(resnet.RESNETS[name][2], num_classes=10), (3, 64, 64))
  x = wellposed.images((4, 64, 64, 3), seed=1)
  expected = wellposed.torch_logits(model, x)
  variables = resnet.from_timm_state_dict(model.state_dict(), name)
  wellposed.assert_equal_functions(_float64_logits(name, variables, x), expected)
  with jax.enable_x64(True):
    folded = jax.tree.map(np.asarray, resnet.fold_batch_norms(jax.tree.map(lambda a: jnp.asarray(a, jnp.float64),
                                                                           variables)))
  wellposed.assert_equal_functions(_float64_logits(name, {"params": folded}, x, deploy=True), expected)
  swapped = jax.tree.map(lambda a: np.swapaxes(a, 0, 1) if a.ndim == 4 else a, variables["params"])
  wellposed.assert_caught(_float64_logits(name, {**variables, "params": swapped}, x), expected)
  no_shortcut = {**folded, "layer2_0": {**folded["layer2_0"], "downsample": jax.tree.map(
      np.zeros_like, folded["layer2_0"]["downsample"])}}
  wellposed.assert_caught(_float64_logits(name, {"params": no_shortcut}, x, deploy=True), expected)


@pytest.mark.parametrize("name", list(resnet.RESNETS))
def test_every_resnet_loads_timms_weights_strictly_with_timms_parameter_count(name):
  state_dict = timm.create_model(resnet.RESNETS[name][2]).state_dict()
  variables = resnet.from_timm_state_dict(state_dict, name)
  assert sum(np.size(a) for a in jax.tree.leaves(variables["params"])) == sum(
      v.numel() for k, v in state_dict.items() if "running" not in k and "num_batches" not in k)
  with pytest.raises(ValueError, match="lacks layer1.0.conv1.weight"):
    resnet.from_timm_state_dict({k: v for k, v in state_dict.items() if k != "layer1.0.conv1.weight"}, name)
  with pytest.raises(ValueError, match="unexpected keys"):
    resnet.from_timm_state_dict({**state_dict, "extra.weight": state_dict["fc.bias"]}, name)
