"""The package's shape: no import cycle between its modules, counting every import (at the top,
in a function, under ``TYPE_CHECKING``), so that the file list reads as layers; the wire
protocol and the router pure.

The rules live in ``.ci/limits.py`` with the size limits (``.ci/run`` runs all of them); these
tests run its import rules on the package, and ``test_limits.py`` tests the script itself.
"""
from __future__ import annotations

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
