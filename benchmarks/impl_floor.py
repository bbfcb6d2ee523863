"""The floor: raw ``multiprocessing.Pipe`` and ``socket.socketpair`` between two processes.

No broker, no encoding: a message is an 8-byte little-endian sequence number followed by the
payload. Round trips are echoed back by the other process; streams are one-way, a
``send_bytes``/``sendall`` per message, with the kernel's blocking writes as back-pressure.

* Pipe: ``send_bytes`` of one preallocated buffer; ``recv_bytes`` (a fresh ``bytes`` per
  message, as a reader of ``Connection`` would do).
* socketpair: fixed-size records (the size is known to both sides); ``sendall`` per record;
  the reader ``recv_into``s a reusable buffer and cuts records out of it.

The same loops serve the ipcbus direct channel of W5 (a ``create_channel()`` end is a
``Connection``), see ``impl_ipcbus``.
"""
from __future__ import annotations

import multiprocessing.connection
import socket
import struct
import time
from typing import Any

from harness import BenchFailure, Notify, Round, RoleSpec, Topology

SEQ = struct.Struct("<Q")
Connection = multiprocessing.connection.Connection


def _record(size: int) -> bytearray:
    return bytearray(SEQ.size + size)


def _stream_result(n: int, t_first: float, t_last: float) -> dict[str, Any]:
    return {"count": n, "t_first": t_first, "t_last": t_last}


# -- Connection loops (Pipe floor and the ipcbus direct channel) ---------------------------------
def conn_rtt(conn: Connection, cmd: Round) -> dict[str, Any]:
    """Round trips: send a record, wait for it to come back; latencies of the measured ones."""
    buf = _record(cmd.size)
    lat: list[float] = []
    perf = time.perf_counter_ns
    for i in range(cmd.warmup + cmd.n):
        SEQ.pack_into(buf, 0, i)
        t0 = perf()
        conn.send_bytes(buf)
        back = conn.recv_bytes()
        t1 = perf()
        if len(back) != len(buf) or SEQ.unpack_from(back)[0] != i:
            raise BenchFailure(f"round trip {i}: wrong reply ({len(back)} bytes)")
        if i >= cmd.warmup:
            lat.append((t1 - t0) / 1000.0)
    return {"lat_us": lat}


def conn_echo(conn: Connection, cmd: Round) -> dict[str, Any]:
    for _ in range(cmd.warmup + cmd.n):
        conn.send_bytes(conn.recv_bytes())
    return {}


def conn_send_stream(conn: Connection, cmd: Round) -> dict[str, Any]:
    buf = _record(cmd.size)
    for seq in range(cmd.n):
        SEQ.pack_into(buf, 0, seq)
        conn.send_bytes(buf)
    return {}


def conn_recv_stream(conn: Connection, cmd: Round) -> dict[str, Any]:
    want = SEQ.size + cmd.size
    perf = time.perf_counter
    t_first = t_last = 0.0
    for seq in range(cmd.n):
        data = conn.recv_bytes()
        t_last = perf()
        if len(data) != want or SEQ.unpack_from(data)[0] != seq:
            got = SEQ.unpack_from(data)[0] if len(data) >= SEQ.size else None
            raise BenchFailure(f"expected message {seq} of {want} bytes, got {got} of"
                               f" {len(data)} bytes: lost or reordered")
        if seq == 0:
            t_first = t_last
    return _stream_result(cmd.n, t_first, t_last)


# -- socket loops --------------------------------------------------------------------------------
def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    got, want = 0, len(view)
    while got < want:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise BenchFailure("the peer closed the socket")
        got += k


def sock_rtt(sock: socket.socket, cmd: Round) -> dict[str, Any]:
    buf = _record(cmd.size)
    back = bytearray(len(buf))
    view = memoryview(back)
    lat: list[float] = []
    perf = time.perf_counter_ns
    for i in range(cmd.warmup + cmd.n):
        SEQ.pack_into(buf, 0, i)
        t0 = perf()
        sock.sendall(buf)
        _recv_exact(sock, view)
        t1 = perf()
        if SEQ.unpack_from(back)[0] != i:
            raise BenchFailure(f"round trip {i}: wrong reply")
        if i >= cmd.warmup:
            lat.append((t1 - t0) / 1000.0)
    return {"lat_us": lat}


def sock_echo(sock: socket.socket, cmd: Round) -> dict[str, Any]:
    buf = _record(cmd.size)
    view = memoryview(buf)
    for _ in range(cmd.warmup + cmd.n):
        _recv_exact(sock, view)
        sock.sendall(buf)
    return {}


def sock_send_stream(sock: socket.socket, cmd: Round) -> dict[str, Any]:
    buf = _record(cmd.size)
    for seq in range(cmd.n):
        SEQ.pack_into(buf, 0, seq)
        sock.sendall(buf)
    return {}


def sock_recv_stream(sock: socket.socket, cmd: Round) -> dict[str, Any]:
    rec = SEQ.size + cmd.size
    buf = bytearray(max(rec, 256 * 1024))
    view = memoryview(buf)
    perf = time.perf_counter
    have = seq = 0
    t_first = t_last = 0.0
    while seq < cmd.n:
        k = sock.recv_into(view[have:])
        if k == 0:
            raise BenchFailure(f"the peer closed the socket after {seq} of {cmd.n} messages")
        have += k
        whole = have // rec
        if not whole:
            continue
        t_last = perf()
        for i in range(whole):
            got = SEQ.unpack_from(buf, i * rec)[0]
            if got != seq:
                raise BenchFailure(f"expected message {seq}, got {got}: lost or reordered")
            seq += 1
        if t_first == 0.0:
            t_first = t_last
        rest = have - whole * rec
        if rest:
            buf[:rest] = buf[whole * rec:have]
        have = rest
    return _stream_result(cmd.n, t_first, t_last)


# -- roles ---------------------------------------------------------------------------------------
class PipeRequester:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def run(self, cmd: Round, notify: Notify) -> dict[str, Any]:
        return conn_rtt(self.conn, cmd)

    def close(self) -> None:
        self.conn.close()


class PipeResponder(PipeRequester):
    def run(self, cmd: Round, notify: Notify) -> dict[str, Any]:
        notify("armed")
        return conn_echo(self.conn, cmd)


class PipePublisher(PipeRequester):
    def run(self, cmd: Round, notify: Notify) -> dict[str, Any]:
        return conn_send_stream(self.conn, cmd)


class PipeSubscriber(PipeRequester):
    def run(self, cmd: Round, notify: Notify) -> dict[str, Any]:
        notify("armed")
        return conn_recv_stream(self.conn, cmd)


class SockRequester:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def run(self, cmd: Round, notify: Notify) -> dict[str, Any]:
        return sock_rtt(self.sock, cmd)

    def close(self) -> None:
        self.sock.close()


class SockResponder(SockRequester):
    def run(self, cmd: Round, notify: Notify) -> dict[str, Any]:
        notify("armed")
        return sock_echo(self.sock, cmd)


class SockPublisher(SockRequester):
    def run(self, cmd: Round, notify: Notify) -> dict[str, Any]:
        return sock_send_stream(self.sock, cmd)


class SockSubscriber(SockRequester):
    def run(self, cmd: Round, notify: Notify) -> dict[str, Any]:
        notify("armed")
        return sock_recv_stream(self.sock, cmd)


# -- topologies ----------------------------------------------------------------------------------
def pipe_topology(kind: str, nsubs: int, tmpdir: str) -> Topology:
    if nsubs != 1:
        raise ValueError("the floor connects two processes only")
    a, b = multiprocessing.Pipe(duplex=True)
    receiver = PipeResponder if kind == "rtt" else PipeSubscriber
    sender = PipeRequester if kind == "rtt" else PipePublisher

    def drop_ours() -> None:  # the children have their own copies now
        a.close()
        b.close()

    return Topology(receivers=[RoleSpec("pipe receiver", receiver, {"conn": b})],
                    senders=[RoleSpec("pipe sender", sender, {"conn": a})],
                    on_started=drop_ours, close=drop_ours)


def socketpair_topology(kind: str, nsubs: int, tmpdir: str) -> Topology:
    if nsubs != 1:
        raise ValueError("the floor connects two processes only")
    a, b = socket.socketpair()
    receiver = SockResponder if kind == "rtt" else SockSubscriber
    sender = SockRequester if kind == "rtt" else SockPublisher

    def drop_ours() -> None:
        a.close()
        b.close()

    return Topology(receivers=[RoleSpec("socketpair receiver", receiver, {"sock": b})],
                    senders=[RoleSpec("socketpair sender", sender, {"sock": a})],
                    on_started=drop_ours, close=drop_ours)
