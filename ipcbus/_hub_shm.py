"""A hub's side of large payloads through shared memory (SPEC "Large payloads through
shared memory"; the frames are described at ``_protocol.Kind.SHM_ARENA``).

The hub hands slot references on and keeps the books; it never reads a payload it forwards:

* A connection announces its arena once (SHM_ARENA with a sealed memfd): the hub checks the
  descriptor (``_shm_arena.check_arena``: a memfd sealed against shrinking and growing, of
  the size announced), gives the arena an id and keeps the descriptor.
* SHM_MESSAGE carries the slots of the connection's *own* arena (no connection can name
  another's) and a SEND, SEND_TO, REQUEST, REQUEST_ALL or RESPONSE frame with
  placeholders. The slots are checked (``_shm_slots.SlotTable``: inside the arena, no overlap with a slot in flight) and the
  inner frame is routed as any message, while :attr:`Hub.shm_active` is set: every receiving
  endpoint (``HubEndpoint.deliver`` calls :meth:`HubShm.attach`) first gets the arena's
  descriptor if it never had it (SHM_ARENA), then the slots (SHM_SLOTS), then the message.
  A group's chosen member (SEND, REQUEST, REQUEST_ALL on a channel with groups) is given
  the slots the same way, then the GROUPED frame that carries the message with its
  placeholders (``_router_groups.carried_at`` finds it without copying): its client
  resolves them as for a plain message.
  An answer the router drops (a late one: the first answer won; one from a peer that was
  not a receiver; its requester has gone) reaches nobody: its slots are freed at once.
  A broadcast to N receivers writes the payload once, in the sender.
* A receiver holds each slot it was given until its SHM_RELEASE; what it holds counts in its
  queue's bytes (``out_bytes``): a stuck receiver holds the sender through back-pressure and
  becomes a slow consumer as with any queue. Releasing what it does not hold is its protocol
  error. When nobody holds a slot any more, SHM_FREE gives it back to the arena's owner.
* Receivers that cannot map the memfd (TCP, a bridge's link, a connection that asked for
  inline delivery with an arena of size 0) get the message with its bytes inline, in the
  GROUPED frame too when one is a group's member: for them only, the hub maps the arena
  and builds the inline frame once per message (and its GROUPED around it per member). A
  spy's copy (SPY_COPY) always gets the bytes inline: spies are rare, and keeping them
  simple costs nothing to anyone else.
* A connection that ends releases what it held; an arena whose owner ends is closed here
  and its holders are told (SHM_ARENA without descriptor) so they unmap it: the memfd's pages
  go with the last mapping.
"""
from __future__ import annotations

import logging
import mmap
import os
from typing import TYPE_CHECKING, Any

import msgpack

from . import _protocol as P
from ._arrays import ARRAY_EXT, ARRAY_SLOT_EXT
from ._decoder import FrameDecoder
from ._protocol import Kind
from ._router_groups import carried_at
from ._shm_arena import check_arena, map_readonly
from ._shm_slots import EXT_CODE, SlotTable, ext_index
from ._transport import close_fds
from .errors import IpcBusProtocolError

if TYPE_CHECKING:
    from ._hub_endpoint import HubEndpoint

__all__ = ["HubShm", "ActiveMessage"]

log = logging.getLogger("ipcbus")

_GROUPED, _SPY_COPY = int(Kind.GROUPED), int(Kind.SPY_COPY)
# what SHM_MESSAGE may wrap: messages, requests and answers (their receivers hold the slots)
_MESSAGES = frozenset({int(Kind.SEND), int(Kind.SEND_TO), int(Kind.REQUEST),
                       int(Kind.REQUEST_ALL), int(Kind.RESPONSE)})


class _Arena:
    __slots__ = ("id", "owner", "fd", "size", "table", "holders", "mapping")

    def __init__(self, arena_id: int, owner: HubEndpoint, fd: int, size: int) -> None:
        self.id = arena_id
        self.owner = owner
        self.fd = fd
        self.size = size
        self.table = SlotTable(size)
        self.holders: set[HubEndpoint] = set()  # endpoints that were given the descriptor
        self.mapping: mmap.mmap | None = None  # only to inline for receivers that cannot map


class ActiveMessage:
    """The message being routed with its slots (:attr:`Hub.shm_active`)."""

    __slots__ = ("arena", "slots", "raw", "slots_frame", "inline")

    def __init__(self, arena: _Arena, slots: list[tuple[int, int]], raw: bytes | bytearray
                 ) -> None:
        self.arena = arena
        self.slots = slots
        self.raw = raw
        self.slots_frame = P.encode_frame(Kind.SHM_SLOTS, rid=arena.id, body=P.pack_payload(
            [list(s) for s in slots]))
        self.inline: bytes | None = None


class HubShm:
    """The shared-memory books of one hub (its loop thread only)."""

    def __init__(self, hub: Any) -> None:
        self.hub = hub  # a Hub: router, endpoints, flow, options, shm_active
        self.arenas: dict[int, _Arena] = {}
        self.by_owner: dict[HubEndpoint, _Arena] = {}
        self.given: dict[HubEndpoint, set[int]] = {}  # arena ids each endpoint was given
        self.held: dict[HubEndpoint, dict[tuple[int, int], list[int]]] = {}  # [count, length]
        self.inline_only: set[HubEndpoint] = set()
        self._next_id = 0

    def install(self, handlers: dict[int, Any]) -> None:
        """Add the hub's own handlers to a router's dispatch table."""
        handlers[Kind.SHM_ARENA] = self.on_arena
        handlers[Kind.SHM_MESSAGE] = self.on_message
        handlers[Kind.SHM_RELEASE] = self.on_release

    # -- from peers ------------------------------------------------------------------------
    def on_arena(self, ep: HubEndpoint, frame: P.Frame) -> None:
        body = P.unpack_control(frame.body)
        size = body.get("size") if type(body) is dict else None
        if ep in self.by_owner or ep in self.inline_only:
            raise IpcBusProtocolError("a connection announces its arena once")
        if size == 0 and not frame.fds:
            self.inline_only.add(ep)  # it takes large payloads inline
            return
        if len(frame.fds) != 1 or not ep.can_pass_fds or ep.relay:
            raise IpcBusProtocolError("an arena is announced with its one descriptor")
        problem = check_arena(frame.fds[0], size)
        if problem is not None:
            raise IpcBusProtocolError(problem)
        fd = frame.fds.pop()  # ours from now on
        assert isinstance(size, int)
        self._next_id += 1
        arena = _Arena(self._next_id, ep, fd, size)
        self.arenas[arena.id] = arena
        self.by_owner[ep] = arena

    def on_message(self, ep: HubEndpoint, frame: P.Frame) -> None:
        arena = self.by_owner.get(ep)
        if arena is None:
            raise IpcBusProtocolError("a shared-memory message before its arena")
        body = P.unpack_payload(frame.body)
        if not (type(body) is list and len(body) == 2 and type(body[1]) is bytes):
            raise IpcBusProtocolError("malformed shared-memory message")
        decoder = FrameDecoder(max_message=ep.hub.options.max_message)
        decoder.feed(body[1])
        inner = decoder.frames()
        if (len(inner) != 1 or decoder.pending_bytes or inner[0].kind not in _MESSAGES
                or inner[0].nfds):
            raise IpcBusProtocolError("a shared-memory message carries one SEND, SEND_TO,"
                                      " REQUEST, REQUEST_ALL or RESPONSE")
        try:
            slots = arena.table.add(body[0])
        except ValueError as exc:
            raise IpcBusProtocolError(str(exc)) from None
        message = inner[0]
        hub = self.hub
        hub.shm_active = ActiveMessage(arena, slots, message.raw)
        try:
            hub.router.handle(ep, message)
        finally:
            hub.shm_active = None
            freed = arena.table.free_unheld([o for o, _ in slots])
            if freed:
                self._free(arena, freed)

    def on_release(self, ep: HubEndpoint, frame: P.Frame) -> None:
        offsets = P.unpack_control(frame.body)
        held = self.held.get(ep, {})
        if type(offsets) is not list or not offsets:
            raise IpcBusProtocolError("malformed SHM_RELEASE")
        arena = self.arenas.get(frame.rid)
        freed: list[int] = []
        released = 0
        for offset in offsets:
            entry = held.get((frame.rid, offset)) if type(offset) is int else None
            if entry is None:
                raise IpcBusProtocolError(f"releases slot {offset!r} of arena {frame.rid},"
                                          " which it does not hold")
            entry[0] -= 1
            if not entry[0]:
                del held[(frame.rid, offset)]
            released += entry[1]
            if arena is not None and arena.table.release(offset):
                freed.append(offset)
        ep.out_bytes = max(0, ep.out_bytes - released)
        if ep.full_since is not None:
            self.hub.flow.written(ep, 0)
        if freed and arena is not None:
            self._free(arena, freed)

    def _free(self, arena: _Arena, offsets: list[int]) -> None:
        arena.owner.deliver(P.encode_frame(Kind.SHM_FREE, body=P.pack_payload(offsets)), [])

    # -- to receivers ------------------------------------------------------------------------
    def attach(self, ep: HubEndpoint, raw: bytes | bytearray) -> bytes | bytearray:
        """``raw`` is being queued for ``ep`` while a message with slots is routed: what to
        queue instead (the inline form), after queueing what it needs first (the arena's
        descriptor, the slots). A GROUPED frame that carries the message (a group's chosen
        member) is the message for this: a member that can map gets the slots and the
        GROUPED frame as it is (its client resolves the carried frame's placeholders); one
        that cannot, and a spy (SPY_COPY: rare, kept simple), the bytes inline."""
        active: ActiveMessage = self.hub.shm_active
        if raw is not active.raw:
            if len(raw) > 15 and raw[15] in (_GROUPED, _SPY_COPY):
                if raw[15] == _GROUPED and self._can_map(ep) and _carries(raw, active.raw):
                    if ep.closing is None:
                        self._give(ep, active)
                    return raw
                return self._inline_wrapped(raw, active)
            return raw  # a failure, a notice: nothing to do with the slots
        if ep.closing is not None:
            return raw
        if not self._can_map(ep):
            return self._inline(active)
        self._give(ep, active)
        return raw

    def _inline(self, active: ActiveMessage) -> bytes:
        """The message with its slots' bytes in place of the placeholders (built once)."""
        if active.inline is not None:
            return active.inline
        arena = active.arena
        if arena.mapping is None:
            arena.mapping = map_readonly(arena.fd, arena.size)
        mapping, slots = arena.mapping, active.slots

        def resolve(code: int, data: bytes) -> Any:
            if code == ARRAY_SLOT_EXT:  # an array: inline, as its sender would have sent it
                dtype, shape, index = msgpack.unpackb(data)
                offset, length = slots[index]
                return msgpack.ExtType(ARRAY_EXT, msgpack.packb(
                    [dtype, shape, mapping[offset:offset + length]], use_bin_type=True))
            if code != EXT_CODE:
                return msgpack.ExtType(code, data)
            offset, length = slots[ext_index(data)]
            return mapping[offset:offset + length]

        raw = active.raw
        hlen, _, rid = P.PREFIX.unpack_from(raw, 0)
        try:
            args = msgpack.unpackb(memoryview(raw)[P.PREFIX_SIZE + hlen:], raw=False,
                                   strict_map_key=False, ext_hook=resolve)
            body = P.pack_args(args)
        except Exception as exc:
            raise IpcBusProtocolError(f"malformed shared-memory message body: {exc}") from None
        data = body if isinstance(body, bytes) else b"".join(body)
        active.inline = P.PREFIX.pack(hlen, len(data), rid) + \
            bytes(raw[P.PREFIX_SIZE:P.PREFIX_SIZE + hlen]) + data
        return active.inline

    def _inline_wrapped(self, raw: bytes | bytearray, active: ActiveMessage) -> bytes | bytearray:
        """A GROUPED or SPY_COPY frame carrying the message: the same with it inline."""
        hlen, _, rid = P.PREFIX.unpack_from(raw, 0)
        start = P.PREFIX_SIZE + hlen
        body = bytes(raw[start:])
        if raw[15] == _GROUPED:
            fields = msgpack.unpackb(body)
            if fields[1] != active.raw:
                return raw
            body = P.pack_payload([fields[0], self._inline(active)])
        elif body == active.raw:
            body = self._inline(active)
        else:
            return raw
        return P.PREFIX.pack(hlen, len(body), rid) + bytes(raw[P.PREFIX_SIZE:start]) + body

    # -- endings -------------------------------------------------------------------------------
    def forget(self, ep: HubEndpoint) -> None:
        """``ep`` has ended (or was cut off): what it held is released, its arena closed. An
        error here is logged and goes no further (the hub still forgets its peers)."""
        try:
            self._forget(ep)
        except Exception as exc:
            log.error("internal error while releasing the shared memory of %s: %r", ep.label,
                      exc, exc_info=exc)

    def _forget(self, ep: HubEndpoint) -> None:
        self.inline_only.discard(ep)
        for arena_id in self.given.pop(ep, ()):
            arena = self.arenas.get(arena_id)
            if arena is not None:
                arena.holders.discard(ep)
        frees: dict[int, list[int]] = {}
        for (arena_id, offset), (count, _) in self.held.pop(ep, {}).items():
            arena = self.arenas.get(arena_id)
            if arena is None:
                continue
            for _ in range(count):
                if arena.table.release(offset):
                    frees.setdefault(arena_id, []).append(offset)
        own = self.by_owner.pop(ep, None)
        if own is not None:
            del self.arenas[own.id]
            close_fds([own.fd])
            if own.mapping is not None:
                own.mapping.close()
            gone = P.encode_frame(Kind.SHM_ARENA, rid=own.id, body=P.pack_payload([0]))
            for holder in own.holders:
                self.given.get(holder, set()).discard(own.id)
                if holder is not ep and holder.closing is None:
                    holder.deliver(gone, [])
        for arena_id, offsets in frees.items():
            arena = self.arenas.get(arena_id)
            if arena is not None:
                self._free(arena, offsets)

    def close(self) -> None:
        """The hub is shutting down: every arena descriptor and mapping goes."""
        for arena in self.arenas.values():
            close_fds([arena.fd])
            if arena.mapping is not None:
                arena.mapping.close()
        self.arenas.clear()
        self.by_owner.clear()

    def state(self) -> dict[str, int]:
        """For queryState: arenas known, slots in flight."""
        return {"arenas": len(self.arenas),
                "slots_in_flight": sum(len(a.table.slots) for a in self.arenas.values())}

    def _can_map(self, ep: HubEndpoint) -> bool:
        """Whether ``ep`` maps arenas (else it takes large payloads inline)."""
        return ep.can_pass_fds and not ep.relay and ep not in self.inline_only

    def _give(self, ep: HubEndpoint, active: ActiveMessage) -> None:
        """Queue for ``ep`` the arena's descriptor if it never had it, then the slots of the
        message that follows; ``ep`` holds them until its SHM_RELEASE (or its end), and
        they count in its queue."""
        arena = active.arena
        given = self.given.setdefault(ep, set())
        if arena.id not in given:
            fd = os.dup(arena.fd)
            ep.deliver(P.encode_frame(Kind.SHM_ARENA, rid=arena.id, nfds=1,
                                      body=P.pack_payload([arena.size])), [fd])
            given.add(arena.id)
            arena.holders.add(ep)
        ep.deliver(active.slots_frame, [])
        held = self.held.setdefault(ep, {})
        pinned = 0
        for offset, length in active.slots:
            entry = held.get((arena.id, offset))
            if entry is None:
                held[(arena.id, offset)] = [1, length]
            else:
                entry[0] += 1
            arena.table.hold(offset)
            pinned += length
        ep.out_bytes += pinned  # what it holds counts toward its queue limit


def _carries(grouped: bytes | bytearray, raw: bytes | bytearray) -> bool:
    """Whether the GROUPED frame ``grouped`` carries the frame ``raw`` (same length, same
    prefix and header: a hub makes GROUPED frames around the message it routes only)."""
    at = carried_at(grouped)
    if at is None or len(grouped) - at != len(raw):
        return False
    end = P.PREFIX_SIZE + P.PREFIX.unpack_from(raw, 0)[0]
    return grouped[at:at + end] == raw[:end]
