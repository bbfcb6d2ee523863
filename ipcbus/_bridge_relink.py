"""A bridge's link that reconnects: ``IpcBusBridge.connect(address, reconnect=...)``.

When the link to the broker is lost (the broker died, or restarts: ``IpcBusBroker.create(
restart=True)``), the bridge's own bus goes on (its clients and pipe children talk among
themselves; requests that needed the broker failed at once, as without ``reconnect``), and a
*retry thread* (:class:`Relinker`) opens a new link with the policy's backoff (the pure
``_client.reconnect.Reconnect`` and ``LinkState``, as a client's). Once connected and past the
handshake, the new link is handed to the hub's thread, which makes it the router's upstream and
re-announces this side to the broker (``_router_relink.Relink``: the same peer ids, their
subscriptions and groups, their services, whose proxies across the bus are told "start").
Past ``give_up`` the link stays closed (logged), as a bridge without ``reconnect``.

Threads: the retry thread does the blocking work (connect, handshake) and touches the hub
only through ``hub.call_soon``; :meth:`Relinker.close` (the bridge's ``close()``) wakes it and
it ends without installing anything.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from . import _transport as T
from ._client.reconnect import LinkState, Reconnect
from ._hub import Hub
from ._hub_endpoint import HubEndpoint
from ._transport import close_fds

log = logging.getLogger("ipcbus")

__all__ = ["Relinker", "LinkEndpoint"]


class LinkEndpoint(HubEndpoint):
    """A relinked bridge's link: keeps the frames of local-only peers (ids the new broker
    refused, ``_router_relink``) from the broker. Costs one truth test per frame otherwise."""

    __slots__ = ()

    def __call__(self, key: Any, mask: int) -> None:
        """Served by the hub's loop like any callable it selects on (the loop's fast path
        is for plain ``HubEndpoint``s only)."""
        hub: Any = self.hub
        hub._on_io(self, mask)

    def deliver(self, raw: bytes | bytearray, fds: list[int], count: int = 1) -> None:
        relink = self.hub.router.relink
        if relink.local_only:
            kept = relink.strip_local_only(raw)
            if kept is not raw:
                if not kept:
                    close_fds(fds)
                    return
                raw, count = kept, max(1, count - 1)  # (count: statistics only)
        super().deliver(raw, fds, count)


class _Handover:
    """A new link on its way from the retry thread to the hub's thread: taken by the hub,
    or abandoned by the retry thread (which then closes it), never both (the relinker's
    lock)."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.taken = False
        self.abandoned = False


class Relinker:
    """The retry thread of one bridge's link (see the module docstring)."""

    def __init__(self, hub: Hub, address: T.Address, policy: Reconnect, *,
                 authkey: bytes | None, timeout: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.hub = hub
        self.address = address
        self.authkey = authkey
        self.timeout = timeout
        self.state = LinkState(policy, clock)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.relinked = 0  # how many times the link came back (for the tests and logs)
        hub.router.relink.reconnecting = True

    def lost(self, reason: str) -> None:
        """The link has closed (on the hub's thread): start retrying."""
        with self._lock:
            if not self.state.lost(reason):
                return
            self._wake.clear()
            self._thread = threading.Thread(
                target=self._run, name=f"ipcbus-bridge-relink {T.format_address(self.address)}",
                daemon=True)
            self._thread.start()
        log.warning("bridge: the link to the broker has closed (%s); this process and its pipe"
                    " children go on as a bus of their own, reconnecting", reason)

    def close(self) -> None:
        """The bridge closes: stop retrying (an attempt under way installs nothing)."""
        with self._lock:
            self.state.close()
            thread = self._thread
        self._wake.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(self.timeout + 1.0)

    def _run(self) -> None:
        while True:
            with self._lock:
                delay = self.state.next_delay()
                if delay is None:
                    if self.state.gave_up:
                        log.warning("bridge: the link stays closed: %s", self.state.reason)
                    return
            if self._wake.wait(delay):
                return  # closed
            try:
                sock, decoder, welcome = self._open()
            except (OSError, ConnectionError, ValueError) as exc:
                with self._lock:
                    self.state.attempt_failed(f"{type(exc).__name__}: {exc}")
                log.debug("bridge: relink attempt failed: %s", exc)
                continue
            handover = _Handover()
            self.hub.call_soon(lambda: self._install(sock, decoder, welcome, handover))
            if handover.done.wait(self.timeout + 5.0):
                return
            with self._lock:
                if handover.taken:  # (just now)
                    return
                handover.abandoned = True  # the hub did not take it (it is stopping)
                self.state.attempt_failed("the bridge's hub did not take the new link")
            sock.close()

    def _open(self) -> tuple[Any, Any, dict[str, Any]]:
        """Connect and do the handshake (blocking, on the retry thread)."""
        addr = self.address
        sock = T.connect_socket(addr, self.timeout)
        try:
            _, decoder, welcome = T.client_handshake(
                sock, tcp=T.is_tcp(addr), authkey=self.authkey, timeout=self.timeout,
                relay=True, max_message=self.hub.options.max_message)
        except BaseException:
            sock.close()
            raise
        return sock, decoder, welcome

    def _install(self, sock: Any, decoder: Any, welcome: dict[str, Any],
                 handover: _Handover) -> None:
        """On the hub's thread: the new link becomes the upstream, and this side is announced
        again (``_router_relink``)."""
        try:
            with self._lock:
                if handover.abandoned:  # the retry thread gave up on this one (closed it)
                    return
                handover.taken = True
                if not self.state.reconnected():  # closed meanwhile
                    sock.close()
                    return
            hub = self.hub
            router = hub.router
            link = hub.add_endpoint(
                sock, f"link to {T.format_address(self.address)}", ptype="socket", relay=True,
                ready=True, decoder=decoder, cls=LinkEndpoint)
            limit = int(welcome.get("max_message", 0))
            if 0 < limit < link.max_in:  # the new broker takes less than the first one did
                log.warning("bridge: the new broker's max_message (%d) is below this bridge's"
                            " (%d): larger messages from this side are refused at the link",
                            limit, link.max_in)
                link.max_in = limit  # (the sender is told, a request fails: never the link)
            router.upstream = link
            self.relinked += 1
            router.relink.start()
            log.info("bridge: the link to the broker is back (%s)",
                     T.format_address(self.address))
        finally:
            handover.done.set()
