"""ipcbus roles: through the broker (W1-W4), through a bridge, and on a direct channel (W5).

* Broker: ``IpcBusBroker.create().connect(path)`` in the coordinator (it spawns its own
  child); every client connects in its own spawned process.
* Bridge: the coordinator runs ``IpcBusBridge.create().connect()`` and gives each role process
  ``bridge.open_pipe()``; the child joins with ``IpcBusClient.create().connect(conn)``.
* Direct: both roles join the broker; the sender makes a ``create_channel()`` pair and hands
  one end over with ``post_message(channel, msg, ports=[end])``; then both talk over the
  channel with ``send_bytes``/``recv_bytes`` (the loops of ``impl_floor``).

Messages: ``client.send(channel, seq, payload)``; requests ``client.request(channel, 5.0,
payload)`` answered by ``event.request.resolve(payload)``. The subscriber checks every
sequence number: a gap or a reordering fails the round.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Any, Optional

from ipcbus import IpcBusBridge, IpcBusBroker, IpcBusClient, IpcBusEvent, create_channel

import impl_floor
from harness import BenchFailure, Notify, Round, RoleSpec, Topology

DATA = "bench.data"
ACK = "bench.ack"
REQ = "bench.req"
DIRECT = "bench.direct"
SETUP_TIMEOUT = 10.0


def _join(address: Any, name: str, **options: Any) -> IpcBusClient:
    return IpcBusClient.create().connect(address, peer_name=name, timeout=SETUP_TIMEOUT,
                                         **options)


def _sync(client: IpcBusClient) -> None:
    """A round trip to the broker: our subscriptions are registered there when it returns."""
    client.request("/ipcbus/queryState", SETUP_TIMEOUT)


class Subscriber:
    """Receives ``(seq, payload)`` on DATA; checks order and size; acks on ACK if asked."""

    def __init__(self, address: Any, index: int = 0, zero_copy: bool = False) -> None:
        self.client = _join(address, f"subscriber-{index}")
        self.done = threading.Event()
        self.cmd: Optional[Round] = None
        self.expected = 0
        self.t_first = self.t_last = 0.0
        self.error: Optional[str] = None
        self.stray: Optional[str] = None  # a message outside a round: sticky, fails the next
        self.client.on(DATA, self._on_data, zero_copy=zero_copy)
        _sync(self.client)

    def _on_data(self, event: IpcBusEvent, seq: int, payload: bytes) -> None:
        now = time.perf_counter()
        cmd = self.cmd
        if self.done.is_set() or cmd is None:
            self.stray = self.stray or f"message {seq} arrived outside a round"
            return
        if seq != self.expected or len(payload) != cmd.size:
            self.error = (f"expected message {self.expected} of {cmd.size} bytes, got {seq} of"
                          f" {len(payload)} bytes: lost or reordered")
            self.done.set()
            return
        if seq == 0:
            self.t_first = now
        self.expected = seq + 1
        last = seq == cmd.n - 1
        if cmd.ack_every and (last or (seq + 1) % cmd.ack_every == 0):
            self.client.send(ACK, seq)
        if last:
            self.t_last = now
            self.done.set()

    def run(self, cmd: Round, notify: Notify) -> dict[str, Any]:
        self.expected, self.error, self.cmd = 0, None, cmd
        self.done.clear()
        notify("armed")
        if not self.done.wait(cmd.timeout):
            raise BenchFailure(f"received {self.expected} of {cmd.n} messages in"
                               f" {cmd.timeout:.0f} s: lost or stuck")
        self.cmd = None
        if self.error or self.stray:
            raise BenchFailure(self.error or self.stray)
        return {"count": cmd.n, "t_first": self.t_first, "t_last": self.t_last}

    def close(self) -> None:
        self.client.close()
        if self.stray:
            raise BenchFailure(self.stray)


class Publisher:
    """Sends ``(seq, payload)`` on DATA; with a window, waits for ACKs to bound what is queued."""

    def __init__(self, address: Any, shm_threshold: int = 1 << 20) -> None:
        self.client = _join(address, "publisher", shm_threshold=shm_threshold)
        self.cond = threading.Condition()
        self.acked = -1
        self.client.on(ACK, self._on_ack)
        _sync(self.client)

    def _on_ack(self, event: IpcBusEvent, seq: int) -> None:
        with self.cond:
            self.acked = seq
            self.cond.notify()

    def _wait_ack(self, upto: int, timeout: float) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: self.acked >= upto, timeout):
                raise BenchFailure(f"no acknowledgement of message {upto} in {timeout:.0f} s")

    def run(self, cmd: Round, notify: Notify) -> dict[str, Any]:
        payload = b"x" * cmd.size
        send, window = self.client.send, cmd.window
        self.acked = -1
        for seq in range(cmd.n):
            if window and seq - self.acked > window:
                self._wait_ack(seq - window, cmd.timeout)
            send(DATA, seq, payload)
        if window:
            self._wait_ack(cmd.n - 1, cmd.timeout)
        return {}

    def close(self) -> None:
        self.client.close()


class Responder:
    """Answers each request on REQ with its payload (``group``: as a member of that group,
    W1G: each request goes to one member)."""

    def __init__(self, address: Any, group: Optional[str] = None, index: int = 0) -> None:
        self.client = _join(address, f"responder-{index}")
        self.client.on(REQ, self._on_request, group=group)
        _sync(self.client)

    @staticmethod
    def _on_request(event: IpcBusEvent, payload: bytes) -> None:
        assert event.request is not None
        event.request.resolve(payload)

    def run(self, cmd: Round, notify: Notify) -> dict[str, Any]:
        notify("armed")
        return {}

    def close(self) -> None:
        self.client.close()


class Requester:
    def __init__(self, address: Any) -> None:
        self.client = _join(address, "requester")

    def run(self, cmd: Round, notify: Notify) -> dict[str, Any]:
        payload = b"x" * cmd.size
        request, perf = self.client.request, time.perf_counter_ns
        lat: list[float] = []
        for i in range(cmd.warmup + cmd.n):
            t0 = perf()
            response = request(REQ, 5.0, payload)
            t1 = perf()
            if response.payload != payload:
                raise BenchFailure(f"request {i}: wrong answer {response.payload!r:.60}")
            if i >= cmd.warmup:
                lat.append((t1 - t0) / 1000.0)
        return {"lat_us": lat}

    def close(self) -> None:
        self.client.close()


# -- W5: a direct channel handed over the bus ----------------------------------------------------
class DirectReceiver:
    """Joins the bus, takes the channel end posted to it, then echoes or receives on it."""

    def __init__(self, address: str, mode: str) -> None:
        self.mode = mode
        self.client = _join(address, "direct-receiver")
        self.got = threading.Event()
        self.channel: Any = None
        self.client.on(DIRECT, self._on_channel)
        _sync(self.client)

    def _on_channel(self, event: IpcBusEvent, info: dict[str, Any]) -> None:
        if event.ports is None or len(event.ports) != 1:
            raise BenchFailure(f"expected one port, got {event.ports!r}")
        self.channel = event.ports[0]
        self.got.set()

    def run(self, cmd: Round, notify: Notify) -> dict[str, Any]:
        if not self.got.wait(cmd.timeout):
            raise BenchFailure("the channel end posted by the sender never arrived")
        notify("armed")
        if self.mode == "rtt":
            return impl_floor.conn_echo(self.channel, cmd)
        return impl_floor.conn_recv_stream(self.channel, cmd)

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
        self.client.close()


class DirectSender:
    def __init__(self, address: str, mode: str) -> None:
        self.mode = mode
        self.client = _join(address, "direct-sender")
        mine, theirs = create_channel()
        self.client.post_message(DIRECT, {"mode": mode}, ports=[theirs])
        theirs.close()  # the receiver has its own duplicate
        self.channel = mine

    def run(self, cmd: Round, notify: Notify) -> dict[str, Any]:
        if self.mode == "rtt":
            return impl_floor.conn_rtt(self.channel, cmd)
        return impl_floor.conn_send_stream(self.channel, cmd)

    def close(self) -> None:
        self.channel.close()
        self.client.close()


# -- topologies ----------------------------------------------------------------------------------
def _roles(kind: str, nsubs: int, addresses: list[Any], zero_copy: bool = False,
           shm_threshold: int = 1 << 20) -> tuple[list[RoleSpec], list[RoleSpec]]:
    """Receivers get ``addresses[:-1]``, the sender ``addresses[-1]`` (``zero_copy``: the
    subscribers' listeners; ``shm_threshold``: the publisher's, 0 = inline)."""
    if kind == "rtt" and nsubs > 1:  # W1G: the responders are one group
        return ([RoleSpec(f"ipcbus group responder {i}", Responder,
                          {"address": addresses[i], "group": "pool", "index": i})
                 for i in range(nsubs)],
                [RoleSpec("ipcbus requester", Requester, {"address": addresses[-1]})])
    if kind == "rtt":
        return ([RoleSpec("ipcbus responder", Responder, {"address": addresses[0]})],
                [RoleSpec("ipcbus requester", Requester, {"address": addresses[1]})])
    receivers = [RoleSpec(f"ipcbus subscriber {i}", Subscriber,
                          {"address": addresses[i], "index": i, "zero_copy": zero_copy})
                 for i in range(nsubs)]
    return receivers, [RoleSpec("ipcbus publisher", Publisher,
                                {"address": addresses[-1], "shm_threshold": shm_threshold})]


def broker_topology(kind: str, nsubs: int, tmpdir: str, zero_copy: bool = False,
                    shm_threshold: int = 1 << 20) -> Topology:
    path = os.path.join(tmpdir, "bus")
    broker = IpcBusBroker.create().connect(path)
    receivers, senders = _roles(kind, nsubs, [path] * (nsubs + 1), zero_copy, shm_threshold)
    return Topology(receivers=receivers, senders=senders, broker_pid=broker.process.pid,
                    broker_label="ipcbus broker", watch=[("the ipcbus broker", broker.process)],
                    close=broker.close)


def zero_copy_topology(kind: str, nsubs: int, tmpdir: str) -> Topology:
    """Through the broker, large arguments as zero_copy views (issue 18)."""
    return broker_topology(kind, nsubs, tmpdir, zero_copy=True)


def inline_topology(kind: str, nsubs: int, tmpdir: str) -> Topology:
    """Through the broker with the shared-memory arena off (``shm_threshold=0``)."""
    return broker_topology(kind, nsubs, tmpdir, shm_threshold=0)


def bridge_topology(kind: str, nsubs: int, tmpdir: str) -> Topology:
    bridge = IpcBusBridge.create().connect()
    try:
        pipes = [bridge.open_pipe() for _ in range(nsubs + 1)]
    except BaseException:
        bridge.close()
        raise
    receivers, senders = _roles(kind, nsubs, pipes)
    return Topology(receivers=receivers, senders=senders, broker_pid=os.getpid(),
                    broker_label="bridge (the coordinator's process)", close=bridge.close)


def direct_topology(kind: str, nsubs: int, tmpdir: str) -> Topology:
    if nsubs != 1:
        raise ValueError("a direct channel connects two processes")
    path = os.path.join(tmpdir, "bus")
    broker = IpcBusBroker.create().connect(path)
    args = {"address": path, "mode": kind}
    return Topology(receivers=[RoleSpec("direct receiver", DirectReceiver, args)],
                    senders=[RoleSpec("direct sender", DirectSender, args)],
                    watch=[("the ipcbus broker", broker.process)], close=broker.close)
