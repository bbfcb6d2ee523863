#!/usr/bin/env python3
"""The shape limits of issue 15, checked on the package (``ipcbus/`` and its subpackages).

    python .ci/limits.py [PACKAGE_DIR]      (default: the ipcbus/ next to .ci/)

- no module over 600 lines (physical lines);
- no class over 350 lines, no function over 80 (methods and nested functions included): the
  ``end_lineno - lineno + 1`` of the ``class``/``def`` statement, decorators excluded;
- no import cycle between the package's modules, counting every import: at the top, in a
  function, under ``TYPE_CHECKING``;
- ``_protocol.py`` and ``_router.py`` import no socket, threading, select, selectors or ctypes:
  they take bytes and frames and give frames and decisions (docs: README "Layout").

Prints one line per violation (``path:line what size>limit``) and a summary; exits 1 when there
is a violation, 0 otherwise. Standard library only; ``tests/unit/test_layout.py`` and
``tests/unit/test_limits.py`` import it (``.ci`` is on pytest's ``pythonpath``).
"""
from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Union

MODULE_LINES = 600
CLASS_LINES = 350
FUNCTION_LINES = 80
PURE_MODULES = ("_protocol", "_router")
IMPURE_IMPORTS = frozenset({"socket", "threading", "select", "selectors", "ctypes"})

PACKAGE = Path(__file__).resolve().parent.parent / "ipcbus"
USAGE = "usage: python .ci/limits.py [PACKAGE_DIR]"


@dataclass(frozen=True)
class Violation:
    """One limit broken: where (file and line), what, and by how much."""

    path: Path
    line: int
    what: str
    size: int = 0
    limit: int = 0

    def render(self, base: Path | None = None) -> str:
        path = self.path
        if base is not None and path.is_relative_to(base):
            path = path.relative_to(base)
        sizes = f" {self.size}>{self.limit}" if self.limit else ""
        return f"{path}:{self.line} {self.what}{sizes}"


# -- sizes -------------------------------------------------------------------------------------
Definition = Union[ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef]


def physical_lines(text: str) -> int:
    """Lines as ``wc -l`` counts them, plus a last line without its newline."""
    return text.count("\n") + (1 if text and not text.endswith("\n") else 0)


def node_lines(node: Definition) -> int:
    """The lines of a ``class``/``def`` statement, decorators excluded (``lineno`` is the line
    of the keyword since Python 3.8)."""
    assert node.end_lineno is not None
    return node.end_lineno - node.lineno + 1


def definitions(tree: ast.AST) -> Iterator[tuple[str, Definition]]:
    """Every class and function of a module, nested ones included, with a dotted name
    (``Hub.run``, ``outer.inner``)."""
    def walk(node: ast.AST, prefix: str) -> Iterator[tuple[str, Definition]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                yield name, child
                yield from walk(child, name + ".")
            else:
                yield from walk(child, prefix)

    yield from walk(tree, "")


def size_violations(path: Path, text: str, tree: ast.AST) -> list[Violation]:
    """The module, class and function size limits of one file."""
    found: list[Violation] = []
    lines = physical_lines(text)
    if lines > MODULE_LINES:
        found.append(Violation(path, 1, "module", lines, MODULE_LINES))
    for name, node in definitions(tree):
        size = node_lines(node)
        if isinstance(node, ast.ClassDef):
            if size > CLASS_LINES:
                found.append(Violation(path, node.lineno, f"class {name}", size, CLASS_LINES))
        elif size > FUNCTION_LINES:
            found.append(Violation(path, node.lineno, f"function {name}", size, FUNCTION_LINES))
    return found


# -- imports -----------------------------------------------------------------------------------
def package_modules(package: Path) -> dict[str, Path]:
    """Module name relative to the package (``client``, ``_protocol``, ``ecipc.codec``,
    ``ecipc`` for ``ecipc/__init__.py``, ``""`` for the package's own ``__init__.py``)."""
    modules: dict[str, Path] = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def ancestors(module: str) -> list[str]:
    """The packages a dotted module name sits in, nearest last: ``a.b.c`` -> ``a``, ``a.b``."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def imports_of(name: str, path: Path, tree: ast.AST, top: str,
               modules: Iterable[str]) -> Iterator[tuple[str, int]]:
    """(package module, line) for every import of the package anywhere in a module's text.

    ``from P import n`` depends on the module ``P.n`` if there is one, else on ``P`` (``n`` is
    a name defined there: a real dependency even on the importer's own package). Importing a
    module also runs the packages it is in, so those count too, except the importer's own
    packages (they are being imported already).
    """
    known = set(modules)
    package = name.split(".") if name else []
    if path.name != "__init__.py":
        package = package[:-1]
    own = set(ancestors(name)) | ({name} if path.name == "__init__.py" else set())
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        targets: list[str] = []
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . / .. import ...
                base = package[:len(package) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            elif node.module == top or (node.module or "").startswith(top + "."):
                prefix = (node.module or "").removeprefix(top).lstrip(".")
            else:
                continue
            for alias in node.names:
                module = f"{prefix}.{alias.name}".lstrip(".")
                targets.append(module if module in known else prefix)
        else:
            targets = [alias.name.removeprefix(top).lstrip(".") for alias in node.names
                       if alias.name == top or alias.name.startswith(top + ".")]
        for target in targets:
            for module in ancestors(target):
                if module not in own:
                    yield module, node.lineno
            yield target, node.lineno


def import_graph(package: Path = PACKAGE) -> dict[str, dict[str, int]]:
    """Module -> {package module it imports: line of the first such import}. Imports of the
    package's ``__init__`` are left out (every module is under it: that is not a layer)."""
    modules = package_modules(package)
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        edges: dict[str, int] = {}
        for target, line in imports_of(name, path, tree, package.name, modules):
            if target in modules and target not in (name, ""):
                edges.setdefault(target, line)
        graph[name] = edges
    return graph


def find_cycle(graph: Mapping[str, Iterable[str]]) -> list[str] | None:
    """One import cycle (``[a, b, c, a]``), or None; deterministic (sorted order)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def cycles(graph: Mapping[str, Iterable[str]]) -> list[tuple[list[str], list[str]]]:
    """Every group of modules that import each other (a strongly connected component of more
    than one module), as (its modules, one cycle through it), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def connect(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group: list[str] = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    found = []
    for group in sorted(groups):
        members = set(group)
        inside = {m: [n for n in graph.get(m, ()) if n in members] for m in group}
        cycle = find_cycle(inside)
        assert cycle is not None
        found.append((group, cycle))
    return found


def cycle_violations(package: Path = PACKAGE) -> list[Violation]:
    modules = package_modules(package)
    graph = import_graph(package)
    found = []
    for group, cycle in cycles(graph):
        first, second = cycle[0], cycle[1]
        what = f"import cycle {' -> '.join(cycle)}"
        if len(group) > len(cycle) - 1:
            what += f" (one of {len(group)} modules importing each other: {', '.join(group)})"
        found.append(Violation(modules[first], graph[first][second], what))
    return found


def impure_imports(path: Path, tree: ast.AST) -> list[tuple[str, int]]:
    """(module, line) for each import of a socket/thread/poller/C-memory module."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            found.append((node.module or "", node.lineno))
    return [(name, line) for name, line in found if name.split(".")[0] in IMPURE_IMPORTS]


def purity_violations(package: Path = PACKAGE) -> list[Violation]:
    found = []
    for name in PURE_MODULES:
        path = package / f"{name}.py"
        if not path.exists():
            found.append(Violation(path, 0, "missing: the pure module cannot be checked"))
            continue
        for module, line in impure_imports(path, ast.parse(path.read_text(), str(path))):
            found.append(Violation(path, line, f"imports {module} (the module must stay pure)"))
    return found


# -- all of it ---------------------------------------------------------------------------------
def check(package: Path = PACKAGE) -> list[Violation]:
    """Every violation of the package, sizes first (by file), then cycles, then purity."""
    found: list[Violation] = []
    for path in sorted(package.rglob("*.py")):
        text = path.read_text()
        try:
            tree = ast.parse(text, str(path))
        except SyntaxError as exc:
            found.append(Violation(path, exc.lineno or 0, f"syntax error: {exc.msg}"))
            continue
        found += size_violations(path, text, tree)
    return found + cycle_violations(package) + purity_violations(package)


def main(argv: list[str]) -> int:
    if len(argv) > 2 or (len(argv) == 2 and argv[1].startswith("-")):
        print(USAGE, file=sys.stderr)
        return 2
    package = Path(argv[1]).resolve() if len(argv) == 2 else PACKAGE
    if not package.is_dir():
        print(f"limits: {package} is not a directory", file=sys.stderr)
        return 2
    found = check(package)
    for violation in found:
        print(violation.render(Path.cwd()))
    files = len(list(package.rglob("*.py")))
    rules = (f"modules <= {MODULE_LINES} lines, classes <= {CLASS_LINES}, functions <= "
             f"{FUNCTION_LINES}; no import cycle; {' and '.join(PURE_MODULES)} pure")
    if found:
        print(f"limits: {len(found)} violation(s) in {package.name}/ ({files} modules; {rules})")
        return 1
    print(f"limits: ok, {package.name}/ ({files} modules; {rules})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
