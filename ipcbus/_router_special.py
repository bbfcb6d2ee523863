"""Requests the hub answers itself, on reserved channels: ``/ipcbus/queryState``,
``/ipcbus/serviceAvailable``, and readiness (``/ipcbus/sync``, ``/ipcbus/waitListeners``).

Pure, like the router (``_router_requests.RequestRouter`` owns one :class:`SpecialRequests`
and hands it the requests on SPECIAL_CHANNELS that carry no target). The rules:

* ``queryState`` is answered with the router's state, ``serviceAvailable`` with whether a
  service name has a host; an answer over the message limit becomes a failure.
* ``sync`` is answered at once; ``waitListeners`` at once when enough peers listen, else it is
  held (an entry of the bus's request table with no receiver, ``_router_readiness``) until a
  subscription brings the count up, a CANCEL or its requester leaving.
* A bridge linked to a broker answers neither readiness request: it forwards them to the
  broker, which knows every listener of the bus (:meth:`SpecialRequests.readiness_upstream`).
"""
from __future__ import annotations

from typing import Any

from . import _protocol as P
from ._protocol import Frame
from ._router_readiness import (READINESS_CHANNELS, SYNC_CHANNEL, ListenerWaits,
                                wait_arguments)
from ._routing import Endpoint, Pending, RouterCore, answer_frame, fail_frame
from .errors import IpcBusProtocolError

__all__ = ["SpecialRequests", "SPECIAL_CHANNELS"]

SPECIAL_CHANNELS = frozenset({P.QUERY_STATE_CHANNEL, P.SERVICE_AVAILABLE_CHANNEL}) | \
    READINESS_CHANNELS

Key = tuple[str, int]  # (requester id, rid)


class SpecialRequests:
    """The requests one router answers itself."""

    def __init__(self, core: RouterCore, requests: Any) -> None:
        self.core = core
        self.requests = requests  # the RequestRouter: its table, forwarded()
        self.waits: ListenerWaits[Key] = ListenerWaits()  # held waitListeners requests

    def answer(self, endpoint: Endpoint, frame: Frame) -> None:
        """A request on one of SPECIAL_CHANNELS, at a hub with no link (the root)."""
        if frame.channel in READINESS_CHANNELS:
            self._readiness(endpoint, frame)
        else:
            endpoint.deliver(self._answer_of(frame.channel, frame), [])

    def _answer_of(self, channel: str, frame: Frame) -> bytes:
        """The answer to a request on one of SPECIAL_CHANNELS (within the size limit)."""
        requester = frame.sender_id
        assert requester is not None
        if channel == P.QUERY_STATE_CHANNEL:
            try:
                raw = answer_frame(requester, frame.rid, self.core.state())
            except (TypeError, ValueError) as exc:
                return fail_frame(requester, frame.rid, f"the state of the bus cannot be"
                                  f" encoded: {exc}")
            size = len(raw) - P.PREFIX_SIZE - P.PREFIX.unpack_from(raw, 0)[0]
            if size > self.core.max_message:
                return fail_frame(requester, frame.rid, (
                    f"the state of the bus is {size} bytes, over the message limit of"
                    f" {self.core.max_message} bytes"))
            return raw
        assert channel == P.SERVICE_AVAILABLE_CHANNEL
        try:
            args = P.unpack_control(frame.body)
        except IpcBusProtocolError:
            args = None
        if not (isinstance(args, list) and args and isinstance(args[0], str)):
            return fail_frame(requester, frame.rid,
                              f"{P.SERVICE_AVAILABLE_CHANNEL} takes a service name")
        return answer_frame(requester, frame.rid, args[0] in self.core.services)

    def _readiness(self, endpoint: Endpoint, frame: Frame) -> None:
        """``/ipcbus/sync``: answered at once; ``/ipcbus/waitListeners``: answered once
        enough peers listen, held until then."""
        requester = frame.sender_id
        assert requester is not None
        key = (requester, frame.rid)
        if frame.channel == SYNC_CHANNEL:
            endpoint.deliver(answer_frame(requester, frame.rid, None), [])
            return
        try:
            args = P.unpack_control(frame.body)
        except IpcBusProtocolError:
            args = None
        found = wait_arguments(args, P.MAX_CHANNEL)
        if isinstance(found, str):
            endpoint.deliver(fail_frame(requester, frame.rid, found), [])
            return
        channel, count = found
        listeners = self.core.groups.listening(channel)  # members of groups too
        if listeners >= count:
            endpoint.deliver(answer_frame(requester, frame.rid, listeners), [])
            return
        if key in self.requests.table:
            raise IpcBusProtocolError(f"request id {frame.rid} reused while pending")
        pending = Pending(requester, endpoint, frame.channel)
        self.requests.table.add(key, pending)  # no receiver: it ends answered, cancelled or orphaned
        self.waits.add(channel, key, count, pending, self._in_flight)

    def _in_flight(self, key: Key, pending: object) -> bool:
        return self.requests.table.get(key) is pending

    def listeners_added(self, channel: str) -> None:
        """A peer started listening on ``channel``: answer the held requests it satisfies."""
        listeners = self.core.groups.listening(channel)  # members of groups too
        for key in self.waits.ready(channel, listeners, self._in_flight):
            pending = self.requests.table.take(key)
            assert pending is not None
            pending.endpoint.deliver(answer_frame(key[0], key[1], listeners), [])

    def readiness_upstream(self, endpoint: Endpoint, frame: Frame) -> None:
        """A linked bridge: the broker answers readiness requests (it knows every listener
        of the bus, and its answer to ``sync`` covers the link too)."""
        upstream = self.core.upstream
        requester = frame.sender_id
        assert requester is not None
        if upstream is None or endpoint is upstream:  # the broker never asks a bridge
            endpoint.deliver(fail_frame(requester, frame.rid, (
                f"{frame.channel} is answered by the broker, not by a bridge")), [])
            return
        self.requests.forwarded((requester, frame.rid), endpoint, frame.channel)
        upstream.deliver(frame.raw, [], frame.count)
