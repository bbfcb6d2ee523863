"""Alternative (a): a relay broker on ``multiprocessing.connection``.

What a reasonable engineer writes in an afternoon: a ``Listener`` on a Unix socket in its own
process, one thread per accepted connection. A client's first message is the msgpack list of
channels it subscribes to; the broker answers ``b"ok"`` once they are registered. Every later
message is a frame ``[u16 channel length][channel][msgpack body]``; the broker reads the
channel only and forwards the frame as it came, with one ``send_bytes`` per subscriber
(under that subscriber's lock, since several connection threads may write to it). A slow
subscriber blocks the forwarding thread, which stops reading its sender: back-pressure.

Bodies are msgpack ``[seq, payload]``; a request is a message on REQ answered on REP.
"""
from __future__ import annotations

import os
import struct
import threading
import time
from multiprocessing.connection import Client, Connection, Listener
from typing import Any

import msgpack

from harness import BenchFailure, Notify, Round, RoleSpec, Topology

HEAD = struct.Struct("!H")
DATA, ACK, REQ, REP = b"data", b"ack", b"req", b"rep"
SETUP_TIMEOUT = 10.0


def frame(channel: bytes, body: Any) -> bytes:
    packed: bytes = msgpack.packb(body)
    return HEAD.pack(len(channel)) + channel + packed


def body_of(data: bytes, channel: bytes) -> Any:
    return msgpack.unpackb(memoryview(data)[HEAD.size + len(channel):])


class _Subscriber:
    """A connection as the broker sees it, with the lock its writers share."""

    __slots__ = ("conn", "lock")

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.lock = threading.Lock()

    def send(self, data: bytes) -> None:
        with self.lock:
            self.conn.send_bytes(data)


class RelayBroker:
    """The broker role: a Listener, an accept thread, a thread per connection."""

    def __init__(self, path: str) -> None:
        self.listener = Listener(path, family="AF_UNIX")
        self.lock = threading.Lock()
        self.subs: dict[bytes, tuple[_Subscriber, ...]] = {}  # replaced, never mutated
        threading.Thread(target=self._accept, name="accept", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: Connection) -> None:
        me = _Subscriber(conn)
        channels: list[bytes] = []
        try:
            channels = list(msgpack.unpackb(conn.recv_bytes()))
            with me.lock:  # nothing is forwarded to us before the "ok"
                with self.lock:
                    for ch in channels:
                        self.subs[ch] = self.subs.get(ch, ()) + (me,)
                conn.send_bytes(b"ok")
            recv, head = conn.recv_bytes, HEAD
            while True:
                data = recv()
                (n,) = head.unpack_from(data)
                for sub in self.subs.get(data[2:2 + n], ()):
                    sub.send(data)
        except (EOFError, OSError):
            pass
        finally:
            with self.lock:
                for ch in channels:
                    self.subs[ch] = tuple(s for s in self.subs.get(ch, ()) if s is not me)
            conn.close()

    def run(self, cmd: Round, notify: Notify) -> dict[str, Any]:
        raise BenchFailure("the broker takes no rounds")

    def close(self) -> None:
        self.listener.close()


def _join(path: str, channels: list[bytes]) -> Connection:
    conn = Client(path, family="AF_UNIX")
    conn.send_bytes(msgpack.packb(channels))
    if not conn.poll(SETUP_TIMEOUT) or conn.recv_bytes() != b"ok":
        raise BenchFailure("the relay broker did not confirm the subscription")
    return conn


class Subscriber:
    def __init__(self, path: str, index: int = 0) -> None:
        self.conn = _join(path, [DATA])

    def run(self, cmd: Round, notify: Notify) -> dict[str, Any]:
        recv, perf, skip = self.conn.recv_bytes, time.perf_counter, HEAD.size + len(DATA)
        ack_every, last = cmd.ack_every, cmd.n - 1
        t_first = t_last = 0.0
        notify("armed")
        for expected in range(cmd.n):
            data = recv()
            t_last = perf()
            seq, payload = msgpack.unpackb(memoryview(data)[skip:])
            if seq != expected or len(payload) != cmd.size:
                raise BenchFailure(f"expected message {expected} of {cmd.size} bytes, got"
                                   f" {seq} of {len(payload)} bytes: lost or reordered")
            if seq == 0:
                t_first = t_last
            if ack_every and (seq == last or (seq + 1) % ack_every == 0):
                self.conn.send_bytes(frame(ACK, seq))
        return {"count": cmd.n, "t_first": t_first, "t_last": t_last}

    def close(self) -> None:
        self.conn.close()


class Publisher:
    def __init__(self, path: str) -> None:
        self.conn = _join(path, [ACK])

    def _read_ack(self, timeout: float) -> int:
        if not self.conn.poll(timeout):
            raise BenchFailure(f"no acknowledgement in {timeout:.0f} s")
        seq: int = body_of(self.conn.recv_bytes(), ACK)
        return seq

    def run(self, cmd: Round, notify: Notify) -> dict[str, Any]:
        payload = b"x" * cmd.size
        send, window, acked = self.conn.send_bytes, cmd.window, -1
        for seq in range(cmd.n):
            while window and seq - acked > window:
                acked = self._read_ack(cmd.timeout)
            send(frame(DATA, [seq, payload]))
        while window and acked < cmd.n - 1:
            acked = self._read_ack(cmd.timeout)
        return {}

    def close(self) -> None:
        self.conn.close()


class Responder:
    def __init__(self, path: str) -> None:
        self.conn = _join(path, [REQ])

    def run(self, cmd: Round, notify: Notify) -> dict[str, Any]:
        recv, send = self.conn.recv_bytes, self.conn.send_bytes
        notify("armed")
        for _ in range(cmd.warmup + cmd.n):
            seq, payload = body_of(recv(), REQ)
            send(frame(REP, [seq, payload]))
        return {}

    def close(self) -> None:
        self.conn.close()


class Requester:
    def __init__(self, path: str) -> None:
        self.conn = _join(path, [REP])

    def run(self, cmd: Round, notify: Notify) -> dict[str, Any]:
        payload = b"x" * cmd.size
        recv, send, perf = self.conn.recv_bytes, self.conn.send_bytes, time.perf_counter_ns
        lat: list[float] = []
        for i in range(cmd.warmup + cmd.n):
            t0 = perf()
            send(frame(REQ, [i, payload]))
            seq, answer = body_of(recv(), REP)
            t1 = perf()
            if seq != i or answer != payload:
                raise BenchFailure(f"request {i}: wrong answer (seq {seq})")
            if i >= cmd.warmup:
                lat.append((t1 - t0) / 1000.0)
        return {"lat_us": lat}

    def close(self) -> None:
        self.conn.close()


def topology(kind: str, nsubs: int, tmpdir: str) -> Topology:
    path = os.path.join(tmpdir, "relay")
    brokers = [RoleSpec("mp-relay broker", RelayBroker, {"path": path})]
    if kind == "rtt":
        return Topology(brokers=brokers,
                        receivers=[RoleSpec("mp-relay responder", Responder, {"path": path})],
                        senders=[RoleSpec("mp-relay requester", Requester, {"path": path})],
                        broker_label="mp-relay broker")
    receivers = [RoleSpec(f"mp-relay subscriber {i}", Subscriber, {"path": path, "index": i})
                 for i in range(nsubs)]
    return Topology(brokers=brokers, receivers=receivers,
                    senders=[RoleSpec("mp-relay publisher", Publisher, {"path": path})],
                    broker_label="mp-relay broker")
