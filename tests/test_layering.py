"""The house is one-way: read from the source with `ast`, the imports of `qgnn_jax/` and
`experiments/` form no circle and never run up the floors of `LAYERS`; the library never
imports `experiments/` (issue 25).

Every import counts, those inside functions too. `from qgnn_jax import x` is an arrow to the
module `qgnn_jax.x` when there is one, else to the package; an arrow to a package is an
arrow to its `__init__.py` (which hands its modules' names on, so it is drawn to them).
"""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("qgnn_jax", "experiments", "tools")

# The floors, from the ground up: a module may import modules of its own floor or below,
# never above. A name stands for the module and everything under it (a package).
LAYERS = (
    # the ground: arrays, files and processes; no model
    ("qgnn_jax.compile_cache", "qgnn_jax.distributed", "qgnn_jax.workdir_lock",
     "qgnn_jax.results", "qgnn_jax.run_log", "qgnn_jax.checkpoint", "qgnn_jax.conv",
     "qgnn_jax.graph", "qgnn_jax.data", "qgnn_jax.quant", "qgnn_jax.distill",
     "qgnn_jax.official_files"),
    ("qgnn_jax.method",),                       # a run's method string, parsed
    ("qgnn_jax.models",),                       # the ViGs
    ("qgnn_jax.official",),                     # official weights -> our variables
    ("qgnn_jax.qat",),                          # quantization as a model transform
    ("qgnn_jax.train",),                        # the train step: state, loss, pmap
    ("qgnn_jax.run_config",),                   # a run's fields: defaults, checks, the method
    ("qgnn_jax.integer_inference",),            # an export's sites run on integer codes
    ("qgnn_jax.export",),                       # the export file: payload, bytes, load
    ("qgnn_jax.recipe",),                       # config -> model, rules, loss, optimiser
    ("qgnn_jax.ptq_run",),                      # post-training quantization of a run
    ("qgnn_jax.experiment",),                   # one run: setup, restore, loop, finish
    ("qgnn_jax.workdir",),                      # a run's workdir: evaluate, export, convert
    ("qgnn_jax",),                              # the package's face
    ("experiments", "tools"),                   # the scripts
)


# Arrows known to run up, each with why it is still there. Listed, not hidden: the tests below
# fail when one is gone (take it off the list) and when any other appears.
PENDING = set()


def _modules():
  """{dotted module name: path} of every .py file under PACKAGES."""
  out = {}
  for pkg in PACKAGES:
    for folder, _, files in os.walk(os.path.join(ROOT, pkg)):
      for name in files:
        if name.endswith(".py"):
          path = os.path.join(folder, name)
          parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
          if parts[-1] == "__init__":
            parts = parts[:-1]
          out[".".join(parts)] = path
  return out


def _resolve(name, modules):
  """The longest prefix of `name` that is a module of ours (None for third-party ones)."""
  parts = name.split(".")
  for n in range(len(parts), 0, -1):
    if ".".join(parts[:n]) in modules:
      return ".".join(parts[:n])
  return None


def import_graph():
  """{module: {module it imports}} over our modules, imports inside functions included."""
  modules = _modules()
  graph = {m: set() for m in modules}
  for mod, path in modules.items():
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read(), path)
    package = mod if path.endswith("__init__.py") else mod.rpartition(".")[0]
    for node in ast.walk(tree):
      targets = []
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          up = package.split(".")[:len(package.split(".")) - node.level + 1]
          base = ".".join(up + ([base] if base else []))
        targets = [f"{base}.{a.name}" for a in node.names] + [base]
      found = {_resolve(t, modules) for t in targets}
      if isinstance(node, ast.ImportFrom):
        # `from pkg import name`: the submodule when `name` is one, else the package.
        subs = {_resolve(f"{base}.{a.name}", modules) for a in node.names}
        found = {s for s in subs if s and s != _resolve(base, modules)} or found
      graph[mod] |= {m for m in found if m and m != mod}
  return graph


def floor_of(module):
  """The index in LAYERS of the longest name that holds `module`."""
  best, floor = -1, None
  for i, names in enumerate(LAYERS):
    for n in names:
      if (module == n or module.startswith(n + ".")) and len(n) > best:
        best, floor = len(n), i
  return floor


def circles(graph, pending=frozenset()):
  """The strongly connected components of more than one module (Tarjan), the `pending`
  arrows left out."""
  graph = {a: {b for b in targets if (a, b) not in pending} for a, targets in graph.items()}
  index, low, stack, on, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def upward_arrows(graph):
  """(importer, imported) pairs whose target stands on a higher floor than the importer
  (a package's own modules excepted: a package's face may hand on any of them)."""
  out = []
  for a, targets in graph.items():
    for b in targets:
      if a.startswith(b + ".") or b.startswith(a + "."):
        continue
      if floor_of(b) > floor_of(a):
        out.append((a, b))
  return sorted(out)


@pytest.fixture(scope="module")
def graph():
  return import_graph()


def test_every_module_has_a_floor(graph):
  assert [m for m in graph if floor_of(m) is None] == []


def test_no_circle(graph):
  assert circles(graph, PENDING) == []


def test_no_import_runs_up_the_floors(graph):
  assert upward_arrows(graph) == sorted(PENDING)


def test_the_library_never_imports_the_scripts(graph):
  assert [(a, b) for a, targets in graph.items() for b in targets
          if a.startswith("qgnn_jax") and not b.startswith("qgnn_jax")] == []


def test_the_graph_sees_imports_inside_functions(graph):
  # qgnn_jax/run_config.py imports the registries inside its checks only.
  assert "qgnn_jax.data" in graph["qgnn_jax.run_config"]
