"""The router's requests: where a request goes, who may answer it, and when it fails.

Pure, like the router (``_router.Router`` owns one :class:`RequestRouter` and hands it the
REQUEST, RESPONSE, REQUEST_FAIL and CANCEL frames once the sender is checked). Requests in
flight are kept in the bus's one request table (``_pending.RequestTable``), keyed by
``(requester id, rid)``, with the peers the request was delivered to as its *receivers*
(``UPSTREAM`` for a bridge's link, when it went to the broker too). The rules:

* A request goes to every peer listening on its channel (or to its target only); a request
  nobody can receive fails at once (REQUEST_FAIL to the requester).
* Only a receiver may answer (SPEC "Trust": other answers are dropped and counted); the
  first answer wins and the entry is taken out, so later answers find nothing.
* A receiver that leaves, fails the request (REQUEST_FAIL from its side: "no receiver left
  there", or its listeners raised: "TypeName: message"), or cannot be given it (over a
  link's limit) is dropped from the receivers; the requester gets REQUEST_FAIL when none is
  left, with the last reason a receiving peer's process gave (its listener's "TypeName:
  message", rather than a linked hub's "no listener there"), else the last reason. Only a connection holding a receiver may fail
  a request (others' failures are dropped and counted, like forged answers). A requester that leaves or cancels takes its
  entries out (a CANCEL is forwarded upstream if the request went there).
* ``/ipcbus/queryState`` and ``/ipcbus/serviceAvailable`` are answered by the router itself,
  within the message limit; so are ``/ipcbus/sync`` and ``/ipcbus/waitListeners`` (held until
  enough peers listen; forwarded to the broker by a linked bridge: ``_router_readiness``).
* Cancelling (0.2): a CANCEL from the requester (only its own connection can send one in its
  name: the router checked the sender) takes the entry out and is forwarded, as it came, to
  the endpoints of the receivers still expected (UPSTREAM: the link), so their clients can
  tell their listeners. A requester that leaves is a CANCEL to its local receivers too (not
  upstream: the broker sees the PEER_REMOVE and does the same on its side).
* Gathering (REQUEST_ALL, 0.2): the entry is marked ``gather``; every receiver's answer is
  forwarded (the receiver is then dropped), and the requester gets one REQUEST_FAIL when no
  receiver is left: the end of the gathering. An answer from UPSTREAM passes without dropping
  it (the broker gathers its own receivers and ends with REQUEST_FAIL, which drops it).
"""
from __future__ import annotations

from typing import Any

from . import _protocol as P
from ._pending import RequestTable
from ._protocol import Frame
from ._router_readiness import READINESS_CHANNELS
from ._router_special import SPECIAL_CHANNELS, SpecialRequests
from ._routing import UPSTREAM, Endpoint, Peer, Pending, RouterCore, answer_frame, fail_frame
from .errors import IpcBusProtocolError

__all__ = ["RequestRouter", "Pending", "SPECIAL_CHANNELS"]

Key = tuple[str, int]  # (requester id, rid)


class RequestRouter:
    """The requests of one router."""

    def __init__(self, core: RouterCore) -> None:
        self.core = core
        self.table: RequestTable[Key, Pending] = RequestTable()
        # requests the hub answers itself (_router_special.py), held waitListeners among them
        self.special = SpecialRequests(core, self)
        self.waits = self.special.waits
        self.grouped: dict[str, Any] = {}  # = GroupRouter.channels (set by it)
        self.via_upstream: set[Any] = set()  # = GroupRouter.via_upstream (set by it)

    # -- requests ---------------------------------------------------------------------------------
    def route(self, endpoint: Endpoint, frame: Frame, target: str | None) -> None:
        """A REQUEST from ``endpoint`` (its sender checked), for ``target`` or every listener."""
        core = self.core
        requester = frame.sender[0]  # type: ignore[index]  # checked by Router.handle()
        key = (requester, frame.rid)
        channel = frame.channel
        if target is None and core.upstream is None:
            if channel in SPECIAL_CHANNELS:
                self.special.answer(endpoint, frame)
                return
            subs = core.subscribers.get(channel)
            if subs is not None and len(subs) == 1 and channel not in self.grouped:
                # The common case: one listening peer, no link. The same as below, shorter.
                for peer_id in subs:
                    listener = core.peers[peer_id]
                    if endpoint.relay and listener.endpoint is endpoint:
                        break
                    try:
                        self.table.add(key, Pending(requester, endpoint, channel),
                                       receivers={peer_id})
                    except KeyError:  # in flight: refused below
                        break
                    listener.endpoint.deliver(frame.raw, [], frame.count)
                    return
            elif subs is None and channel in self.grouped and endpoint is not core.federation \
                    and self.to_members(key, endpoint, frame):
                return  # only groups listen: the member chosen in each (by the origin broker)
        if key in self.table:
            raise IpcBusProtocolError(f"request id {frame.rid} reused while pending")
        if target is None and channel in READINESS_CHANNELS:  # (linked: the broker answers)
            self.special.readiness_upstream(endpoint, frame)
            return
        grouped: list[tuple[str, str]] = []
        found = self._receivers(endpoint, channel, target, grouped)
        if isinstance(found, str):
            endpoint.deliver(fail_frame(requester, frame.rid, found), [])
            return
        receivers, targets = found
        self.table.add(key, Pending(requester, endpoint, channel), receivers=receivers)
        for ep in targets:
            ep.deliver(frame.raw, [], frame.count)
        if grouped:
            self.core.groups.hand(key, frame.channel, frame.raw, grouped, self.core.peers)

    def to_members(self, key: Key, endpoint: Endpoint, frame: Frame) -> bool:
        """A request at the root of the bus on a channel that only groups listen to (or a
        pool's call): to the member chosen in each group, in GROUPED. False if there is none."""
        groups = self.core.groups
        grouped = list(groups.choose(frame.channel))
        if not grouped:
            return False
        if key in self.table:
            raise IpcBusProtocolError(f"request id {frame.rid} reused while pending")
        self.table.add(key, Pending(key[0], endpoint, frame.channel),
                       receivers={member for _, member in grouped})
        groups.hand(key, frame.channel, frame.raw, grouped, self.core.peers)
        return True

    def route_all(self, endpoint: Endpoint, frame: Frame) -> None:
        """A REQUEST_ALL from ``endpoint`` (its sender checked): to every listener, gathered.
        Nobody listening ends it at once (REQUEST_FAIL: an empty gathering)."""
        requester = frame.sender[0]  # type: ignore[index]  # checked by Router.handle()
        key = (requester, frame.rid)
        if key in self.table:
            raise IpcBusProtocolError(f"request id {frame.rid} reused while pending")
        if frame.target is not None:
            raise IpcBusProtocolError("REQUEST_ALL with a target")
        channel = frame.channel
        if channel.startswith(P.RESERVED_PREFIX) and not channel.startswith(P.DIRECT_PREFIX) \
                and endpoint is not self.core.upstream:
            self.core.dropped["reserved_channel"] += 1
            endpoint.deliver(fail_frame(requester, frame.rid, f"channel {channel!r} is"
                                        " reserved: no request_all there"), [])
            return
        grouped: list[tuple[str, str]] = []
        found = self._receivers(endpoint, frame.channel, None, grouped)
        if isinstance(found, str):
            endpoint.deliver(fail_frame(requester, frame.rid, found), [])
            return
        receivers, targets = found
        self.table.add(key, Pending(requester, endpoint, frame.channel, gather=True),
                       receivers=receivers)
        for ep in targets:
            ep.deliver(frame.raw, [], frame.count)
        if grouped:
            self.core.groups.hand(key, frame.channel, frame.raw, grouped, self.core.peers)

    def _receivers(self, endpoint: Endpoint, channel: str, target: str | None,
                   grouped: list[tuple[str, str]] | None = None
                   ) -> tuple[set[str], list[Endpoint]] | str:
        """Who gets a request (peer ids, and the endpoints to deliver it to), or why nobody;
        ``grouped`` gets the (group, member) chosen in each group of the channel."""
        core = self.core
        upstream = core.upstream
        from_upstream = endpoint is upstream
        receivers: set[str] = set()
        targets: list[Endpoint] = []
        if target is not None:
            peer = core.peers.get(target)
            if peer is None:
                if upstream is None or from_upstream:
                    return f"no peer {target!r} on the bus"
                receivers.add(UPSTREAM)
                targets.append(upstream)
            elif channel in peer.channels or peer.endpoint is core.federation:
                # (a peer on another broker: that broker knows best whether it listens; its
                # subscription may be announced here after its service was)
                receivers.add(peer.id)
                targets.append(peer.endpoint)
            else:
                return f"peer {peer.name!r} ({peer.id}) has no listener for {channel!r}"
            return receivers, targets
        skip_source = endpoint.relay  # a relay has served its own side already
        subs = core.subscribers.get(channel)
        if subs:
            for peer_id in subs:
                if skip_source and core.peers[peer_id].endpoint is endpoint:
                    continue
                receivers.add(peer_id)
            eps = core.channel_endpoints[channel]
            targets.extend(ep for ep in eps if not (skip_source and ep is endpoint))
        if grouped is not None and channel in core.groups.channels:
            core.groups.members_for(channel, endpoint, core.peers, receivers, grouped)
        if upstream is not None and not from_upstream:
            receivers.add(UPSTREAM)
            if upstream not in targets:
                targets.append(upstream)
        if not receivers:
            return f"no listener for {channel!r} on the bus"
        return receivers, targets

    def forwarded(self, key: Key, endpoint: Endpoint, channel: str,
                  service: str | None = None) -> None:
        """A request-like frame this bridge sends to the broker only (an acknowledged post,
        a SERVICE_ADD), answered by the broker. IpcBusProtocolError if ``key`` is in flight."""
        if key in self.table:
            raise IpcBusProtocolError(f"request id {key[1]} reused while pending")
        self.table.add(key, Pending(key[0], endpoint, channel, service), receivers={UPSTREAM})

    # -- answers ----------------------------------------------------------------------------------
    def on_response(self, endpoint: Endpoint, frame: Frame) -> None:
        core = self.core
        target = frame.target
        if target is None:
            raise IpcBusProtocolError("RESPONSE without a target")
        key = (target, frame.rid)
        if endpoint is core.upstream:
            if core.join_answer(target, frame.rid, True, ""):
                return
            answerer: str | None = UPSTREAM
        else:
            answerer = frame.sender[0] if frame.sender is not None else None
        if answerer is None or not self.table.may_answer(key, answerer):
            if key not in self.table:
                return  # a late answer (the first one won), or the requester has gone
            # Only a peer the request was delivered to may answer it (SPEC "Trust").
            core.dropped["forged_answers"] += 1
            core.warn.warning("forged", "%s: dropped an answer from %s to request %d of %r,"
                              " which was not delivered to it", endpoint.label,
                              frame.sender_id, frame.rid, target)
            return
        pending = self.table.get(key)
        assert pending is not None
        if pending.gather:
            self._gathered(key, pending, answerer, frame)
            return
        self.table.take(key)
        if self.grouped:  # a member's load drops at its answer
            core.groups.answered(key, answerer)
        if self.via_upstream and pending.endpoint is not core.upstream:
            core.groups.answered_below(key, answerer, frame.raw)
        if pending.service is not None:
            core.service_hosts.granted(pending.service, pending.requester, key)  # by the broker
        pending.endpoint.deliver(frame.raw, [], frame.count)

    def _gathered(self, key: Key, pending: Pending, answerer: str, frame: Frame) -> None:
        """An answer of a REQUEST_ALL: to the requester; then the end if it was the last (an
        answer from UPSTREAM drops nobody: the broker ends its side itself). A linked
        bridge: the answer of a member the broker chose goes to the broker only, which
        counts it and hands it back (``GroupRouter.gathered_below``); that of a member given
        a broker's request ends nothing upstream (the broker saw the answer)."""
        if self.via_upstream and self.core.groups.gathered_below(key, answerer, frame.raw):
            return
        pending.endpoint.deliver(frame.raw, [], frame.count)
        if answerer != UPSTREAM and self.table.drop_receiver(key, answerer) is not None \
                and pending.endpoint is not self.core.upstream:
            pending.endpoint.deliver(fail_frame(key[0], key[1], "every receiver has answered"),
                                     [])

    def on_request_fail(self, endpoint: Endpoint, frame: Frame) -> None:
        """No receiver is left on ``endpoint``'s side (or the broker refused a join)."""
        if frame.target is None:
            raise IpcBusProtocolError("REQUEST_FAIL without a target")
        try:
            reason = P.unpack_control(frame.body)
        except IpcBusProtocolError:
            reason = "request failed"
        if endpoint is self.core.upstream and \
                self.core.join_answer(frame.target, frame.rid, False, str(reason)):
            return
        key = (frame.target, frame.rid)
        if self.via_upstream and frame.sender is not None:  # the broker's choice failed here
            self.core.groups.failed_below(key, endpoint, frame.raw)
        if frame.sender is not None:  # a receiving process's own report: its listener's error
            pending = self.table.get(key)
            if pending is not None and \
                    self.side_failed(endpoint, key, str(reason), dry_run=True):
                pending.failure = str(reason)
        if not self.side_failed(endpoint, key, str(reason)) and key in self.table:
            self.forged_failure(endpoint, frame)

    def forged_failure(self, endpoint: Endpoint, frame: Frame) -> None:
        """A REQUEST_FAIL for a request in flight from a connection that holds none of its
        receivers: only a receiver may fail a request, as only one may answer it (SPEC
        "Trust"). Dropped and counted with the forged answers."""
        core = self.core
        core.dropped["forged_answers"] += 1
        core.warn.warning("forged", "%s: dropped a failure from %s of request %d of %r,"
                          " which was not delivered to it", endpoint.label,
                          frame.sender_id, frame.rid, frame.target)

    def side_failed(self, endpoint: Endpoint, key: Key, reason: str,
                    dry_run: bool = False) -> bool:
        """The receivers of ``key`` on ``endpoint`` (its peers, or UPSTREAM for the link) will
        not answer: a process whose receivers all failed (a listener raised, an answer that
        cannot be encoded), or that no longer listens, speaks for its peers. False if none of
        the receivers is there (``dry_run``: only tell, drop nothing)."""
        upstream = endpoint is self.core.upstream
        found = False
        for receiver in self.table.receivers(key):
            if receiver in endpoint.peers or (receiver == UPSTREAM and upstream):
                found = True
                if dry_run:
                    break
                self.drop_receiver(key, receiver, reason)
        return found

    def on_cancel(self, endpoint: Endpoint, frame: Frame) -> None:
        """The requester gave up: forget the request, tell the receivers still expected."""
        assert frame.sender is not None
        key = (frame.sender[0], frame.rid)
        receivers = self.table.receivers(key)
        if self.table.take(key) is not None:
            self._tell_cancel(receivers, frame.raw, upstream_too=True)

    def _tell_cancel(self, receivers: frozenset[str], raw: bytes | bytearray,
                     upstream_too: bool) -> None:
        """Deliver the CANCEL ``raw`` once to each endpoint of ``receivers``."""
        core = self.core
        told: list[Endpoint] = []
        for receiver in receivers:
            if receiver == UPSTREAM:
                ep = core.upstream if upstream_too else None
            else:
                peer = core.peers.get(receiver)
                ep = peer.endpoint if peer is not None else None
            if ep is not None and ep not in told:
                told.append(ep)
                ep.deliver(raw, [])

    # -- receivers and requesters that go ---------------------------------------------------------
    def drop_receiver(self, key: Key, receiver: str, reason: str) -> None:
        pending = self.table.drop_receiver(key, receiver)
        if pending is not None:  # it was the last one
            pending.endpoint.deliver(fail_frame(key[0], key[1], pending.failure or reason), [])

    def receiver_gone(self, receiver: str, reason: str) -> None:
        """A peer (or the link: UPSTREAM) is gone: fail what only it could still answer."""
        for key, pending in self.table.receiver_gone(receiver):
            pending.endpoint.deliver(fail_frame(key[0], key[1], pending.failure or reason), [])

    def requester_gone(self, peer: Peer) -> None:
        """A peer left: its own requests are forgotten (nobody is left to answer)."""
        for key in [k for k in self.table if k[0] == peer.id]:
            receivers = self.table.receivers(key)
            pending = self.table.take(key)
            if pending is not None and receivers - {UPSTREAM}:  # its receivers stop too
                self._tell_cancel(receivers, P.encode_frame(
                    P.Kind.CANCEL, pending.channel, peer.info, None, key[1]), upstream_too=False)

    def counts(self) -> dict[str, int]:
        """Requests in flight by requester id (for the state)."""
        counts: dict[str, int] = {}
        for requester, _ in self.table:
            counts[requester] = counts.get(requester, 0) + 1
        return counts
