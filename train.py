"""Trains RepVGG: python train.py --config=configs/a0.py --workdir=runs/a0 [--config.field=value ...]"""

import sys

from absl import app, flags
from ml_collections import config_flags

from configs import default
from repvgg_jax import cli, preemption, training

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the deploy model.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    training.train_and_evaluate(FLAGS.config, FLAGS.workdir, known_fields=default.get_config().keys())
  except preemption.Preempted as e:  # Logged where it happened; the status tells a scheduler it did not finish.
    sys.exit(e.exit_status)


if __name__ == "__main__":
  cli.run(main)
