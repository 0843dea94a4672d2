"""orbax-checkpoint wiring: ``<workdir>/checkpoints/<step>`` keeps the latest and the best by eval accuracy.

Each checkpoint holds the training state and a small JSON record of what model it belongs to, so a workdir
of another variant is refused before anything is compiled.
"""

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

STATE, META = "state", "meta"


def checkpoint_manager(workdir: str) -> ocp.CheckpointManager:
  """Synchronous saves (a kill -9 can only lose the write in progress; orbax renames a finished step into place)."""
  keep = checkpoint_managers.AnyPreservationPolicy([
      checkpoint_managers.LatestN(n=1),
      checkpoint_managers.BestN(get_metric_fn=lambda m: m["accuracy"], n=1, keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(preservation_policy=keep, enable_async_checkpointing=False, create=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"), options=options,
                               item_names=(STATE, META))


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict, accuracy: Optional[float]) -> None:
  """Saves host-local ``state`` (one replica) at ``step``; ``accuracy`` ranks it for the keep-best policy."""
  manager.save(step, args=ocp.args.Composite(**{STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(meta)}),
               metrics=None if accuracy is None else {"accuracy": float(accuracy)}, force=True)
  manager.wait_until_finished()


def restore_meta(manager: ocp.CheckpointManager) -> Optional[tuple[int, dict]]:
  """(latest step, its meta record), or None for a fresh workdir."""
  step = manager.latest_step()
  if step is None:
    return None
  restored = manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))
  return step, dict(restored[META])


def restore_state(manager: ocp.CheckpointManager, step: int, target: Any) -> Any:
  """The state saved at ``step``, restored into the structure, shapes and dtypes of ``target``."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  return manager.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract)}))[STATE]


def save_tree(path: str, tree: Any) -> None:
  """Saves a tree of arrays (e.g. the deploy params) as its own orbax checkpoint at ``path``."""
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.abspath(path), tree, force=True)


def load_tree(path: str) -> Any:
  """Loads a tree saved by ``save_tree``."""
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(os.path.abspath(path))
