"""What hostile peers (``_rawpeer.RawPeer``) attack in tests: a ``Target`` is a broker or a
bridge under attack, with a ``Canary`` client that must be served throughout (the
``make_target`` fixture makes either)."""
from __future__ import annotations

import logging
import os
import re
import socket
from typing import Any, Callable, Iterator

import pytest

from ipcbus import IpcBusBridge, IpcBusBroker, IpcBusClient


from helpers.rawpeer import RawPeer
from helpers import sync, wait_until

# =============================================================================================
# the thing under attack: a broker (its log on stderr, captured by capfd) or a bridge (its
# log in this process, captured by caplog), with a canary client that must be served on
# =============================================================================================
DROP_LINE = re.compile(r"(dropping #\d+ .*|refused a .*)")


class Target:
    kind = ""

    def raw(self) -> RawPeer:
        raise NotImplementedError

    def address(self) -> Any:
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        raise NotImplementedError

    def log(self) -> str:
        raise NotImplementedError

    def alive(self) -> bool:
        raise NotImplementedError

    def pid(self) -> int:
        """The process that holds the hub (to count its descriptors, its memory)."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def drops(self) -> list[str]:
        """The warning lines that say a connection was dropped or refused, so far."""
        return DROP_LINE.findall(self.log())


class BrokerTarget(Target):
    kind = "broker"

    def __init__(self, path: str, capfd: Any, **options: Any) -> None:
        self.capfd = capfd
        self._err = ""
        self.broker = IpcBusBroker.create(**options).connect(path)  # stderr: capfd's file

    def raw(self) -> RawPeer:
        assert isinstance(self.broker.address, str)
        return RawPeer.unix(self.broker.address)

    def address(self) -> Any:
        return self.broker.address

    def state(self) -> dict[str, Any]:
        return self.broker.query_state(5.0)

    def log(self) -> str:
        self._err += self.capfd.readouterr().err
        return self._err

    def alive(self) -> bool:
        return bool(self.broker.process.is_alive())

    def pid(self) -> int:
        return int(self.broker.process.pid)

    def close(self) -> None:
        self.broker.close()


class BridgeTarget(Target):
    kind = "bridge"

    def __init__(self, caplog: Any, **options: Any) -> None:
        self.caplog = caplog
        caplog.set_level(logging.WARNING, logger="ipcbus")
        self.bridge = IpcBusBridge.create(**options).connect()

    def raw(self) -> RawPeer:
        conn = self.bridge.open_pipe()
        sock = socket.socket(fileno=os.dup(conn.fileno()))
        conn.close()
        return RawPeer(sock, "pipe")

    def address(self) -> Any:
        return None  # clients of this process join the bridge with no address

    def state(self) -> dict[str, Any]:
        return self.bridge.query_state(5.0)

    def log(self) -> str:
        return "\n".join(r.getMessage() for r in self.caplog.records
                         if r.name == "ipcbus" and r.levelno >= logging.WARNING)

    def alive(self) -> bool:
        hub = self.bridge._hub
        return hub is not None and hub.thread is not None and hub.thread.is_alive()

    def pid(self) -> int:
        return os.getpid()

    def close(self) -> None:
        self.bridge.close()


@pytest.fixture(params=["broker", "bridge"])
def make_target(request: pytest.FixtureRequest, sock_path: str, capfd: Any, caplog: Any
                ) -> Iterator[Callable[..., Target]]:
    """Makes a broker or a bridge (short handshake deadline unless told otherwise).

    Call it in the test body: pytest gives each test phase a new capture file, and a broker
    started during setup would log into the setup phase's file."""
    made: list[Target] = []

    def make(**options: Any) -> Target:
        options.setdefault("handshake_timeout", 0.5)
        t: Target
        if request.param == "broker":
            t = BrokerTarget(sock_path, capfd, **options)
        else:
            t = BridgeTarget(caplog, **options)
        made.append(t)
        return t

    try:
        yield make
    finally:
        for t in made:
            t.close()


class Canary:
    """A client that must keep being served while others misbehave."""

    def __init__(self, target: Target) -> None:
        self.client = IpcBusClient.create().connect(target.address(), peer_name="canary")
        self.fuzz = 0  # messages on "fuzz" that reached the listener (decodable bodies)
        self.client.on("canary", lambda event, x: event.request.resolve(["canary", x]))
        self.client.on("fuzz", self._on_fuzz)
        sync(self.client)
        self._n = 0

    def _on_fuzz(self, event: Any, *args: Any) -> None:
        self.fuzz += 1

    def check(self) -> None:
        self._n += 1
        assert self.client.request("canary", 5.0, self._n).payload == ["canary", self._n]

    def close(self) -> None:
        self.client.close()


def clean_after(target: Target, canary: Canary, timeout: float = 3.0) -> None:
    """The bus is back to the canary alone: one connection, one peer, no pending request."""
    def clean() -> bool:
        s = target.state()
        return (s["connections"] == 1 and [p["name"] for p in s["peers"]] == ["canary"]
                and s["pending_requests"] == 0)
    wait_until(clean, timeout=timeout)
