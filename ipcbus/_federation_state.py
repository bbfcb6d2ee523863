"""What a federation link knows: its broker's side, the other brokers' sides, requests across.

Pure (no socket, no NATS; ``_federation_link`` does the input and output). A link stands
between its broker (where it is a *relay* endpoint speaking for the peers of every other
broker of the bus) and NATS. It keeps:

* the local side, as the broker announced it (``_router`` tells the federation endpoint of
  every peer, subscription, group membership and service of its other endpoints): the
  channels local peers listen to plainly are the NATS subjects the link subscribes (interest:
  a subject is held while at least one local peer listens), and the whole side is replayed
  to a link that joins or comes back (:meth:`FederationState.local_frames`);
* the remote sides, one per other link: their peers (ids unique across the bus: a remote id
  that collides with a known one is refused and counted), the channels they listen to
  plainly (a request on a channel is expected back from exactly those links), their group
  memberships and services;
* requests across: a request this side sent out is *pending* under a number ``n`` (its reply
  subject) until every link it went to has ended its part (an answer, or its broker's
  REQUEST_FAIL; a request_all ends only with the REQUEST_FAIL), then the broker is told
  "no receiver left on that side"; a request that came in is *owed* an answer, sent to its
  reply subject.

Announcement frames are ipcbus frames (PEER_ADD, PEER_REMOVE, SUBSCRIBE, UNSUBSCRIBE,
SERVICE_ADD, SERVICE_REMOVE with the peer as sender), as the broker made them: the link sends
them as they came and a remote link hands them to its broker as they came.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import _protocol as P
from ._protocol import Kind

__all__ = ["FederationState", "RemoteSide", "Across", "announcement"]

Key = tuple[str, int]  # (requester id, rid)
MAX_PENDING = 65536  # requests across a link keeps at most (the oldest are failed first)

_ANNOUNCEMENTS = frozenset(int(k) for k in (Kind.PEER_ADD, Kind.PEER_REMOVE, Kind.SUBSCRIBE,
                                            Kind.UNSUBSCRIBE, Kind.SERVICE_ADD,
                                            Kind.SERVICE_REMOVE))


def announcement(kind: int) -> bool:
    return kind in _ANNOUNCEMENTS


def group_of(raw: bytes | bytearray, body_offset: int) -> str | None:
    """The group of a SUBSCRIBE / UNSUBSCRIBE (None: plain)."""
    if body_offset >= len(raw):
        return None
    group = P.unpack_payload(memoryview(raw)[body_offset:])
    return group if isinstance(group, str) else None


@dataclass
class RemoteSide:
    """One other broker of the bus, as its link announced it."""

    peers: dict[str, list[Any]] = field(default_factory=dict)  # id -> [id, name, type, pid]
    plain: dict[str, set[str]] = field(default_factory=dict)  # channel -> peer ids
    memberships: set[tuple[str, str, str]] = field(default_factory=set)  # (peer, channel, group)
    services: dict[str, str] = field(default_factory=dict)  # name -> host id


@dataclass
class Across:
    """A request this side sent out: the links whose part has not ended yet."""

    key: Key
    links: set[str]
    gather: bool
    channel: str
    plain: set[str] = field(default_factory=set)  # the links it went to by its channel


class FederationState:
    """The link's knowledge (see the module's docstring)."""

    def __init__(self, link_id: str) -> None:
        self.link_id = link_id
        self.local_peers: dict[str, list[Any]] = {}
        self.local_plain: dict[str, set[str]] = {}  # channel -> local peer ids listening plainly
        self.local_memberships: dict[tuple[str, str, str], bytes] = {}  # -> its SUBSCRIBE
        self.local_services: dict[str, list[Any]] = {}  # name -> host info
        self.remotes: dict[str, RemoteSide] = {}
        self.peer_link: dict[str, str] = {}  # remote peer id -> its link
        self.pending: dict[int, Across] = {}
        self.pending_n: dict[Key, int] = {}
        self.owed: dict[Key, tuple[str, bool]] = {}  # -> (reply subject, gather)
        self.last_heard: dict[str, float] = {}  # link -> when it was last heard (monotonic)
        self._next = 0
        self.counters = dict.fromkeys(("id_collisions", "unknown_senders", "refused_frames"),
                                      0)

    # -- the local side ---------------------------------------------------------------------
    def local(self, kind: int, channel: str, info: list[Any], raw: bytes | bytearray,
              body_offset: int) -> tuple[str, str] | None:
        """Record an announcement of the broker; ("sub" | "unsub", channel) when the link's
        interest in ``channel`` starts or ends."""
        peer_id = info[0]
        if kind == Kind.PEER_ADD:
            self.local_peers[peer_id] = list(info)
        elif kind == Kind.PEER_REMOVE:
            self.local_peers.pop(peer_id, None)
        elif kind == Kind.SERVICE_ADD:
            self.local_services[channel] = list(info)
        elif kind == Kind.SERVICE_REMOVE:
            if self.local_services.get(channel, [None])[0] == peer_id:
                del self.local_services[channel]
        else:
            group = group_of(raw, body_offset)
            if group is not None:
                if kind == Kind.SUBSCRIBE:
                    self.local_memberships[(peer_id, channel, group)] = bytes(raw)
                else:
                    self.local_memberships.pop((peer_id, channel, group), None)
                return None
            listeners = self.local_plain.get(channel)
            if kind == Kind.SUBSCRIBE:
                if listeners is None:
                    self.local_plain[channel] = {peer_id}
                    return ("sub", channel)
                listeners.add(peer_id)
            elif listeners is not None:
                listeners.discard(peer_id)
                if not listeners:
                    del self.local_plain[channel]
                    return ("unsub", channel)
        return None

    def local_frames(self) -> list[bytes]:
        """The whole local side as announcement frames, in an order a broker accepts."""
        frames = [P.encode_frame(Kind.PEER_ADD, sender=info) for info in self.local_peers.values()]
        for channel, ids in self.local_plain.items():
            for peer_id in ids:
                info = self.local_peers.get(peer_id)
                if info is not None:
                    frames.append(P.encode_frame(Kind.SUBSCRIBE, channel, info, None, 1))
        frames.extend(self.local_memberships.values())
        frames.extend(P.encode_frame(Kind.SERVICE_ADD, name, info)
                      for name, info in self.local_services.items())
        return frames

    # -- the remote sides -------------------------------------------------------------------
    def knows(self, peer_id: str) -> str | None:
        """The link of a remote peer (None: not a known remote peer)."""
        return self.peer_link.get(peer_id)

    def remote(self, link: str, kind: int, channel: str, info: list[Any],
               raw: bytes | bytearray, body_offset: int) -> bool:
        """Record a remote link's announcement; True if the broker should be given it."""
        side = self.remotes.setdefault(link, RemoteSide())
        peer_id = info[0]
        if kind == Kind.PEER_ADD:
            if peer_id in self.local_peers or (peer_id in self.peer_link
                                                and self.peer_link[peer_id] != link):
                self.counters["id_collisions"] += 1
                return False
            if peer_id in side.peers:
                return False
            side.peers[peer_id] = list(info)
            self.peer_link[peer_id] = link
            return True
        if peer_id not in side.peers:  # refused, or never announced: nothing in its name
            self.counters["unknown_senders"] += 1
            return False
        if kind == Kind.PEER_REMOVE:
            self._forget_peer(side, peer_id)
            return True
        if kind == Kind.SERVICE_ADD:
            side.services[channel] = peer_id
            return True
        if kind == Kind.SERVICE_REMOVE:
            if side.services.get(channel) == peer_id:
                del side.services[channel]
            return True
        group = group_of(raw, body_offset)
        if group is not None:
            entry = (peer_id, channel, group)
            if kind == Kind.SUBSCRIBE:
                side.memberships.add(entry)
            else:
                side.memberships.discard(entry)
            return True
        if kind == Kind.SUBSCRIBE:
            side.plain.setdefault(channel, set()).add(peer_id)
        else:
            ids = side.plain.get(channel)
            if ids is not None:
                ids.discard(peer_id)
                if not ids:
                    del side.plain[channel]
        return True

    def keep_only(self, link: str, listed: set[str]) -> list[list[Any]]:
        """``link``'s whole side lists ``listed``: it is known (even with no peer), and its
        other peers have left (their infos, for the broker)."""
        side = self.remotes.setdefault(link, RemoteSide())
        gone = [info for peer_id, info in side.peers.items() if peer_id not in listed]
        for info in gone:
            self._forget_peer(side, info[0])
        return gone

    def _forget_peer(self, side: RemoteSide, peer_id: str) -> None:
        side.peers.pop(peer_id, None)
        self.peer_link.pop(peer_id, None)
        for channel in [c for c, ids in side.plain.items() if peer_id in ids]:
            side.plain[channel].discard(peer_id)
            if not side.plain[channel]:
                del side.plain[channel]
        side.memberships = {m for m in side.memberships if m[0] != peer_id}
        for name in [n for n, host in side.services.items() if host == peer_id]:
            del side.services[name]

    def heard(self, link: str, now: float) -> bool:
        """``link`` said something (every link beats on ``ctl``); False if its side is not
        known here (it should be asked for it)."""
        self.last_heard[link] = now
        return link in self.remotes

    def silent(self, now: float, limit: float) -> list[str]:
        """The links not heard for ``limit`` seconds (gone without a bye: killed, or cut off
        from NATS)."""
        return [link for link, when in self.last_heard.items() if now - when > limit]

    def remote_gone(self, link: str) -> list[list[Any]]:
        """A link left (bye, or unheard of): the infos of its peers (the broker is told they
        left); the requests it still owed an answer lose that part."""
        self.last_heard.pop(link, None)
        side = self.remotes.pop(link, None)
        if side is None:
            return []
        for peer_id in side.peers:
            self.peer_link.pop(peer_id, None)
        return list(side.peers.values())

    def service_host(self, name: str) -> str | None:
        """The remote host of service ``name`` (None: not hosted on another broker)."""
        for side in self.remotes.values():
            host = side.services.get(name)
            if host is not None:
                return host
        return None

    def interest(self, channel: str) -> set[str]:
        """The links with a peer listening plainly on ``channel``."""
        return {link for link, side in self.remotes.items() if channel in side.plain}

    # -- requests this side sent out ----------------------------------------------------------
    def send_out(self, key: Key, links: set[str], gather: bool, channel: str,
                 plain: bool) -> tuple[int, list[Key]]:
        """Record a request sent to ``links`` (``plain``: by its channel); its number (its
        reply subject), and the keys of the oldest requests evicted over MAX_PENDING."""
        n = self.pending_n.get(key)
        if n is not None:  # a grouped member of a request already out: one more part
            across = self.pending[n]
            across.links |= links
            if plain:
                across.plain |= links
            return n, []
        self._next += 1
        n = self._next
        self.pending[n] = Across(key, set(links), gather, channel, set(links) if plain else set())
        self.pending_n[key] = n
        evicted: list[Key] = []
        while len(self.pending) > MAX_PENDING:
            oldest = next(iter(self.pending))
            evicted.append(self.pending.pop(oldest).key)
            self.pending_n.pop(evicted[-1], None)
        return n, evicted

    def answered(self, n: int, link: str, final: bool) -> tuple[Key, bool] | None:
        """A part of request ``n`` came back from ``link`` (``final``: a REQUEST_FAIL ends
        that link's part; an answer ends it unless the request gathers). The request's key
        and whether every part has ended (then the broker gets one REQUEST_FAIL), or None
        for an unknown request (late, or cancelled)."""
        across = self.pending.get(n)
        if across is None:
            return None
        if final or not across.gather:
            across.links.discard(link)
        done = not across.links
        if done or (not final and not across.gather):
            self.pending.pop(n, None)
            self.pending_n.pop(across.key, None)
        return across.key, done

    def no_responders(self, n: int) -> tuple[Key, bool] | None:
        """NATS found no subscriber for request ``n``: its channel's part has ended."""
        across = self.pending.get(n)
        if across is None:
            return None
        across.links -= across.plain if across.plain else set(across.links)
        done = not across.links
        if done:
            self.pending.pop(n, None)
            self.pending_n.pop(across.key, None)
        return across.key, done

    def cancel(self, key: Key) -> set[str]:
        """The requester gave up: the links to tell."""
        n = self.pending_n.pop(key, None)
        if n is None:
            return set()
        across = self.pending.pop(n)
        return across.links

    def fail_all(self) -> list[Key]:
        """NATS is gone: every request out ends (their keys)."""
        keys = [a.key for a in self.pending.values()]
        self.pending.clear()
        self.pending_n.clear()
        return keys

    def link_failed(self, link: str) -> list[Key]:
        """``link`` left: its parts end; the keys of the requests that ended with it."""
        ended = []
        for n, across in list(self.pending.items()):
            if link in across.links:
                across.links.discard(link)
                if not across.links:
                    ended.append(across.key)
                    del self.pending[n]
                    self.pending_n.pop(across.key, None)
        return ended

    # -- requests that came in -----------------------------------------------------------------
    def owe(self, key: Key, reply: str, gather: bool) -> None:
        if len(self.owed) >= MAX_PENDING:
            self.owed.pop(next(iter(self.owed)))
        self.owed[key] = (reply, gather)

    def answer_to(self, key: Key, final: bool) -> str | None:
        """Where the broker's answer (or, ``final``, its REQUEST_FAIL) to ``key`` goes."""
        entry = self.owed.get(key)
        if entry is None:
            return None
        if final or not entry[1]:
            del self.owed[key]
        return entry[0]

    def state(self) -> dict[str, Any]:
        return {
            "link": self.link_id,
            "remote_brokers": {link: {"peers": sorted(side.peers),
                                      "channels": sorted(side.plain),
                                      "services": sorted(side.services)}
                               for link, side in self.remotes.items()},
            "interest": sorted(self.local_plain),
            "requests_out": len(self.pending),
            "requests_in": len(self.owed),
            **self.counters,
        }
