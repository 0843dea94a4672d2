"""The training loop: data-parallel training of RepVGG, ending in a re-parameterized, verified, evaluated
deploy model. The steps it runs are in ``steps``; the data in ``input_pipeline`` (tf.data); the run directory's
names in ``run_layout``.
"""

import contextlib
import functools
import hashlib
import json
import os
import time
from typing import Iterable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from repvgg_jax import checkpoints, export, finetune, input_pipeline, preemption, run_layout, workdir_lock
from repvgg_jax.equivalence import check_equivalence
from repvgg_jax.errors import ConfigError
from repvgg_jax.families import create_model, reparam
from repvgg_jax.models import given_overrides
from repvgg_jax.steps import (AUX_LOSS_WEIGHT, AXIS, OPTIMIZERS, TrainState, create_optimizer, create_train_state,
                              eval_step, first_non_finite, learning_rate_schedule, prefetch_to_device, replicate,
                              shard, train_step, unreplicate, weight_decay_schedule)




# --------------------------------------------------------------------------- Set-up and checks.

def validate_config(config: ml_collections.ConfigDict, known_fields: Optional[Iterable[str]] = None) -> None:
  """Rejects impossible settings and, given the recipe's ``known_fields``, unknown fields; before device work."""
  unknown = sorted(set(config.keys()) - set(known_fields)) if known_fields is not None else []
  if unknown:
    raise ConfigError(f"Unknown config field(s) {unknown}; see configs/default.py for the fields.")
  if config.optimizer not in OPTIMIZERS:
    raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {config.optimizer!r}.")
  finetune.compile_patterns("init_exclude", config.init_exclude)
  finetune.compile_patterns("freeze", config.freeze)
  if config.init_exclude and not config.init_from:
    raise ConfigError("init_exclude names weights not to load, but init_from loads none; set init_from.")
  if config.input_threads < 0:
    raise ConfigError(f"input_threads must be >= 0 (0 = follow the host); got {config.input_threads}.")
  if config.batch_size <= 0:
    raise ConfigError(f"batch_size must be positive; got {config.batch_size}.")
  if config.batch_size % jax.device_count():
    raise ConfigError(f"batch_size {config.batch_size} is not divisible by the {jax.device_count()} devices.")
  if config.checkpoint_every_steps <= 0 or config.log_every_steps <= 0 or config.keep_checkpoints <= 0:
    raise ConfigError("checkpoint_every_steps, log_every_steps and keep_checkpoints must be positive.")
  if not 0 <= config.ema_decay < 1:
    raise ConfigError(f"ema_decay must be in [0, 1) (0 = no moving average); got {config.ema_decay}.")
  if config.final_weight_decay > config.weight_decay:
    raise ConfigError(f"final_weight_decay {config.final_weight_decay} exceeds weight_decay "
                      f"{config.weight_decay}; the cosine annealing only decreases it (< 0 = constant).")
  if config.autoaugment_strength < 0:
    raise ConfigError(f"autoaugment_strength must be >= 0 (0 = off); got {config.autoaugment_strength}.")
  if config.randaugment_magnitude < 0 or int(config.randaugment_magnitude) != config.randaugment_magnitude:
    raise ConfigError(f"randaugment_magnitude must be an integer >= 0 (0 = off); got {config.randaugment_magnitude}.")
  if config.randaugment_magnitude and (config.autoaugment_strength or config.progressive_learning):
    raise ConfigError("choose one augmentation policy: randaugment_magnitude, or autoaugment_strength / "
                      "progressive_learning.")
  if config.eval_image_size < 0:
    raise ConfigError(f"eval_image_size must be >= 0 (0 = image_size); got {config.eval_image_size}.")
  stages = [tuple(stage) for stage in config.progressive_learning]
  if stages and (any(len(s) != 3 or s[1] <= 0 or s[2] < 0 for s in stages) or stages[0][0] != 0
                 or any(a[0] >= b[0] for a, b in zip(stages, stages[1:]))):
    raise ConfigError("progressive_learning must be ((0, image_size, autoaugment_strength), (epoch, ...), ...) "
                      f"with increasing epochs, positive sizes, strengths >= 0; got {config.progressive_learning}.")


def model_from_config(config, num_classes: int, *, deploy: bool = False, half_precision: Optional[bool] = None):
  half = config.half_precision if half_precision is None else half_precision
  try:
    return create_model(config.model, num_classes=num_classes, deploy=deploy,
                        dtype=jnp.bfloat16 if half else jnp.float32, bn_axis_name=None if deploy else AXIS,
                        **given_overrides(config.model_overrides.to_dict()))
  except ValueError as e:
    raise ConfigError(str(e)) from e


class MetricWriter:
  """Writes metrics to ``<workdir>/metrics.jsonl`` (one JSON object per line) and TensorBoard; process 0 only."""

  def __init__(self, workdir: str):
    self.active = jax.process_index() == 0
    if self.active:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      self._tf = tf
      self._tb = tf.summary.create_file_writer(run_layout.path(workdir, run_layout.TENSORBOARD))
      self._path = run_layout.path(workdir, run_layout.METRICS)

  def write(self, step: int, split: str, metrics: dict) -> None:
    if not self.active:
      return
    values = {k: float(v) for k, v in metrics.items()}
    with open(self._path, "a") as f:
      f.write(json.dumps({"step": int(step), "split": split, **values}) + "\n")
    with self._tb.as_default(step=int(step)):
      for k, v in values.items():
        self._tf.summary.scalar(f"{split}/{k}", v)
    self._tb.flush()


def evaluate(p_eval_step, variables, batches) -> dict:
  """Accuracy and mean loss over all batches; ``variables`` replicated, batches host-local numpy."""
  totals = None
  for batch in batches:
    sums = p_eval_step(variables, shard(batch))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.tree.map(float, unreplicate(totals))
  count = max(totals["count"], 1.0)
  return {"accuracy": totals["correct"] / count, "top5_accuracy": totals["correct_top5"] / count,
          "loss": totals["loss"] / count, "count": totals["count"]}


def train_batches(source, config, local_batch: int, start_step: int, num_steps: int, steps_per_epoch: int):
  """Sharded training batches for steps start_step + 1 .. num_steps. With ``progressive_learning``, the steps
  from epoch e_i on get ``size_i`` px crops at AutoAugment strength ``strength_i``; each stage is the same
  stream (a function of seed and position) cut at its first step, so a resumed run gets the same batches."""
  stages = ([tuple(stage) for stage in config.progressive_learning]
            or [(0, config.image_size, config.autoaugment_strength)])
  starts = [int(epoch * steps_per_epoch) for epoch, _, _ in stages]
  for (_, size, strength), begin, end in zip(stages, starts, starts[1:] + [num_steps]):
    first, last = max(begin, start_step), min(end, num_steps)
    if first < last:
      stage_config = config.copy_and_resolve_references()
      stage_config.image_size, stage_config.autoaugment_strength = size, strength
      dataset = input_pipeline.train_dataset(source, stage_config, local_batch, config.seed, first)
      yield from map(shard, input_pipeline.numpy_batches(source, config.train_split, dataset.take(last - first)))


def _format_duration(seconds: float) -> str:
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# --------------------------------------------------------------------------- The loop.

def _setup_logging() -> None:
  """Only process 0 logs progress; orbax's per-save INFO lines are dropped so progress lines stay readable."""
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)
  handler = logging.get_absl_handler()
  if not any(getattr(f, "__name__", "") == "_drop_orbax_info" for f in handler.filters):
    def _drop_orbax_info(record):
      return record.levelno >= logging.converter.STANDARD_WARNING or "/orbax/" not in record.pathname
    handler.addFilter(_drop_orbax_info)


def run_record(config, num_classes: int, image_shape, abstract_state) -> dict:
  """What a checkpoint belongs to: the model, and a fingerprint of the state's layout (optimizer included), so
  that a checkpoint of another run is refused instead of being taken for a damaged one."""
  layout = "\n".join(f"{jax.tree_util.keystr(path)} {leaf.shape} {leaf.dtype}"
                      for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0])
  record = {"model": config.model, "model_overrides": config.model_overrides.to_dict(), "num_classes": num_classes,
            "image_shape": image_shape, "state_layout": hashlib.sha256(layout.encode()).hexdigest()[:16]}
  return json.loads(json.dumps(record))  # Through JSON, so tuples compare equal to a restored record's lists.


def _accept_record(workdir: str, record: dict, step: int, saved: dict) -> None:
  if saved != record:
    differences = "; ".join(f"{k} {saved.get(k)!r} there, {record.get(k)!r} here"
                            for k in sorted(set(saved) | set(record)) if saved.get(k) != record.get(k))
    raise ConfigError(f"{workdir} holds a checkpoint (step {step}) of another run ({differences}); "
                      "use another --workdir.")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       known_fields: Optional[Iterable[str]] = None) -> dict:
  """Trains, checkpoints, resumes, then re-parameterizes, verifies, evaluates and saves the deploy model.

  Returns the final metrics: train-form and deploy-form eval accuracy, steps, and the equivalence error.
  On SIGTERM or SIGINT, saves a checkpoint at the step reached and raises ``preemption.Preempted``; the same
  call resumes there, with the data stream where it stopped. ``known_fields``: the recipe's config fields,
  so that a misspelt field is an error (train.py passes configs/default.py's).
  """
  if config.coordinator_address:
    jax.distributed.initialize(config.coordinator_address, config.num_processes, config.process_id)
  _setup_logging()
  validate_config(config, known_fields)
  logging.info("Input pipeline: %d threads on %d usable cores (%s backend).",
               input_pipeline.configure_host(config.input_threads), input_pipeline.usable_cores(),
               jax.default_backend())
  source = input_pipeline.get_source(config.dataset, config.data_dir, (config.train_split, config.eval_split))
  model = model_from_config(config, source.num_classes)
  image_shape = (config.image_size, config.image_size, source.channels)
  steps_per_epoch = source.num_examples(config.train_split) // config.batch_size
  if steps_per_epoch == 0:
    raise ConfigError(f"batch_size {config.batch_size} exceeds the training split.")
  num_steps = config.num_train_steps if config.num_train_steps > 0 else int(config.num_epochs * steps_per_epoch)
  eval_every = config.eval_every_steps if config.eval_every_steps > 0 else steps_per_epoch
  learning_rate = learning_rate_schedule(config, steps_per_epoch, num_steps)
  optimizer = create_optimizer(config, learning_rate, weight_decay_schedule(config, num_steps))
  init = functools.partial(create_train_state, jax.random.key(config.seed), config, model, image_shape, optimizer)
  abstract_state = jax.eval_shape(init)
  checkpoints.check_workdir(workdir, checkpoints.tree_bytes(abstract_state))
  # The lock before any checkpoint is read or written; the manager closed however the run ends (its background
  # clean-up must not outlive an error).
  with workdir_lock.hold(workdir), contextlib.ExitStack() as cleanup:
    if source.classes and jax.process_index() == 0:  # Inside the lock: a refused run must not rewrite them.
      with open(run_layout.path(workdir, run_layout.LABELS), "w") as f:
        f.write("".join(f"{name}\n" for name in source.classes))
    record = run_record(config, source.num_classes, image_shape, abstract_state)
    manager = checkpoints.checkpoint_manager(workdir, config.keep_checkpoints)
    cleanup.callback(manager.close)
    restored = checkpoints.restore_newest_intact(manager, functools.partial(_accept_record, workdir, record), init)
    if restored is None:
      state = init(pretrained=_pretrained(config, abstract_state))
    else:
      state = restored[1]
      logging.info("Resumed from step %d%s", state.step, f"; init_from={config.init_from} is ignored: the run "
                   "continues from its own checkpoint" if config.init_from else "")
    start_step = int(state.step)
    state = replicate(state)

    p_train_step = jax.pmap(functools.partial(train_step, learning_rate=learning_rate,
                                              num_classes=source.num_classes, label_smoothing=config.label_smoothing,
                                              mixup_alpha=config.mixup_alpha, ema_decay=config.ema_decay,
                                              aux_loss_weight=AUX_LOSS_WEIGHT if model.aux_heads() else 0.0,
                                              frozen=tuple(config.freeze)),
                            axis_name=AXIS, donate_argnums=(0,))
    p_eval_step = jax.pmap(functools.partial(eval_step, model.apply), axis_name=AXIS)
    local_batch = config.batch_size // jax.process_count()
    train_iter = prefetch_to_device(train_batches(source, config, local_batch, start_step, num_steps, steps_per_epoch))
    writer = MetricWriter(workdir)
    eval_metrics, pending, window_start = None, [], time.time()

    def flush(step):
      """Logs the steps since the last flush; stops on a non-finite loss before anything is saved."""
      nonlocal pending, window_start
      if not pending:
        return
      history = unreplicate(pending)
      bad = first_non_finite(history)
      if bad is not None:
        bad += step - len(pending) + 1
        raise FloatingPointError(f"Loss or parameters became non-finite at step {bad}; stopping. The last good "
                                 f"checkpoint (step {manager.latest_step()}) is kept in {manager.directory}.")
      elapsed = time.time() - window_start
      summary = {k: float(np.mean([h[k] for h in history])) for k in history[0] if k != "params_finite"}
      summary["images_per_sec"] = len(pending) * config.batch_size / elapsed
      eta = (num_steps - step) * elapsed / len(pending)
      logging.info("step %d/%d epoch %.2f loss %.4f accuracy %.4f images/s %.0f ETA %s", step, num_steps,
                   step / steps_per_epoch, summary["loss"], summary["accuracy"], summary["images_per_sec"],
                   _format_duration(eta))
      writer.write(step, "train", summary)
      pending, window_start = [], time.time()

    def save(step, accuracy=None):
      checkpoints.save(manager, step, unreplicate(state), record, accuracy)

    def stop_on_bad_data(error, step):
      """An image that fails to decode mid-run: the steps done are checkpointed, then one line says which."""
      flush(step)
      if step > start_step and manager.latest_step() != step:
        save(step)
      raise input_pipeline.DatasetError(f"{error} Stopped at step {step} with its checkpoint kept in "
                                        f"{manager.directory}; the same command resumes from it.") from error

    with preemption.StopRequests() as stop:
      for step in range(start_step + 1, num_steps + 1):
        try:
          batch = next(train_iter)
        except input_pipeline.DatasetError as e:
          stop_on_bad_data(e, step - 1)
        state, metrics = p_train_step(state, batch)
        pending.append(metrics)
        if step % config.log_every_steps == 0 or step == num_steps:
          flush(step)
        evaluated = step % eval_every == 0 or step == num_steps
        if evaluated:
          flush(step)
          try:
            eval_metrics = evaluate(p_eval_step, state.eval_variables(),
                                    input_pipeline.eval_batches(source, config, local_batch))
          except input_pipeline.DatasetError as e:
            stop_on_bad_data(e, step)
          logging.info("step %d eval accuracy %.4f top-5 %.4f loss %.4f", step, eval_metrics["accuracy"],
                       eval_metrics["top5_accuracy"], eval_metrics["loss"])
          writer.write(step, "eval", eval_metrics)
        if evaluated or step % config.checkpoint_every_steps == 0:
          flush(step)
          save(step, eval_metrics["accuracy"] if evaluated else None)
          window_start = time.time()  # Checkpoint and eval time is not training throughput.
        if stop.should_stop(step):
          flush(step)
          if manager.latest_step() != step:
            save(step)
          path = os.path.join(str(manager.directory), str(step))
          logging.warning("Preempted at step %d; checkpoint saved to %s", step, path)
          raise preemption.Preempted(step, path, stop.exit_status)
    return finish(config, workdir, source, unreplicate(state), eval_metrics, writer)


def _pretrained(config, abstract_state: TrainState) -> Optional[dict]:
  """``config.init_from``'s variables, checked against the run's shapes before anything is compiled."""
  if not config.init_from:
    return None
  pretrained = finetune.read_pretrained(config)
  finetune.merge({"params": abstract_state.params, "batch_stats": abstract_state.batch_stats}, pretrained,
                 config.init_exclude)
  return pretrained


def fuse_checked(config, num_classes: int, variables: dict, images) -> tuple[dict, float]:
  """Training-time ``variables`` re-parameterized (with the config's BN epsilon) and checked at HIGHEST precision
  against the training form on ``images``: (deploy params, max relative logit error); beyond the bound,
  ``EquivalenceError``."""
  train_model = model_from_config(config, num_classes, half_precision=False)
  deploy_model = model_from_config(config, num_classes, deploy=True, half_precision=False)
  deploy_params = jax.jit(functools.partial(reparam, eps=train_model.bn_epsilon))(variables["params"],
                                                                                  variables["batch_stats"])
  return deploy_params, check_equivalence(train_model, variables, deploy_model, deploy_params, images)


def finish(config, workdir: str, source, state: TrainState, eval_metrics: Optional[dict], writer) -> dict:
  """reparam -> equivalence check on a held-out batch -> deploy evaluation on the whole split -> save."""
  local_batch = config.batch_size // jax.process_count()
  full_eval = config.copy_and_resolve_references()
  full_eval.steps_per_eval = -1
  held_out = next(input_pipeline.eval_batches(source, full_eval, local_batch))
  deploy_params, max_rel_error = fuse_checked(config, source.num_classes, state.eval_variables(), held_out["image"])
  deploy_model = model_from_config(config, source.num_classes, deploy=True, half_precision=False)
  deploy_step = jax.pmap(functools.partial(eval_step, model_from_config(config, source.num_classes,
                                                                         deploy=True).apply), axis_name=AXIS)
  deploy_metrics = evaluate(deploy_step, replicate({"params": deploy_params}),
                            input_pipeline.eval_batches(source, full_eval, local_batch))
  step = int(state.step)
  deploy_dir = run_layout.path(workdir, run_layout.DEPLOY)
  checkpoints.save_tree(deploy_dir, jax.device_get(deploy_params))  # orbax: host 0 writes.
  onnx_error = write_onnx(config, workdir, deploy_model, deploy_params, held_out["image"], source.classes)
  if jax.process_index() == 0:
    with open(run_layout.path(workdir, run_layout.INFERENCE), "w") as f:
      json.dump(inference_record(config, source), f, indent=1)
  train_accuracy = eval_metrics["accuracy"] if eval_metrics else float("nan")
  logging.info("Re-parameterized: max relative logit error %.2e. Eval accuracy: training form %.4f, deploy "
               "form %.4f, top-5 %.4f (%d images). Deploy params saved to %s.", max_rel_error, train_accuracy,
               deploy_metrics["accuracy"], deploy_metrics["top5_accuracy"], deploy_metrics["count"],
               deploy_dir)
  writer.write(step, "deploy", {**deploy_metrics, "train_form_accuracy": train_accuracy,
                                "max_relative_error": max_rel_error})
  return {"step": step, "train_form_accuracy": train_accuracy, "deploy_accuracy": deploy_metrics["accuracy"],
          "deploy_top5_accuracy": deploy_metrics["top5_accuracy"],
          "max_relative_error": max_rel_error, "onnx_relative_error": onnx_error}


def inference_record(config, source) -> dict:
  """The deploy model and the eval preprocessing of a finished run, for ``predict``: written last, so that
  a workdir holding it holds a finished run."""
  return {"model": config.model, "model_overrides": config.model_overrides.to_dict(),
          "num_classes": source.num_classes, "channels": source.channels, "mean": list(source.mean),
          "std": list(source.std), "image_size": input_pipeline.eval_image_size(config),
          "crop_ratio": config.eval_crop_ratio}


def write_onnx(config, workdir: str, deploy_model, deploy_params, images, labels=()) -> Optional[float]:
  """``<workdir>/deploy.onnx`` (config.export_onnx), kept only once onnxruntime reproduces the JAX deploy
  logits on ``images``; returns that error. Without the ``onnx`` extra, one warning line and None."""
  if not config.export_onnx or jax.process_index() != 0:
    return None
  try:
    import onnx, onnxruntime  # noqa: F401  pylint: disable=g-import-not-at-top,multiple-imports,unused-import
  except ImportError:
    logging.warning("deploy.onnx not written: pip install 'repvgg-jax[onnx]' (or set export_onnx=False).")
    return None
  path = run_layout.path(workdir, run_layout.DEPLOY_ONNX)
  error = export.save_checked_onnx(deploy_model, jax.device_get(deploy_params), images, path, labels)
  logging.info("Exported %s: onnxruntime matches the JAX deploy logits to %.2e.", path, error)
  return error
