"""The one timeout rule of every call that takes one (SPEC "Timeouts")."""
from __future__ import annotations

DEFAULT_TIMEOUT = 2.0


def resolve_timeout(timeout: float | None) -> float | None:
    """SPEC timeouts: None or 0 -> DEFAULT_TIMEOUT; negative -> forever (None); else seconds."""
    if timeout is None or timeout == 0:
        return DEFAULT_TIMEOUT
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number of seconds, not {type(timeout).__name__}")
    if timeout != timeout:  # NaN
        raise ValueError("timeout is NaN")
    return None if timeout < 0 else float(timeout)
