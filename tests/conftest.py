"""Shared fixtures: short socket paths, a broker per test, every start method, bounded waits.

The broker and socket-path fixtures are those of the public testing kit (``ipcbus.testing``,
``ipcbus.pytest_plugin``), so the kit is exercised by the whole suite.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import threading
import time
from typing import Any, Callable, Iterator

import pytest

from ipcbus import IpcBusBroker, IpcBusClient
from ipcbus.testing import running_broker, temporary_socket_path

pytest_plugins = ["ipcbus.pytest_plugin"]

# forkserver is the default start method on Linux from Python 3.14: process tests run under it too
START_METHODS = ["spawn", "fork", "forkserver"]


@pytest.fixture
def sock_path() -> Iterator[str]:
    """A short Unix socket path (the limit is ~107 bytes) in a private temp dir."""
    with temporary_socket_path() as path:
        yield path


@pytest.fixture
def broker(sock_path: str) -> Iterator[IpcBusBroker]:
    with running_broker(sock_path) as b:
        yield b


@pytest.fixture(params=START_METHODS)
def ctx(request: pytest.FixtureRequest) -> Any:
    """A multiprocessing context, once per start method (spawn, fork and forkserver)."""
    return multiprocessing.get_context(request.param)


@pytest.fixture
def clients() -> Iterator[Callable[..., IpcBusClient]]:
    """Factory of connected clients that are all closed at the end of the test."""
    made: list[IpcBusClient] = []

    def make(address: Any, **kw: Any) -> IpcBusClient:
        c = IpcBusClient.create().connect(address, **kw)
        made.append(c)
        return c

    try:
        yield make
    finally:
        for c in reversed(made):
            c.close()


def sync(client: IpcBusClient) -> None:
    """Round trip to the broker: every frame this client sent before has been routed."""
    client.request("/ipcbus/queryState", 5.0)


def wait_until(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.01) -> Any:
    """Poll ``predicate`` until it is truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


class Collector:
    """A listener that records (event, args) and lets a test wait for a count."""

    def __init__(self) -> None:
        self.items: list[tuple[Any, tuple[Any, ...]]] = []
        self._cond = threading.Condition()

    def __call__(self, event: Any, *args: Any) -> None:
        with self._cond:
            self.items.append((event, args))
            self._cond.notify_all()

    @property
    def args(self) -> list[tuple[Any, ...]]:
        with self._cond:
            return [a for _, a in self.items]

    def wait(self, count: int = 1, timeout: float = 5.0) -> list[tuple[Any, tuple[Any, ...]]]:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.items) >= count, timeout):
                raise AssertionError(f"got {len(self.items)} of {count} messages in {timeout} s")
            return list(self.items)


class Children:
    """Start module-level targets in ``ctx``; always stop, join (bounded) and kill them.

    ``self.stop`` is the read end of a pipe the children may wait on; ``close()`` writes to it.
    A pipe, not an Event: setting an Event that a SIGKILLed child was waiting on blocks.
    """

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.stop, self._stop_w = ctx.Pipe(duplex=False)
        self.procs: list[Any] = []

    def start(self, target: Any, *args: Any) -> Any:
        p = self.ctx.Process(target=target, args=args, daemon=True)
        p.start()
        self.procs.append(p)
        return p

    def close(self) -> None:
        self._stop_w.send_bytes(b"stop")  # readable for every child; nobody consumes it
        for p in self.procs:
            p.join(5)
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(2)


@pytest.fixture
def children(ctx: Any) -> Iterator[Children]:
    kids = Children(ctx)
    try:
        yield kids
    finally:
        kids.close()


@contextlib.contextmanager
def elapsed() -> Iterator[list[float]]:
    """``with elapsed() as t:`` ... then ``t[0]`` is the duration of the block."""
    out: list[float] = []
    t0 = time.monotonic()
    try:
        yield out
    finally:
        out.append(time.monotonic() - t0)


@contextlib.contextmanager
def running(procs: list[Any]) -> Iterator[list[Any]]:
    """Start processes; at the end join them (bounded) and kill what is left."""
    for p in procs:
        p.start()
    try:
        yield procs
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)


def pid_of(proc: Any) -> int:
    """The pid of a started process (``Process.pid`` is typed Optional: None before start,
    which must never reach ``os.kill``, where -1 or 0 would signal many processes)."""
    pid = proc.pid
    assert isinstance(pid, int) and pid > 0, f"{proc!r} has not started"
    return pid

