"""Slots of a shared-memory arena, as bookkeeping: who may use which bytes (pure code).

An *arena* is one sending connection's pooled shared memory (``_shm_arena``, SPEC "Large
payloads through shared memory"). Two units keep its books, neither touching memory:

* :class:`SlotAllocator`, the sender's: hands out page-aligned slots, first fit from the
  lowest offset (so the same pages are used again and again, and stay faulted in: the pool
  is the design), and takes each back exactly once. Bounded by the arena's size: a full
  arena answers None and the sender waits for slots to come back.
* :class:`SlotTable`, the hub's, one per arena: the slots in flight and how many receivers
  still hold each. A slot a frame declares must lie inside the arena and overlap no slot in
  flight; a receiver releases only what it was given. Anything else is the declaring
  connection's protocol error (ValueError here), never another peer's harm.

Also the placeholder a message body carries instead of a large argument: a msgpack ext type
(:data:`EXT_CODE`) whose data is the slot's index in the frame's list of slots.
"""
from __future__ import annotations

import bisect

__all__ = ["SlotAllocator", "SlotTable", "EXT_CODE", "ALIGN", "ext_data", "ext_index"]

ALIGN = 4096  # slots start on page boundaries
EXT_CODE = 0x53  # msgpack ext type of a slot placeholder ("S")


def ext_data(index: int) -> bytes:
    """The data of the placeholder of the ``index``-th slot of a message."""
    return index.to_bytes(4, "big")


def ext_index(data: bytes) -> int:
    """The slot index a placeholder's data names; ValueError if malformed."""
    if len(data) != 4:
        raise ValueError("malformed shared-memory placeholder")
    return int.from_bytes(data, "big")


def _round_up(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class SlotAllocator:
    """Free extents of one arena of ``size`` bytes, sorted by offset (the sender's side)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._starts: list[int] = [0] if size > 0 else []  # free extents: starts, sorted
        self._lengths: dict[int, int] = {0: size} if size > 0 else {}
        self.used: dict[int, int] = {}  # slot offset -> its (rounded) length

    @property
    def used_bytes(self) -> int:
        return sum(self.used.values())

    def alloc(self, nbytes: int) -> int | None:
        """The offset of a new slot of at least ``nbytes`` bytes (> 0), or None (full)."""
        if nbytes <= 0:
            raise ValueError("a slot holds at least one byte")
        need = _round_up(nbytes)
        for i, start in enumerate(self._starts):
            length = self._lengths[start]
            if length >= need:
                del self._starts[i]
                del self._lengths[start]
                if length > need:
                    self._starts.insert(i, start + need)
                    self._lengths[start + need] = length - need
                self.used[start] = need
                return start
        return None

    def free(self, offset: int) -> None:
        """Take slot ``offset`` back; KeyError if it is not in use (freed twice)."""
        length = self.used.pop(offset)
        starts, lengths = self._starts, self._lengths
        i = bisect.bisect_left(starts, offset)
        end = offset + length
        if i < len(starts) and starts[i] == end:  # merge with the next free extent
            length += lengths.pop(end)
            del starts[i]
        if i > 0 and starts[i - 1] + lengths[starts[i - 1]] == offset:  # and the previous
            lengths[starts[i - 1]] += length
            return
        starts.insert(i, offset)
        lengths[offset] = length


class SlotTable:
    """The slots of one arena in flight through a hub, and their holders' counts."""

    MAX_SLOTS = 1024  # slots one frame may declare

    def __init__(self, size: int) -> None:
        self.size = size
        self._starts: list[int] = []  # sorted offsets of the slots in flight
        self.slots: dict[int, list[int]] = {}  # offset -> [length, holders]

    def add(self, slots: object) -> list[tuple[int, int]]:
        """Record the slots a frame declares (``[[offset, length], ...]``), held by nobody
        yet; ValueError (nothing recorded) if malformed, outside the arena or overlapping a
        slot in flight (or each other)."""
        if type(slots) is not list or not slots or len(slots) > self.MAX_SLOTS:
            raise ValueError("a shared-memory frame declares 1 to"
                             f" {self.MAX_SLOTS} slots")
        checked: list[tuple[int, int]] = []
        for slot in slots:
            if (type(slot) is not list or len(slot) != 2 or type(slot[0]) is not int
                    or type(slot[1]) is not int):
                raise ValueError("a slot is [offset, length]")
            offset, length = slot
            if length <= 0 or offset < 0 or offset + length > self.size:
                raise ValueError(f"slot [{offset}, {length}] is outside the arena of"
                                 f" {self.size} bytes")
            checked.append((offset, length))
        ordered = sorted(checked)
        for (o1, l1), (o2, _) in zip(ordered, ordered[1:]):
            if o1 + l1 > o2:
                raise ValueError("the slots of a frame overlap")
        for offset, length in ordered:
            if self._overlaps(offset, length):
                raise ValueError(f"slot [{offset}, {length}] overlaps a slot in flight")
        for offset, length in ordered:
            bisect.insort(self._starts, offset)
            self.slots[offset] = [length, 0]
        return checked

    def _overlaps(self, offset: int, length: int) -> bool:
        starts = self._starts
        i = bisect.bisect_left(starts, offset)
        if i < len(starts) and starts[i] < offset + length:
            return True
        return i > 0 and starts[i - 1] + self.slots[starts[i - 1]][0] > offset

    def hold(self, offset: int) -> int:
        """One more receiver holds slot ``offset``; its length."""
        slot = self.slots[offset]
        slot[1] += 1
        return slot[0]

    def release(self, offset: int) -> bool:
        """One holder gave slot ``offset`` back; True if it is free now (forgotten here)."""
        slot = self.slots[offset]
        slot[1] -= 1
        if slot[1] > 0:
            return False
        self._forget(offset)
        return True

    def free_unheld(self, offsets: list[int]) -> list[int]:
        """Of ``offsets`` (just added), those nobody holds: forgotten, to be freed now."""
        freed = [o for o in offsets if o in self.slots and self.slots[o][1] == 0]
        for offset in freed:
            self._forget(offset)
        return freed

    def _forget(self, offset: int) -> None:
        del self.slots[offset]
        del self._starts[bisect.bisect_left(self._starts, offset)]
