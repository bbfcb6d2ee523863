"""Large payloads handed to a group's chosen member keep them in shared memory (SPEC "Large
payloads through shared memory" and "groups"; ``_hub_shm.HubShm.attach``,
``_client/shm.py``): intact (hashes) through a group of members in other processes for
broadcasts, requests (large answers too) and ``request_all``; the member maps the sender's
arena and the broker never maps it (it builds no inline copy); a ``zero_copy`` group
listener gets read-only views and ``event.retain()`` keeps them; no slot leaks once the
members return, when a member holding slots is SIGKILLed, or when the member leaves between
the hub's choice and the delivery (a request then fails at once); a member connected with
``shm_threshold=0`` gets the bytes inline; a pooled service's call with a large argument;
a group across a bridge's link (inline over the link) and among a bridge's pipe children
(slots)."""
from __future__ import annotations

import hashlib
import os
import signal
import threading
from typing import Any

import pytest

from ipcbus import (IpcBusBridge, IpcBusBroker, IpcBusClient, IpcBusRequestError, IpcBusService,
                    IpcBusServiceProxy)
from ipcbus._shm_arena import AVAILABLE

from helpers import Children, Collector, Reports, pid_of, sync, wait_until
from helpers.measure import arena_maps, fd_count

pytestmark = pytest.mark.skipif(not AVAILABLE, reason="no memfd on this platform")

MiB = 1 << 20
CHANNEL, ASK, GROUP = "big", "big-req", "pool"


def digest(data: Any) -> str:
    return hashlib.sha256(data).hexdigest()


def used(client: IpcBusClient) -> int:
    """The bytes of ``client``'s arena its receivers still hold."""
    slots = client._connection().shm.slots
    return slots.used_bytes if slots is not None else 0


# -- children (module level, for spawn) ---------------------------------------------------------
def member(path: str, q: Any, stop: Any, name: str, threshold: int = MiB) -> None:
    """A member of GROUP: reports each large message it gets (with the arena mappings of its
    process), answers each request with its name, the hash and the payload reversed."""
    with IpcBusClient.create().connect(path, peer_name=name, shm_threshold=threshold) as client:
        def on(event: Any, seq: int, data: Any) -> None:
            q.put(("got", name, seq, type(data).__name__, digest(data), arena_maps()))

        def ask(event: Any, data: Any) -> None:
            event.request.resolve([name, digest(data), bytes(data)[::-1]])

        client.on(CHANNEL, on, group=GROUP)
        client.on(ASK, ask, group=GROUP)
        sync(client)
        q.put(("ready", name))
        stop.poll(30)


def holder(path: str, q: Any, stop: Any) -> None:
    """A member that holds the views of what it gets (``zero_copy``) until it is killed."""
    with IpcBusClient.create().connect(path, peer_name="holder") as client:
        def on(event: Any, seq: int, data: Any) -> None:
            q.put(("got", seq, len(data)))
            stop.poll(30)

        client.on(CHANNEL, on, group=GROUP, zero_copy=True)
        sync(client)
        q.put(("ready", "holder"))
        stop.poll(30)


class Digests:
    """A pooled service's implementation: the hash of a large argument."""

    def __init__(self, name: str) -> None:
        self.name = name

    def hash(self, data: Any) -> list[Any]:
        return [self.name, type(data).__name__, digest(data)]


def service_host(path: str, q: Any, stop: Any, name: str) -> None:
    with IpcBusClient.create().connect(path, peer_name=name) as client:
        IpcBusService.create(client, "digests", Digests(name), group=GROUP).start(10)
        sync(client)
        q.put(("ready", name))
        stop.poll(30)


# -- through a group ------------------------------------------------------------------------------
@pytest.mark.timeout(90)
def test_messages_requests_and_request_all_through_a_group_keep_their_slots(
        reporters: tuple[Children, Reports, Any], broker: IpcBusBroker, sock_path: str) -> None:
    children, reports, q = reporters
    names = ["m0", "m1"]
    for name in names:
        children.start(member, sock_path, q, children.stop, name)
    assert reports.ready(2) == names
    bpid = pid_of(broker.process)
    with IpcBusClient.create().connect(sock_path, peer_name="sender",
                                       shm_limit=32 * MiB) as sender, \
            IpcBusClient.create().connect(sock_path, peer_name="plain") as plain:
        payloads = [os.urandom(2 * MiB + i) for i in range(4)]
        for seq, data in enumerate(payloads):
            sender.send(CHANNEL, seq, data)
        got = sorted(reports.next("got")[1:] for _ in payloads)  # one member each
        assert sorted(seq for _, seq, *_ in got) == [0, 1, 2, 3]
        assert {name for name, *_ in got} == set(names)  # ties in turn: both worked
        for name, seq, kind, hashed, maps in got:
            assert (kind, hashed) == ("bytes", digest(payloads[seq]))
            assert maps >= 1  # the member mapped the sender's arena: it was given slots
        for data in payloads[:2]:
            answer = sender.request(ASK, 10, data).payload
            assert answer[0] in names and answer[1:] == [digest(data), data[::-1]]
        plain.on(ASK, lambda event, data: event.request.resolve(["plain", digest(data), b""]))
        sync(plain)
        answers = sender.request_all(ASK, 10, payloads[2])  # one member, and the plain one
        assert sorted(a.payload[0] for a in answers) in (["m0", "plain"], ["m1", "plain"])
        assert all(a.payload[1] == digest(payloads[2]) for a in answers)
        assert arena_maps(bpid) == 0  # the broker never built an inline copy
        wait_until(lambda: used(sender) == 0, timeout=10)  # every slot given back


@pytest.mark.timeout(30)
def test_a_zero_copy_group_listener_gets_read_only_views_and_can_retain_them(
        broker: IpcBusBroker, sock_path: str, clients: Any) -> None:
    sender = clients(sock_path, shm_limit=16 * MiB)
    receiver = clients(sock_path)
    seen: list[Any] = []
    kept: list[Any] = []
    done = threading.Event()

    def on(event: Any, data: Any) -> None:
        seen.append((type(data), data.readonly, digest(data)))
        kept.append(data)
        if len(kept) == 2:
            kept.append(event.retain())  # the second one is kept past the listener
            done.set()

    receiver.on(CHANNEL, on, group=GROUP, zero_copy=True)
    sync(receiver)
    first, second = os.urandom(MiB), os.urandom(2 * MiB)
    sender.send(CHANNEL, first)
    sender.send(CHANNEL, second)
    assert done.wait(10)
    assert seen == [(memoryview, True, digest(first)), (memoryview, True, digest(second))]
    with pytest.raises(ValueError):
        kept[0][0]  # released once its listener returned
    assert digest(kept[1]) == digest(second)  # retained: still valid, its slot held
    wait_until(lambda: used(sender) == 2 * MiB, timeout=5)
    kept[2].release()
    with pytest.raises(ValueError):
        kept[1][0]
    wait_until(lambda: used(sender) == 0, timeout=5)


@pytest.mark.timeout(60)
def test_a_member_killed_while_holding_slots_gives_them_back(
        reporters: tuple[Children, Reports, Any], broker: IpcBusBroker, sock_path: str) -> None:
    children, reports, q = reporters
    bpid = pid_of(broker.process)
    with IpcBusClient.create().connect(sock_path, peer_name="sender",
                                       shm_limit=16 * MiB) as sender:
        sender.send("nobody", os.urandom(MiB))  # the arena exists, announced to the broker
        sync(sender)
        fds0 = fd_count(bpid)
        held = children.start(holder, sock_path, q, children.stop)
        reports.next("ready")
        for seq in range(3):
            sender.send(CHANNEL, seq, os.urandom(2 * MiB))
        assert reports.next("got")[1:] == (0, 2 * MiB)  # stuck in its listener
        wait_until(lambda: used(sender) == 6 * MiB, timeout=5)  # all three given to it
        os.kill(pid_of(held), signal.SIGKILL)
        held.join(5)
        wait_until(lambda: used(sender) == 0, timeout=10)
        wait_until(lambda: fd_count(bpid) == fds0, timeout=10)
        assert arena_maps(bpid) == 0


@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", ["off", "close"])
def test_a_member_that_leaves_between_choice_and_delivery_gives_the_slots_back(
        broker: IpcBusBroker, sock_path: str, clients: Any, how: str) -> None:
    """The hub chose the member (its only one) and queued slots and GROUPED frames for it;
    its listeners (``off``) or the client itself (``close``; its process's connection goes
    on) are gone when they are dispatched: the slots go back, the request fails, nothing
    runs."""
    sender = clients(sock_path, shm_limit=16 * MiB)
    receiver, blocker = clients(sock_path), clients(sock_path)
    assert receiver._connection() is blocker._connection()  # one connection, one dispatcher
    gate, busy = threading.Event(), threading.Event()
    ran = Collector()

    def block(event: Any) -> None:
        busy.set()
        gate.wait(10)

    blocker.on("block", block)
    receiver.on(CHANNEL, ran, group=GROUP)
    receiver.on(ASK, ran, group=GROUP)
    sync(receiver)
    sync(blocker)
    sender.send("block")
    assert busy.wait(5)  # the dispatcher of the process's connection is busy from now on
    sender.send(CHANNEL, os.urandom(2 * MiB))
    future = sender.request_async(ASK, 10, os.urandom(2 * MiB))
    sync(sender)  # routed: the hub chose the receiver for both
    wait_until(lambda: used(sender) == 4 * MiB, timeout=5)
    if how == "off":
        receiver.off(CHANNEL, ran, group=GROUP)
        receiver.off(ASK, ran, group=GROUP)
    else:
        receiver.close()
    gate.set()
    with pytest.raises(IpcBusRequestError):
        future.result(5)
    wait_until(lambda: used(sender) == 0, timeout=5)
    assert ran.items == []


@pytest.mark.timeout(60)
def test_a_member_with_threshold_zero_gets_the_bytes_inline(
        reporters: tuple[Children, Reports, Any], broker: IpcBusBroker, sock_path: str) -> None:
    children, reports, q = reporters
    children.start(member, sock_path, q, children.stop, "inline", 0)
    assert reports.ready(1) == ["inline"]
    with IpcBusClient.create().connect(sock_path, peer_name="sender") as sender:
        data = os.urandom(3 * MiB)
        sender.send(CHANNEL, 0, data)
        assert reports.next("got")[1:] == ("inline", 0, "bytes", digest(data), 0)  # no map
        answer = sender.request(ASK, 10, data).payload
        assert answer == ["inline", digest(data), data[::-1]]
        assert arena_maps(pid_of(broker.process)) == 1  # the broker inlined it for the member
        wait_until(lambda: used(sender) == 0, timeout=10)


@pytest.mark.timeout(60)
def test_a_pooled_service_call_with_a_large_argument(
        reporters: tuple[Children, Reports, Any], broker: IpcBusBroker, sock_path: str) -> None:
    children, reports, q = reporters
    for name in ("h0", "h1"):
        children.start(service_host, sock_path, q, children.stop, name)
    assert reports.ready(2) == ["h0", "h1"]
    with IpcBusClient.create().connect(sock_path, peer_name="caller") as caller:
        proxy = IpcBusServiceProxy.create(caller, "digests", 10.0)
        proxy.connect(10)
        data = os.urandom(2 * MiB)
        hosts = set()
        for _ in range(2):
            name, kind, hashed = proxy.call("hash", data)
            assert (kind, hashed) == ("bytes", digest(data))
            hosts.add(name)
        assert hosts == {"h0", "h1"}
        wait_until(lambda: used(caller) == 0, timeout=10)


@pytest.mark.timeout(60)
def test_a_group_across_a_bridge_and_its_link(sock_path: str) -> None:
    """A group with a member on each side of a bridge's link: from either side every large
    message and request reaches the chosen member intact; a member local to the broker
    gets a broker-side sender's slots (it maps that arena), the link and what crossed it
    the bytes inline; every slot comes back."""
    data = os.urandom(2 * MiB)
    with IpcBusBroker.create().connect(sock_path) as broker, \
            IpcBusBridge.create().connect(sock_path):
        near = IpcBusClient.create().connect(peer_name="near")  # the bridge's side
        far = IpcBusClient.create().connect(sock_path, peer_name="far")  # the broker's
        senders = {"near-sender": IpcBusClient.create().connect(peer_name="near-sender"),
                   "far-sender": IpcBusClient.create().connect(sock_path,
                                                               peer_name="far-sender")}
        got = Collector()
        for name, client in (("near", near), ("far", far)):
            def on(event: Any, seq: int, arg: Any, name: str = name) -> None:
                got(event, name, seq, digest(arg))

            def ask(event: Any, arg: Any, name: str = name) -> None:
                event.request.resolve([name, digest(arg), arg])

            client.on(CHANNEL, on, group=GROUP)
            client.on(ASK, ask, group=GROUP)
            sync(client)
        wait_until(lambda: len(broker.query_state()["groups"].get(ASK, {}).get(GROUP, ()))
                   == 2)
        for sender in senders.values():
            for seq in range(2):
                sender.send(CHANNEL, seq, data)
        items = got.wait(4)
        assert sorted(a[0] for _, a in items) == ["far", "far", "near", "near"]
        assert {a[2] for _, a in items} == {digest(data)}
        for sender in senders.values():
            for _ in range(2):
                name, hashed, back = sender.request(ASK, 10, data).payload
                assert name in ("near", "far") and (hashed, back) == (digest(data), data)
        assert far._connection().shm.maps  # far-sender's slots reached it: mapped its arena
        wait_until(lambda: all(used(s) == 0 for s in senders.values()), timeout=10)
        for client in (*senders.values(), far, near):
            client.close()


@pytest.mark.timeout(60)
def test_pipe_children_of_a_bridge_as_a_group_get_slots(
        reporters: tuple[Children, Reports, Any]) -> None:
    """A bridge without a link chooses among its own members: its pipe children map the
    sender's arena (slots), as a broker's socket children do."""
    children, reports, q = reporters
    bridge = IpcBusBridge.create().connect()
    try:
        names = ["p0", "p1"]
        for name in names:
            children.start(member, bridge.open_pipe(), q, children.stop, name)
        assert reports.ready(2) == names
        with IpcBusClient.create().connect(peer_name="sender") as sender:
            data = os.urandom(2 * MiB)
            for seq in range(2):
                sender.send(CHANNEL, seq, data)
            got = sorted(reports.next("got")[1:] for _ in range(2))
            assert sorted(name for name, *_ in got) == names  # ties in turn: one each
            assert sorted(seq for _, seq, *_ in got) == [0, 1]
            assert all(g[2:4] == ("bytes", digest(data)) for g in got)
            assert all(maps >= 1 for *_, maps in got)  # given slots: mapped the arena
            name, hashed, back = sender.request(ASK, 10, data).payload
            assert name in names and (hashed, back) == (digest(data), data[::-1])
            wait_until(lambda: used(sender) == 0, timeout=10)
    finally:
        bridge.close()
