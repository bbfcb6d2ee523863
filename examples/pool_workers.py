"""A spawn worker pool on the bus: workers report progress and ask the main process for work.

Run it as is:  python examples/pool_workers.py

The recipe: start a broker (pool workers join by address; a pipe cannot be shared by a pool),
give each worker one client in the pool's initializer, and let the main process serve
requests through its own client (here through a bridge linked to the broker, so pipe
children of the main process would share the same bus).
"""
from __future__ import annotations

import multiprocessing
import os
import tempfile
import threading
from typing import Any

from ipcbus import IpcBusBridge, IpcBusBroker, IpcBusClient, IpcBusEvent

_client: IpcBusClient | None = None  # one per worker process


def init_worker(address: str) -> None:
    """Pool initializer: connect this worker to the bus once."""
    global _client
    _client = IpcBusClient.create().connect(address, peer_name=f"worker-{os.getpid()}")


def crunch(job: int) -> tuple[int, int]:
    """A task: ask the main process for this job's data, report progress, return a result."""
    assert _client is not None
    data: list[int] = _client.request("get-work", 10.0, job).payload
    total = 0
    for i, value in enumerate(data):
        total += value * value
        if i % 250 == 0:
            _client.send("progress", job, i, len(data))
    _client.send("progress", job, len(data), len(data))
    return job, total


def main() -> None:
    folder = tempfile.mkdtemp(prefix="ipcbus-pool-")
    address = os.path.join(folder, "bus")
    ctx = multiprocessing.get_context("spawn")
    with IpcBusBroker.create().connect(address), IpcBusBridge.create().connect(address):
        main_client = IpcBusClient.create().connect(peer_name="main")  # through the bridge
        done_jobs: set[int] = set()
        finished = threading.Condition()

        def on_progress(event: IpcBusEvent, job: int, step: int, size: int) -> None:
            if step == size:
                with finished:
                    done_jobs.add(job)
                    finished.notify_all()
                assert event.sender is not None
                print(f"job {job:2d} finished by {event.sender.name}")

        def on_get_work(event: IpcBusEvent, job: int) -> None:
            assert event.request is not None
            event.request.resolve(list(range(job * 1000, job * 1000 + 1000)))

        main_client.on("progress", on_progress)
        main_client.on("get-work", on_get_work)
        main_client.request("/ipcbus/queryState", 2.0)  # listeners are registered on the bus

        with ctx.Pool(3, initializer=init_worker, initargs=(address,)) as pool:
            results: list[Any] = pool.map(crunch, range(12))
        expected = {job: sum(v * v for v in range(job * 1000, job * 1000 + 1000))
                    for job in range(12)}
        assert dict(results) == expected, "wrong results"
        with finished:  # the last progress messages may still be on their way
            finished.wait_for(lambda: len(done_jobs) == len(results), timeout=10)
        print(f"{len(results)} jobs done, {len(done_jobs)} reported finished on the bus")
        main_client.close()
    os.rmdir(folder)


if __name__ == "__main__":
    main()
