"""orbax-checkpoint wiring: ``<workdir>/checkpoints/<step>`` keeps the newest ``keep`` and the best by eval
accuracy; a damaged checkpoint is set aside and the run resumes from the newest intact one.

Each checkpoint holds the training state and a small JSON record of what model it belongs to, so a workdir
of another variant is refused before its state is read.
"""

import contextlib
import errno
import glob
import os
import shutil
import tempfile
from typing import Any, Callable, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers

from repvgg_jax import run_layout
from repvgg_jax.errors import CheckpointError

STATE, META = "state", "meta"
DAMAGED = "checkpoints_damaged"  # Beside ``checkpoints``: orbax must not see set-aside steps as its own.
FREE_SPACE_FACTOR = 2  # A save writes the new checkpoint before the policy deletes an old one.
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax writes <path><TMP_SUFFIX>... and renames it to <path> when whole.


def checkpoint_manager(workdir: str, keep: int = 2) -> ocp.CheckpointManager:
  """Synchronous saves (a kill -9 can only lose the write in progress; orbax renames a finished step into place)."""
  policy = checkpoint_managers.AnyPreservationPolicy([
      checkpoint_managers.LatestN(n=keep),
      checkpoint_managers.BestN(get_metric_fn=lambda m: m["accuracy"], n=1, keep_checkpoints_without_metrics=False),
  ])
  directory = os.path.join(os.path.abspath(workdir), run_layout.CHECKPOINTS)
  # The partial write of a save a kill -9 interrupted, removed here rather than by orbax's
  # cleanup_tmp_directories: that runs in a thread which close() does not wait for, and which fails the
  # interpreter's shutdown when a run stops on an error right after it started.
  _remove_partial_writes(os.path.join(directory, "*"))
  options = ocp.CheckpointManagerOptions(preservation_policy=policy, enable_async_checkpointing=False, create=True)
  return ocp.CheckpointManager(directory, options=options, item_names=(STATE, META))


def reader(workdir: str) -> ocp.CheckpointManager:
  """A manager that only reads another run's checkpoints: it creates, cleans and deletes nothing there. (orbax
  warns, three lines, that a read-only manager creates and saves nothing: that is the point, so not shown.)"""
  logger = logging.get_absl_logger()
  level = logger.level  # Restored as it was (NOTSET included), so that the run's own INFO lines still show.
  logger.setLevel("ERROR")
  try:
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), run_layout.CHECKPOINTS),
                                 options=ocp.CheckpointManagerOptions(read_only=True), item_names=(STATE, META))
  finally:
    logger.setLevel(level)


def tree_bytes(tree: Any) -> int:
  """Bytes of a tree of arrays or ShapeDtypeStructs."""
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def check_workdir(workdir: str, checkpoint_bytes: int) -> None:
  """Raises CheckpointError unless ``workdir`` is writable with room for FREE_SPACE_FACTOR checkpoints."""
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_test_"):
      pass
  except OSError as e:
    raise CheckpointError(f"cannot write to workdir {workdir}: {e.strerror or e}.") from e
  free = shutil.disk_usage(workdir).free
  needed = FREE_SPACE_FACTOR * checkpoint_bytes
  if free < needed:
    raise CheckpointError(f"{workdir} has {free / 2**20:.1f} MiB free but a checkpoint of this run takes "
                          f"{checkpoint_bytes / 2**20:.1f} MiB (and {needed / 2**20:.1f} MiB while one is "
                          "replaced); free some space or use another --workdir.")


def _remove_partial_writes(pattern: str) -> None:
  """Removes orbax's unfinished writes of the paths ``pattern`` (a glob) matches; process 0 only."""
  if jax.process_index() == 0:
    for partial in glob.glob(pattern + TMP_SUFFIX + "*"):
      shutil.rmtree(partial, ignore_errors=True)


def _disk_full(error: Optional[BaseException]) -> bool:
  """Whether ``error``, or an error it was raised from, says the disk or the quota is full."""
  while error is not None:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    error = error.__cause__ or error.__context__
  return False


@contextlib.contextmanager
def _disk_full_is_an_error(path: str):
  """A full disk while orbax writes ``path``: its partial write is removed and CheckpointError says so."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except  # Only a full disk is handled; the rest is re-raised.
    if not _disk_full(e):
      raise
    _remove_partial_writes(glob.escape(path))
    raise CheckpointError(f"the disk filled up while writing {path} ({os.strerror(errno.ENOSPC)}); the partial "
                          "write was removed and the checkpoints before it are intact. Free some space and run "
                          "the same command again: it resumes from the newest checkpoint.") from e


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict, accuracy: Optional[float]) -> None:
  """Saves host-local ``state`` (one replica) at ``step``; ``accuracy`` ranks it for the keep-best policy.
  A full disk raises CheckpointError, leaving no partial step behind."""
  with _disk_full_is_an_error(os.path.join(str(manager.directory), str(step))):
    manager.save(step, args=ocp.args.Composite(**{STATE: ocp.args.StandardSave(state),
                                                  META: ocp.args.JsonSave(meta)}),
                 metrics=None if accuracy is None else {"accuracy": float(accuracy)}, force=True)
    manager.wait_until_finished()


def _damaged_dir(manager: ocp.CheckpointManager) -> str:
  return os.path.join(os.path.dirname(str(manager.directory)), DAMAGED)


def _set_aside(manager: ocp.CheckpointManager, step: int, error: Exception) -> None:
  """Moves a damaged step out of the manager's directory, with one warning line saying where and why."""
  source = os.path.join(str(manager.directory), str(step))
  target = os.path.join(_damaged_dir(manager), str(step))
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.rmtree(target, ignore_errors=True)
    shutil.move(source, target)
  reason = " ".join(str(error).split())[:300]
  logging.warning("Checkpoint %s is damaged (%s: %s); moved to %s, trying an older one.", source,
                  type(error).__name__, reason, target)
  manager.reload()


def restore_newest_intact(manager: ocp.CheckpointManager, accept_meta: Callable[[int, dict], None],
                          make_target: Callable[[], Any]) -> Optional[tuple[int, Any]]:
  """(step, state) of the newest checkpoint that reads back whole, or None in a fresh workdir.

  ``accept_meta(step, meta)`` raises if the checkpoint belongs to another model (that is not damage);
  ``make_target()`` builds the state whose structure, shapes and dtypes the saved one must have. A
  checkpoint that fails to read is set aside (``_set_aside``). Raises CheckpointError if none is intact.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  target = None
  for step in steps:
    try:
      meta = dict(manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META])
    except Exception as e:  # pylint: disable=broad-except  # Any read failure of a file on disk is damage.
      _set_aside(manager, step, e)
      continue
    accept_meta(step, meta)
    target = make_target() if target is None else target
    try:
      state = restore_state(manager, step, target)
    except Exception as e:  # pylint: disable=broad-except
      _set_aside(manager, step, e)
      continue
    return step, state
  if steps:
    raise CheckpointError(f"none of the checkpoints in {manager.directory} (steps {steps}) could be read; they "
                          f"were moved to {_damaged_dir(manager)}. "
                          "Run again to start from scratch, or restore them from a backup.")
  return None


def restore_state(manager: ocp.CheckpointManager, step: int, target: Any) -> Any:
  """The state saved at ``step``, restored into the structure, shapes and dtypes of ``target``."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  return manager.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract)}))[STATE]


def save_tree(path: str, tree: Any) -> None:
  """Saves a tree of arrays (e.g. the deploy params) as its own orbax checkpoint at ``path``; a full disk raises
  CheckpointError, leaving no partial tree behind."""
  with _disk_full_is_an_error(os.path.abspath(path)), ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.abspath(path), tree, force=True)


def load_tree(path: str) -> Any:
  """Loads a tree saved by ``save_tree``."""
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(os.path.abspath(path))
