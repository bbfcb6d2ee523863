"""The EventEmitter surface: the pure Emitter registry, IpcBusClient over a real broker, and
once/on across real processes (spawn and fork)."""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable

import pytest

from ipcbus import IpcBusBroker, IpcBusClient, IpcBusEvent
from ipcbus.emitter import Emitter

from helpers import Collector, sync, wait_until


# =============================================================================================
# helpers
# =============================================================================================
class Recorder(Emitter[str]):
    """An Emitter that records its 0->1 / 1->0 hook calls."""

    def __init__(self) -> None:
        super().__init__()
        self.hooks: list[tuple[str, str]] = []

    def _first_listener(self, key: str) -> None:
        self.hooks.append(("first", key))

    def _last_listener(self, key: str) -> None:
        self.hooks.append(("last", key))


class Log:
    """A thread-safe ordered log of tags, with a bounded wait for a length."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self._cond = threading.Condition()

    def add(self, item: Any) -> None:
        with self._cond:
            self.items.append(item)
            self._cond.notify_all()

    def tag(self, name: str) -> Callable[..., None]:
        def listener(*args: Any) -> None:
            self.add((name, args[1:] if args and isinstance(args[0], IpcBusEvent) else args))
        listener.__name__ = f"listener_{name}"
        return listener

    def names(self) -> list[str]:
        with self._cond:
            return [n for n, _ in self.items]

    def wait(self, count: int, timeout: float = 5.0) -> list[Any]:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.items) >= count, timeout):
                raise AssertionError(f"got {len(self.items)} of {count} items in {timeout} s")
            return list(self.items)


def fence(sender: IpcBusClient, receiver: IpcBusClient, channel: str = "fence") -> None:
    """Send a marker from ``sender`` to ``receiver`` and wait until it is dispatched.

    Messages from one sender are dispatched in order, so when the marker's listener has run,
    every listener of every message ``sender`` sent before has run too.
    """
    col = Collector()
    receiver.on(channel, col)
    try:
        sync(receiver)
        sender.send_to(receiver.peer, channel)
        col.wait(1)
    finally:
        receiver.off(channel, col)


def broker_channels(broker: IpcBusBroker) -> dict[str, int]:
    channels: dict[str, int] = broker.query_state()["channels"]
    return channels


def noop(*args: Any) -> None:
    pass


# =============================================================================================
# 1. the pure Emitter
# =============================================================================================
def test_on_and_add_listener_register_in_order_and_return_self() -> None:
    em: Emitter[str] = Emitter()
    log = Log()
    a, b = log.tag("a"), log.tag("b")
    assert em.on("x", a) is em
    assert em.add_listener("x", b) is em
    assert em.listeners("x") == [a, b]
    assert em._emit_local("x", 1, 2) == 2
    assert log.items == [("a", (1, 2)), ("b", (1, 2))]
    assert em._emit_local("x", 3) == 2
    assert log.names() == ["a", "b", "a", "b"]


def test_prepend_and_prepend_once_ordering() -> None:
    em: Emitter[str] = Emitter()
    log = Log()
    a, b, c, d = (log.tag(n) for n in "abcd")
    assert em.on("x", a) is em
    assert em.prepend_listener("x", b) is em
    assert em.on("x", c) is em
    assert em.prepend_once_listener("x", d) is em
    assert em.listeners("x") == [d, b, a, c]
    assert em._take("x") == [d, b, a, c]
    assert em.listeners("x") == [b, a, c]
    assert em._emit_local("x") == 3
    assert log.names() == ["b", "a", "c"]


def test_once_runs_only_once_and_then_leaves() -> None:
    em: Emitter[str] = Emitter()
    log = Log()
    o, p = log.tag("once"), log.tag("on")
    em.once("x", o)
    em.on("x", p)
    assert em.listener_count("x") == 2
    em._emit_local("x", 1)
    em._emit_local("x", 2)
    assert log.items == [("once", (1,)), ("on", (1,)), ("on", (2,))]
    assert em.listeners("x") == [p]
    assert em.listener_count("x") == 1


def test_off_removes_the_most_recent_registration() -> None:
    em: Emitter[str] = Emitter()
    log = Log()
    a, b = log.tag("a"), log.tag("b")
    em.on("x", a).on("x", b).on("x", a)
    assert em.off("x", a) is em
    assert em.listeners("x") == [a, b]
    em.on("x", a)
    assert em.remove_listener("x", a) is em
    assert em.listeners("x") == [a, b]
    em.off("x", a)
    assert em.listeners("x") == [b]
    # absent listener / channel: no-op
    em.off("x", a).off("nope", a)
    assert em.listeners("x") == [b]
    assert em.event_names() == ["x"]


def test_off_of_a_listener_registered_with_on_then_once_removes_the_once() -> None:
    em: Emitter[str] = Emitter()
    log = Log()
    a = log.tag("a")
    em.on("x", a).once("x", a)
    em.off("x", a)  # the later registration (the once one) goes
    em._emit_local("x", 1)
    em._emit_local("x", 2)
    assert log.items == [("a", (1,)), ("a", (2,))]
    assert em.listener_count("x") == 1


def test_remove_all_listeners_of_one_channel_and_of_all() -> None:
    em: Emitter[str] = Emitter()
    em.on("x", noop).on("x", print).on("y", noop).once("z", noop)
    assert sorted(em.event_names()) == ["x", "y", "z"]
    assert em.remove_all_listeners("x") is em
    assert sorted(em.event_names()) == ["y", "z"]
    assert em.listeners("x") == []
    assert em.listener_count("x") == 0
    assert em._emit_local("x") == 0
    em.remove_all_listeners("absent")
    assert sorted(em.event_names()) == ["y", "z"]
    assert em.remove_all_listeners() is em
    assert em.event_names() == []
    assert em.listener_count("y") == 0 and em.listener_count("z") == 0


def test_listeners_count_and_names_are_snapshots() -> None:
    em: Emitter[str] = Emitter()
    assert em.listeners("x") == [] and em.listener_count("x") == 0 and em.event_names() == []
    em.on("x", noop).on("x", noop).on("y", print)
    got = em.listeners("x")
    assert got == [noop, noop]
    got.clear()  # mutating the returned list changes nothing
    assert em.listener_count("x") == 2
    names = em.event_names()
    assert sorted(names) == ["x", "y"]
    names.clear()
    assert sorted(em.event_names()) == ["x", "y"]


@pytest.mark.parametrize("method", ["on", "add_listener", "once", "prepend_listener",
                                    "prepend_once_listener"])
@pytest.mark.parametrize("bad", [None, 42, "not callable", object()])
def test_non_callable_listener_is_a_type_error(method: str, bad: Any) -> None:
    em: Emitter[str] = Emitter()
    with pytest.raises(TypeError):
        getattr(em, method)("x", bad)
    assert em.event_names() == []
    assert em.listener_count("x") == 0


def test_once_runs_once_when_threads_take_concurrently() -> None:
    nthreads, rounds = 8, 100
    for _ in range(rounds):
        em: Emitter[str] = Emitter()
        calls: list[int] = []
        lock = threading.Lock()

        def once_listener() -> None:
            with lock:
                calls.append(threading.get_ident())

        em.once("x", once_listener)
        barrier = threading.Barrier(nthreads)
        errors: list[BaseException] = []

        def worker() -> None:
            try:
                barrier.wait(5)
                em._emit_local("x")
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker) for _ in range(nthreads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert not any(t.is_alive() for t in threads)
        assert errors == []
        assert len(calls) == 1
        assert em.listener_count("x") == 0


def test_once_taken_concurrently_is_returned_to_exactly_one_taker() -> None:
    nthreads = 8
    for _ in range(100):
        em: Emitter[str] = Emitter()
        em.once("x", noop)
        em.on("x", print)
        barrier = threading.Barrier(nthreads)
        taken: list[list[Any]] = []
        lock = threading.Lock()

        def worker() -> None:
            barrier.wait(5)
            got = em._take("x")
            with lock:
                taken.append(got)

        threads = [threading.Thread(target=worker) for _ in range(nthreads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert len(taken) == nthreads
        assert sum(got.count(noop) for got in taken) == 1
        assert all(got.count(print) == 1 for got in taken)


def test_removing_during_an_emit_affects_the_next_emit_only() -> None:
    em: Emitter[str] = Emitter()
    log = Log()
    b, c = log.tag("b"), log.tag("c")

    def a(*args: Any) -> None:
        log.add(("a", args))
        em.off("x", a)
        em.off("x", c)

    em.on("x", a).on("x", b).on("x", c)
    assert em._emit_local("x", 1) == 3
    assert log.names() == ["a", "b", "c"]
    assert em.listeners("x") == [b]
    assert em._emit_local("x", 2) == 1
    assert log.names() == ["a", "b", "c", "b"]


def test_adding_during_an_emit_affects_the_next_emit_only() -> None:
    em: Emitter[str] = Emitter()
    log = Log()
    late = log.tag("late")

    def a(*args: Any) -> None:
        log.add(("a", args))
        em.on("x", late)

    em.once("x", a)
    em._emit_local("x")
    assert log.names() == ["a"]
    em._emit_local("x")
    assert log.names() == ["a", "late"]


def test_hooks_fire_on_zero_to_one_and_one_to_zero_only() -> None:
    em = Recorder()
    em.on("x", noop)
    assert em.hooks == [("first", "x")]
    em.on("x", print).prepend_listener("x", noop).once("x", noop).prepend_once_listener("x", len)
    assert em.hooks == [("first", "x")]
    em.off("x", noop)
    em.off("x", noop)
    em.off("x", print)
    em.off("x", lambda *a: None)  # never registered: ignored
    with pytest.raises(TypeError):  # not a listener at all: raises, as Node's does
        em.off("x", "never registered")  # type: ignore[arg-type]
    em.off("y", noop)
    assert em.hooks == [("first", "x")]
    assert em.listeners("x") == [len, noop]
    em.off("x", noop)
    em.off("x", len)
    assert em.hooks == [("first", "x"), ("last", "x")]
    em.off("x", len)  # nothing left: no second "last"
    assert em.hooks == [("first", "x"), ("last", "x")]
    em.prepend_listener("x", noop)  # 0 -> 1 again, through prepend
    assert em.hooks == [("first", "x"), ("last", "x"), ("first", "x")]


def test_hooks_through_once_consumption() -> None:
    em = Recorder()
    em.once("x", noop)
    assert em.hooks == [("first", "x")]
    em._emit_local("x")
    assert em.hooks == [("first", "x"), ("last", "x")]
    assert em.event_names() == []
    # a once next to an on: consuming the once is no 1 -> 0 transition
    em.hooks.clear()
    em.on("y", noop).once("y", print)
    em._take("y")
    assert em.hooks == [("first", "y")]
    assert em.listeners("y") == [noop]
    # two once listeners consumed by one emit: exactly one "last"
    em.hooks.clear()
    em.prepend_once_listener("z", noop).once("z", print)
    assert em._take("z") == [noop, print]
    assert em.hooks == [("first", "z"), ("last", "z")]
    assert em._take("z") == []
    assert em.hooks == [("first", "z"), ("last", "z")]


def test_hooks_through_remove_all_listeners() -> None:
    em = Recorder()
    em.on("x", noop).on("x", print).on("y", noop).once("z", noop)
    assert em.hooks == [("first", "x"), ("first", "y"), ("first", "z")]
    em.hooks.clear()
    em.remove_all_listeners("x")
    assert em.hooks == [("last", "x")]
    em.remove_all_listeners("x")
    em.remove_all_listeners("never")
    assert em.hooks == [("last", "x")]
    em.hooks.clear()
    em.remove_all_listeners()
    assert sorted(em.hooks) == [("last", "y"), ("last", "z")]
    em.hooks.clear()
    em.remove_all_listeners()
    assert em.hooks == []


def test_hooks_under_concurrent_once_take_fire_exactly_once() -> None:
    nthreads = 8
    for _ in range(50):
        em = Recorder()
        em.once("x", noop)
        barrier = threading.Barrier(nthreads)

        def worker() -> None:
            barrier.wait(5)
            em._take("x")

        threads = [threading.Thread(target=worker) for _ in range(nthreads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert em.hooks == [("first", "x"), ("last", "x")]


# =============================================================================================
# 2. IpcBusClient as an emitter over a real broker
# =============================================================================================
@pytest.mark.parametrize("method", ["on", "add_listener", "once", "prepend_listener",
                                    "prepend_once_listener", "off", "remove_listener"])
def test_client_channel_validation(broker: IpcBusBroker, clients: Any, method: str) -> None:
    a = clients(broker.address)
    fn = getattr(a, method)
    with pytest.raises(TypeError):
        fn(123, noop)
    with pytest.raises(TypeError):
        fn(None, noop)
    with pytest.raises(ValueError):
        fn("", noop)
    with pytest.raises(ValueError):
        fn("x" * 1025, noop)
    with pytest.raises(ValueError):
        fn("é" * 513, noop)  # 1026 bytes of UTF-8 though only 513 characters
    assert a.event_names() == []
    fn("x" * 1024, noop)  # the limit itself is fine
    fn("é" * 512, noop)


def test_client_channel_validation_everywhere(broker: IpcBusBroker, clients: Any) -> None:
    a = clients(broker.address)
    for bad, exc in ((123, TypeError), ("", ValueError), ("x" * 1025, ValueError)):
        with pytest.raises(exc):
            a.listeners(bad)
        with pytest.raises(exc):
            a.listener_count(bad)
        with pytest.raises(exc):
            a.remove_all_listeners(bad)
        with pytest.raises(exc):
            a.send(bad, 1)
        with pytest.raises(exc):
            a.send_to(a.peer, bad, 1)
    with pytest.raises(TypeError):
        a.on("ok", "not callable")
    assert a.event_names() == []
    sync(a)
    assert "ok" not in broker_channels(broker)


def test_client_long_channel_round_trip(broker: IpcBusBroker, clients: Any) -> None:
    a, b = clients(broker.address), clients(broker.address)
    channel = "é" * 512  # exactly 1024 bytes
    col = Collector()
    a.on(channel, col)
    sync(a)
    b.send(channel, "hi")
    (event, args), = col.wait(1)
    assert event.channel == channel and args == ("hi",)


def test_client_on_receives_every_message(broker: IpcBusBroker, clients: Any) -> None:
    a, b = clients(broker.address, peer_name="a"), clients(broker.address, peer_name="b")
    col = Collector()
    assert a.on("x", col) is a
    sync(a)
    for i in range(5):
        b.send("x", i, {"k": i})
    items = col.wait(5)
    assert [args for _, args in items] == [(i, {"k": i}) for i in range(5)]
    assert all(e.channel == "x" and e.sender == b.peer for e, _ in items)


def test_client_add_listener_is_on(broker: IpcBusBroker, clients: Any) -> None:
    a, b = clients(broker.address), clients(broker.address)
    col = Collector()
    assert a.add_listener("x", col) is a
    assert a.listeners("x") == [col]
    sync(a)
    b.send("x", 1)
    b.send("x", 2)
    assert [args for _, args in col.wait(2)] == [(1,), (2,)]


def test_client_once_receives_only_the_first_message(broker: IpcBusBroker,
                                                     clients: Any) -> None:
    a, b = clients(broker.address), clients(broker.address)
    once, on = Collector(), Collector()
    assert a.once("x", once) is a
    a.on("x", on)
    sync(a)
    b.send("x", 1)
    b.send("x", 2)
    assert on.wait(2) and on.args == [(1,), (2,)]
    fence(b, a)
    assert once.args == [(1,)]
    assert a.listeners("x") == [on]


def test_client_once_alone_unsubscribes_after_its_message(broker: IpcBusBroker,
                                                          clients: Any) -> None:
    a, b = clients(broker.address), clients(broker.address)
    once = Collector()
    a.once("solo", once)
    sync(a)
    assert broker_channels(broker).get("solo") == 1
    b.send("solo", 1)
    once.wait(1)
    assert a.listener_count("solo") == 0 and "solo" not in a.event_names()
    sync(a)
    wait_until(lambda: "solo" not in broker_channels(broker))
    b.send("solo", 2)
    fence(b, a)
    assert once.args == [(1,)]


def test_client_prepend_order_across_dispatch(broker: IpcBusBroker, clients: Any) -> None:
    a, b = clients(broker.address), clients(broker.address)
    log = Log()
    la, lb, lc, ld = (log.tag(n) for n in "abcd")
    assert a.on("x", la) is a
    assert a.prepend_listener("x", lb) is a
    assert a.on("x", lc) is a
    assert a.prepend_once_listener("x", ld) is a
    assert a.listeners("x") == [ld, lb, la, lc]
    sync(a)
    b.send("x", 1)
    b.send("x", 2)
    items = log.wait(7)
    assert items == [("d", (1,)), ("b", (1,)), ("a", (1,)), ("c", (1,)),
                     ("b", (2,)), ("a", (2,)), ("c", (2,))]
    fence(b, a)
    assert len(log.items) == 7


def test_client_off_removes_most_recent_and_unsubscribes_at_zero(broker: IpcBusBroker,
                                                                 clients: Any) -> None:
    a, b = clients(broker.address), clients(broker.address)
    col = Collector()
    a.on("x", col).on("x", col)
    assert a.listener_count("x") == 2
    sync(a)
    b.send("x", 1)
    col.wait(2)
    assert a.off("x", col) is a
    assert a.listener_count("x") == 1
    b.send("x", 2)
    col.wait(3)
    fence(b, a)
    assert col.args == [(1,), (1,), (2,)]
    assert a.remove_listener("x", col) is a
    assert a.listener_count("x") == 0 and a.event_names() == []
    sync(a)
    wait_until(lambda: "x" not in broker_channels(broker))
    b.send("x", 3)
    fence(b, a)
    assert col.args == [(1,), (1,), (2,)]


def test_client_listeners_count_and_names(broker: IpcBusBroker, clients: Any) -> None:
    a = clients(broker.address)
    assert a.event_names() == [] and a.listeners("x") == [] and a.listener_count("x") == 0
    f, g = Collector(), Collector()
    a.on("x", f).once("x", g).prepend_listener("y", g)
    assert a.listeners("x") == [f, g]
    assert a.listener_count("x") == 2 and a.listener_count("y") == 1
    assert sorted(a.event_names()) == ["x", "y"]
    sync(a)
    channels = broker_channels(broker)
    assert channels.get("x") == 1 and channels.get("y") == 1


def test_client_self_removal_during_dispatch(broker: IpcBusBroker, clients: Any) -> None:
    a, b = clients(broker.address), clients(broker.address)
    log = Log()
    second, third = log.tag("second"), log.tag("third")

    def first(event: IpcBusEvent, *args: Any) -> None:
        log.add(("first", args))
        a.off("x", first)   # itself
        a.off("x", third)   # and a later listener of the same message

    a.on("x", first).on("x", second).on("x", third)
    sync(a)
    b.send("x", 1)
    log.wait(3)
    assert a.listeners("x") == [second]
    b.send("x", 2)
    fence(b, a)
    assert log.items == [("first", (1,)), ("second", (1,)), ("third", (1,)), ("second", (2,))]


def test_client_remove_all_listeners_of_one_channel(broker: IpcBusBroker,
                                                    clients: Any) -> None:
    a, b = clients(broker.address), clients(broker.address)
    x, y = Collector(), Collector()
    a.on("x", x).on("x", x).on("y", y)
    sync(a)
    assert {"x", "y"} <= set(broker_channels(broker))
    assert a.remove_all_listeners("x") is a
    assert a.event_names() == ["y"]
    sync(a)
    wait_until(lambda: "x" not in broker_channels(broker))
    assert broker_channels(broker).get("y") == 1
    b.send("x", 1)
    b.send("y", 1)
    y.wait(1)
    fence(b, a)
    assert x.items == []


def test_client_remove_all_listeners_unsubscribes_everything(broker: IpcBusBroker,
                                                             clients: Any) -> None:
    a, b = clients(broker.address), clients(broker.address)
    cols = {ch: Collector() for ch in ("r1", "r2", "r3")}
    for ch, col in cols.items():
        a.on(ch, col)
    a.once("r3", cols["r3"])
    sync(a)
    assert set(cols) <= set(broker_channels(broker))
    assert a.remove_all_listeners() is a
    assert a.event_names() == []
    sync(a)
    wait_until(lambda: not set(cols) & set(broker_channels(broker)))
    peer_state = [p for p in broker.query_state()["peers"] if p["id"] == a.peer.id]
    assert peer_state and peer_state[0]["channels"] == {}
    for ch in cols:
        b.send(ch, 1)
    fence(b, a)
    assert all(col.items == [] for col in cols.values())
    # the client still works: a new listener subscribes again
    again = Collector()
    a.on("r1", again)
    sync(a)
    b.send("r1", 2)
    assert again.wait(1)[0][1] == (2,)


def test_listeners_added_before_connect_are_subscribed_on_connect(broker: IpcBusBroker,
                                                                  clients: Any) -> None:
    b = clients(broker.address)
    pre, pre_once = Collector(), Collector()
    a = IpcBusClient.create()
    a.on("pre", pre).once("pre-once", pre_once).on("pre", pre)
    assert a.listener_count("pre") == 2
    try:
        assert a.connect(broker.address, peer_name="late") is a
        sync(a)
        wait_until(lambda: {"pre", "pre-once"} <= set(broker_channels(broker)))
        peer_state = [p for p in broker.query_state()["peers"] if p["id"] == a.peer.id]
        assert peer_state and set(peer_state[0]["channels"]) == {"pre", "pre-once"}
        b.send("pre", 1)
        b.send("pre-once", 1)
        b.send("pre-once", 2)
        assert pre.wait(2) and pre.args == [(1,), (1,)]
        assert pre_once.wait(1)
        fence(b, a)
        assert pre_once.args == [(1,)]
        sync(a)
        wait_until(lambda: "pre-once" not in broker_channels(broker))
    finally:
        a.close()
    wait_until(lambda: "pre" not in broker_channels(broker))


def test_a_raising_listener_does_not_stop_the_others(broker: IpcBusBroker, clients: Any,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="ipcbus")
    a, b = clients(broker.address), clients(broker.address)
    raised: list[Any] = []

    def bad(event: IpcBusEvent, *args: Any) -> None:
        raised.append(args)
        raise RuntimeError(f"boom-{args[0]}")

    before, after = Collector(), Collector()
    a.on("x", before).on("x", bad).on("x", after)
    sync(a)
    b.send("x", 1)
    b.send("x", 2)
    assert after.wait(2) and after.args == [(1,), (2,)]
    assert before.args == [(1,), (2,)]
    assert raised == [(1,), (2,)]
    assert a.listeners("x") == [before, bad, after]

    def logged() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name.startswith("ipcbus") and r.exc_info
                and isinstance(r.exc_info[1], RuntimeError)
                and str(r.exc_info[1]).startswith("boom-")]

    records = wait_until(lambda: len(logged()) >= 2 and logged())
    assert {str(r.exc_info[1]) for r in records} == {"boom-1", "boom-2"}
    assert all(r.levelno >= logging.ERROR for r in records)
    # the client is still healthy
    b.send("x", 3)
    assert after.wait(3)[-1][1] == (3,)


def test_listeners_run_on_a_dispatch_thread(broker: IpcBusBroker, clients: Any) -> None:
    a, b = clients(broker.address), clients(broker.address)
    idents: list[int] = []

    def listener(event: IpcBusEvent, *args: Any) -> None:
        idents.append(threading.get_ident())

    col = Collector()
    a.on("t", listener).on("t", col)
    sync(a)
    callers = [threading.get_ident()]
    b.send("t", 1)   # another client, this thread
    a.send("t", 2)   # the listener's own client, this thread

    def from_thread() -> None:
        callers.append(threading.get_ident())
        a.send("t", 3)

    t = threading.Thread(target=from_thread)
    t.start()
    t.join(5)
    col.wait(3)
    assert len(idents) == 3
    assert not set(idents) & set(callers)
    assert threading.main_thread().ident not in idents


def test_broadcast_reaches_the_senders_own_listeners(broker: IpcBusBroker,
                                                     clients: Any) -> None:
    a, b = clients(broker.address, peer_name="a"), clients(broker.address, peer_name="b")
    mine, theirs = Collector(), Collector()
    a.on("all", mine)
    b.on("all", theirs)
    sync(a)
    sync(b)
    a.send("all", "hello")
    (event, args), = mine.wait(1)
    assert args == ("hello",) and event.sender == a.peer and event.channel == "all"
    (event2, args2), = theirs.wait(1)
    assert args2 == ("hello",) and event2.sender == a.peer
    fence(a, a)
    fence(a, b)
    assert len(mine.items) == 1 and len(theirs.items) == 1


def test_send_to_reaches_only_the_target(broker: IpcBusBroker, clients: Any) -> None:
    a = clients(broker.address, peer_name="a")
    b = clients(broker.address, peer_name="b")
    c = clients(broker.address, peer_name="c")
    got_a, got_b, got_c = Collector(), Collector(), Collector()
    a.on("p2p", got_a)
    b.on("p2p", got_b)
    c.on("p2p", got_c)
    for cl in (a, b, c):
        sync(cl)
    c.send_to(a.peer, "p2p", 1)
    c.send_to(b.peer.id, "p2p", 2)  # by peer id
    c.send_to(c.peer, "p2p", 3)     # to itself
    got_a.wait(1)
    got_b.wait(1)
    got_c.wait(1)
    for target in (a, b, c):
        fence(c, target)
    assert got_a.args == [(1,)] and got_b.args == [(2,)] and got_c.args == [(3,)]
    assert [e.sender for e, _ in got_a.items + got_b.items + got_c.items] == [c.peer] * 3


# =============================================================================================
# 3. across processes (spawn and fork)
# =============================================================================================
def emitter_child(address: str, expected: int) -> None:
    """Listen with once() and on(), say ready, report what arrived once "done" comes."""
    client = IpcBusClient.create().connect(address, peer_name="emitter-child")
    once_got: list[Any] = []
    on_got: list[Any] = []
    order: list[str] = []
    idents: set[int] = set()
    done = threading.Event()

    def on_once(event: IpcBusEvent, value: Any) -> None:
        once_got.append(value)
        order.append("once")
        idents.add(threading.get_ident())

    def on_every(event: IpcBusEvent, value: Any) -> None:
        on_got.append(value)
        order.append("on")
        idents.add(threading.get_ident())

    def first(event: IpcBusEvent, value: Any) -> None:
        order.append("prepended")

    client.once("data", on_once)
    client.on("data", on_every)
    client.prepend_listener("data", first)
    client.on("done", lambda event: done.set())
    sync(client)
    client.send("ready", client.peer.id)
    ok = done.wait(15)
    client.send("report", {
        "ok": ok,
        "once": once_got,
        "on": on_got,
        "order": order[:3 * 2],
        "count_after": client.listener_count("data"),
        "on_main_thread": threading.main_thread().ident in idents,
        "expected": expected,
    })
    client.close()


@pytest.mark.timeout(30)
def test_once_and_on_in_a_child_process(broker: IpcBusBroker, ctx: Any, clients: Any) -> None:
    main = clients(broker.address, peer_name="parent")
    ready, report = Collector(), Collector()
    main.on("ready", ready).on("report", report)
    sync(main)
    n = 4
    child = ctx.Process(target=emitter_child, args=(broker.address, n))
    child.start()
    try:
        (_, (child_id,)), = ready.wait(1, timeout=20)
        for i in range(n):
            main.send("data", i)
        main.send_to(child_id, "done")
        (event, (result,)), = report.wait(1, timeout=20)
        assert event.sender is not None and event.sender.id == child_id
        assert result["ok"] is True
        assert result["once"] == [0]
        assert result["on"] == list(range(n))
        assert result["order"] == ["prepended", "once", "on", "prepended", "on",
                                   "prepended"]
        assert result["count_after"] == 2
        assert result["on_main_thread"] is False
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()
            child.join(5)
    assert child.exitcode == 0
    # the child's subscriptions left with it
    sync(main)
    wait_until(lambda: "data" not in broker_channels(broker))


def remove_all_child(address: str) -> None:
    """Subscribe to three channels, then drop them all with remove_all_listeners()."""
    client = IpcBusClient.create().connect(address, peer_name="remover")
    go = threading.Event()
    for ch in ("c1", "c2", "c3"):
        client.on(ch, noop)
    client.once("go", lambda event: go.set())
    sync(client)
    client.send("ready", client.peer.id)
    ok = go.wait(15)
    client.remove_all_listeners()
    sync(client)
    client.send("report", ok, client.event_names())
    # stay connected until told to leave, so the parent sees the unsubscriptions, not a close
    leave = threading.Event()
    client.on("leave", lambda event: leave.set())
    sync(client)
    client.send("ready2")
    leave.wait(15)
    client.close()


@pytest.mark.timeout(30)
def test_remove_all_listeners_in_a_child_process(broker: IpcBusBroker, ctx: Any,
                                                 clients: Any) -> None:
    main = clients(broker.address, peer_name="parent")
    ready, ready2, report = Collector(), Collector(), Collector()
    main.on("ready", ready).on("ready2", ready2).on("report", report)
    sync(main)
    child = ctx.Process(target=remove_all_child, args=(broker.address,))
    child.start()
    try:
        (_, (child_id,)), = ready.wait(1, timeout=20)
        channels = broker_channels(broker)
        assert {"c1", "c2", "c3", "go"} <= set(channels)
        main.send_to(child_id, "go")
        (_, (ok, names)), = report.wait(1, timeout=20)
        assert ok is True and names == []
        ready2.wait(1, timeout=20)
        peer = [p for p in broker.query_state()["peers"] if p["id"] == child_id]
        assert peer and set(peer[0]["channels"]) == {"leave"}
        assert not {"c1", "c2", "c3", "go"} & set(broker_channels(broker))
        main.send_to(child_id, "leave")
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()
            child.join(5)
    assert child.exitcode == 0
