"""A client's life with its bus: ``on_closed``, and reconnection (``connect(reconnect=...)``).

:class:`Lifecycle` is a base of :class:`ipcbus.IpcBusClient`: its handlers (``on_closed``,
``on_disconnected``, ``on_reconnected``), ``wait_connected()``, and what happens when the
client's connection ends (``_connection_ended``): without a reconnection policy, the client
is closed (``on_closed``), as it always was; with one, a loss makes its :class:`Link` DOWN
(``on_disconnected(reason)``), and the link's *retry thread* opens a new connection and joins
it again, until it succeeds (``on_reconnected()``), ``close()`` is called, or ``give_up``
seconds have passed (closed for good: ``on_closed``). The policy and the state machine are
the pure unit ``reconnect.py``.

What a reconnection restores (SPEC 0.2, "Surviving a broker restart"): the peer id (proposed
again in PEER_ADD: ids are the client's, checked unique by the hub, and a restarted broker has
none), the listeners and groups (``joining.join`` subscribes the registry, which changed
locally meanwhile: registration while down is never refused), the spy, and, through
``on_reconnected`` handlers, the services (their hosts claim their names again, their proxies
ask for the status again: ``_service_host.py``, ``_service_proxy.py``).

Threads and locks: the retry thread takes no lock a user's call waits on. It connects and
does the handshake outside the registry's lock (``opening.reopen_connection``), joins like
``connect()`` (the client's registry lock only to subscribe), and holds the link's own lock
only to change the state (never while waiting). ``close()`` marks the link CLOSED first and
wakes the thread; an attempt that joined meanwhile sees it and leaves again. A user's
interrupt (Ctrl-C in ``wait_connected()``) leaves nothing held. Handlers run on the dispatch
thread of the connection concerned (``on_disconnected``: the old one's, as it ends;
``on_reconnected``: the new one's), or on the retry thread for ``on_closed`` after giving up.
"""
from __future__ import annotations

import functools
import logging
import threading
import time
from typing import Any, Callable

from typing_extensions import Self

from .._timeouts import DEFAULT_TIMEOUT, resolve_timeout
from ..emitter import Callbacks
from ..errors import IpcBusConnectionError, IpcBusError, IpcBusTimeoutError
from . import joining
from .connection import Connection
from .opening import forget, reopen_connection
from .reconnect import CLOSED, DOWN, LinkState, Reconnect
from .shm import settings as shm_settings

log = logging.getLogger("ipcbus")

__all__ = ["Lifecycle", "Link", "make_link"]


def _run_handlers(handlers: list[Callable[..., Any]], what: str, *args: Any) -> None:
    for handler in handlers:
        try:
            handler(*args)
        except BaseException:  # like a listener's (see connection.py)
            log.exception("%s handler %r raised", what, handler)


def make_link(client: Lifecycle, policy: Reconnect | None, key: Any,
              make_socket: Callable[[], Any], wait: float | None, opening: dict[str, Any]
              ) -> Link | None:
    """The link of ``connect(reconnect=policy)`` (None without a policy): ValueError for an
    address that cannot be opened again (a pipe, this process's bridge)."""
    link = client._link
    if link is not None and link.state.state == DOWN:
        raise IpcBusConnectionError("this client is reconnecting: close() it first")
    if policy is None:
        return None
    if isinstance(key, str) and key.startswith("ecipc:"):
        raise ValueError("reconnect is not available on an electron-common-ipc (ecipc:) bus")
    if opening["ptype"] != "socket":
        raise ValueError("reconnect needs the address of a bus (a Unix socket path, or TCP):"
                         " a pipe or this process's bridge cannot be opened again")
    reopen = functools.partial(reopen_connection, key, make_socket, **opening)
    return Link(client, policy, reopen, wait)


class Link:
    """A reconnecting client's link to its bus: the :class:`~.reconnect.LinkState` under its
    own lock, and the retry thread while it is DOWN (see the module docstring)."""

    def __init__(self, client: Lifecycle, policy: Reconnect, reopen: Callable[[], Connection],
                 attempt_timeout: float | None) -> None:
        self.client: Any = client  # an IpcBusClient (a joining.Joiner and a Lifecycle)
        self.reopen = reopen  # opens (or finds) the process's connection to the same address
        self.attempt_timeout = attempt_timeout if attempt_timeout is not None else DEFAULT_TIMEOUT
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)  # wait_connected() waits on it
        self.state = LinkState(policy, time.monotonic)
        self.wake = threading.Event()  # set by close(): the retry thread stops waiting
        self.info: list[Any] = []  # the peer tuple proposed again in PEER_ADD
        self.up_pending = False  # reconnected, and on_reconnected not run yet

    def take_up(self) -> bool:
        """Whether ``on_reconnected`` is due (once per reconnection)."""
        with self.lock:
            due, self.up_pending = self.up_pending, False
        return due

    def lost(self, reason: str, info: list[Any] | None) -> bool:
        """The connection ended without ``close()``: True if this starts a reconnection."""
        with self.lock:
            if info is None or not self.state.lost(reason):
                return False
            self.info = list(info)
        log.warning("ipcbus: peer %s lost its bus (%s); reconnecting", info[0], reason)
        return True

    def start(self) -> None:
        threading.Thread(target=self._run, daemon=True,
                         name=f"ipcbus-reconnect {self.info[0]}").start()

    def close(self) -> None:
        """``close()`` by the user: no more attempts; waiters raise."""
        with self.lock:
            self.state.close()
            self.changed.notify_all()
        self.wake.set()

    def check_call(self) -> None:
        with self.lock:
            self.state.check_call()

    def wait(self, timeout: float | None) -> None:
        """Until the link is up (IpcBusTimeoutError after ``timeout`` seconds; None: no
        limit), or IpcBusConnectionError once it is closed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.changed:
            while self.state.state == DOWN:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise IpcBusTimeoutError(f"the bus did not come back within {timeout:g} s"
                                             f" ({self.state.reason})")
                self.changed.wait(left)
            if self.state.state == CLOSED:
                raise IpcBusConnectionError(f"the client is closed: {self.state.reason}")

    # -- the retry thread -------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self.lock:
                delay = self.state.next_delay()
                if delay is None:
                    gave_up = self.state.gave_up
                    reason = self.state.reason
                    self.changed.notify_all()
                    break
            self.wake.wait(delay)
            with self.lock:
                if self.state.state != DOWN:
                    continue  # closed meanwhile: the next turn ends
            error = self._attempt()
            if error is None:
                return
            with self.lock:
                self.state.attempt_failed(error)
            log.debug("ipcbus: reconnection of %s failed: %s", self.info[0], error)
        if gave_up:
            log.warning("ipcbus: peer %s is closed: %s", self.info[0], reason)
            self.client._closed_for_good()

    def _attempt(self) -> str | None:
        """One attempt: None if the client joined again (or was closed meanwhile), else why
        it failed."""
        client = self.client
        peer = client._peer
        try:
            conn = self.reopen()
        except Exception as exc:  # IpcBusConnectionError, OSError: no bus there yet
            return str(exc)
        try:
            joining.join(client, conn, list(self.info), self.attempt_timeout)
        except Exception as exc:
            client._peer = peer  # the client keeps its identity while down
            with conn.lock:
                unused = not conn.clients
            if unused:  # ours alone: do not keep it open
                forget(conn)
                conn.close(0.5)
            return f"joining again failed: {exc}"
        self._restore_spy(client)
        # the new connection's shared memory: a client that asked for none tells the hub again
        client._shm_threshold, client._shm_limit = shm_settings(
            conn, client._shm_threshold, client._shm_limit, client._member)
        with self.lock:
            ok = self.up_pending = self.state.reconnected()
            self.changed.notify_all()
        if not ok:  # close() came meanwhile: leave again
            joining.leave_connection(client, conn, 1.0)
            if client._conn is conn:
                client._conn = None
            return None
        log.info("ipcbus: peer %s reconnected", self.info[0])
        conn.call_soon(client._fire_reconnected)
        return None

    def _restore_spy(self, client: Any) -> None:
        if client._spy_handler is not None and client._spy_pattern is not None:
            try:
                client._start_spy(client._spy_pattern, client._spy_handler,
                                  self.attempt_timeout)
            except IpcBusError as exc:
                log.warning("ipcbus: the spy of %s was not restored: %s", self.info[0], exc)


class Lifecycle:
    """The client's handlers of its bus's life, and its reconnection (module docstring)."""

    _conn: Connection | None
    _member: Any
    _peer: Any
    _closed_fired: bool
    _spy_handler: Any
    _spy_pattern: str | None
    _start_spy: Callable[[str, Callable[[Any], None], float | None], None]

    def __init__(self) -> None:
        super().__init__()
        self._closed_handlers = Callbacks()
        self._disconnected: list[Callable[[str], None]] = []
        self._reconnected: list[Callable[[], None]] = []
        self._closed_fired = False
        self._fire_lock = threading.Lock()
        self._link: Link | None = None  # set by connect(reconnect=...)

    def on_closed(self, handler: Callable[[], None]) -> Self:
        """Call ``handler()`` (on the dispatch thread) when this client is closed: by
        ``close()``, when its bus goes (without ``reconnect``), or when it gives up
        reconnecting (with ``reconnect``: a loss it survives is ``on_disconnected``)."""
        self._closed_handlers.add(handler)
        return self

    def off_closed(self, handler: Callable[[], None]) -> Self:
        """Forget a handler given to :meth:`on_closed`."""
        self._closed_handlers.remove(handler)
        return self

    def on_disconnected(self, handler: Callable[[str], None]) -> Self:
        """Call ``handler(reason)`` when the bus is lost and the client (connected with
        ``reconnect``) starts reconnecting; calls raise IpcBusConnectionError meanwhile."""
        with self._fire_lock:
            self._disconnected = [*self._disconnected, handler]
        return self

    def off_disconnected(self, handler: Callable[[str], None]) -> Self:
        with self._fire_lock:
            self._disconnected = [h for h in self._disconnected if h != handler]
        return self

    def on_reconnected(self, handler: Callable[[], None]) -> Self:
        """Call ``handler()`` (on the dispatch thread) once the client has joined the bus
        again: same peer id, its listeners, groups and spy subscribed again."""
        with self._fire_lock:
            self._reconnected = [*self._reconnected, handler]
        return self

    def off_reconnected(self, handler: Callable[[], None]) -> Self:
        with self._fire_lock:
            self._reconnected = [h for h in self._reconnected if h != handler]
        return self

    def wait_connected(self, timeout: float | None = None) -> None:
        """Return once the client is connected: at once if it is, else when its bus is back.

        ``timeout`` (seconds; None or 0 = 2.0 s, negative = no limit): then
        :class:`~ipcbus.IpcBusTimeoutError`. Raises :class:`~ipcbus.IpcBusConnectionError`
        if the client is closed for good (or was never connected)."""
        wait = resolve_timeout(timeout)
        link = self._link
        if link is None:
            conn = self._conn
            if conn is None or conn.closed:
                raise IpcBusConnectionError("the client is not connected")
            return
        link.wait(wait)

    def _down(self, conn: Connection) -> None:
        """Raise the error of a call on ``conn``, which has ended."""
        link = self._link
        if link is not None and not conn.forked:  # (a forked child: the fork's error)
            link.check_call()
        conn.check_usable()

    def _connection_ended(self, conn: Connection) -> None:
        """The connection has ended (on its dispatch thread), or ``close()`` was called."""
        link = self._link
        if link is not None and link.lost(conn.close_reason or "the bus connection has closed",
                                          self._member.info):
            self._fire_reconnected()  # lost before they ran: up, then down, in that order
            _run_handlers(list(self._disconnected), "on_disconnected", link.state.reason)
            link.start()
            return
        self._closed_for_good(conn)

    def _closed_for_good(self, conn: Connection | None = None) -> None:
        with self._fire_lock:  # never held while waiting: safe from the dispatch thread
            if self._closed_fired:
                return
            self._closed_fired = True
        # self._conn stays: later calls then raise IpcBusConnectionError with the reason

        def fire() -> None:
            _run_handlers(self._closed_handlers.snapshot(), "on_closed")

        if conn is None or conn.on_dispatch_thread() or conn.dispatch_done.is_set():
            fire()
        else:
            conn.call_soon(fire)

    def _fire_reconnected(self) -> None:
        link = self._link
        if link is not None and link.take_up():
            _run_handlers(list(self._reconnected), "on_reconnected")
