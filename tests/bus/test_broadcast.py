"""Broadcast and peer-to-peer across real processes: completeness and per-sender order."""
from __future__ import annotations

import hashlib
import threading
from typing import Any

import pytest

from ipcbus import IpcBusBroker, IpcBusClient, IpcBusEvent

from helpers import Collector, sync

N = 20_000


def subscriber(address: str, count: int, nsenders: int) -> None:
    """Receive ``count`` messages per sender on "data", then report what arrived."""
    client = IpcBusClient.create().connect(address, peer_name="subscriber")
    done = threading.Event()
    seen: dict[str, list[int]] = {}

    def on_data(event: IpcBusEvent, sender_tag: str, index: int, blob: bytes) -> None:
        seen.setdefault(sender_tag, []).append(index)
        if len(seen) == nsenders and all(len(v) == count for v in seen.values()):
            done.set()

    client.on("data", on_data)
    sync(client)
    client.send("ready")
    done.wait(60)
    report = {tag: [len(v), v == list(range(count))] for tag, v in seen.items()}
    client.send("report", report)
    client.close()


def publisher(address: str, tag: str, count: int) -> None:
    client = IpcBusClient.create().connect(address, peer_name=f"publisher-{tag}")
    for i in range(count):
        client.send("data", tag, i, b"x" * 100)
    client.close()


@pytest.mark.timeout(90)
def test_20000_messages_arrive_complete_and_in_order(broker: IpcBusBroker, ctx: Any,
                                                     clients: Any) -> None:
    main = clients(broker.address, peer_name="main")
    ready, report = Collector(), Collector()
    main.on("ready", ready).on("report", report)
    sync(main)
    child = ctx.Process(target=subscriber, args=(broker.address, N, 1))
    child.start()
    try:
        ready.wait(1, timeout=30)
        for i in range(N):
            main.send("data", "main", i, b"x" * 100)
        (_, (result,)), = report.wait(1, timeout=60)
        assert result == {"main": [N, True]}
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0


@pytest.mark.timeout(90)
def test_three_publishers_keep_their_own_order(broker: IpcBusBroker, ctx: Any,
                                               clients: Any) -> None:
    count = 5_000
    main = clients(broker.address, peer_name="main")
    ready, report = Collector(), Collector()
    main.on("ready", ready).on("report", report)
    sync(main)
    sub = ctx.Process(target=subscriber, args=(broker.address, count, 3))
    sub.start()
    pubs = []
    try:
        ready.wait(1, timeout=30)
        pubs = [ctx.Process(target=publisher, args=(broker.address, tag, count))
                for tag in ("a", "b", "c")]
        for p in pubs:
            p.start()
        (_, (result,)), = report.wait(1, timeout=60)
        assert result == {tag: [count, True] for tag in ("a", "b", "c")}
    finally:
        for p in [sub, *pubs]:
            p.join(10)
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in [sub, *pubs]] == [0, 0, 0, 0]


@pytest.mark.timeout(30)
def test_broadcast_reaches_every_process_once_and_sender_itself(broker: IpcBusBroker,
                                                                clients: Any) -> None:
    # three clients in this process share one connection; each listener gets the message once
    a, b, c = (clients(broker.address, peer_name=n) for n in "abc")
    got = {n: Collector() for n in "abc"}
    for name, client in zip("abc", (a, b, c)):
        client.on("hello", got[name])
    for client in (a, b, c):
        sync(client)
    a.send("hello", 1, [2, 3], {"k": None})
    for name in "abc":
        ((event, args),) = got[name].wait(1)
        assert args == (1, [2, 3], {"k": None})
        assert event.sender == a.peer
    sync(a)
    for name in "abc":
        assert len(got[name].items) == 1


@pytest.mark.timeout(30)
def test_send_to_reaches_only_the_target(broker: IpcBusBroker, clients: Any) -> None:
    a, b, c = (clients(broker.address, peer_name=n) for n in "abc")
    got_b, got_c = Collector(), Collector()
    b.on("p2p", got_b)
    c.on("p2p", got_c)
    sync(b)
    sync(c)
    a.send_to(b.peer, "p2p", "to b")
    a.send_to(c.peer.id, "p2p", "to c")
    assert got_b.wait(1)[0][1] == ("to b",)
    assert got_c.wait(1)[0][1] == ("to c",)
    sync(a)
    assert len(got_b.items) == len(got_c.items) == 1


def burst_then_exit(address: str, count: int) -> None:
    """Sends a burst and returns without close(): the process exits with data buffered."""
    client = IpcBusClient.create().connect(address, peer_name="leaver")
    for i in range(count):
        client.send("burst", i)


@pytest.mark.timeout(60)
def test_a_burst_sent_just_before_exit_is_delivered(broker: IpcBusBroker, ctx: Any,
                                                    clients: Any) -> None:
    count = 3000
    main = clients(broker.address, peer_name="main")
    got = Collector()
    main.on("burst", got)
    sync(main)
    child = ctx.Process(target=burst_then_exit, args=(broker.address, count))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    items = got.wait(count, timeout=10)
    assert [args[0] for _, args in items] == list(range(count))


def _digest(args: tuple[Any, ...]) -> tuple[list[Any], list[str]]:
    """Arguments with each bytes one named by its type, and the sha256 of those bytes."""
    return ([type(a).__name__ if isinstance(a, bytes) else a for a in args],
            [hashlib.sha256(a).hexdigest() for a in args if isinstance(a, bytes)])


def large_subscriber(address: str) -> None:
    """Answer each "large" message with a digest of what arrived, in arrival order."""
    client = IpcBusClient.create().connect(address, peer_name="large-subscriber")
    done = threading.Event()

    def on_large(event: IpcBusEvent, *args: Any) -> None:
        client.send("digest", *_digest(args))

    client.on("large", on_large)
    client.on("done", lambda event: done.set())
    sync(client)
    client.send("ready")
    done.wait(60)
    client.close()


@pytest.mark.timeout(90)
def test_large_bytes_arguments_arrive_whole_between_small_messages(
        broker: IpcBusBroker, children: Any, clients: Any) -> None:
    """Large bytes arguments (received by the subscriber straight into their own bytes
    objects) arrive equal to what was sent, with the arguments around them, in order with
    small messages in between."""
    main = clients(broker.address, peer_name="main")
    ready, digests = Collector(), Collector()
    main.on("ready", ready).on("digest", digests)
    sync(main)
    children.start(large_subscriber, broker.address)
    ready.wait(1, timeout=30)
    blobs = [bytes([i]) * (1 << 20) + bytes(range(256)) * (i * 300) for i in range(1, 7)]
    sent = []
    for i, blob in enumerate(blobs):
        args: tuple[Any, ...] = (i, blob, {"after": i}) if i % 2 else (blob,)
        main.send("large", *args)
        main.send("large", i, "small")
        sent.append(args)
        sent.append((i, "small"))
    main.send("done")
    got = [args for _, args in digests.wait(len(sent), timeout=60)]
    assert got == [_digest(args) for args in sent]
