"""The per-device training and eval steps, the state they carry, and the optimizer of the official recipe.

Plain functions of (state, batch); the axis name is their only link to ``jax.pmap``, so they can move to
``jit``/``shard_map`` unchanged. Gradients are averaged with ``lax.pmean`` and BatchNorm statistics are
synchronized over the same axis, so N devices compute exactly one step on the whole batch. Nothing here
needs TensorFlow (the bench and accelerator images use these without it).
"""

import collections
import contextlib
import functools
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import optax
from flax.training import train_state
from jax import lax

from repvgg_jax import families, finetune

AXIS = "batch"


class TrainState(train_state.TrainState):
  batch_stats: Any
  rng: jax.Array  # Raw uint32 key data, so it checkpoints like any array.
  # Exponential moving average of {"params", "batch_stats"} (config.ema_decay > 0), else None: what is
  # evaluated and re-parameterized when present.
  ema: Any = None

  def eval_variables(self) -> dict:
    """The variables to evaluate and deploy: the moving average where one is kept."""
    return self.ema if self.ema is not None else {"params": self.params, "batch_stats": self.batch_stats}


def weight_decay_mask(params) -> Any:
  """True where weight decay applies, by the rule of the params' family (``plan.Family.decays``): RepVGG's
  official train.py decays every kernel and the identity branch's BN scale, not biases nor the BN scales of the
  3x3 and 1x1 branches; RepViT's (timm's optimizer) every kernel, no bias or BN parameter."""
  decays = families.of_params(params).decays
  return jax.tree_util.tree_map_with_path(lambda path, leaf: decays(tuple(p.key for p in path), leaf), params)


def learning_rate_schedule(config, steps_per_epoch: int, num_steps: int) -> optax.Schedule:
  """Linear warm-up to ``learning_rate * batch_size / 256``, then cosine decay to 0 at ``num_steps``."""
  peak = config.learning_rate * config.batch_size / 256
  warmup = min(int(config.warmup_epochs * steps_per_epoch), num_steps - 1)
  return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, num_steps, end_value=0.0)


def weight_decay_schedule(config, num_steps: int) -> optax.Schedule:
  """``weight_decay`` throughout, or, where ``final_weight_decay`` >= 0, cosine-annealed from ``weight_decay``
  to ``final_weight_decay`` at ``num_steps`` (MobileOne's recipe: 1e-4 to 1e-5)."""
  if config.final_weight_decay < 0:
    return optax.constant_schedule(config.weight_decay)
  if config.weight_decay == 0:
    return optax.constant_schedule(0.0)
  return optax.cosine_decay_schedule(config.weight_decay, num_steps,
                                     alpha=config.final_weight_decay / config.weight_decay)


OPTIMIZERS = ("sgd", "adamw")


def create_optimizer(config, learning_rate: optax.Schedule,
                     weight_decay: optax.Schedule) -> optax.GradientTransformation:
  """``config.optimizer``: "sgd", the official recipe (the decay joins the gradient before momentum, as in
  PyTorch's SGD), or "adamw" (decoupled decay, scaled by the learning rate, optax's default betas). Both decay
  the leaves of ``weight_decay_mask``; the leaves of ``config.freeze`` get no update at all."""
  if config.optimizer == "sgd":
    optimizer = optax.chain(optax.add_decayed_weights(weight_decay, weight_decay_mask),
                            optax.sgd(learning_rate, momentum=config.momentum, nesterov=config.nesterov))
  elif config.optimizer == "adamw":
    optimizer = optax.adamw(learning_rate, weight_decay=weight_decay, mask=weight_decay_mask)
  else:
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}; got {config.optimizer!r}.")
  return finetune.freeze(optimizer, config.freeze)


def smoothed_targets(labels, num_classes: int, smoothing: float):
  """(N,) int labels -> (N, num_classes) targets with label smoothing."""
  return optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing) if smoothing else jax.nn.one_hot(
      labels, num_classes)


def mixup(rng, images, targets, alpha: float):
  """Mixes each example with the batch reversed, with one Beta(alpha, alpha) weight per batch."""
  lam = jax.random.beta(rng, alpha, alpha)
  return lam * images + (1 - lam) * images[::-1], lam * targets + (1 - lam) * targets[::-1]


# --------------------------------------------------------------------------- Steps (per device).

def update_ema(ema: dict, variables: dict, decay: float) -> dict:
  """decay * ema + (1 - decay) * variables, leaf by leaf (BatchNorm statistics too, so that the average
  model is evaluated with statistics that match its weights); written as an increment, so that the average
  of a leaf that does not change (a frozen one) stays bit-identical to it."""
  return jax.tree.map(lambda e, v: e + (1 - decay) * (v - e), ema, variables)


AUX_LOSS_WEIGHT = 0.1  # RepVGGplus's auxiliary heads (official main.py: 0.1 x each head's loss).


def train_step(state: TrainState, batch: dict, *, learning_rate: optax.Schedule, num_classes: int,
               label_smoothing: float = 0.0, mixup_alpha: float = 0.0, ema_decay: float = 0.0,
               aux_loss_weight: float = 0.0, frozen: tuple[str, ...] = (), axis_name: str = AXIS):
  """One optimizer step (the state's ``tx``: SGD or AdamW) on this device's share of the batch. batch: image (n, H, W, C), label (n,).
  ``aux_loss_weight`` > 0: the model has auxiliary heads (RepVGGplus), whose losses join the main one so
  weighted; the reported loss and accuracy stay the main head's. ``frozen``: ``config.freeze``'s patterns, whose
  BatchNorms run on their running statistics (``finetune``); the optimizer leaves their parameters alone."""
  images = batch["image"]
  targets = smoothed_targets(batch["label"], num_classes, label_smoothing)
  if mixup_alpha > 0:
    rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), lax.axis_index(axis_name))
    images, targets = mixup(rng, images, targets.astype(images.dtype), mixup_alpha)

  def loss_fn(params):
    variables = {"params": params, "batch_stats": state.batch_stats}
    with nn.intercept_methods(finetune.frozen_batch_norm(frozen)) if frozen else contextlib.nullcontext():
      return forward(variables)

  def forward(variables):
    if aux_loss_weight > 0:
      (logits, aux), updates = state.apply_fn(variables, images, train=True, return_aux=True, mutable=["batch_stats"])
    else:
      (logits, updates), aux = state.apply_fn(variables, images, train=True, mutable=["batch_stats"]), {}
    loss = optax.softmax_cross_entropy(logits, targets).mean()
    total = loss + aux_loss_weight * sum(optax.softmax_cross_entropy(a, targets).mean() for a in aux.values())
    return total, (loss, logits, updates["batch_stats"])

  (_, (loss, logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grads = lax.pmean(grads, axis_name)
  metrics = lax.pmean({"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}, axis_name)
  metrics["learning_rate"] = learning_rate(state.step)
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  if ema_decay > 0:
    new_state = new_state.replace(ema=update_ema(state.ema, {"params": new_state.params,
                                                             "batch_stats": batch_stats}, ema_decay))
  # A finite loss can still be followed by an update to inf/nan; the loop must not checkpoint that.
  metrics["params_finite"] = jnp.isfinite(optax.tree.norm(new_state.params)).astype(jnp.float32)
  return new_state, metrics


def first_non_finite(history) -> Optional[int]:
  """The index of the first of ``train_step``'s metrics (host copies, in step order) whose loss or updated
  parameters are not finite; None where all are."""
  healthy = np.array([np.isfinite(h["loss"]) and h["params_finite"] == 1 for h in history])
  return None if healthy.all() else int(np.argmin(healthy))


def eval_step(apply_fn: Callable, variables: dict, batch: dict, axis_name: str = AXIS) -> dict:
  """Sums over all devices of correct top-1 and top-5 predictions (top-k with k = min(5, classes)),
  cross-entropy and real examples (``mask``) in a batch."""
  logits = apply_fn(variables, batch["image"], train=False)
  mask = batch["mask"]
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
  top5 = lax.top_k(logits, min(5, logits.shape[-1]))[1]
  in_top5 = jnp.any(top5 == batch["label"][:, None], axis=-1)
  return lax.psum({"correct": jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * mask),
                   "correct_top5": jnp.sum(in_top5 * mask),
                   "loss": jnp.sum(loss * mask), "count": jnp.sum(mask)}, axis_name)


def create_train_state(rng, config, model, image_shape, optimizer, pretrained=None) -> TrainState:
  """The initial state: random, or ``pretrained`` variables merged in (``finetune.initialize_from``); with
  ``config.ema_decay`` > 0, a moving average that starts at the initial variables."""
  init_rng, state_rng = jax.random.split(rng)
  variables = jax.jit(functools.partial(model.init, train=False))(init_rng, jnp.zeros((1,) + image_shape))
  if pretrained is not None:
    variables = finetune.initialize_from(config, dict(variables), pretrained)
  ema = jax.tree.map(jnp.copy, dict(variables)) if config.ema_decay > 0 else None
  return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=optimizer,
                           batch_stats=variables["batch_stats"], rng=jax.random.key_data(state_rng), ema=ema)


def device_sharding(devices=None) -> jax.NamedSharding:
  """The layout of ``pmap(axis_name=AXIS)``'s inputs and outputs: the leading axis over the local devices. Inputs
  placed so are neither resharded nor a cause of a second compilation when the step meets its own output."""
  devices = jax.local_devices() if devices is None else devices
  return jax.NamedSharding(jax.sharding.Mesh(np.array(devices), (AXIS,)), jax.P(AXIS))


def replicate(tree, devices=None):
  """One copy per device, in ``device_sharding``."""
  count = len(jax.local_devices() if devices is None else devices)
  return jax.device_put(jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (count,) + np.shape(x)), tree),
                        device_sharding(devices))


def unreplicate(tree):
  """The first local device's copy of a replicated tree, as host numpy. pmap's arrays are shards of one global
  array (pmap runs on shard_map in JAX 0.10 and 0.12), where ``x[0]`` would compile and run a gather per leaf."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data).reshape(x.shape[1:]), tree)


def prefetch_to_device(batches: Iterator[dict], size: int = 2) -> Iterator[dict]:
  """Keeps ``size`` sharded batches on their way to the local devices, each copied once, host to device, in
  pmap's own layout. (flax's ``jax_utils.prefetch_to_device`` first re-stacks every batch on the host: a
  256x224x224x3 float32 batch took 35 ms there on this project's 2-core machine, more than an H200's 30 ms A0
  step; benchmarks/input_pipeline.py.)"""
  sharding = device_sharding()
  queue = collections.deque()
  for batch in batches:
    queue.append(jax.device_put(batch, sharding))
    if len(queue) == size:
      yield queue.popleft()
  yield from queue


def shard(batch: dict) -> dict:
  """(local_batch, ...) numpy arrays -> (local_devices, local_batch / local_devices, ...)."""
  n = jax.local_device_count()
  return jax.tree.map(lambda x: x.reshape((n, -1) + x.shape[1:]), batch)
