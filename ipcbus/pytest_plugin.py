"""pytest fixtures for testing code that uses ipcbus (opt-in).

Enable them in a ``conftest.py``::

    pytest_plugins = ["ipcbus.pytest_plugin"]

or for one run with ``pytest -p ipcbus.pytest_plugin``. Then::

    def test_add(ipcbus_broker, ipcbus_client):
        ipcbus_client.on("add", lambda event, a, b: event.request.resolve(a + b))
        assert ipcbus_client.request("add", 2.0, 2, 3).payload == 5

Fixtures (function scope):

* ``ipcbus_broker``: a running :class:`~ipcbus.IpcBusBroker` on a temporary socket path,
  stopped after the test (see :func:`ipcbus.testing.running_broker`);
* ``ipcbus_address``: that broker's address, for clients and for child processes;
* ``ipcbus_client``: a client connected to it, closed after the test.

It is not registered as an automatic ``pytest11`` plugin on purpose: installing ipcbus should
not load code (or claim fixture names) in every pytest session of the machine.
"""
from __future__ import annotations

from typing import Any, Iterator

import pytest

from .broker import IpcBusBroker
from .client import IpcBusClient
from .testing import running_broker


@pytest.fixture
def ipcbus_broker() -> Iterator[IpcBusBroker]:
    """A broker child on a fresh temporary Unix socket, stopped at the end of the test."""
    with running_broker() as broker:
        yield broker


@pytest.fixture
def ipcbus_address(ipcbus_broker: IpcBusBroker) -> Any:
    """The address of ``ipcbus_broker`` (a Unix socket path)."""
    return ipcbus_broker.address


@pytest.fixture
def ipcbus_client(ipcbus_address: Any) -> Iterator[IpcBusClient]:
    """A client connected to ``ipcbus_broker``, closed at the end of the test."""
    client = IpcBusClient.create().connect(ipcbus_address, peer_name="ipcbus-test")
    try:
        yield client
    finally:
        client.close()
