"""The import graph of loopjax, read from the source with `ast` (nothing is imported): every import,
at the top of a module or inside a function, runs from a layer to the same layer or one below;
no modules, and no top-level packages or modules of loopjax, import each other in a circle; and
loopjax modules import each other inside functions only where the importer says why."""

import ast
import os
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The layer of every top-level package or module of loopjax (its "unit"): an import may run to a
# unit of the same layer or a lower one only.
LAYERS = {
    "loopjax": 0,  # the package's own __init__.py
    "loopjax.model": 0, "loopjax.diffusion": 0, "loopjax.data": 0, "loopjax.parallel": 0,
    "loopjax.flops": 0, "loopjax.errors": 0, "loopjax.ema": 0,
    # Loop counts: the training distribution and the inference policies.
    "loopjax.loops": 0,
    # Local or gs:// paths for every file a run reads or writes.
    "loopjax.storage": 0,
    # What a folder is (run, export, corpus, study, eval output), before a command writes to it.
    "loopjax.folders": 0,
    # NumPy forward pass of an export; the Hugging Face templates, tokenizer files, model card.
    "loopjax.reference": 0, "loopjax.hf": 0,
    # Weights on disk: checkpoints (read and write), the export format (both ways), loading.
    "loopjax.io": 1,
    # The experiment file + overrides resolved into the run's config (imports no weights).
    "loopjax.config": 1,
    # The denoiser/sampler driver of sample, lm-eval, gen-PPL and tasks.
    "loopjax.train": 2, "loopjax.inference": 2,
    "loopjax.evaluate": 3,
    # The Python API (`loopjax.load`).
    "loopjax.api": 3,
    # Every argparse parser and the `loopjax` command.
    "loopjax.cli": 4,
}
# The package's __init__ is the front door: it imports the API lazily (on first use of
# `loopjax.load`), the one import allowed to run up from layer 0.
FRONT_DOOR = ("loopjax", "loopjax.api")
# Modules that import loopjax modules inside functions, and why.
_LAZY_COMMAND = ("each subcommand's libraries are imported when it runs, so `loopjax --help` "
                 "stays fast and `loopjax.cli` imports no jax")
LAZY = {m: _LAZY_COMMAND for m in (
    "loopjax.cli.main", "loopjax.cli.sample", "loopjax.cli.eval", "loopjax.cli.analyze",
    "loopjax.cli.export", "loopjax.cli.memory", "loopjax.cli.prepare", "loopjax.cli.lm_eval",
    "loopjax.cli.study", "loopjax.cli.config")}
LAZY["loopjax"] = ("the Python API is imported on first use, so `import loopjax` stays "
                  "cheap")


def modules(root: str, package: str = "loopjax") -> dict[str, str]:
  """{dotted module name: file path} of every .py file of `package` under `root`."""
  out = {}
  for folder, dirs, files in os.walk(os.path.join(root, package)):
    dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
    rel = os.path.relpath(folder, root).replace(os.sep, ".")
    for f in sorted(files):
      if f.endswith(".py"):
        out[rel if f == "__init__.py" else f"{rel}.{f[:-3]}"] = os.path.join(folder, f)
  return out


def imports(name: str, path: str, known: set[str]) -> list[tuple[str, int, bool]]:
  """[(imported loopjax module, line, inside a function)] of one module.

  `from P import X` imports P.X when that is a module of `known`, else P; relative imports are
  resolved against `name`'s package. Imports of other packages are left out."""
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), path)
  package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
  top = name.partition(".")[0]
  found = []

  def visit(node, in_function):
    for child in ast.iter_child_nodes(node):
      inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                ast.Lambda))
      if isinstance(child, ast.Import):
        found.extend((a.name, child.lineno, in_function) for a in child.names)
      elif isinstance(child, ast.ImportFrom):
        base = child.module or ""
        if child.level:
          parts = package.split(".")
          base = ".".join(parts[:len(parts) - child.level + 1] + ([base] if base else []))
        for a in child.names:
          sub = f"{base}.{a.name}"
          found.append((sub if sub in known else base, child.lineno, in_function))
      visit(child, inner)

  visit(tree, False)
  return [(m, line, lazy) for m, line, lazy in dict.fromkeys(found) if m.partition(".")[0] == top]


def unit(module: str) -> str:
  """The top-level package or module of loopjax that `module` belongs to."""
  return ".".join(module.split(".")[:2])


def graph(root: str, package: str = "loopjax"):
  """({module: [(imported module, line, inside a function)]}, {module: path})."""
  mods = modules(root, package)
  return {m: imports(m, p, set(mods)) for m, p in mods.items()}, mods


def upward_edges(edges, layers) -> list[tuple[str, int, str]]:
  """(importer, line, imported) of every import into a higher layer."""
  return [(m, line, to) for m, out in sorted(edges.items()) for to, line, _ in out
          if layers[unit(to)] > layers[unit(m)]]


def circles(nodes, succ) -> list[list[str]]:
  """Strongly connected components of more than one node (or a node importing itself)."""
  reach = {}
  for n in nodes:
    seen, todo = set(), list(succ.get(n, ()))
    while todo:
      m = todo.pop()
      if m not in seen:
        seen.add(m)
        todo.extend(succ.get(m, ()))
    reach[n] = seen
  out = {tuple(sorted(m for m in nodes if m in reach[n] and n in reach[m]))
         for n in nodes if n in reach[n]}
  return sorted(list(c) for c in out)


def unit_circles(edges) -> list[list[str]]:
  succ = {}
  for m, out in edges.items():
    succ.setdefault(unit(m), set()).update(unit(to) for to, _, _ in out if unit(to) != unit(m))
  return circles(sorted(succ), succ)


def module_circles(edges) -> list[list[str]]:
  return circles(sorted(edges), {m: {to for to, _, _ in out} for m, out in edges.items()})


def lazy_imports(edges) -> dict[str, list[str]]:
  """{module: ['line -> imported']} of function-local loopjax imports."""
  out = {}
  for m, found in sorted(edges.items()):
    lines = [f"{line} -> {to}" for to, line, lazy in found if lazy]
    if lines:
      out[m] = lines
  return out


@pytest.fixture(scope="module")
def loopjax_graph():
  return graph(ROOT)


def test_every_unit_has_a_layer(loopjax_graph):
  _, mods = loopjax_graph
  missing = sorted({unit(m) for m in mods} - set(LAYERS))
  assert not missing, f"give these a layer in LAYERS of tests/test_imports.py: {missing}"


def test_no_import_runs_up_a_layer(loopjax_graph):
  edges, _ = loopjax_graph
  up = [e for e in upward_edges(edges, LAYERS) if (e[0], e[2]) != FRONT_DOOR]
  bad = [f"{m}:{line} -> {to} (layer {LAYERS[unit(m)]} -> {LAYERS[unit(to)]})"
         for m, line, to in up]
  assert not bad, "imports from a lower layer into a higher one:\n  " + "\n  ".join(bad)


def test_no_circles_between_units_or_modules(loopjax_graph):
  edges = loopjax_graph[0]
  assert not unit_circles(edges), f"top-level units import each other: {unit_circles(edges)}"
  assert not module_circles(edges), f"modules import each other: {module_circles(edges)}"


def test_function_local_loopjax_imports_have_a_reason(loopjax_graph):
  edges, _ = loopjax_graph
  lazy = lazy_imports(edges)
  bad = {m: v for m, v in lazy.items() if m not in LAZY}
  assert not bad, ("loopjax imports inside functions (move them to the top of the module, or "
                   f"say why in LAZY): {bad}")


def test_the_checks_catch_a_planted_upward_import_and_a_circle(tmp_path):
  """A package whose low layer imports its high one inside a function, and modules that
  import each other: all are found and named."""
  files = {
      "pkg/__init__.py": "",
      "pkg/low/__init__.py": "",
      "pkg/low/a.py": """
          from pkg.low import b

          def f():
            from pkg import high
            return high
      """,
      "pkg/low/b.py": "from . import a\n",
      "pkg/high.py": "import pkg.low.a\n",
  }
  for rel, text in files.items():
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / rel).write_text(textwrap.dedent(text))
  edges, _ = graph(str(tmp_path), "pkg")
  layers = {"pkg": 0, "pkg.low": 0, "pkg.high": 1}
  assert upward_edges(edges, layers) == [("pkg.low.a", 5, "pkg.high")]
  assert lazy_imports(edges) == {"pkg.low.a": ["5 -> pkg.high"]}
  assert unit_circles(edges) == [["pkg.high", "pkg.low"]]
  assert module_circles(edges) == [["pkg.high", "pkg.low.a", "pkg.low.b"]]


def argparse_importers(root: str, package: str = "loopjax") -> list[str]:
  """Modules of `package` outside its cli/ package that import argparse (at any depth)."""
  out = []
  for name, path in modules(root, package).items():
    if name == f"{package}.cli" or name.startswith(f"{package}.cli."):
      continue
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
               [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
      if any(n.partition(".")[0] == "argparse" for n in names):
        out.append(f"{name}:{node.lineno}")
  return out


def test_argparse_lives_only_in_the_cli_package(tmp_path):
  """Command-line parsing is loopjax/cli/'s job; library modules take plain arguments. The check
  itself finds a planted import inside a function and leaves cli/ alone."""
  assert not argparse_importers(ROOT), ("argparse outside loopjax/cli/ (move the parser into "
                                        f"the cli package): {argparse_importers(ROOT)}")
  for rel, text in {"pkg/__init__.py": "", "pkg/cli/__init__.py": "import argparse\n",
                    "pkg/lib.py": "def f():\n  from argparse import ArgumentParser\n"}.items():
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / rel).write_text(text)
  assert argparse_importers(str(tmp_path), "pkg") == ["pkg.lib:2"]


def test_every_private_jax_import_says_why():
  """Public jax APIs first; each `jax._src` import left has a comment starting "Private jax" in
  the lines just above it naming what public API is missing."""
  bad = []
  for name, path in modules(ROOT).items():
    with open(path, encoding="utf-8") as f:
      lines = f.read().splitlines()
    for node in ast.walk(ast.parse("\n".join(lines), path)):
      mods = ([a.name for a in node.names] if isinstance(node, ast.Import) else
              [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
      if any(m.startswith("jax._src") for m in mods):
        above = "\n".join(lines[max(0, node.lineno - 10):node.lineno])
        if "Private jax" not in above:
          bad.append(f"{name}:{node.lineno}")
  assert not bad, f"jax._src imports without a 'Private jax: why' comment: {bad}"
