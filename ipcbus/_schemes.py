"""Other kinds of bus a client can join (``"ecipc:..."``, electron-common-ipc's): each is
registered here by the module that speaks it, so that ``IpcBusClient.connect()`` hands such an
address over without importing that module (no import cycle; see tests/test_layout.py)."""
from __future__ import annotations

from typing import Any, Callable

# joiner(client, address, path, port, options) -> the connected client, or None when the
# address is not of its kind (then the next joiner, and at last the ipcbus bus, is tried)
Joiner = Callable[[Any, Any, "str | None", "int | None", dict[str, Any]], Any]

_joiners: list[Joiner] = []


def register(joiner: Joiner) -> None:
    """Add a kind of bus (once)."""
    if joiner not in _joiners:
        _joiners.append(joiner)


def join(client: Any, address: Any, path: str | None, port: int | None,
         options: dict[str, Any]) -> Any:
    """The client connected to a bus of another kind, or None if the address is ours."""
    for joiner in _joiners:
        joined = joiner(client, address, path, port, options)
        if joined is not None:
            return joined
    return None
