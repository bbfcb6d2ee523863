"""Alternative (b): pyzmq proxies over ``ipc://`` (only if pyzmq is installed: the ``bench``
extra of setup.cfg).

* W2-W4: an XSUB/XPUB proxy (``zmq.proxy_steerable``, stopped by TERMINATE on its control
  socket). Messages are three frames ``[topic, msgpack seq, payload]``; payloads of 64 KiB
  and more travel zero-copy (``copy=False``), as pyzmq recommends.
* W1: a ROUTER/DEALER proxy; a REQ requester, a REP responder; bodies msgpack ``[seq, payload]``.

No loss: plain PUB drops at its high-water mark, so the publishing sockets (the publisher's and
the proxy's) are XPUBs with ``XPUB_NODROP`` and blocking sends, which turns the high-water
mark into back-pressure. No slow-joiner guessing: the publisher is an XPUB with
``XPUB_VERBOSE`` and waits until it has seen the subscription of every subscriber (each
subscribes to its own ``ready-i`` topic besides ``data``; unique topics survive the proxy's
deduplication). The acknowledgements of W4 flow back through the same proxy, and the
subscriber waits for the publisher's ``ack`` subscription the same way.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Any

import msgpack

from harness import BenchFailure, Notify, Round, RoleSpec, Topology

zmq: Any
try:
    import zmq  # type: ignore[no-redef,unused-ignore]
except ImportError:  # the suite reports pyzmq as skipped
    zmq = None

AVAILABLE = zmq is not None
VERSION = f"{zmq.pyzmq_version()} (libzmq {zmq.zmq_version()})" if AVAILABLE else None
DATA, ACK = b"data", b"ack"
LARGE = 64 * 1024  # from this size on, payloads are sent and received zero-copy
SETUP_TIMEOUT = 10.0


def endpoint(tmpdir: str, name: str) -> str:
    return "ipc://" + os.path.join(tmpdir, name)


def _ready_topic(index: int) -> bytes:
    return b"ready-%d" % index


def _wait_subscriptions(sock: Any, topics: set[bytes], timeout: float) -> None:
    """Read an XPUB's subscription messages until each of ``topics`` has been seen."""
    deadline = time.monotonic() + timeout
    missing = set(topics)
    while missing:
        left = deadline - time.monotonic()
        if left <= 0 or not sock.poll(int(left * 1000)):
            raise BenchFailure(f"subscriptions never arrived: {sorted(missing)}")
        msg = sock.recv()
        if msg[:1] == b"\x01":
            missing.discard(msg[1:])


class ZmqProxy:
    """The broker role: a steerable proxy on a thread, in its own process."""

    def __init__(self, mode: str, tmpdir: str) -> None:
        self.ctx = zmq.Context()
        if mode == "pubsub":
            self.front = self.ctx.socket(zmq.XSUB)
            self.front.bind(endpoint(tmpdir, "in"))
            self.back = self.ctx.socket(zmq.XPUB)
            self.back.setsockopt(zmq.XPUB_VERBOSE, 1)  # every subscription reaches publishers
            self.back.setsockopt(zmq.XPUB_NODROP, 1)
            self.back.bind(endpoint(tmpdir, "out"))
        else:
            self.front = self.ctx.socket(zmq.ROUTER)
            self.front.bind(endpoint(tmpdir, "req"))
            self.back = self.ctx.socket(zmq.DEALER)
            self.back.bind(endpoint(tmpdir, "rep"))
        control = self.ctx.socket(zmq.PAIR)
        control.bind("inproc://control")
        self.control = self.ctx.socket(zmq.PAIR)
        self.control.connect("inproc://control")
        self.thread = threading.Thread(target=zmq.proxy_steerable,
                                       args=(self.front, self.back, None, control),
                                       name="proxy", daemon=True)
        self.thread.start()
        self._sockets = [self.front, self.back, control, self.control]

    def run(self, cmd: Round, notify: Notify) -> dict[str, Any]:
        raise BenchFailure("the proxy takes no rounds")

    def close(self) -> None:
        self.control.send(b"TERMINATE")
        self.thread.join(5.0)
        for sock in self._sockets:
            sock.close(linger=0)
        self.ctx.term()


class Subscriber:
    def __init__(self, tmpdir: str, index: int = 0) -> None:
        self.ctx = zmq.Context()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.connect(endpoint(tmpdir, "out"))
        self.sub.setsockopt(zmq.SUBSCRIBE, DATA)
        self.sub.setsockopt(zmq.SUBSCRIBE, _ready_topic(index))
        self.acks = self.ctx.socket(zmq.XPUB)
        self.acks.connect(endpoint(tmpdir, "in"))
        self.acks_ready = False

    def run(self, cmd: Round, notify: Notify) -> dict[str, Any]:
        if cmd.ack_every and not self.acks_ready:  # the publisher has subscribed to ACK
            _wait_subscriptions(self.acks, {ACK}, cmd.timeout)
            self.acks_ready = True
        self.sub.setsockopt(zmq.RCVTIMEO, int(cmd.timeout * 1000))
        recv, perf, copy = self.sub.recv_multipart, time.perf_counter, cmd.size < LARGE
        ack_every, last = cmd.ack_every, cmd.n - 1
        t_first = t_last = 0.0
        notify("armed")
        try:
            for expected in range(cmd.n):
                if copy:
                    parts = recv()
                    t_last = perf()
                    seq, size = msgpack.unpackb(parts[1]), len(parts[2])
                else:
                    frames = recv(copy=False)
                    t_last = perf()
                    seq, size = msgpack.unpackb(frames[1].buffer), len(frames[2].buffer)
                if seq != expected or size != cmd.size:
                    raise BenchFailure(f"expected message {expected} of {cmd.size} bytes, got"
                                       f" {seq} of {size} bytes: lost or reordered")
                if seq == 0:
                    t_first = t_last
                if ack_every and (seq == last or (seq + 1) % ack_every == 0):
                    self.acks.send_multipart([ACK, msgpack.packb(seq)])
        except zmq.Again:
            raise BenchFailure(f"received {expected} of {cmd.n} messages in"
                               f" {cmd.timeout:.0f} s: lost or stuck") from None
        return {"count": cmd.n, "t_first": t_first, "t_last": t_last}

    def close(self) -> None:
        self.sub.close(linger=0)
        self.acks.close(linger=0)
        self.ctx.term()


class Publisher:
    def __init__(self, tmpdir: str, nsubs: int) -> None:
        self.ctx = zmq.Context()
        self.pub = self.ctx.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.XPUB_VERBOSE, 1)
        self.pub.setsockopt(zmq.XPUB_NODROP, 1)
        self.pub.connect(endpoint(tmpdir, "in"))
        self.acks = self.ctx.socket(zmq.SUB)
        self.acks.connect(endpoint(tmpdir, "out"))
        self.acks.setsockopt(zmq.SUBSCRIBE, ACK)
        _wait_subscriptions(self.pub, {_ready_topic(i) for i in range(nsubs)}, SETUP_TIMEOUT)

    def _read_ack(self, timeout: float) -> int:
        if not self.acks.poll(int(timeout * 1000)):
            raise BenchFailure(f"no acknowledgement in {timeout:.0f} s")
        seq: int = msgpack.unpackb(self.acks.recv_multipart()[1])
        return seq

    def run(self, cmd: Round, notify: Notify) -> dict[str, Any]:
        payload = b"x" * cmd.size
        send, copy, window, acked = self.pub.send, cmd.size < LARGE, cmd.window, -1
        more, packb = zmq.SNDMORE, msgpack.packb
        for seq in range(cmd.n):
            while window and seq - acked > window:
                acked = self._read_ack(cmd.timeout)
            send(DATA, more)
            send(packb(seq), more)
            send(payload, 0, copy)
        while window and acked < cmd.n - 1:
            acked = self._read_ack(cmd.timeout)
        return {}

    def close(self) -> None:
        self.pub.close(linger=0)
        self.acks.close(linger=0)
        self.ctx.term()


class Responder:
    def __init__(self, tmpdir: str) -> None:
        self.ctx = zmq.Context()
        self.rep = self.ctx.socket(zmq.REP)
        self.rep.connect(endpoint(tmpdir, "rep"))

    def run(self, cmd: Round, notify: Notify) -> dict[str, Any]:
        self.rep.setsockopt(zmq.RCVTIMEO, int(cmd.timeout * 1000))
        recv, send, packb, unpackb = self.rep.recv, self.rep.send, msgpack.packb, msgpack.unpackb
        notify("armed")
        try:
            for _ in range(cmd.warmup + cmd.n):
                seq, payload = unpackb(recv())
                send(packb([seq, payload]))
        except zmq.Again:
            raise BenchFailure(f"no request in {cmd.timeout:.0f} s") from None
        return {}

    def close(self) -> None:
        self.rep.close(linger=0)
        self.ctx.term()


class Requester:
    def __init__(self, tmpdir: str) -> None:
        self.ctx = zmq.Context()
        self.req = self.ctx.socket(zmq.REQ)
        self.req.connect(endpoint(tmpdir, "req"))

    def run(self, cmd: Round, notify: Notify) -> dict[str, Any]:
        self.req.setsockopt(zmq.RCVTIMEO, int(cmd.timeout * 1000))
        payload = b"x" * cmd.size
        recv, send, perf = self.req.recv, self.req.send, time.perf_counter_ns
        packb, unpackb = msgpack.packb, msgpack.unpackb
        lat: list[float] = []
        try:
            for i in range(cmd.warmup + cmd.n):
                t0 = perf()
                send(packb([i, payload]))
                seq, answer = unpackb(recv())
                t1 = perf()
                if seq != i or answer != payload:
                    raise BenchFailure(f"request {i}: wrong answer (seq {seq})")
                if i >= cmd.warmup:
                    lat.append((t1 - t0) / 1000.0)
        except zmq.Again:
            raise BenchFailure(f"no answer in {cmd.timeout:.0f} s") from None
        return {"lat_us": lat}

    def close(self) -> None:
        self.req.close(linger=0)
        self.ctx.term()


def topology(kind: str, nsubs: int, tmpdir: str) -> Topology:
    if kind == "rtt":
        return Topology(brokers=[RoleSpec("zmq ROUTER/DEALER proxy", ZmqProxy,
                                          {"mode": "reqrep", "tmpdir": tmpdir})],
                        receivers=[RoleSpec("zmq responder", Responder, {"tmpdir": tmpdir})],
                        senders=[RoleSpec("zmq requester", Requester, {"tmpdir": tmpdir})],
                        broker_label="zmq proxy")
    receivers = [RoleSpec(f"zmq subscriber {i}", Subscriber, {"tmpdir": tmpdir, "index": i})
                 for i in range(nsubs)]
    return Topology(brokers=[RoleSpec("zmq XSUB/XPUB proxy", ZmqProxy,
                                      {"mode": "pubsub", "tmpdir": tmpdir})],
                    receivers=receivers,
                    senders=[RoleSpec("zmq publisher", Publisher,
                                      {"tmpdir": tmpdir, "nsubs": nsubs})],
                    broker_label="zmq proxy")
