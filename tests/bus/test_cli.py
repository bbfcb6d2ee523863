"""The command line as a user meets it, run in subprocesses: one-line errors with exit status 1
(2 for usage), tracebacks only with --debug, keys for TCP from the environment, and the verbs
that poke a bus (send, request, call)."""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
from typing import Any, Iterator

import pytest

from ipcbus import (IpcBusBridge, IpcBusBroker, IpcBusClient, IpcBusConnectionError, IpcBusService,
                    IpcBusEvent)
from ipcbus._cli import parse_value, to_json
from ipcbus._transport import default_authkey

from helpers import Collector, sync, wait_until

KEY_ENV = "IPCBUS_AUTHKEY"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != KEY_ENV}
    env.update(extra)
    return env


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m ipcbus ARGS`` with ``env`` added (and no IPCBUS_AUTHKEY of ours)."""
    return subprocess.run([sys.executable, "-m", "ipcbus", *args], capture_output=True,
                          text=True, timeout=30, env=_env(**(env or {})))


def one_error_line(out: subprocess.CompletedProcess[str]) -> str:
    """The run failed with status 1 and said why in exactly one line, without a traceback."""
    assert out.returncode == 1, (out.returncode, out.stdout, out.stderr)
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("ipcbus: error: "), out.stderr
    return lines[0][len("ipcbus: error: "):]


@pytest.fixture
def tcp_broker() -> Iterator[IpcBusBroker]:
    with IpcBusBroker.create().connect(port=0, authkey=b"right key") as broker:
        yield broker


def _port(broker: IpcBusBroker) -> str:
    address = broker.address
    assert isinstance(address, tuple)
    return f"127.0.0.1:{address[1]}"


# -- help and usage --------------------------------------------------------------------------------
def test_help_is_plain_text_with_units_and_defaults() -> None:
    out = cli("--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: ipcbus ")
    assert "``" not in out.stdout and ":class:" not in out.stdout
    for verb in ("broker", "demo", "state", "spy", "send", "request", "call"):
        assert verb in out.stdout
    assert KEY_ENV in out.stdout and "--authkey-env" in out.stdout
    broker_help = cli("broker", "--help").stdout
    assert "usage: ipcbus broker" in broker_help
    for option, words in {"--max-message": ("bytes", "134217728"),
                          "--queue-limit": ("bytes", "67108864"),
                          "--slow-consumer-timeout": ("seconds", "10.0")}.items():
        assert option in broker_help and all(w in broker_help for w in words), option
    request_help = cli("request", "--help").stdout
    assert "seconds" in request_help and "default: 5.0" in request_help
    assert "JSON" in request_help


def test_usage_error_is_status_2() -> None:
    out = cli("state")
    assert out.returncode == 2
    assert "usage: ipcbus state" in out.stderr and "Traceback" not in out.stderr
    assert cli("nonsense").returncode == 2


# -- one-line errors ------------------------------------------------------------------------------
def test_missing_socket_is_one_line(sock_path: str) -> None:
    line = one_error_line(cli("state", sock_path, "--timeout", "1"))
    assert line.startswith(f"cannot connect to the bus at {sock_path}")
    assert "No such file" in line


def test_debug_shows_the_traceback(sock_path: str) -> None:
    out = cli("--debug", "state", sock_path, "--timeout", "1")
    assert out.returncode == 1
    assert "Traceback" in out.stderr and "IpcBusConnectionError" in out.stderr
    out = cli("state", sock_path, "--timeout", "1", "--debug")  # after the verb too
    assert out.returncode == 1 and "Traceback" in out.stderr


def test_path_too_long_says_what_the_api_says() -> None:
    path = "/tmp/" + "x" * 120
    with pytest.raises(ValueError) as api:
        IpcBusClient.create().connect(path)
    assert one_error_line(cli("broker", path)) == str(api.value)
    assert one_error_line(cli("state", path)) == str(api.value)


def test_path_in_use_is_one_line(broker: IpcBusBroker, sock_path: str) -> None:
    line = one_error_line(cli("broker", sock_path))
    assert line == f"a bus is already listening on {sock_path!r}"


def test_failed_authentication_is_one_line(tcp_broker: IpcBusBroker) -> None:
    line = one_error_line(cli("state", _port(tcp_broker), env={KEY_ENV: "wrong key"}))
    assert "authentication" in line and "authkey" in line


def test_tcp_broker_without_a_key_refuses_to_start() -> None:
    line = one_error_line(cli("broker", "0"))
    assert KEY_ENV in line and "--authkey-env" in line


def test_authkey_env_names_a_variable(tcp_broker: IpcBusBroker) -> None:
    out = cli("state", _port(tcp_broker), "--authkey-env", "MY_KEY", "--json",
              env={"MY_KEY": "right key"})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["peers"] == []
    line = one_error_line(cli("state", _port(tcp_broker), "--authkey-env", "NOT_SET_ANYWHERE"))
    assert "NOT_SET_ANYWHERE" in line and "not set" in line


# -- IPCBUS_AUTHKEY is the default key of every TCP connect ------------------------------------------
def test_ipcbus_authkey_is_read_by_state(tcp_broker: IpcBusBroker) -> None:
    out = cli("state", _port(tcp_broker), env={KEY_ENV: "right key"})
    assert out.returncode == 0, out.stderr
    assert "bus at" in out.stdout


def test_ipcbus_authkey_default_of_the_api(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "shared secret")
    assert default_authkey() == b"shared secret"
    with IpcBusBroker.create().connect(port=0) as broker:  # the broker takes it too
        with IpcBusClient.create().connect(broker.address) as client:
            assert client.request("/ipcbus/queryState", 5.0).payload["pid"] > 0
        with pytest.raises(IpcBusConnectionError, match="authentication"):
            IpcBusClient.create().connect(broker.address, authkey=b"another key")
        with IpcBusBridge.create().connect(broker.address):  # and a bridge's link
            with IpcBusClient.create().connect() as local:
                assert local.request("/ipcbus/queryState", 5.0).payload["pid"] == \
                    broker.process.pid
    monkeypatch.setenv(KEY_ENV, "")  # empty: as if unset
    assert default_authkey() == bytes(multiprocessing.current_process().authkey)


@pytest.mark.timeout(60)
def test_standalone_tcp_broker_joined_with_the_environment_key() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "ipcbus", "broker", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(**{KEY_ENV: "k1"}))
    try:
        assert proc.stdout is not None
        banner = proc.stdout.readline()
        assert "listening on 127.0.0.1:" in banner, banner
        port = banner.split("listening on ")[1].split()[0]
        out = cli("state", port, "--json", env={KEY_ENV: "k1"})
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["pid"] == proc.pid
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(10)
    assert proc.returncode == 0


# -- verbs ------------------------------------------------------------------------------------------
def test_parse_value() -> None:
    assert parse_value("42") == 42 and parse_value('"42"') == "42"
    assert parse_value("hello") == "hello" and parse_value("[1, 2]") == [1, 2]
    assert parse_value('{"n": 1}') == {"n": 1} and parse_value("null") is None
    assert to_json({"b": b"\x00\xff", 1: [b""]}) == '{"b": {"$bytes": "AP8="}, "1": [{"$bytes": ""}]}'


def test_send(broker: IpcBusBroker, clients: Any) -> None:
    listener = clients(broker.address)
    got = Collector()
    listener.on("greeting", got)
    sync(listener)
    out = cli("send", str(broker.address), "greeting", "hello", "42", '{"n": 1}', '"42"')
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""
    (event, args), = got.wait(1)
    assert args == ("hello", 42, {"n": 1}, "42")
    assert event.sender.name == "ipcbus-send"
    out = cli("send", str(broker.address), "greeting", "x", "--json")
    assert json.loads(out.stdout) == {"channel": "greeting", "args": ["x"]}


def test_request(broker: IpcBusBroker, clients: Any) -> None:
    responder = clients(broker.address, peer_name="adder")
    responder.on("add", lambda event, a, b: event.request.resolve(a + b))
    responder.on("echo", lambda event, *args: event.request.resolve(args[0] if args else None))
    sync(responder)
    out = cli("request", str(broker.address), "add", "2", "3")
    assert (out.returncode, out.stdout) == (0, "5\n"), out.stderr
    out = cli("request", str(broker.address), "echo", "plain text")
    assert out.stdout == "plain text\n"
    out = cli("request", str(broker.address), "echo", '{"a": [1, 2]}', "--json")
    answer = json.loads(out.stdout)
    assert answer["payload"] == {"a": [1, 2]} and answer["sender"]["name"] == "adder"
    line = one_error_line(cli("request", str(broker.address), "nobody", "--timeout", "1"))
    assert line == "request on 'nobody' failed: no listener for 'nobody' on the bus"


def test_request_timeout_is_one_line(broker: IpcBusBroker, clients: Any) -> None:
    silent = clients(broker.address)
    silent.on("silent", lambda event: None)
    sync(silent)
    line = one_error_line(cli("request", str(broker.address), "silent", "--timeout", "0.3"))
    assert line.startswith("request on 'silent' failed:") and "timed out" in line


@pytest.mark.timeout(60)
def test_ctrl_c_is_status_130_without_a_traceback(broker: IpcBusBroker, clients: Any) -> None:
    silent = clients(broker.address)
    silent.on("silent", lambda event: None)
    sync(silent)
    proc = subprocess.Popen([sys.executable, "-m", "ipcbus", "request", str(broker.address),
                             "silent", "--timeout", "-1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())
    try:  # interrupt it while it waits for the answer
        wait_until(lambda: broker.query_state()["pending_requests"] == 1, timeout=20)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert proc.returncode == 130
    assert err == ""


class Calculator:
    def add(self, a: int, b: int) -> int:
        return a + b

    def div(self, a: int, b: int) -> float:
        return a / b


def test_call(broker: IpcBusBroker, clients: Any) -> None:
    host = clients(broker.address, peer_name="host")
    service = IpcBusService.create(host, "calc", Calculator()).start()
    try:
        out = cli("call", str(broker.address), "calc", "add", "2", "3")
        assert (out.returncode, out.stdout) == (0, "5\n"), out.stderr
        out = cli("call", str(broker.address), "calc", "div", "1", "4", "--json")
        assert json.loads(out.stdout) == {"service": "calc", "method": "div", "result": 0.25}
        line = one_error_line(cli("call", str(broker.address), "calc", "div", "1", "0"))
        assert line.startswith("calc.div() failed:") and "ZeroDivisionError" in line
        line = one_error_line(cli("call", str(broker.address), "nothing", "x", "--timeout", "1"))
        assert line == "no service 'nothing' is started on the bus"
    finally:
        service.stop()


def test_cli_event_sender_is_typed(broker: IpcBusBroker, clients: Any) -> None:
    """The peers the CLI makes are ordinary socket peers with its own pid, and they leave."""
    watcher = clients(broker.address)
    got = Collector()
    watcher.on("who", got)
    sync(watcher)
    cli("send", str(broker.address), "who")
    event: IpcBusEvent = got.wait(1)[0][0]
    assert event.sender is not None and event.sender.process.type == "socket"
    state = watcher.request("/ipcbus/queryState", 5.0).payload
    assert [p["name"] for p in state["peers"]] == [watcher.peer.name]
