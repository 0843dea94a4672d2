"""INT8 of a finished run, from the command line (the library is ``repvgg_jax.quantization``):

  python -m repvgg_jax.quantize --config=configs/quickstart.py --workdir=runs/quickstart [--qat_epochs=1]

reads ``<workdir>/deploy`` (a finished run, or converted weights saved there), calibrates on training images,
evaluates float32 / PTQ / QAT on the eval split, and writes ``<workdir>/int8_metrics.json`` and
``<workdir>/deploy_int8.onnx`` (only once onnxruntime agrees with the JAX fake-quantized logits).
``--weight_bits=8`` (the default) is the INT8 graph, int8 weights on a 7-bit grid (``quantization.INT8_WEIGHT_BITS``);
``--weight_bits=4`` the W4A8 stress setting in JAX fake quantization only (``w4a8_metrics.json``, no ONNX).
QAT runs the training loop's own step (``steps.train_step``: the config's optimizer, label smoothing and data,
one finiteness check) and evaluates with its ``eval_step``; the learning rate is ``--qat_learning_rate`` (by
default 1/100 of the config's own peak, so that SGD and AdamW recipes each get theirs), cosine to 0, without
weight decay.
"""

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging

from repvgg_jax import checkpoints, cli, equivalence, export, input_pipeline, quantization, run_layout, steps, training

FLAGS = flags.FLAGS


def _jax_accuracy(apply_fn, variables, source, config, batch: int) -> float:
  """Top-1 eval accuracy of ``apply_fn(variables, images, train=False)``, through the training loop's evaluation."""
  p_eval = jax.pmap(functools.partial(steps.eval_step, apply_fn), axis_name=steps.AXIS)
  return training.evaluate(p_eval, steps.replicate(variables), input_pipeline.eval_batches(source, config,
                                                                                             batch))["accuracy"]


def _onnx_accuracy(session, source, config, batch: int) -> float:
  correct = count = 0.0
  for b in input_pipeline.eval_batches(source, config, batch):
    logits = session.run(["logits"], {"images": np.asarray(b["image"], np.float32).transpose(0, 3, 1, 2)})[0]
    mask = np.asarray(b["mask"]) > 0
    correct += float((logits.argmax(-1) == b["label"])[mask].sum())
    count += float(mask.sum())
  return correct / count


QAT_FRACTION_OF_PEAK = 0.01


def fine_tune(qmodel, weight_bits: int, params, stats, source, config, batch: int) -> tuple[dict, dict]:
  """QAT for ``--qat_epochs`` through ``steps.train_step``; returns (params, quant_stats). A non-finite loss or
  update is a UserError (PTQ's results stand; nothing is written)."""
  steps_per_epoch = source.num_examples(config.train_split) // batch
  num_steps = int(FLAGS.qat_epochs * steps_per_epoch)
  peak = FLAGS.qat_learning_rate
  if peak is None:  # Fine-tuning's usual fraction of the run's own peak, for whichever optimizer it used.
    peak = QAT_FRACTION_OF_PEAK * config.learning_rate * batch / 256
  schedule = optax.cosine_decay_schedule(peak, max(num_steps, 1))
  optimizer = steps.create_optimizer(config, schedule, optax.constant_schedule(0.0))
  state = steps.replicate(quantization.qat_state(qmodel, params, stats, optimizer, weight_bits))
  p_step = jax.pmap(functools.partial(steps.train_step, learning_rate=schedule, num_classes=source.num_classes,
                                      label_smoothing=config.label_smoothing), axis_name=steps.AXIS,
                    donate_argnums=(0,))
  pending, start = [], time.time()
  batches = training.train_batches(source, config, batch, 0, num_steps, steps_per_epoch)
  for step, sharded in enumerate(steps.prefetch_to_device(batches), start=1):
    state, metrics = p_step(state, sharded)
    pending.append(metrics)
    if step % config.log_every_steps == 0 or step == num_steps:
      history = steps.unreplicate(pending)
      bad = steps.first_non_finite(history)
      if bad is not None:
        raise cli.UserError(f"QAT diverged: the loss or the weights are not finite at step "
                            f"{step - len(pending) + 1 + bad}; try a lower --qat_learning_rate (PTQ's results "
                            "stand; nothing written).")
      logging.info("QAT step %d/%d: loss %.4f, %.1f steps/s", step, num_steps, history[-1]["loss"],
                   step / (time.time() - start))
      pending = []
  state = steps.unreplicate(state)
  return state.params, state.batch_stats


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config, workdir = FLAGS.config, FLAGS.workdir
  if FLAGS.weight_bits not in (4, 8) or FLAGS.qat_epochs < 0 or FLAGS.calibration_batches < 1:
    raise app.UsageError("--weight_bits must be 8 or 4, --qat_epochs >= 0 and --calibration_batches >= 1.")
  deploy_dir = run_layout.path(workdir, run_layout.DEPLOY)
  if not os.path.isdir(deploy_dir):
    raise cli.UserError(f"{deploy_dir} does not exist: quantize a finished run (train.py writes it), or save "
                        "converted deploy params there (python -m repvgg_jax.convert ... --out=<workdir>).")
  source = input_pipeline.get_source(config.dataset, config.data_dir, (config.train_split, config.eval_split))
  deploy = training.model_from_config(config, source.num_classes, deploy=True, half_precision=False)
  params = jax.tree.map(jnp.asarray, checkpoints.load_tree(deploy_dir))
  try:
    export.check_deploy_params(deploy, params)
  except ValueError as e:
    raise cli.UserError(f"{deploy_dir} holds no deploy params of the config's model: {e}") from e
  devices = jax.local_device_count()
  batch = max(min(config.batch_size, 256) // devices, 1) * devices
  qmodel = quantization.fake_quantized(deploy)
  bits = quantization.INT8_WEIGHT_BITS if FLAGS.weight_bits == 8 else FLAGS.weight_bits  # The grid's bits.
  quantized_apply = quantization.fake_quantized_apply(qmodel, bits)

  metrics = {"weight_bits": FLAGS.weight_bits, "weight_grid_bits": bits, "act_bits": 8}
  metrics["float32"] = _jax_accuracy(deploy.apply, {"params": params}, source, config, batch)
  logging.info("float32 deploy model: eval accuracy %.4f", metrics["float32"])
  train = input_pipeline.train_dataset(source, config, batch, seed=config.seed).as_numpy_iterator()
  stats = quantization.calibrate(qmodel, params, (next(train)["image"] for _ in range(FLAGS.calibration_batches)), bits)
  metrics["ptq"] = _jax_accuracy(quantized_apply, {"params": params, "batch_stats": stats}, source, config, batch)
  logging.info("PTQ (W%dA8, %d calibration batches of %d training images): eval accuracy %.4f", FLAGS.weight_bits,
               FLAGS.calibration_batches, batch, metrics["ptq"])
  metrics["kernel_sqnr_db"] = {k: {"per_tensor": t, "per_channel": c}
                               for k, (t, c) in quantization.kernel_sqnr(params).items()}
  metrics["kernel_absmax"] = quantization.kernel_absmax(params)
  held_out = next(input_pipeline.eval_batches(source, config, batch))["image"]
  metrics["activation_sqnr_db"] = quantization.activation_sqnr(deploy, params, stats, held_out)
  if FLAGS.qat_epochs > 0:
    params, stats = fine_tune(qmodel, bits, params, stats, source, config, batch)
    metrics["qat"] = _jax_accuracy(quantized_apply, {"params": params, "batch_stats": stats}, source, config, batch)
    metrics["qat_epochs"] = FLAGS.qat_epochs
    logging.info("QAT (%s epochs): eval accuracy %.4f", FLAGS.qat_epochs, metrics["qat"])
  if FLAGS.weight_bits == 8:
    proto = export.to_onnx(deploy, jax.device_get(params), int8=quantization.int8_layers(params, stats))
    try:
      metrics["onnx_vs_jax"] = quantization.check_int8_onnx(proto, qmodel, params, stats, held_out)
    except equivalence.EquivalenceError as e:
      raise cli.UserError(f"deploy_int8.onnx not written: {e}") from e
    path = run_layout.path(workdir, run_layout.DEPLOY_INT8_ONNX)
    export.save_onnx(proto, path, source.classes)
    metrics["onnx_int8"] = _onnx_accuracy(export.onnx_session(path), source, config, batch)
    logging.info("Wrote %s: onnxruntime INT8 eval accuracy %.4f; vs JAX %s", path, metrics["onnx_int8"],
                 metrics["onnx_vs_jax"])
  path = run_layout.path(workdir, run_layout.INT8_METRICS if FLAGS.weight_bits == 8 else run_layout.W4A8_METRICS)
  quantization.write_metrics(path, metrics)
  logging.info("Wrote %s", path)


def _define_flags():
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "The run's training configuration file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "The run's workdir (holds deploy/); int8 outputs are written there.")
  flags.DEFINE_float("qat_epochs", 0, "Quantization-aware fine-tuning epochs; 0 = post-training quantization only.")
  flags.DEFINE_float("qat_learning_rate", None, "Peak learning rate of the fine-tuning (cosine to 0); default "
                     f"{QAT_FRACTION_OF_PEAK} of the config's peak (learning_rate x batch / 256).")
  flags.DEFINE_integer("calibration_batches", 8, "Training batches for the static activation scales.")
  flags.DEFINE_integer("weight_bits", 8, "Weight bits, 8 (the INT8 graph: int8 weights on a 7-bit grid) or 4 "
                       "(JAX-only, no ONNX); activations: 8.")
  flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
