"""Measuring in the reliability tests: RSS and descriptors from /proc, and ``[figure]`` lines.

Each case prints its measurements as ``[figure] name: key=value, ...`` (shown with ``-s``, even
in tests that capture file descriptors, and appended to ``$IPCBUS_FIGURES`` if set);
docs/reliability.md quotes them.
"""
from __future__ import annotations

import gc
import os
import threading
from typing import Any

MiB = 1 << 20


def rss(pid: int | None = None) -> int:
    """Resident memory of a process, in bytes (VmRSS from /proc)."""
    with open(f"/proc/{pid or os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def fd_count(pid: int | None = None) -> int:
    return len(os.listdir(f"/proc/{pid or os.getpid()}/fd"))


def settle() -> None:
    """Collect garbage that may hold descriptors or memory from earlier work."""
    for _ in range(3):
        gc.collect()


# Figures go to the stdout this module saw when it was imported (the terminal under ``-s``,
# even inside tests that capture fds with capfd), and are appended to $IPCBUS_FIGURES if set.
_FIGURES_FD = os.dup(1)


def report(name: str, **figures: Any) -> None:
    """Print a figure line (shown with ``-s``; docs/reliability.md quotes them)."""
    text = ", ".join(f"{k}={v}" for k, v in figures.items())
    line = f"\n[figure] {name}: {text}\n"
    try:
        os.write(_FIGURES_FD, line.encode())
    except OSError:
        pass
    path = os.environ.get("IPCBUS_FIGURES")
    if path:
        with open(path, "a") as f:
            f.write(line.lstrip("\n"))


class RssSampler:
    """Samples a process's RSS on a thread; ``peak`` is the highest value seen."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.peak = rss(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.peak = max(self.peak, rss(self.pid))
            except (OSError, AssertionError):
                return

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(2)
        return self.peak


def arena_fds(pid: int | None = None) -> int:
    """How many shared-memory arenas (memfds named ``ipcbus-arena``) a process holds open."""
    base = f"/proc/{pid or os.getpid()}/fd"
    count = 0
    for name in os.listdir(base):
        try:
            count += "ipcbus-arena" in os.readlink(f"{base}/{name}")
        except OSError:
            pass
    return count


def arena_maps(pid: int | None = None) -> int:
    """How many mappings of shared-memory arenas a process has."""
    with open(f"/proc/{pid or os.getpid()}/maps") as f:
        return sum("ipcbus-arena" in line for line in f)
