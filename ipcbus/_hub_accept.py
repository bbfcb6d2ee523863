"""How connections get into a hub: its listening socket and who is admitted.

:class:`Acceptor` owns the listening socket of a hub (a Unix socket path, or TCP) and decides
admission before any frame is read (SPEC "Trust"):

* a Unix socket peer is admitted if the kernel's credentials (``SO_PEERCRED``) show the
  hub's uid or one of ``allowed_uids``; a refused one is told why in a NOTICE (so its client
  does not just see "Broken pipe"). With ``ecipc``, its first byte tells whether it speaks
  ipcbus or electron-common-ipc (``ipcbus.ecipc.gateway``);
* a TCP peer must prove the authkey first (``_hub_auth.TcpAuthenticator``, bounded).

Out of descriptors (``EMFILE``), the listener is unwatched for ``ACCEPT_BACKOFF`` seconds
instead of spinning, and the error is logged once per 10 s. Closing removes the socket file
only if it is still this hub's (same device and inode): another broker may have replaced it.
Threads: the hub's loop thread only.
"""
from __future__ import annotations

import logging
import os
import selectors
import socket
import time
from typing import Any, Callable, Protocol

from . import _transport as T
from ._hub_auth import TcpAuthenticator
from ._hub_options import HubOptions

__all__ = ["Acceptor", "ACCEPT_BACKOFF"]

log = logging.getLogger("ipcbus")

ACCEPT_BACKOFF = 0.25
_LOG_INTERVAL = 10.0


class AcceptorOwner(Protocol):
    """What the acceptor needs of its hub."""

    options: HubOptions
    owned: Any  # sockets to close in a forked child

    @property
    def selector(self) -> selectors.BaseSelector: ...

    def call_soon(self, fn: Callable[[], None]) -> None: ...

    def add_endpoint(self, sock: socket.socket, label: str, *, ptype: str, pid: int = 0,
                     cred_pid: int | None = None) -> Any: ...


class Acceptor:
    """The listening socket of a hub, and admission."""

    def __init__(self, hub: AcceptorOwner, authkey: bytes) -> None:
        self.hub = hub
        self.listener: socket.socket | None = None
        self.address: T.Address | None = None
        self.auth = TcpAuthenticator(
            authkey, hub.options.handshake_timeout, hub.call_soon,
            lambda sock, label: hub.add_endpoint(sock, label, ptype="socket"))
        self._paused_until = 0.0  # out of descriptors: accept again after this time
        self._logged = -1e9
        self._socket_file: tuple[int, int] | None = None  # (st_dev, st_ino) of our socket

    def listen(self, address: T.Address) -> T.Address:
        if self.hub.options.ecipc and not isinstance(address, str):
            raise ValueError("ecipc=True needs a Unix socket path (Node clients cannot"
                             " authenticate over TCP)")
        sock = T.listen(address)
        sock.setblocking(False)
        self.hub.owned.add(sock)
        self.listener = sock
        self.address = address if isinstance(address, str) else sock.getsockname()[:2]
        if isinstance(address, str):
            st = os.stat(address)
            self._socket_file = (st.st_dev, st.st_ino)
        self.hub.selector.register(sock, selectors.EVENT_READ, self._on_accept)
        return self.address

    def check(self, now: float) -> None:
        """Deadlines: watch the listener again after a back-off; the authentications'."""
        if self._paused_until and now >= self._paused_until:
            self._paused_until = 0.0
            assert self.listener is not None
            self.hub.selector.register(self.listener, selectors.EVENT_READ, self._on_accept)
        self.auth.check(now)

    def close(self) -> None:
        self.auth.close()
        if self.listener is None:
            return
        try:
            self.hub.selector.unregister(self.listener)
        except (KeyError, ValueError):
            pass
        self.listener.close()
        if isinstance(self.address, str) and self._socket_file is not None:
            try:
                st = os.stat(self.address)
                if (st.st_dev, st.st_ino) == self._socket_file:
                    os.unlink(self.address)
            except OSError:
                pass

    def _on_accept(self, key: selectors.SelectorKey, mask: int) -> None:
        assert self.listener is not None
        for _ in range(64):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: back off, keep serving the others
                now = time.monotonic()
                if now - self._logged > _LOG_INTERVAL:
                    log.error("accept failed (new connections wait %g s): %s",
                              ACCEPT_BACKOFF, exc)
                    self._logged = now
                # The listener stays readable: stop watching it for a while instead of spinning.
                self.hub.selector.unregister(self.listener)
                self._paused_until = now + ACCEPT_BACKOFF
                return
            self.admit(sock)

    def admit(self, sock: socket.socket) -> None:
        """A new connection: serve it, authenticate it (TCP), or refuse it."""
        if sock.family != socket.AF_UNIX:
            self.auth.admit(sock)
            return
        try:
            pid, uid, _ = T.peer_credentials(sock)
        except OSError as exc:
            log.warning("refused a connection: no peer credentials (%s)", exc)
            sock.close()
            return
        hub = self.hub
        if not T.peer_uid_allowed(uid, os.getuid(), hub.options.allowed_uids):
            reason = f"uid {uid} is not allowed"
            log.warning("refused a connection from pid %d: %s", pid, reason)
            T.send_refusal(sock, reason)  # so its client can say why, not "Broken pipe"
            sock.close()
            return
        if hub.options.ecipc:  # the first byte tells the protocols apart (issue 19)
            from .ecipc.gateway import gateway_of

            def as_ipcbus(conn: socket.socket, label: str) -> None:  # on its thread
                def add() -> None:
                    hub.add_endpoint(conn, label, ptype="socket", pid=pid, cred_pid=pid)
                hub.call_soon(add)
            gateway_of(hub).classify(sock, f"pid {pid}", as_ipcbus)
            return
        hub.add_endpoint(sock, f"pid {pid}", ptype="socket", pid=pid, cred_pid=pid)
