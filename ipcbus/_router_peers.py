"""The router's peers: who joins and leaves the bus through which connection.

Pure, like the router (``_router.Router`` owns one :class:`PeerRouter` and keeps the state it
changes: ``peers`` and ``joining``). The rules (SPEC "Trust"):

* A peer's type and pid are its connection's, as the hub recorded them; only a relay (a
  bridge's link) declares the identities of the peers of its side.
* Ids are unique on the bus: a taken id is refused with REQUEST_FAIL to the PEER_ADD. A bridge
  linked to a broker registers a local peer only once the broker accepted its id (the peer
  waits in ``joining``); a peer that left meanwhile gives its id back.
* A peer that leaves takes everything it owned with it: subscriptions, group memberships,
  spies, services (the proxies are told), requests it was to answer (failed to their
  requesters, :meth:`RequestRouter.receiver_gone`) and those it asked.
"""
from __future__ import annotations

import logging
from typing import Any

from . import _protocol as P
from ._protocol import Frame, Kind
from ._routing import Endpoint, Peer, answer_frame, fail_frame, tell_federation
from .errors import IpcBusProtocolError

__all__ = ["PeerRouter"]

log = logging.getLogger("ipcbus")


class PeerRouter:
    """PEER_ADD / PEER_REMOVE and the broker's answers to joins a linked bridge forwarded."""

    def __init__(self, core: Any) -> None:
        self.core = core  # the router (_routing.RouterCore)

    def on_peer_add(self, endpoint: Endpoint, frame: Frame) -> None:
        core = self.core
        info = frame.sender
        if info is None:
            raise IpcBusProtocolError("PEER_ADD without a sender")
        peer_id = info[0]
        problem = P.check_peer_id(peer_id) or P.check_peer_name(info[1])
        if endpoint is core.upstream or endpoint.relay:  # a hub: it decided who its peers are
            if problem is None and info[2] not in P.PEER_TYPES:
                problem = f"unknown peer type {info[2]!r}"
            recorded = list(info)
        else:
            recorded = [peer_id, info[1], endpoint.ptype, endpoint.pid]
        if endpoint is core.upstream:
            if problem is None and peer_id not in core.peers and peer_id not in core.joining:
                self.add_peer(recorded, endpoint)
            else:
                log.warning("%s: ignored PEER_ADD of %r: %s", endpoint.label, peer_id,
                            problem or "the id is in use on this side")
            return
        if problem is not None:
            raise IpcBusProtocolError(f"PEER_ADD: {problem}")
        reason = None
        if peer_id in core.peers or peer_id in core.joining:
            reason = f"peer id {peer_id!r} is taken"
        elif not endpoint.relay and len(endpoint.peers) >= P.MAX_PEERS_PER_CONNECTION:
            reason = f"a connection carries at most {P.MAX_PEERS_PER_CONNECTION} peers"
        if reason is not None:
            endpoint.deliver(fail_frame(peer_id, frame.rid, reason), [])
            return
        if core.upstream is not None:
            # Ids are unique across the bus: the broker accepts the id first (join_answer).
            core.joining[peer_id] = (endpoint, recorded, frame.rid)
            core.upstream.deliver(P.encode_frame(Kind.PEER_ADD, sender=recorded, rid=frame.rid),
                                  [])
            return
        self.add_peer(recorded, endpoint)
        endpoint.deliver(self.joined_frame(recorded, frame.rid), [])

    def add_peer(self, recorded: list[Any], endpoint: Endpoint) -> None:
        peer = Peer(recorded, endpoint)
        self.core.peers[peer.id] = peer
        endpoint.peers[peer.id] = peer
        if self.core.federation is not None:
            tell_federation(self.core, endpoint, P.encode_frame(Kind.PEER_ADD, sender=recorded))

    def joined_frame(self, recorded: list[Any], rid: int) -> bytes:
        """The answer to PEER_ADD: this hub's pid and the peer as recorded (which the client
        adopts for every frame it sends)."""
        return answer_frame(recorded[0], rid, {"pid": self.core.pid, "peer": recorded})

    def join_answer(self, peer_id: str, rid: int, accepted: bool, reason: str) -> bool:
        """The broker's answer to a PEER_ADD this bridge forwarded; False if it is not one."""
        core = self.core
        entry = core.joining.get(peer_id)
        if entry is None or entry[2] != rid:
            return False
        del core.joining[peer_id]
        endpoint, recorded, _ = entry
        if endpoint is None:  # it left meanwhile: take the id back from the broker
            if accepted and core.upstream is not None:
                core.upstream.deliver(P.encode_frame(Kind.PEER_REMOVE, sender=recorded), [])
        elif accepted:
            self.add_peer(recorded, endpoint)
            endpoint.deliver(self.joined_frame(recorded, rid), [])
        else:
            endpoint.deliver(fail_frame(peer_id, rid, reason), [])
        return True

    def on_peer_remove(self, endpoint: Endpoint, frame: Frame) -> None:
        self.remove_peer(frame.sender[0])  # type: ignore[index]  # checked by Router.handle()

    def remove_peer(self, peer_id: str) -> None:
        core = self.core
        peer = core.peers.pop(peer_id, None)
        if peer is None:
            return
        peer.endpoint.peers.pop(peer_id, None)
        for channel in list(peer.channels):
            core.unsubscribe(peer, channel, 0)
        core.spies.peer_gone(peer_id)
        core.groups.peer_gone(peer_id)
        core.service_hosts.peer_gone(peer)
        core.requests.receiver_gone(peer_id, f"peer {peer.name!r} ({peer_id}) has left the bus")
        core.requests.requester_gone(peer)
        if core.federation is not None:
            tell_federation(core, peer.endpoint, P.encode_frame(Kind.PEER_REMOVE, sender=peer.info))
        if core.upstream is not None and peer.endpoint is not core.upstream:
            core.upstream.deliver(P.encode_frame(Kind.PEER_REMOVE, sender=peer.info), [])
