"""Spec of the library's house: its import graph is a set of floors. No module imports, at the top or inside a
function, one that imports it back; the error types and the run directory's names sit at the bottom and import
nothing of the project; a function-level import is only ever of an optional package."""

import ast
import os

import pytest

LIBRARY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "repvgg_jax")
BOTTOM = ("errors", "run_layout")
# Imported inside functions, and why: the extras a user may not have installed (torch and timm: PyTorch weights
# and the bench's peers; onnx and onnxruntime: export and INT8; safetensors; matplotlib: the bench's plot), and
# what the GPU image lacks, so that the paths it runs stay importable there (tensorflow and tensorflow_datasets:
# the input pipeline and TensorBoard; ml_collections: the commands' config flags; qwix: INT8).
OPTIONAL = {"torch", "timm", "onnx", "onnxruntime", "safetensors", "matplotlib", "tensorflow", "tensorflow_datasets",
            "ml_collections", "qwix"}


def _imports() -> dict[str, list[tuple[str, bool]]]:
  """Per library module: (imported module's top-level name or 'repvgg_jax.<module>', inside a function)."""
  graph = {}
  for file in sorted(os.listdir(LIBRARY)):
    if not file.endswith(".py"):
      continue
    tree = ast.parse(open(os.path.join(LIBRARY, file)).read())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
      late = id(node) not in top
      if isinstance(node, ast.Import):
        found += [(alias.name if alias.name.startswith("repvgg_jax.") else alias.name.split(".")[0], late)
                  for alias in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module == "repvgg_jax":
        found += [(f"repvgg_jax.{alias.name}", late) for alias in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module.startswith("repvgg_jax."):
        found.append((".".join(node.module.split(".")[:2]), late))
      elif isinstance(node, ast.ImportFrom):
        found.append((node.module.split(".")[0], late))
    graph[file[:-3]] = found
  return graph


def _project_edges(graph) -> dict[str, set[str]]:
  modules = set(graph)
  return {m: {name.split(".")[1] for name, _ in found if name.startswith("repvgg_jax.")
              and name.split(".")[1] in modules and name.split(".")[1] != m}
          for m, found in graph.items() if m != "__init__"}


def _cycle(edges) -> list[str]:
  """One import cycle of ``edges`` as a path (first module repeated at the end), or [] if there is none."""
  state = {}

  def visit(module, path):
    state[module] = "open"
    for dep in sorted(edges.get(module, ())):
      if state.get(dep) == "open":
        return path[path.index(dep):] + [dep]
      if dep not in state and (found := visit(dep, path + [dep])):
        return found
    state[module] = "done"
    return []

  for module in sorted(edges):
    if module not in state and (found := visit(module, [module])):
      return found
  return []


def test_the_import_graph_has_no_cycle_late_imports_included():
  assert _cycle(_project_edges(_imports())) == []


def test_a_cycle_is_found_where_there_is_one():  # The check above, shown to catch one.
  edges = _project_edges(_imports())
  edges["reparam"] = edges["reparam"] | {"families"}
  assert _cycle(edges)[0] == _cycle(edges)[-1]


@pytest.mark.parametrize("module", BOTTOM)
def test_the_bottom_floor_imports_nothing_of_the_project(module):
  assert not [name for name, _ in _imports()[module] if name.startswith("repvgg_jax")]


def test_the_registry_sits_above_the_machinery_it_dispatches_to():
  edges = _project_edges(_imports())
  for machinery in ("reparam", "torch_weights", "plan", "models"):
    assert "families" not in edges[machinery], machinery


def test_function_level_imports_are_only_of_optional_packages():
  late = {(module, name) for module, found in _imports().items() for name, inside in found if inside}
  assert {(module, name) for module, name in late if name not in OPTIONAL} == set()
