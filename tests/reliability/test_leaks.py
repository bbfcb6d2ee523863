"""No leaks (docs/reliability.md, section 4): threads, descriptors and RSS after
connect/close cycles, bridge pipes and timed-out requests; exiting the interpreter with
clients still connected (``tests/helpers/rel_exit.py``).

Real processes and sockets, no mocked transport. Every test has a hard timeout; waits are
bounded (events, queues, ``wait_until``); children are module-level functions, joined with a
bound and killed in a ``finally``. Cases marked ``slow`` are left out of the default run
(``-m 'not slow'`` in pyproject.toml); with ``-m slow -s`` they print the figures of
docs/reliability.md.
"""
from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from ipcbus import IpcBusBridge, IpcBusBroker, IpcBusClient, IpcBusRequestError

from helpers import elapsed, sync, wait_until
from helpers.measure import MiB, fd_count, report, rss, settle

TESTS = Path(__file__).resolve().parent.parent
ROOT = TESTS.parent


def _process_figures() -> tuple[int, int, int, int]:
    """(threads, descriptors, RSS, multiprocessing finalizers) of this process, settled."""
    import multiprocessing.util as mp_util

    settle()
    return (threading.active_count(), fd_count(), rss(),
            len(mp_util._finalizer_registry))  # type: ignore[attr-defined]


def connect_close_cycles(sock_path: str, cycles: int) -> None:
    with IpcBusBroker.create().connect(sock_path) as broker:
        bpid = broker.process.pid

        def cycle() -> None:
            client = IpcBusClient.create().connect(sock_path, peer_name="cycler")
            client.on("cycle", lambda event, *args: None)
            client.send("cycle", 1)
            client.close()

        for _ in range(200):  # warm-up: caches, allocator pools, lazily started pieces
            cycle()
        threads, fds, mem, fins = _process_figures()
        broker_fds, broker_mem = fd_count(bpid), rss(bpid)
        with elapsed() as t:
            for _ in range(cycles):
                cycle()
        wait_until(lambda: threading.active_count() == threads, timeout=5)
        after = _process_figures()
        state = broker.query_state()
        fig = {"cycles": cycles, "seconds": round(t[0], 1),
               "ms_per_cycle": round(1000 * t[0] / cycles, 2),
               "threads": (threads, after[0]), "fds": (fds, after[1]),
               "rss_growth_KiB": (after[2] - mem) >> 10, "finalizers": (fins, after[3]),
               "broker_fds": (broker_fds, fd_count(bpid)),
               "broker_rss_growth_KiB": (rss(bpid) - broker_mem) >> 10}
        report("connect/close cycles", **fig)
        assert after[0] == threads and after[1] == fds and after[3] == fins, fig
        assert after[2] - mem < 4 * MiB, fig
        assert fd_count(bpid) == broker_fds, fig
        assert rss(bpid) - broker_mem < 4 * MiB, fig
        assert state["peers"] == [] and state["channels"] == {}, state
        assert state["connections"] == 0 and state["pending_requests"] == 0, state


@pytest.mark.timeout(120)
def test_2000_connect_close_cycles_leak_nothing(sock_path: str) -> None:
    """Threads, descriptors, RSS and multiprocessing finalizers of this process, and the
    broker's descriptors, RSS and state, return to their baseline after 2 000 cycles of
    connect / subscribe / send / close."""
    connect_close_cycles(sock_path, 2000)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_10000_connect_close_cycles_leak_nothing(sock_path: str) -> None:
    """The issue's count: 10 000 cycles (see the 2 000-cycle test)."""
    connect_close_cycles(sock_path, 10_000)


@pytest.mark.timeout(120)
def test_1000_bridge_pipe_cycles_leak_nothing() -> None:
    """1 000 cycles of open_pipe() on a bridge of this process, each joined by a pipe client
    (or, one in three, closed unused): this process's threads, descriptors and RSS, and the
    bridge's state, return to their baseline."""
    with IpcBusBridge.create().connect() as bridge:
        main = IpcBusClient.create().connect(peer_name="main")
        try:
            def cycle(i: int) -> None:
                conn = bridge.open_pipe()
                if i % 3 == 0:
                    conn.close()
                    return
                client = IpcBusClient.create().connect(conn, peer_name="pipe-cycler")
                client.on("cycle", lambda event, *args: None)
                client.send("cycle", i)
                client.close()

            for i in range(100):
                cycle(i)
            wait_until(lambda: bridge.query_state()["connections"] == 1)
            threads, fds, mem, fins = _process_figures()
            with elapsed() as t:
                for i in range(1000):
                    cycle(i)
            wait_until(lambda: bridge.query_state()["connections"] == 1)
            wait_until(lambda: threading.active_count() == threads, timeout=5)
            after = _process_figures()
            state = bridge.query_state()
            report("bridge pipe cycles", cycles=1000, seconds=round(t[0], 2),
                   threads=(threads, after[0]), fds=(fds, after[1]),
                   rss_growth_KiB=(after[2] - mem) >> 10, finalizers=(fins, after[3]))
            assert after[0] == threads and after[1] == fds and after[3] == fins
            assert after[2] - mem < 4 * MiB
            assert [p["name"] for p in state["peers"]] == ["main"]
            assert state["channels"] == {} and state["pending_requests"] == 0
        finally:
            main.close()


@pytest.mark.timeout(120)
def test_1000_timed_out_requests_leak_nothing(broker: IpcBusBroker, clients: Any) -> None:
    """1 000 requests that time out after 0.01 s (a listener gets each and never answers):
    each fails as a timeout, the broker's pending_requests returns to 0, and this process's
    threads, descriptors and RSS return to their baseline."""
    silent = clients(broker.address, peer_name="silent")
    asker = clients(broker.address, peer_name="asker")
    heard = [0]

    def never_answer(event: Any, *args: Any) -> None:
        heard[0] += 1

    silent.on("never", never_answer)
    sync(silent)

    def ask_async(n: int) -> None:
        futures = [asker.request_async("never", 0.01, i) for i in range(n)]
        for f in futures:
            exc = f.exception(timeout=10)
            assert isinstance(exc, IpcBusRequestError) and isinstance(exc, TimeoutError), exc

    ask_async(200)  # warm-up
    for _ in range(20):
        with pytest.raises(IpcBusRequestError):
            asker.request("never", 0.01)
    wait_until(lambda: broker.query_state()["pending_requests"] == 0)
    threads, fds, mem, _ = _process_figures()
    with elapsed() as t:
        for _ in range(9):
            ask_async(100)
        for i in range(100):
            with pytest.raises(TimeoutError):
                asker.request("never", 0.01, i)
    wait_until(lambda: broker.query_state()["pending_requests"] == 0, timeout=5)
    wait_until(lambda: heard[0] == 200 + 20 + 1000, timeout=5)
    wait_until(lambda: threading.active_count() == threads, timeout=5)
    after = _process_figures()
    report("1000 timed-out requests", seconds=round(t[0], 2), threads=(threads, after[0]),
           fds=(fds, after[1]), rss_growth_KiB=(after[2] - mem) >> 10,
           broker_pending=broker.query_state()["pending_requests"])
    assert after[0] == threads and after[1] == fds
    assert after[2] - mem < 4 * MiB
    assert asker.request("/ipcbus/queryState", 5.0).payload["pending_requests"] == 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["socket", "bridge", "own-broker"])
def test_exit_with_clients_still_connected(broker: IpcBusBroker, tmp_path: Path,
                                           mode: str) -> None:
    """A script connects clients (socket / bridge with a pipe child / its own broker),
    sends, leaves a request pending and exits without closing: exit code 0, nothing on
    stderr, within a few seconds; the broker forgets its peers."""
    arg = {"socket": [str(broker.address)], "bridge": [], "own-broker": [str(tmp_path)]}[mode]
    with elapsed() as t:
        done = subprocess.run([sys.executable, str(TESTS / "helpers" / "rel_exit.py"), mode,
                               *arg], capture_output=True, text=True, timeout=60, cwd=str(ROOT))
    report(f"exit with clients connected ({mode})", seconds=round(t[0], 2),
           exit_code=done.returncode)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout == "exiting\n"
    assert t[0] < 10.0, t[0]
    wait_until(lambda: broker.query_state()["peers"] == [], timeout=2)
    assert not (tmp_path / "own.bus").exists()
