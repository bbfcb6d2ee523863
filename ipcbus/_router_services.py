"""The router's services: which peer hosts which service name.

Pure, like the router (``_router.Router`` owns one :class:`ServiceRouter`; its ``hosts`` dict
is the router's ``services``). The rules:

* The root of the bus (a broker, or a bridge without a link) keeps the bus's services: a
  SERVICE_ADD is answered like a request, refused when another peer hosts the name. A linked
  bridge asks the broker (the request is forwarded and the broker's answer grants the name
  on this side too, ``RequestRouter.on_response``).
* Only the hub tells a service's proxies that it stopped (a SERVICE_REMOVE, or its host
  leaving): it broadcasts ``["stop", reason]`` on the service's event channel, once the name
  is free.
* Calls on a service's call channel go to its host only (``host_of``), and only the host (and
  the hub) may broadcast on its event channel (``_router_messages``).
"""
from __future__ import annotations

from typing import Any

from . import _protocol as P
from ._protocol import Frame
from ._routing import Endpoint, Peer, answer_frame, fail_frame, tell_federation
from .errors import IpcBusProtocolError

__all__ = ["ServiceRouter"]


class ServiceRouter:
    """SERVICE_ADD / SERVICE_REMOVE, and the services of peers that leave."""

    def __init__(self, core: Any) -> None:
        self.core = core  # the router (_routing.RouterCore)
        self.hosts: dict[str, str] = {}  # service name -> host peer id

    def host_of(self, name: str, default: str | None) -> str | None:
        """The peer a call to service ``name`` goes to (``default`` when this side does not
        know its host)."""
        return self.hosts.get(name, default)

    def on_add(self, endpoint: Endpoint, frame: Frame) -> None:
        core = self.core
        peer = core.sender_of(endpoint, frame)
        name = frame.channel
        if not name:
            raise IpcBusProtocolError("SERVICE_ADD without a name")
        if core.upstream is not None:
            # The broker keeps the bus's services: ask it, as a request it answers.
            core.requests.forwarded((peer.id, frame.rid), endpoint, name, service=name)
            core.upstream.deliver(frame.raw, [], frame.count)
            return
        host = self.hosts.get(name)
        if host is not None and host != peer.id:
            owner = core.peers.get(host)
            endpoint.deliver(fail_frame(peer.id, frame.rid, (
                f"a service named {name!r} is already started by"
                f" {owner.name if owner else host!r} ({host})")), [])
            return
        self.hosts[name] = peer.id
        endpoint.deliver(answer_frame(peer.id, frame.rid, None), [])
        tell_federation(core, endpoint, P.encode_frame(P.Kind.SERVICE_ADD, name, peer.info))

    def on_remove(self, endpoint: Endpoint, frame: Frame) -> None:
        core = self.core
        peer = core.sender_of(endpoint, frame)
        name = frame.channel
        if core.upstream is not None:  # the broker releases the name and tells the bus
            if self.hosts.get(name) == peer.id:
                del self.hosts[name]
            core.upstream.deliver(frame.raw, [], frame.count)
        elif self.hosts.get(name) == peer.id:
            del self.hosts[name]
            tell_federation(core, endpoint, P.encode_frame(P.Kind.SERVICE_REMOVE, name, peer.info))
            # The hub, not the host, tells the proxies: only the hub (and a host) may send on
            # the event channel, and the name is free by the time they hear it.
            self._tell_stopped(name, f"service {name!r} was stopped by its host")

    def peer_gone(self, peer: Peer) -> None:
        """``peer`` left the bus: the services it hosted stop."""
        for name, host in list(self.hosts.items()):
            if host == peer.id:
                del self.hosts[name]
                if self.core.upstream is None:  # else the broker tells the whole bus
                    self._tell_stopped(name, f"the host of service {name!r} ({peer.name}) has"
                                             " left the bus")

    def _tell_stopped(self, name: str, reason: str) -> None:
        self.core.messages.broadcast(P.service_event_channel(name),
                                     P.pack_payload(["stop", reason]))
