"""The limits a hub (a broker, or a bridge) enforces, with their defaults.

Every option is checked here, so a bad value raises ``ValueError``/``TypeError`` where the
broker or the bridge is created, not in its loop. ``IpcBusBroker.create`` documents them for
users.
"""
from __future__ import annotations

from typing import Any

from . import _protocol as P
from ._handshake import LINK_POLICIES
from ._transport import HANDSHAKE_TIMEOUT

__all__ = ["HubOptions", "DEFAULT_QUEUE_LIMIT", "DEFAULT_SLOW_CONSUMER_TIMEOUT"]

DEFAULT_QUEUE_LIMIT = 64 * 1024 * 1024
DEFAULT_SLOW_CONSUMER_TIMEOUT = 10.0


class HubOptions:
    """The limits a hub enforces (broker and bridge share them)."""

    def __init__(self, *, max_message: int = P.DEFAULT_MAX_MESSAGE,
                 max_fds: int = P.DEFAULT_MAX_FDS, queue_limit: int = DEFAULT_QUEUE_LIMIT,
                 slow_consumer_timeout: float = DEFAULT_SLOW_CONSUMER_TIMEOUT,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT,
                 allowed_uids: list[int] | None = None,
                 traffic_log: str | None = None, links: str = "owner",
                 ecipc: bool = False, federation: str | None = None, bus: str = "default",
                 federation_options: dict[str, Any] | None = None) -> None:
        for name, value in (("max_message", max_message), ("queue_limit", queue_limit)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(max_fds, bool) or not isinstance(max_fds, int) or \
                not 0 <= max_fds <= P.MAX_FDS:
            raise ValueError(f"max_fds must be an int in 0..{P.MAX_FDS}, got {max_fds!r}")
        self.max_message = max_message
        self.max_fds = max_fds
        self.queue_limit = queue_limit
        self.slow_consumer_timeout = float(slow_consumer_timeout)
        self.handshake_timeout = float(handshake_timeout)
        self.allowed_uids = list(allowed_uids) if allowed_uids is not None else None
        if traffic_log is not None and not isinstance(traffic_log, str):
            raise TypeError("traffic_log must be a file path (str)")
        self.traffic_log = traffic_log
        if links not in LINK_POLICIES:
            raise ValueError(f"links must be one of {sorted(LINK_POLICIES)}, got {links!r}")
        self.links = links
        self.ecipc = bool(ecipc)  # also serve electron-common-ipc clients (ipcbus.ecipc.gateway)
        # a broker linked to other brokers of bus ``bus`` over NATS (_federation_link)
        if federation is not None and (not isinstance(federation, str) or not all(
                u.strip().startswith(("nats://", "tls://")) for u in federation.split(","))):
            raise ValueError(f"federation must be a NATS URL (nats://HOST:PORT or"
                             f" tls://HOST:PORT, or several separated by commas), got"
                             f" {federation!r}")
        if not isinstance(bus, str) or not bus:
            raise ValueError(f"bus must be a non-empty str, got {bus!r}")
        if federation_options is not None and not isinstance(federation_options, dict):
            raise TypeError("federation_options must be a dict of nats-py connect() options")
        self.federation = federation
        self.bus = bus
        self.federation_options = dict(federation_options) if federation_options else None

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))
