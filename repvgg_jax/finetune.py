"""Starting a run from pretrained weights (``config.init_from``) and freezing parts of it (``config.freeze``).

Parameter paths are the leaves' names joined by "/" without the collection, e.g. ``stage1_0/rbr_dense/bn/scale``
or ``linear/kernel``; a BatchNorm's statistics (``.../bn/mean``) share their layer's path. ``init_exclude`` and
``freeze`` are regular expressions searched in them (big_vision's ``dont_load`` patterns).

Frozen layers are frozen whole: no gradient step, weight decay or momentum on their parameters, and a frozen
BatchNorm (both its scale and bias frozen) normalizes with its pretrained running statistics in training too,
leaving them as they were (detectron2's FrozenBatchNorm). So a frozen part computes in training exactly what it
computes at evaluation and in the fused deploy form, the head of a linear probe learns on the features it will
be evaluated on, and a frozen block fuses to the pretrained block's kernel. (Normalizing frozen layers by batch
statistics, as PyTorch does with ``requires_grad=False`` alone, would train the head on features that
evaluation never produces, or keep changing the "frozen" layers through their statistics.)
"""

import re
from typing import Iterable, Sequence

import flax.linen as nn
import jax
import numpy as np
import optax
from absl import logging

from repvgg_jax import cli, families, weights
from repvgg_jax.models import given_overrides

FROZEN, TRAINED = "frozen", "trained"


def path_name(path) -> str:
  """A tree_util key path -> "stage1_0/rbr_dense/conv/kernel"."""
  return jax.tree_util.keystr(path, simple=True, separator="/")


def named_leaves(tree) -> dict:
  """{path name: leaf} of a tree, in its leaves' order."""
  return {path_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def leaf_names(tree) -> list[str]:
  return list(named_leaves(tree))


def compile_patterns(setting: str, patterns: Iterable[str]) -> list[re.Pattern]:
  """``patterns`` as regular expressions; one that does not compile raises UserError naming ``setting``."""
  compiled = []
  for pattern in patterns:
    try:
      compiled.append(re.compile(pattern))
    except (re.error, TypeError) as e:
      raise cli.UserError(f"{setting}: {pattern!r} is not a regular expression ({e}).") from e
  return compiled


def matching(setting: str, patterns: Sequence[str], names: Sequence[str]) -> set[str]:
  """The names any pattern finds (``re.search``). A pattern that finds none is a typo: UserError listing
  a few of the names there are."""
  found = set()
  for pattern in compile_patterns(setting, patterns):
    hits = {name for name in names if pattern.search(name)}
    if not hits:
      raise cli.UserError(f"{setting}: {pattern.pattern!r} matches no parameter path; paths look like "
                          f"{', '.join(names[:2])}, ..., {names[-1]}.")
    found |= hits
  return found


# --------------------------------------------------------------------------- init_from.

def read_pretrained(config) -> dict:
  """``config.init_from``'s training-time variables {'params', 'batch_stats'} of ``config.model`` (with its
  overrides), from a .pth / .safetensors file, an orbax tree or a run's workdir."""
  variables = weights.load_any(config.model, config.init_from, "init_from",
                               **given_overrides(config.model_overrides.to_dict()))
  if "batch_stats" not in variables:
    raise cli.UserError(f"init_from={config.init_from} holds the deploy (fused) form, which has no branches left "
                        "to train; give the training-time weights (convert --out writes them to <out>/train).")
  return variables


def merge(initial: dict, loaded: dict, exclude: Sequence[str] = ()) -> tuple[dict, list[str]]:
  """``initial`` variables with every leaf replaced by ``loaded``'s, except those re-initialized: the leaves of
  ``exclude``'s paths, and the classifiers when the class counts differ (the leaves whose shapes differ from the
  file's only in the last axis, by the two class counts). Returns (variables, the re-initialized names). Any
  other difference (a missing, extra or reshaped leaf) raises UserError: these are weights of another model.
  ``initial`` may be abstract (``jax.eval_shape``): the check then runs before anything is compiled."""
  classes = {families.num_classes(loaded["params"]), families.num_classes(initial["params"])}
  flat_initial, flat_loaded = ({(c, name): leaf for c in tree for name, leaf in named_leaves(tree[c]).items()}
                               for tree in (initial, loaded))
  problems = [f"missing {c}/{n}" for c, n in sorted(set(flat_initial) - set(flat_loaded))]
  problems += [f"unexpected {c}/{n}" for c, n in sorted(set(flat_loaded) - set(flat_initial))]
  head = set()
  for key in sorted(set(flat_initial) & set(flat_loaded)):
    mine, theirs = tuple(flat_initial[key].shape), tuple(flat_loaded[key].shape)
    if mine == theirs:
      continue
    if mine[:-1] == theirs[:-1] and {mine[-1], theirs[-1]} == classes and len(classes) == 2:
      head.add(key[1])
    else:
      problems.append(f"{key[0]}/{key[1]} has shape {theirs} there, {mine} here")
  if problems:
    raise cli.UserError("the weights are not this model's: " + "; ".join(problems[:5])
                        + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "") + ".")
  excluded = matching("init_exclude", exclude, sorted({name for _, name in flat_initial})) if exclude else set()
  fresh = head | excluded

  def pick(collection):
    def leaf(path, mine):
      name = path_name(path)
      return mine if name in fresh else np.asarray(flat_loaded[(collection, name)]).astype(mine.dtype)
    return jax.tree_util.tree_map_with_path(leaf, initial[collection])

  return {c: pick(c) for c in initial}, sorted(fresh)


def initialize_from(config, initial: dict, pretrained: dict) -> dict:
  """``initial`` (a fresh run's variables) with ``pretrained`` (``read_pretrained``) merged in; logs one line."""
  variables, fresh = merge(initial, pretrained, config.init_exclude)
  names = [name for collection in initial.values() for name in leaf_names(collection)]
  shown = ", ".join(fresh[:8]) + (f" and {len(fresh) - 8} more" if len(fresh) > 8 else "")
  logging.info("Initialized from %s: %d of %d leaves loaded; re-initialized: %s.", config.init_from,
               sum(name not in fresh for name in names), len(names), shown or "none")
  return variables


# --------------------------------------------------------------------------- freeze.

def frozen_names(patterns: Sequence[str], params) -> set[str]:
  """The parameter paths ``config.freeze`` freezes; freezing all of them leaves nothing to train: UserError."""
  names = leaf_names(params)
  frozen = matching("freeze", patterns, names) if patterns else set()
  if frozen and len(frozen) == len(names):
    raise cli.UserError(f"freeze={list(patterns)} matches every parameter; nothing would train.")
  return frozen


def freeze(optimizer: optax.GradientTransformation, patterns: Sequence[str]) -> optax.GradientTransformation:
  """``optimizer`` on the parameters ``patterns`` leave; the frozen ones get no update, and no optimizer state."""
  if not patterns:
    return optimizer

  def labels(params):
    frozen = frozen_names(patterns, params)
    return jax.tree_util.tree_map_with_path(lambda p, _: FROZEN if path_name(p) in frozen else TRAINED, params)

  return optax.multi_transform({TRAINED: optimizer, FROZEN: optax.set_to_zero()}, labels)


def frozen_batch_norm(patterns: Sequence[str]):
  """A flax method interceptor: every BatchNorm whose scale and bias are both frozen runs on its running
  statistics (and leaves them unchanged), in training as in evaluation."""
  compiled = compile_patterns("freeze", patterns)

  def frozen(name):
    return any(p.search(name) for p in compiled)

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if (isinstance(module, nn.BatchNorm) and context.method_name == "__call__"
        and all(frozen("/".join(module.path + (leaf,))) for leaf in ("scale", "bias"))):
      kwargs = {**kwargs, "use_running_average": True}
    return next_fun(*args, **kwargs)

  return interceptor
