"""The hub's back-pressure and slow-consumer rules as a unit (``ipcbus._backpressure``): fake
queues and sources, an injected clock, and a hypothesis simulation of a hub that obeys the
policy (a held source sends nothing), with the SPEC's promises as invariants; then the policy
carried out (``ipcbus._hub_flow.Flow``) over a fake hub: pause, resume, the slow consumer's
cut and its closing grace."""
from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from ipcbus import _protocol as P
from ipcbus._backpressure import DISCONNECT, OVERFLOW, PAUSE, BackPressure
from ipcbus._hub_flow import Flow
from ipcbus._outqueue import OutQueue

LIMIT = 1000
TIMEOUT = 8.0


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Ep:
    """An endpoint as the policy sees it: a queue, and a source of frames."""

    def __init__(self, name: str, relay: bool = False) -> None:
        self.name = name
        self.relay = relay
        self.paused = False
        self.out_bytes = 0
        self.full_since: float | None = None
        self.progress_at = 0.0
        self.blocked: set[Any] = set()

    def __repr__(self) -> str:
        return f"<Ep {self.name}>"


def policy() -> tuple[BackPressure, Clock]:
    clock = Clock()
    return BackPressure(LIMIT, TIMEOUT, hard_factor=2, clock=clock), clock


def test_a_sender_that_overflows_a_receiver_is_held_until_it_drains_below_half() -> None:
    bp, clock = policy()
    receiver, sender = Ep("r"), Ep("s")
    receiver.out_bytes = LIMIT
    assert bp.queued(receiver, sender) is None  # at the limit: not over it
    receiver.out_bytes = LIMIT + 1
    assert bp.queued(receiver, sender) == PAUSE
    assert receiver.blocked == {sender} and receiver.full_since == clock.now
    receiver.out_bytes = LIMIT // 2 + 1
    assert bp.written(receiver, LIMIT // 2) == []  # still over half
    receiver.out_bytes = LIMIT // 2
    assert bp.written(receiver, 1) == [sender]
    assert receiver.blocked == set() and receiver.full_since is None


def test_a_connection_feeding_its_own_queue_is_held_too() -> None:
    bp, _ = policy()
    ep = Ep("self")
    ep.out_bytes = LIMIT + 1
    assert bp.queued(ep, ep) == PAUSE and ep.blocked == {ep}


def test_frames_the_hub_makes_and_held_sources_pause_nothing() -> None:
    bp, _ = policy()
    receiver, held = Ep("r"), Ep("s")
    held.paused = True
    receiver.out_bytes = LIMIT + 1
    assert bp.queued(receiver, None) is None
    assert bp.queued(receiver, held) is None
    assert receiver.blocked == set() and receiver.full_since is not None


def test_a_receiver_full_for_the_whole_timeout_is_a_slow_consumer() -> None:
    bp, clock = policy()
    receiver = Ep("r")
    receiver.out_bytes = LIMIT + 1
    bp.queued(receiver, Ep("s"))
    clock.now += TIMEOUT
    assert bp.check(receiver, lambda: True) is None
    clock.now += 0.01
    assert bp.check(receiver, lambda: True) == ""


def test_a_relay_is_not_held_below_the_hard_cap() -> None:
    bp, clock = policy()
    receiver, link = Ep("r"), Ep("link", relay=True)
    receiver.out_bytes = 2 * LIMIT
    assert bp.queued(receiver, link) is None and receiver.blocked == set()
    receiver.out_bytes = 2 * LIMIT + 1
    assert bp.queued(receiver, link) == OVERFLOW


def test_past_the_hard_cap_a_stopped_receiver_goes_a_reading_one_holds_the_link() -> None:
    bp, clock = policy()
    stopped, reading, link = Ep("stopped"), Ep("reading"), Ep("link", relay=True)
    for receiver in (stopped, reading):
        receiver.out_bytes = 2 * LIMIT + 1
        assert bp.queued(receiver, link) == OVERFLOW
    clock.now += TIMEOUT / 4
    assert bp.overflowed(stopped, link, reading=False) == DISCONNECT
    assert "hard cap" in bp.overflow_detail(stopped)
    assert bp.overflowed(reading, link, reading=True) == PAUSE
    assert reading.blocked == {link}
    link.paused = True
    # holding the link, it must keep reading: a quarter timeout without, and it goes
    clock.now += TIMEOUT / 8
    assert bp.check(reading, lambda: True) is None
    clock.now += TIMEOUT / 4 + 0.01
    detail = bp.check(reading, lambda: False)
    assert detail is not None and "holds a link paused" in detail


def test_under_the_cap_again_nothing_is_decided() -> None:
    bp, _ = policy()
    receiver, link = Ep("r"), Ep("link", relay=True)
    receiver.out_bytes = 2 * LIMIT
    assert bp.overflowed(receiver, link, reading=False) is None


# -- a simulated hub -------------------------------------------------------------------------
ops = st.lists(st.one_of(
    st.tuples(st.just("send"), st.integers(0, 3), st.integers(0, 2), st.integers(1, 400)),
    st.tuples(st.just("read"), st.integers(0, 2), st.integers(0, 900)),
    st.tuples(st.just("tick"), st.floats(0.0, 3.0)),
), max_size=120)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_a_hub_obeying_the_policy_keeps_its_promises(script: list[Any]) -> None:
    """Sources 0-2 are ordinary connections (also receivers 0-2), source 3 a relay; a hub
    that never reads from a held source and carries out every verdict. Promises: a held
    ordinary source is held by some receiver that is over half the limit; a receiver that
    only ordinary sources feed never goes past the limit by more than one frame of each; a
    slow consumer is only ever one that was over the limit for the timeout, past the hard
    cap without reading, or stalled holding a link."""
    bp, clock = policy()
    eps = [Ep(str(i)) for i in range(3)]
    link = Ep("link", relay=True)
    sources = [*eps, link]
    gone: set[Ep] = set()
    fed_by_link: set[Ep] = set()

    def resume(released: list[Any]) -> None:
        for source in released:
            if not any(source in ep.blocked for ep in eps if ep not in gone):
                source.paused = False

    def disconnect(ep: Ep) -> None:
        gone.add(ep)
        released, ep.blocked = ep.blocked, set()
        ep.full_since = None
        resume(list(released))

    for op in script:
        if op[0] == "send":
            _, s, r, size = op
            source, receiver = sources[s], eps[r]
            if source.paused or receiver in gone or source in gone:
                continue
            receiver.out_bytes += size
            if source.relay:
                fed_by_link.add(receiver)
            verdict = bp.queued(receiver, source)
            if verdict == PAUSE:
                source.paused = True
            elif verdict == OVERFLOW:  # the flush comes right after
                after = bp.overflowed(receiver, source, reading=False)
                if after == DISCONNECT:
                    assert clock.now - receiver.progress_at >= TIMEOUT / 4
                    disconnect(receiver)
                elif after == PAUSE:
                    source.paused = True
            if receiver not in fed_by_link and receiver not in gone:
                assert receiver.out_bytes <= LIMIT + 3 * 400  # a frame of each source at most
        elif op[0] == "read":
            _, r, n = op
            receiver = eps[r]
            if receiver in gone:
                continue
            sent = min(n, receiver.out_bytes)
            receiver.out_bytes -= sent
            resume(bp.written(receiver, sent))
        else:
            clock.now += op[1]
            for receiver in eps:
                if receiver in gone:
                    continue
                over_since = receiver.full_since
                detail = bp.check(receiver, lambda: False)
                if detail is not None:
                    assert (detail == "" and over_since is not None
                            and clock.now - over_since > TIMEOUT) or \
                        (link in receiver.blocked and "link" in detail)
                    disconnect(receiver)
        for source in sources:
            holders = [ep for ep in eps if source in ep.blocked and ep not in gone]
            if source.paused and source not in gone:
                assert holders, f"{source} held by nobody"
                assert all(ep.out_bytes > LIMIT // 2 for ep in holders)


# -- the closing grace -----------------------------------------------------------------------
def test_a_cut_off_consumer_is_kept_for_the_grace_and_releases_what_it_held() -> None:
    bp, clock = policy()
    receiver, sender = Ep("r"), Ep("s")
    receiver.out_bytes = LIMIT + 1
    assert bp.queued(receiver, sender) == PAUSE
    deadline, held = bp.cut_off(receiver)
    assert held == [sender] and receiver.blocked == set() and receiver.full_since is None
    assert deadline == clock.now + bp.closing_grace
    clock.now += bp.closing_grace
    assert not bp.closing_over(deadline)
    clock.now += 0.01
    assert bp.closing_over(deadline)


# -- the policy carried out (ipcbus._hub_flow.Flow) with a fake hub ----------------------------
class FakeTransport:
    def __init__(self) -> None:
        self.read_shut = False
        self.queued = 0  # the kernel's send queue, as SIOCOUTQ would say

    def shutdown_read(self) -> None:
        self.read_shut = True

    def unsent(self) -> int | None:
        return self.queued


class FakeEndpoint(OutQueue):
    """A hub endpoint as Flow uses it: an output queue with a few flags."""

    def __init__(self, name: str, relay: bool = False) -> None:
        super().__init__()
        self.label = name
        self.relay = relay
        self.paused = False
        self.closing: str | None = None
        self.deadline = 0.0
        self.transport = FakeTransport()

    def __repr__(self) -> str:
        return f"<FakeEndpoint {self.label}>"


class FakeHub:
    def __init__(self, *eps: FakeEndpoint) -> None:
        self.endpoints: set[Any] = set(eps)
        self.dirty: set[Any] = set()
        self.current: Any = None
        self.log: list[tuple[str, str]] = []

    def pause(self, ep: Any) -> None:
        ep.paused = True
        self.log.append(("pause", ep.label))

    def resume(self, ep: Any) -> None:
        if ep.closing is None:
            ep.paused = False
            self.log.append(("resume", ep.label))

    def write_only(self, ep: Any) -> None:
        self.log.append(("write_only", ep.label))

    def flush(self, ep: Any) -> None:
        self.log.append(("flush", ep.label))

    def forget(self, ep: Any) -> None:
        self.log.append(("forget", ep.label))


def flow_of(*eps: FakeEndpoint) -> tuple[Any, FakeHub, Clock]:
    """A Flow over fakes (typed Any: the fakes stand in for the hub and its endpoints)."""
    clock = Clock()
    hub = FakeHub(*eps)
    return Flow(hub, BackPressure(LIMIT, TIMEOUT, clock=clock)), hub, clock


def frame_bytes(size: int) -> bytes:
    return P.encode_frame(P.Kind.SEND, "c", ["s", "s", "socket", 1], body=b"x" * size)


def test_flow_pauses_the_source_being_read_and_resumes_it_once_drained() -> None:
    receiver, sender = FakeEndpoint("r"), FakeEndpoint("s")
    flow, hub, _ = flow_of(receiver, sender)
    hub.current = sender
    receiver.push(frame_bytes(LIMIT), [])
    flow.queued(receiver)
    assert sender.paused and hub.log == [("pause", "s")]
    receiver.out_bytes = LIMIT // 2
    flow.written(receiver, 100)
    assert not sender.paused and hub.log[-1] == ("resume", "s")


def test_flow_cuts_off_a_slow_consumer_keeping_the_rest_of_its_frame_and_then_drops_it() -> None:
    receiver, sender = FakeEndpoint("r"), FakeEndpoint("s")
    flow, hub, clock = flow_of(receiver, sender)
    hub.current = sender
    first, second = frame_bytes(LIMIT), frame_bytes(10)
    receiver.push(first, [])
    receiver.push(second, [])
    flow.queued(receiver)
    receiver.out[0][0] = receiver.out[0][0][100:]  # 100 bytes of the first frame went out
    receiver.head_sent, receiver.out_bytes = 100, receiver.out_bytes - 100
    assert not flow.check(receiver)
    clock.now += TIMEOUT + 0.01
    assert not flow.check(receiver)  # cut off now, dropped later
    assert receiver.closing == "slow consumer" and receiver.paused
    assert receiver.transport.read_shut and not sender.paused  # the sender is read again
    rest, notice = receiver.out
    assert len(rest[0]) == len(first) - 100  # the frame being written is completed...
    assert P.decode_header(notice[0][P.PREFIX_SIZE:P.PREFIX_SIZE + P.PREFIX.unpack_from(
        notice[0], 0)[0]])[0] == P.Kind.NOTICE  # ...then the reason; the second frame is gone
    assert ("forget", "r") in hub.log and hub.log[-2:] == [("write_only", "r"), ("flush", "r")]
    clock.now += 10.0
    assert not flow.check(receiver)
    clock.now += 0.01
    assert flow.check(receiver)  # the grace is over: the hub drops it
