"""The vocabulary the router's parts share: endpoints, peers, the frames a router builds.

Pure, like the router: an :class:`Endpoint` is what a hub gives the router for a connection,
a :class:`Peer` one member of the bus (an endpoint carries one or more), ``UPSTREAM`` the
pseudo-id of a bridge's link to its broker (ids never contain control characters, so it
cannot collide with one). :class:`RouterCore` is the routing state the parts read
(``_router.Router`` is one); :class:`RateLimitedLog` keeps warnings a peer can provoke from
flooding the log.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Protocol

from . import _protocol as P
from ._protocol import Frame, Kind
from ._router_groups import GroupRouter

__all__ = ["UPSTREAM", "Endpoint", "Peer", "Pending", "RouterCore", "RateLimitedLog", "DupFds", "Observer",
           "copies", "fail_frame", "answer_frame", "tell_federation"]

log = logging.getLogger("ipcbus")

_WARN_INTERVAL = 10.0

UPSTREAM = "\x00upstream"  # pseudo receiver id: the request was also forwarded upstream


class Endpoint(Protocol):
    """What the router needs of a connection."""

    relay: bool  # True for a bridge's link: never echo its own broadcasts back to it
    can_pass_fds: bool  # a Unix socket (or pipe); False for TCP
    peers: dict[str, Peer]
    label: str  # for logs
    ptype: str  # the type of the peers of this connection ("main", "pipe", "socket")
    pid: int  # their process (for a relay: unused, its peers declare their own)

    def deliver(self, raw: bytes | bytearray, fds: list[int], count: int = 1) -> None:
        """Queue a frame's bytes (``count`` > 1: a run of frames) and its descriptors, which
        the endpoint owns from this call on (the router hands each endpoint its own)."""


class Peer:
    __slots__ = ("id", "name", "type", "pid", "endpoint", "channels", "info", "sent_msgs",
                 "sent_bytes", "seen")

    def __init__(self, info: list[Any], endpoint: Endpoint) -> None:
        self.info = info
        self.seen: Any = info  # the last decoded sender list found equal to ``info``
        self.id: str = info[0]
        self.name: str = info[1]
        self.type: str = info[2]
        self.pid: int = info[3]
        self.endpoint = endpoint
        self.channels: dict[str, int] = {}
        self.sent_msgs = 0  # messages this peer sent (broadcasts, requests, answers)
        self.sent_bytes = 0


class Pending:
    """A request in flight, as the router keeps it (its receivers are in the table)."""

    __slots__ = ("requester", "endpoint", "channel", "service", "failure", "gather")

    def __init__(self, requester: str, endpoint: Endpoint, channel: str,
                 service: str | None = None, gather: bool = False) -> None:
        self.requester = requester
        self.endpoint = endpoint  # where the answer goes
        self.channel = channel
        self.service = service  # a SERVICE_ADD forwarded upstream: the name, recorded if granted
        self.failure: str | None = None  # the last failure a receiving peer reported
        self.gather = gather  # a REQUEST_ALL: every answer goes to the requester


Observer = Callable[["Endpoint", Frame], None]
# dup_fds(fds, n): n independent copies of ``fds``, or OSError with none of them left open
DupFds = Callable[[list[int], int], list[list[int]]]


def copies(fds: list[int], n: int) -> list[list[int]]:
    """The default ``dup_fds`` of a router without real descriptors (tests): the same
    numbers for everyone."""
    return [list(fds) for _ in range(n)]


def tell_federation(core: Any, source: Endpoint, raw: bytes) -> None:
    """A federated broker: tell its NATS link of a change on this side (a peer, a
    subscription, a service of an endpoint other than the link itself)."""
    federation = core.federation
    if federation is not None and source is not federation:
        federation.deliver(raw, [])


def fail_frame(target: str, rid: int, reason: str) -> bytes:
    return P.encode_frame(Kind.REQUEST_FAIL, target=target, rid=rid, body=P.pack_payload(reason))


def answer_frame(target: str, rid: int, payload: Any) -> bytes:
    return P.encode_frame(Kind.RESPONSE, target=target, rid=rid,
                          body=P.pack_payload([True, payload]))


class RateLimitedLog:
    """Warnings a peer can provoke at will (one per frame it sends) are logged at most once
    per ``interval`` seconds per key, with the number left out since: the log never floods.
    ``clock`` is injected (seconds, monotonic)."""

    def __init__(self, clock: Callable[[], float], interval: float = _WARN_INTERVAL) -> None:
        self.clock = clock
        self.interval = interval
        self._next: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def warning(self, key: str, msg: str, *args: Any) -> bool:
        """Log ``msg % args`` unless ``key`` was logged less than ``interval`` ago; True if
        it was logged."""
        now = self.clock()
        if now < self._next.get(key, now):
            self._skipped[key] = self._skipped.get(key, 0) + 1
            return False
        self._next[key] = now + self.interval
        skipped = self._skipped.pop(key, 0)
        if skipped:
            msg += " (and %d more like it in the last %g s)"
            args = (*args, skipped, self.interval)
        log.warning(msg, *args)
        return True


class RouterCore(Protocol):
    """The routing state the router's parts read (and the few calls they make back)."""

    pid: int
    max_message: int  # the largest body of a frame the router builds
    upstream: Endpoint | None
    federation: Endpoint | None  # a federated broker's link to NATS (_federation_link)
    peers: dict[str, Peer]
    subscribers: dict[str, dict[str, int]]  # channel -> peer id -> count
    channel_endpoints: dict[str, dict[Endpoint, int]]  # channel -> endpoint -> peers
    services: dict[str, str]  # service name -> host peer id
    groups: GroupRouter  # channel -> group -> members (_router_groups.py)
    service_hosts: Any  # _router_services.ServiceRouter (which imports this module)
    dropped: dict[str, int]  # refusals, by kind, for the state
    warn: RateLimitedLog

    def state(self) -> dict[str, Any]: ...

    def sender_of(self, endpoint: Endpoint, frame: Frame) -> Peer:
        """The registered peer of ``endpoint`` that sent ``frame`` (IpcBusProtocolError if
        there is none)."""

    def join_answer(self, peer_id: str, rid: int, accepted: bool, reason: str) -> bool:
        """The broker's answer to a PEER_ADD this bridge forwarded; False if it is not one."""
