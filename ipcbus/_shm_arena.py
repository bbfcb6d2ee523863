"""Shared-memory arenas as the operating system sees them: memfd, seals, mappings.

A sending connection's arena is one anonymous ``memfd`` (``os.memfd_create``) of
``shm_limit`` bytes, sealed against shrinking and growing (``F_SEAL_SHRINK``,
``F_SEAL_GROW``: nobody can truncate it under a mapping, which would SIGBUS the readers) and
then against new seals (``F_SEAL_SEAL``). It is sparse: a page costs memory once it has been
written, and then stays (the slots are pooled, the pages reused). Its descriptor crosses the
bus once per connection (SCM_RIGHTS); receivers map it read-only. The pages go with the last
descriptor and mapping: a crashed process leaves nothing behind, and nothing ever appears in
``/dev/shm``.

Where ``os.memfd_create`` or ``fcntl.F_ADD_SEALS`` is missing (macOS, other Unixes),
:data:`AVAILABLE` is False and large payloads travel inline through the socket, as before.
"""
from __future__ import annotations

import fcntl
import mmap
import os

__all__ = ["AVAILABLE", "SEALS", "create_arena", "check_arena", "map_readonly"]

AVAILABLE = hasattr(os, "memfd_create") and hasattr(fcntl, "F_ADD_SEALS")
SEALS = (getattr(fcntl, "F_SEAL_SHRINK", 2) | getattr(fcntl, "F_SEAL_GROW", 4)
         | getattr(fcntl, "F_SEAL_SEAL", 1))
_NEEDED = getattr(fcntl, "F_SEAL_SHRINK", 2) | getattr(fcntl, "F_SEAL_GROW", 4)
MAX_ARENA = 16 << 30  # the largest arena (bytes of address space each receiver maps)


def create_arena(size: int) -> tuple[int, mmap.mmap]:
    """A new sealed memfd of ``size`` bytes and a writable shared mapping of it (the
    sender's). The caller owns both."""
    fd = os.memfd_create("ipcbus-arena", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
        mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        raise
    return fd, mapping


def check_arena(fd: int, size: object) -> str | None:
    """Why the descriptor a peer announces as its arena of ``size`` bytes is not one a hub
    can hand on safely (None if it is): a sealed memfd of exactly that size."""
    if type(size) is not int or not 0 < size <= MAX_ARENA:
        return f"an arena's size must be 1 to {MAX_ARENA} bytes"
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        actual = os.fstat(fd).st_size
    except OSError as exc:
        return f"the arena's descriptor is not a sealed memfd ({exc})"
    if seals & _NEEDED != _NEEDED:
        return "the arena is not sealed against shrinking and growing"
    if actual != size:
        return f"the arena holds {actual} bytes, not the {size} announced"
    return None


def map_readonly(fd: int, size: int) -> mmap.mmap:
    """A read-only shared mapping of an arena (a receiver's)."""
    return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
