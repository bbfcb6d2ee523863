"""The router's services: which peer hosts which service name, and the pools that share one.

Pure, like the router (``_router.Router`` owns one :class:`ServiceRouter`; its ``hosts`` dict
is the router's ``services``). The rules:

* The root of the bus (a broker, or a bridge without a link) keeps the bus's services: a
  SERVICE_ADD is answered like a request, refused when another peer hosts the name. A linked
  bridge asks the broker (the request is forwarded and the broker's answer grants the name
  on this side too, ``RequestRouter.on_response`` -> :meth:`ServiceRouter.granted`).
* A service hosted by a group (a *pool*: SERVICE_ADD whose body is the group's name, like a
  group's SUBSCRIBE): every host that adds the same name with the same group is a member;
  the answer is the number of members (1: the first, which tells the proxies "start"). A
  name hosted without a group stays exclusive; mixing, or another group, is refused with a
  clear reason. ``hosts[name]`` is then one member (the oldest), so that "is the service
  started" reads the same for both kinds; ``pools`` holds the group and every member.
* A pool's members listen on the call channel as members of its group (a group
  subscription on a reserved channel is allowed for them only: :meth:`may_join`). A call
  (REQUEST on the call channel) goes to ONE member, chosen by the root like any group's
  (``_router_groups``: fewest calls in progress, ties in turn) and handed in GROUPED, so
  through a bridge and its link the broker chooses among all members; plain subscribers of
  the call channel never get a pool's calls (:meth:`route_call`), and only the chosen
  member may answer (the request table holds it as the one receiver).
* Only the hub tells a service's proxies that it stopped (a SERVICE_REMOVE, or its host
  leaving): it broadcasts ``["stop", reason]`` on the service's event channel, once the name
  is free: for a pool, when its last member leaves.
* Calls on an exclusive service's call channel go to its host only (``host_of``), and only a
  host (any member of a pool) and the hub may broadcast on its event channel (:meth:`is_host`,
  used by ``_router_messages``).
"""
from __future__ import annotations

from typing import Any

from . import _protocol as P
from ._protocol import Frame
from ._router_groups import group_of
from ._routing import (UPSTREAM, Endpoint, Peer, Pending, answer_frame, fail_frame,
                       tell_federation)
from .errors import IpcBusProtocolError

__all__ = ["ServiceRouter", "pool_refusal"]

Key = tuple[str, int]


def pool_refusal(name: str, group: str | None, host: str | None,
                 pool: tuple[str, dict[str, None]] | None, peer_id: str,
                 owner: str = "") -> str | None:
    """Why ``peer_id`` may not host service ``name`` with ``group`` (None: it may), given
    its exclusive ``host`` (described as ``owner``) and its ``pool`` (group, members)."""
    if pool is not None:
        if group is None:
            return (f"a service named {name!r} is hosted by group {pool[0]!r}: start it with"
                    f" group={pool[0]!r} to join it")
        if group != pool[0]:
            return f"a service named {name!r} is hosted by group {pool[0]!r}, not {group!r}"
        return None
    if host is None or (host == peer_id and group is None):
        return None
    if group is not None:
        return (f"a service named {name!r} is already started by {owner} without a group:"
                f" it cannot be hosted by group {group!r}")
    return f"a service named {name!r} is already started by {owner}"


class ServiceRouter:
    """SERVICE_ADD / SERVICE_REMOVE, pools' calls, and the services of peers that leave."""

    def __init__(self, core: Any) -> None:
        self.core = core  # the router (_routing.RouterCore)
        self.hosts: dict[str, str] = {}  # service name -> host peer id (a pool: its oldest)
        self.pools: dict[str, tuple[str, dict[str, None]]] = {}  # name -> (group, members)
        self._asked: dict[Key, str] = {}  # a linked bridge: pool SERVICE_ADDs sent upstream

    def host_of(self, name: str, default: str | None) -> str | None:
        """The peer a call to service ``name`` goes to (``default`` when this side does not
        know its host)."""
        return self.hosts.get(name, default)

    def is_host(self, name: str, peer_id: str | None) -> bool:
        """Whether ``peer_id`` hosts service ``name`` (any member of its pool)."""
        if peer_id is None:
            return False
        if self.hosts.get(name) == peer_id:
            return True
        pool = self.pools.get(name)
        return pool is not None and peer_id in pool[1]

    def may_join(self, peer_id: str, channel: str, group: str) -> bool:
        """May ``peer_id`` join ``group`` of the reserved ``channel``? Only a member of the
        pool of the service whose call channel it is, in the pool's group."""
        if not channel.startswith(P.SERVICE_CALL_PREFIX):
            return False
        pool = self.pools.get(channel[len(P.SERVICE_CALL_PREFIX):])
        return pool is not None and pool[0] == group and peer_id in pool[1]

    # -- adding and removing ------------------------------------------------------------------
    def on_add(self, endpoint: Endpoint, frame: Frame) -> None:
        core = self.core
        peer = core.sender_of(endpoint, frame)
        name = frame.channel
        if not name:
            raise IpcBusProtocolError("SERVICE_ADD without a name")
        group = group_of(frame)  # the pool's group (None: an exclusive service)
        if core.upstream is not None:
            # The broker keeps the bus's services: ask it, as a request it answers.
            core.requests.forwarded((peer.id, frame.rid), endpoint, name, service=name)
            if group is not None:
                self._remember_asked((peer.id, frame.rid), group)
            core.upstream.deliver(frame.raw, [], frame.count)
            return
        host = self.hosts.get(name)
        owner = core.peers.get(host) if host is not None else None
        problem = pool_refusal(name, group, host, self.pools.get(name), peer.id,
                               f"{owner.name if owner else host!r} ({host})")
        if problem is not None:
            endpoint.deliver(fail_frame(peer.id, frame.rid, problem), [])
            return
        if group is None:
            self.hosts[name] = peer.id
            endpoint.deliver(answer_frame(peer.id, frame.rid, None), [])
        else:
            endpoint.deliver(answer_frame(peer.id, frame.rid, self._join(name, group, peer.id)),
                             [])
        if core.federation is not None:  # (rid 0: the other brokers answer the link)
            tell_federation(core, endpoint, P.encode_frame(
                P.Kind.SERVICE_ADD, name, peer.info, None, 0, bytes(frame.body)))

    def _remember_asked(self, key: Key, group: str) -> None:
        if len(self._asked) > 1024:  # refused or abandoned asks: forget those settled
            table = self.core.requests.table
            for old in [k for k in self._asked if k not in table]:
                del self._asked[old]
        self._asked[key] = group

    def granted(self, name: str, peer_id: str, key: Key) -> None:
        """A linked bridge: the broker granted ``name`` to ``peer_id`` (its SERVICE_ADD
        ``key``); this side records it, in the pool if it asked for a group."""
        group = self._asked.pop(key, None)
        if group is None:
            self.hosts[name] = peer_id
        elif self.pools.get(name, (group,))[0] == group:
            self._join(name, group, peer_id)

    def _join(self, name: str, group: str, peer_id: str) -> int:
        """Add ``peer_id`` to the pool of ``name``; the number of members now."""
        members = self.pools.setdefault(name, (group, {}))[1]
        members[peer_id] = None
        self.hosts.setdefault(name, peer_id)
        return len(members)

    def _leave(self, name: str, peer_id: str) -> bool | None:
        """Take ``peer_id`` out of the pool of ``name``: None if it was no member, else
        whether it was the last (the service has stopped)."""
        pool = self.pools.get(name)
        if pool is None or peer_id not in pool[1]:
            return None
        members = pool[1]
        del members[peer_id]
        # no longer a member: no more calls (the hub, not the host, ends its listening)
        self.core.groups.leave(peer_id, P.service_call_channel(name), pool[0], 0)
        if members:
            if self.hosts.get(name) == peer_id:
                self.hosts[name] = next(iter(members))
            return False
        del self.pools[name]
        self.hosts.pop(name, None)
        return True

    def on_remove(self, endpoint: Endpoint, frame: Frame) -> None:
        core = self.core
        peer = core.sender_of(endpoint, frame)
        name = frame.channel
        if name in self.pools:
            last = self._leave(name, peer.id)
            if core.upstream is not None:
                core.upstream.deliver(frame.raw, [], frame.count)
                return
            if last is not None:
                tell_federation(core, endpoint, P.encode_frame(P.Kind.SERVICE_REMOVE, name,
                                                               peer.info))
            if last:
                self._tell_stopped(name, f"service {name!r} was stopped by its last host")
        elif core.upstream is not None:  # the broker releases the name and tells the bus
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
        """``peer`` left the bus: the services it hosted stop (a pool's when it was the
        last member)."""
        root = self.core.upstream is None  # else the broker tells the whole bus
        for name in [n for n, (_, members) in self.pools.items() if peer.id in members]:
            if self._leave(name, peer.id) and root:
                self._tell_stopped(name, f"the last host of service {name!r} ({peer.name})"
                                         " has left the bus")
        for name, host in list(self.hosts.items()):
            if host == peer.id:
                del self.hosts[name]
                if root:
                    self._tell_stopped(name, f"the host of service {name!r} ({peer.name}) has"
                                             " left the bus")
        for key in [k for k in self._asked if k[0] == peer.id]:
            del self._asked[key]

    def _tell_stopped(self, name: str, reason: str) -> None:
        self.core.messages.broadcast(P.service_event_channel(name),
                                     P.pack_payload(["stop", reason]))

    # -- a pool's calls -----------------------------------------------------------------------
    def route_call(self, endpoint: Endpoint, frame: Frame) -> None:
        """A REQUEST on the call channel of a pool (from a peer of this side): to ONE
        member, as a group's request (the root chooses; a linked bridge asks the broker).
        Plain subscribers of the call channel are not receivers."""
        core = self.core
        requester = frame.sender_id
        assert requester is not None  # checked by Router.handle()
        key = (requester, frame.rid)
        table = core.requests.table
        if key in table:
            raise IpcBusProtocolError(f"request id {frame.rid} reused while pending")
        channel = frame.channel
        upstream = core.upstream
        if upstream is not None:
            table.add(key, Pending(requester, endpoint, channel), receivers={UPSTREAM})
            upstream.deliver(frame.raw, [], frame.count)
            return
        if not core.requests.to_members(key, endpoint, frame):
            endpoint.deliver(fail_frame(requester, frame.rid, (
                f"service {channel[len(P.SERVICE_CALL_PREFIX):]!r} has no host listening")),
                [])

    def state(self) -> dict[str, Any]:
        """name -> host id (exclusive) or the list of members' ids (a pool), for the state."""
        out: dict[str, Any] = dict(self.hosts)
        for name, (_, members) in self.pools.items():
            out[name] = list(members)
        return out
