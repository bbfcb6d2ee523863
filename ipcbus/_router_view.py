"""Looking into the router: spies, channel statistics and the state of the bus.

Pure, like the router. *Observers* (``Router.observers``) see every message a peer sends,
after it is routed; with none attached the cost is one truth test per frame. :class:`Spies`
is the observer the router feeds for spy peers (SPY_ADD): each gets a copy of every routed
message (its bytes, undecoded) on channels matching its glob, or a notice when a copy would
be over the message limit. :class:`ChannelStats` counts messages and bytes per channel
(bounded: unheard channels are forgotten first). :func:`bus_state` is the answer to
``/ipcbus/queryState``.
"""
from __future__ import annotations

import fnmatch
from typing import Any

from . import _protocol as P
from ._protocol import Frame, Kind
from ._routing import Endpoint, Observer, Peer, RouterCore, answer_frame

__all__ = ["Spies", "ChannelStats", "bus_state"]

MAX_CHANNEL_STATS = 10_000


class Spies:
    """The spies of one router: spy peer id -> channel glob ("" = every channel)."""

    def __init__(self, core: RouterCore, observers: list[Observer]) -> None:
        self.core = core
        self.observers = observers  # the router's: the mirror is one while a spy is attached
        self.patterns: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.patterns)

    def on_add(self, endpoint: Endpoint, frame: Frame) -> None:
        peer = self.core.sender_of(endpoint, frame)
        if not self.patterns:
            self.observers.append(self.mirror)
        self.patterns[peer.id] = frame.channel
        endpoint.deliver(answer_frame(peer.id, frame.rid, None), [])

    def on_remove(self, endpoint: Endpoint, frame: Frame) -> None:
        self.peer_gone(self.core.sender_of(endpoint, frame).id)

    def peer_gone(self, peer_id: str) -> None:
        if self.patterns.pop(peer_id, None) is not None and not self.patterns:
            self.observers.remove(self.mirror)

    def mirror(self, endpoint: Endpoint, frame: Frame) -> None:
        """Give every interested spy a copy of a routed message (its bytes, undecoded); a
        copy over the message limit is replaced by a notice to that spy."""
        core = self.core
        copy: bytes | None = None
        for spy_id, pattern in self.patterns.items():
            if pattern and not fnmatch.fnmatchcase(frame.channel, pattern):
                continue
            spy = core.peers.get(spy_id)
            if spy is None:
                continue
            if len(frame.raw) > core.max_message:
                core.dropped["spy_copies_over_limit"] += 1
                spy.endpoint.deliver(P.notice_frame(spy_id, error=(
                    f"spy: a message on {frame.channel!r} of {len(frame.raw)} bytes is over"
                    f" the message limit of {core.max_message}: not copied"),
                    channel=frame.channel), [])
                continue
            if copy is None:
                copy = bytes(frame.raw)
            spy.endpoint.deliver(P.encode_frame(Kind.SPY_COPY, frame.channel, None, spy_id, 0,
                                                copy), [])


class ChannelStats:
    """Messages and bytes sent, per peer and per channel."""

    def __init__(self, subscribers: dict[str, dict[str, int]]) -> None:
        self.subscribers = subscribers  # the router's: channels with listeners are kept first
        self.channels: dict[str, list[int]] = {}  # channel -> [messages, bytes]

    def count(self, peer: Peer, frame: Frame) -> None:
        size = len(frame.raw)
        peer.sent_msgs += frame.count
        peer.sent_bytes += size
        stats = self.channels.get(frame.channel)
        if stats is None:
            if len(self.channels) >= MAX_CHANNEL_STATS:  # forget unheard channels first
                for channel in [c for c in self.channels if c not in self.subscribers]:
                    del self.channels[channel]
                if len(self.channels) >= MAX_CHANNEL_STATS:
                    return
            stats = self.channels[frame.channel] = [0, 0]
        stats[0] += frame.count
        stats[1] += size


def bus_state(core: RouterCore, pending_by_peer: dict[str, int], pending: int, spies: int,
              channel_stats: dict[str, list[int]]) -> dict[str, Any]:
    """The bus as a router sees it."""
    return {
        "pid": core.pid,
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
            for p in core.peers.values()
        ],
        "channels": {ch: len(subs) for ch, subs in core.subscribers.items()},
        "channel_stats": {ch: {"messages": m, "bytes": b,
                               "subscribers": len(core.subscribers.get(ch, ()))}
                          for ch, (m, b) in channel_stats.items()},
        "services": core.service_hosts.state(),  # a pool: its members' ids
        # channel -> group -> member ids, in the order they joined (_router_groups)
        "groups": {channel: {group: list(members) for group, members in groups.items()}
                   for channel, groups in core.groups.channels.items()},
        "dropped": dict(core.dropped),
        "spies": spies,
        "pending_requests": pending,
    }
