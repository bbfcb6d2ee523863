"""Bounded waits: poll a condition with a deadline, time a block."""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterator


def wait_until(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.01) -> Any:
    """Poll ``predicate`` until it is truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


@contextlib.contextmanager
def elapsed() -> Iterator[list[float]]:
    """``with elapsed() as t:`` ... then ``t[0]`` is the duration of the block."""
    out: list[float] = []
    t0 = time.monotonic()
    try:
        yield out
    finally:
        out.append(time.monotonic() - t0)
