"""The hub's back-pressure and slow-consumer rules, as decisions (SPEC "Limits and policies").

Pure code with an injected clock: the hub (``broker.Hub``) tells the policy what happened to a
receiver's output queue (a frame queued by some source, bytes written, a look at the clock)
and carries out what it answers (pause a source, resume it, disconnect the receiver). The
rules, in one place:

* Past ``queue_limit`` bytes, a receiver holds the source whose frame overflowed it (the hub
  stops reading from that source) until its queue drains below half the limit; a source is
  read again once no receiver holds it. A connection that feeds its own queue is held too.
* A receiver that stays over the limit for ``slow_consumer_timeout`` seconds is a "slow
  consumer" (the hub disconnects it).
* A *relay* (a bridge's link, granted by the hub) carries a whole side of the bus: pausing it
  for one receiver stalls every channel of that side. A receiver a relay fills goes on
  queueing, up to the hard cap (``hard_factor`` x the limit). Past the cap, decided once the
  frame being routed is done and the queues are flushed: a receiver that has read nothing for
  ``relay_stall`` (a quarter of the timeout) is a slow consumer at once; one still reading
  holds the relay like any source, and is a slow consumer if it then stops reading for
  ``relay_stall`` while it holds the relay.

* A slow consumer is cut off, not closed at once: its undelivered queue is dropped (but the
  rest of a frame partly written), it is read no more, and its descriptor is kept until the
  closing NOTICE is written or ``closing_grace`` seconds pass, whichever comes first, so a
  consumer that was stopped and resumes within the grace learns why.

"Reading" means a write to the receiver made progress, or (asked through a callback, since
only the hub can look) the kernel's queue of unsent bytes for it shrank.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Protocol

__all__ = ["BackPressure", "Queue", "Source", "PAUSE", "OVERFLOW", "DISCONNECT"]


PAUSE = "pause"  # hold the source for this receiver
OVERFLOW = "overflow"  # a relay filled the receiver past the hard cap: decide after the flush
DISCONNECT = "disconnect"  # the receiver is a slow consumer


class Source(Protocol):
    """A connection frames come from."""

    relay: bool
    paused: bool


class Queue(Protocol):
    """A receiver's output queue, as the policy sees it (the hub's endpoint)."""

    out_bytes: int  # bytes queued, not written yet
    full_since: float | None  # when it went over the limit (None: not over it)
    progress_at: float  # while over the limit: when it last read something
    blocked: set[Any]  # the sources held for it


class BackPressure:
    """Decisions of one hub (``clock``: seconds, monotonic)."""

    def __init__(self, queue_limit: int, slow_consumer_timeout: float, *, hard_factor: int = 2,
                 closing_grace: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.queue_limit = queue_limit
        self.timeout = slow_consumer_timeout
        self.hard_limit = hard_factor * queue_limit
        self.relay_stall = slow_consumer_timeout / 4
        self.closing_grace = closing_grace
        self.clock = clock

    def queued(self, receiver: Queue, source: Source | None) -> str | None:
        """``receiver``'s queue just grew by a frame of ``source`` (None: made by the hub).
        PAUSE: hold ``source`` (it is in ``receiver.blocked`` now); OVERFLOW: a relay went
        past the hard cap (call :meth:`overflowed` once the queues are flushed); None."""
        if receiver.out_bytes <= self.queue_limit:
            return None
        if receiver.full_since is None:
            receiver.full_since = receiver.progress_at = self.clock()
        if source is None or source.paused:
            return None
        if not source.relay:
            receiver.blocked.add(source)
            return PAUSE
        return OVERFLOW if receiver.out_bytes > self.hard_limit else None

    def written(self, receiver: Queue, sent: int) -> list[Any]:
        """``sent`` bytes of ``receiver``'s queue went out (``out_bytes`` already counts it).
        Returns the sources it held, if it has drained below half the limit now (each is to
        be read again unless another receiver still holds it)."""
        if receiver.full_since is None:
            return []
        if sent:
            receiver.progress_at = self.clock()
        if receiver.out_bytes > self.queue_limit // 2:
            return []
        receiver.full_since = None
        blocked, receiver.blocked = receiver.blocked, set()
        return list(blocked)

    def overflowed(self, receiver: Queue, relay: Source, reading: bool) -> str | None:
        """Once the queues are flushed, for a receiver a relay filled past the hard cap
        (``reading``: the kernel's queue for it shrank since the last look). DISCONNECT: it
        read nothing for ``relay_stall``; PAUSE: hold the relay (it is in ``receiver.blocked``
        now); None: under the cap again, or the relay is held already."""
        if receiver.out_bytes <= self.hard_limit:
            return None
        now = self.clock()
        if reading:
            receiver.progress_at = now
        if now - receiver.progress_at >= self.relay_stall:
            return DISCONNECT
        if relay.paused:
            return None
        receiver.blocked.add(relay)
        return PAUSE

    def check(self, receiver: Queue, reading: Callable[[], bool]) -> str | None:
        """Now and then: None, or the receiver is a slow consumer and this is the detail for
        the log ("" when it stayed over the limit for the whole timeout). ``reading`` is asked
        only for a receiver that holds a relay."""
        now = self.clock()
        if receiver.full_since is not None and now - receiver.full_since > self.timeout:
            return ""
        if receiver.blocked and any(source.relay for source in receiver.blocked):
            if reading():
                receiver.progress_at = now
            elif now - receiver.progress_at > self.relay_stall:
                return (f"it holds a link paused and read nothing for"
                        f" {now - receiver.progress_at:.2f} s")
        return None

    def cut_off(self, receiver: Queue) -> tuple[float, list[Any]]:
        """``receiver`` is disconnected as a slow consumer: until when its descriptor is kept
        for the closing NOTICE, and the sources it held (each to be read again unless another
        receiver still holds it)."""
        receiver.full_since = None
        blocked, receiver.blocked = receiver.blocked, set()
        return self.clock() + self.closing_grace, list(blocked)

    def closing_over(self, deadline: float) -> bool:
        """Whether a cut-off receiver's grace (``deadline`` from :meth:`cut_off`) is over."""
        return self.clock() > deadline

    def overflow_detail(self, receiver: Queue) -> str:
        """The log's detail of a DISCONNECT from :meth:`overflowed`."""
        return (f"its queue passed the hard cap of {self.hard_limit} bytes, fed by a link, and"
                f" it read nothing for {self.clock() - receiver.progress_at:.2f} s")
