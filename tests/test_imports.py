"""Imports run one way, from the CLIs down to the backbones: the package's import graph, read from
its own source with `ast` (module-level and function-level imports alike), has no circle, not even
with each subpackage taken as one, and the lower layers import nothing above them. Nothing is imported, so this takes a fraction of a second."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent / "bridgejax"


def _modules() -> dict[str, pathlib.Path]:
  """Dotted module name -> file, for every .py file of the package (a package is its __init__)."""
  out = {}
  for path in ROOT.rglob("*.py"):
    parts = ("bridgejax",) + path.relative_to(ROOT).with_suffix("").parts
    out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return out


def _imported(name: str, path: pathlib.Path, modules) -> set[str]:
  """The package's modules that `name` (at `path`) imports anywhere in its source: `from a import b`
  names the module a.b when there is one, else a (b is a name in it)."""
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  wanted = []
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      wanted += [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative: from . import x, from ..a import b
        parts = package.split(".")
        base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
      wanted += [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
  out = set()
  for target in wanted:
    while target and target not in modules:  # import a.b.name -> the module a.b
      target = target.rpartition(".")[0]
    if target and target != name:
      out.add(target)
  return out


def _graph() -> dict[str, set[str]]:
  modules = _modules()
  return {name: _imported(name, path, modules) for name, path in modules.items()}


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components of more than one module (Tarjan), each as a sorted list."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def _under(name: str, package: str) -> bool:
  return name == package or name.startswith(package + ".")


def test_the_import_graph_has_no_circle():
  graph = _graph()
  assert len(graph) > 50 and "bridgejax.train.loop" in graph  # the walk found the package
  circles = _circles(graph)
  ties = [[f"{a} -> {b}" for a in c for b in sorted(graph[a]) if b in c] for c in circles]
  assert not circles, f"import circles: {ties}"


def test_lower_layers_import_nothing_above_them():
  graph = _graph()
  wrong = []
  for name, targets in graph.items():
    if _under(name, "bridgejax.models"):  # the frozen backbones stand alone
      wrong += [(name, t) for t in targets if not _under(t, "bridgejax.models")]
    # the shared decoder sits below every LLM family (gemma, llama, gptneo), the shared ViT below clip and siglip
    if name in ("bridgejax.models.decoder", "bridgejax.models.vit"):
      wrong += [(name, t) for t in targets if t not in ("bridgejax.models.activations", "bridgejax.models.precision")]
    if _under(name, "bridgejax.train"):  # validation comes in as a callback
      wrong += [(name, t) for t in targets if any(_under(t, p) for p in ("bridgejax.evaluation", "bridgejax.main",
                                                                         "bridgejax.inference", "bridgejax.toy"))]
    # the toy world, the checks and the Setup build on the data library: its command lines
    # (bridgejax.prepare, bridgejax.features) stand above them, none of its own modules does
    if _under(name, "bridgejax.data"):
      wrong += [(name, t) for t in targets if any(_under(t, p) for p in (
          "bridgejax.toy", "bridgejax.checks", "bridgejax.experiment", "bridgejax.train", "bridgejax.evaluation",
          "bridgejax.prepare", "bridgejax.features"))]
  assert not wrong, f"imports against the layers: {wrong}"


def test_the_packages_import_one_way():
  """With each subpackage taken as one (bridgejax.data, bridgejax.toy, ...), there is still no circle: a
  module inside a package (a __main__.py, say) cannot reach up to what builds on that package."""
  graph = _graph()
  part = {name: ".".join(name.split(".")[:2]) for name in graph}
  parts = {p: set() for p in part.values()}
  ties = {}
  for name, targets in graph.items():
    for t in targets:
      if part[t] != part[name]:
        parts[part[name]].add(part[t])
        ties.setdefault((part[name], part[t]), []).append(f"{name} -> {t}")
  circles = _circles(parts)
  found = [ties[a, b] for c in circles for a in c for b in sorted(parts[a]) if b in c]
  assert not circles, f"packages that import each other: {circles}: {found}"
