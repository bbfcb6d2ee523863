"""Shared fixtures: short socket paths, a broker per test, every start method, clients and
children closed at the end.

The broker and socket-path fixtures are those of the public testing kit (``ipcbus.testing``,
``ipcbus.pytest_plugin``), so the kit is exercised by the whole suite. What tests import
(``Collector``, ``sync``, ``wait_until``, ``Children``...) is in ``tests/helpers/``.
"""
from __future__ import annotations

import multiprocessing
from typing import Any, Callable, Iterator

import pytest

from ipcbus import IpcBusBroker, IpcBusClient
from ipcbus.testing import running_broker, temporary_socket_path

from helpers.processes import Children, Reports

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


@pytest.fixture
def children(ctx: Any) -> Iterator[Children]:
    kids = Children(ctx)
    try:
        yield kids
    finally:
        kids.close()


@pytest.fixture
def reporters(ctx: Any, children: Children) -> tuple[Children, Reports, Any]:
    """Children that report on a queue: (the children, a bounded reader of the queue, the
    queue to hand to them)."""
    q = ctx.Queue()
    return children, Reports(q), q
