"""Spec of the deploy export: a jax.export artifact that runs without the model code, for any batch size."""

import chex
import jax
import numpy as np
import pytest

import repvgg_jax as rv
from repvgg_jax import export
from tests.helpers import random_variables

SMALL = dict(num_classes=7, width_multiplier=(0.25, 0.25, 0.25, 0.5), num_blocks=(2, 2, 2, 1))

pytestmark = pytest.mark.usefixtures("full_precision")


@pytest.fixture(scope="module")
def trained():
  model = rv.create_model("RepVGG-B1g2", **SMALL)
  variables = random_variables(model, (1, 32, 32, 3))
  deploy = rv.create_model("RepVGG-B1g2", deploy=True, **SMALL)
  return model, variables, deploy, rv.reparam(variables["params"], variables["batch_stats"])


def test_exported_deploy_model_round_trips_for_any_batch(trained, tmp_path):
  model, variables, deploy, plain = trained
  path = str(tmp_path / "repvgg.jaxexport")
  export.save(path, export.export_deploy(deploy, plain, (32, 32, 3)))
  run = export.load(path)  # Nothing from repvgg_jax's models is used from here on.
  for batch in (1, 5):
    x = jax.random.normal(jax.random.key(batch), (batch, 32, 32, 3))
    expected = deploy.apply({"params": plain}, x)
    chex.assert_trees_all_close(run(x), expected, rtol=1e-6, atol=1e-6)
    # And it is the training model's function, too.
    y_train = model.apply(variables, x)
    chex.assert_trees_all_close(run(x), y_train, rtol=1e-5, atol=1e-5 * float(np.abs(y_train).max()))


def test_exporting_the_training_time_graph_is_refused(trained):
  model, variables, deploy, _ = trained
  with pytest.raises(ValueError, match="deploy"):
    export.export_deploy(model, variables["params"], (32, 32, 3))
  with pytest.raises(ValueError, match="training-time branch"):
    export.export_deploy(deploy, variables["params"], (32, 32, 3))
