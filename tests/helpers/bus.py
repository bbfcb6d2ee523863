"""Waiting on a running bus: a listener that records what it gets, a round trip through the
broker, and small questions to a hub (who is connected, where it listens)."""
from __future__ import annotations

import os
import threading
from typing import Any

from ipcbus import IpcBusBroker, IpcBusClient
from ipcbus import _protocol as P
from ipcbus._protocol import Kind

from helpers.rawpeer import RawPeer, _raw_ids


def sync(client: IpcBusClient) -> None:
    """Round trip to the broker: every frame this client sent before has been routed."""
    client.request("/ipcbus/queryState", 5.0)


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


def peer_names(broker: IpcBusBroker) -> list[str]:
    """The names of the peers the broker knows now."""
    return [p["name"] for p in broker.query_state(5.0)["peers"]]


def tcp_address(broker: IpcBusBroker) -> tuple[str, int]:
    """The (host, port) of a broker listening on TCP."""
    address = broker.address
    assert isinstance(address, tuple)
    return address


def join_pipelined(path: str, count: int, channel: str) -> list[RawPeer]:
    """``count`` raw connections that each say HELLO, PEER_ADD and SUBSCRIBE in one write,
    then read WELCOME and the PEER_ADD answer."""
    peers: list[RawPeer] = []
    hello = P.encode_frame(Kind.HELLO, body=P.hello_body(os.getpid()))
    for _ in range(count):
        peer = RawPeer.unix(path)
        peer.info = [f"{os.getpid()}.raw{next(_raw_ids)}", "many", "socket", os.getpid()]
        peer.send(hello + P.encode_frame(Kind.PEER_ADD, sender=peer.info, rid=1)
                  + peer.frame(Kind.SUBSCRIBE, channel, rid=1))
        peers.append(peer)
    for peer in peers:
        P.check_welcome(peer.recv_frame())
        assert peer.expect(Kind.RESPONSE).rid == 1
    return peers
