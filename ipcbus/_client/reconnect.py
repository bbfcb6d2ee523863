"""Reconnection as a pure unit: the policy (:class:`Reconnect`) and a client's link state.

A client connected with ``connect(..., reconnect=True)`` (or a :class:`Reconnect` policy)
survives the loss of its bus (SPEC 0.2, "Surviving a broker restart"). What it may do, and
when the next attempt is due, is decided here, with an injected clock and no sockets or
threads (tested in tests/unit/test_reconnect_policy.py); ``reconnecting.py`` runs it (the
retry thread, the handlers).

The link state machine::

    CONNECTED --lost()--> DOWN --reconnected()--> CONNECTED
        |                  |  \\--next_delay() past give_up--> CLOSED
        \\--close()------> CLOSED <--close()--/

* CONNECTED: calls go to the bus.
* DOWN: every call that needs the bus raises :class:`~ipcbus.IpcBusConnectionError` at once
  (nothing is buffered); listener registration changes the local registry only, which is
  replayed on reconnection. Attempts follow the backoff: the n-th waits
  ``min(initial * 2**n, maximum)`` seconds after the previous one ended (the first, after
  the loss), never past the ``give_up`` deadline.
* CLOSED: for good (``close()``, or ``give_up`` seconds after the loss without success);
  nothing leaves it.
"""
from __future__ import annotations

import math
from typing import Callable

from ..errors import IpcBusConnectionError

__all__ = ["Reconnect", "policy_of", "LinkState", "CONNECTED", "DOWN", "CLOSED"]

CONNECTED, DOWN, CLOSED = "connected", "down", "closed"


def _seconds(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number of seconds, not {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be a finite number of seconds > 0, not {value!r}")
    return float(value)


class Reconnect:
    """How a client reconnects: wait ``initial`` seconds (default 0.05) before the first
    attempt, double the wait after each failed one up to ``maximum`` (default 2.0), and
    close the client for good ``give_up`` seconds after the loss (default None: never)."""

    __slots__ = ("initial", "maximum", "give_up")

    def __init__(self, initial: float = 0.05, maximum: float = 2.0,
                 give_up: float | None = None) -> None:
        self.initial = _seconds(initial, "initial")
        self.maximum = _seconds(maximum, "maximum")
        if self.maximum < self.initial:
            raise ValueError(f"maximum ({maximum!r}) must be >= initial ({initial!r})")
        self.give_up = None if give_up is None else _seconds(give_up, "give_up")

    def delay(self, attempt: int) -> float:
        """Seconds to wait before attempt number ``attempt`` (0 = the first)."""
        if attempt >= 64:  # 2**64 * initial is past any maximum
            return self.maximum
        return min(self.initial * 2.0 ** attempt, self.maximum)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Reconnect) and (self.initial, self.maximum, self.give_up) == (
            other.initial, other.maximum, other.give_up)

    def __hash__(self) -> int:
        return hash((self.initial, self.maximum, self.give_up))

    def __repr__(self) -> str:
        return (f"Reconnect(initial={self.initial!r}, maximum={self.maximum!r},"
                f" give_up={self.give_up!r})")


def policy_of(value: object) -> Reconnect | None:
    """The policy of ``connect(reconnect=...)``: True -> the default policy, False/None ->
    none (the client closes when its bus goes, as before), a :class:`Reconnect` -> itself."""
    if value is None or value is False:
        return None
    if value is True:
        return Reconnect()
    if isinstance(value, Reconnect):
        return value
    raise TypeError(f"reconnect must be a bool or an ipcbus.Reconnect, not"
                    f" {type(value).__name__}")


class LinkState:
    """A client's link to its bus (see the module docstring): pure, driven by its owner
    under the owner's lock, ``clock`` injected (``time.monotonic`` in the library)."""

    def __init__(self, policy: Reconnect, clock: Callable[[], float]) -> None:
        self.policy = policy
        self.clock = clock
        self.state = CONNECTED
        self.reason = ""  # why it is down, or closed
        self.attempts = 0  # failed attempts since the loss
        self.down_since = 0.0
        self.gave_up = False

    def lost(self, reason: str) -> bool:
        """The connection ended without ``close()``; True if that makes the link DOWN (a
        new loss to reconnect from), False if it was already down or closed."""
        if self.state != CONNECTED:
            return False
        self.state, self.reason, self.attempts = DOWN, reason, 0
        self.down_since = self.clock()
        return True

    def next_delay(self) -> float | None:
        """Seconds to wait before the next attempt, or None: no attempt (not DOWN; or past
        ``give_up``, which closes the link for good)."""
        if self.state != DOWN:
            return None
        delay = self.policy.delay(self.attempts)
        give_up = self.policy.give_up
        if give_up is not None:
            left = self.down_since + give_up - self.clock()
            if left <= 0:
                self.state, self.gave_up = CLOSED, True
                self.reason = (f"gave up reconnecting after {give_up:g} s"
                               f" (last: {self.reason})")
                return None
            delay = min(delay, left)
        return delay

    def attempt_failed(self, error: str) -> None:
        """An attempt ended without a connection (``error`` says why)."""
        if self.state == DOWN:
            self.attempts += 1
            self.reason = error

    def reconnected(self) -> bool:
        """An attempt joined the bus again; False if the link was closed meanwhile (the
        caller then leaves the new connection)."""
        if self.state != DOWN:
            return False
        self.state, self.reason, self.attempts = CONNECTED, "", 0
        return True

    def close(self) -> bool:
        """``close()`` by the user; True if the link was not closed already."""
        if self.state == CLOSED:
            return False
        self.state, self.reason = CLOSED, "the client was closed"
        return True

    def check_call(self) -> None:
        """Raise :class:`~ipcbus.IpcBusConnectionError` unless calls may go to the bus."""
        if self.state == DOWN:
            raise IpcBusConnectionError(f"the bus is down (reconnecting): {self.reason}")
        if self.state == CLOSED:
            raise IpcBusConnectionError(f"the client is closed: {self.reason}")
