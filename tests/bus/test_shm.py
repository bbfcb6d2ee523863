"""Large payloads through shared memory (SPEC "Large payloads through shared memory"): intact
(hashes) through the broker to one and to several receivers in other processes, through a
bridge and its link, to a TCP peer (inline); ``zero_copy`` views; nested arguments;
``shm_threshold=0``; forged slot references are their sender's protocol error only."""
from __future__ import annotations

import hashlib
import os
import signal
import socket
from typing import Any

import pytest

from ipcbus import IpcBusBridge, IpcBusBroker, IpcBusClient, Reconnect
from ipcbus import _protocol as P
from ipcbus._protocol import Kind
from ipcbus._shm_arena import AVAILABLE, create_arena

from helpers import Children, Collector, Reports, pid_of, sync, wait_until
from helpers.bus import tcp_address
from helpers.measure import arena_fds, arena_maps
from helpers.rawpeer import RawPeer

pytestmark = pytest.mark.skipif(not AVAILABLE, reason="no memfd on this platform")

MiB = 1 << 20
CHANNEL = "big"


def digest(data: Any) -> str:
    return hashlib.sha256(data).hexdigest()


def receiver(path: str, q: Any, stop: Any, name: str) -> None:
    """A child that reports the hash and type of every large argument it receives."""
    with IpcBusClient.create().connect(path, peer_name=name) as client:
        def on(event: Any, seq: int, data: Any) -> None:
            q.put(("got", name, seq, type(data).__name__, digest(data)))
        client.on(CHANNEL, on)
        sync(client)
        q.put(("ready", name))
        stop.poll(30)


def inline_receiver(path: str, q: Any, stop: Any) -> None:
    """A child whose connection takes everything inline (``shm_threshold=0``)."""
    with IpcBusClient.create().connect(path, peer_name="inline", shm_threshold=0) as client:
        def on(event: Any, data: Any) -> None:
            q.put(("got", type(data).__name__, digest(data), arena_maps(), arena_fds()))
        client.on(CHANNEL, on)
        sync(client)
        q.put(("ready", "inline"))
        stop.poll(30)


def _start_receivers(children: Children, path: str, q: Any, count: int) -> None:
    for i in range(count):
        children.start(receiver, path, q, children.stop, f"r{i}")


@pytest.mark.timeout(60)
def test_payloads_arrive_intact_to_one_and_to_several_processes(
        reporters: tuple[Children, Reports, Any], broker: IpcBusBroker, sock_path: str) -> None:
    children, reports, q = reporters
    _start_receivers(children, sock_path, q, 2)
    assert reports.ready(2) == ["r0", "r1"]
    local = Collector()
    with IpcBusClient.create().connect(sock_path, peer_name="sender") as sender, \
            IpcBusClient.create().connect(sock_path, peer_name="local") as listener:
        listener.on(CHANNEL, local)
        sync(listener)
        payloads = [os.urandom(2 * MiB + i) for i in range(3)]
        for seq, data in enumerate(payloads):
            sender.send(CHANNEL, seq, data)
        got = sorted(reports.next("got")[1:] for _ in range(6))
        assert got == sorted((name, seq, "bytes", digest(data)) for name in ("r0", "r1")
                             for seq, data in enumerate(payloads))
        assert [digest(args[1]) for args in (a for _, a in local.wait(3))] == \
            [digest(p) for p in payloads]
        # its arena, passed once, and its own mapping of it as a receiver (each a descriptor:
        # Python's mmap keeps one)
        assert arena_fds() == 2 and arena_maps() == 2
        sender.send_to(listener.peer, CHANNEL, 9, payloads[0])  # peer-to-peer too
        assert local.wait(4)[-1][1] == (9, payloads[0])


@pytest.mark.timeout(30)
def test_nested_buffers_of_every_kind_and_small_arguments_around_them(
        broker: IpcBusBroker, sock_path: str, clients: Any) -> None:
    sender = clients(sock_path, shm_threshold=MiB)
    got = Collector()
    receiver = clients(sock_path)
    receiver.on(CHANNEL, got)
    sync(receiver)
    data = os.urandom(MiB + 7)
    sender.send(CHANNEL, "head", bytearray(data), memoryview(data), [1, data, "x"],
                {"k": data, "n": None}, (data,), b"small", 3.5)
    _, args = got.wait()[0]
    assert args == ("head", data, data, [1, data, "x"], {"k": data, "n": None}, [data],
                    b"small", 3.5)
    assert all(type(a) is bytes for a in (args[1], args[2], args[3][1], args[4]["k"]))
    assert arena_fds() == 2


@pytest.mark.timeout(30)
def test_zero_copy_listeners_get_read_only_views_valid_while_documented(
        broker: IpcBusBroker, sock_path: str, clients: Any) -> None:
    sender = clients(sock_path)
    receiver = clients(sock_path)
    seen: list[Any] = []
    kept: list[Any] = []

    def zero_copy(event: Any, data: Any) -> None:
        seen.append((type(data), data.readonly, digest(data)))
        with pytest.raises(TypeError):
            data[0] = 1  # read-only
        kept.append(data)
        if len(kept) == 2:
            kept.append(event.retain())  # the second one is kept past the listener

    plain = Collector()
    receiver.on(CHANNEL, zero_copy, zero_copy=True)
    receiver.on(CHANNEL, plain)
    sync(receiver)
    first, second = os.urandom(MiB), os.urandom(2 * MiB)
    sender.send(CHANNEL, first)
    sender.send(CHANNEL, second)
    plain.wait(2)
    assert seen == [(memoryview, True, digest(first)), (memoryview, True, digest(second))]
    assert [type(a[0]) for a in plain.args] == [bytes, bytes]  # the other listener: bytes
    with pytest.raises(ValueError):
        kept[0][0]  # released once its listener returned
    assert digest(kept[1]) == digest(second)  # retained: still valid
    kept[2].release()
    with pytest.raises(ValueError):
        kept[1][0]
    receiver.off(CHANNEL, zero_copy)  # the function given to on() removes it
    assert receiver.listener_count(CHANNEL) == 1


@pytest.mark.timeout(30)
def test_threshold_zero_turns_it_off(broker: IpcBusBroker, sock_path: str, clients: Any
                                     ) -> None:
    sender = clients(sock_path, shm_threshold=0)
    receiver = clients(sock_path)
    got = Collector()
    receiver.on(CHANNEL, got)
    sync(receiver)
    data = os.urandom(3 * MiB)
    sender.send(CHANNEL, data)
    assert got.wait()[0][1] == (data,)
    assert arena_fds() == 0 and arena_maps() == 0


@pytest.mark.timeout(60)
def test_through_a_bridge_and_its_link(sock_path: str) -> None:
    """A bridge's client's payload reaches the bridge's other client through the arena, and
    the broker's client over the link (inline), and back."""
    data = os.urandom(2 * MiB)
    with IpcBusBroker.create().connect(sock_path) as broker, \
            IpcBusBridge.create().connect(sock_path):
        near = IpcBusClient.create().connect(peer_name="near")
        sender = IpcBusClient.create().connect(peer_name="sender")
        far = IpcBusClient.create().connect(sock_path, peer_name="far")
        got = {name: Collector() for name in ("near", "far")}
        for name, client in (("near", near), ("far", far)):
            client.on(CHANNEL, got[name])
            sync(client)
        wait_until(lambda: broker.query_state()["channels"].get(CHANNEL) == 2)
        sender.send(CHANNEL, 1, data)
        far.send(CHANNEL, 2, data)  # and from the broker's side to the bridge's
        for name in got:
            assert sorted(a for _, a in got[name].wait(2)) == [(1, data), (2, data)], name
        for client in (far, sender, near):
            client.close()


@pytest.mark.timeout(30)
def test_a_tcp_peer_gets_the_bytes_inline(clients: Any) -> None:
    data = os.urandom(2 * MiB)
    with IpcBusBroker.create().connect(port=0) as tcp_broker:
        tcp = clients(tcp_address(tcp_broker))
        got = Collector()
        tcp.on(CHANNEL, got)
        sync(tcp)
        tcp.send(CHANNEL, data)  # a TCP client sends inline (no descriptors over TCP)
        assert got.wait()[0][1] == (data,)
    assert arena_fds() == 0


def _forged(peer: RawPeer, slots: Any) -> bytes:
    inner = P.encode_frame(Kind.SEND, CHANNEL, peer.info, None, 0, P.pack_payload([1]))
    return peer.frame(Kind.SHM_MESSAGE, body=P.pack_payload([slots, inner]))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", ["outside", "overlap", "no arena", "release unheld",
                                  "unsealed", "not its peer"])
def test_forged_slot_references_are_the_senders_protocol_error_only(
        broker: IpcBusBroker, sock_path: str, clients: Any, case: str) -> None:
    canary = clients(sock_path, peer_name="canary")
    got = Collector()
    canary.on(CHANNEL, got)
    sync(canary)
    peer = RawPeer.unix(sock_path)
    peer.join()
    fd, mapping = create_arena(1 << 16)
    try:
        if case == "unsealed":
            plain = os.memfd_create("plain")
            os.ftruncate(plain, 1 << 16)
            peer.send(peer.frame(Kind.SHM_ARENA, nfds=1,
                                 body=P.pack_payload({"size": 1 << 16})), [plain])
            os.close(plain)
        elif case != "no arena":
            peer.send(peer.frame(Kind.SHM_ARENA, nfds=1, body=P.pack_payload({"size": 1 << 16})),
                      [fd])
        if case == "outside":
            peer.send(_forged(peer, [[1 << 16, 1]]))
        elif case == "overlap":
            peer.send(_forged(peer, [[0, 10], [5, 10]]))
        elif case == "no arena":
            peer.send(_forged(peer, [[0, 10]]))
        elif case == "release unheld":
            peer.send(peer.frame(Kind.SHM_RELEASE, rid=1, body=P.pack_payload([0])))
        elif case == "not its peer":
            other = ["someone-else", "x", "socket", os.getpid()]
            inner = P.encode_frame(Kind.SEND, CHANNEL, other, None, 0, P.pack_payload([1]))
            peer.send(peer.frame(Kind.SHM_MESSAGE, body=P.pack_payload([[[0, 10]], inner])))
        assert peer.wait_eof(5) is not None  # its connection is dropped...
    finally:
        mapping.close()
        os.close(fd)
        peer.sock.close()
    canary.send(CHANNEL, "still here")  # ...and nobody else's
    assert got.wait()[0][1] == ("still here",)
    assert [p["name"] for p in broker.query_state()["peers"]] == ["canary"]


@pytest.mark.timeout(30)
def test_a_peers_slots_are_read_from_its_own_arena_only(
        broker: IpcBusBroker, sock_path: str, clients: Any) -> None:
    """A raw peer may name only slots of its own arena: the slots it declares are checked
    against its arena; a receiver sees its bytes, never another connection's."""
    canary = clients(sock_path)
    got = Collector()
    canary.on(CHANNEL, got)
    sync(canary)
    secret = clients(sock_path)
    secret.send("elsewhere", os.urandom(2 * MiB))  # another arena, with data in it
    peer = RawPeer.unix(sock_path)
    peer.join()
    fd, mapping = create_arena(1 << 16)
    try:
        mapping[0:5] = b"mine!"
        peer.send(peer.frame(Kind.SHM_ARENA, nfds=1, body=P.pack_payload({"size": 1 << 16})),
                  [fd])
        from ipcbus._shm_slots import EXT_CODE, ext_data
        import msgpack
        body = P.pack_payload([msgpack.ExtType(EXT_CODE, ext_data(0))])
        inner = P.encode_frame(Kind.SEND, CHANNEL, peer.info, None, 0, body)
        peer.send(peer.frame(Kind.SHM_MESSAGE, body=P.pack_payload([[[0, 5]], inner])))
        assert got.wait()[0][1] == (b"mine!",)
        peer.expect(Kind.SHM_FREE)  # the canary released it: the slot is the peer's again
    finally:
        mapping.close()
        os.close(fd)
        peer.sock.close()


@pytest.mark.timeout(30)
def test_without_memfd_large_payloads_go_inline(broker: IpcBusBroker, sock_path: str,
                                                clients: Any,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """What a platform without ``os.memfd_create`` (macOS) does: the arena is off."""
    from ipcbus._client import shm as client_shm
    monkeypatch.setattr(client_shm, "AVAILABLE", False)
    sender = clients(sock_path)
    receiver = clients(sock_path)
    got = Collector()
    receiver.on(CHANNEL, got)
    sync(receiver)
    data = os.urandom(2 * MiB)
    sender.send(CHANNEL, data)
    assert got.wait()[0][1] == (data,)
    assert arena_fds() == 0 and arena_maps() == 0


def test_bad_shm_arguments_are_refused_at_the_call(sock_path: str) -> None:
    client = IpcBusClient.create()
    for kwargs, error in (({"shm_threshold": -1}, ValueError), ({"shm_limit": 10}, ValueError),
                          ({"shm_threshold": 1.5}, TypeError), ({"shm_limit": "1"}, TypeError)):
        with pytest.raises(error):
            client.connect(sock_path, **kwargs)


@pytest.mark.timeout(60)
def test_a_receiver_with_threshold_zero_maps_nothing(
        reporters: tuple[Children, Reports, Any], broker: IpcBusBroker, sock_path: str,
        clients: Any) -> None:
    """shm_threshold=0 turns it all off for that connection: it sends inline and the hub
    gives it the bytes inline (it never maps another's arena)."""
    children, reports, q = reporters
    children.start(inline_receiver, sock_path, q, children.stop)
    reports.ready(1)
    sender = clients(sock_path)
    data = os.urandom(2 * MiB)
    sender.send(CHANNEL, data)
    assert reports.next("got")[1:] == ("bytes", digest(data), 0, 0)
    assert arena_fds() == 1  # the sender did use its arena


def reconnecting_inline_receiver(path: str, q: Any, stop: Any) -> None:
    """``inline_receiver`` with ``reconnect``: it reports again once back on the bus."""
    client = IpcBusClient.create().connect(path, peer_name="inline", shm_threshold=0,
                                           reconnect=Reconnect(initial=0.02, maximum=0.2))

    def on(event: Any, data: Any) -> None:
        q.put(("got", type(data).__name__, digest(data), arena_maps(), arena_fds()))

    def back() -> None:
        sync(client)
        q.put(("back", "inline"))

    client.on(CHANNEL, on)
    client.on_reconnected(back)
    sync(client)
    q.put(("ready", "inline"))
    stop.poll(30)
    client.close()


@pytest.mark.skipif(not AVAILABLE, reason="no memfd here")
@pytest.mark.timeout(60)
def test_threshold_zero_holds_on_a_new_connection_after_a_reconnection(
        reporters: tuple[Children, Reports, Any], sock_path: str, clients: Any) -> None:
    """A reconnecting client that asked for no shared memory tells the restarted broker
    again: its new connection still gets large payloads inline."""
    children, reports, q = reporters
    broker = IpcBusBroker.create(restart=True).connect(sock_path)
    try:
        children.start(reconnecting_inline_receiver, sock_path, q, children.stop)
        reports.ready(1)
        first = pid_of(broker.process)
        os.kill(first, signal.SIGKILL)
        reports.next("back", 30)
        sender = clients(sock_path)
        data = os.urandom(2 * MiB)
        sender.send(CHANNEL, data)
        assert reports.next("got", 20)[1:] == ("bytes", digest(data), 0, 0)
    finally:
        broker.close()
