"""Failures from receivers (SPEC 0.2 "Requests: failures") in the pure router: a process whose
receivers all failed sends REQUEST_FAIL with "TypeName: message"; the request fails, with that
reason, once no receiver is left anywhere; only a connection holding a receiver may fail it.
The in-memory bus is test_router.py's."""
from __future__ import annotations

import pytest

from test_router import Bus, bus, expect_fail

__all__ = ["bus"]


def test_a_failing_receiver_does_not_end_a_request_another_may_answer(bus: Bus) -> None:
    e1, e2, e3 = bus.endpoint("e1"), bus.endpoint("e2"), bus.endpoint("e3")
    a, b, c = bus.add_peer(e1, "a"), bus.add_peer(e2, "b"), bus.add_peer(e3, "c")
    bus.subscribe(e1, a, "job")
    bus.subscribe(e2, b, "job")
    bus.request(e3, c, "job", 1)
    e1.take(), e2.take()
    bus.fail(e1, a, "c", 1, "ZeroDivisionError: division by zero")
    assert e3.take() == []
    bus.respond(e2, b, "c", 1, "done")
    frames = e3.take()
    assert [f.kind for f in frames] == [10] and frames[0].sender_id == "b"  # RESPONSE
    assert not bus.router.pending


def test_the_last_failure_a_receiver_reported_fails_the_request(bus: Bus) -> None:
    e1, e2, e3 = bus.endpoint("e1"), bus.endpoint("e2"), bus.endpoint("e3")
    a, b, c = bus.add_peer(e1, "a"), bus.add_peer(e2, "b"), bus.add_peer(e3, "c")
    bus.subscribe(e1, a, "job")
    bus.subscribe(e2, b, "job")
    bus.request(e3, c, "job", 1)
    bus.fail(e2, b, "c", 1, "Boom: first")
    bus.fail(e1, a, "c", 1, "ValueError: second")
    assert expect_fail(e3, "c", 1) == "ValueError: second"
    assert bus.router.state()["dropped"]["forged_answers"] == 0


@pytest.mark.parametrize("order", ["link first", "peer first", "link closes"])
def test_a_listeners_error_beats_the_links_nobody_there(bus: Bus, order: str) -> None:
    """A linked bridge: the request went to a local peer and upstream; whichever answers
    "nobody" last, the requester hears the listener's error."""
    up = bus.endpoint("up", relay=True)
    bus.router.upstream = up
    e1, e2 = bus.endpoint("e1"), bus.endpoint("e2")
    a, c = bus.add_peer(e1, "a"), bus.add_peer(e2, "c")
    bus.subscribe(e1, a, "job")
    bus.request(e2, c, "job", 1)
    if order == "link first":
        bus.fail(up, None, "c", 1, "no listener for 'job' on the bus")
        bus.fail(e1, a, "c", 1, "Boom: x")
    elif order == "peer first":
        bus.fail(e1, a, "c", 1, "Boom: x")
        bus.fail(up, None, "c", 1, "no listener for 'job' on the bus")
    else:
        bus.fail(e1, a, "c", 1, "Boom: x")
        bus.router.remove_endpoint(up)
    assert expect_fail(e2, "c", 1) == "Boom: x"


def test_only_a_connection_holding_a_receiver_may_fail_a_request(bus: Bus) -> None:
    e1, e2, e3 = bus.endpoint("e1"), bus.endpoint("e2"), bus.endpoint("e3")
    a, b, c = bus.add_peer(e1, "a"), bus.add_peer(e2, "b"), bus.add_peer(e3, "c")
    bus.subscribe(e1, a, "job")
    bus.request(e3, c, "job", 1)
    bus.fail(e2, b, "c", 1, "forged")  # b never got it
    bus.fail(e3, c, "c", 1, "forged")  # nor did the requester
    assert e3.take() == []
    assert bus.router.pending.receivers(("c", 1)) == {"a"}
    assert bus.router.state()["dropped"]["forged_answers"] == 2
    # a failure for a request no longer in flight is a late one: not counted
    bus.respond(e1, a, "c", 1)
    e3.take()
    bus.fail(e2, b, "c", 1, "late")
    assert bus.router.state()["dropped"]["forged_answers"] == 2
