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

Trust (SPEC "Trust", "Resources"): the router, not a frame, decides who a peer is.

* A peer's type and pid are the endpoint's (``Endpoint.ptype``/``Endpoint.pid``, set by the
  hub from the kind of connection and the kernel's credentials); only a relay (a link the
  hub itself made or granted) declares the identities of the peers of its side. Every later
  frame of a peer must carry exactly the recorded ``[id, name, type, pid]``, and a connection
  acts only for the peers it registered: anything else is a protocol error for that
  connection.
* Ids are unique across the bus: a bridge linked to a broker registers a local peer only
  once the broker has accepted its id. Ids cannot collide with the pseudo-id UPSTREAM.
* An answer is taken only from a peer the request was delivered to (or from the upstream
  link, for a request forwarded there); any other answer is dropped and counted.
* Channels under ``/ipcbus/`` are reserved (``_protocol.RESERVED_PREFIX``): a service's
  event channel takes broadcasts only from the service's host (any member of a pool: a
  service hosted by a group); requests on its call channel go to its host only (a pool's:
  to one member, ``_router_services.route_call``); direct channels may be listened to only
  by the peer they name.
* Descriptors: the router hands every receiving endpoint its own duplicates (``dup_fds``,
  injected); if they cannot all be made, nothing is delivered and the sender is told.
* Frames the router builds obey the size limits: an answer or a spy copy over
  ``max_message`` is replaced by a failure or a notice to the asker.

Parts: :class:`Router` (this module) checks every frame's sender, keeps the routing state
and the subscriptions; peers joining and leaving are ``_router_peers.PeerRouter``'s, services
``_router_services.ServiceRouter``'s, groups ``_router_groups.GroupRouter``'s; it hands messages to
``_router_messages.MessageRouter`` (broadcasts, peer-to-peer, posts with descriptors,
reserved channels), requests and answers to ``_router_requests.RequestRouter`` (on the
bus's one request table, ``_pending.RequestTable``), and spies, statistics and the state to
``_router_view``. They share the vocabulary of ``_routing`` (Endpoint, Peer, UPSTREAM).
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

from . import _protocol as P
from ._protocol import Frame, Kind
from ._router_groups import GroupRouter
from ._router_messages import MessageRouter
from ._router_peers import PeerRouter
from ._router_relink import RID_BASE as RELINK_RIDS, Relink
from ._router_requests import SPECIAL_CHANNELS, RequestRouter
from ._router_services import ServiceRouter
from ._router_view import ChannelStats, Spies, bus_state
from ._routing import (UPSTREAM, DupFds, Endpoint, Observer, Peer, RateLimitedLog, copies,
                       fail_frame)
from .errors import IpcBusProtocolError

__all__ = ["Router", "Endpoint", "Peer", "RateLimitedLog", "UPSTREAM"]

log = logging.getLogger("ipcbus")

_PEER_ADD = int(Kind.PEER_ADD)
_MESSAGE_KINDS = P.MESSAGE_KINDS
_RESERVED = P.RESERVED_PREFIX


class Router:
    """Routing state of one broker or bridge."""

    def __init__(self, pid: int, *, state_extra: Callable[[], dict[str, Any]] | None = None,
                 max_message: int = P.DEFAULT_MAX_MESSAGE, dup_fds: DupFds = copies,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.pid = pid
        self.max_message = max_message  # the largest body of a frame the router builds
        self.upstream: Endpoint | None = None
        # A federated broker's link to NATS (a relay for the other brokers' peers): told of
        # this side's peers, subscriptions and services (``tell_federation``).
        self.federation: Endpoint | None = None
        self.peers: dict[str, Peer] = {}
        # Peers waiting for the broker to accept their id (a linked bridge): id ->
        # (their endpoint, or None once it has gone; recorded info; rid of their PEER_ADD)
        self.joining: dict[str, tuple[Endpoint | None, list[Any], int]] = {}
        # channel -> peer id -> count, and channel -> endpoint -> number of subscribed peers
        self.subscribers: dict[str, dict[str, int]] = {}
        self.channel_endpoints: dict[str, dict[Endpoint, int]] = {}
        self.requests = RequestRouter(self)
        self.messages = MessageRouter(self, self.requests, dup_fds)
        self.pending = self.requests.table  # requests in flight (the bus's one request table)
        self.groups = GroupRouter(self)  # _router_groups.py
        self.members = PeerRouter(self)  # joins and leaves: _router_peers.py
        self.service_hosts = ServiceRouter(self)  # _router_services.py
        self.relink = Relink(self)  # a bridge's link that came back: _router_relink.py
        # service name -> host peer id (a linked bridge: this side's, as the broker granted)
        self.services: dict[str, str] = self.service_hosts.hosts
        # Looking in: observers see every message a peer sends (after it is routed); with none
        # attached the cost is one truth test per frame. Spies are observers fed by the router.
        self.observers: list[Observer] = []
        self.spies = Spies(self, self.observers)
        self.stats = ChannelStats(self.subscribers)
        self._count = self.stats.count
        # What was refused without closing a connection (SPEC "Trust"), for queryState.
        self.dropped = dict.fromkeys((
            "forged_answers", "forged_events", "reserved_channel", "unknown_targets",
            "spy_copies_over_limit", "over_link_limit", "descriptor_copies_failed",
            "direct_subscriptions"), 0)
        self.warn = RateLimitedLog(clock)
        self._state_extra = state_extra
        self._handlers: dict[int, Callable[[Endpoint, Frame], None]] = {
            Kind.PEER_ADD: self.members.on_peer_add,
            Kind.PEER_REMOVE: self.members.on_peer_remove,
            Kind.SUBSCRIBE: self._on_subscribe,
            Kind.UNSUBSCRIBE: self._on_unsubscribe,
            Kind.SEND: self.messages.on_send,
            Kind.SEND_TO: self.messages.on_send_to,
            Kind.REQUEST: self._on_request,
            Kind.RESPONSE: self.requests.on_response,
            Kind.REQUEST_FAIL: self.requests.on_request_fail,
            Kind.CANCEL: self.requests.on_cancel,
            Kind.NOTICE: self.messages.on_notice,
            Kind.SERVICE_ADD: self.service_hosts.on_add,
            Kind.SERVICE_REMOVE: self.service_hosts.on_remove,
            Kind.SPY_ADD: self.spies.on_add,
            Kind.SPY_REMOVE: self.spies.on_remove,
            Kind.REQUEST_ALL: self.requests.route_all, Kind.GROUPED: self.messages.on_grouped,
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
                if not (endpoint.relay and kind in (Kind.REQUEST_FAIL, Kind.NOTICE, Kind.GROUPED)):
                    raise IpcBusProtocolError(f"{Kind(kind).name} without a sender")
            else:
                peer = endpoint.peers.get(sender[0])
                if peer is None:
                    raise IpcBusProtocolError(f"{Kind(kind).name} from {sender[0]!r}, which is"
                                              " not a peer of this connection")
                if sender is not peer.seen:  # decoders reuse the list of a repeated header
                    if sender != peer.info:
                        raise IpcBusProtocolError(
                            f"{Kind(kind).name} declares the sender {sender!r}, but the bus"
                            f" recorded peer {peer.id!r} as {peer.info!r}")
                    peer.seen = sender
                if kind in _MESSAGE_KINDS:
                    self._count(peer, frame)
        handler(endpoint, frame)
        if self.observers and kind in _MESSAGE_KINDS:
            for observer in self.observers:
                observer(endpoint, frame)

    def remove_endpoint(self, endpoint: Endpoint) -> None:
        """Forget a connection that has ended, and everything its peers owned."""
        for peer_id in list(endpoint.peers):
            self.members.remove_peer(peer_id)
        for peer_id, (ep, recorded, rid) in list(self.joining.items()):
            if ep is endpoint:  # the broker's answer may still come: see _join_answer
                self.joining[peer_id] = (None, recorded, rid)
        if endpoint is self.upstream:
            self.upstream = None
            self.relink.link_lost()
            self.requests.receiver_gone(UPSTREAM, "the link to the broker has closed")
            joining, self.joining = self.joining, {}
            for peer_id, (ep, _, rid) in joining.items():
                if ep is not None:
                    ep.deliver(fail_frame(peer_id, rid, "the link to the broker has closed"),
                               [])

    def join_answer(self, peer_id: str, rid: int, accepted: bool, reason: str) -> bool:
        """The broker's answer to a PEER_ADD this bridge forwarded (or to a question of the
        relink); False if it is not one."""
        # (a test, not a call, on the path of every answer from the link)
        if rid > RELINK_RIDS and self.relink.answer(peer_id, rid, accepted, reason):
            return True
        return self.members.join_answer(peer_id, rid, accepted, reason)

    def undeliverable(self, endpoint: Endpoint, raw: bytes | bytearray, reason: str) -> None:
        """An endpoint refused a frame the router gave it (over the limit of a link): fail
        the request as if that side had no listener, or tell the sender of a message."""
        self.dropped["over_link_limit"] += 1
        try:
            hlen, _, rid = P.PREFIX.unpack_from(raw, 0)
            kind, channel, sender, _, _ = P.decode_header(
                memoryview(raw)[P.PREFIX_SIZE:P.PREFIX_SIZE + hlen])
        except IpcBusProtocolError:
            return
        sender_id = sender[0] if sender else None
        self.warn.warning("undeliverable", "%s: %s on %r from %s not delivered: %s",
                          endpoint.label, Kind(kind).name, channel, sender_id, reason)
        if sender_id is None:
            return
        if kind == Kind.REQUEST or kind == Kind.REQUEST_ALL:
            self.requests.side_failed(endpoint, (sender_id, rid), reason)
        elif kind in (Kind.SEND, Kind.SEND_TO):
            origin = self.peers.get(sender_id)
            if origin is not None:
                origin.endpoint.deliver(P.notice_frame(sender_id, error=reason,
                                                       channel=channel), [])

    # -- subscriptions -------------------------------------------------------------------------
    def _on_subscribe(self, endpoint: Endpoint, frame: Frame) -> None:
        peer = self.sender_of(endpoint, frame)
        channel = frame.channel
        if not channel:
            raise IpcBusProtocolError("SUBSCRIBE without a channel")
        count = frame.rid or 1
        if len(frame.raw) > frame.body_offset:  # a group's member (_router_groups.py)
            return self.groups.on_subscribe(peer, frame, count)
        if count > P.MAX_SUBSCRIBE_STEP:
            raise IpcBusProtocolError(f"SUBSCRIBE adds {count} references, over the limit of"
                                      f" {P.MAX_SUBSCRIBE_STEP}")
        before = peer.channels.get(channel, 0)
        if before + count > P.MAX_SUBSCRIBE_COUNT:
            raise IpcBusProtocolError(f"{before + count} references to channel {channel!r},"
                                      f" over the limit of {P.MAX_SUBSCRIBE_COUNT}")
        if before == 0:
            if len(peer.channels) >= P.MAX_CHANNELS_PER_PEER:
                raise IpcBusProtocolError(f"peer {peer.id!r} listens to more than"
                                          f" {P.MAX_CHANNELS_PER_PEER} channels")
            if channel.startswith(P.DIRECT_PREFIX) and endpoint is not self.upstream and \
                    not channel.startswith(f"{P.DIRECT_PREFIX}{peer.id}/"):
                self.dropped["direct_subscriptions"] += 1
                self.warn.warning("direct", "%s: peer %r may not listen to %r, the direct"
                                  " channel of another peer", endpoint.label, peer.id, channel)
                return
        subs = self.subscribers.setdefault(channel, {})
        subs[peer.id] = before + count
        peer.channels[channel] = before + count
        if before == 0:
            eps = self.channel_endpoints.setdefault(channel, {})
            eps[endpoint] = eps.get(endpoint, 0) + 1
            if self.upstream is not None and endpoint is not self.upstream:
                self.upstream.deliver(P.encode_frame(Kind.SUBSCRIBE, channel, peer.info, None, 1),
                                      [])
            if self.federation is not None and endpoint is not self.federation:
                self.federation.deliver(P.encode_frame(Kind.SUBSCRIBE, channel, peer.info), [])
            if self.requests.waits:  # held wait_for_listeners requests (_router_readiness)
                self.requests.special.listeners_added(channel)

    def _on_unsubscribe(self, endpoint: Endpoint, frame: Frame) -> None:
        peer = self.sender_of(endpoint, frame)
        if not self.groups.on_unsubscribe(peer, frame):
            self.unsubscribe(peer, frame.channel, frame.rid)

    def unsubscribe(self, peer: Peer, channel: str, count: int) -> None:
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
        if self.federation is not None and peer.endpoint is not self.federation:
            self.federation.deliver(P.encode_frame(Kind.UNSUBSCRIBE, channel, peer.info), [])

    def sender_of(self, endpoint: Endpoint, frame: Frame) -> Peer:
        sid = frame.sender_id
        peer = self.peers.get(sid) if sid is not None else None
        if peer is None or peer.endpoint is not endpoint:
            raise IpcBusProtocolError(f"frame from unknown peer {sid!r}")
        return peer

    # -- requests (routed by self.requests: _router_requests.py) -------------------------------
    def _on_request(self, endpoint: Endpoint, frame: Frame) -> None:
        channel = frame.channel
        target = frame.target
        if channel.startswith(_RESERVED) and endpoint is not self.upstream:
            if channel.startswith(P.SERVICE_CALL_PREFIX):
                name = channel[len(P.SERVICE_CALL_PREFIX):]
                if name in self.service_hosts.pools and target is None:
                    return self.service_hosts.route_call(endpoint, frame)  # ONE member
                # A service's calls go to its host only (when this side knows the host).
                target = self.service_hosts.host_of(name, target)
            elif channel not in SPECIAL_CHANNELS and not channel.startswith(P.DIRECT_PREFIX):
                self.dropped["reserved_channel"] += 1
                self.messages.refuse_reserved(endpoint, frame)
                return
        self.requests.route(endpoint, frame, target)

    # -- looking in (_router_view.py) --------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """The bus as this router sees it (the answer to ``/ipcbus/queryState``)."""
        state = bus_state(self, self.requests.counts(), len(self.pending), len(self.spies),
                          self.stats.channels)
        if self._state_extra is not None:
            state.update(self._state_extra())
        return state
