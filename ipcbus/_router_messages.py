"""The router's messages: broadcasts (SEND), peer-to-peer messages (SEND_TO) and posts.

Pure, like the router (``_router.Router`` owns one :class:`MessageRouter` and hands it SEND
and SEND_TO frames once the sender is checked). Frames are forwarded as the bytes that came
in. The rules:

* A broadcast is delivered once per endpoint with a subscribed peer (the receiving process
  fans it out), the sender's own included, except a relay's (a bridge's link delivered it on
  its side already); a linked bridge also sends it upstream, once.
* A SEND_TO goes to its target's endpoint, or upstream if the target is not on this side; to
  nobody, with a NOTICE to the sender (rate-limited warnings), if it is unknown.
* A *post* (a message with descriptors, or acknowledged: rid > 0) is routed all or nothing:
  every receiving endpoint gets its own copies of the descriptors (``dup_fds``, injected), or,
  if one cannot take descriptors or the copies cannot all be made, nobody gets anything and
  the sender is told. An acknowledged post is answered with the number of connections
  reached (through a link, by the broker: the bridge tracks it as a forwarded request).
* Reserved channels (``/ipcbus/``): anyone may send on direct channels and service call
  channels, only a service's host on its event channel; other frames there are refused.
"""
from __future__ import annotations

import logging
from typing import Any
import struct

from . import _protocol as P
from ._protocol import Frame, Kind
from ._router_groups import frame_bytes
from ._router_requests import Pending, RequestRouter
from .errors import IpcBusProtocolError
from ._routing import DupFds, Endpoint, RouterCore, answer_frame, fail_frame

__all__ = ["MessageRouter"]

log = logging.getLogger("ipcbus")

_RESERVED = P.RESERVED_PREFIX


class MessageRouter:
    """The messages of one router."""

    def __init__(self, core: RouterCore, requests: RequestRouter, dup_fds: DupFds) -> None:
        self.core = core
        self.requests = requests
        self.dup = dup_fds
        self.grouped: dict[str, Any] = {}  # = GroupRouter.channels (set by it)

    # -- reserved channels ---------------------------------------------------------------------
    def may_send(self, frame: Frame) -> bool:
        """May this (non-upstream) frame be sent on its reserved channel?"""
        channel = frame.channel
        if channel.startswith(P.DIRECT_PREFIX) or channel.startswith(P.SERVICE_CALL_PREFIX):
            return True
        if channel.startswith(P.SERVICE_EVENT_PREFIX):
            if self.core.service_hosts.is_host(channel[len(P.SERVICE_EVENT_PREFIX):],
                                               frame.sender_id):  # a pool: any member
                return True
            self.core.dropped["forged_events"] += frame.count
            return False
        self.core.dropped["reserved_channel"] += frame.count
        return False

    def refuse_reserved(self, endpoint: Endpoint, frame: Frame) -> None:
        reason = (f"channel {frame.channel!r} is reserved: only the bus and the host of a"
                  " service send on it")
        self.core.warn.warning("reserved", "%s: dropped %s from %s: %s", endpoint.label,
                               Kind(frame.kind).name, frame.sender_id, reason)
        if frame.sender_id is not None:
            if frame.kind == Kind.REQUEST or frame.kind == Kind.REQUEST_ALL:
                endpoint.deliver(fail_frame(frame.sender_id, frame.rid, reason), [])
            else:
                endpoint.deliver(P.notice_frame(frame.sender_id, error=reason,
                                                channel=frame.channel), [])

    # -- messages ---------------------------------------------------------------------------
    def on_send(self, endpoint: Endpoint, frame: Frame) -> None:
        upstream = self.core.upstream
        if frame.channel.startswith(_RESERVED) and endpoint is not upstream \
                and not self.may_send(frame):
            self.refuse_reserved(endpoint, frame)
            return
        eps = self.core.channel_endpoints.get(frame.channel)
        to_upstream = upstream is not None and endpoint is not upstream
        # upstream is served once, by the default route, even if it announced subscribers
        skip = upstream if to_upstream else None
        if frame.nfds or frame.rid:  # post_message: routed all or nothing, acknowledged
            targets = [ep for ep in eps or ()
                       if (ep is not endpoint or not ep.relay) and ep is not skip]
            self.post(endpoint, frame, targets, to_upstream)
            return
        if eps:
            for ep in eps:
                if (ep is not endpoint or not ep.relay) and ep is not skip:
                    ep.deliver(frame.raw, [], frame.count)
        if self.grouped and frame.channel in self.grouped:
            self.to_groups(endpoint, frame)
        if to_upstream:
            assert upstream is not None
            upstream.deliver(frame.raw, [], frame.count)

    def to_groups(self, endpoint: Endpoint, frame: Frame) -> None:
        """A broadcast to one member of each group of its channel (_router_groups.py)."""
        groups, peers = self.core.groups, self.core.peers
        for raw in frame_bytes(frame):  # a run: each of its messages is balanced
            grouped: list[tuple[str, str]] = []
            groups.members_for(frame.channel, endpoint, peers, set(), grouped)
            groups.hand(None, frame.channel, raw, grouped, peers)

    def on_grouped(self, endpoint: Endpoint, frame: Frame) -> None:
        """A linked bridge: the broker chose a member of this side (_router_groups.py)."""
        core = self.core
        if endpoint is not core.upstream and endpoint is not core.federation:
            raise IpcBusProtocolError("GROUPED is made by a hub only")
        peer = core.peers.get(frame.target) if frame.target is not None else None
        if peer is None or peer.endpoint is endpoint:
            core.dropped["unknown_targets"] += 1
            return
        try:
            _, raw = P.unpack_payload(frame.body)
            hlen, _, rid = P.PREFIX.unpack_from(raw, 0)
            kind, channel, sender, _, _ = P.decode_header(
                memoryview(raw)[P.PREFIX_SIZE:P.PREFIX_SIZE + hlen])
        except (IpcBusProtocolError, ValueError, TypeError, struct.error) as exc:
            raise IpcBusProtocolError(f"malformed GROUPED frame: {exc}") from None
        if (kind == Kind.REQUEST or kind == Kind.REQUEST_ALL) and sender:
            key, table = (sender[0], rid), self.requests.table
            if key in table:  # a request of this side: the member may answer it here
                table.add_receiver(key, peer.id)
                core.groups.handed_below(key, peer.id)
            else:
                table.add(key, Pending(sender[0], endpoint, channel,
                                       gather=kind == Kind.REQUEST_ALL), receivers={peer.id})
        peer.endpoint.deliver(frame.raw, [])

    def on_send_to(self, endpoint: Endpoint, frame: Frame) -> None:
        if frame.channel.startswith(_RESERVED) and endpoint is not self.core.upstream \
                and not self.may_send(frame):
            self.refuse_reserved(endpoint, frame)
            return
        target = frame.target
        peer = self.core.peers.get(target) if target is not None else None
        upstream = self.core.upstream
        via_upstream = peer is None and upstream is not None and endpoint is not upstream
        if frame.rid and peer is not None and frame.channel not in peer.channels \
                and frame.sender_id is not None and endpoint is not upstream:
            # post_message_to a peer that does not listen there fails, as request_to does
            endpoint.deliver(fail_frame(frame.sender_id, frame.rid, (
                f"peer {peer.name!r} ({peer.id}) has no listener for {frame.channel!r}")), [])
        elif (frame.nfds or frame.rid) and (peer is not None or via_upstream):
            self.post(endpoint, frame, [peer.endpoint] if peer is not None else [], via_upstream)
        elif peer is not None:
            peer.endpoint.deliver(frame.raw, [], frame.count)
        elif via_upstream:
            assert upstream is not None
            upstream.deliver(frame.raw, [], frame.count)
        elif frame.rid and frame.sender_id is not None:
            endpoint.deliver(fail_frame(frame.sender_id, frame.rid,
                                         f"no peer {frame.target!r} on the bus"), [])
        else:
            self.notice_unknown(endpoint, frame)

    def post(self, endpoint: Endpoint, frame: Frame, targets: list[Endpoint],
              via_upstream: bool) -> None:
        """Deliver a posted message (with descriptors, or acknowledged): to every target, or
        (if one of them cannot receive descriptors, or their copies cannot all be made) to
        none. ``rid`` > 0 asks for an answer: RESPONSE with the number of connections
        reached, or REQUEST_FAIL; through a link the broker gives it."""
        sender, rid = frame.sender_id, frame.rid
        if endpoint is self.core.upstream:
            rid = 0  # the broker answers the posts that reach us through it
        if not targets and not via_upstream and not (
                endpoint.relay and endpoint in self.core.channel_endpoints.get(frame.channel, ())):
            if rid and sender is not None:  # (a link's own side listens: it announced so)
                endpoint.deliver(fail_frame(sender, rid, f"no listener for {frame.channel!r}"
                                             " on the bus; nothing was sent"), [])
            return
        upstream = self.core.upstream if via_upstream else None
        unable = [ep for ep in targets if not ep.can_pass_fds] if frame.nfds else []
        if frame.nfds and upstream is not None and not upstream.can_pass_fds:
            unable.append(upstream)
        failure = None
        if unable and self.core.federation in unable:
            failure = ("cannot pass descriptors to a listener on another host of the federation"
                       " (descriptors stay on their host); nothing was sent")
        elif unable:
            names = ", ".join(sorted({p.name for ep in unable for p in ep.peers.values()}
                                     or {ep.label for ep in unable}))
            failure = (f"cannot pass descriptors to {names}: not connected by a Unix socket or"
                       " pipe; nothing was sent")
        else:
            receivers = targets + ([upstream] if upstream is not None else [])
            try:
                copies = self.dup(frame.fds, len(receivers))
            except OSError as exc:
                self.core.dropped["descriptor_copies_failed"] += 1
                self.core.warn.warning("dup", "%s: could not copy the descriptors of a message"
                                       " on %r: %s", endpoint.label, frame.channel, exc)
                failure = f"the bus could not copy the descriptors ({exc}); nothing was sent"
        if failure is not None:
            if rid and sender is not None:
                endpoint.deliver(fail_frame(sender, rid, failure), [])
            return
        for ep, fds in zip(targets, copies):
            ep.deliver(frame.raw, fds, frame.count)
        if upstream is not None:
            if rid and sender is not None:
                self.requests.forwarded((sender, rid), endpoint, frame.channel)
            upstream.deliver(frame.raw, copies[-1], frame.count)
        elif rid and sender is not None:
            endpoint.deliver(answer_frame(sender, rid, len(targets)), [])

    def notice_unknown(self, endpoint: Endpoint, frame: Frame) -> None:
        self.core.dropped["unknown_targets"] += frame.count
        self.core.warn.warning("unknown", "%s: dropped %s to unknown peer %r on channel %r",
                               endpoint.label, Kind(frame.kind).name, frame.target,
                               frame.channel)
        if frame.sender_id is not None:
            endpoint.deliver(P.notice_frame(
                frame.sender_id, error=f"no peer {frame.target!r} on the bus",
                channel=frame.channel), [])

    def on_notice(self, endpoint: Endpoint, frame: Frame) -> None:
        if endpoint is self.core.upstream and frame.target is not None:
            peer = self.core.peers.get(frame.target)
            if peer is not None:
                peer.endpoint.deliver(frame.raw, [], frame.count)
                return
        log.debug("%s: notice %s", endpoint.label, bytes(frame.body)[:200])

    def broadcast(self, channel: str, body: bytes) -> None:
        """A SEND made by the router itself (no sender), to the subscribers of ``channel``."""
        eps = self.core.channel_endpoints.get(channel)
        if eps:
            raw = P.encode_frame(Kind.SEND, channel, None, None, 0, body)
            for ep in eps:
                ep.deliver(raw, [])
