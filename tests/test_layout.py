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


# Pure modules: the wire protocol, the router and its parts, the policies the hub carries out.
PURE = ("_protocol", "_router", "_routing", "_router_requests", "_router_messages",
        "_router_view", "_pending", "_backpressure", "_handshake")
IMPURE = {"socket", "threading", "select", "selectors", "ctypes"}


def imported_names(name: str) -> set[str]:
    """Top-level names of the modules outside the package that ``name`` imports."""
    tree = ast.parse((PACKAGE / f"{name}.py").read_text())
    imported = {a.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for a in node.names}
    imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and not node.level}
    return imported


def test_the_wire_protocol_and_the_router_are_pure() -> None:
    """``_protocol.py``, ``_router.py`` and the router's parts touch no socket, thread, poller
    or C memory: they take bytes and frames, and give frames and decisions (the large-bytes
    receive, which needs ``ctypes``, lives in ``_bigbytes.py``, used by ``_decoder.py``)."""
    for name in PURE:
        assert not imported_names(name) & IMPURE, name


def test_pure_modules_import_only_pure_modules_of_the_package() -> None:
    """Purity holds through the package's own imports too: a pure module never reaches a
    socket or ``ctypes`` through another module of the package."""
    graph = import_graph()
    allowed = set(PURE) | {"errors", "_types"}
    for name in PURE:
        assert graph[name] <= allowed, (name, graph[name] - allowed)


# Issue 15's limits (physical lines; ast lines of a class or function, decorators excluded).
MODULE_LINES, CLASS_LINES, FUNCTION_LINES = 600, 350, 80
HUB_AND_ROUTER = ("_protocol", "_decoder", "_bigbytes", "_transport", "_router", "_routing",
                  "_router_requests", "_router_messages", "_router_view", "_backpressure",
                  "_handshake", "_outqueue", "_hub", "_hub_accept", "_hub_auth", "_hub_endpoint",
                  "_hub_flow", "_hub_options", "broker", "bridge", "spy", "traffic")


def oversized(path: Path) -> list[str]:
    """What in ``path`` is over the limits."""
    text = path.read_text()
    found = []
    if text.count("\n") > MODULE_LINES:
        found.append(f"{path.name}: {text.count(chr(10))} lines")
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            size = (node.end_lineno or node.lineno) - node.lineno + 1
            limit = CLASS_LINES if isinstance(node, ast.ClassDef) else FUNCTION_LINES
            if size > limit:
                found.append(f"{path.name}: {node.name} {size} lines")
    return found


def test_the_hub_the_router_and_the_protocol_keep_the_size_limits() -> None:
    found = [item for name in HUB_AND_ROUTER for item in oversized(PACKAGE / f"{name}.py")]
    assert not found, found


def test_the_size_check_finds_what_is_over() -> None:
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.py"
        path.write_text("def f() -> None:\n" + "    x = 1\n" * 80)
        assert oversized(path) == ["big.py: f 81 lines"]
