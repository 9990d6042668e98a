"""The package's shape, read from its source with ``ast`` (nothing is imported): no import cycles between
modules, no private name of one module used by another (``from m import _x``, ``m._x``, or ``obj._x`` where only
other modules define ``_x``: another module's private method), no module over ``MAX_LINES`` lines.

Modules are every ``.py`` file of ``avgn_fast/`` and of ``kernels/`` (installed as ``avgn_fast.kernels``). An
import is a dependency wherever it sits (a lazy import inside a function still runs); only imports under
``if TYPE_CHECKING:`` are left out of the cycle check, since they never run. A package's ``__init__`` counts
as a dependency only where it is named (``from avgn_fast.engine import Predictor``), not for every import of
one of its submodules. Each test lists every violation it finds, with file and line.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "avgn_fast"
SOURCES = {PACKAGE: "avgn_fast", f"{PACKAGE}.kernels": "kernels"}  # dotted prefix -> folder under ROOT
MAX_LINES = 400


@dataclass
class Module:
    name: str
    path: Path  # relative to the root the package was read from
    tree: ast.Module = field(repr=False)
    lines: int
    is_package: bool
    # (imported module, line, runs: False under ``if TYPE_CHECKING:``)
    imports: list[tuple[str, int, bool]] = field(default_factory=list, repr=False)
    # (name, module it was taken from, line) for ``from x import _y``
    private_imports: list[tuple[str, str, int]] = field(default_factory=list, repr=False)
    # local name -> package module it is bound to (``import a.b as m``, ``from a import b``)
    aliases: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def package(self) -> str:
        return self.name if self.is_package else self.name.rpartition(".")[0]

    def where(self, line: int) -> str:
        return f"{self.path}:{line}"


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(node: ast.AST, runs: bool = True):
    """Every Import/ImportFrom under ``node`` with whether it runs (False inside ``if TYPE_CHECKING:``)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, runs
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.body:
                yield from _import_nodes(ast.Module(body=[stmt], type_ignores=[]), False)
            for stmt in child.orelse:
                yield from _import_nodes(ast.Module(body=[stmt], type_ignores=[]), runs)
        else:
            yield from _import_nodes(child, runs)


def _owning_module(dotted: str, names) -> str | None:
    """The longest prefix of ``dotted`` that is a module of the package."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in names:
            return ".".join(parts[:end])
    return None


def parse_package(root: Path, sources: dict[str, str]) -> dict[str, Module]:
    """Every module under ``root/folder`` for each (dotted prefix, folder) of ``sources``, parsed, with its
    imports resolved to modules of the same package."""
    found = {}
    for prefix, folder in sources.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = [prefix, *path.relative_to(root / folder).with_suffix("").parts]
            is_package = parts[-1] == "__init__"
            name = ".".join(parts[:-1] if is_package else parts)
            text = path.read_text()
            found[name] = Module(name, path.relative_to(root), ast.parse(text, filename=str(path)),
                                 len(text.splitlines()), is_package)
    for module in found.values():
        _resolve_imports(module, found)
    return found


def _resolve_imports(module: Module, found: dict[str, Module]) -> None:
    for node, runs in _import_nodes(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _owning_module(alias.name, found)
                if target is not None:
                    module.imports.append((target, node.lineno, runs))
                    if alias.asname:
                        module.aliases[alias.asname] = target
            continue
        if node.level:  # relative: resolved against this module's package
            base = module.package.split(".")
            base = base[: len(base) - (node.level - 1)]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        if _owning_module(source, found) is None:
            continue
        for alias in node.names:
            submodule = f"{source}.{alias.name}"
            if submodule in found:  # ``from pkg import submodule``
                module.imports.append((submodule, node.lineno, runs))
                module.aliases[alias.asname or alias.name] = submodule
            else:
                module.imports.append((_owning_module(source, found), node.lineno, runs))
            if _is_private(alias.name):
                module.private_imports.append((alias.name, source, node.lineno))


def _dotted(node: ast.expr) -> list[str] | None:
    """``a.b.c`` as ["a", "b", "c"]; None for anything that is not a plain name chain."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(parts)]


def _defined_names(tree: ast.Module) -> set[str]:
    """Names a module defines anywhere: functions, classes, assignments, ``self.x = ...`` attributes."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return names


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components of more than one module (every import cycle lies inside one)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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


def import_cycles(found: dict[str, Module]) -> list[str]:
    """One entry per group of mutually importing modules, with each import inside the group and its line."""
    graph = {name: {t for t, _, runs in m.imports if runs and t != name} for name, m in found.items()}
    report = []
    for component in _strongly_connected(graph):
        inside = set(component)
        # one line per import statement: ``from m import a, b`` is one edge
        edges = sorted({(found[name].where(line), target) for name in component
                        for target, line, runs in found[name].imports if runs and target in inside and target != name})
        edges = [f"{where} imports {target}" for where, target in edges]
        report.append(f"cycle between {', '.join(component)}:\n    " + "\n    ".join(edges))
    return report


def private_uses(found: dict[str, Module]) -> list[str]:
    """``from x import _y`` across modules, ``module._y`` through an imported module, and ``obj._y`` where
    ``_y`` is defined only in other modules of the package (another module's private method or attribute)."""
    defined = {name: _defined_names(m.tree) for name, m in found.items()}
    private_owners = defaultdict(set)
    for name, names in defined.items():
        for n in names:
            if _is_private(n):
                private_owners[n].add(name)
    report = []
    for name, module in found.items():
        for private, source, line in module.private_imports:
            if source != name:
                report.append(f"{module.where(line)}: from {source} import {private}")
        for node in ast.walk(module.tree):
            if not (isinstance(node, ast.Attribute) and _is_private(node.attr)):
                continue
            chain = _dotted(node.value)
            owner = None
            if chain is not None:
                head = module.aliases.get(chain[0], chain[0])
                owner = _owning_module(".".join([head, *chain[1:]]), found)
            if owner is not None and owner != name:
                report.append(f"{module.where(node.lineno)}: {ast.unparse(node)} (private name of {owner})")
            elif owner is None and chain not in (["self"], ["cls"]) and node.attr not in defined[name]:
                others = sorted(private_owners.get(node.attr, set()) - {name})
                if others:
                    report.append(f"{module.where(node.lineno)}: {ast.unparse(node)} ({node.attr} is private to "
                                  f"{', '.join(others)})")
    return report


def long_files(found: dict[str, Module], max_lines: int = MAX_LINES) -> list[str]:
    return [f"{m.path}: {m.lines} lines" for m in sorted(found.values(), key=lambda m: m.path) if m.lines > max_lines]


# a package with one of each violation, and the look-alikes that are not violations
FIXTURE = {
    "__init__.py": "def __getattr__(name):\n    from pkg.a import A\n\n    return A\n",
    "a.py": ("from pkg.b import helper\n\n\nclass A:\n    def _own(self):\n        return self._own\n\n"
             "    def run(self, other):\n        return other._secret(), helper()\n"),
    "b.py": "from pkg.c import _private_fn\n\n\ndef helper():\n    from pkg import a\n\n    return a, _private_fn\n",
    "c.py": ("from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from pkg.d import D\n\n\n"
             "def _private_fn(d: 'D'):\n    return d\n\n\nclass C:\n    def _secret(self):\n        return 1\n"),
    "d.py": "import pkg.c as cmod\n\n\nclass D:\n    value = cmod._private_fn(None)\n",
    "sub/__init__.py": "",
    "sub/e.py": "from .. import c\nfrom ..c import _private_fn\n\nF = c._private_fn, _private_fn\n",
}


def write_fixture(root: Path) -> dict[str, Module]:
    for relative, text in FIXTURE.items():
        (root / "pkg" / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / "pkg" / relative).write_text(text)
    return parse_package(root, {"pkg": "pkg"})


def test_checks_find_each_kind_of_violation(tmp_path):
    """The lazy import in b closes the cycle a <-> b; c -> d under TYPE_CHECKING closes none (d -> c only);
    the package __init__ is not an implicit dependency of its submodules; ``self._own`` is no violation."""
    found = write_fixture(tmp_path)
    assert set(found) == {"pkg", "pkg.a", "pkg.b", "pkg.c", "pkg.d", "pkg.sub", "pkg.sub.e"}
    assert import_cycles(found) == ["cycle between pkg.a, pkg.b:\n    pkg/a.py:1 imports pkg.b\n"
                                    "    pkg/b.py:5 imports pkg.a"]
    assert private_uses(found) == [
        "pkg/a.py:9: other._secret (_secret is private to pkg.c)",
        "pkg/b.py:1: from pkg.c import _private_fn",
        "pkg/d.py:5: cmod._private_fn (private name of pkg.c)",
        "pkg/sub/e.py:2: from pkg.c import _private_fn",
        "pkg/sub/e.py:4: c._private_fn (private name of pkg.c)",
    ]
    assert long_files(found, max_lines=6) == ["pkg/a.py: 9 lines", "pkg/b.py: 7 lines", "pkg/c.py: 13 lines"]


@pytest.fixture(scope="module")
def package() -> dict[str, Module]:
    found = parse_package(ROOT, SOURCES)
    # the walk sees the package as installed: the top level, a subpackage module and the kernels
    assert {PACKAGE, f"{PACKAGE}.config", f"{PACKAGE}.models.avgn", f"{PACKAGE}.kernels.crop_patches"} <= set(found)
    return found


def test_no_import_cycles(package):
    cycles = import_cycles(package)
    assert not cycles, f"{len(cycles)} import cycle(s):\n" + "\n".join(cycles)


def test_no_private_names_across_modules(package):
    uses = private_uses(package)
    assert not uses, f"{len(uses)} use(s) of another module's private name:\n" + "\n".join(uses)


def test_no_file_over_max_lines(package):
    long = long_files(package)
    assert not long, f"{len(long)} module(s) over {MAX_LINES} lines:\n" + "\n".join(long)
