"""Polling instead of sleeping, for a moment, where a reply is expected soon: one switch.

On a small VM a sleeping thread takes tens of microseconds to wake, once per hop of a round
trip. Right after this process has written a request or an answer, the thread that will
handle what comes back may poll for it (yielding the CPU between looks) for up to
``SPIN_WAIT`` seconds instead of sleeping. ``IPCBUS_SPIN_US`` (microseconds) sets it; 0 turns
it off; it is off in a process that may run on one CPU only.

:class:`Spin` decides when polling is worth it, adaptively: after two polls in a row that
ran out without a result, the next ``SKIP`` chances sleep at once, so a peer that answers
slowly (or traffic that comes in gaps of milliseconds) costs almost no polling.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Callable

log = logging.getLogger("ipcbus")

__all__ = ["SPIN_WAIT", "Spin", "spin_until", "cpus", "spin_setting"]

SKIP = 100


def spin_setting() -> float:
    """SPIN_WAIT from the environment (IPCBUS_SPIN_US, microseconds), else 200 µs."""
    value = os.environ.get("IPCBUS_SPIN_US", "")
    try:
        return max(0.0, float(value)) / 1e6 if value else 200e-6
    except ValueError:
        log.warning("IPCBUS_SPIN_US=%r is not a number of microseconds: using 200", value)
        return 200e-6


def cpus() -> int:
    """How many CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


SPIN_WAIT = spin_setting()


class Spin:
    """When to poll instead of sleeping (see the module docstring)."""

    __slots__ = ("limit", "misses", "skip")

    def __init__(self, limit: float) -> None:
        self.limit = limit  # seconds; 0: never poll
        self.misses = 0
        self.skip = 0

    def until(self, start: float) -> float:
        """The time.perf_counter() to poll until, from ``start``; 0.0: do not poll."""
        if not self.limit:
            return 0.0
        if self.skip:
            self.skip -= 1
            return 0.0
        return start + self.limit

    def outcome(self, hit: bool) -> None:
        if hit:
            self.misses = 0
        else:
            self.misses += 1
            if self.misses >= 2:
                self.skip = SKIP


def spin_until(ready: Callable[[], object], until: float) -> bool:
    """Poll ``ready()``, yielding the CPU between looks, until it is true (True) or
    time.perf_counter() reaches ``until`` (False)."""
    perf_counter, yield_ = time.perf_counter, os.sched_yield
    while not ready():
        if perf_counter() >= until:
            return False
        yield_()
    return True
