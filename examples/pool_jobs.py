"""A spawn pool serving jobs through a group, with progress events and a cancelled job.

Run it as is:  python examples/pool_jobs.py

Each worker process listens on "jobs" in the group "pool", so each job runs in ONE worker
(the one with the fewest jobs in progress). The listener starts the job on a thread and
returns at once: the client's dispatch thread stays free to hear a cancel, and the worker
can take the next job meanwhile. The job sends its progress on "progress" (the main
process listens there), and stops early when its request is cancelled
(``event.request.cancelled``; ``event.request.on_cancel(callback)`` would call back).
"""
from __future__ import annotations

import multiprocessing
import os
import tempfile
import threading
import time
from typing import Any

from ipcbus import IpcBusBroker, IpcBusClient, IpcBusEvent, IpcBusRequest

STEPS = 10  # steps of a normal job; the long one has 1000


def run_job(client: IpcBusClient, request: IpcBusRequest, job: int, steps: int) -> None:
    """One job, on its own thread of the worker: a step at a time, reporting each."""
    for step in range(1, steps + 1):
        if request.cancelled:  # the caller gave the job up: stop early
            client.send("progress", job, step - 1, "cancelled")
            return
        time.sleep(0.02)  # the work of one step
        client.send("progress", job, step, "running")
    request.resolve(f"job {job}: {steps} steps done")


def worker(address: str, stop: Any) -> None:
    """A process of the pool: one client, one listener in group "pool"."""
    client = IpcBusClient.create().connect(address, peer_name=f"worker-{os.getpid()}")

    def on_job(event: IpcBusEvent, job: int, steps: int) -> None:
        assert event.request is not None  # "jobs" are requests
        threading.Thread(target=run_job, args=(client, event.request, job, steps)).start()

    client.on("jobs", on_job, group="pool")
    stop.wait(60)
    client.close()


def main() -> None:
    folder = tempfile.mkdtemp(prefix="ipcbus-jobs-")
    address = os.path.join(folder, "bus")
    ctx = multiprocessing.get_context("spawn")
    with IpcBusBroker.create().connect(address):
        client = IpcBusClient.create().connect(address, peer_name="main")
        progress: dict[int, tuple[int, str]] = {}  # job -> (last step, state)
        changed = threading.Condition()

        def on_progress(event: IpcBusEvent, job: int, step: int, state: str) -> None:
            with changed:
                progress[job] = (step, state)
                changed.notify_all()

        client.on("progress", on_progress)
        stop = ctx.Event()
        workers = [ctx.Process(target=worker, args=(address, stop)) for _ in range(3)]
        for process in workers:
            process.start()
        client.wait_for_listeners("jobs", count=3, timeout=60.0)  # the pool is up

        jobs = {job: client.request_async("jobs", 30.0, job, STEPS) for job in range(6)}
        long_job = client.request_async("jobs", 30.0, 99, 1000)
        with changed:  # the long job has started: give it up
            changed.wait_for(lambda: 99 in progress, timeout=30)
        long_job.cancel()

        for job, future in jobs.items():
            print(future.result().payload)
        with changed:  # progress messages may trail the answers: wait for the last ones
            changed.wait_for(lambda: all(progress.get(j) == (STEPS, "running") for j in jobs)
                             and progress.get(99, (0, ""))[1] == "cancelled", timeout=30)
        step, state = progress[99]
        assert state == "cancelled" and step < 1000, progress[99]
        print(f"job 99: {state} after {step} of 1000 steps")

        stop.set()
        for process in workers:
            process.join(30)
        client.close()
    os.rmdir(folder)


if __name__ == "__main__":  # required: spawn workers import this module
    main()
