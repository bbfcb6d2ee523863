"""The per-process connection table (``ipcbus._registry``): sharing, replacing a dead
connection, discarding only one's own entry, and what a forked child inherits (a real
``os.fork()``, bounded)."""
from __future__ import annotations

import gc
import os
import signal
import threading
import time

import pytest

from ipcbus._registry import ConnectionRegistry


class FakeConnection:
    def __init__(self, name: str) -> None:
        self.name = name
        self.closed = False
        self.forked = 0

    def after_fork_in_child(self) -> None:
        self.forked += 1


def test_open_makes_one_connection_per_key_and_shares_it() -> None:
    registry: ConnectionRegistry[str, FakeConnection] = ConnectionRegistry()
    made: list[str] = []

    def make(name: str) -> FakeConnection:
        made.append(name)
        return FakeConnection(name)

    a = registry.open("a", lambda: make("a1"))
    assert registry.open("a", lambda: make("a2")) is a
    b = registry.open("b", lambda: make("b1"))
    assert made == ["a1", "b1"]
    assert registry.items() == [("a", a), ("b", b)]
    assert len(registry) == 2 and "a" in registry and "c" not in registry


def test_a_closed_connection_is_replaced() -> None:
    registry: ConnectionRegistry[str, FakeConnection] = ConnectionRegistry()
    old = registry.open("k", lambda: FakeConnection("old"))
    old.closed = True
    new = registry.open("k", lambda: FakeConnection("new"))
    assert new is not old and registry.get("k") is new


def test_discard_removes_only_the_connection_still_stored() -> None:
    registry: ConnectionRegistry[str, FakeConnection] = ConnectionRegistry()
    old = registry.open("k", lambda: FakeConnection("old"))
    old.closed = True
    new = registry.open("k", lambda: FakeConnection("new"))
    assert registry.discard("k", old) is False  # the old one ending late leaves the new one
    assert registry.get("k") is new
    assert registry.discard("k", new) is True
    assert registry.get("k") is None and len(registry) == 0


def test_a_failing_make_stores_nothing_and_keeps_the_lock_free() -> None:
    registry: ConnectionRegistry[str, FakeConnection] = ConnectionRegistry()

    def fail() -> FakeConnection:
        raise ConnectionRefusedError("no broker")

    with pytest.raises(ConnectionRefusedError):
        registry.open("k", fail)
    assert "k" not in registry
    assert registry.open("k", lambda: FakeConnection("k")).name == "k"


def test_threads_connecting_at_once_share_one_connection() -> None:
    registry: ConnectionRegistry[str, FakeConnection] = ConnectionRegistry()
    made: list[FakeConnection] = []
    got: list[FakeConnection] = []
    start = threading.Barrier(8)

    def make() -> FakeConnection:
        time.sleep(0.01)  # widen the window a second maker would fall in
        made.append(FakeConnection("k"))
        return made[-1]

    def connect() -> None:
        start.wait(5)
        got.append(registry.open("k", make))

    threads = [threading.Thread(target=connect) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(made) == 1 and got == made * 8


def test_after_fork_in_child_tells_every_connection_and_empties_the_table() -> None:
    registry: ConnectionRegistry[str, FakeConnection] = ConnectionRegistry()
    a = registry.open("a", lambda: FakeConnection("a"))
    b = registry.open("b", lambda: FakeConnection("b"))
    registry.after_fork_in_child()  # what the hook runs in a child, called here directly
    assert (a.forked, b.forked) == (1, 1)
    assert len(registry) == 0
    assert registry.open("a", lambda: FakeConnection("a2")) is not a


def test_a_failing_fork_hook_does_not_spare_the_other_connections() -> None:
    class Broken(FakeConnection):
        def after_fork_in_child(self) -> None:
            raise RuntimeError("bug")

    registry: ConnectionRegistry[str, FakeConnection] = ConnectionRegistry()
    registry.open("broken", lambda: Broken("broken"))
    good = registry.open("good", lambda: FakeConnection("good"))
    registry.after_fork_in_child()
    assert good.forked == 1 and len(registry) == 0


def _wait_child(pid: int, timeout: float) -> int:
    """The exit status of child ``pid`` (-1 if it had to be killed at ``timeout``)."""
    assert pid > 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return -1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_gets_a_fresh_table_even_if_the_lock_was_held() -> None:
    """A real fork while this thread holds the registry's lock (as a connect() in progress
    would): in the child the hook has run, so the lock is free, the inherited connection was
    told and the child opens its own. The child reports by its exit code; a child stuck on
    the inherited lock is killed after 10 s and fails the test."""
    registry: ConnectionRegistry[str, FakeConnection] = ConnectionRegistry()
    inherited = registry.open("k", lambda: FakeConnection("parent's"))
    with registry._lock:
        pid = os.fork()
        if pid == 0:  # the child: only plain code, then _exit
            code = 10
            try:
                if inherited.forked == 1 and len(registry) == 0:
                    code = 11
                    mine = registry.open("k", lambda: FakeConnection("child's"))
                    if mine is not inherited and registry.get("k") is mine:
                        code = 0
            finally:
                os._exit(code)
    assert _wait_child(pid, 10.0) == 0
    assert inherited.forked == 0 and registry.get("k") is inherited  # the parent's untouched


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_the_fork_hook_does_not_keep_a_registry_alive() -> None:
    registry: ConnectionRegistry[str, FakeConnection] = ConnectionRegistry()
    conn = registry.open("k", lambda: FakeConnection("k"))
    del registry
    gc.collect()
    pid = os.fork()
    if pid == 0:
        os._exit(0 if conn.forked == 0 else 1)  # the dead registry's hook did nothing
    assert _wait_child(pid, 10.0) == 0
