"""The broker's CPU per large message, through the shared-memory arena and inline (issue 18).

    python benchmarks/shm_cpu.py             # 1, 16 and 64 MiB; medians of 3 rounds
    python benchmarks/shm_cpu.py --smoke     # a few messages each (CI)

One publisher -> broker -> one subscriber, each role in its own spawned process; the
publisher keeps at most two messages unacknowledged (the subscriber acks each). The broker's
CPU is read from ``/proc/<pid>/schedstat`` (nanoseconds on the CPU) from the first message to
the last acknowledgement (connecting is not counted); it includes the acknowledgements (a
small message each) and, through the arena, the arena's announcement (once per stream), not
the freeing of the arena's pages when the connection ends (charged to whichever process lets
go of the memfd last). Through the arena the broker forwards a
slot reference, so its CPU per message should not grow with the size; inline it copies the
payload through two sockets.

The *control* column sends 1 MiB messages through the arena, while the publisher and the
subscriber each copy ``size - 1 MiB`` of private memory per message, the subscriber into a new
``bytes`` as its delivery does (the memory traffic a message of ``size`` causes in them, without
the broker seeing anything different from a 1 MiB message). Where the control grows as the arena column does, the growth is the price the
broker's own work pays in cache misses for the clients' copies on a machine of few cores, not
work that depends on the size.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
from typing import Any

from ipcbus import IpcBusBroker, IpcBusClient, IpcBusEvent

MiB = 1 << 20
CTX = multiprocessing.get_context("spawn")
DATA, ACK = "cpu.data", "cpu.ack"
COUNTS = {1 * MiB: 300, 16 * MiB: 60, 64 * MiB: 20}
SMOKE_COUNTS = {1 * MiB: 10, 16 * MiB: 3, 64 * MiB: 2}


def cpu_ns(pid: int) -> int:
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0])


def subscriber(path: str, n: int, q: Any, stop: Any, traffic: int = 0) -> None:
    done = threading.Event()
    scratch = bytearray(traffic)  # the control's memory traffic: a new copy, as `bytes` is
    with IpcBusClient.create().connect(path, peer_name="sub") as client:
        def on(event: IpcBusEvent, seq: int, data: Any) -> None:
            if traffic:
                bytes(scratch)
            client.send(ACK, seq)
            if seq == n - 1:
                done.set()
        client.on(DATA, on)
        client.request("/ipcbus/queryState", 10.0)
        q.put("ready")
        q.put("done" if done.wait(120) else "timeout")
        stop.wait(60)  # the coordinator has read the broker's CPU


def publisher(path: str, size: int, n: int, threshold: int, q: Any, go: Any, stop: Any,
              traffic: int = 0) -> None:
    cond = threading.Condition()
    acked = [-1]
    with IpcBusClient.create().connect(path, peer_name="pub", shm_threshold=threshold) as client:
        def on(event: IpcBusEvent, seq: int) -> None:
            with cond:
                acked[0] = seq
                cond.notify()
        client.on(ACK, on)
        client.request("/ipcbus/queryState", 10.0)
        payload = b"x" * size
        scratch, copy = bytearray(traffic), bytearray(traffic)  # the control's memory traffic
        q.put("ready")
        if not go.wait(60):
            return
        for seq in range(n):
            with cond:
                cond.wait_for(lambda: seq - acked[0] <= 2, 60)
            client.send(DATA, seq, payload)
            if traffic:
                copy[:] = scratch
        with cond:
            cond.wait_for(lambda: acked[0] >= n - 1, 60)
        q.put("sent")  # before closing: the arena's pages are freed by whoever lets go last
        stop.wait(60)


def one_round(size: int, n: int, threshold: int, traffic: int = 0) -> float:
    """Microseconds of broker CPU per message (``traffic``: bytes each client copies in its own
    memory per message besides the message, for the control)."""
    with tempfile.TemporaryDirectory(prefix="ipcbus-cpu-") as tmp:
        path = os.path.join(tmp, "bus")
        with IpcBusBroker.create().connect(path) as broker:
            pid = broker.process.pid
            assert pid is not None
            q: Any = CTX.Queue()
            stop = CTX.Event()
            sub = CTX.Process(target=subscriber, args=(path, n, q, stop, traffic),
                              daemon=True)
            sub.start()
            if q.get(timeout=30) != "ready":
                raise RuntimeError("the subscriber did not start")
            go = CTX.Event()
            pub = CTX.Process(target=publisher, args=(path, size, n, threshold, q, go, stop,
                                                      traffic),
                              daemon=True)
            pub.start()
            if q.get(timeout=30) != "ready":
                raise RuntimeError("the publisher did not start")
            before = cpu_ns(pid)  # from the first message to the last acknowledgement
            go.set()
            results = {q.get(timeout=180), q.get(timeout=180)}
            after = cpu_ns(pid)
            stop.set()
            pub.join(10)
            sub.join(10)
            if results != {"done", "sent"}:
                raise RuntimeError(f"the stream did not complete: {results}")
    return (after - before) / 1000 / n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.smoke else 3)
    counts = SMOKE_COUNTS if args.smoke else COUNTS
    print(f"command: {' '.join([sys.executable] + sys.argv)}")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"broker CPU per message (us), medians of {rounds} round(s):")
    print(f"{'size':>8}  {'arena':>10}  {'inline':>10}  {'control':>10}  {'messages':>8}")
    t0 = time.monotonic()
    for size, n in counts.items():
        arena = statistics.median(one_round(size, n, MiB) for _ in range(rounds))
        inline = statistics.median(one_round(size, n, 0) for _ in range(rounds))
        control = statistics.median(one_round(MiB, n, MiB, size - MiB) for _ in range(rounds))
        print(f"{size // MiB:>5} MiB  {arena:>10.1f}  {inline:>10.1f}  {control:>10.1f}"
              f"  {n:>8}", flush=True)
    print(f"total time {time.monotonic() - t0:.1f} s; load average at end"
          f" {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
