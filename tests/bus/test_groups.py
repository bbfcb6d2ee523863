"""Issue 17 item 2 across real processes: a worker pool listening on "jobs" as one group
handles each job exactly once (requests and broadcasts, 4 workers), a slow worker gets fewer
jobs (fewest requests in progress), a member SIGKILLed mid-stream fails its request at once
and later jobs go to the others, plain listeners still get everything, and pipe children of a
bridge form a group too.

Every test runs under spawn, fork and forkserver (the ``ctx`` fixture) unless it says
otherwise; children report on a queue and are always stopped, joined with a bound and killed
(``helpers.Children``).
"""
from __future__ import annotations

import concurrent.futures
import os
import signal
import time
from typing import Any

import pytest

from ipcbus import (IpcBusBridge, IpcBusBroker, IpcBusClient, IpcBusRequestError,
                    IpcBusRequestTimeoutError)

from helpers import Collector, Reports, elapsed, pid_of, sync, wait_until



# -- children (module level, for spawn) ---------------------------------------------------------
def worker(address: Any, name: str, mode: str, report: Any, stop: Any) -> None:
    """A member of group "pool" on "jobs": answers a request with ``[name, job]`` (after 0.25 s
    in mode "slow"; never in mode "hold", which reports ("got", name, job) instead) and
    records every job it handled, requests and broadcasts; "done/<name>" answers with them."""
    client = IpcBusClient.create().connect(address, peer_name=name)
    handled: list[Any] = []

    def on_job(event: Any, job: Any) -> None:
        handled.append(job)
        if event.request is None:
            return
        if mode == "hold":
            report.put(("got", name, job))
            return
        if mode == "slow":
            time.sleep(0.25)
        event.request.resolve([name, job])

    client.on("jobs", on_job, group="pool")
    client.on(f"done/{name}", lambda event: event.request.resolve(list(handled)))
    sync(client)
    report.put(("ready", name))
    stop.poll(120)
    client.close()


# -- helpers -------------------------------------------------------------------------------------
def handled_by(caller: IpcBusClient, names: list[str]) -> dict[str, list[Any]]:
    return {name: caller.request(f"done/{name}", 20.0).payload for name in names}


# -- exactly once ----------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_each_job_runs_exactly_once_across_four_workers(
        broker: IpcBusBroker, reporters: Any) -> None:
    kids, reports, q = reporters
    names = [f"w{i}" for i in range(4)]
    for name in names:
        kids.start(worker, broker.address, name, "echo", q, kids.stop)
    assert reports.ready(4) == names
    caller = IpcBusClient.create().connect(broker.address, peer_name="caller")
    watcher = IpcBusClient.create().connect(broker.address, peer_name="watcher")
    everything = Collector()
    watcher.on("jobs", everything)  # a plain listener: gets every job
    sync(watcher)
    try:
        pool = concurrent.futures.ThreadPoolExecutor(4)
        answers = list(pool.map(lambda j: caller.request("jobs", 20.0, j).payload, range(200)))
        pool.shutdown()
        assert [job for _, job in answers] == list(range(200))
        for j in range(200, 400):
            caller.send("jobs", j)
        sync(caller)
        everything.wait(400, 20)
        seen = handled_by(caller, names)
        jobs = sorted(j for got in seen.values() for j in got)
        assert jobs == list(range(400))  # every job once, none twice
        assert all(got for got in seen.values()), {n: len(g) for n, g in seen.items()}
        assert sorted(a[0] for a in everything.args) == list(range(400))
    finally:
        caller.close()
        watcher.close()


# -- balance ---------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_a_slow_worker_gets_fewer_jobs(broker: IpcBusBroker, reporters: Any) -> None:
    kids, reports, q = reporters
    kids.start(worker, broker.address, "fast", "echo", q, kids.stop)
    kids.start(worker, broker.address, "slow", "slow", q, kids.stop)
    reports.ready(2)
    caller = IpcBusClient.create().connect(broker.address, peer_name="caller")
    try:
        pool = concurrent.futures.ThreadPoolExecutor(3)  # at most 3 jobs in progress
        answers = list(pool.map(lambda j: caller.request("jobs", 30.0, j).payload, range(60)))
        pool.shutdown()
        by = [name for name, _ in answers]
        assert by.count("fast") + by.count("slow") == 60
        assert by.count("slow") * 3 < by.count("fast"), by
    finally:
        caller.close()


# -- a member killed -------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_a_member_killed_mid_stream(broker: IpcBusBroker, reporters: Any, ctx: Any) -> None:
    kids, reports, q = reporters
    kids.start(worker, broker.address, "a", "echo", q, kids.stop)
    kids.start(worker, broker.address, "b", "echo", q, kids.stop)
    doomed_q = ctx.Queue()  # its own queue: killed holding a shared queue's lock would block
    doomed = kids.start(worker, broker.address, "doomed", "hold", doomed_q, kids.stop)
    doomed_reports = Reports(doomed_q)
    reports.ready(2)
    doomed_reports.ready(1)
    caller = IpcBusClient.create().connect(broker.address, peer_name="caller")
    try:
        held = []
        for j in range(3):  # equal loads: in turn, so one of three goes to "doomed"
            future = caller.request_async("jobs", 30.0, j)
            held.append(future)
        _, _, job = doomed_reports.next("got", 20)
        os.kill(pid_of(doomed), signal.SIGKILL)
        with elapsed() as took:
            with pytest.raises(IpcBusRequestError) as failed:
                held[job].result(20)
        assert not isinstance(failed.value, IpcBusRequestTimeoutError)
        assert took[0] < 20
        for j, future in enumerate(held):
            if j != job:
                assert future.result(20).payload[1] == j
        later = [caller.request("jobs", 20.0, j).payload[0] for j in range(20)]
        assert set(later) == {"a", "b"}
    finally:
        caller.close()


# -- through a bridge --------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_pipe_children_of_a_bridge_form_a_group(reporters: Any) -> None:
    kids, reports, q = reporters
    bridge = IpcBusBridge.create().connect()
    try:
        names = ["p0", "p1", "p2"]
        for name in names:
            kids.start(worker, bridge.open_pipe(), name, "echo", q, kids.stop)
        assert reports.ready(3) == names
        caller = IpcBusClient.create().connect(peer_name="caller")  # the bridge's
        plain = Collector()
        caller.on("jobs", plain)
        sync(caller)
        try:
            answers = [caller.request("jobs", 20.0, j).payload for j in range(30)]
            assert [j for _, j in answers] == list(range(30))
            for j in range(30, 60):
                caller.send("jobs", j)
            sync(caller)
            plain.wait(60, 20)
            seen = handled_by(caller, names)
            assert sorted(j for got in seen.values() for j in got) == list(range(60))
            assert all(len(got) == 20 for got in seen.values())  # equal members: in turn
        finally:
            caller.close()
    finally:
        bridge.close()


@pytest.mark.timeout(120)
def test_a_group_spanning_a_bridges_link_is_one_pool(
        broker: IpcBusBroker, reporters: Any) -> None:
    kids, reports, q = reporters
    bridge = IpcBusBridge.create().connect(broker.address)
    try:
        names = ["p0", "p1", "s0", "s1"]
        for name in names[:2]:
            kids.start(worker, bridge.open_pipe(), name, "echo", q, kids.stop)
        for name in names[2:]:
            kids.start(worker, broker.address, name, "echo", q, kids.stop)
        assert reports.ready(4) == names
        below = IpcBusClient.create().connect(peer_name="below")  # the bridge's
        above = IpcBusClient.create().connect(broker.address, peer_name="above")
        try:
            sync(below)
            by_below = [below.request("jobs", 20.0, j).payload for j in range(40)]
            by_above = [above.request("jobs", 20.0, j).payload for j in range(40, 80)]
            for j in range(80, 120):
                (below if j % 2 else above).send("jobs", j)
            sync(below)
            sync(above)
            assert [j for _, j in by_below + by_above] == list(range(80))
            # the sends may reach the workers after the syncs: poll, bounded
            wait_until(lambda: sum(map(len, handled_by(above, names).values())) >= 120, 20)
            seen = handled_by(above, names)
            jobs = sorted(j for got in seen.values() for j in got)
            assert jobs == list(range(120))  # once each, across both sides
            assert all(len(got) >= 15 for got in seen.values()), \
                {n: len(g) for n, g in seen.items()}
        finally:
            below.close()
            above.close()
    finally:
        bridge.close()
