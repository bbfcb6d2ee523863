"""The testing kit: ipcbus.testing's context managers and the ipcbus.pytest_plugin fixtures."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap
import threading

import pytest

from ipcbus import IpcBusBroker, IpcBusClient, IpcBusConnectionError
from ipcbus.testing import running_broker, temporary_socket_path


def test_temporary_socket_path_is_short_and_removed() -> None:
    with temporary_socket_path("app.bus") as path:
        folder = os.path.dirname(path)
        assert os.path.basename(path) == "app.bus"
        assert len(os.fsencode(path)) <= 107
        assert os.path.isdir(folder) and not os.path.exists(path)
        pathlib.Path(folder, "left-behind").write_text("x")
    assert not os.path.exists(folder)


def test_running_broker_stops_and_cleans_up_even_on_error() -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with running_broker() as broker:
            assert isinstance(broker.address, str)
            address: str = broker.address
            client = IpcBusClient.create().connect(address)
            closed = threading.Event()
            client.on_closed(closed.set)
            process = broker.process
            raise RuntimeError("boom")
    assert not process.is_alive()
    assert closed.wait(5), "the client did not notice the broker stop"
    assert not os.path.exists(os.path.dirname(address))
    with pytest.raises(IpcBusConnectionError):
        client.send("anything")
    client.close()


def test_running_broker_takes_options_and_an_address(sock_path: str) -> None:
    with running_broker(sock_path, max_message=1 << 20) as broker:
        assert broker.address == sock_path
        with IpcBusClient.create().connect(sock_path) as client:
            with pytest.raises(ValueError):
                client.send("big", b"x" * (2 << 20))
    assert not os.path.exists(sock_path)


def test_plugin_fixtures(ipcbus_broker: IpcBusBroker, ipcbus_address: str,
                         ipcbus_client: IpcBusClient) -> None:
    assert ipcbus_address == ipcbus_broker.address
    ipcbus_client.on("add", lambda event, a, b: event.request.resolve(a + b))
    assert ipcbus_client.request("add", 2.0, 2, 3).payload == 5


@pytest.mark.timeout(60)
def test_plugin_enabled_by_a_users_conftest(tmp_path: pathlib.Path) -> None:
    """What a user does: a conftest naming the plugin, a test using its fixtures."""
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["ipcbus.pytest_plugin"]\n')
    (tmp_path / "test_user.py").write_text(textwrap.dedent("""
        def test_add(ipcbus_client):
            ipcbus_client.on("add", lambda event, a, b: event.request.resolve(a + b))
            assert ipcbus_client.request("add", 2.0, 2, 3).payload == 5
    """))
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          str(tmp_path)], capture_output=True, text=True, timeout=50,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 passed" in out.stdout
