"""Slots of a shared-memory arena as pure bookkeeping (``ipcbus._shm_slots``): the sender's
allocator (no overlap, every slot freed once, bounded by the arena, the same pages reused)
and the hub's table (slots a frame declares: inside the arena, no overlap with a slot in
flight; holders counted; what a receiver may release). Hypothesis drives random sequences."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipcbus._shm_slots import ALIGN, SlotAllocator, SlotTable, ext_data, ext_index

SIZE = 64 * ALIGN

ops = st.lists(st.one_of(st.tuples(st.just("alloc"), st.integers(1, 20 * ALIGN)),
                         st.tuples(st.just("free"), st.integers(0, 50))), max_size=120)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_the_allocator_never_overlaps_frees_once_and_stays_bounded(steps: list[tuple[str, int]]
                                                                     ) -> None:
    slots = SlotAllocator(SIZE)
    live: dict[int, int] = {}  # offset -> bytes asked
    for op, value in steps:
        if op == "alloc":
            offset = slots.alloc(value)
            if offset is None:  # full: truly no free gap that large
                assert max(_gaps(live)) < -(-value // ALIGN) * ALIGN
                continue
            assert offset % ALIGN == 0 and 0 <= offset and offset + value <= SIZE
            for other, n in live.items():
                assert offset + value <= other or other + n <= offset, "overlap"
            live[offset] = value
        elif live:
            offset = sorted(live)[value % len(live)]
            slots.free(offset)
            del live[offset]
            with pytest.raises(KeyError):
                slots.free(offset)  # a slot is freed once
        assert slots.used_bytes <= SIZE
    for offset in list(live):
        slots.free(offset)
    assert slots.alloc(SIZE) == 0  # everything merged back into one extent


def _gaps(live: dict[int, int]) -> list[int]:
    """The free gaps between the live slots (rounded up to pages), and at both ends."""
    gaps, at = [], 0
    for offset in sorted(live):
        gaps.append(offset - at)
        at = offset + -(-live[offset] // ALIGN) * ALIGN
    return gaps + [SIZE - at]


def test_the_allocator_reuses_the_lowest_pages_and_says_when_full() -> None:
    slots = SlotAllocator(4 * ALIGN)
    a = slots.alloc(ALIGN)
    b = slots.alloc(2 * ALIGN)
    assert (a, b) == (0, ALIGN)
    assert slots.alloc(2 * ALIGN) is None  # one page left
    slots.free(0)
    assert slots.alloc(10) == 0  # first fit: the same page again
    with pytest.raises(ValueError):
        slots.alloc(0)


def test_the_table_refuses_forged_slots() -> None:
    table = SlotTable(SIZE)
    for forged in ([], "x", [[0]], [[0, 0]], [[-ALIGN, 10]], [[SIZE - 10, 11]], [[0, 1.5]],
                   [[0, 100], [50, 10]], [[0, 1]] * (SlotTable.MAX_SLOTS + 1)):
        with pytest.raises(ValueError):
            table.add(forged)
    assert table.add([[0, 100], [ALIGN, 10]]) == [(0, 100), (ALIGN, 10)]
    with pytest.raises(ValueError):  # overlaps a slot in flight
        table.add([[50, 10]])
    with pytest.raises(ValueError):
        table.add([[ALIGN - 1, 2]])
    assert table.slots == {0: [100, 0], ALIGN: [10, 0]}  # nothing of the refused recorded


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=8))
def test_a_slot_is_free_once_its_last_holder_releases_it(holders: list[int]) -> None:
    table = SlotTable(SIZE)
    offsets = [i * ALIGN for i in range(len(holders))]
    table.add([[o, ALIGN] for o in offsets])
    for offset, n in zip(offsets, holders):
        for _ in range(n):
            assert table.hold(offset) == ALIGN
    freed = table.free_unheld(offsets)
    assert freed == [o for o, n in zip(offsets, holders) if n == 0]
    for offset, n in zip(offsets, holders):
        for i in range(n):
            assert table.release(offset) == (i == n - 1)
    assert table.slots == {}
    table.add([[0, SIZE]])  # the whole arena is free again


def test_placeholders_round_trip() -> None:
    assert ext_index(ext_data(7)) == 7
    with pytest.raises(ValueError):
        ext_index(b"\x00")
