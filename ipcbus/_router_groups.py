"""The router's groups: who is a member of which group of a channel, and who gets a message.

Pure, like the router (``_router.Router`` owns one :class:`GroupRouter`). A peer joins a
group of a channel with a SUBSCRIBE whose body is the group's name (``_protocol``: the byte
table); its membership is reference counted apart from its plain subscription, so a peer
that is only a member does not get the channel's other messages. The rules:

* A message (SEND) or a request (REQUEST, REQUEST_ALL) on a channel with groups goes, as it
  came, to the channel's plain subscribers, and to ONE member of each group, wrapped in a
  GROUPED frame that names the group (so the member's process runs only that group's
  listeners). The member chosen has the fewest requests in progress, ties in turn
  (``_groups.GroupTurns``).
* Requests in progress: the grouped requests a member was given that the bus's request table
  still expects it to answer. They are counted here, not in the table: the plain path pays
  nothing, and a member's count is pruned of settled requests when it is next weighed.
* Posts (messages with descriptors, acknowledged messages) go to plain subscribers only.
* Through a bridge's link the group is one pool, balanced by the root of the bus: a linked
  bridge subscribes its members upstream (SUBSCRIBE with the group, as it does plain
  subscriptions) and never chooses itself; the broker chooses among every member of the bus,
  those behind the link a message came from included, and sends GROUPED down the link; the
  bridge hands it to the member (``MessageRouter.on_grouped``: only from upstream), taking
  it as a receiver of the request, and sends a member's answer to a request of its own side
  upstream too, so the broker's entry (and the member's load) ends. A bridge without a link
  chooses among its own members, like a broker.
* Trust: a group name is checked like a channel name (length, no control characters); a peer
  is given a GROUPED frame only for a group it joined, and a receiver's answer is taken only
  because the table holds it as a receiver (``_router_requests``).
"""
from __future__ import annotations

import struct
from typing import Any, Callable, Iterator

from . import _protocol as P
from ._groups import GroupTurns
from ._protocol import Frame, Kind
from .errors import IpcBusProtocolError

Endpoint = Any  # _routing.Endpoint and Peer (not imported: _routing names this module)
Peer = Any

__all__ = ["GroupRouter", "group_of", "grouped_frame", "carried_at"]

Key = tuple[str, int]
_U8, _U16, _U32 = struct.Struct(">B"), struct.Struct(">H"), struct.Struct(">I")


def group_of(frame: Frame) -> str | None:
    """The group a SUBSCRIBE / UNSUBSCRIBE is for (None: a plain subscription);
    IpcBusProtocolError if its body is not a valid group name."""
    if frame.body_offset >= len(frame.raw):
        return None
    try:
        group = P.unpack_payload(memoryview(frame.raw)[frame.body_offset:])
    except IpcBusProtocolError as exc:
        raise IpcBusProtocolError(f"{Kind(frame.kind).name}: malformed group: {exc}") from None
    problem = P.group_problem(group)
    if problem is not None:
        raise IpcBusProtocolError(f"{Kind(frame.kind).name}: {problem}")
    assert isinstance(group, str)
    return group


class GroupRouter:
    """The groups of one router's channels."""

    def __init__(self, core: Any) -> None:
        # channel -> group -> member peer id -> references (members in the order they joined)
        self.channels: dict[str, dict[str, dict[str, int]]] = {}
        self.of_peer: dict[str, set[tuple[str, str]]] = {}  # peer id -> (channel, group)
        self.turns = GroupTurns()
        self._given: dict[str, set[Key]] = {}  # member -> grouped requests it was given
        self._frames: dict[tuple[str, str, str], tuple[bytes, bytes]] = {}  # grouped_frame
        self.core = core  # the router (_routing.RouterCore)
        # a linked bridge: (request, member) it handed a member as the broker chose
        self.via_upstream: set[tuple[Key, str]] = set()
        # the hot paths test these objects (never replaced) without going through us
        core.requests.grouped = core.messages.grouped = self.channels
        core.requests.via_upstream = self.via_upstream

    def __len__(self) -> int:
        return len(self.channels)

    # -- membership ---------------------------------------------------------------------------
    def join(self, peer_id: str, channel: str, group: str, count: int) -> None:
        members = self.channels.setdefault(channel, {}).setdefault(group, {})
        before = members.get(peer_id, 0)
        if before + count > P.MAX_SUBSCRIBE_COUNT:
            raise IpcBusProtocolError(f"{before + count} references to group {group!r} of"
                                      f" {channel!r}, over the limit")
        members[peer_id] = before + count
        self.of_peer.setdefault(peer_id, set()).add((channel, group))

    def leave(self, peer_id: str, channel: str, group: str, count: int) -> None:
        """Remove ``count`` references (0: all) of ``peer_id`` to ``group`` of ``channel``."""
        groups = self.channels.get(channel)
        members = groups.get(group) if groups is not None else None
        if members is None or peer_id not in members:
            return
        after = 0 if count == 0 else max(members[peer_id] - count, 0)
        if after:
            members[peer_id] = after
            return
        del members[peer_id]
        joined = self.of_peer.get(peer_id)
        if joined is not None:
            joined.discard((channel, group))
            if not joined:
                del self.of_peer[peer_id]
        if not members:
            del groups[group]  # type: ignore[union-attr]
            self.turns.forget(channel, group)
            if not groups:
                del self.channels[channel]

    def on_subscribe(self, peer: Peer, frame: Frame, count: int) -> None:
        """A SUBSCRIBE with a group (its sender checked by the router)."""
        group, channel = group_of(frame), frame.channel
        assert group is not None
        if count > P.MAX_SUBSCRIBE_STEP or (channel.startswith(P.RESERVED_PREFIX) and \
                not self.core.service_hosts.may_join(peer.id, channel, group)):  # a pool host
            raise IpcBusProtocolError(f"SUBSCRIBE to group {group!r} of {channel!r}: a"
                                      " reserved channel (not the call channel of a service"
                                      " this peer hosts in that group), or too many"
                                      " references")
        if peer.id not in self.of_peer and len(peer.channels) >= P.MAX_CHANNELS_PER_PEER:
            raise IpcBusProtocolError(f"peer {peer.id!r} listens to too many channels")
        first = peer.id not in self.channels.get(channel, {}).get(group, {})
        self.join(peer.id, channel, group, count)
        if first and self.core.requests.waits:  # held wait_for_listeners requests
            self.core.requests.special.listeners_added(channel)
        upstream = self.core.upstream
        if first and upstream is not None and peer.endpoint is not upstream:
            upstream.deliver(P.encode_frame(Kind.SUBSCRIBE, channel, peer.info, None, 1,
                                            P.pack_payload(group)), [])
        federation = self.core.federation
        if first and federation is not None and peer.endpoint is not federation:
            federation.deliver(P.encode_frame(Kind.SUBSCRIBE, channel, peer.info, None, 1,
                                              P.pack_payload(group)), [])

    def on_unsubscribe(self, peer: Peer, frame: Frame) -> bool:
        """An UNSUBSCRIBE: True if it was for a group (handled), False if plain."""
        group = group_of(frame)
        if group is None:
            return False
        self.leave(peer.id, frame.channel, group, frame.rid)
        left = peer.id not in self.channels.get(frame.channel, {}).get(group, {})
        for above in (self.core.upstream, self.core.federation):
            if above is not None and peer.endpoint is not above and left:
                above.deliver(P.encode_frame(Kind.UNSUBSCRIBE, frame.channel, peer.info, None,
                                             0, P.pack_payload(group)), [])
        return True

    def answered_below(self, key: Key, answerer: str, raw: bytes | bytearray) -> None:
        """A linked bridge: a member the broker chose for ``key`` answered here; the broker
        takes its entry (and its member's load) only when it sees the answer too."""
        if (key, answerer) in self.via_upstream:
            self.via_upstream.discard((key, answerer))
            upstream = self.core.upstream
            if upstream is not None:
                upstream.deliver(raw, [])

    def gathered_below(self, key: Key, answerer: str, raw: bytes | bytearray) -> bool:
        """A linked bridge: a member the broker chose answered a REQUEST_ALL of this side.
        Its answer goes to the broker only (True), which drops the member from its own
        gathering and hands the answer back as one of its side's (so it reaches the
        requester once, and the broker's end is not held up by an answer it never saw)."""
        upstream = self.core.upstream
        if upstream is None or (key, answerer) not in self.via_upstream:
            return False  # (a federated broker's choices are answered here: no upstream)
        self.via_upstream.discard((key, answerer))
        self.core.requests.table.drop_receiver(key, answerer)  # UPSTREAM stays: not the last
        upstream.deliver(raw, [])
        return True

    def failed_below(self, key: Key, endpoint: Endpoint, raw: bytes | bytearray) -> None:
        """A linked bridge: a receiving process failed ``key`` (REQUEST_FAIL ``raw``, its
        listeners raised): a member the broker chose there is a receiver of the broker's
        entry too, which must hear it (else it waits for the timeout)."""
        chosen = [m for m in endpoint.peers if (key, m) in self.via_upstream]
        upstream = self.core.upstream
        if chosen and upstream is not None:
            for member in chosen:
                self.via_upstream.discard((key, member))
            upstream.deliver(raw, [])

    def handed_below(self, key: Key, member: str) -> None:
        if len(self.via_upstream) > 4096:  # settled otherwise (a timeout, a cancel)
            table = self.core.requests.table
            for entry in [e for e in self.via_upstream if not table.may_answer(*e)]:
                self.via_upstream.discard(entry)
        self.via_upstream.add((key, member))

    def peer_gone(self, peer_id: str) -> None:
        if peer_id not in self.of_peer:
            self._given.pop(peer_id, None)
            return
        for channel, group in list(self.of_peer.get(peer_id, ())):
            self.leave(peer_id, channel, group, 0)
        self._given.pop(peer_id, None)

    def listening(self, channel: str) -> int:
        """How many peers listen on ``channel``: plainly, or as a member of a group."""
        subs = self.core.subscribers.get(channel, {})
        groups = self.channels.get(channel)
        if not groups:
            return len(subs)
        return len(set(subs).union(*groups.values()))

    def counts(self) -> dict[str, dict[str, int]]:
        """channel -> group -> number of members (for the bus's state)."""
        return {channel: {g: len(m) for g, m in groups.items()}
                for channel, groups in self.channels.items()}

    # -- choosing -----------------------------------------------------------------------------
    def answered(self, key: Key, member: str) -> None:
        """``member`` answered ``key``: its load drops now (other ends of a request, a
        timeout or a cancel, are pruned when the member is next weighed)."""
        given = self._given.get(member)
        if given:
            given.discard(key)

    def load(self, peer_id: str) -> int:
        """The grouped requests ``peer_id`` was given and has not answered yet."""
        given = self._given.get(peer_id)
        if not given:
            return 0
        may_answer = self.core.requests.table.may_answer
        for key in [k for k in given if not may_answer(k, peer_id)]:
            given.discard(key)
        return len(given)

    def choose(self, channel: str, skip: Callable[[str], bool] | None = None
               ) -> Iterator[tuple[str, str]]:
        """(group, member) for each group of ``channel``: the member that gets the next
        message (``skip``: members that may not get this one, e.g. behind the relay it came
        from; a group with no other member is passed over)."""
        for group, members in self.channels.get(channel, {}).items():
            names = list(members) if skip is None else [m for m in members if not skip(m)]
            if names:
                yield group, self.turns.choose(channel, group, names, self.load)

    def members_for(self, channel: str, source: Endpoint, peers: dict[str, Peer],
                    receivers: set[str], grouped: list[tuple[str, str]]) -> None:
        """Add the member chosen in each group of ``channel`` to ``receivers`` and
        (group, member) to ``grouped``. Only the root of the bus chooses: a linked bridge
        subscribes its members upstream and hands on the broker's choices
        (``answered_below``), and the broker chooses among every member, those behind the
        link a message came from included (the bridge did not serve them)."""
        if self.core.upstream is not None or source is self.core.federation:
            return  # (a federated message: its origin broker chose among every member)
        for group, member in self.choose(channel):
            receivers.add(member)
            grouped.append((group, member))

    def hand(self, key: Key | None, channel: str, raw: bytes | bytearray,
             grouped: list[tuple[str, str]], peers: dict[str, Peer]) -> None:
        """Deliver the frame ``raw`` to each chosen (group, member), wrapped in GROUPED;
        ``key``: the request it is (counted in the member's load), None for a broadcast."""
        for group, member in grouped:
            if key is not None:
                self._given.setdefault(member, set()).add(key)
            peers[member].endpoint.deliver(
                grouped_frame(channel, member, group, raw, self._frames), [])


def grouped_frame(channel: str, target: str, group: str, raw: bytes | bytearray,
                  cache: dict[tuple[str, str, str], tuple[bytes, bytes]] | None = None
                  ) -> bytes:
    """The GROUPED frame that hands a frame (its bytes ``raw`` as they came) to ``target``:
    its body is the msgpack array ``[group, raw]``, built around ``raw`` without packing it
    again. ``cache`` keeps the header and the body's start per (channel, target, group)."""
    key = (channel, target, group)
    parts = cache.get(key) if cache is not None else None
    if parts is None:
        parts = (P.encode_header(Kind.GROUPED, channel, None, target, 0),
                 b"\x92" + P.pack_payload(group))  # fixarray of 2, then the group's str
        if cache is not None:
            if len(cache) >= 4096:
                cache.clear()
            cache[key] = parts
    header, start = parts
    n = len(raw)
    size = b"\xc4" + _U8.pack(n) if n < 0x100 else b"\xc5" + _U16.pack(n) if n < 0x10000 \
        else b"\xc6" + _U32.pack(n)  # msgpack bin 8 / 16 / 32
    body_len = len(start) + len(size) + n
    return b"".join((P.PREFIX.pack(len(header), body_len, 0), header, start, size, raw))


def carried_at(raw: bytes | bytearray) -> int | None:
    """Where the frame that the GROUPED frame ``raw`` carries starts in ``raw`` (the form
    :func:`grouped_frame` builds: a body of fixarray 2, the group as a msgpack str, the
    frame as a msgpack bin that ends the frame), or None if ``raw`` is not of that form. A
    hub (``_hub_shm``) looks at the carried frame this way without copying it."""
    try:
        hlen, blen, _ = P.PREFIX.unpack_from(raw, 0)
        at = P.PREFIX_SIZE + hlen
        if at + blen != len(raw) or raw[at] != 0x92:
            return None
        tag = raw[at + 1]
        if 0xA0 <= tag <= 0xBF:  # fixstr, str 8 / 16
            at += 2 + (tag & 0x1F)
        elif tag == 0xD9:
            at += 3 + raw[at + 2]
        elif tag == 0xDA:
            at += 4 + _U16.unpack_from(raw, at + 2)[0]
        else:
            return None
        tag = raw[at]
        if tag == 0xC4:  # bin 8 / 16 / 32
            n, at = raw[at + 1], at + 2
        elif tag == 0xC5:
            n, at = _U16.unpack_from(raw, at + 1)[0], at + 3
        elif tag == 0xC6:
            n, at = _U32.unpack_from(raw, at + 1)[0], at + 5
        else:
            return None
    except (IndexError, struct.error):
        return None
    return at if at + n == len(raw) else None


def frame_bytes(frame: Frame) -> list[bytes | bytearray]:
    """The bytes of each frame of ``frame`` (one, or each of a run)."""
    raw = frame.raw
    if frame.count == 1:
        return [raw]
    out = []
    offset, size = 0, len(raw)
    while offset < size:
        hlen, blen, _ = P.PREFIX.unpack_from(raw, offset)
        end = offset + P.PREFIX_SIZE + hlen + blen
        out.append(raw[offset:end])
        offset = end
    return out
