"""Requests whose arguments carry large buffers go through shared memory (SPEC "Large
payloads through shared memory"; ``ipcbus/_client/shm_requests.py``): intact (hashes) to
one receiver in another process and to several (``request_all``); ``zero_copy`` listeners
get views; a TCP receiver gets them inline; a timed-out request's slots come back once its
receiver's listener returns (the arena's used bytes return to 0); a receiver that cannot map
gets the request inline; a forged slot of a request or answer is its sender's protocol
error only; answers: a large payload
(or one nested one level) reaches the requester as ``bytes`` through the answerer's arena,
whose slots come back once delivered; a late answer's slots are freed, never leaked."""
from __future__ import annotations

import hashlib
import os
import threading
from typing import Any

import pytest

from ipcbus import IpcBusBridge, IpcBusBroker, IpcBusClient, IpcBusRequestTimeoutError
from ipcbus import _protocol as P
from ipcbus._protocol import Kind
from ipcbus._shm_arena import AVAILABLE, create_arena

from helpers import Children, Reports, sync, wait_until
from helpers.rawpeer import RawPeer

pytestmark = pytest.mark.skipif(not AVAILABLE, reason="no memfd on this platform")

MiB = 1 << 20
CHANNEL = "big-req"


def digest(data: Any) -> str:
    return hashlib.sha256(data).hexdigest()


def answerer(path: str, q: Any, stop: Any, name: str, threshold: int = 1 << 20) -> None:
    """A child that answers every request with its name and the hash of its arguments
    (``threshold`` 0: its connection takes everything inline, as a TCP peer does)."""
    with IpcBusClient.create().connect(path, peer_name=name, shm_threshold=threshold) as client:
        def on(event: Any, data: Any, nested: Any) -> None:
            assert event.request is not None
            event.request.resolve([name, type(data).__name__, digest(data),
                                   digest(nested["x"])])
        client.on(CHANNEL, on)
        sync(client)
        q.put(("ready", name))
        stop.poll(30)


def used(client: IpcBusClient) -> int:
    slots = client._connection().shm.slots
    return slots.used_bytes if slots is not None else 0


@pytest.mark.timeout(60)
def test_request_arguments_arrive_intact_to_one_and_to_several_processes(
        reporters: tuple[Children, Reports, Any], broker: IpcBusBroker, sock_path: str) -> None:
    children, reports, q = reporters
    children.start(answerer, sock_path, q, children.stop, "r0")
    assert reports.ready(1) == ["r0"]
    with IpcBusClient.create().connect(sock_path, peer_name="asker",
                                       shm_limit=32 * MiB) as asker:
        data, nested = os.urandom(2 * MiB + 1), os.urandom(MiB + 3)
        expected = ["bytes", digest(data), digest(nested)]
        response = asker.request(CHANNEL, 10, data, {"x": nested})
        assert response.payload == ["r0", *expected]
        assert asker._connection().shm.slots is not None  # it went through the arena
        future = asker.request_async(CHANNEL, 10, data, {"x": nested})
        assert future.result(10).payload == ["r0", *expected]
        children.start(answerer, sock_path, q, children.stop, "r1")
        assert reports.ready(1) == ["r1"]
        answers = asker.request_all(CHANNEL, 10, data, {"x": nested})
        assert sorted(a.payload for a in answers) == [["r0", *expected], ["r1", *expected]]
        wait_until(lambda: used(asker) == 0, timeout=10)  # every slot given back


@pytest.mark.timeout(60)
def test_a_receiver_that_cannot_map_gets_the_request_inline(
        reporters: tuple[Children, Reports, Any], broker: IpcBusBroker, sock_path: str) -> None:
    children, reports, q = reporters
    children.start(answerer, sock_path, q, children.stop, "inline", 0)
    assert reports.ready(1) == ["inline"]
    with IpcBusClient.create().connect(sock_path, peer_name="asker") as asker:
        data, nested = os.urandom(2 * MiB), os.urandom(MiB)
        assert asker.request(CHANNEL, 10, data, {"x": nested}).payload == \
            ["inline", "bytes", digest(data), digest(nested)]
        assert asker._connection().shm.slots is not None  # sent through the arena
        wait_until(lambda: used(asker) == 0, timeout=10)


def _forged(peer: RawPeer, kind: int, slots: Any) -> bytes:
    target = None if kind == Kind.REQUEST else "someone"
    inner = P.encode_frame(kind, CHANNEL, peer.info, target, 7, P.pack_payload([1]))
    return peer.frame(Kind.SHM_MESSAGE, body=P.pack_payload([slots, inner]))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", [Kind.REQUEST, Kind.RESPONSE])
def test_a_forged_slot_of_a_request_or_answer_is_its_senders_protocol_error_only(
        broker: IpcBusBroker, sock_path: str, clients: Any, kind: Kind) -> None:
    canary = clients(sock_path, peer_name="canary")
    canary.on(CHANNEL, lambda event: event.request.resolve("still here"))
    sync(canary)
    peer = RawPeer.unix(sock_path)
    peer.join()
    fd, mapping = create_arena(1 << 16)
    try:
        peer.send(peer.frame(Kind.SHM_ARENA, nfds=1, body=P.pack_payload({"size": 1 << 16})),
                  [fd])
        peer.send(_forged(peer, int(kind), [[1 << 16, 1]]))  # outside its arena
        assert peer.wait_eof(5) is not None  # its connection is dropped...
    finally:
        mapping.close()
        os.close(fd)
        peer.sock.close()
    asker = clients(sock_path, peer_name="asker")
    assert asker.request(CHANNEL, 5).payload == "still here"  # ...and nobody else's


@pytest.mark.timeout(30)
def test_zero_copy_request_listeners_get_views(broker: IpcBusBroker, sock_path: str) -> None:
    with IpcBusClient.create().connect(sock_path, peer_name="asker") as asker, \
            IpcBusClient.create().connect(sock_path, peer_name="viewer") as viewer:
        def on(event: Any, data: Any) -> None:
            event.request.resolve([type(data).__name__, digest(data)])
        viewer.on(CHANNEL, on, zero_copy=True)
        sync(viewer)
        data = os.urandom(2 * MiB)
        assert asker.request(CHANNEL, 10, data).payload == ["memoryview", digest(data)]
        wait_until(lambda: used(asker) == 0, timeout=10)


@pytest.mark.timeout(30)
def test_a_timed_out_request_gives_its_slots_back(broker: IpcBusBroker,
                                                  sock_path: str) -> None:
    with IpcBusClient.create().connect(sock_path, peer_name="asker") as asker, \
            IpcBusClient.create().connect(sock_path, peer_name="slow") as slow:
        entered, go_on = threading.Event(), threading.Event()

        def on(event: Any, data: Any) -> None:
            entered.set()
            go_on.wait(20)
            event.request.resolve(len(data))  # too late: dropped
        slow.on(CHANNEL, on)
        sync(slow)
        with pytest.raises(IpcBusRequestTimeoutError):
            asker.request(CHANNEL, 0.3, os.urandom(2 * MiB))
        assert entered.is_set()
        assert used(asker) >= 2 * MiB  # its receiver still holds them
        go_on.set()
        wait_until(lambda: used(asker) == 0, timeout=10)
        sync(asker)
        assert used(asker) == 0


def big_answerer(path: str, q: Any, stop: Any, name: str) -> None:
    """A child that answers with ``size`` random bytes (and, nested, their hash)."""
    with IpcBusClient.create().connect(path, peer_name=name) as client:
        def on(event: Any, size: int, nested: bool) -> None:
            data = os.urandom(size)
            event.request.resolve({"data": data, "hash": digest(data)} if nested else data)
            q.put(("answered", name, digest(data),
                   client._connection().shm.slots is not None))  # its arena exists
        client.on(CHANNEL, on)
        sync(client)
        q.put(("ready", name))
        stop.poll(30)


@pytest.mark.timeout(60)
def test_large_answers_arrive_as_bytes_and_their_slots_come_back(
        reporters: tuple[Children, Reports, Any], broker: IpcBusBroker, sock_path: str) -> None:
    children, reports, q = reporters
    children.start(big_answerer, sock_path, q, children.stop, "a0")
    assert reports.ready(1) == ["a0"]
    with IpcBusClient.create().connect(sock_path, peer_name="asker") as asker:
        payload = asker.request(CHANNEL, 10, 2 * MiB, False).payload
        _, name, hashed, through_arena = reports.next("answered")
        assert type(payload) is bytes and digest(payload) == hashed
        assert through_arena
        nested = asker.request_async(CHANNEL, 10, 3 * MiB, True).result(10).payload
        assert type(nested["data"]) is bytes and digest(nested["data"]) == nested["hash"]
        assert reports.next("answered")[2] == nested["hash"]
        children.start(big_answerer, sock_path, q, children.stop, "a1")
        assert reports.ready(1) == ["a1"]
        answers = asker.request_all(CHANNEL, 10, MiB, True)
        assert len(answers) == 2
        for answer in answers:
            assert digest(answer.payload["data"]) == answer.payload["hash"]
        assert asker.request(CHANNEL, 10, 10, False).payload.__class__ is bytes  # small
        sync(asker)


def late_answerer(path: str, q: Any, stop: Any) -> None:
    """A child that holds the requests it gets and answers each with 2 MiB when told ("go");
    "late-used" answers with the bytes its arena still has in use."""
    with IpcBusClient.create().connect(path, peer_name="late") as client:
        held: list[Any] = []

        def on(event: Any) -> None:
            held.append(event.request)
            q.put(("held", len(held)))

        def go(event: Any) -> None:
            q.put(("sent", held.pop(0).resolve(os.urandom(2 * MiB))))
        client.on(CHANNEL, on)
        client.on("go", go)
        client.on("late-used", lambda event: event.request.resolve(used(client)))
        sync(client)
        q.put(("ready", "late"))
        stop.poll(30)


@pytest.mark.timeout(60)
def test_second_and_timed_out_answers_leak_no_slot(
        reporters: tuple[Children, Reports, Any], broker: IpcBusBroker, sock_path: str) -> None:
    children, reports, q = reporters
    children.start(late_answerer, sock_path, q, children.stop)
    assert reports.ready(1) == ["late"]
    with IpcBusClient.create().connect(sock_path, peer_name="asker") as asker:
        first = IpcBusClient.create().connect(sock_path, peer_name="first")

        def on_first(event: Any) -> None:
            event.request.resolve(b"1" * (2 * MiB))
        first.on(CHANNEL, on_first)
        sync(first)
        assert asker.request(CHANNEL, 10).payload == b"1" * (2 * MiB)  # the first wins
        wait_until(lambda: used(first) == 0, timeout=10)  # released once delivered
        reports.next("held")
        asker.send("go")  # the second answer: dropped by the hub, its slots freed
        assert reports.next("sent") == ("sent", True)
        wait_until(lambda: asker.request("late-used", 5).payload == 0, timeout=10)
        first.close()
        with pytest.raises(IpcBusRequestTimeoutError):
            asker.request(CHANNEL, 0.3)
        reports.next("held")
        asker.send("go")  # an answer after the timeout: dropped, its slots freed
        assert reports.next("sent") == ("sent", True)
        wait_until(lambda: asker.request("late-used", 5).payload == 0, timeout=10)


@pytest.mark.timeout(60)
def test_requests_and_answers_through_a_bridge_and_its_link(sock_path: str) -> None:
    """A request of a bridge's client to the broker's and back: through the arenas on each
    side, inline over the link; every slot comes back."""
    data = os.urandom(2 * MiB)
    with IpcBusBroker.create().connect(sock_path) as broker, \
            IpcBusBridge.create().connect(sock_path):
        near = IpcBusClient.create().connect(peer_name="near")
        far = IpcBusClient.create().connect(sock_path, peer_name="far")
        for name, client in (("near", near), ("far", far)):
            def on(event: Any, arg: Any, name: str = name) -> None:
                event.request.resolve([name, digest(arg), data])
            client.on(f"{name}-ch", on)
            sync(client)
        wait_until(lambda: broker.query_state()["channels"].get("near-ch") == 1)
        assert near.request("far-ch", 10, data).payload == ["far", digest(data), data]
        assert far.request("near-ch", 10, data).payload == ["near", digest(data), data]
        wait_until(lambda: used(near) == 0 and used(far) == 0, timeout=10)
        for client in (far, near):
            client.close()


def quitter(path: str, q: Any, stop: Any) -> None:
    """A child whose listener removes itself at its first call: what was routed to it before
    the hub saw that arrives with no listener left here."""
    with IpcBusClient.create().connect(path, peer_name="quitter") as client:
        def on(event: Any, data: Any) -> None:
            client.off(CHANNEL, on)
            if event.request is not None:
                event.request.resolve(len(data))
        client.on(CHANNEL, on)
        sync(client)
        q.put(("ready", "quitter"))
        stop.poll(30)


@pytest.mark.timeout(60)
def test_requests_that_find_no_listener_left_give_their_slots_back(
        reporters: tuple[Children, Reports, Any], broker: IpcBusBroker, sock_path: str) -> None:
    children, reports, q = reporters
    children.start(quitter, sock_path, q, children.stop)
    assert reports.ready(1) == ["quitter"]
    with IpcBusClient.create().connect(sock_path, peer_name="asker") as asker:
        data = os.urandom(MiB)
        futures = [asker.request_async(CHANNEL, 10, data) for _ in range(4)]
        for future in futures:
            future.exception(10)  # answered, or failed: its listener went away
        assert futures[0].result().payload == MiB
        wait_until(lambda: used(asker) == 0, timeout=10)
