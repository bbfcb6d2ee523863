"""Issue 17 gaps found in session 6, across real processes (spawn, fork and forkserver: the
``ctx`` fixture): ``request_all`` reaches a group's member behind a bridge's link (from both
sides), and a gathering ends as soon as every receiver has answered, failed (its listener
raised) or can no longer answer (it stopped listening while the request was on its way),
not at the timeout.

Children report on a queue and are always stopped, joined with a bound and killed
(``helpers.Children``, the ``reporters`` fixture).
"""
from __future__ import annotations

import concurrent.futures
import threading
from typing import Any, Iterator

import pytest

from ipcbus import IpcBusBridge, IpcBusBroker, IpcBusClient

from helpers import elapsed, sync, wait_until


# -- children (module level, for spawn) ---------------------------------------------------------
def gatherer(address: Any, name: str, mode: str, group: str | None, report: Any, stop: Any,
             drop: Any) -> None:
    """Listens on "job" (in ``group`` if given) as ``name``: mode "echo" answers its name,
    "raise" raises. On "block" its dispatch thread waits until ``drop`` is set and its main
    thread has removed the "job" listener (mode "drop"): a request already on its way then
    finds no listener here."""
    client = IpcBusClient.create().connect(address, peer_name=name)
    released = threading.Event()

    def on_job(event: Any, *args: Any) -> None:
        if mode == "raise":
            raise ValueError("the listener failed")
        event.request.resolve(name)

    def on_block(event: Any) -> None:
        report.put(("blocked", name))
        released.wait(30)

    client.on("job", on_job, group=group)
    client.on(f"block/{name}", on_block)
    sync(client)
    report.put(("ready", name))
    if mode == "drop":
        drop.wait(60)
        client.off("job", on_job, group=group)
        sync(client)
        released.set()
    stop.poll(60)
    client.close()


@pytest.fixture
def linked(broker: IpcBusBroker) -> Iterator[IpcBusBridge]:
    bridge = IpcBusBridge.create().connect(broker.address)
    try:
        yield bridge
    finally:
        bridge.close()


# -- groups behind a link ----------------------------------------------------------------------
@pytest.mark.timeout(90)
def test_request_all_reaches_group_members_behind_a_link(
        broker: IpcBusBroker, linked: IpcBusBridge, reporters: Any, ctx: Any) -> None:
    kids, reports, q = reporters
    drop = ctx.Event()
    for name in ("p0", "p1"):  # pipe children of the bridge, members of "pool"
        kids.start(gatherer, linked.open_pipe(), name, "echo", "pool", q, kids.stop, drop)
    kids.start(gatherer, broker.address, "s0", "echo", "pool", q, kids.stop, drop)
    kids.start(gatherer, broker.address, "plain", "echo", None, q, kids.stop, drop)
    assert reports.ready(4) == ["p0", "p1", "plain", "s0"]
    above = IpcBusClient.create().connect(broker.address, peer_name="above")
    below = IpcBusClient.create().connect(peer_name="below")  # the bridge's
    try:
        members: list[str] = []
        for caller in (above, below, above, below, above, below):
            with elapsed() as took:
                got = caller.request_all("job", 20.0)
            names = sorted(r.payload for r in got)
            assert took[0] < 10 and len(names) == 2 and "plain" in names, (caller.peer.name, names)
            members += [n for n in names if n != "plain"]  # one member of the group each time
        assert {"p0", "p1"} <= set(members)  # members behind the link answered, both sides
    finally:
        above.close()
        below.close()


# -- a gathering ends when no receiver can answer any more ----------------------------------------
@pytest.mark.timeout(90)
def test_request_all_ends_when_receivers_fail_or_stopped_listening(
        broker: IpcBusBroker, reporters: Any, ctx: Any) -> None:
    kids, reports, q = reporters
    drop = ctx.Event()
    for name, mode in (("a", "echo"), ("r", "raise"), ("u", "drop")):
        kids.start(gatherer, broker.address, name, mode, None, q, kids.stop, drop)
    assert reports.ready(3) == ["a", "r", "u"]
    caller = IpcBusClient.create().connect(broker.address, peer_name="caller")
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        caller.send("block/u")  # u's dispatch thread waits: the request will queue there
        assert reports.next("blocked", 20)[1] == "u"
        with elapsed() as took:
            future = pool.submit(caller.request_all, "job", 30.0)
            wait_until(lambda: broker.query_state(10)["pending_requests"] == 1, 20)
            drop.set()  # u stops listening; its dispatcher then finds the request unwanted
            got = future.result(25)
        assert [r.payload for r in got if r.err is None] == ["a"]
        assert took[0] < 20  # not the 30 s timeout
        with elapsed() as took:  # and again, u no longer a receiver, r still failing
            got = caller.request_all("job", 30.0)
        assert [r.payload for r in got if r.err is None] == ["a"] and took[0] < 20
    finally:
        pool.shutdown(wait=False)
        caller.close()
