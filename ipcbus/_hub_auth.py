"""TCP authentication for a hub: the authkey challenge, with bounded threads and deadlines.

multiprocessing's HMAC challenge is blocking, so each authentication runs on a short-lived
thread of its own and a slow peer never stalls the hub's loop. The bounds (SPEC "Resources",
docs/reliability.md):

* At most ``MAX_AUTHENTICATIONS`` run at once. Further connections wait without a thread,
  at most ``AUTH_WAITING`` of them (the oldest gives way to a new one), each for at most
  2 x ``handshake_timeout``; a free slot goes to the *newest* waiting connection (the older
  ones are likelier to be the silent part of a burst). A client arriving right after a burst
  must be able to wait a little longer than one ``handshake_timeout``, the time a slot takes
  to free: with exactly one, it raced the burst's timeouts and was dropped about half the
  time.
* A started authentication has one overall deadline of ``handshake_timeout`` (a peer
  trickling bytes gets no more time): past it, its socket is shut down, so its thread fails
  at once and closes it.
* Dropped waiting connections are counted and logged at most once per 10 s.

Threads: :meth:`TcpAuthenticator.admit`, :meth:`check` and :meth:`close` run on the hub's
loop thread, which alone touches the counts; an authentication thread owns its socket and
reports back through ``call_soon``.
"""
from __future__ import annotations

import collections
import logging
import multiprocessing
import socket
import threading
import time
from typing import Any, Callable

from . import _transport as T

__all__ = ["TcpAuthenticator", "MAX_AUTHENTICATIONS", "AUTH_WAITING"]

log = logging.getLogger("ipcbus")

MAX_AUTHENTICATIONS = 32
AUTH_WAITING = 256
_LOG_INTERVAL = 10.0


class TcpAuthenticator:
    """The TCP authentications of one hub. ``call_soon`` runs a callable on the loop thread;
    ``admitted(sock, label)`` is called there for a connection that proved the key."""

    def __init__(self, authkey: bytes, handshake_timeout: float,
                 call_soon: Callable[[Callable[[], None]], None],
                 admitted: Callable[[socket.socket, str], Any]) -> None:
        self.authkey = authkey
        self.timeout = handshake_timeout
        self._call_soon = call_soon
        self._admitted = admitted
        self.closed = False
        self.running = 0  # authentication threads alive
        self.waiting: collections.deque[tuple[socket.socket, float]] = collections.deque()
        self.dropped = 0  # connections dropped while waiting for a slot, in all
        self._unlogged = 0
        self._logged = -1e9
        # running authentications: socket -> overall deadline; -1.0 once shut down
        self._deadlines: dict[socket.socket, float] = {}

    def admit(self, sock: socket.socket) -> None:
        """A new TCP connection: authenticate it now, or let it wait for a slot."""
        if self.running < MAX_AUTHENTICATIONS:
            self._start(sock)
            return
        if len(self.waiting) >= AUTH_WAITING:  # the oldest waiting one gives way
            self._drop_waiting(self.waiting.popleft()[0])
        self.waiting.append((sock, time.monotonic() + 2 * self.timeout))

    def check(self, now: float) -> None:
        """Deadlines: drop connections that waited too long, shut down late ones."""
        if self.waiting:
            self._expire_waiting(now)
        if self._deadlines:
            for sock, deadline in list(self._deadlines.items()):
                if 0.0 <= deadline < now:
                    self._deadlines[sock] = -1.0  # shut down once; the thread closes it
                    log.warning("refused a TCP connection: authentication not completed in"
                                " %g s", self.timeout)
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
        if self._unlogged:
            self._log_dropped()

    def close(self) -> None:
        """The hub is closing: drop the waiting connections (running threads close theirs)."""
        self.closed = True
        while self.waiting:
            self.waiting.popleft()[0].close()
        self._logged = -1e9
        self._log_dropped()  # the count not logged yet

    def state(self) -> dict[str, int]:
        return {"running": self.running, "waiting": len(self.waiting),
                "dropped_waiting": self.dropped}

    # -- the threads ---------------------------------------------------------------------------
    def _start(self, sock: socket.socket) -> None:
        self.running += 1
        self._deadlines[sock] = time.monotonic() + self.timeout
        try:
            threading.Thread(target=self._authenticate, args=(sock,), daemon=True,
                             name="ipcbus-auth").start()
        except RuntimeError as exc:  # cannot start a thread
            self.running -= 1
            del self._deadlines[sock]
            log.warning("refused a TCP connection: %s", exc)
            sock.close()

    def _authenticate(self, sock: socket.socket) -> None:
        """The challenge, on its own thread (which owns ``sock`` until it hands it over)."""
        try:
            peer = sock.getpeername()
            sock.setblocking(True)
            T.set_timeouts(sock, self.timeout)
            T.authenticate_server(sock, self.authkey)
            T.set_timeouts(sock, None)
        except (OSError, EOFError, multiprocessing.AuthenticationError) as exc:
            log.warning("refused a TCP connection: authentication failed (%s)", exc)
            sock.close()
            self._call_soon(lambda: None if self._done(sock) else None)
            return
        label = f"tcp {peer[0]}:{peer[1]}"

        def admit() -> None:
            if self._done(sock):
                self._admitted(sock, label)
            else:  # past its overall deadline meanwhile
                sock.close()

        self._call_soon(admit)
        if self.closed:
            sock.close()

    def _done(self, sock: socket.socket) -> bool:
        """A slot is free: start the newest waiting connection. False if ``sock``'s
        authentication had passed its overall deadline."""
        in_time = self._deadlines.pop(sock, 0.0) >= 0.0
        self.running -= 1
        self._expire_waiting(time.monotonic())
        while self.waiting and self.running < MAX_AUTHENTICATIONS:
            self._start(self.waiting.pop()[0])
        return in_time

    # -- waiting connections -------------------------------------------------------------------
    def _expire_waiting(self, now: float) -> None:
        waiting = self.waiting
        while waiting and waiting[0][1] <= now:
            self._drop_waiting(waiting.popleft()[0])

    def _drop_waiting(self, sock: socket.socket) -> None:
        sock.close()
        self.dropped += 1
        self._unlogged += 1
        self._log_dropped()

    def _log_dropped(self) -> None:
        now = time.monotonic()
        if self._unlogged and now - self._logged > _LOG_INTERVAL:
            log.warning("refused %d TCP connection(s) waiting for authentication: %d"
                        " authentications running (the cap), %d waiting (at most %d, each for"
                        " at most %g s)", self._unlogged, self.running, len(self.waiting),
                        AUTH_WAITING, 2 * self.timeout)
            self._unlogged = 0
            self._logged = now
