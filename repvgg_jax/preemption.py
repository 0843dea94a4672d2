"""Stop requests for the training loop: SIGTERM (preemptible TPU VMs and spot GPUs send it shortly before they
go) and SIGINT (Ctrl-C). The loop asks ``should_stop(step)`` after every step and, when it answers True,
saves a checkpoint at that step and exits; the same command then resumes there.

One process: a signal handler sets a flag, the step in flight finishes. Several processes (jax.distributed):
every process must save at the same step, so the decision is JAX's preemption sync point, which the
coordination service reaches on all processes at one agreed step after any of them got SIGTERM; SIGINT
(which a cluster does not send to every process) is left to its default there. A second SIGINT in one process
interrupts at once, as Ctrl-C users expect.
"""

import signal
from typing import Optional

import jax
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
  """Training stopped on request after saving a checkpoint at ``step`` (in ``path``); rerun to resume."""

  def __init__(self, step: int, path: str, exit_status: int):
    super().__init__(f"Preempted at step {step}; checkpoint saved to {path}")
    self.step, self.path, self.exit_status = step, path, exit_status


class StopRequests:
  """A context manager that turns SIGTERM/SIGINT into ``should_stop(step) == True`` at the next step."""

  def __init__(self):
    self.signum: Optional[int] = None
    self._previous = {}
    self._multiprocess = jax.process_count() > 1

  def __enter__(self) -> "StopRequests":
    if not self._multiprocess:
      for signum in SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc_info) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}

  def _handle(self, signum, frame) -> None:
    if self.signum == signal.SIGINT and signum == signal.SIGINT:
      signal.signal(signal.SIGINT, self._previous.get(signal.SIGINT, signal.default_int_handler))
      signal.default_int_handler(signum, frame)
    self.signum = signum

  def should_stop(self, step: int) -> bool:
    """True once a stop was requested: at once in one process, at the agreed step across processes."""
    if self._multiprocess:
      if multihost_utils.reached_preemption_sync_point(step):
        self.signum = signal.SIGTERM
        return True
      return False
    return self.signum is not None

  @property
  def exit_status(self) -> int:
    """The shell's status for death by this signal (143 for SIGTERM, 130 for SIGINT), so that schedulers
    see a preempted run as not finished."""
    return 128 + int(self.signum or signal.SIGTERM)
