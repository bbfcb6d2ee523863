"""ipcbus on the bus of a Node/Electron application: electron-common-ipc (16.0.1 and later).

``IpcBusClient.create().connect("ecipc:/path/to.sock")`` (or ``"ecipc:PORT"``,
``"ecipc:HOST:PORT"``) joins the bus of an electron-common-ipc broker (Node's
``CreateIpcBusBroker()``) with the ordinary :class:`~ipcbus.IpcBusClient` API; services and
proxies interoperate with Node's ``CreateIpcBusService`` / ``CreateIpcBusServiceProxy``.

Modules: :mod:`._codec` (socket-serializer framing and the value mapping), :mod:`._envelope`
(commands, messages, peers), :mod:`._services` (the service protocols), :mod:`._requests`
(the requests in flight and how an answer settles one), :mod:`._connection` (the connection a
process's clients share: its I/O threads and listener dispatch), :mod:`.client`
(:class:`~ipcbus.ecipc.client.EcipcClient`), :mod:`.gateway` (Node peers on a Python broker:
``IpcBusBroker.create(ecipc=True)``). The first three are pure.

What electron-common-ipc's protocol cannot do, and what happens instead:

* descriptors, pipes and sockets (``post_message`` with ``ports``): ``IpcBusConnectionError``,
  nothing sent;
* "no listener" failure: a request with no listener ends at its timeout
  (``IpcBusRequestTimeoutError``); so does one whose receivers left (no peer-left notice);
* ``/ipcbus/queryState`` and ``/ipcbus/serviceAvailable``: ``IpcBusRequestError`` at once;
* service names are not claimed on the bus; a host that dies sends proxies no "stop";
* no authentication (``authkey`` raises ``ValueError``): protect the socket path.
"""
from __future__ import annotations

import os
from typing import Any

__all__ = ["PREFIX", "parse_address"]

PREFIX = "ecipc:"


def parse_address(address: Any, *, path: str | None = None, port: int | None = None
                  ) -> str | tuple[str, int] | None:
    """The socket address of an ``"ecipc:..."`` address (a path, or (host, port)); None if
    ``address`` is not one. With no address, ``IPCBUS_ADDRESS`` may hold one (unless this
    process has a bridge, which wins as for plain addresses)."""
    if address is None and path is None and port is None:
        env = os.environ.get("IPCBUS_ADDRESS", "")
        if not env.startswith(PREFIX):
            return None
        from .._local import bridge_of_this_process
        if bridge_of_this_process() is not None:
            return None
        address = env
    if not isinstance(address, str) or not address.startswith(PREFIX):
        return None
    rest = address[len(PREFIX):]
    if not rest:
        raise ValueError("an ecipc: address needs a socket path, a PORT or HOST:PORT")
    host, sep, tail = rest.rpartition(":")
    if rest.isdigit():
        host, tail, sep = "127.0.0.1", rest, ":"
    if sep and tail.isdigit() and "/" not in tail:
        number = int(tail)
        if not 0 < number < 65536:
            raise ValueError(f"port out of range in {address!r}")
        return (host or "127.0.0.1", number)
    return rest
