"""How every command-line entry point answers a user's mistake: one line ``error: ...`` on stderr, exit status 1.

A mistake is a bad flag or config override, a file that is not what the command needs, a workdir in use or
full, a check the user's weights fail: the exceptions in ``user_errors()``. Anything else is a bug in this
project and keeps its traceback.
"""

import sys
from typing import Callable

from absl import app, flags

from repvgg_jax import errors
from repvgg_jax.errors import UserError  # pylint: disable=unused-import  # cli.UserError, as its raisers name it.


def user_errors() -> tuple[type[BaseException], ...]:
  """The exceptions an entry point reports as one line."""
  return (UserError, app.UsageError, errors.ConfigError, errors.CheckpointError, errors.DatasetError,
          errors.EquivalenceError, FloatingPointError)


def one_line(error: BaseException) -> str:
  """``error``'s message on one line, unwrapping the KeyError inside ml_collections' AttributeError."""
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]
  message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
  return " ".join(str(message).split()) or type(error).__name__


def fail(message: str) -> None:
  """Exits with status 1 after printing ``error: message`` on stderr."""
  sys.exit(f"error: {message}")


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with a bad flag or ``--config.<field>`` override reported in one line."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:  # ml_collections' answer to an override of a field the config lacks.
    fail(f"a --config.<field> override names no field of the config: {one_line(e)}")
  except Exception as e:  # pylint: disable=broad-except  # Everything raised while parsing is about the flags.
    fail(f"{one_line(e)} (in the command line's flags; --helpfull lists them)")


def run(main: Callable[[list[str]], None]) -> None:
  """``absl.app.run(main)``, with the exceptions in ``user_errors()`` printed as one ``error:`` line."""

  def guarded(argv):
    try:
      main(argv)
    except user_errors() as e:
      fail(one_line(e))

  app.run(guarded, flags_parser=_parse_flags)
