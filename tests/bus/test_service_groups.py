"""Issue 17: a service hosted by a group, across real processes. Three hosts started in
children (spawn, fork and forkserver: the ``ctx`` fixture) serve one name as group "pool":
each call is handled exactly once, any member's events reach the proxy, a SIGKILLed member's
call fails at once while the others keep serving, and the proxy hears "stop" only after the
last host has left, also when the hosts sit on both sides of a bridge's link. Mixing a
grouped and an exclusive host on one name is refused.

Children report on a queue and are always stopped, joined with a bound and killed
(``helpers.Children``, the ``reporters`` fixture).
"""
from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
from typing import Any

import pytest

from ipcbus import _protocol as P
from ipcbus import (IpcBusBridge, IpcBusBroker, IpcBusClient, IpcBusRequestError,
                    IpcBusRequestTimeoutError, IpcBusService, IpcBusServiceProxy)
from ipcbus.service import SERVICE_EVENT_START, SERVICE_EVENT_STOP, IpcBusServiceError

from helpers import Collector, Reports, elapsed, pid_of, sync, wait_until


# -- children (module level, for spawn) ---------------------------------------------------------
class Jobs:
    """What a member serves: ``run(job)`` answers ``[member, job]`` (mode "hold": never, it
    reports ("got", name, job) instead); ``handled()`` lists the jobs it ran."""

    def __init__(self, name: str, mode: str, report: Any) -> None:
        self._name, self._mode, self._report = name, mode, report
        self._handled: list[Any] = []

    def run(self, job: Any) -> Any:
        self._handled.append(job)
        if self._mode == "hold":
            self._report.put(("got", self._name, job))
            return concurrent.futures.Future()  # never answered
        return [self._name, job]


def host(address: Any, name: str, mode: str, report: Any, stop: Any) -> None:
    """A member of the pool of service "jobs"; "leave/<name>" stops its service (answered
    once stopped), "done/<name>" answers the jobs it ran, "tell/<name>" sends an event."""
    client = IpcBusClient.create().connect(address, peer_name=name)
    jobs = Jobs(name, mode, report)
    service = IpcBusService.create(client, "jobs", jobs, group="pool").start(20)
    client.on(f"done/{name}", lambda event: event.request.resolve(list(jobs._handled)))
    client.on(f"tell/{name}", lambda event: event.request.resolve(
        service.send_event("hello", name)))

    def leave(event: Any) -> None:
        service.stop()
        event.request.resolve(True)

    client.on(f"leave/{name}", leave)
    sync(client)
    report.put(("ready", name))
    stop.poll(120)
    client.close()


def _hosts(kids: Any, reports: Reports, q: Any, address: Any, names: list[str]) -> None:
    for name in names:
        kids.start(host, address, name, "echo", q, kids.stop)
    assert reports.ready(len(names)) == names


# -- exactly once ------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_three_hosts_share_the_calls_each_runs_once(broker: IpcBusBroker, reporters: Any) -> None:
    kids, reports, q = reporters
    names = ["h0", "h1", "h2"]
    caller = IpcBusClient.create().connect(broker.address, peer_name="caller")
    try:
        proxy = IpcBusServiceProxy.create(caller, "jobs", 20.0)  # before the hosts: it hears
        starts, events = Collector(), Collector()                # each member's "start"
        proxy.on(SERVICE_EVENT_START, starts)
        proxy.on("hello", events)
        _hosts(kids, reports, q, broker.address, names)
        proxy.connect(20)
        pool = concurrent.futures.ThreadPoolExecutor(4)
        answers = list(pool.map(lambda j: proxy.call("run", j), range(60)))
        pool.shutdown()
        assert [job for _, job in answers] == list(range(60))
        seen = {n: caller.request(f"done/{n}", 20.0).payload for n in names}
        assert sorted(j for got in seen.values() for j in got) == list(range(60))  # once each
        # every member got work (not a share: a member starved by a loaded machine holds its
        # calls longer, and the fewest-in-progress rule rightly gives it fewer)
        assert all(got for got in seen.values()), {n: len(g) for n, g in seen.items()}
        for n in names:  # any member's events reach the proxy
            assert caller.request(f"tell/{n}", 20.0).payload is True
        events.wait(3, 20)
        assert sorted(name for name, _ in events.items) == names  # handler(*args)
        assert proxy.get_status(20)["group"] == "pool"
        starts.wait(1, 20)  # (emitted after connect() returns)
        assert len(starts.items) == 1  # started once, not once per member
        assert sorted(broker.query_state(20)["services"]["jobs"]) == sorted(
            p["id"] for p in broker.query_state(20)["peers"] if p["name"] in names)
    finally:
        caller.close()


# -- a member killed ------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_a_killed_members_call_fails_at_once_and_the_others_serve(
        broker: IpcBusBroker, reporters: Any, ctx: Any) -> None:
    kids, reports, q = reporters
    _hosts(kids, reports, q, broker.address, ["a", "b"])
    doomed_q = ctx.Queue()  # its own queue: killed holding a shared queue's lock would block
    doomed = kids.start(host, broker.address, "doomed", "hold", doomed_q, kids.stop)
    doomed_reports = Reports(doomed_q)
    doomed_reports.ready(1)
    caller = IpcBusClient.create().connect(broker.address, peer_name="caller")
    try:
        proxy = IpcBusServiceProxy.create(caller, "jobs", 30.0)
        stops = Collector()
        proxy.on(SERVICE_EVENT_STOP, stops)
        proxy.connect(20)
        held = [proxy.call_async("run", j) for j in range(3)]  # equal loads: one each
        _, _, job = doomed_reports.next("got", 20)
        os.kill(pid_of(doomed), signal.SIGKILL)
        with elapsed() as took:
            with pytest.raises(IpcBusRequestError) as failed:
                held[job].result(20)
        assert not isinstance(failed.value, IpcBusRequestTimeoutError)
        assert took[0] < 20
        for j, future in enumerate(held):
            if j != job:
                assert future.result(20)[1] == j
        later = {proxy.call("run", j)[0] for j in range(20)}
        assert later == {"a", "b"}
        assert proxy.is_started and stops.args == []
    finally:
        caller.close()


# -- stop after the last --------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_stop_only_after_the_last_host_leaves_across_a_link(
        broker: IpcBusBroker, reporters: Any) -> None:
    kids, reports, q = reporters
    bridge = IpcBusBridge.create().connect(broker.address)
    try:
        kids.start(host, bridge.open_pipe(), "below", "echo", q, kids.stop)
        assert reports.ready(1) == ["below"]
        _hosts(kids, reports, q, broker.address, ["above"])
        caller = IpcBusClient.create().connect(peer_name="caller")  # the bridge's
        try:
            proxy = IpcBusServiceProxy.create(caller, "jobs", 20.0)
            stops = Collector()
            proxy.on(SERVICE_EVENT_STOP, stops)
            proxy.connect(20)
            by = {proxy.call("run", j)[0] for j in range(10)}
            assert by == {"below", "above"}  # the broker chooses across the link
            assert caller.request("leave/above", 20.0).payload is True
            assert {proxy.call("run", j)[0] for j in range(4)} == {"below"}
            assert proxy.is_started and stops.args == []
            assert caller.request("leave/below", 20.0).payload is True
            stops.wait(1, 20)
            wait_until(lambda: not proxy.is_started, 20)
            assert "jobs" not in broker.query_state(20)["services"]
        finally:
            caller.close()
    finally:
        bridge.close()


# -- refused -----------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_mixing_exclusive_and_grouped_hosts_is_refused(broker: IpcBusBroker, clients: Any) -> None:
    a, b = clients(broker.address, peer_name="a"), clients(broker.address, peer_name="b")
    IpcBusService.create(a, "alone").start(10)
    with pytest.raises(IpcBusServiceError, match="without a group"):
        IpcBusService.create(b, "alone", group="pool").start(10)
    IpcBusService.create(a, "pooled", group="x").start(10)
    with pytest.raises(IpcBusServiceError, match="group 'x'"):
        IpcBusService.create(b, "pooled").start(10)
    with pytest.raises(IpcBusServiceError, match="not 'y'"):
        IpcBusService.create(b, "pooled", group="y").start(10)
    IpcBusService.create(b, "pooled", group="x").start(10)
    assert broker.query_state(10)["services"]["pooled"] == [a.peer.id, b.peer.id]


# -- the state ---------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_the_state_and_the_cli_show_groups_and_pools(broker: IpcBusBroker, clients: Any) -> None:
    a, b = clients(broker.address, peer_name="alpha"), clients(broker.address, peer_name="beta")
    for client in (a, b):
        client.on("jobs", lambda event: None, group="pool")
        IpcBusService.create(client, "calc", group="calcs").start(10)
        sync(client)
    state = broker.query_state(10)
    assert state["groups"]["jobs"] == {"pool": [a.peer.id, b.peer.id]}
    assert state["groups"][P.service_call_channel("calc")] == {"calcs": [a.peer.id, b.peer.id]}
    assert state["services"] == {"calc": [a.peer.id, b.peer.id]}
    out = subprocess.run([sys.executable, "-m", "ipcbus", "state", str(broker.address)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    groups = lines.index("GROUPS")
    jobs = next(line for line in lines[groups:] if line.strip().startswith("jobs"))
    assert "pool" in jobs and "alpha" in jobs and "beta" in jobs
    services = lines.index("SERVICES")
    calc = next(line for line in lines[services:] if line.strip().startswith("calc"))
    assert f"alpha ({a.peer.id}), beta ({b.peer.id})" in calc
