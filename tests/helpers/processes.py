"""Child processes in tests: started from module-level targets, always joined with a bound and
killed at the end; a started process's pid, checked before it can reach ``os.kill``."""
from __future__ import annotations

import contextlib
import queue
import time
from typing import Any, Iterator

# how long a child may take to say it is ready (spawn imports the test module again)
READY_TIMEOUT = 30.0


class Children:
    """Start module-level targets in ``ctx``; always stop, join (bounded) and kill them.

    ``self.stop`` is the read end of a pipe the children may wait on; ``close()`` writes to it.
    A pipe, not an Event: setting an Event that a SIGKILLed child was waiting on blocks.
    """

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.stop, self._stop_w = ctx.Pipe(duplex=False)
        self.procs: list[Any] = []

    def start(self, target: Any, *args: Any) -> Any:
        p = self.ctx.Process(target=target, args=args, daemon=True)
        p.start()
        self.procs.append(p)
        return p

    def close(self) -> None:
        self._stop_w.send_bytes(b"stop")  # readable for every child; nobody consumes it
        for p in self.procs:
            p.join(5)
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(2)


@contextlib.contextmanager
def running(procs: list[Any]) -> Iterator[list[Any]]:
    """Start processes; at the end join them (bounded) and kill what is left."""
    for p in procs:
        p.start()
    try:
        yield procs
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)


def pid_of(proc: Any) -> int:
    """The pid of a started process (``Process.pid`` is typed Optional: None before start,
    which must never reach ``os.kill``, where -1 or 0 would signal many processes)."""
    pid = proc.pid
    assert isinstance(pid, int) and pid > 0, f"{proc!r} has not started"
    return pid


class Reports:
    """The children's reports, read with a bound."""

    def __init__(self, q: Any) -> None:
        self.q = q

    def next(self, what: str, timeout: float = READY_TIMEOUT) -> tuple[Any, ...]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {what!r} report in {timeout} s")
            try:
                item: tuple[Any, ...] = self.q.get(timeout=left)
            except queue.Empty:
                continue
            if item[0] == what:
                return item

    def ready(self, count: int) -> list[str]:
        return sorted(self.next("ready")[1] for _ in range(count))
