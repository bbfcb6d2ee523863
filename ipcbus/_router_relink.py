"""What a linked bridge sends upstream to re-announce its side after its link came back.

Pure, like the router (``_router.Router`` owns one :class:`Relink`; the bridge's retry thread,
``_bridge_relink.py``, makes the new link and calls :meth:`Relink.start` on the hub's thread).
A restarted broker knows nothing of the bridge's side; the bridge's own clients and pipe
children never lost their connection (to the bridge), so they do not reconnect themselves:
the bridge's router announces them again, from its state (README "Surviving a broker
restart", the bridge's case). In order:

1. every local peer: PEER_ADD with its recorded identity (same id), asked with a rid of the
   relink range (:data:`RID_BASE` and up: clients count their rids from 1, so the broker's
   answer is told apart from theirs). A peer's other frames wait for the broker's answer: a
   frame of a peer the broker does not know would be a protocol error there (the link closed).
2. once accepted (:meth:`Relink.answer`): its plain subscriptions and its group memberships
   (one SUBSCRIBE each, as the live path sends them: :func:`peer_frames`), and a SERVICE_ADD
   for each service it hosts (:func:`service_claims`; a pool's with its group). A refused id
   is logged and the peer stays local-only: it keeps talking to this side, and its frames are
   kept from the link (:meth:`Relink.strip_local_only`; a request of its that went only to
   the link then waits for its timeout).
3. once a service is granted again: a pool member's group membership of the call channel
   (allowed only now), then the proxies across the bus are told it started. Only the host
   knows its status (its calls), so the router asks it, as a proxy does (a status REQUEST on
   the call channel, in the host's own name, rid of the relink range), and broadcasts
   ``["start", status]`` on the service's event channel in the host's name (a host may speak
   there) when the answer comes (:meth:`Relink.on_response`, the router's RESPONSE handler
   while such questions are out). A refused name is logged and taken off this side (its
   calls go to the bus's host).

The proxies of this side of services hosted beyond the link (a local peer listens on the
event channel of a service this side does not host) are told too, when the bridge reconnects
(``reconnecting``): "stop" when the link goes (:meth:`Relink.link_lost`: the hub broadcasts
it on this side, as it does for a host that leaves; their calls then wait for the start,
within their timeout), and once their peer is accepted again, a status question with the
"new proxy" flag in that peer's name, which the service's host (if it is back) answers with
a "start" notice to that peer (its answer to the question is the relink's, dropped here).

Everything pending is forgotten when the link goes again (:meth:`Relink.reset`).
"""
from __future__ import annotations

import logging
from typing import Any, Callable

from . import _protocol as P
from ._protocol import Frame, Kind
from ._router_groups import grouped_frame
from ._routing import Endpoint, Peer
from .errors import IpcBusProtocolError

__all__ = ["Relink", "RID_BASE", "local_peers", "peer_frames", "service_claims",
           "watched_remote_services"]

log = logging.getLogger("ipcbus")

RID_BASE = 1 << 62  # rids of the relink's own questions (a client's count up from 1; rids < 2**63)
_STATUS_CALL = "__getServiceStatus"  # = _service_common.STATUS_CALL (the router is pure)
Handler = Callable[[Endpoint, Frame], None]


def local_peers(core: Any) -> list[Peer]:
    """The peers of this side (not the broker's, seen through the link), oldest first."""
    upstream = core.upstream
    return [peer for peer in core.peers.values() if peer.endpoint is not upstream]


def peer_frames(core: Any, peer: Peer) -> list[bytes]:
    """The SUBSCRIBE frames that announce ``peer``'s listening upstream: one per channel it
    listens to, one per group it is a member of (a pool's call channel left out: that one is
    allowed only once the service is granted again, :meth:`Relink.answer`)."""
    frames = [P.encode_frame(Kind.SUBSCRIBE, channel, peer.info, None, 1)
              for channel in peer.channels]
    for channel, group in sorted(core.groups.of_peer.get(peer.id, ())):
        if channel.startswith(P.SERVICE_CALL_PREFIX) and \
                channel[len(P.SERVICE_CALL_PREFIX):] in core.service_hosts.pools:
            continue
        frames.append(P.encode_frame(Kind.SUBSCRIBE, channel, peer.info, None, 1,
                                     P.pack_payload(group)))
    return frames


def service_claims(core: Any, peer: Peer) -> list[tuple[str, str | None]]:
    """The services ``peer`` hosts: (name, its pool's group, or None for an exclusive one)."""
    hosts = core.service_hosts
    claims: list[tuple[str, str | None]] = [
        (name, None) for name, host in hosts.hosts.items()
        if host == peer.id and name not in hosts.pools]
    claims += [(name, group) for name, (group, members) in hosts.pools.items()
               if peer.id in members]
    return claims


def watched_remote_services(core: Any, channels: Any = None) -> list[str]:
    """The services this side does not host whose event channel is listened to here (among
    ``channels``: default, every channel with a subscriber)."""
    hosts = core.service_hosts
    prefix = P.SERVICE_EVENT_PREFIX
    return [channel[len(prefix):] for channel in (core.subscribers if channels is None
                                                  else channels)
            if channel.startswith(prefix) and channel[len(prefix):] not in hosts.hosts
            and channel[len(prefix):] not in hosts.pools]


class Relink:
    """A linked bridge's re-announcement in progress: the questions it asked (see the module
    docstring), keyed like the answers that settle them, ``(peer id, rid)``."""

    def __init__(self, core: Any) -> None:
        self.core = core  # the router
        self.asks: dict[tuple[str, int], tuple[str, str, str | None]] = {}  # (what, name, group)
        self.local_only: set[str] = set()  # ids the broker refused: kept from the link
        self._next = RID_BASE
        # the router's RESPONSE and REQUEST_FAIL handlers, while ours stand in for them
        self._plain: tuple[Handler, Handler] | None = None
        self.reconnecting = False  # set by a bridge whose link reconnects

    def _rid(self) -> int:
        self._next += 1
        return self._next

    def start(self) -> list[bytes]:
        """The link is back (``core.upstream`` is the new one): send a PEER_ADD for every
        local peer; returns the frames sent (for the tests)."""
        self.reset()
        upstream = self.core.upstream
        assert upstream is not None
        frames = []
        for peer in local_peers(self.core):
            rid = self._rid()
            self.asks[(peer.id, rid)] = ("peer", "", None)
            frames.append(P.encode_frame(Kind.PEER_ADD, sender=peer.info, rid=rid))
        for raw in frames:
            upstream.deliver(raw, [])
        if frames:
            log.info("bridge: the link is back; announcing %d local peer(s) to the broker",
                     len(frames))
        return frames

    def reset(self) -> None:
        """Forget the questions out (the link has gone, or a new one starts)."""
        self.asks.clear()
        self.local_only.clear()
        self._watch_responses(False)

    def link_lost(self) -> None:
        """The link has gone (``core.upstream`` is None): forget the questions out, and, for a
        bridge that reconnects, tell this side's proxies of services hosted beyond the link
        that they stopped."""
        self.reset()
        if not self.reconnecting:
            return  # (as before: the link stays closed)
        body = P.pack_payload(["stop", "the link to the broker was lost"])
        for name in watched_remote_services(self.core):
            self.core.messages.broadcast(P.service_event_channel(name), body)

    def keeps_local(self, peer_id: str | None) -> bool:
        """Whether frames of ``peer_id`` must not go upstream (the broker refused its id)."""
        return peer_id in self.local_only

    def strip_local_only(self, raw: bytes | bytearray) -> bytes | bytearray:
        """``raw`` (one frame, or a run) for the link without the frames of local-only peers
        (the broker does not know them: one would be a protocol error there). Called only
        while there are some (the link's ``deliver``, ``_bridge_relink.LinkEndpoint``). The
        PEER_REMOVE of one (it left) ends its being local-only: its id may join again."""
        kept: list[bytes | bytearray] = []
        offset, dropped = 0, False
        view = memoryview(raw)
        while offset < len(raw):
            hlen, blen, _ = P.PREFIX.unpack_from(raw, offset)
            end = offset + P.PREFIX_SIZE + hlen + blen
            kind, _, sender, _, _ = P.decode_header(view[offset + P.PREFIX_SIZE:
                                                         offset + P.PREFIX_SIZE + hlen])
            if sender is not None and sender[0] in self.local_only:
                dropped = True
                if kind == Kind.PEER_REMOVE:
                    self.local_only.discard(sender[0])
            else:
                kept.append(raw[offset:end])
            offset = end
        if not dropped:
            return raw
        return b"".join(kept)

    # -- answers -------------------------------------------------------------------------------
    def answer(self, peer_id: str, rid: int, accepted: bool, reason: str) -> bool:
        """The broker's answer (from the link) to one of our questions; False if it is not
        one (the router goes on with it)."""
        if rid <= RID_BASE:
            return False
        ask = self.asks.pop((peer_id, rid), None)
        if ask is None:
            return False
        core = self.core
        peer = core.peers.get(peer_id)
        upstream = core.upstream
        if peer is None or upstream is None or peer.endpoint is upstream:
            return True  # it left meanwhile (its PEER_REMOVE followed the PEER_ADD up)
        what, name, group = ask
        if what == "remote":
            return True  # the host told the proxy "start" itself (or there is no host yet)
        if what == "peer":
            self._peer_answered(peer, accepted, reason)
        elif what == "service":
            self._service_answered(peer, name, group, accepted, reason)
        return True

    def _peer_answered(self, peer: Peer, accepted: bool, reason: str) -> None:
        if not accepted:
            self.local_only.add(peer.id)
            log.warning("bridge: the broker refused peer %r (%s) on relinking: %s; it stays"
                        " local-only", peer.name, peer.id, reason)
            return
        upstream = self.core.upstream
        for raw in peer_frames(self.core, peer):
            upstream.deliver(raw, [])
        for name in watched_remote_services(self.core, peer.channels):
            rid = self._rid()
            self.asks[(peer.id, rid)] = ("remote", name, None)
            upstream.deliver(P.encode_frame(Kind.REQUEST, P.service_call_channel(name),
                                            peer.info, None, rid,
                                            P.pack_payload([_STATUS_CALL, True])), [])
        for name, group in service_claims(self.core, peer):
            rid = self._rid()
            self.asks[(peer.id, rid)] = ("service", name, group)
            body = b"" if group is None else P.pack_payload(group)
            upstream.deliver(P.encode_frame(Kind.SERVICE_ADD, name, peer.info, None, rid, body),
                             [])

    def _service_answered(self, peer: Peer, name: str, group: str | None, accepted: bool,
                          reason: str) -> None:
        core = self.core
        if not accepted:
            log.warning("bridge: service %r of %s (%s) not started again on relinking: %s",
                        name, peer.name, peer.id, reason)
            hosts = core.service_hosts
            if name in hosts.pools:
                hosts._leave(name, peer.id)
            elif hosts.hosts.get(name) == peer.id:
                del hosts.hosts[name]
            return
        call_channel = P.service_call_channel(name)
        if group is not None:
            core.upstream.deliver(P.encode_frame(Kind.SUBSCRIBE, call_channel, peer.info, None,
                                                 1, P.pack_payload(group)), [])
        rid = self._rid()
        self.asks[(peer.id, rid)] = ("status", name, group)
        self._watch_responses(True)
        ask = P.encode_frame(Kind.REQUEST, call_channel, peer.info, peer.id, rid,
                             P.pack_payload([_STATUS_CALL]))
        if group is not None:  # a pool's member listens as a member of its group
            ask = grouped_frame(call_channel, peer.id, group, ask)
        peer.endpoint.deliver(ask, [])

    def _status_answered(self, frame: Frame) -> tuple[str, str, str | None] | None:
        """The status question ``frame`` (a RESPONSE or REQUEST_FAIL) answers, taken out;
        None if it answers none (its sender must be the host asked)."""
        key = (frame.target or "", frame.rid)
        ask = self.asks.get(key) if frame.rid > RID_BASE else None
        if ask is None or ask[0] != "status" or frame.sender_id != key[0]:
            return None
        del self.asks[key]
        if not any(a[0] == "status" for a in self.asks.values()):
            self._watch_responses(False)
        return ask

    def on_request_fail(self, endpoint: Endpoint, frame: Frame) -> None:
        """The router's REQUEST_FAIL handler while status questions are out: a host that
        could not answer one (its service stopped meanwhile) is not told started."""
        assert self._plain is not None
        plain = self._plain[1]
        ask = self._status_answered(frame)
        if ask is None:
            return plain(endpoint, frame)
        log.warning("bridge: service %r did not give its status after relinking", ask[1])

    def on_response(self, endpoint: Endpoint, frame: Frame) -> None:
        """The router's RESPONSE handler while status questions are out: a host's status
        becomes the "start" broadcast of its service; any other answer goes on as usual."""
        assert self._plain is not None
        plain = self._plain[0]
        key = (frame.target or "", frame.rid)
        ask = self._status_answered(frame)
        if ask is None:
            return plain(endpoint, frame)
        try:
            ok, status = P.unpack_payload(frame.body)
        except (IpcBusProtocolError, TypeError, ValueError):
            ok, status = False, None
        peer = self.core.peers.get(key[0])
        if not ok or not isinstance(status, dict) or peer is None:
            log.warning("bridge: service %r did not give its status after relinking", ask[1])
            return
        self.tell_started(peer, ask[1], status)

    def tell_started(self, peer: Peer, name: str, status: dict[str, Any]) -> None:
        """Broadcast ``["start", status]`` on service ``name``'s event channel, in its host's
        name: to this side's subscribers and to the broker (which tells its side)."""
        core = self.core
        channel = P.service_event_channel(name)
        raw = P.encode_frame(Kind.SEND, channel, peer.info, None, 0,
                             P.pack_payload(["start", status]))
        targets = set(core.channel_endpoints.get(channel, ()))
        if core.upstream is not None:
            targets.add(core.upstream)
        for ep in targets:
            ep.deliver(raw, [])
        log.info("bridge: service %r of %s started again on the relinked bus", name, peer.name)

    def _watch_responses(self, on: bool) -> None:
        """Route RESPONSE and REQUEST_FAIL through :meth:`on_response` and
        :meth:`on_request_fail` only while status questions are out (the plain path pays
        nothing otherwise)."""
        handlers = self.core._handlers
        if on and self._plain is None:
            self._plain = (handlers[Kind.RESPONSE], handlers[Kind.REQUEST_FAIL])
            handlers[Kind.RESPONSE] = self.on_response
            handlers[Kind.REQUEST_FAIL] = self.on_request_fail
        elif not on and self._plain is not None:
            handlers[Kind.RESPONSE], handlers[Kind.REQUEST_FAIL] = self._plain
            self._plain = None
