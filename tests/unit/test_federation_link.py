"""The federation link's queue toward its broker (ipcbus._federation_link.FederationLink.to_hub),
with a socketpair nobody reads and a fake loop: it keeps what the socket does not take, and
past its bound reports "link slow" and drops messages, never the bus's bookkeeping."""
from __future__ import annotations

import socket
from typing import Any, Callable

import pytest

from ipcbus import _federation_link as FL
from ipcbus import _protocol as P
from ipcbus._protocol import Kind


class FakeLoop:
    def __init__(self) -> None:
        self.writers: list[Any] = []

    def call_soon(self, fn: Callable[[], None]) -> None:
        fn()

    def add_writer(self, sock: Any, fn: Callable[[], None]) -> None:
        self.writers.append(fn)

    def remove_writer(self, sock: Any) -> None:
        self.writers.clear()


def test_the_queue_toward_the_broker_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FL, "LINK_QUEUE_LIMIT", 256 * 1024)
    link = FL.FederationLink("nats://127.0.0.1:1", "t")
    ours, broker_side = socket.socketpair()
    ours.setblocking(False)
    link.sock = ours
    loop = FakeLoop()
    link.loop = loop  # type: ignore[assignment]
    peer = ["1.abc", "p", "socket", 1]
    message = P.encode_frame(Kind.SEND, "ch", peer, None, 0, P.pack_payload(b"x" * 60000))
    bookkeeping = P.encode_frame(Kind.PEER_REMOVE, sender=peer)
    try:
        while not link.slow:
            link.to_hub(message)
        assert loop.writers and link.counters["link_slow"] == 1
        queued = link.snapshot()["federation"]["queued_bytes"]
        link.to_hub(message)  # dropped
        assert link.snapshot()["federation"]["queued_bytes"] == queued
        link.to_hub(bookkeeping)  # kept
        assert link.snapshot()["federation"]["queued_bytes"] == queued + len(bookkeeping)
        broker_side.setblocking(False)
        received = 0
        while link.slow or loop.writers:  # the broker reads: the queue drains
            try:
                received += len(broker_side.recv(1 << 20))
            except BlockingIOError:
                pass
            if loop.writers:
                loop.writers[0]()
        assert link.snapshot()["federation"]["queued_bytes"] == 0
    finally:
        ours.close()
        broker_side.close()
