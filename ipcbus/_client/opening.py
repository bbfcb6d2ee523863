"""Finding or opening the process's connection for the arguments of ``connect()``.

The process's connections are kept in a :class:`~ipcbus._registry.ConnectionRegistry`
(``connections``: one per bus address, per TCP key, per bridge or pipe), shared by every
client that connects there. After ``fork`` the child's copies are closed and the registry is
emptied (by the registry).
"""
from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import multiprocessing.util
import os
import socket
import time
from typing import Any, Callable

from .. import _transport as T
from .._local import bridge_of_this_process
from .._registry import ConnectionRegistry
from ..errors import IpcBusConnectionError
from .connection import Connection

__all__ = ["open_connection", "reopen_connection", "waiting_socket", "resolve", "forget",
           "build"]

DEFAULT_SOCKET_BUFFER = 64 * 1024  # bytes of a burst written at once
connections: ConnectionRegistry[Any, Connection] = ConnectionRegistry()


def forget(conn: Connection) -> None:
    """Drop ``conn`` from the registry (it has ended, or its last client left)."""
    connections.discard(conn.key, conn)


def build(key: Any, sock: socket.socket, *, tcp: bool, ptype: str, timeout: float,
          authkey: bytes | None, socket_buffer: int | None) -> Connection:
    """A connection over ``sock`` (which it owns, closed on failure), handshake done, its
    threads not started yet (``Connection.start``)."""
    T.tune_socket(sock)
    try:
        transport, decoder, welcome = T.client_handshake(
            sock, tcp=tcp, authkey=authkey, timeout=timeout)
        sock.settimeout(None)
    except BaseException:
        sock.close()
        raise
    coalesce = DEFAULT_SOCKET_BUFFER if socket_buffer is None else socket_buffer
    decoder.merge_runs = True
    conn = Connection(key, transport, decoder, welcome, ptype, coalesce)
    conn.forget = lambda: forget(conn)
    # Run at interpreter exit and by multiprocessing's own exit path in its children
    # (which skips atexit): a burst sent just before the end still goes out.
    conn.exit_flush = multiprocessing.util.Finalize(conn, conn.writer.flush_at_exit,
                                                    exitpriority=10)
    return conn


def open_connection(key: Any, make_socket: Callable[[], socket.socket], *, tcp: bool,
                    ptype: str, timeout: float, authkey: bytes | None,
                    socket_buffer: int | None) -> Connection:
    """The process's connection for ``key``: the existing one, or a new one (handshake done)."""
    def make() -> Connection:
        conn = build(key, make_socket(), tcp=tcp, ptype=ptype, timeout=timeout,
                     authkey=authkey, socket_buffer=socket_buffer)
        conn.start()
        return conn

    return connections.open(key, make)


def reopen_connection(key: Any, make_socket: Callable[[], socket.socket], *, tcp: bool,
                      ptype: str, timeout: float, authkey: bytes | None,
                      socket_buffer: int | None) -> Connection:
    """Like :func:`open_connection`, with the socket and the handshake made outside the
    registry's lock (the lock is then held only to store the connection): for the retry
    thread of a reconnecting client and for ``connect(timeout=T)`` waiting for a broker
    to appear, which must not hold up other clients' ``connect()`` meanwhile."""
    existing = connections.get(key)
    if existing is not None and not existing.closed:
        return existing
    made = build(key, make_socket(), tcp=tcp, ptype=ptype, timeout=timeout, authkey=authkey,
                 socket_buffer=socket_buffer)

    def make() -> Connection:
        made.start()
        return made

    conn = connections.open(key, make)
    if conn is not made:  # another thread stored one meanwhile: ours is not needed
        made.exit_flush.cancel()
        made.transport.close()
    return conn


def waiting_socket(path: str, deadline: float) -> Callable[[], socket.socket]:
    """A socket maker for ``connect(path, timeout=T)``: connect to the Unix socket at
    ``path``, trying again while it does not exist yet (a broker about to listen there),
    until ``deadline`` (``time.monotonic()``), then :class:`IpcBusConnectionError` as for
    any address with no bus. A file that refuses connections fails at once, as before (a
    dead broker's file: docs/reliability.md), unless it appeared while we waited (a broker
    between its ``bind`` and its ``listen``)."""
    def make() -> socket.socket:
        pause, was_missing = 0.005, False
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                sock.connect(path)
                return sock
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                sock.close()
                if isinstance(exc, ConnectionRefusedError) and not was_missing:
                    raise IpcBusConnectionError(
                        f"cannot connect to the bus at {path}: {exc}") from None
                was_missing = True
                left = deadline - time.monotonic()
                if left <= 0:
                    raise IpcBusConnectionError(
                        f"cannot connect to the bus at {path}: no broker listened there in"
                        f" time ({exc})") from None
                time.sleep(min(pause, left))
                pause = min(pause * 2, 0.1)
            except OSError as exc:
                sock.close()
                raise IpcBusConnectionError(
                    f"cannot connect to the bus at {path}: {exc}") from None
    return make


def _pipe_socket(pipe: multiprocessing.connection.Connection) -> Callable[[], socket.socket]:
    def make() -> socket.socket:
        if pipe.closed:
            raise IpcBusConnectionError("this Connection is closed (a client that connected"
                                        " with it took it over; connect() with no address"
                                        " joins the same bus)")
        sock = socket.socket(fileno=os.dup(pipe.fileno()))
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            sock.close()
            raise IpcBusConnectionError("not a bridge pipe: use IpcBusBridge.open_pipe()")
        pipe.close()  # the client owns the pipe from now on
        return sock
    return make


def resolve(address: Any, path: str | None, port: int | None, host: str | None,
            timeout: float, authkey: bytes | None
            ) -> tuple[Any, Callable[[], socket.socket], bool, str]:
    """(registry key, socket maker, tcp, peer type) for the arguments of ``connect()``."""
    if isinstance(address, multiprocessing.connection.Connection):
        return ("pipe", address), _pipe_socket(address), False, "pipe"
    if address is None and path is None and port is None:
        bridge = bridge_of_this_process()
        if bridge is not None:
            return ("bridge", bridge), bridge.attach_local, False, "main"
        for key, conn in connections.items():
            if conn.ptype == "pipe" and not conn.closed:
                return key, _no_socket, False, "pipe"  # the pipe this process joined with
    addr = T.parse_address(address, path=path, port=port, host=host)
    tcp = T.is_tcp(addr)
    # A TCP connection is shared only by clients that proved the same key.
    key = (addr, authkey if authkey is not None else T.default_authkey()) if tcp else addr
    return key, lambda: T.connect_socket(addr, timeout), tcp, "socket"


def _no_socket() -> socket.socket:
    raise IpcBusConnectionError("the pipe connection of this process has closed")
