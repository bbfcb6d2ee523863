"""The package's shape: no import cycle between its modules, counting every import (at the top,
in a function, under ``TYPE_CHECKING``), so that the file list reads as layers."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ipcbus"


def import_graph() -> dict[str, set[str]]:
    """Module name (``client``, ``_protocol``, ``ecipc.codec``...) -> the package modules it
    imports anywhere in its text."""
    modules = {str(p.relative_to(PACKAGE).with_suffix("")).replace("/", "."): p
               for p in PACKAGE.rglob("*.py")}
    modules = {name.removesuffix(".__init__"): p for name, p in modules.items()}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name.split(".")[:-1] if not path.name == "__init__.py" else name.split(".")
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from . / .. import ...
                    base = package[:len(package) - node.level + 1] if node.level > 1 else package
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    if not (node.module or "").startswith("ipcbus"):
                        continue
                    prefix = (node.module or "").removeprefix("ipcbus").lstrip(".")
                targets = [f"{prefix}.{a.name}".lstrip(".") for a in node.names] + [prefix]
            elif isinstance(node, ast.Import):
                targets = [a.name.removeprefix("ipcbus").lstrip(".") for a in node.names
                           if a.name.startswith("ipcbus.")]
            edges.update(t for t in targets if t in modules and t != name and t != "__init__")
        graph[name.removeprefix("__init__")] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
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


def test_the_package_has_no_import_cycle() -> None:
    graph = import_graph()
    assert {"client", "broker", "_router", "_protocol"} <= set(graph)
    assert "_types" in graph["client"]  # the graph sees imports at all
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def test_a_cycle_is_found_when_there_is_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_wire_protocol_and_the_router_are_pure() -> None:
    """``_protocol.py`` and ``_router.py`` touch no socket, thread, poller or C memory: they
    take bytes and frames, and give frames and decisions (the large-bytes receive, which
    needs ``ctypes``, lives in ``_bigbytes.py``)."""
    for name in ("_protocol.py", "_router.py"):
        tree = ast.parse((PACKAGE / name).read_text())
        imported = {a.name.split(".")[0] for node in ast.walk(tree)
                    if isinstance(node, ast.Import) for a in node.names}
        imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and not node.level}
        assert not imported & {"socket", "threading", "select", "selectors", "ctypes"}, name
