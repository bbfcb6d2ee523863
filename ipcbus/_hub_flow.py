"""The hub's back-pressure, carried out: what the loop does with the policy's verdicts.

:class:`ipcbus._backpressure.BackPressure` decides (pure, clock injected, unit-tested; its
docstring states the rules); :class:`Flow` tells it what happened to each output queue and
carries out what it answers, through the few calls of :class:`FlowOwner` (the hub):

* a queue over the limit (:meth:`Flow.queued`, from ``HubEndpoint.deliver``): pause the
  source being read, or note a receiver a relay filled past the hard cap, decided once the
  queues are flushed (:meth:`Flow.after_flush`);
* bytes written (:meth:`Flow.written`): read the sources a drained receiver held again,
  unless another receiver still holds them;
* now and then (:meth:`Flow.check`): cut off slow consumers, and close those whose closing
  grace is over;
* :meth:`Flow.cut_off`: a slow consumer's disconnect (its undelivered queue dropped but the
  rest of a frame partly written, read no more, kept until its closing NOTICE is written or
  the grace ends; it never blocks the loop).
"""
from __future__ import annotations

import logging
import types
from typing import Protocol

from . import _backpressure as BP
from . import _protocol as P
from ._hub_endpoint import HubEndpoint

__all__ = ["Flow", "FlowOwner"]

log = logging.getLogger("ipcbus")

_GONE_RELAY = types.SimpleNamespace(relay=True, paused=True)  # a relay dropped meanwhile


class FlowOwner(Protocol):
    """What :class:`Flow` needs of its hub."""

    endpoints: set[HubEndpoint]
    dirty: set[HubEndpoint]
    current: HubEndpoint | None  # the endpoint whose frames are being routed

    def pause(self, ep: HubEndpoint) -> None: ...

    def resume(self, ep: HubEndpoint) -> None: ...

    def write_only(self, ep: HubEndpoint) -> None:
        """Watch ``ep`` for writes only (it is read no more)."""

    def flush(self, ep: HubEndpoint) -> None: ...

    def forget(self, ep: HubEndpoint) -> None:
        """The router forgets ``ep``'s peers (telling the bus)."""


class Flow:
    """Back-pressure and slow consumers of one hub (its loop thread only)."""

    def __init__(self, hub: FlowOwner, policy: BP.BackPressure) -> None:
        self.hub = hub
        self.policy = policy
        # receivers past the hard cap, fed by a relay: disconnect, or pause that relay
        self.overflowed: dict[HubEndpoint, HubEndpoint] = {}

    def queued(self, receiver: HubEndpoint) -> None:
        """``receiver``'s queue is over the limit after a frame of the endpoint being read."""
        source = self.hub.current
        verdict = self.policy.queued(receiver, source)
        if verdict == BP.PAUSE:
            assert source is not None
            self.hub.pause(source)
        elif verdict == BP.OVERFLOW:  # decided once the queues are flushed
            assert source is not None
            self.overflowed[receiver] = source

    def written(self, receiver: HubEndpoint, sent: int) -> None:
        """Some of ``receiver``'s queue went out: the sources it held may be read again."""
        endpoints = self.hub.endpoints
        for source in self.policy.written(receiver, sent):
            if source in endpoints and not self._still_held(source):
                self.hub.resume(source)

    def after_flush(self) -> None:
        """Receivers a relay filled past the hard cap (``BackPressure.overflowed``)."""
        overflowed, self.overflowed = self.overflowed, {}
        policy, endpoints = self.policy, self.hub.endpoints
        for ep, relay in overflowed.items():
            if ep not in endpoints or ep.closing is not None or ep.out_bytes <= policy.hard_limit:
                continue
            source = relay if relay in endpoints else _GONE_RELAY
            verdict = policy.overflowed(ep, source, reading(ep))
            if verdict == BP.DISCONNECT:
                self.cut_off(ep, "slow consumer", detail=policy.overflow_detail(ep))
            elif verdict == BP.PAUSE:
                self.hub.pause(relay)

    def check(self, ep: HubEndpoint) -> bool:
        """The deadlines of the policy for ``ep``; True if it is to be dropped now (its
        closing grace is over)."""
        if ep.closing is not None:
            return self.policy.closing_over(ep.deadline)
        if ep.full_since is not None or ep.blocked:
            detail = self.policy.check(ep, lambda: reading(ep))
            if detail is not None:
                self.cut_off(ep, "slow consumer", detail=detail)
        return False

    def cut_off(self, ep: HubEndpoint, reason: str, *, detail: str = "") -> None:
        """Tell ``ep`` why it is dropped, then drop it once that is written (or the grace is
        over). Never blocks."""
        log.warning("disconnecting %s: %s%s", ep.label, reason, f" ({detail})" if detail else "")
        ep.discard_undelivered()
        hub = self.hub
        hub.forget(ep)
        ep.deadline, held = self.policy.cut_off(ep)
        self._release(held)
        self.endpoint_gone(ep)
        ep.paused = True  # never read again (and never resumed: see Hub.resume)
        ep.push(P.notice_frame(None, closing=reason), [])
        ep.closing = reason
        ep.transport.shutdown_read()
        hub.dirty.discard(ep)
        hub.write_only(ep)
        hub.flush(ep)

    def dropped(self, ep: HubEndpoint) -> None:
        """``ep`` is closed: the sources it held are read again, and it holds no other."""
        held, ep.blocked = ep.blocked, set()
        self._release(list(held))
        self.endpoint_gone(ep)
        self.overflowed.pop(ep, None)

    def endpoint_gone(self, ep: HubEndpoint) -> None:
        for other in self.hub.endpoints:
            other.blocked.discard(ep)

    def _release(self, held: list[HubEndpoint]) -> None:
        for source in held:
            if source in self.hub.endpoints and source.paused and not self._still_held(source):
                self.hub.resume(source)

    def _still_held(self, source: HubEndpoint) -> bool:
        return any(source in other.blocked for other in self.hub.endpoints)


def reading(ep: HubEndpoint) -> bool:
    """Whether the peer has read some of what the kernel holds for it since the last look.
    A reader that keeps reading, slowly, can go a second without a write from the hub: the
    kernel makes a socket writable again only once its send queue is below a quarter of the
    buffer. Write progress alone would call it stopped."""
    unsent, before = ep.transport.unsent(), ep.unsent
    ep.unsent = unsent
    return unsent is not None and before is not None and unsent < before
