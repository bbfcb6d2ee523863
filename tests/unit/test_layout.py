"""The package's shape: no import cycle between its modules, counting every import (at the top,
in a function, under ``TYPE_CHECKING``), so that the file list reads as layers; the wire
protocol and the router pure.

The rules live in ``.ci/limits.py`` with the size limits (``.ci/run`` runs all of them); these
tests run its import rules on the package, and ``test_limits.py`` tests the script itself.
"""
from __future__ import annotations

import ast

import limits


def test_the_package_has_no_import_cycle() -> None:
    graph = limits.import_graph()
    assert {"client", "broker", "_router", "_protocol"} <= set(graph)
    assert "_types" in graph["client"]  # the graph sees imports at all
    cycle = limits.find_cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])
    assert limits.cycle_violations() == []


def test_a_cycle_is_found_when_there_is_one() -> None:
    assert limits.find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert limits.find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_wire_protocol_and_the_router_are_pure() -> None:
    """``_protocol.py`` and ``_router.py`` touch no socket, thread, poller or C memory: they
    take bytes and frames, and give frames and decisions (the large-bytes receive, which
    needs ``ctypes``, lives in ``_bigbytes.py``)."""
    assert limits.purity_violations() == [], [v.render() for v in limits.purity_violations()]


# The router's parts and the policies the hub carries out are pure like the router itself.
PURE_PARTS = ("_routing", "_router_requests", "_router_messages", "_router_view", "_pending",
              "_backpressure", "_handshake", "_router_readiness", "_router_groups", "_groups",
              "_router_peers", "_router_services", "_router_special", "_arrays",
              "_router_relink")


def test_the_routers_parts_and_the_hubs_policies_are_pure() -> None:
    for name in PURE_PARTS:
        path = limits.PACKAGE / f"{name}.py"
        assert limits.impure_imports(path, ast.parse(path.read_text())) == [], name


def test_pure_modules_reach_nothing_impure_through_the_package() -> None:
    """Purity holds through the package's own imports too: a pure module never reaches a
    socket, a thread or ``ctypes`` through another module of the package."""
    graph = limits.import_graph()
    pure = set(limits.PURE_MODULES) | set(PURE_PARTS)
    allowed = pure | {"errors", "_types"}
    for name in sorted(pure):
        assert set(graph[name]) <= allowed, (name, set(graph[name]) - allowed)


def test_the_hub_the_router_and_the_protocol_keep_the_size_limits() -> None:
    """The modules of the hub, the router and the wire format (the whole package is checked
    by ``.ci/limits.py``)."""
    names = ("_protocol", "_decoder", "_bigbytes", "_transport", "_router", "_routing",
             "_router_requests", "_router_messages", "_router_view", "_backpressure",
             "_handshake", "_outqueue", "_hub", "_hub_accept", "_hub_auth", "_hub_endpoint",
             "_hub_flow", "_hub_options", "broker", "bridge", "spy", "traffic",
             "_router_readiness")
    found = []
    for name in names:
        path = limits.PACKAGE / f"{name}.py"
        text = path.read_text()
        found += limits.size_violations(path, text, ast.parse(text))
    assert found == [], [v.render() for v in found]
