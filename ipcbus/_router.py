"""Where a message goes: peers, subscriptions, broadcast, peer-to-peer and request routing.

Pure code shared by the broker and the bridge. The router never touches a socket or a thread:
it is handed decoded frames with the endpoint they came from, and hands frames to endpoints
through :meth:`Endpoint.deliver`. The caller serialises calls (one loop thread, or a lock).

Rules:

* An *endpoint* is one connection (a process's shared client connection, a bridge pipe, a
  bridge's link). It carries one or more *peers*. Subscriptions are per peer and reference
  counted; a broadcast is delivered once per endpoint that has a subscribed peer, and the
  receiving process fans it out to its own listeners. Frames are forwarded as the bytes that
  came in: the router reads headers, never bodies.
* A sender's own process gets its broadcasts back like any other subscriber (EventEmitter
  semantics), except a *relay* endpoint (a bridge's link), which delivered them on its side
  already.
* ``upstream`` is the default route of a bridge linked to a broker: broadcasts and requests
  from local endpoints also go there, and frames for peers the router does not know go there.
  The broker has no upstream.
* A request is pending until its first answer (later answers are dropped), until its requester
  cancels or leaves, or until every receiver is gone; then the requester gets REQUEST_FAIL at
  once. A REQUEST_FAIL coming *from* an endpoint means "no receiver left on that side".
* Special channels (``/ipcbus/queryState``, ``/ipcbus/serviceAvailable``) are answered here.
"""
from __future__ import annotations

import fnmatch
import logging
from typing import Any, Callable, Protocol

from . import _protocol as P
from ._protocol import Frame, Kind
from .errors import IpcBusProtocolError

log = logging.getLogger("ipcbus")

UPSTREAM = "\x00upstream"  # pseudo receiver id: the request was also forwarded upstream


class Endpoint(Protocol):
    """What the router needs of a connection."""

    relay: bool  # True for a bridge's link: never echo its own broadcasts back to it
    can_pass_fds: bool  # a Unix socket (or pipe); False for TCP
    peers: dict[str, Peer]
    label: str  # for logs

    def deliver(self, raw: bytes | bytearray, fds: list[int], count: int = 1) -> None:
        """Queue a frame's bytes (``count`` > 1: a run of frames) and its descriptors (borrowed
        until this call returns) for this endpoint."""


class Peer:
    __slots__ = ("id", "name", "type", "pid", "endpoint", "channels", "info", "sent_msgs",
                 "sent_bytes")

    def __init__(self, info: list[Any], endpoint: Endpoint) -> None:
        self.info = info
        self.id: str = info[0]
        self.name: str = info[1]
        self.type: str = info[2]
        self.pid: int = info[3]
        self.endpoint = endpoint
        self.channels: dict[str, int] = {}
        self.sent_msgs = 0  # messages this peer sent (broadcasts, requests, answers)
        self.sent_bytes = 0


Observer = Callable[["Endpoint", Frame], None]
_PEER_ADD = int(Kind.PEER_ADD)
_MESSAGE_KINDS = P.MESSAGE_KINDS
_SPECIAL_CHANNELS = frozenset({P.QUERY_STATE_CHANNEL, P.SERVICE_AVAILABLE_CHANNEL})
_MAX_CHANNEL_STATS = 10_000


class Pending:
    __slots__ = ("requester", "endpoint", "channel", "receivers")

    def __init__(self, requester: str, endpoint: Endpoint, channel: str,
                 receivers: set[str]) -> None:
        self.requester = requester
        self.endpoint = endpoint  # where the answer goes
        self.channel = channel
        self.receivers = receivers  # peer ids (and maybe UPSTREAM) that got the request


def _fail_frame(target: str, rid: int, reason: str) -> bytes:
    return P.encode_frame(Kind.REQUEST_FAIL, target=target, rid=rid, body=P.pack_payload(reason))


def _answer_frame(target: str, rid: int, payload: Any) -> bytes:
    return P.encode_frame(Kind.RESPONSE, target=target, rid=rid,
                          body=P.pack_payload([True, payload]))


class Router:
    """Routing state of one broker or bridge."""

    def __init__(self, pid: int, *, state_extra: Callable[[], dict[str, Any]] | None = None
                 ) -> None:
        self.pid = pid
        self.upstream: Endpoint | None = None
        self.peers: dict[str, Peer] = {}
        # channel -> peer id -> count, and channel -> endpoint -> number of subscribed peers
        self.subscribers: dict[str, dict[str, int]] = {}
        self.channel_endpoints: dict[str, dict[Endpoint, int]] = {}
        self.pending: dict[tuple[str, int], Pending] = {}
        self._receiving: dict[str, set[tuple[str, int]]] = {}  # peer id -> pending keys
        self.services: dict[str, str] = {}  # service name -> peer id of its host
        # Looking in: observers see every message a peer sends (after it is routed); with none
        # attached the cost is one truth test per frame. Spies are observers fed by the router.
        self.observers: list[Observer] = []
        self.spies: dict[str, str] = {}  # spy peer id -> channel glob ("" = every channel)
        self.channel_stats: dict[str, list[int]] = {}  # channel -> [messages, bytes]
        self._state_extra = state_extra
        self._handlers: dict[int, Callable[[Endpoint, Frame], None]] = {
            Kind.PEER_ADD: self._on_peer_add,
            Kind.PEER_REMOVE: self._on_peer_remove,
            Kind.SUBSCRIBE: self._on_subscribe,
            Kind.UNSUBSCRIBE: self._on_unsubscribe,
            Kind.SEND: self._on_send,
            Kind.SEND_TO: self._on_send_to,
            Kind.REQUEST: self._on_request,
            Kind.RESPONSE: self._on_response,
            Kind.REQUEST_FAIL: self._on_request_fail,
            Kind.CANCEL: self._on_cancel,
            Kind.NOTICE: self._on_notice,
            Kind.SERVICE_ADD: self._on_service_add,
            Kind.SERVICE_REMOVE: self._on_service_remove,
            Kind.SPY_ADD: self._on_spy_add,
            Kind.SPY_REMOVE: self._on_spy_remove,
        }

    # -- entry points ---------------------------------------------------------------------
    def handle(self, endpoint: Endpoint, frame: Frame) -> None:
        """Route one frame received from ``endpoint``.

        Raises IpcBusProtocolError for a frame that breaks the protocol; the caller closes
        that endpoint (after :meth:`remove_endpoint`).
        """
        kind = frame.kind
        handler = self._handlers.get(kind)
        if handler is None:
            raise IpcBusProtocolError(f"unexpected {Kind(kind).name} frame")
        if kind != _PEER_ADD and endpoint is not self.upstream:
            sender = frame.sender
            if sender is None:
                # Only a relay speaks for its side without being a peer itself.
                if not (endpoint.relay and kind in (Kind.REQUEST_FAIL, Kind.NOTICE)):
                    raise IpcBusProtocolError(f"{Kind(kind).name} without a sender")
            else:
                peer = endpoint.peers.get(sender[0])
                if peer is None:
                    raise IpcBusProtocolError(f"{Kind(kind).name} from {sender[0]!r}, which is"
                                              " not a peer of this connection")
                if kind in _MESSAGE_KINDS:
                    self._count(peer, frame)
        handler(endpoint, frame)
        if self.observers and kind in _MESSAGE_KINDS:
            for observer in self.observers:
                observer(endpoint, frame)

    def _count(self, peer: Peer, frame: Frame) -> None:
        size = len(frame.raw)
        peer.sent_msgs += frame.count
        peer.sent_bytes += size
        stats = self.channel_stats.get(frame.channel)
        if stats is None:
            if len(self.channel_stats) >= _MAX_CHANNEL_STATS:  # forget unheard channels first
                for channel in [c for c in self.channel_stats if c not in self.subscribers]:
                    del self.channel_stats[channel]
            stats = self.channel_stats[frame.channel] = [0, 0]
        stats[0] += frame.count
        stats[1] += size

    def remove_endpoint(self, endpoint: Endpoint) -> None:
        """Forget a connection that has ended, and everything its peers owned."""
        for peer_id in list(endpoint.peers):
            self._remove_peer(peer_id)
        if endpoint is self.upstream:
            self.upstream = None
            for key, pending in list(self.pending.items()):
                if UPSTREAM in pending.receivers:
                    self._drop_receiver(key, UPSTREAM, "the link to the broker has closed")

    # -- peers ------------------------------------------------------------------------------
    def _on_peer_add(self, endpoint: Endpoint, frame: Frame) -> None:
        info = frame.sender
        if info is None:
            raise IpcBusProtocolError("PEER_ADD without a sender")
        peer_id = info[0]
        if peer_id in self.peers:
            if endpoint is not self.upstream:
                endpoint.deliver(_fail_frame(peer_id, frame.rid, f"peer id {peer_id!r} is taken"),
                                 [])
            return
        peer = Peer(info, endpoint)
        self.peers[peer_id] = peer
        endpoint.peers[peer_id] = peer
        if endpoint is not self.upstream:
            if self.upstream is not None:
                self.upstream.deliver(P.encode_frame(Kind.PEER_ADD, sender=info), [])
            endpoint.deliver(_answer_frame(peer_id, frame.rid, self.pid), [])

    def _on_peer_remove(self, endpoint: Endpoint, frame: Frame) -> None:
        assert frame.sender is not None
        self._remove_peer(frame.sender[0])

    def _remove_peer(self, peer_id: str) -> None:
        peer = self.peers.pop(peer_id, None)
        if peer is None:
            return
        peer.endpoint.peers.pop(peer_id, None)
        for channel in list(peer.channels):
            self._unsubscribe(peer, channel, 0)
        if self.spies.pop(peer_id, None) is not None and not self.spies:
            self.observers.remove(self._mirror)
        for name, host in list(self.services.items()):
            if host == peer_id:
                del self.services[name]
                self._broadcast(P.service_event_channel(name), P.pack_payload(
                    ["stop", f"the host of service {name!r} ({peer.name}) has left the bus"]))
        for key in list(self._receiving.get(peer_id, ())):
            self._drop_receiver(key, peer_id, f"peer {peer.name!r} ({peer_id}) has left the bus")
        self._receiving.pop(peer_id, None)
        for key in [k for k in self.pending if k[0] == peer_id]:
            self._forget(key)
        if self.upstream is not None and peer.endpoint is not self.upstream:
            self.upstream.deliver(P.encode_frame(Kind.PEER_REMOVE, sender=peer.info), [])

    # -- subscriptions -------------------------------------------------------------------------
    def _on_subscribe(self, endpoint: Endpoint, frame: Frame) -> None:
        peer = self._sender(endpoint, frame)
        channel = frame.channel
        if not channel:
            raise IpcBusProtocolError("SUBSCRIBE without a channel")
        count = max(frame.rid, 1)
        subs = self.subscribers.setdefault(channel, {})
        before = subs.get(peer.id, 0)
        subs[peer.id] = before + count
        peer.channels[channel] = before + count
        if before == 0:
            eps = self.channel_endpoints.setdefault(channel, {})
            eps[endpoint] = eps.get(endpoint, 0) + 1
            if self.upstream is not None and endpoint is not self.upstream:
                self.upstream.deliver(P.encode_frame(Kind.SUBSCRIBE, channel, peer.info, None, 1),
                                      [])

    def _on_unsubscribe(self, endpoint: Endpoint, frame: Frame) -> None:
        self._unsubscribe(self._sender(endpoint, frame), frame.channel, frame.rid)

    def _unsubscribe(self, peer: Peer, channel: str, count: int) -> None:
        """Remove ``count`` references of ``peer`` to ``channel`` (0: all of them)."""
        before = peer.channels.get(channel, 0)
        if before == 0:
            return
        after = 0 if count == 0 else max(before - count, 0)
        subs = self.subscribers[channel]
        if after:
            subs[peer.id] = after
            peer.channels[channel] = after
            return
        del subs[peer.id]
        del peer.channels[channel]
        if not subs:
            del self.subscribers[channel]
        eps = self.channel_endpoints[channel]
        eps[peer.endpoint] -= 1
        if eps[peer.endpoint] == 0:
            del eps[peer.endpoint]
            if not eps:
                del self.channel_endpoints[channel]
        if self.upstream is not None and peer.endpoint is not self.upstream:
            self.upstream.deliver(P.encode_frame(Kind.UNSUBSCRIBE, channel, peer.info, None, 0), [])

    def _sender(self, endpoint: Endpoint, frame: Frame) -> Peer:
        sid = frame.sender_id
        peer = self.peers.get(sid) if sid is not None else None
        if peer is None or peer.endpoint is not endpoint:
            raise IpcBusProtocolError(f"frame from unknown peer {sid!r}")
        return peer

    # -- messages ---------------------------------------------------------------------------
    def _on_send(self, endpoint: Endpoint, frame: Frame) -> None:
        eps = self.channel_endpoints.get(frame.channel)
        upstream = self.upstream
        to_upstream = upstream is not None and endpoint is not upstream
        # upstream is served once, by the default route, even if it announced subscribers
        skip = upstream if to_upstream else None
        if frame.nfds or frame.rid:  # post_message: routed all or nothing, acknowledged
            targets = [ep for ep in eps or ()
                       if (ep is not endpoint or not ep.relay) and ep is not skip]
            self._post(endpoint, frame, targets, to_upstream)
            return
        if eps:
            for ep in eps:
                if (ep is not endpoint or not ep.relay) and ep is not skip:
                    ep.deliver(frame.raw, frame.fds, frame.count)
        if to_upstream:
            assert upstream is not None
            upstream.deliver(frame.raw, frame.fds, frame.count)

    def _on_send_to(self, endpoint: Endpoint, frame: Frame) -> None:
        target = frame.target
        peer = self.peers.get(target) if target is not None else None
        via_upstream = peer is None and self.upstream is not None and endpoint is not self.upstream
        if frame.rid and peer is not None and frame.channel not in peer.channels \
                and frame.sender_id is not None and endpoint is not self.upstream:
            # post_message_to a peer that does not listen there fails, as request_to does
            endpoint.deliver(_fail_frame(frame.sender_id, frame.rid, (
                f"peer {peer.name!r} ({peer.id}) has no listener for {frame.channel!r}")), [])
        elif (frame.nfds or frame.rid) and (peer is not None or via_upstream):
            self._post(endpoint, frame, [peer.endpoint] if peer is not None else [], via_upstream)
        elif peer is not None:
            peer.endpoint.deliver(frame.raw, frame.fds, frame.count)
        elif via_upstream:
            assert self.upstream is not None
            self.upstream.deliver(frame.raw, frame.fds, frame.count)
        elif frame.rid and frame.sender_id is not None:
            endpoint.deliver(_fail_frame(frame.sender_id, frame.rid,
                                         f"no peer {frame.target!r} on the bus"), [])
        else:
            self._notice_unknown(endpoint, frame)

    def _post(self, endpoint: Endpoint, frame: Frame, targets: list[Endpoint],
              via_upstream: bool) -> None:
        """Deliver a frame that carries descriptors: to every target, or (if one of them cannot
        receive descriptors) to none. ``rid`` > 0 asks for an answer: RESPONSE with the number
        of connections reached, or REQUEST_FAIL; through a link the broker gives it."""
        sender, rid = frame.sender_id, frame.rid
        if endpoint is self.upstream:
            rid = 0  # the broker answers the posts that reach us through it
        if not targets and not via_upstream and not (
                endpoint.relay and endpoint in self.channel_endpoints.get(frame.channel, ())):
            if rid and sender is not None:  # (a link's own side listens: it announced so)
                endpoint.deliver(_fail_frame(sender, rid, f"no listener for {frame.channel!r}"
                                             " on the bus; nothing was sent"), [])
            return
        unable = [ep for ep in targets if not ep.can_pass_fds] if frame.nfds else []
        if frame.nfds and via_upstream and self.upstream is not None \
                and not self.upstream.can_pass_fds:
            unable.append(self.upstream)
        if unable:
            if rid and sender is not None:
                names = ", ".join(sorted({p.name for ep in unable for p in ep.peers.values()}
                                         or {ep.label for ep in unable}))
                endpoint.deliver(_fail_frame(sender, rid, (
                    f"cannot pass descriptors to {names}: not connected by a Unix socket or"
                    " pipe; nothing was sent")), [])
            return
        for ep in targets:
            ep.deliver(frame.raw, frame.fds, frame.count)
        if via_upstream and self.upstream is not None:
            if rid and sender is not None:
                key = (sender, rid)
                self.pending[key] = Pending(sender, endpoint, frame.channel, {UPSTREAM})
                self._receiving.setdefault(UPSTREAM, set()).add(key)
            self.upstream.deliver(frame.raw, frame.fds, frame.count)
        elif rid and sender is not None:
            endpoint.deliver(_answer_frame(sender, rid, len(targets)), [])

    def _notice_unknown(self, endpoint: Endpoint, frame: Frame) -> None:
        log.warning("%s: dropped %s to unknown peer %r on channel %r", endpoint.label,
                    Kind(frame.kind).name, frame.target, frame.channel)
        endpoint.deliver(P.notice_frame(
            frame.sender_id, error=f"no peer {frame.target!r} on the bus", channel=frame.channel), [])

    # -- requests -----------------------------------------------------------------------------
    def _on_request(self, endpoint: Endpoint, frame: Frame) -> None:
        requester = frame.sender[0]  # type: ignore[index]  # checked by handle()
        key = (requester, frame.rid)
        channel = frame.channel
        if frame.target is None and self.upstream is None:
            if channel in _SPECIAL_CHANNELS:
                endpoint.deliver(self._special(channel, frame), [])
                return
            subs = self.subscribers.get(channel)
            if subs is not None and len(subs) == 1 and key not in self.pending:
                # The common case: one listening peer, no link. The same as below, shorter.
                for peer_id in subs:
                    listener = self.peers[peer_id]
                    if endpoint.relay and listener.endpoint is endpoint:
                        break
                    self.pending[key] = Pending(requester, endpoint, channel, {peer_id})
                    keys = self._receiving.get(peer_id)
                    if keys is None:
                        self._receiving[peer_id] = {key}
                    else:
                        keys.add(key)
                    listener.endpoint.deliver(frame.raw, frame.fds, frame.count)
                    return
        if key in self.pending:
            raise IpcBusProtocolError(f"request id {frame.rid} reused while pending")
        receivers: set[str] = set()
        targets: list[Endpoint] = []
        from_upstream = endpoint is self.upstream
        skip_source = endpoint.relay  # a relay has served its own side already
        if frame.target is not None:
            peer = self.peers.get(frame.target)
            if peer is None:
                if self.upstream is not None and not from_upstream:
                    receivers.add(UPSTREAM)
                    targets.append(self.upstream)
                else:
                    endpoint.deliver(_fail_frame(
                        requester, frame.rid, f"no peer {frame.target!r} on the bus"), [])
                    return
            elif channel in peer.channels:
                receivers.add(peer.id)
                targets.append(peer.endpoint)
            else:
                endpoint.deliver(_fail_frame(
                    requester, frame.rid,
                    f"peer {peer.name!r} ({peer.id}) has no listener for {channel!r}"), [])
                return
        else:
            subs = self.subscribers.get(channel)
            if subs:
                for peer_id in subs:
                    peer = self.peers[peer_id]
                    if skip_source and peer.endpoint is endpoint:
                        continue
                    receivers.add(peer_id)
                eps = self.channel_endpoints[channel]
                targets.extend(ep for ep in eps if not (skip_source and ep is endpoint))
            if self.upstream is not None and not from_upstream:
                receivers.add(UPSTREAM)
                if self.upstream not in targets:
                    targets.append(self.upstream)
            if not receivers:
                endpoint.deliver(_fail_frame(requester, frame.rid,
                                             f"no listener for {channel!r} on the bus"), [])
                return
        self.pending[key] = Pending(requester, endpoint, channel, receivers)
        for rid_peer in receivers:
            self._receiving.setdefault(rid_peer, set()).add(key)
        for ep in targets:
            ep.deliver(frame.raw, frame.fds, frame.count)

    def _special(self, channel: str, frame: Frame) -> bytes:
        """The answer to a request on one of _SPECIAL_CHANNELS."""
        requester = frame.sender_id
        assert requester is not None
        if channel == P.QUERY_STATE_CHANNEL:
            return _answer_frame(requester, frame.rid, self.state())
        assert channel == P.SERVICE_AVAILABLE_CHANNEL
        try:
            args = P.unpack_control(frame.body)
        except IpcBusProtocolError:
            args = None
        if not (isinstance(args, list) and args and isinstance(args[0], str)):
            return _fail_frame(requester, frame.rid,
                               f"{P.SERVICE_AVAILABLE_CHANNEL} takes a service name")
        return _answer_frame(requester, frame.rid, args[0] in self.services)

    def _on_response(self, endpoint: Endpoint, frame: Frame) -> None:
        target = frame.target
        if target is None:
            raise IpcBusProtocolError("RESPONSE without a target")
        pending = self._forget((target, frame.rid))
        if pending is not None:
            pending.endpoint.deliver(frame.raw, frame.fds, frame.count)
        elif target not in self.peers and self.upstream is not None \
                and endpoint is not self.upstream:
            self.upstream.deliver(frame.raw, frame.fds, frame.count)
        # else: a late answer (the first one won) or the requester has gone: dropped.

    def _on_request_fail(self, endpoint: Endpoint, frame: Frame) -> None:
        if frame.target is None:
            raise IpcBusProtocolError("REQUEST_FAIL without a target")
        key = (frame.target, frame.rid)
        if key not in self.pending:
            return
        gone = [p for p in self.pending[key].receivers
                if p in endpoint.peers or (p == UPSTREAM and endpoint is self.upstream)]
        try:
            reason = P.unpack_control(frame.body)
        except IpcBusProtocolError:
            reason = "request failed"
        for peer_id in gone:
            self._drop_receiver(key, peer_id, str(reason))

    def _on_cancel(self, endpoint: Endpoint, frame: Frame) -> None:
        assert frame.sender is not None
        pending = self._forget((frame.sender[0], frame.rid))
        if pending is not None and UPSTREAM in pending.receivers and self.upstream is not None:
            self.upstream.deliver(frame.raw, frame.fds, frame.count)

    def _on_notice(self, endpoint: Endpoint, frame: Frame) -> None:
        if endpoint is self.upstream and frame.target is not None:
            peer = self.peers.get(frame.target)
            if peer is not None:
                peer.endpoint.deliver(frame.raw, frame.fds, frame.count)
                return
        log.info("%s: notice %s", endpoint.label, bytes(frame.body)[:200])

    def _drop_receiver(self, key: tuple[str, int], receiver: str, reason: str) -> None:
        pending = self.pending.get(key)
        if pending is None:
            return
        pending.receivers.discard(receiver)
        keys = self._receiving.get(receiver)
        if keys is not None:
            keys.discard(key)
        if not pending.receivers:
            self._forget(key)
            pending.endpoint.deliver(_fail_frame(key[0], key[1], reason), [])

    def _forget(self, key: tuple[str, int]) -> Pending | None:
        pending = self.pending.pop(key, None)
        if pending is not None:
            for receiver in pending.receivers:
                keys = self._receiving.get(receiver)
                if keys is not None:
                    keys.discard(key)
                    if not keys:
                        del self._receiving[receiver]
        return pending

    # -- services -------------------------------------------------------------------------------
    def _on_service_add(self, endpoint: Endpoint, frame: Frame) -> None:
        peer = self._sender(endpoint, frame)
        name = frame.channel
        if not name:
            raise IpcBusProtocolError("SERVICE_ADD without a name")
        if self.upstream is not None:
            # The broker keeps the bus's services: ask it, as a request it answers.
            key = (peer.id, frame.rid)
            self.pending[key] = Pending(peer.id, endpoint, name, {UPSTREAM})
            self._receiving.setdefault(UPSTREAM, set()).add(key)
            self.upstream.deliver(frame.raw, frame.fds, frame.count)
            return
        host = self.services.get(name)
        if host is not None and host != peer.id:
            owner = self.peers.get(host)
            endpoint.deliver(_fail_frame(peer.id, frame.rid, (
                f"a service named {name!r} is already started by"
                f" {owner.name if owner else host!r} ({host})")), [])
            return
        self.services[name] = peer.id
        endpoint.deliver(_answer_frame(peer.id, frame.rid, None), [])

    def _on_service_remove(self, endpoint: Endpoint, frame: Frame) -> None:
        peer = self._sender(endpoint, frame)
        if self.upstream is not None:
            self.upstream.deliver(frame.raw, frame.fds, frame.count)
        elif self.services.get(frame.channel) == peer.id:
            del self.services[frame.channel]

    # -- spies -------------------------------------------------------------------------------------
    def _on_spy_add(self, endpoint: Endpoint, frame: Frame) -> None:
        peer = self._sender(endpoint, frame)
        if not self.spies:
            self.observers.append(self._mirror)
        self.spies[peer.id] = frame.channel
        endpoint.deliver(_answer_frame(peer.id, frame.rid, None), [])

    def _on_spy_remove(self, endpoint: Endpoint, frame: Frame) -> None:
        peer = self._sender(endpoint, frame)
        if self.spies.pop(peer.id, None) is not None and not self.spies:
            self.observers.remove(self._mirror)

    def _mirror(self, endpoint: Endpoint, frame: Frame) -> None:
        """Give every interested spy a copy of a routed message (its bytes, undecoded)."""
        copy: bytes | None = None
        for spy_id, pattern in self.spies.items():
            if pattern and not fnmatch.fnmatchcase(frame.channel, pattern):
                continue
            spy = self.peers.get(spy_id)
            if spy is None:
                continue
            if copy is None:
                copy = bytes(frame.raw)
            spy.endpoint.deliver(P.encode_frame(Kind.SPY_COPY, frame.channel, None, spy_id, 0,
                                                copy), [])

    def _broadcast(self, channel: str, body: bytes) -> None:
        """A SEND made by the router itself (no sender), to the subscribers of ``channel``."""
        eps = self.channel_endpoints.get(channel)
        if eps:
            raw = P.encode_frame(Kind.SEND, channel, None, None, 0, body)
            for ep in eps:
                ep.deliver(raw, [])

    # -- state ----------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """The bus as this router sees it (the answer to ``/ipcbus/queryState``)."""
        pending_by_peer: dict[str, int] = {}
        for requester, _ in self.pending:
            pending_by_peer[requester] = pending_by_peer.get(requester, 0) + 1
        state: dict[str, Any] = {
            "pid": self.pid,
            "peers": [
                {"id": p.id, "name": p.name, "type": p.type, "pid": p.pid,
                 "channels": dict(p.channels),
                 "sent": {"messages": p.sent_msgs, "bytes": p.sent_bytes},
                 "pending_requests": pending_by_peer.get(p.id, 0),
                 # what the router delivered to this peer's connection (shared by the clients
                 # of one process), and what still waits in its queue
                 "connection": {
                     "delivered_messages": getattr(p.endpoint, "delivered_msgs", 0),
                     "delivered_bytes": getattr(p.endpoint, "delivered_bytes", 0),
                     "queued_bytes": getattr(p.endpoint, "out_bytes", 0)}}
                for p in self.peers.values()
            ],
            "channels": {ch: len(subs) for ch, subs in self.subscribers.items()},
            "channel_stats": {ch: {"messages": m, "bytes": b,
                                   "subscribers": len(self.subscribers.get(ch, ()))}
                              for ch, (m, b) in self.channel_stats.items()},
            "services": dict(self.services),
            "spies": len(self.spies),
            "pending_requests": len(self.pending),
        }
        if self._state_extra is not None:
            state.update(self._state_extra())
        return state
