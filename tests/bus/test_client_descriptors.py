"""A receiving client owns the descriptors of a message until a listener's ``ports`` takes
them, and closes them on every other path (issue 14, items 2 and 3): malformed port kinds from
a raw peer, running out of descriptors while duplicating them for several local takers."""
from __future__ import annotations

import os
import queue
import resource
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipcbus import IpcBusBroker, IpcBusClient, IpcBusEvent
from ipcbus import _protocol as P
from ipcbus import _transport as T
from ipcbus import client as client_module
from ipcbus._protocol import Kind

from helpers.rawpeer import RawPeer
from helpers import Children, Collector, sync, wait_until


def fd_count(pid: int | None = None) -> int:
    return len(os.listdir(f"/proc/{pid or os.getpid()}/fd"))


def open_inodes(inodes: set[int]) -> list[int]:
    """Descriptors of this process that refer to one of ``inodes`` (pipes made by the
    test): exact, whatever else the process opens or closes meanwhile."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.stat(f"/proc/self/fd/{name}").st_ino in inodes:
                found.append(int(name))
        except OSError:
            pass
    return found


def some_fds(n: int) -> list[int]:
    """``n`` open descriptors (pipe ends), for a raw peer to send."""
    fds: list[int] = []
    while len(fds) < n:
        fds.extend(os.pipe())
    T.close_fds(fds[n:])
    return fds[:n]


class Bus:
    """A broker, a receiving client in this process and a raw peer that sends to it."""

    def __init__(self, path: str, broker: IpcBusBroker) -> None:
        self.broker = broker
        self.rx = IpcBusClient.create().connect(path)
        self.got = Collector()
        self.rx.on("ports", self.got)
        self.rx.on("after", self.got)
        sync(self.rx)
        self.raw = RawPeer.unix(path)
        self.raw.join()

    def send_ports(self, kinds: Any, nfds: int) -> set[int]:
        """A message announcing ``nfds`` descriptors, with ``kinds`` as its list of kinds;
        returns the inodes of what it carries."""
        fds = some_fds(nfds)
        inodes = {os.fstat(fd).st_ino for fd in fds}
        try:
            frame = self.raw.frame(Kind.SEND, "ports", rid=1, nfds=nfds,
                                   body=P.pack_payload([["m"], kinds]))
            assert self.raw.send(frame, fds)
        finally:
            T.close_fds(fds)  # the message holds its own copies
        return inodes

    def after(self) -> None:
        """A plain message behind the others: once it arrived, they were handled."""
        count = len(self.got.items)
        self.raw.send(self.raw.frame(Kind.SEND, "after", body=P.pack_payload(["x"])))
        self.got.wait(count + 1)

    def close(self) -> None:
        self.raw.close()
        self.rx.close()


@pytest.fixture
def bus(sock_path: str, broker: IpcBusBroker) -> Iterator[Bus]:
    b = Bus(sock_path, broker)
    try:
        yield b
    finally:
        b.close()


def _close_ports(items: list[tuple[Any, tuple[Any, ...]]]) -> None:
    for event, _ in items:
        for port in event.ports or ():
            if isinstance(port, int):
                T.close_fds([port])
            else:
                port.close()


@pytest.mark.parametrize("kinds", [
    [["fd"], "fd", "fd"],  # a list among the kinds: unhashable
    [{"fd": 1}, "fd", "fd"],  # a map
    ["fd", "fd", 7],
    ["fd", "fd"],  # fewer kinds than descriptors
    "fd",
    ["fd", "nonsense", "fd"],
    ["fd", "socket", "fd"],  # a pipe end announced as a socket
])
@pytest.mark.timeout(30)
def test_malformed_port_kinds_leak_no_descriptor(bus: Bus, kinds: Any) -> None:
    inodes: set[int] = set()
    for _ in range(5):
        inodes |= bus.send_ports(kinds, 3)
    bus.after()
    wait_until(lambda: not open_inodes(inodes), timeout=5)
    assert [a for _, a in bus.got.items] == [("x",)]  # nothing was delivered with bad kinds
    assert bus.rx.connected


_msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.text(max_size=12)
    | st.binary(max_size=8) | st.sampled_from(sorted(T.PORT_KINDS)),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner,
                                                                max_size=3),
    max_leaves=8)


@given(kinds=st.lists(_msgpack_values, min_size=0, max_size=4) | _msgpack_values,
       nfds=st.integers(1, 4))
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@pytest.mark.timeout(120)
def test_any_list_of_kinds_leaks_no_descriptor(bus: Bus, kinds: Any, nfds: int) -> None:
    """The principle, for any body: a descriptor received is either in a listener's
    ``ports`` or closed."""
    start = len(bus.got.items)
    inodes = bus.send_ports(kinds, nfds)
    bus.after()
    delivered = bus.got.items[start:]
    _close_ports(delivered)
    wait_until(lambda: not open_inodes(inodes), timeout=5)
    assert bus.rx.connected


# -- out of descriptors while duplicating them ------------------------------------------------
def test_dup_fds_closes_what_it_made_when_one_dup_fails(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    fds = some_fds(4)
    inodes = {os.fstat(fd).st_ino for fd in fds}
    made: list[int] = []
    real_dup = os.dup

    def dup(fd: int) -> int:
        if len(made) == 2:
            raise OSError(24, "Too many open files")
        made.append(real_dup(fd))
        return made[-1]

    monkeypatch.setattr(os, "dup", dup)
    try:
        with pytest.raises(OSError):
            T.dup_fds(fds)
        with pytest.raises(OSError):
            client_module._ports(fds, ["fd"] * 4, dup=True)
    finally:
        monkeypatch.undo()
        T.close_fds(fds)
    assert len(made) == 2 and open_inodes(inodes) == []  # the two duplicates were closed


def receive_near_the_fd_limit(address: str, nfds: int, out: Any, stop: Any) -> None:
    """Two clients of this process take the same message (the first gets duplicates) while
    this process may open only a few more descriptors than the message carries."""
    a = IpcBusClient.create().connect(address)
    b = IpcBusClient.create().connect(address)
    got: queue.Queue[Any] = queue.Queue()

    def take(event: IpcBusEvent, *args: Any) -> None:
        for port in event.ports or ():
            T.close_fds([port])
        got.put((event.channel, len(event.ports or ())))

    for c in (a, b):
        c.on("ports", take)
        c.on("after", take)
    sync(a)
    sync(b)
    base = fd_count()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # room for the message's descriptors and two duplicates: the third dup fails
    resource.setrlimit(resource.RLIMIT_NOFILE, (base + nfds + 2, hard))
    out.put(("ready", base))
    seen: list[Any] = []
    while len([s for s in seen if s[0] == "after"]) < 2:
        seen.append(got.get(timeout=20))
    out.put(("done", fd_count(), seen, a.connected and b.connected))
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    stop.poll(20)
    a.close()
    b.close()


@pytest.mark.timeout(60)
def test_running_out_of_descriptors_while_duplicating_leaks_none(
        ctx: Any, children: Children, sock_path: str, broker: IpcBusBroker) -> None:
    out = ctx.Queue()
    nfds = 8
    children.start(receive_near_the_fd_limit, sock_path, nfds, out, children.stop)
    tag, base = out.get(timeout=30)
    assert tag == "ready"
    raw = RawPeer.unix(sock_path)
    try:
        raw.join()
        fds = some_fds(nfds)
        try:
            assert raw.send(raw.frame(Kind.SEND, "ports", rid=1, nfds=nfds,
                                      body=P.pack_payload([["m"], ["fd"] * nfds])), fds)
        finally:
            T.close_fds(fds)
        raw.send(raw.frame(Kind.SEND, "after", body=P.pack_payload(["x"])))
        tag, count, seen, connected = out.get(timeout=30)
    finally:
        raw.close()
    assert tag == "done"
    assert count == base, seen  # the two duplicates made before the failure were closed
    assert connected
