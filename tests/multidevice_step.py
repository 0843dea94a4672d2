"""One training step on 8 simulated CPU devices vs on 1 device with the whole batch, and one QAT step (Qwix's
activation statistics where BatchNorm's go) likewise; exits non-zero if they differ.

Run as a script (the device count must be fixed before JAX starts): python tests/multidevice_step.py
"""

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import functools  # pylint: disable=g-import-not-at-top,wrong-import-position

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

import repvgg_jax as rv
from configs import quickstart
from repvgg_jax import quantization, steps, training


def one_step(state, batch, devices, learning_rate):
  step = jax.pmap(functools.partial(steps.train_step, learning_rate=learning_rate, num_classes=10,
                                    label_smoothing=0.1), axis_name=steps.AXIS, devices=devices)
  n = len(devices)
  sharded = jax.tree.map(lambda x: x.reshape((n, -1) + x.shape[1:]), batch)
  new_state, metrics = step(steps.replicate(state, devices), sharded)
  replicas = jax.device_get(new_state)
  for i in range(1, n):  # Every replica holds the same state: gradients and BN statistics were synchronized.
    chex.assert_trees_all_equal(jax.tree.map(lambda x: x[i], replicas), jax.tree.map(lambda x: x[0], replicas))
  return jax.tree.map(lambda x: x[0], replicas), jax.device_get(metrics)


def main():
  assert jax.device_count() == 8, jax.devices()
  config = quickstart.get_config()
  config.model_overrides.num_blocks = (1, 2, 1, 1)
  model = training.model_from_config(config, num_classes=10)
  learning_rate = optax.constant_schedule(0.1)  # The recipe's warm-up starts at 0 and would not move params.
  state = steps.create_train_state(jax.random.key(0), config, model, (28, 28, 1),
                                   steps.create_optimizer(config, learning_rate,
                                                         steps.weight_decay_schedule(config, 10)))
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.normal(size=(32, 28, 28, 1)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 10, size=32), jnp.int32)}
  eight, m8 = one_step(state, batch, jax.devices(), learning_rate)
  one, m1 = one_step(state, batch, jax.devices()[:1], learning_rate)
  moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(state.params)))
  assert moved > 1e-4, "the step did not change the parameters"
  for name in ("params", "opt_state", "batch_stats"):
    chex.assert_trees_all_close(getattr(eight, name), getattr(one, name), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(m8["loss"][0], m1["loss"][0], rtol=1e-5)
  worst = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
              for a, b in zip(jax.tree.leaves((eight.params, eight.batch_stats)), jax.tree.leaves((one.params, one.batch_stats))))
  print(f"OK 8 devices == 1 device after one step; max abs difference {worst:.2e}")
  qat_step(config, rv.reparam(state.params, state.batch_stats), batch)


def qat_step(config, params, batch):
  """A QAT step from calibrated statistics, the batch split over 8 devices against every device holding the whole
  batch (what one device computes, in the same 8-device program): the activation ranges (each the batch's
  extremes, over the images a device saw and then over the devices) and the parameters must agree, and every
  replica must hold the same ranges (without the reduction over devices each keeps its own share's, and device
  0's are saved)."""
  qmodel = quantization.fake_quantized(training.model_from_config(config, 10, deploy=True))
  stats = quantization.calibrate(qmodel, params, [batch["image"][:16]])
  learning_rate = optax.constant_schedule(1e-2)
  state = quantization.qat_state(qmodel, params, stats, optax.sgd(learning_rate))
  devices = jax.devices()
  split, _ = one_step(state, batch, devices, learning_rate)  # Asserts that the replicas agree.
  whole, _ = one_step(state, jax.tree.map(lambda x: jnp.concatenate([x] * len(devices)), batch), devices, learning_rate)
  moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(whole.batch_stats), jax.tree.leaves(stats)))
  assert moved > 1e-4, "the QAT step did not update the activation statistics"
  chex.assert_trees_all_close(split.batch_stats, whole.batch_stats, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(split.params, whole.params, rtol=1e-5, atol=1e-6)
  worst = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
              for a, b in zip(jax.tree.leaves(split.batch_stats), jax.tree.leaves(whole.batch_stats)))
  print(f"OK QAT on 8 devices == the whole batch on each after one step; activation ranges' max abs difference "
        f"{worst:.2e}")

if __name__ == "__main__":
  main()
