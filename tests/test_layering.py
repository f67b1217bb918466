"""The package's imports form layers: no import circle, and no import that runs back up a layer.

Every module of ``areal_hpc`` is parsed with ``ast``; an import counts wherever it is written (at module
level, inside a function, under ``if TYPE_CHECKING``): a lazy import still is a dependency a reader has to
follow, and it only hides a circle until the function runs. A name resolved at run time from a string
(``importlib.import_module``, a registry's ``"module:attr"``) is not an import: that is how a low layer
names an implementation without depending on it.

The layers, from the bottom; a module may import its own layer and the ones below it:

0. ``config``, ``trajectory``, ``api``, ``registry`` (and the empty ``areal_hpc/__init__``): plain types and
   protocols every part shares. The config dataclasses and their validation read nothing else; the one
   trajectory type crosses every boundary from the rollout worker to the trainer; the protocols say what an
   engine, a backend, a weight channel and a sample channel offer; the registry names the implementations
   as import strings, resolved only when a config chooses one; ``phases`` times a rank's one-time phases;
   ``logs`` sets up a process's logging.
1. ``comm``, ``storage``, ``model``, ``tasks``, ``reward``: building blocks that each know one thing and no role.
   ``comm`` wraps MPI, torch.distributed and devices; ``storage`` is what a run leaves on disk (the HDF5
   rollout log, the run's files, checkpoints and the ``ResumeState`` both roles read, whose policy the caller
   writes); ``model`` is the policy network, the kernels both roles use, the tokenizer and policy files;
   ``tasks`` gives prompts and answers (it builds its tokenizer and prompts through ``model``); ``reward``
   scores a response against its problem (verifiers, the code sandbox, the worker pool) and knows no engine.
2. ``transport``, ``weights``: the channels between the roles, samples one way (rings and HDF5 shards, on
   top of ``storage`` and ``comm``) and versioned weights the other (broadcast, CUDA IPC, or shared memory
   through ``transport``'s ring). They move data and know neither role's loop.
3. ``rollout``, ``train``: the two roles, each with its engines and its loop (the trainer's loop, its eval
   and checkpoint calls included). The trainer evaluates through ``rollout``'s generation: same layer, so
   allowed, as long as no circle. ``elastic`` is a role too: the attached rollout worker (built from
   ``rollout``'s parts) and the trainer's planner of its grants, with the run-folder files they share.
4. ``analysis``, ``bench``: what reads a finished run (``areal-hpc analyze``) or runs the benchmarks. Above
   the roles so that no role depends on them.
5. ``launch``: starts processes (mpiexec, srun, submitit), assigns each rank its role and runs it; the only
   part that knows Slurm. Its commands (``train``, ``submit``, ``status``) share ``launch.run_dir``.
6. ``cli``: only wires the sub-commands together; nothing imports it.

A new part must be given a layer here (``test_every_module_has_a_layer``), which is the moment to ask
where it belongs.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "areal_hpc"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

# Parts (a sub-package or a module, matched with everything under it), from the bottom layer up.
LAYERS: list[tuple[str, ...]] = [
    ("areal_hpc.config", "areal_hpc.trajectory", "areal_hpc.api", "areal_hpc.registry",
     "areal_hpc.phases", "areal_hpc.logs"),
    ("areal_hpc.comm", "areal_hpc.storage", "areal_hpc.model", "areal_hpc.tasks", "areal_hpc.reward"),
    ("areal_hpc.transport", "areal_hpc.weights"),
    ("areal_hpc.rollout", "areal_hpc.train", "areal_hpc.elastic"),
    ("areal_hpc.analysis", "areal_hpc.bench"),
    ("areal_hpc.launch",),
    ("areal_hpc.cli",),
]


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module of the package (a package's __init__ when a name comes from it)
    file: str  # path relative to the repository, for the report
    line: int
    lazy: bool  # written inside a function

    def where(self) -> str:
        return f"{self.file}:{self.line}"


def modules(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """Every module of the package by dotted name (a package is its ``__init__``)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = (package, *path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The longest prefix of ``name`` that is a module of the package (``a.b.func`` -> ``a.b``)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in known:
            return candidate
    return None


class _Collector(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool, known: dict[str, Path], file: str, package: str) -> None:
        self.module, self.is_package, self.known, self.file, self.package = module, is_package, known, file, package
        self.depth = 0
        self.found: list[Import] = []

    def _add(self, target: str | None, line: int) -> None:
        if target is not None and target != self.module:
            self.found.append(Import(self.module, target, self.file, line, self.depth > 0))

    def _function(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name == self.package or alias.name.startswith(self.package + "."):
                self._add(_resolve(alias.name, self.known), node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:  # relative: from the package this module is in (a package's own __init__ is in itself)
            here = self.module.split(".") if self.is_package else self.module.split(".")[:-1]
            base = ".".join(here[: len(here) - (node.level - 1)])
            name = f"{base}.{node.module}" if node.module else base
        else:
            name = node.module or ""
        if not (name == self.package or name.startswith(self.package + ".")):
            return
        for alias in node.names:  # `from pkg import mod` imports the module mod, `from mod import name` mod
            sub = f"{name}.{alias.name}"
            self._add(sub if sub in self.known else _resolve(name, self.known), node.lineno)


def imports(root: Path = ROOT, package: str = PACKAGE) -> list[Import]:
    """Every import of one module of the package by another, wherever in the file it is written."""
    known = modules(root, package)
    found: list[Import] = []
    for name, path in known.items():
        c = _Collector(name, path.name == "__init__.py", known, str(path.relative_to(root.parent)), package)
        c.visit(ast.parse(path.read_text(), filename=str(path)))
        found.extend(c.found)
    return found


def layer_of(module: str, layers: list[tuple[str, ...]] = LAYERS, package: str = PACKAGE) -> int | None:
    """The layer of the longest part that contains ``module``; the package's own ``__init__`` is at 0."""
    if module == package:
        return 0
    best: tuple[int, int] | None = None  # (length of the part's name, layer)
    for i, parts in enumerate(layers):
        for part in parts:
            if (module == part or module.startswith(part + ".")) and (best is None or len(part) > best[0]):
                best = (len(part), i)
    return None if best is None else best[1]


def upward(found: list[Import], layers: list[tuple[str, ...]] = LAYERS, package: str = PACKAGE) -> list[str]:
    """One line per import that runs up a layer: file:line, who imports whom, and both layers."""
    out = []
    for imp in sorted(found, key=lambda i: (i.file, i.line, i.target)):
        lo, hi = layer_of(imp.source, layers, package), layer_of(imp.target, layers, package)
        if lo is not None and hi is not None and hi > lo:
            how = " (inside a function)" if imp.lazy else ""
            out.append(f"{imp.where()}: {imp.source} (layer {lo}) imports {imp.target} (layer {hi}){how}")
    return out


def cycles(found: list[Import]) -> list[str]:
    """One line per circle (a strongly connected set of modules), written as one path around it."""
    graph: dict[str, dict[str, Import]] = {}
    for imp in found:
        graph.setdefault(imp.source, {}).setdefault(imp.target, imp)
        graph.setdefault(imp.target, {})

    # Tarjan's strongly connected components, iteratively (no recursion limit on a long chain).
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(sorted(component))

    out = []
    for component in sorted(components):
        members = set(component)
        first = component[0]
        # The shortest way back to the first module inside the component: a breadth-first search.
        previous: dict[str, str] = {}
        frontier, seen, closing = [first], {first}, None
        while frontier and closing is None:
            nxt = []
            for node in frontier:
                for child in sorted(graph[node]):
                    if child == first:
                        closing = node
                        break
                    if child in members and child not in seen:
                        seen.add(child)
                        previous[child] = node
                        nxt.append(child)
                if closing is not None:
                    break
            frontier = nxt
        path = [first]
        node = closing
        while node != first:
            path.insert(1, node)
            node = previous[node]
        path.append(first)
        steps = " -> ".join(f"{b} ({graph[a][b].where()})" for a, b in zip(path, path[1:]))
        out.append(f"{first} -> {steps}" + (f"  [circle of {len(members)} modules]" if len(members) > 2 else ""))
    return out


# --------------------------------------------------------------------------- the package


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in modules() if layer_of(m) is None)
    assert not unplaced, "modules in no layer of LAYERS (give their part a layer):\n" + "\n".join(unplaced)


def test_no_import_circle():
    found = cycles(imports())
    assert not found, "import circles:\n" + "\n".join(found)


def test_no_import_runs_up_a_layer():
    found = upward(imports())
    assert not found, f"{len(found)} imports run up a layer:\n" + "\n".join(found)


def test_nothing_imports_the_command_line():
    """``cli`` only wires sub-commands: a part that imports it reaches up past every other layer."""
    found = [f"{i.where()}: {i.source}" for i in imports() if i.target == f"{PACKAGE}.cli"]
    assert not found, "\n".join(found)


# --------------------------------------------------------------------------- the checker itself


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / "pkg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_checker_sees_lazy_relative_and_package_imports(tmp_path):
    """Imports inside functions, relative ones and ``from package import module`` all count, and the
    report names the file and line of each step around a circle."""
    root = _tree(tmp_path, {
        "__init__.py": "",
        "low/__init__.py": "from .base import Thing\n",
        "low/base.py": "import os\n\nThing = int\n",
        "high/__init__.py": "",
        "high/run.py": "from pkg.low import base\n\n\ndef go():\n    from ..low.base import Thing\n    return Thing\n",
        "low/back.py": "def f():\n    from pkg.high import run\n    return run\n",
        "high/a.py": "from pkg.high import b\n",
        "high/b.py": "import pkg.high.c\n",
        "high/c.py": "def f():\n    from . import a\n",
    })
    found = imports(root, "pkg")
    pairs = {(i.source, i.target, i.lazy) for i in found}
    assert ("pkg.low", "pkg.low.base", False) in pairs  # relative, from a package's __init__
    assert ("pkg.high.run", "pkg.low.base", False) in pairs and ("pkg.high.run", "pkg.low.base", True) in pairs
    assert ("pkg.low.back", "pkg.high.run", True) in pairs
    layers = [("pkg.low",), ("pkg.high",)]
    assert upward(found, layers, "pkg") == [
        "pkg/low/back.py:2: pkg.low.back (layer 0) imports pkg.high.run (layer 1) (inside a function)"]
    assert cycles(found) == ["pkg.high.a -> pkg.high.b (pkg/high/a.py:1) -> pkg.high.c (pkg/high/b.py:1) -> "
                             "pkg.high.a (pkg/high/c.py:2)  [circle of 3 modules]"]
    assert layer_of("pkg.other", layers, "pkg") is None and layer_of("pkg", layers, "pkg") == 0
