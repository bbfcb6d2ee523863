"""Resources (SPEC 0.2 "Resources"): what a peer may cost a hub. Every descriptor has one
owner and is closed on every path; frames the hub builds obey the limits; counters are
bounded; a connection that feeds its own queue is held back; one connection's trouble never
stops the hub. Real brokers and bridges, raw peers on real sockets, real processes.

Each test reproduces an item of issue 14 (its number is in the docstring).
"""
from __future__ import annotations

import array
import logging
import os
import resource
import signal
import socket
import threading
import time
from typing import Any, Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipcbus import (IpcBusBridge, IpcBusBroker, IpcBusClient, IpcBusConnectionError,
                    IpcBusRequestError, IpcBusTimeoutError)
from ipcbus import _protocol as P
from ipcbus import broker as B
from ipcbus._protocol import Kind
from ipcbus.spy import IpcBusSpy

from helpers.rawbus import BridgeTarget, Canary, Target, make_target  # noqa: F401
from helpers.rawpeer import RawPeer
from helpers import Children, Collector, sync, wait_until

MiB = 1 << 20


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def send_with_fds(raw: RawPeer, data: bytes, fds: list[int]) -> None:
    raw.sock.settimeout(5.0)
    raw.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])


# -- descriptors (items 1, 3) -------------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("announced", [0, 1])
def test_descriptors_no_frame_announced_close_that_connection(
        make_target: Callable[..., Target], announced: int) -> None:
    """Item 1: the broker kept descriptors that no frame announced (4 x 253 sent on frames
    announcing 0 or 1) and ran near its descriptor limit. Now they are a protocol error for
    that connection, and every one of them is closed."""
    target = make_target()
    canary = Canary(target)
    r, w = os.pipe()
    try:
        baseline = fd_count(target.pid())
        for _ in range(4):
            raw = target.raw()
            raw.join("hoarder")
            body = P.pack_payload([[], ["fd"] * announced]) if announced else P.pack_payload([1])
            frame = P.encode_frame(Kind.SEND, "fds", raw.info, None, 0, body, announced)
            send_with_fds(raw, frame, [r] * 253)
            assert raw.wait_eof(5.0) is not None
            raw.close()
        canary.check()
        wait_until(lambda: fd_count(target.pid()) <= baseline)
        assert "descriptors" in target.log()
    finally:
        os.close(r)
        os.close(w)
        canary.close()


@pytest.mark.timeout(60)
def test_descriptors_only_travel_on_messages(make_target: Callable[..., Target]) -> None:
    """A SUBSCRIBE (or any frame but a message) that announces a descriptor is a protocol
    error; the descriptor is closed."""
    target = make_target()
    canary = Canary(target)
    r, w = os.pipe()
    try:
        baseline = fd_count(target.pid())
        raw = target.raw()
        raw.join("odd")
        send_with_fds(raw, raw.frame(Kind.SUBSCRIBE, "x", rid=1, nfds=1), [r])
        assert raw.wait_eof(5.0) is not None
        raw.close()
        wait_until(lambda: fd_count(target.pid()) <= baseline)
        canary.check()
    finally:
        os.close(r)
        os.close(w)
        canary.close()


@pytest.mark.timeout(60)
def test_out_of_descriptors_fails_the_post_and_keeps_the_sender(sock_path: str) -> None:
    """Item 3: running out of descriptors while copying them for the receivers leaked the
    copies made and dropped the sender as an "internal error". Now the post fails with a
    clear error, nothing is delivered, nothing leaks, and the sender's connection goes on."""
    with IpcBusBroker.create().connect(sock_path) as broker:
        pid = broker.process.pid
        receivers = []
        for i in range(3):
            raw = RawPeer.unix(sock_path)
            raw.join(f"receiver-{i}")
            raw.send(raw.frame(Kind.SUBSCRIBE, "ports", rid=1))
            receivers.append(raw)
        poster = IpcBusClient.create().connect(sock_path, peer_name="poster")
        sync(poster)
        wait_until(lambda: broker.query_state()["channels"].get("ports") == 3)
        pipes = [os.pipe() for _ in range(2)]
        ports = [fd for pair in pipes for fd in pair]  # 4 descriptors, 12 copies to make
        soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        baseline = fd_count(pid)
        try:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (baseline + 10, hard))
            with pytest.raises(IpcBusRequestError, match="could not copy the descriptors"):
                poster.post_message("ports", "m", ports=ports)
            assert fd_count(pid) <= baseline
            for raw in receivers:
                with pytest.raises(TimeoutError):
                    raw.expect(Kind.SEND, timeout=0.2)
            for fd in ports:
                os.fstat(fd)  # still the poster's
        finally:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        poster.post_message("ports", "again", ports=ports)
        for raw in receivers:
            frame = raw.expect(Kind.SEND)
            assert frame.nfds == 4
        assert poster.request("/ipcbus/queryState", 5.0).payload["dropped"][
            "descriptor_copies_failed"] == 1
        for raw in receivers:
            raw.close()
        poster.close()
        for fd in ports:
            os.close(fd)


# -- a connection that feeds its own queue (item 4) ------------------------------------------------
def _self_feeder(path: str, ready: Any, result: Any) -> None:
    """A process whose listener is stuck while another of its threads broadcasts on that
    listener's channel."""
    client = IpcBusClient.create().connect(path, peer_name="self-feeder")
    stuck = threading.Event()
    client.on("self", lambda event, *args: stuck.wait(60))
    client.request("/ipcbus/queryState", 10.0)
    ready.put("ready")
    payload = b"z" * 1000
    sent = 0
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            client.send("self", payload)
            sent += 1
    except IpcBusConnectionError as exc:
        result.put(("closed", sent, str(exc)))
        return
    result.put(("still sending", sent, ""))


@pytest.mark.timeout(90)
def test_a_connection_that_feeds_its_own_queue_is_held_back(sock_path: str, children: Children,
                                                            capfd: pytest.CaptureFixture[str]
                                                            ) -> None:
    """Item 4: the broker grew from 23 to 778 MiB with a 1 MiB queue limit: a connection that
    fed its own queue was never held back. Now it is paused like any sender, its sends slow
    down, and it is disconnected as a slow consumer; the broker's memory stays bounded."""
    with IpcBusBroker.create(queue_limit=1 * MiB,
                             slow_consumer_timeout=2.0).connect(sock_path) as broker:
        pid = broker.process.pid
        before = rss(pid)
        ready, result = children.ctx.Queue(), children.ctx.Queue()
        children.start(_self_feeder, sock_path, ready, result)
        assert ready.get(timeout=30) == "ready"
        peak = before
        deadline = time.monotonic() + 40
        outcome = None
        while outcome is None and time.monotonic() < deadline:
            peak = max(peak, rss(pid))
            try:
                outcome = result.get(timeout=0.05)
            except Exception:
                pass
        # (its reader is stuck too, so it may see a broken pipe before the closing notice)
        assert outcome is not None and outcome[0] == "closed", outcome
        assert "disconnecting" in (err := capfd.readouterr().err) and "slow consumer" in err
        assert peak - before < 64 * MiB, (before, peak)


# -- frames the hub builds (item 5) ------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_a_state_over_the_message_limit_fails_the_request_not_the_asker(
        make_target: Callable[..., Target]) -> None:
    """Item 5: a queryState answer over ``max_message`` dropped the asker. Now the request
    fails with the reason and the asker goes on."""
    target = make_target(max_message=16 * 1024)
    canary = Canary(target)
    for i in range(200):
        canary.client.on(f"channel-with-a-rather-long-name-{i:04d}-" + "x" * 60,
                         lambda event: None)
    with pytest.raises(IpcBusRequestError, match="over the message limit"):
        canary.client.request("/ipcbus/queryState", 5.0)
    canary.check()
    assert len(target.state()["channels"]) >= 200  # the owner's own view has no such limit
    canary.close()


@pytest.mark.timeout(60)
def test_a_spy_copy_over_the_limit_becomes_a_notice(
        make_target: Callable[..., Target], caplog: pytest.LogCaptureFixture) -> None:
    """Item 5: a spy copy of a message at the size limit is larger than the limit (it wraps the
    whole frame): it dropped the spy. Now the spy gets a notice instead, and stays."""
    caplog.set_level(logging.WARNING, logger="ipcbus")
    limit = 64 * 1024
    target = make_target(max_message=limit)
    canary = Canary(target)
    seen: list[Any] = []
    spy = IpcBusSpy(seen.append).connect(target.address())
    got = Collector()
    canary.client.on("big", got)
    sync(canary.client)
    payload = b"b" * (limit - 16)
    canary.client.send("big", payload)
    assert got.wait(1)[0][1] == (payload,)
    wait_until(lambda: any("not copied" in r.getMessage() for r in caplog.records))
    canary.client.send("big", b"small")
    wait_until(lambda: any(r.channel == "big" for r in seen))
    assert spy.client.connected
    assert target.state()["dropped"]["spy_copies_over_limit"] == 1
    spy.close()
    canary.close()


@pytest.mark.timeout(60)
def test_a_forwarded_subscription_always_fits_its_header(sock_path: str) -> None:
    """Item 5: a long peer name plus a long channel made the bridge's forwarded SUBSCRIBE
    exceed the 8 KiB header limit and killed the bridge's thread. Names are bounded so that
    every frame a hub builds for a peer fits; the longest name and channel cross the link."""
    name = "n" * P.MAX_PEER_NAME
    channel = "c" * P.MAX_CHANNEL
    with IpcBusBroker.create().connect(sock_path) as broker, \
            IpcBusBridge.create().connect(sock_path) as bridge:
        main = IpcBusClient.create().connect(peer_name=name)
        got = Collector()
        main.on(channel, got)
        sync(main)
        wait_until(lambda: broker.query_state()["channels"].get(channel) == 1)
        far = IpcBusClient.create().connect(sock_path, peer_name="far")
        far.send(channel, 1)
        assert got.wait(1)[0][1] == (1,)
        assert bridge._hub is not None and bridge._hub.thread is not None
        assert bridge._hub.thread.is_alive()
        far.close()
        main.close()


# -- bounded counters (item 6) -----------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_subscription_counts_are_bounded(make_target: Callable[..., Target]) -> None:
    """Item 6: three SUBSCRIBE frames with count 2**63-1 made the state unencodable; the
    broker process died on ``query_state()``. A count over the limit is a protocol error for
    that connection; the state still encodes."""
    target = make_target()
    canary = Canary(target)
    raw = target.raw()
    raw.join("counter")
    for _ in range(3):
        raw.send(raw.frame(Kind.SUBSCRIBE, "x", rid=2**63 - 1))
    assert raw.wait_eof(5.0) is not None
    raw = target.raw()
    raw.join("counter-2")
    for _ in range(P.MAX_SUBSCRIBE_COUNT // P.MAX_SUBSCRIBE_STEP + 2):
        if not raw.send(raw.frame(Kind.SUBSCRIBE, "y", rid=P.MAX_SUBSCRIBE_STEP)):
            break
    assert raw.wait_eof(5.0) is not None
    assert "over the limit" in target.log()
    assert target.state()["pid"] > 0
    canary.check()
    canary.close()


# -- the broker handle (item 14) -----------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_a_late_answer_is_never_taken_for_the_next_ask(sock_path: str) -> None:
    """Item 14: after one ``query_state()`` timed out, every later call returned the previous
    answer. Each ask carries a number; an older answer is dropped."""
    with IpcBusBroker.create().connect(sock_path) as broker:
        pid = broker.process.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            with pytest.raises(IpcBusTimeoutError):
                broker.query_state(0.2)
        finally:
            os.kill(pid, signal.SIGCONT)
        client = IpcBusClient.create().connect(sock_path, peer_name="after")
        client.on("marker", lambda event: None)
        sync(client)
        assert "marker" in broker.query_state()["channels"]
        assert [p["name"] for p in broker.query_state()["peers"]] == ["after"]
        client.close()


# -- TCP authentication (item 17) ------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_trickled_authentications_hold_no_slot_past_the_deadline() -> None:
    """Item 17: 32 connections trickling their authentication one byte at a time held every
    slot far past the handshake timeout, and a good client was refused. Each authentication
    has one overall deadline now."""
    with IpcBusBroker.create(handshake_timeout=1.0).connect(0) as broker:
        assert isinstance(broker.address, tuple)
        assert isinstance(broker.address[0], str)
        stop = threading.Event()
        socks: list[socket.socket] = []

        address = broker.address

        def trickle() -> None:
            sock = socket.create_connection(address, timeout=5)
            socks.append(sock)
            while not stop.wait(0.2):
                try:
                    sock.send(b"\x00")
                except OSError:
                    return

        threads = [threading.Thread(target=trickle, daemon=True) for _ in range(B.MAX_AUTHENTICATIONS + 8)]
        for t in threads:
            t.start()
        try:
            wait_until(lambda: broker.query_state()["tcp_authentications"]["running"]
                       == B.MAX_AUTHENTICATIONS)
            started = time.monotonic()
            wait_until(lambda: broker.query_state()["tcp_authentications"]["running"] == 0,
                       timeout=5.0)
            assert time.monotonic() - started < 3.5
            good = IpcBusClient.create().connect(broker.address, timeout=5.0)
            assert good.request("/ipcbus/queryState", 5.0).payload["pid"] == broker.process.pid
            good.close()
        finally:
            stop.set()
            for t in threads:
                t.join(5)
            for sock in socks:
                sock.close()


# -- the socket file (item 18) -----------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_closing_a_broker_removes_its_socket_file_only(sock_path: str) -> None:
    """Item 18: closing broker 1 removed the live socket file of broker 2, started on the same
    path after broker 1's file had been replaced."""
    first = IpcBusBroker.create().connect(sock_path)
    try:
        os.unlink(sock_path)  # replaced: someone removed it, and another broker took the path
        with IpcBusBroker.create().connect(sock_path) as second:
            first.close()
            assert os.path.exists(sock_path)
            client = IpcBusClient.create().connect(sock_path)
            assert client.request("/ipcbus/queryState", 5.0).payload["pid"] == \
                second.process.pid
            client.close()
        assert not os.path.exists(sock_path)  # its own file: removed
    finally:
        first.close()


# -- one connection's trouble never stops the hub (items 5, 23) ------------------------------------------
@pytest.fixture
def hub_pair() -> Iterator[tuple[B.Hub, B._Endpoint, socket.socket]]:
    hub = B.Hub(B.HubOptions())
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ep = hub.add_endpoint(mine, "test", ptype="socket", ready=True)
    try:
        yield hub, ep, theirs
    finally:
        theirs.close()
        hub._shutdown()


def test_an_endpoint_dropped_earlier_in_a_batch_is_not_flushed(
        hub_pair: tuple[B.Hub, B._Endpoint, socket.socket]) -> None:
    """Item 23: the broker died (``selector.register`` of descriptor -1) when an endpoint
    dropped earlier in the same batch of events was then flushed."""
    hub, ep, _ = hub_pair
    ep.deliver(P.encode_frame(Kind.SEND, "x", ["p", "p", "socket", 1]), [])
    hub.drop(ep, "test")
    hub._on_io(ep, B._READ | B._WRITE)
    hub._flush(ep)
    assert ep not in hub.endpoints


@pytest.mark.timeout(60)
def test_an_error_while_serving_one_connection_drops_only_it(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """SPEC "Resources": an exception while serving one connection closes that connection,
    never the hub. A bug is simulated in the router (any frame on channel "boom"), in a
    bridge: its hub runs the broker's loop on a thread of this process, where the test can
    reach it."""
    target = BridgeTarget(caplog, handshake_timeout=0.5)
    try:
        canary = Canary(target)
        hub = target.bridge._hub
        assert hub is not None
        real = hub.router.handle

        def handle(endpoint: Any, frame: P.Frame) -> None:
            if frame.channel == "boom":
                raise RuntimeError("a bug")
            real(endpoint, frame)

        monkeypatch.setattr(hub.router, "handle", handle)
        raw = target.raw()
        raw.join("boom")
        raw.send(raw.frame(Kind.SEND, "boom", body=P.pack_payload([1])))
        assert raw.wait_eof(5.0) is not None
        assert target.alive()
        canary.check()
        raw.close()
        canary.close()
    finally:
        target.close()


def _large_receiver(path: str, ready: Any) -> None:
    client = IpcBusClient.create().connect(path, peer_name="large-receiver")
    client.on("large", lambda event, data: None)
    client.request("/ipcbus/queryState", 10.0)
    ready.send(os.getpid())
    threading.Event().wait(60)


@pytest.mark.timeout(120)
def test_receivers_killed_in_the_middle_of_large_messages(sock_path: str,
                                                          children: Children) -> None:
    """Item 23: the broker died in about 1 run in 10 when a receiver was SIGKILLed in the
    middle of a stream of large messages. Ten receivers are killed one after another while a
    sender streams 1 MiB messages; the broker serves the sender throughout."""
    with IpcBusBroker.create().connect(sock_path) as broker:
        sender = IpcBusClient.create().connect(sock_path, peer_name="sender")
        payload = b"L" * MiB
        for _ in range(10):
            # a pipe each: a process killed while it holds a shared Queue's lock breaks it
            ready, ready_w = children.ctx.Pipe(duplex=False)
            proc = children.start(_large_receiver, sock_path, ready_w)
            assert ready.poll(30)
            ready.recv()
            for i in range(8):
                sender.send("large", payload)
                if i == 3:
                    os.kill(proc.pid, signal.SIGKILL)
            proc.join(10)
            assert broker.process.is_alive()
        sync(sender)
        assert broker.process.is_alive()
        sender.close()


# -- one owner per descriptor, whatever the frames announce (the principle) ------------------
@pytest.mark.timeout(120)
@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=1, max_size=6))
def test_every_descriptor_is_delivered_once_or_closed(sock_path: str,
                                                     script: list[tuple[int, int]]) -> None:
    """Frames that announce ``k`` descriptors and carry ``m`` (k, m in 0..3, any order): each
    message that is routed reaches the receiver with exactly its own descriptors, anything
    else closes the sender's connection, and afterwards the broker holds no descriptor more
    than before."""
    with IpcBusBroker.create().connect(sock_path) as broker:
        pid = broker.process.pid
        receiver = RawPeer.unix(sock_path)
        receiver.join("receiver")
        receiver.send(receiver.frame(Kind.SUBSCRIBE, "fds", rid=1))
        wait_until(lambda: broker.query_state()["channels"].get("fds") == 1)
        baseline = fd_count(pid)
        r, w = os.pipe()
        sender = RawPeer.unix(sock_path)
        sender.join("sender")
        routed = 0
        try:
            for announced, attached in script:
                body = P.pack_payload([[routed], ["fd"] * announced])
                frame = P.encode_frame(Kind.SEND, "fds", sender.info, None, 0, body, announced)
                if attached:
                    send_with_fds(sender, frame, [r] * attached)
                elif not sender.send(frame):
                    break
                if announced != attached:
                    assert sender.wait_eof(5.0) is not None  # that connection only
                    break
                got = receiver.expect(Kind.SEND)
                assert got.nfds == announced and len(receiver.fds) == announced
                for fd in receiver.fds:  # its own copies: a pipe's read end, as sent
                    assert os.fstat(fd).st_ino == os.fstat(r).st_ino
                    os.close(fd)
                receiver.fds.clear()
                routed += 1
            sender.close()
            wait_until(lambda: fd_count(pid) <= baseline)
        finally:
            os.close(r)
            os.close(w)
            receiver.close()
