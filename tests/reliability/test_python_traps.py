"""Two Python traps (docs/reliability.md, "Python traps"): ``close()`` while the reader is
blocked in ``recv()``; a forked child's copy of a socket hiding the parent's disconnect.

Real processes and sockets, no mocked transport. Every test has a hard timeout; waits are
bounded (events, queues, ``wait_until``); children are module-level functions, joined with a
bound and killed in a ``finally``.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from typing import Any

import pytest

from ipcbus import IpcBusBroker, IpcBusClient, IpcBusConnectionError

from helpers import elapsed, pid_of, sync, wait_until
from helpers.bus import peer_names
from helpers.measure import report
from helpers.processes import READY_TIMEOUT


def _reader_threads() -> list[threading.Thread]:
    """The connection's I/O threads (two, taking turns at reading and dispatching)."""
    return [t for t in threading.enumerate() if t.name.startswith("ipcbus-io")]


@pytest.mark.timeout(60)
def test_close_returns_promptly_while_the_reader_is_blocked(sock_path: str) -> None:
    """socket.close() from another thread does not wake a thread blocked in recv() on it.
    With the broker stopped (SIGSTOP: no EOF will ever come back), client.close(timeout=0.5)
    still returns within its bound, and the reader thread has ended."""
    broker = IpcBusBroker.create().connect(sock_path)
    client = IpcBusClient.create().connect(sock_path, peer_name="closer")
    try:
        client.on("x", lambda event, *args: None)
        sync(client)
        readers = _reader_threads()
        assert len(readers) == 2 and all(r.is_alive() for r in readers)
        os.kill(broker.process.pid, signal.SIGSTOP)
        with elapsed() as t:
            client.close(timeout=0.5)
        for reader in readers:
            reader.join(2)
        report("close with a blocked reader", seconds=round(t[0], 3),
               reader_alive=any(r.is_alive() for r in readers))
        assert t[0] < 2.0, t[0]
        assert not any(r.is_alive() for r in readers)
        assert _reader_threads() == []
        with pytest.raises(IpcBusConnectionError):
            client.send("x", 1)
    finally:
        os.kill(broker.process.pid, signal.SIGCONT)
        client.close()
        broker.close()


def parent_with_a_forked_child(address: str, how: str, ready_q: Any) -> None:
    """Connects a client, then forks a child that does not connect and stays alive; the test
    SIGKILLs this process and watches the broker."""
    client = IpcBusClient.create().connect(address, peer_name="forking-parent")
    client.on("parent-chan", lambda event, *args: None)
    sync(client)
    if how == "os.fork":
        pid = os.fork()
        if pid == 0:
            try:
                threading.Event().wait(60)
            finally:
                os._exit(0)
        child_pid = pid
    else:
        child = multiprocessing.get_context("fork").Process(
            target=threading.Event().wait, args=(60,), daemon=True)
        child.start()
        child_pid = pid_of(child)
    ready_q.put((os.getpid(), child_pid))
    threading.Event().wait(60)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["os.fork", "multiprocessing-fork"])
def test_forked_child_does_not_hide_the_parents_disconnect(broker: IpcBusBroker,
                                                           how: str) -> None:
    """A forked child holds copies of its parent's descriptors: unless the library closes
    them after fork, the broker would not see EOF when the parent dies. SIGKILL the parent
    while the child (which never connected) is alive: the parent's peer leaves at once."""
    ctx = multiprocessing.get_context("spawn")
    ready_q = ctx.Queue()
    parent = ctx.Process(target=parent_with_a_forked_child, args=(broker.address, how, ready_q))
    parent.start()
    child_pid = None
    try:
        parent_pid, child_pid = ready_q.get(timeout=READY_TIMEOUT)
        assert "forking-parent" in peer_names(broker)
        killed = time.monotonic()
        os.kill(parent_pid, signal.SIGKILL)
        wait_until(lambda: "forking-parent" not in peer_names(broker), timeout=5)
        took = time.monotonic() - killed
        os.kill(child_pid, 0)  # the child is still alive
        report(f"parent killed, forked child alive ({how})", peer_gone_after_s=round(took, 3))
        assert took < 1.0, took
        assert "parent-chan" not in broker.query_state()["channels"]
    finally:
        for pid in (parent.pid, child_pid):
            if pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        parent.join(5)
