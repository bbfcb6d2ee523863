"""The request table (``ipcbus._pending``): pure, tested against a plain model with hypothesis.

The property that matters to its three users: every entry added leaves the table exactly once,
by whichever way comes first, and nothing is left behind (receiver index, deadline heap).
"""
from __future__ import annotations

import concurrent.futures
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipcbus._pending import RequestTable, TableClosed, settle

RECEIVERS = ["a", "b", "c"]


def test_take_returns_the_entry_once() -> None:
    table: RequestTable[int, str] = RequestTable()
    table.add(1, "one")
    assert 1 in table and len(table) == 1 and table.get(1) == "one"
    assert table.take(1) == "one"
    assert table.take(1) is None
    assert 1 not in table and len(table) == 0


def test_a_key_in_flight_cannot_be_added_again() -> None:
    table: RequestTable[int, str] = RequestTable()
    table.add(1, "one")
    with pytest.raises(KeyError):
        table.add(1, "again")
    assert table.get(1) == "one"
    table.take(1)
    table.add(1, "reused after its answer")  # a finished id may come back
    assert table.get(1) == "reused after its answer"


def test_the_last_receiver_to_drop_out_takes_the_entry() -> None:
    table: RequestTable[int, str] = RequestTable()
    table.add(7, "req", receivers=["a", "b"])
    assert table.may_answer(7, "a") and not table.may_answer(7, "z")
    assert table.drop_receiver(7, "a") is None
    assert table.receivers(7) == {"b"}
    assert table.drop_receiver(7, "z") is None  # never a receiver: nothing changes
    assert table.drop_receiver(7, "b") == "req"
    assert 7 not in table and table.keys_of("b") == frozenset()


def test_receiver_gone_fails_only_what_it_alone_would_answer_in_order() -> None:
    table: RequestTable[int, str] = RequestTable()
    table.add(3, "x", receivers=["a"])
    table.add(1, "y", receivers=["a", "b"])
    table.add(2, "z", receivers=["a"])
    assert table.receiver_gone("a") == [(3, "x"), (2, "z")]
    assert table.receivers(1) == {"b"}
    assert table.keys_of("a") == frozenset()


def test_expired_takes_in_deadline_order_and_skips_answered() -> None:
    table: RequestTable[str, int] = RequestTable()
    table.add("late", 3, deadline=30.0)
    table.add("early", 1, deadline=10.0)
    table.add("answered", 2, deadline=20.0)
    table.add("forever", 4)
    assert table.take("answered") == 2
    assert table.next_deadline() == 10.0
    assert table.expired(5.0) == []
    assert table.expired(30.0) == [("early", 1), ("late", 3)]
    assert table.next_deadline() is None
    assert table.items() == [("forever", 4)]


def test_close_takes_everything_and_refuses_later_adds_with_the_first_reason() -> None:
    table: RequestTable[int, str] = RequestTable()
    table.add(1, "a", receivers=["p"], deadline=1.0)
    table.add(2, "b")
    assert sorted(table.close("connection lost")) == [(1, "a"), (2, "b")]
    assert table.close("again") == []
    assert table.closed == "connection lost"
    with pytest.raises(TableClosed) as info:
        table.add(3, "c")
    assert info.value.reason == "connection lost"
    assert table.expired(100.0) == [] and table.next_deadline() is None


def test_the_heap_of_deadlines_stays_bounded_when_requests_are_answered_early() -> None:
    table: RequestTable[int, int] = RequestTable()
    for i in range(10_000):
        table.add(i, i, deadline=1000.0 + i)
        assert table.take(i) == i
    assert len(table._heap) < 2 * 512 + 2  # compacted, not 10 000 dead slots


def test_settle_ignores_a_future_cancelled_meanwhile() -> None:
    done: concurrent.futures.Future[Any] = concurrent.futures.Future()
    settle(done, result=1)
    settle(done, exc=RuntimeError("late"))  # already set: ignored
    assert done.result() == 1
    cancelled: concurrent.futures.Future[Any] = concurrent.futures.Future()
    cancelled.cancel()
    settle(cancelled, result=2)
    assert cancelled.cancelled()


# -- model-based ------------------------------------------------------------------------------
keys = st.integers(0, 6)
ops = st.lists(st.one_of(
    st.tuples(st.just("add"), keys, st.sets(st.sampled_from(RECEIVERS)),
              st.one_of(st.none(), st.integers(0, 20))),
    st.tuples(st.just("take"), keys),
    st.tuples(st.just("drop"), keys, st.sampled_from(RECEIVERS)),
    st.tuples(st.just("gone"), st.sampled_from(RECEIVERS)),
    st.tuples(st.just("expire"), st.integers(0, 20)),
    st.tuples(st.just("close"),),
), max_size=60)


@settings(max_examples=400, deadline=None)
@given(ops)
def test_every_entry_leaves_exactly_once_whatever_the_sequence(sequence: list[Any]) -> None:
    table: RequestTable[int, int] = RequestTable()
    model: dict[int, tuple[int, set[str], int | None]] = {}  # key -> (entry, receivers, deadline)
    added: list[int] = []
    out: list[int] = []
    closed = False
    serial = 0
    for op in sequence:
        if op[0] == "add":
            _, key, receivers, deadline = op
            if closed:
                with pytest.raises(TableClosed):
                    table.add(key, serial)
                continue
            if key in model:
                with pytest.raises(KeyError):
                    table.add(key, serial, receivers=receivers, deadline=deadline)
                continue
            table.add(key, serial, receivers=receivers,
                      deadline=None if deadline is None else float(deadline))
            model[key] = (serial, set(receivers), deadline)
            added.append(serial)
            serial += 1
        elif op[0] == "take":
            got = table.take(op[1])
            want = model.pop(op[1], None)
            assert got == (None if want is None else want[0])
            if got is not None:
                out.append(got)
        elif op[0] == "drop":
            _, key, receiver = op
            got = table.drop_receiver(key, receiver)
            last: int | None = None
            if key in model and receiver in model[key][1]:
                model[key][1].discard(receiver)
                if not model[key][1]:
                    last = model.pop(key)[0]
            assert got == last
            if got is not None:
                out.append(got)
        elif op[0] == "gone":
            gone = table.receiver_gone(op[1])
            want_keys = []
            for key, (entry, receivers, _) in list(model.items()):
                if op[1] in receivers:
                    receivers.discard(op[1])
                    if not receivers:
                        want_keys.append(key)
            assert sorted(k for k, _ in gone) == sorted(want_keys)
            for key, entry in gone:
                assert model.pop(key)[0] == entry
                out.append(entry)
        elif op[0] == "expire":
            now = op[1]
            expired = table.expired(float(now))
            want_keys = [k for k, (_, _, d) in model.items() if d is not None and d <= now]
            assert sorted(k for k, _ in expired) == sorted(want_keys)
            deadlines = [model[k][2] for k, _ in expired]
            assert deadlines == sorted(deadlines)  # type: ignore[type-var]
            for key, entry in expired:
                assert model.pop(key)[0] == entry
                out.append(entry)
        else:
            taken = table.close("closed")
            assert sorted(e for _, e in taken) == sorted(e for e, _, _ in model.values())
            out.extend(e for _, e in taken)
            model.clear()
            closed = True
        # the table and the model agree after every step
        assert len(table) == len(model)
        for key, (entry, receivers, _) in model.items():
            assert table.get(key) == entry and table.receivers(key) == receivers
        for receiver in RECEIVERS:
            assert table.keys_of(receiver) == {k for k, v in model.items() if receiver in v[1]}
        pending = [v[2] for v in model.values() if v[2] is not None]
        assert table.next_deadline() == (float(min(pending)) if pending else None)
    out.extend(e for _, e in table.close("end"))
    assert sorted(out) == sorted(added)  # each entry left exactly once
