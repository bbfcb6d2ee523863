"""The broker's lifecycle, its control pipe, the foreground CLI broker and address syntax."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from ipcbus import (IpcBusBroker, IpcBusClient, IpcBusConnectionError, IpcBusRequestError)
from ipcbus import _transport as T

from helpers import Collector, sync, wait_until


@pytest.mark.timeout(30)
def test_connect_query_state_and_close(sock_path: str) -> None:
    broker = IpcBusBroker.create().connect(sock_path)
    assert broker.address == sock_path and broker.process.is_alive()
    assert oct(os.stat(sock_path).st_mode & 0o777) == "0o600"
    client = IpcBusClient.create().connect(sock_path, peer_name="one")
    client.on("a", lambda *_: None).on("b", lambda *_: None).on("b", lambda *_: None)
    sync(client)
    state = broker.query_state()
    assert state["pid"] == broker.process.pid
    (peer,) = state["peers"]
    assert peer["name"] == "one" and peer["id"] == client.peer.id and peer["pid"] == os.getpid()
    assert peer["type"] == "socket" and set(peer["channels"]) == {"a", "b"}
    assert state["channels"] == {"a": 1, "b": 1}
    assert broker.is_service_available("clock") is False
    # the same state through the bus
    assert client.request("/ipcbus/queryState", 2.0).payload["channels"] == {"a": 1, "b": 1}
    assert client.request("/ipcbus/serviceAvailable", 2.0, "clock").payload is False
    with pytest.raises(IpcBusRequestError):
        client.request("/ipcbus/serviceAvailable", 2.0)  # no name
    client.close()
    wait_until(lambda: broker.query_state()["peers"] == [])
    process = broker.process
    broker.close()
    broker.close()  # idempotent
    assert not process.is_alive() and not os.path.exists(sock_path)
    with pytest.raises(IpcBusConnectionError):
        broker.query_state()


@pytest.mark.timeout(30)
def test_context_manager_and_clients_notice_close(sock_path: str) -> None:
    closed = Collector()
    with IpcBusBroker.create().connect(sock_path) as broker:
        client = IpcBusClient.create().connect(broker.address)
        client.on_closed(lambda: closed(None))
    closed.wait(1, timeout=2)
    with pytest.raises(IpcBusConnectionError):
        client.send("x")


@pytest.mark.timeout(30)
def test_broker_child_ignores_ctrl_c(broker: IpcBusBroker, clients: Any) -> None:
    client = clients(broker.address)
    os.kill(broker.process.pid, signal.SIGINT)
    sync(client)  # still answering
    assert broker.process.is_alive()


@pytest.mark.timeout(30)
def test_start_failure_is_reported(tmp_path: Any) -> None:
    missing = str(tmp_path / "no-such-dir" / "bus")
    with pytest.raises(IpcBusConnectionError, match="cannot listen"):
        IpcBusBroker.create().connect(missing)


def test_bad_options_and_arguments() -> None:
    with pytest.raises(ValueError):
        IpcBusBroker.create(max_message=0)
    with pytest.raises(ValueError):
        IpcBusBroker.create(max_fds=254)
    with pytest.raises(TypeError):
        IpcBusBroker.create().connect(3.5)
    with pytest.raises(ValueError):
        IpcBusBroker.create().connect("/tmp/" + "x" * 200)
    with pytest.raises(TypeError):
        IpcBusClient.create().connect("/tmp/x", peer_name=5)  # type: ignore[arg-type]


def test_address_syntax(monkeypatch: pytest.MonkeyPatch) -> None:
    assert T.parse_address("/tmp/bus") == "/tmp/bus"
    assert T.parse_address(5000) == ("127.0.0.1", 5000)
    assert T.parse_address(("localhost", 1)) == ("localhost", 1)
    assert T.parse_address(path="/tmp/p") == "/tmp/p"
    assert T.parse_address(port=7, host="::1") == ("::1", 7)
    with pytest.raises(ValueError):
        T.parse_address("/tmp/a", port=1)
    with pytest.raises(ValueError):
        T.parse_address(70000)
    with pytest.raises(TypeError):
        T.parse_address(True)
    monkeypatch.delenv("IPCBUS_ADDRESS", raising=False)
    with pytest.raises(IpcBusConnectionError, match="IPCBUS_ADDRESS"):
        T.parse_address(None)
    for text, expected in [("/run/app.bus", "/run/app.bus"), ("6000", ("127.0.0.1", 6000)),
                           ("example:6001", ("example", 6001)), ("[::1]:6002", ("::1", 6002))]:
        monkeypatch.setenv("IPCBUS_ADDRESS", text)
        assert T.parse_address(None) == expected


@pytest.mark.timeout(30)
def test_client_uses_ipcbus_address(broker: IpcBusBroker, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IPCBUS_ADDRESS", str(broker.address))
    with IpcBusClient.create().connect() as client:
        assert client.request("/ipcbus/queryState", 2.0).payload["pid"] == broker.process.pid


@pytest.mark.timeout(30)
def test_cli_broker_in_the_foreground(sock_path: str) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "ipcbus", "broker", sock_path],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening on" in line and sock_path in line
        with IpcBusClient.create().connect(sock_path) as client:
            got = Collector()
            client.on("echo", got)
            sync(client)
            client.send("echo", "hi")
            assert got.wait(1)[0][1] == ("hi",)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
        assert not os.path.exists(sock_path)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(60)
def test_demo_runs() -> None:
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "ipcbus", "demo"], capture_output=True,
                         text=True, timeout=50)
    assert out.returncode == 0, out.stderr
    assert "demo finished" in out.stdout and "timed out" in out.stdout
    assert out.stdout.count("broadcast reply") == 3
    assert time.monotonic() - started < 50
