"""Trust (SPEC 0.2 "Trust"): the hub decides who a peer is, and nothing a frame declares
overrides it. Real brokers and bridges, raw peers on real sockets and bridge pipes.

Each test reproduces an item of issue 14 (its number is in the test's docstring), then
checks the principle behind it: identity by connection, answers only from a receiver,
ids unique across a link, reserved channels, links granted by the hub.
"""
from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import re
import threading
from typing import Any, Callable, Iterator

import pytest

from ipcbus import (IpcBusBridge, IpcBusBroker, IpcBusClient,
                    IpcBusRequestError, IpcBusService, IpcBusServiceProxy)
from ipcbus import _protocol as P
from ipcbus._protocol import Kind

from helpers.rawbus import Canary, Target, make_target  # noqa: F401
from helpers.rawpeer import RawPeer
from helpers import Collector, sync, wait_until


def peer_record(target: Target, peer_id: str) -> dict[str, Any]:
    return next(p for p in target.state()["peers"] if p["id"] == peer_id)


# -- identity by connection (items 13, and the principle) ------------------------------------
@pytest.mark.timeout(60)
def test_a_peer_is_what_its_connection_is_not_what_it_claims(
        make_target: Callable[..., Target]) -> None:
    """Item 13: a socket or pipe peer that claims to be ``main`` of another pid is recorded as
    what its connection is (socket: the kernel's pid; pipe: the pid of its HELLO), and that
    is what receivers see as ``event.sender``."""
    target = make_target()
    canary = Canary(target)
    got = Collector()
    canary.client.on("who", got)
    sync(canary.client)
    raw = target.raw()
    raw.handshake()
    claimed: list[Any] = [f"{os.getpid()}.liar", "liar", "main", 1]
    raw.send(P.encode_frame(Kind.PEER_ADD, sender=claimed, rid=1))
    answer = P.unpack_payload(raw.expect(Kind.RESPONSE).body)
    expected = [claimed[0], "liar", raw.ptype, os.getpid()]
    assert answer[1]["peer"] == expected
    assert {k: peer_record(target, claimed[0])[k] for k in ("type", "pid")} == \
        {"type": raw.ptype, "pid": os.getpid()}
    raw.info = expected
    raw.send(raw.frame(Kind.SEND, "who", body=P.pack_payload([1])))
    event, _ = got.wait(1)[0]
    assert (event.sender.process.type, event.sender.process.pid) == (raw.ptype, os.getpid())
    # a frame that declares the claimed identity after all is a protocol error
    raw.send(P.encode_frame(Kind.SEND, "who", claimed, body=P.pack_payload([2])))
    assert raw.wait_eof(5.0) is not None
    canary.check()
    assert len(got.items) == 1
    raw.close()
    canary.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("field,value", [(0, "someone-else"), (1, "other-name"),
                                         (2, "main"), (3, 1)])
def test_a_frame_naming_another_sender_closes_only_that_connection(
        make_target: Callable[..., Target], field: int, value: Any) -> None:
    """A connection acts only for the peers it registered, exactly as recorded: any other
    sender tuple (another id, another name, type or pid) drops that connection, and the
    message reaches nobody."""
    target = make_target()
    canary = Canary(target)
    got = Collector()
    canary.client.on("spoof", got)
    sync(canary.client)
    raw = target.raw()
    info = raw.join("spoofer")
    forged = list(info)
    forged[field] = canary.client.peer.id if field == 0 else value
    raw.send(P.encode_frame(Kind.SEND, "spoof", forged, body=P.pack_payload(["x"])))
    assert raw.wait_eof(5.0) is not None
    canary.check()
    assert got.items == []
    raw.close()
    canary.close()


# -- answers only from a receiver (item 7) ----------------------------------------------------
@pytest.mark.timeout(60)
def test_an_answer_from_a_peer_that_never_got_the_request_is_dropped(
        make_target: Callable[..., Target]) -> None:
    """Item 7: request ids are sequential and peer ids public, so a peer can aim an answer at
    any request. Only a peer the request was delivered to may answer it: the forged answers
    are dropped and counted, and the real listener's answer arrives."""
    target = make_target()
    canary = Canary(target)
    release = threading.Event()
    listener = IpcBusClient.create().connect(target.address(), peer_name="slow")
    listener.on("slow", lambda event: (release.wait(10), event.request.resolve("real")))
    sync(listener)
    forger = target.raw()
    forger.join("forger")
    from ipcbus import client as client_module
    first = next(client_module._rids)  # request ids are sequential: the forger scans near
    future = canary.client.request_async("slow", 10.0)
    wait_until(lambda: target.state()["pending_requests"] >= 1)
    requester = canary.client.peer.id
    for rid in range(max(1, first - 100), first + 100):
        forger.send(forger.frame(Kind.RESPONSE, target=requester, rid=rid,
                                 body=P.pack_payload([True, "forged"])))
    wait_until(lambda: target.state()["dropped"]["forged_answers"] >= 1)
    assert not future.done()
    release.set()
    assert future.result(10).payload == "real"
    assert forger.wait_eof(0.2) is None  # the forger is dropped-and-counted, not disconnected
    lines = [line for line in target.log().splitlines() if "dropped an answer" in line]
    assert 1 <= len(lines) <= 2  # the log does not flood
    canary.check()
    listener.close()
    forger.close()
    canary.close()


# -- ids unique across a link (items 10, 11) --------------------------------------------------
@pytest.fixture
def linked(sock_path: str) -> Iterator[tuple[IpcBusBroker, IpcBusBridge]]:
    with IpcBusBroker.create().connect(sock_path) as broker, \
            IpcBusBridge.create().connect(sock_path) as bridge:
        yield broker, bridge


def pipe_raw(bridge: IpcBusBridge) -> RawPeer:
    import socket
    conn = bridge.open_pipe()
    sock = socket.socket(fileno=os.dup(conn.fileno()))
    conn.close()
    return RawPeer(sock, "pipe")


@pytest.mark.timeout(60)
def test_a_pipe_child_cannot_take_the_id_of_a_socket_peer(
        linked: tuple[IpcBusBroker, IpcBusBridge], sock_path: str) -> None:
    """Item 10: a pipe child of a linked bridge joins with the id of a socket peer of the
    broker: the broker refuses the id before the bridge registers it, so a ``send_to`` of a
    main client still reaches the real peer, and the link stays up."""
    broker, bridge = linked
    victim = IpcBusClient.create().connect(sock_path, peer_name="victim")
    got = Collector()
    victim.on("secret", got)
    sync(victim)
    main = IpcBusClient.create().connect(peer_name="main")
    impostor = pipe_raw(bridge)
    impostor.handshake()
    info = [victim.peer.id, "impostor", "pipe", os.getpid()]
    impostor.send(P.encode_frame(Kind.PEER_ADD, sender=info, rid=7))
    refusal = impostor.expect(Kind.REQUEST_FAIL)
    assert (refusal.target, refusal.rid) == (victim.peer.id, 7)
    assert "taken" in str(P.unpack_payload(refusal.body))
    main.send_to(victim.peer.id, "secret", "for the victim")
    assert got.wait(1)[0][1] == ("for the victim",)
    with pytest.raises(TimeoutError):
        impostor.expect(Kind.SEND_TO, timeout=0.3)
    # the same id claimed on the bridge's own side is refused too, and nothing broke
    assert main.request("/ipcbus/queryState", 5.0).payload["pid"] == broker.process.pid
    names = sorted(p["name"] for p in broker.query_state()["peers"])
    assert names == ["main", "victim"]
    impostor.close()
    main.close()
    victim.close()


@pytest.mark.timeout(60)
def test_a_peer_id_cannot_collide_with_the_routers_pseudo_ids(
        linked: tuple[IpcBusBroker, IpcBusBridge], sock_path: str) -> None:
    """Item 11: a pipe child that joins and leaves with the id "\\x00upstream" failed every
    request pending across the link. Ids with control characters are a protocol error for
    that connection; the pending request is answered as usual."""
    broker, bridge = linked
    release = threading.Event()
    far = IpcBusClient.create().connect(sock_path, peer_name="far")
    far.on("far", lambda event: (release.wait(10), event.request.resolve("done")))
    sync(far)
    main = IpcBusClient.create().connect(peer_name="main")
    future = main.request_async("far", 10.0)
    wait_until(lambda: broker.query_state()["pending_requests"] == 1)
    raw = pipe_raw(bridge)
    raw.handshake()
    info = ["\x00upstream", "x", "pipe", os.getpid()]
    raw.send(P.encode_frame(Kind.PEER_ADD, sender=info, rid=1))
    raw.send(P.encode_frame(Kind.PEER_REMOVE, sender=info))
    assert raw.wait_eof(5.0) is not None
    release.set()
    assert future.result(10).payload == "done"
    raw.close()
    main.close()
    far.close()


# -- links are granted by the hub (item 8) ------------------------------------------------------
def _claim_relay(path: str, result: Any) -> None:
    """In another process (so the broker sees another pid): say HELLO as a bridge's link."""
    import socket
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    raw = RawPeer(sock)
    raw.send(P.encode_frame(Kind.HELLO, body=P.pack_payload(
        {"magic": P.MAGIC, "version": P.VERSION, "pid": os.getpid(), "relay": True})))
    frame = raw.recv_frame()
    result.put((Kind(frame.kind).name, P.unpack_control(frame.body)))
    raw.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("links", ["owner", "any"])
def test_the_relay_role_is_granted_not_claimed(sock_path: str, links: str) -> None:
    """Item 8: a peer whose HELLO said ``relay: true`` was exempt from back-pressure. The
    broker grants the role from what the kernel says about the connection: with the default
    ``links="owner"`` only the process that started it may link a bridge, and another process
    is refused with a reason naming the option; ``links="any"`` lets it in."""
    ctx = multiprocessing.get_context("spawn")
    result = ctx.Queue()
    with IpcBusBroker.create(links=links).connect(sock_path):
        proc = ctx.Process(target=_claim_relay, args=(sock_path, result))
        proc.start()
        kind, body = result.get(timeout=30)
        proc.join(10)
    if links == "owner":
        assert kind == "NOTICE" and "links='any'" in body["error"], body
    else:
        assert kind == "WELCOME", body


# -- reserved channels (item 19) ------------------------------------------------------------------
class Lamp:
    def on(self) -> str:
        return "on"


@contextlib.contextmanager
def lamp_service(target: Target) -> Iterator[tuple[IpcBusService, IpcBusServiceProxy]]:
    """A started service "lamp" hosted by one client, and a connected proxy of another."""
    host = IpcBusClient.create().connect(target.address(), peer_name="host")
    service = IpcBusService.create(host, "lamp", Lamp()).start()
    user = IpcBusClient.create().connect(target.address(), peer_name="user")
    proxy = IpcBusServiceProxy.create(user, "lamp")
    try:
        proxy.connect(5.0)
        yield service, proxy
    finally:
        proxy.close()
        user.close()
        service.stop()
        host.close()


@pytest.mark.timeout(60)
def test_only_a_services_host_sends_on_its_event_channel(
        make_target: Callable[..., Target]) -> None:
    """Item 19: any client could send ``("stop", …)`` or ``("event", "tick", …)`` on a
    service's event channel; proxies stopped and emitted the forged event. The hub takes
    broadcasts there only from the service's host: the forgery is dropped, counted and the
    sender told; the proxy stays started and hears the real events only."""
    target = make_target()
    forger = target.raw()
    forger.join("forger")
    with lamp_service(target) as (service, proxy):
        ticks = Collector()
        proxy.on("tick", lambda *args: ticks(None, *args))  # service handlers get the args
        channel = P.service_event_channel("lamp")
        forger.send(forger.frame(Kind.SEND, channel, body=P.pack_payload(["stop", "forged"])))
        forger.send(forger.frame(Kind.SEND, channel,
                                 body=P.pack_payload(["event", "tick", 666])))
        notice = forger.expect(Kind.NOTICE)
        assert "reserved" in P.unpack_control(notice.body)["error"]
        service.send_event("tick", 1)
        assert ticks.wait(1)[0][1] == (1,)
        assert proxy.is_started
        assert proxy.call("on") == "on"
        wait_until(lambda: target.state()["dropped"]["forged_events"] == 2)
        assert ticks.args == [(1,)]
    forger.close()


@pytest.mark.timeout(60)
def test_service_calls_go_to_the_host_only(make_target: Callable[..., Target]) -> None:
    """A peer of another connection listening on a service's call channel gets none of its
    calls (it could have answered first); the host answers every one. (Clients of one process
    share a connection and a trust domain: the hub routes to connections.)"""
    target = make_target()
    thief = target.raw()
    thief.join("thief")
    with lamp_service(target) as (_, proxy):
        thief.send(thief.frame(Kind.SUBSCRIBE, P.service_call_channel("lamp"), rid=1))
        wait_until(lambda: target.state()["channels"].get(P.service_call_channel("lamp")) == 2)
        assert [proxy.call("on") for _ in range(5)] == ["on"] * 5
        with pytest.raises(TimeoutError):
            thief.expect(Kind.REQUEST, timeout=0.3)
    thief.close()


@pytest.mark.timeout(60)
def test_reserved_channels_are_refused_on_the_wire(make_target: Callable[..., Target]) -> None:
    """A raw peer's broadcast or request on an ``/ipcbus/`` channel that is no direct channel,
    no service channel and no special channel is refused (a notice, a failed request), and
    it may not listen to another peer's direct channel."""
    target = make_target()
    canary = Canary(target)
    got = Collector()
    canary.client.on("/ipcbus/secret", got)
    direct = canary.client.create_direct_channel()
    canary.client.on(direct, got)
    sync(canary.client)
    raw = target.raw()
    raw.join("raw")
    raw.send(raw.frame(Kind.SEND, "/ipcbus/secret", body=P.pack_payload([1])))
    assert "reserved" in P.unpack_control(raw.expect(Kind.NOTICE).body)["error"]
    raw.send(raw.frame(Kind.REQUEST, "/ipcbus/secret", rid=5, body=P.pack_payload([])))
    fail = raw.expect(Kind.REQUEST_FAIL)
    assert fail.rid == 5 and "reserved" in P.unpack_control(fail.body)
    raw.send(raw.frame(Kind.SUBSCRIBE, direct, rid=1))
    raw.send(raw.frame(Kind.SEND, direct, body=P.pack_payload(["to the owner"])))
    assert got.wait(1)[0][1] == ("to the owner",)
    with pytest.raises(TimeoutError):
        raw.expect(Kind.SEND, timeout=0.3)  # not subscribed: it only sent
    assert target.state()["dropped"]["direct_subscriptions"] == 1
    canary.check()
    raw.close()
    canary.close()


# -- the log does not flood (item 9) --------------------------------------------------------------
@pytest.mark.timeout(60)
def test_send_to_an_unknown_peer_does_not_flood_the_log(
        make_target: Callable[..., Target]) -> None:
    """Item 9: ``send_to`` an unknown peer on alternating channels logged a warning per
    message. A peer-provoked warning is logged at most once per 10 s, with the count of the
    others; the sender is still told each time (a notice)."""
    target = make_target()
    canary = Canary(target)
    for i in range(300):
        canary.client.send_to("nobody", f"ch{i % 2}", i)
    sync(canary.client)
    wait_until(lambda: target.state()["dropped"]["unknown_targets"] == 300)
    lines = [line for line in target.log().splitlines() if "unknown peer" in line]
    assert len(lines) == 1, lines
    canary.close()


# -- one message limit across a link (item 12) ---------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("bridge_limit,broker_limit", [(4 << 20, 1 << 20), (1 << 20, 4 << 20)])
def test_a_message_legal_on_one_side_of_a_link_never_drops_it(
        sock_path: str, bridge_limit: int, broker_limit: int,
        caplog: pytest.LogCaptureFixture) -> None:
    """Item 12: with different ``max_message`` on bridge and broker, a legal 2 MiB broadcast
    dropped the link or the main client. The bridge's clients are told the smaller limit (a
    ``ValueError`` at the call, nothing sent); a broker-side message over the bridge's limit
    is not sent across (its sender is told, a request fails at once); the link stays up."""
    caplog.set_level(logging.WARNING, logger="ipcbus")
    big = b"x" * (2 << 20)
    with IpcBusBroker.create(max_message=broker_limit).connect(sock_path) as broker, \
            IpcBusBridge.create(max_message=bridge_limit).connect(sock_path):
        main = IpcBusClient.create().connect(peer_name="main")
        main_got = Collector()
        main.on("big", main_got)
        main.on("ask", lambda event, data: event.request.resolve(len(data)))
        sync(main)
        far = IpcBusClient.create().connect(sock_path, peer_name="far")
        far_got = Collector()
        far.on("big", far_got)
        sync(far)
        wait_until(lambda: broker.query_state()["channels"].get("big") == 2)
        with pytest.raises(ValueError):
            main.send("big", big)  # the smaller limit of the two: refused at the call
        if broker_limit > bridge_limit:
            far.send("big", big)  # legal at the broker, not across the link
            assert far_got.wait(1)[0][1] == (big,)
            with pytest.raises(IpcBusRequestError, match="over the message limit"):
                far.request("ask", 5.0, big)
            # the sender's client logs the notice that says why
            wait_until(lambda: any("over the message limit" in r.getMessage()
                                   for r in caplog.records if r.name == "ipcbus"))
        main.send("big", b"small")
        assert main_got.wait(1)[0][1] == (b"small",)
        assert far_got.wait(1 + (broker_limit > bridge_limit))[-1][1] == (b"small",)
        assert sorted(p["name"] for p in broker.query_state()["peers"]) == ["far", "main"]
        far.close()
        main.close()


# -- a protocol error names the rule (readable refusals) -------------------------------------
@pytest.mark.timeout(60)
def test_peer_names_and_ids_are_bounded(make_target: Callable[..., Target]) -> None:
    """A name over 4096 bytes or an id over 128 bytes is refused at PEER_ADD (a protocol error
    for that connection), so every frame a hub builds for a peer stays under the header
    limit."""
    target = make_target()
    canary = Canary(target)
    for info in ([f"{os.getpid()}.n", "n" * 5000, "socket", os.getpid()],
                 ["i" * 200, "n", "socket", os.getpid()]):
        raw = target.raw()
        raw.handshake()
        raw.send(P.encode_frame(Kind.PEER_ADD, sender=info, rid=1))
        assert raw.wait_eof(5.0) is not None
        raw.close()
    assert re.search(r"longer than", target.log())
    canary.check()
    canary.close()
