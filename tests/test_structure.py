"""The package's shape: no import cycles, no module reaching into another's private names, and
the layers' direction (families below generators, generators below the training pipeline)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "wdjax"


def module_name(path: Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
  return {module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def imports(tree: ast.Module, known: set[str]) -> list[tuple[str, list[str]]]:
  """(wdjax module, names taken from it) for every import anywhere in the module, function
  bodies included: an import inside a function is still a dependency."""
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out += [(a.name, []) for a in node.names if a.name.split(".")[0] == "wdjax"]
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "wdjax":
      for a in node.names:
        sub = f"{node.module}.{a.name}"
        out.append((sub, []) if sub in known else (node.module, [a.name]))
  return out


def graph() -> dict[str, set[str]]:
  trees = modules()
  known = set(trees)
  edges = {}
  for name, tree in trees.items():
    deps = set()
    for target, _ in imports(tree, known):
      while target not in known and "." in target:
        target = target.rpartition(".")[0]
      # a package's own modules importing the package's __init__ (for `register`) is how its
      # registry works, not a cycle through its contents
      if target != name and not name.startswith(target + "."):
        deps.add(target)
    edges[name] = deps
  return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str]:
  state, stack = {}, []

  def visit(n):
    state[n] = 1
    stack.append(n)
    for m in sorted(edges.get(n, ())):
      if state.get(m) == 1:
        return stack[stack.index(m):] + [m]
      if m not in state and (found := visit(m)):
        return found
    stack.pop()
    state[n] = 2
    return None

  for n in sorted(edges):
    if n not in state and (found := visit(n)):
      return found
  return []


def test_the_import_graph_has_no_cycle():
  edges = graph()
  assert len(edges) > 40 and sum(map(len, edges.values())) > 100  # the walk saw the package
  assert find_cycle(edges) == []


def test_the_cycle_finder_finds_one():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_no_module_imports_another_modules_private_names():
  trees = modules()
  known = set(trees)
  bad = []
  for name, tree in trees.items():
    aliases = {}
    for target, names in imports(tree, known):
      bad += [f"{name}: from {target} import {n}" for n in names if n.startswith("_")]
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("wdjax"):
        for a in node.names:
          if f"{node.module}.{a.name}" in known:
            aliases[a.asname or a.name] = f"{node.module}.{a.name}"
      elif isinstance(node, ast.Import):
        for a in node.names:
          if a.name.startswith("wdjax.") and a.asname:
            aliases[a.asname] = a.name
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
          and node.value.id in aliases and node.attr.startswith("_") and not node.attr.startswith("__")):
        bad.append(f"{name}: {aliases[node.value.id]}.{node.attr}")
  assert bad == []


def test_layers_point_one_way():
  """Models know nothing of generators, tasks or training; generators nothing of tasks or
  training; tasks nothing of the pipeline that runs them."""
  edges = graph()
  rules = {"wdjax.models": ("wdjax.generators", "wdjax.tasks", "wdjax.train"),
           "wdjax.generators": ("wdjax.tasks", "wdjax.train.run", "wdjax.train.phase"),
           "wdjax.tasks": ("wdjax.train.run", "wdjax.cli", "wdjax.validate")}
  bad = [f"{a} -> {b}" for a, deps in edges.items() for layer, banned in rules.items()
         if a.startswith(layer) for b in deps if b.startswith(banned)]
  assert bad == []
