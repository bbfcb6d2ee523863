"""The client's read/dispatch scheduling as a unit (``ipcbus._client.inbox``): no sockets, no
threads, an injected clock, and a hypothesis simulation of a reader and a dispatcher that obey
the inbox, with the rules of its docstring as invariants."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipcbus._client.inbox import Inbox

BUDGET = 1000
IDLE = 0.0625  # exact in binary: the clock arithmetic below is exact


class Clock:
    def __init__(self) -> None:
        self.now = 128.0

    def __call__(self) -> float:
        return self.now


def inbox() -> tuple[Inbox, Clock]:
    clock = Clock()
    return Inbox(BUDGET, IDLE, clock=clock), clock


def test_items_come_out_in_the_order_they_were_put() -> None:
    box, _ = inbox()
    for i in range(5):
        box.put(f"batch {i}", 10)
    box.put(print)  # a call_soon callable counts nothing
    assert [box.take() for _ in range(6)] == [(f"batch {i}", 10) for i in range(5)] + \
        [(print, 0)]
    assert box.take() is None


def test_reading_stops_past_the_budget_and_resumes_at_half() -> None:
    box, _ = inbox()
    for _ in range(3):
        box.put("x", 300)
    box.put("x", 100)
    assert box.may_read  # exactly at the budget: not past it
    box.put("x", 1)
    assert not box.may_read and box.over_budget
    box.take()
    assert box.release(300) is False and not box.may_read  # 701: over half
    box.take()
    assert box.release(300) is True and box.may_read  # 401: at most half, told once
    box.take()
    assert box.release(300) is False and box.may_read
    assert box.queued_bytes == 101


def test_bytes_stay_counted_until_their_listeners_ran() -> None:
    box, _ = inbox()
    box.put("big", BUDGET + 1)
    assert box.take() == ("big", BUDGET + 1)
    assert not box.may_read  # taken, not dispatched yet: the listeners hold it
    assert box.release(BUDGET + 1) and box.may_read


def test_once_closing_reading_never_stops() -> None:
    box, _ = inbox()
    box.put("x", 2 * BUDGET)
    assert not box.may_read
    assert box.close() is True  # it had stopped: the connection wakes the reader
    assert box.may_read
    box.put("y", 5 * BUDGET)
    assert box.may_read
    assert box.close() is False


def test_put_back_returns_an_item_to_the_head() -> None:
    box, _ = inbox()
    box.put("a", 1)
    box.put("end")
    assert box.take() == ("a", 1)
    box.put_back("a", 1)
    assert box.take() == ("a", 1) and box.take() == ("end", 0)


def test_the_dispatcher_is_told_once_per_quiet_period() -> None:
    box, clock = inbox()
    box.put("x", 10)
    assert box.wait_timeout() is None  # work waiting: its dispatcher notifies when done
    box.take()
    box.release(10)
    assert box.wait_timeout() == pytest.approx(IDLE)  # empty from now: sleep until the idle time
    clock.now += IDLE / 2
    assert not box.went_idle()
    assert box.wait_timeout() == pytest.approx(IDLE / 2)
    clock.now += IDLE / 2
    assert box.went_idle()
    assert not box.went_idle()  # once
    assert box.wait_timeout() is None  # then sleep until something comes
    box.put("y")  # busy again
    box.take()
    assert box.wait_timeout() == pytest.approx(IDLE)
    clock.now += IDLE
    assert box.went_idle()


def test_a_new_inbox_goes_idle_without_traffic() -> None:
    box, clock = inbox()
    assert box.wait_timeout() == pytest.approx(IDLE)
    clock.now += IDLE
    assert box.went_idle()


ops = st.lists(st.one_of(
    st.tuples(st.just("read"), st.integers(min_value=0, max_value=BUDGET)),
    st.tuples(st.just("soon"), st.just(0)),
    st.tuples(st.just("dispatch"), st.just(0)),
    st.tuples(st.just("nested"), st.integers(min_value=0, max_value=3)),
    st.tuples(st.just("close"), st.just(0)),
    st.tuples(st.just("tick"), st.integers(min_value=0, max_value=100)),
), max_size=120)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_a_reader_and_a_dispatcher_that_obey_the_inbox(steps: list[tuple[str, int]]) -> None:
    """A reader that reads only when allowed (and then sleeps until told), a dispatcher
    (sometimes nested) that takes and releases, call_soon, close, time passing: nothing is
    lost or reordered, memory stays within the budget plus one read, and a reader that
    stopped is always told when it may go on (no lost wake-up)."""
    box, clock = inbox()
    put: list[int] = []  # sequence numbers in the order put
    got: list[int] = []
    closing = False
    reader_asleep = False
    seq = 0

    def dispatch_one() -> bool:
        nonlocal reader_asleep
        item = box.take()
        if item is None:
            return False
        got.append(item[0])
        if box.release(item[1]):
            reader_asleep = False  # the connection notifies the condition
        return True

    for op, arg in steps:
        if op == "read" and not reader_asleep:
            if box.may_read:
                box.put(seq, arg)
                put.append(seq)
                seq += 1
            else:
                reader_asleep = True  # it waits on the condition
        elif op == "soon":
            box.put(seq)
            put.append(seq)
            seq += 1
        elif op in ("dispatch", "nested"):
            for _ in range(max(1, arg)):
                if not dispatch_one():
                    break
        elif op == "close":
            if box.close():
                reader_asleep = False  # close() notifies the condition
            closing = True
        elif op == "tick":
            clock.now += arg / 1000
            if box.went_idle():
                assert len(box) == 0
        assert got == put[:len(got)], "order kept, nothing lost"
        assert not (reader_asleep and box.may_read), "the reader was not told it may read"
        if not closing:
            assert 0 <= box.queued_bytes <= 2 * BUDGET, "at most one read past the budget"
    while dispatch_one():  # the dispatcher drains the rest
        pass
    assert got == put and box.queued_bytes == 0 and box.may_read and not reader_asleep


# -- roles: who reads, who dispatches ---------------------------------------------------------
def test_an_idle_thread_dispatches_first_then_reads_then_sleeps() -> None:
    box, _ = inbox()
    box.put("welcome", 10)
    assert box.next_role() == "dispatch"
    assert box.next_role() == "read"
    assert box.next_role() is None  # both roles held
    assert box.take() == ("welcome", 10)
    box.release(10)
    box.stop_dispatching()
    assert box.next_role() is None  # nothing queued, someone reads
    assert box.wait_timeout() == pytest.approx(IDLE)


def test_a_reader_runs_what_it_read_itself_when_no_one_dispatches() -> None:
    """Hand-over: the message needs no hand-off; the other thread takes up reading."""
    box, _ = inbox()
    assert box.next_role() == "read"
    assert box.read_done("batch", 100) is True
    assert box.dispatching and not box.reading and len(box) == 0
    assert box.queued_bytes == 100  # counted until its listeners ran
    assert box.next_role() == "read"  # the other thread
    assert box.read_done("next", 5) is False  # someone dispatches: queued
    assert box.reading and box.take() == ("next", 5)
    assert box.release(100) is False and box.queued_bytes == 5


def test_a_reader_queues_behind_what_is_queued() -> None:
    """Order: a batch read while an earlier item waits is never run before it."""
    box, _ = inbox()
    assert box.next_role() == "read"
    box.put(print)  # a call_soon from another thread, not taken yet
    assert box.read_done("batch", 1) is False
    assert [box.take(), box.take()] == [(print, 0), ("batch", 1)]


def test_without_hand_over_one_thread_reads_and_the_other_dispatches() -> None:
    clock = Clock()
    box = Inbox(BUDGET, IDLE, hand_over=False, clock=clock)
    assert box.next_role() == "read"
    assert box.read_done("batch", 1) is False
    assert box.reading and box.next_role() == "dispatch"


def test_a_reader_over_the_budget_gives_its_role_up_until_half_is_dispatched() -> None:
    box, _ = inbox()
    box.put("x", 0)
    assert box.next_role() == "dispatch"  # (a long listener holds the dispatcher's role)
    assert box.next_role() == "read"
    assert box.read_done("big", BUDGET + 1) is False  # someone dispatches: queued
    assert not box.may_read
    box.stop_reading()
    assert box.next_role() is None  # nobody may read; the dispatcher holds its role
    assert box.take() == ("x", 0) and box.take() == ("big", BUDGET + 1)
    assert box.release(BUDGET + 1) is True
    assert box.next_role() == "read"


def test_after_the_end_no_one_reads_again() -> None:
    box, _ = inbox()
    assert box.next_role() == "read"
    box.stop_reading(ended=True)
    box.put("end")
    assert box.next_role() == "dispatch"
    assert box.next_role() is None
    box.close()
    assert box.next_role() is None


thread_steps = st.lists(st.tuples(
    st.integers(min_value=0, max_value=1),
    st.sampled_from(["step", "step", "step", "soon", "close", "nothing"]),
    st.integers(min_value=0, max_value=BUDGET)), max_size=150)


@settings(max_examples=300, deadline=None)
@given(thread_steps, st.booleans())
def test_two_threads_taking_roles(steps: list[tuple[int, str, int]], hand_over: bool) -> None:
    """Two I/O threads that do what the inbox says, in any interleaving: each role has at
    most one holder; what is dispatched is what was read (and called soon), in order; and
    once no more arrives, the thread that does not read dispatches everything."""
    clock = Clock()
    box = Inbox(BUDGET, IDLE, hand_over=hand_over, clock=clock)
    role: list[str | None] = [None, None]
    running: list[int] = [0, 0]  # bytes of the item a dispatcher is running
    arrived: list[int] = []
    dispatched: list[int] = []
    seq = 0

    def step(t: int, nbytes: int, reads: bool) -> bool:
        """One move of thread ``t``; False if it is asleep or blocked."""
        nonlocal seq
        if role[t] is None:
            role[t] = box.next_role()
            return role[t] is not None
        if role[t] == "read":
            if not reads or nbytes == 0:
                return False  # blocked in recv (or a read that completed no frame)
            arrived.append(seq)
            if box.read_done(seq, nbytes):
                dispatched.append(seq)  # run at once, by the thread that read it
                role[t], running[t] = "dispatch", nbytes
            elif not box.may_read:
                box.stop_reading()
                role[t] = None
            seq += 1
            return True
        box.release(running[t])
        running[t] = 0
        got = box.take()
        if got is None:
            box.stop_dispatching()
            role[t] = None
        else:
            dispatched.append(got[0])
            running[t] = got[1]
        return True

    for t, action, nbytes in steps:
        if action == "step":
            step(t, nbytes, reads=True)
        elif action == "soon":
            box.put(seq)
            arrived.append(seq)
            seq += 1
        elif action == "close":
            box.close()
        assert role.count("read") == int(box.reading), "one reader at most, the one told"
        assert role.count("dispatch") == int(box.dispatching), "one dispatcher at most"
        assert dispatched == arrived[:len(dispatched)], "order kept"
    for _ in range(4 * len(arrived) + 10):  # no more input: run until no one can move
        if not (step(0, 0, reads=False) | step(1, 0, reads=False)):
            break
    assert dispatched == arrived and len(box) == 0, "nothing left behind"
    assert box.queued_bytes == sum(running)
