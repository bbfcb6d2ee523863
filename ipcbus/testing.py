"""Helpers for testing code that uses ipcbus: a broker on a temporary socket, cleaned up.

No pytest needed for these context managers::

    from ipcbus import IpcBusClient
    from ipcbus.testing import running_broker

    with running_broker() as broker:              # a broker child on a fresh short path
        client = IpcBusClient.create().connect(broker.address)
        ...
    # the broker is stopped and its directory removed, even if the block raised

With pytest, enable the fixtures of :mod:`ipcbus.pytest_plugin` (``ipcbus_broker``,
``ipcbus_address``, ``ipcbus_client``) by adding ``pytest_plugins = ["ipcbus.pytest_plugin"]``
to a ``conftest.py`` (or ``-p ipcbus.pytest_plugin`` on the command line).

Why a temporary *directory*: a Unix socket path is limited to 107 bytes, so the socket goes in
a fresh directory directly under the system's temp dir (``/tmp`` when ``$TMPDIR`` is too long,
as it is on macOS), owner-only, removed with everything in it at the end.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Any, Iterator

from .broker import IpcBusBroker

__all__ = ["running_broker", "temporary_socket_path"]

_MAX_DIR = 80  # leaves room for the socket's name under the 107-byte limit


def _short_tempdir() -> str | None:
    base = tempfile.gettempdir()
    if len(os.fsencode(base)) <= _MAX_DIR:
        return None  # mkdtemp's own default
    return "/tmp" if os.path.isdir("/tmp") else None


@contextlib.contextmanager
def temporary_socket_path(name: str = "bus") -> Iterator[str]:
    """A Unix socket path ``<fresh private dir>/<name>`` that is short enough to bind; the
    directory and whatever was created in it are removed when the block ends."""
    folder = tempfile.mkdtemp(prefix="ipcbus-", dir=_short_tempdir())
    try:
        yield os.path.join(folder, name)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def running_broker(address: Any = None, **options: Any) -> Iterator[IpcBusBroker]:
    """Run an :class:`~ipcbus.IpcBusBroker` child for the duration of the block.

    ``address`` is where it listens (any ``IpcBusBroker.connect`` address; default: a fresh
    :func:`temporary_socket_path`); ``options`` go to ``IpcBusBroker.create`` (e.g.
    ``queue_limit=1 << 20``). ``broker.address`` is the address to connect clients to. At the
    end the broker process is stopped (its clients see the bus close) and the temporary
    directory removed.
    """
    with contextlib.ExitStack() as stack:
        if address is None:
            address = stack.enter_context(temporary_socket_path())
        broker = IpcBusBroker.create(**options).connect(address)
        stack.callback(broker.close)
        yield broker
