"""One run per workdir: ``<workdir>/.lock``, held with ``flock`` for the whole run.

A ``flock`` belongs to the open file and ends with the process that holds it, so a run killed with -9 leaves
the file but no lock, and its restart is not blocked. On NFSv4 the server frees a lost host's locks when its
lease expires (about 90 s). A filesystem without ``flock`` gets a warning and no lock. In a multi-host run
process 0 takes the lock for all processes and tells them whether it got it.
"""

import contextlib
import errno
import fcntl
import json
import os
import socket
import time

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from repvgg_jax import run_layout
from repvgg_jax.checkpoints import CheckpointError



class WorkdirInUse(CheckpointError):
  """Another live run holds the workdir."""


def _holder(fd: int) -> str:
  """Who wrote the lock file: 'pid P on host H since T', or what could be read of it."""
  os.lseek(fd, 0, os.SEEK_SET)
  text = os.read(fd, 4096).decode(errors="replace")
  try:
    info = json.loads(text)
    return f"pid {info['pid']} on host {info['host']} since {info['since']}"
  except (ValueError, KeyError, TypeError):
    return "a process that left no record"


def _acquire(workdir: str) -> int | None:
  """The locked file's descriptor; None where the filesystem has no locks. Raises WorkdirInUse."""
  path = run_layout.path(workdir, run_layout.LOCK)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = _holder(fd)
    os.close(fd)
    raise WorkdirInUse(f"{workdir} is in use by another run ({holder}); wait for it to end, stop it, or use "
                       "another --workdir.") from None
  except OSError as e:
    os.close(fd)
    if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
      raise
    logging.warning("The filesystem of %s has no file locks (%s): nothing stops a second run on this workdir.",
                    workdir, e.strerror)
    return None
  record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
  os.ftruncate(fd, 0)
  os.pwrite(fd, json.dumps(record).encode(), 0)
  return fd


@contextlib.contextmanager
def hold(workdir: str):
  """Holds ``workdir``'s lock for the with-block; every process raises WorkdirInUse if a live run holds it."""
  fd, refusal = None, None
  if jax.process_index() == 0:
    try:
      fd = _acquire(workdir)
    except WorkdirInUse as e:
      refusal = e
  if jax.process_count() > 1 and multihost_utils.broadcast_one_to_all(np.int32(refusal is not None)):
    refusal = refusal or WorkdirInUse(f"{workdir} is in use by another run (process 0 found its lock held).")
  if refusal is not None:
    raise refusal
  try:
    yield
  finally:
    if fd is not None:
      os.close(fd)
