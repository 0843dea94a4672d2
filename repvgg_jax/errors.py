"""Every error type a user of the commands and the library meets, at the bottom of the import graph.

Imports nothing of the project (nor TensorFlow), so that ``cli`` can name them all without loading the modules
that raise them: on an accelerator image without TensorFlow, a user's mistake is still one line.
"""


class UserError(Exception):
  """A command's input is wrong; the message says which file or flag and what to do."""


class ConfigError(ValueError):
  """A mistake in the configuration or the workdir, found before anything is compiled."""


class CheckpointError(RuntimeError):
  """A workdir that cannot hold checkpoints, or holds none that can be read."""


class DatasetError(Exception):
  """A dataset that is missing, not prepared or malformed; the message names the file and what to do."""


class EquivalenceError(AssertionError):
  """The deploy form does not compute the training form's function."""
