"""Evaluates weights without training: top-1 and top-5 on a config's eval split, in both forms.

  python -m repvgg_jax.evaluate --config=configs/a0.py --config.data_dir=<tfds data_dir> --weights=RepVGG-A0-train.pth

``--weights``: a .pth / .pt / .safetensors file (official, timm or apple naming), an orbax tree (convert --out's
``train/`` or ``deploy/``) or a run's workdir. Training-time weights are evaluated as they are and after
re-parameterization (checked against each other first); deploy weights as the plain model. The images go through
the config's eval preprocessing (for ImageNet: resize, centre crop 224 / 256, as the official test does), with
the eval batches of training (every image once).
"""

import functools

import jax
from absl import app, flags

from repvgg_jax import cli, families, input_pipeline, training, weights
from repvgg_jax.models import given_overrides
from repvgg_jax.steps import AXIS, eval_step, replicate


def evaluate_weights(config, path: str) -> dict:
  """{"train_form": metrics or None, "deploy": metrics, "max_relative_error": float or None}; metrics as
  ``training.evaluate`` gives them (accuracy, top5_accuracy, loss, count)."""
  training.validate_config(config)
  source = input_pipeline.get_source(config.dataset, config.data_dir, (config.train_split, config.eval_split))
  variables = weights.load_any(config.model, path, "--weights", **given_overrides(config.model_overrides.to_dict()))
  classes = families.num_classes(variables["params"])
  if classes != source.num_classes:
    raise cli.UserError(f"--weights={path} has {classes} classes, the {config.dataset} eval split "
                        f"{source.num_classes}.")
  batch = config.batch_size // jax.process_count()
  deploy_model = training.model_from_config(config, classes, deploy=True)
  results = {"train_form": None, "max_relative_error": None}
  if "batch_stats" in variables:
    train_model = training.model_from_config(config, classes)
    results["train_form"] = training.evaluate(
        jax.pmap(functools.partial(eval_step, train_model.apply), axis_name=AXIS), replicate(variables),
        input_pipeline.eval_batches(source, config, batch))
    deploy_params, results["max_relative_error"] = training.fuse_checked(
        config, classes, variables, next(input_pipeline.eval_batches(source, config, batch))["image"])
  else:
    deploy_params = variables["params"]
  results["deploy"] = training.evaluate(jax.pmap(functools.partial(eval_step, deploy_model.apply), axis_name=AXIS),
                                        replicate({"params": deploy_params}),
                                        input_pipeline.eval_batches(source, config, batch))
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  flags_ = flags.FLAGS
  results = evaluate_weights(flags_.config, flags_.weights)
  for form in ("train_form", "deploy"):
    if results[form] is not None:
      m = results[form]
      print(f"{form.replace('_', ' ')}: top-1 {m['accuracy']:.4f} top-5 {m['top5_accuracy']:.4f} loss "
            f"{m['loss']:.4f} ({m['count']:.0f} images)")
  if results["max_relative_error"] is not None:
    print(f"re-parameterized model vs training form: {results['max_relative_error']:.1e} of the largest logit")


def _define_flags():
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "The model and eval data, e.g. configs/a0.py.", lock_config=True)
  flags.DEFINE_string("weights", None, "A .pth / .safetensors file, an orbax tree, or a run's workdir.")
  flags.mark_flags_as_required(["config", "weights"])


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
