"""The per-process table of shared connections, safe across ``fork``.

Clients of one process that connect to the same address share one connection (the original's
"renderer affinity"): :mod:`ipcbus.client` keys its connections by address (and authkey, pipe
or bridge), :mod:`ipcbus.ecipc` by the Node broker's address. Both need the same small table:

* :meth:`ConnectionRegistry.open` returns the live connection of a key or makes one, under
  the table's lock, so two threads connecting at once make one connection; making it (socket,
  handshake, threads) happens under the lock, so a connection that dies at once is removed
  only after it was stored;
* :meth:`~ConnectionRegistry.discard` removes a connection that ended, only if it is still
  the one stored under its key (a newer connection of the same key stays);
* after ``fork``, in the child (``os.register_at_fork``): the lock is renewed (the parent may
  have held it while forking), every inherited connection is told
  (``after_fork_in_child()``: it belongs to the parent, the child must not touch its stream)
  and the table is emptied, so the child's next ``connect()`` opens its own connection.

The table is not a cache of sockets: it holds the connections alive in this process, nothing
more. Pure bookkeeping (a lock and a dict); it opens nothing itself.
"""
from __future__ import annotations

import logging
import os
import threading
import weakref
from typing import Callable, Generic, Hashable, Protocol, TypeVar

__all__ = ["ConnectionRegistry", "SharedConnection"]

log = logging.getLogger("ipcbus")


class SharedConnection(Protocol):
    """What the registry needs from a connection."""

    @property
    def closed(self) -> bool:
        """True once the connection has ended (the registry then opens a new one)."""
        ...

    def after_fork_in_child(self) -> None:
        """This object was inherited through ``fork``: never touch the parent's stream."""
        ...


K = TypeVar("K", bound=Hashable)
C = TypeVar("C", bound=SharedConnection)


class ConnectionRegistry(Generic[K, C]):
    """The connections of this process by key (thread-safe, renewed in a forked child)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._connections: dict[K, C] = {}
        ref = weakref.ref(self)  # the hook does not keep a registry alive

        def after_fork_in_child() -> None:
            registry = ref()
            if registry is not None:
                registry.after_fork_in_child()

        os.register_at_fork(after_in_child=after_fork_in_child)

    def open(self, key: K, make: Callable[[], C]) -> C:
        """The live connection of ``key``, or the one ``make()`` returns (stored under
        ``key``). ``make`` runs under the lock: it must not use this registry. Its exceptions
        propagate and nothing is stored."""
        with self._lock:
            conn = self._connections.get(key)
            if conn is not None and not conn.closed:
                return conn
            conn = make()
            self._connections[key] = conn
            return conn

    def get(self, key: K) -> C | None:
        """The connection stored under ``key`` (live or not), or None."""
        with self._lock:
            return self._connections.get(key)

    def discard(self, key: K, conn: C) -> bool:
        """Forget ``conn`` if it is still the one stored under ``key``; True if it was."""
        with self._lock:
            if self._connections.get(key) is conn:
                del self._connections[key]
                return True
            return False

    def items(self) -> list[tuple[K, C]]:
        """A copy of the table, in the order the connections were stored."""
        with self._lock:
            return list(self._connections.items())

    def __len__(self) -> int:
        with self._lock:
            return len(self._connections)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._connections

    def after_fork_in_child(self) -> None:
        """Run in a forked child (registered with ``os.register_at_fork``): renew the lock,
        tell every inherited connection, empty the table. A connection whose hook raises does
        not keep the others from being told."""
        self._lock = threading.Lock()
        inherited = list(self._connections.values())
        self._connections.clear()
        for conn in inherited:
            try:
                conn.after_fork_in_child()
            except Exception:  # a bug in that connection's hook: tell, and go on
                log.exception("ipcbus: after-fork hook of %r failed", conn)
