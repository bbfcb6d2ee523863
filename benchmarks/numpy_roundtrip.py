"""A numpy array's round trip through the broker (issue 18): one process sends an array on
one channel, another sends it back on a second channel; the first times each round trip.

    python benchmarks/numpy_roundtrip.py            # 1 MiB and 16 MiB float64 arrays
    python benchmarks/numpy_roundtrip.py --smoke    # a few round trips (CI)

Each size runs through the shared-memory arena (the default ``shm_threshold``) and inline
(``shm_threshold=0``), each role in its own spawned process. The echo side's listener gets
its own array (dtype and shape kept) and sends it back as is. Needs numpy (the ``bench``
extra).
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
PING, PONG = "np.ping", "np.pong"


def echo(path: str, threshold: int, q: Any, stop: Any) -> None:
    with IpcBusClient.create().connect(path, peer_name="echo", shm_threshold=threshold) as c:
        c.on(PING, lambda event, arr: c.send(PONG, arr))
        c.request("/ipcbus/queryState", 10.0)
        q.put("ready")
        stop.wait(300)


def pinger(path: str, size: int, n: int, threshold: int, q: Any) -> None:
    import numpy as np
    got = threading.Event()
    back: list[Any] = []
    with IpcBusClient.create().connect(path, peer_name="ping", shm_threshold=threshold) as c:
        def on(event: IpcBusEvent, arr: Any) -> None:
            back.append(arr)
            got.set()
        c.on(PONG, on)
        c.request("/ipcbus/queryState", 10.0)
        arr = np.arange(size // 8, dtype=np.float64).reshape(-1, 1024)
        lat = []
        for i in range(n + 2):
            got.clear()
            t0 = time.perf_counter()
            c.send(PING, arr)
            if not got.wait(30):
                raise RuntimeError("no answer")
            if i >= 2:  # two warm-up trips
                lat.append((time.perf_counter() - t0) * 1e3)
        echoed = back[-1]
        assert echoed.dtype == arr.dtype and echoed.shape == arr.shape and (echoed == arr).all()
    q.put(statistics.median(lat))


def one(size: int, n: int, threshold: int) -> float:
    with tempfile.TemporaryDirectory(prefix="ipcbus-np-") as tmp:
        path = os.path.join(tmp, "bus")
        with IpcBusBroker.create().connect(path):
            q: Any = CTX.Queue()
            stop = CTX.Event()
            e = CTX.Process(target=echo, args=(path, threshold, q, stop), daemon=True)
            e.start()
            if q.get(timeout=30) != "ready":
                raise RuntimeError("the echo did not start")
            p = CTX.Process(target=pinger, args=(path, size, n, threshold, q), daemon=True)
            p.start()
            result: float = q.get(timeout=300)
            stop.set()
            p.join(10)
            e.join(10)
            return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    counts = {1 * MiB: 5, 16 * MiB: 3} if args.smoke else {1 * MiB: 200, 16 * MiB: 40}
    print(f"command: {' '.join([sys.executable] + sys.argv)}")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("numpy float64 array round trip, median ms:")
    print(f"{'size':>8}  {'arena':>8}  {'inline':>8}  {'trips':>6}")
    for size, n in counts.items():
        arena, inline = one(size, n, MiB), one(size, n, 0)
        print(f"{size // MiB:>5} MiB  {arena:>8.2f}  {inline:>8.2f}  {n:>6}", flush=True)
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
