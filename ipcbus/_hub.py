"""The hub: the router behind a selectors loop (a broker's process, or a bridge's thread).

:class:`Hub` is the loop. One thread runs it and nothing else touches its state; other threads
hand it work with :meth:`Hub.call_soon`. It accepts connections, reads them, hands each decoded
frame to the shared :class:`~ipcbus._router.Router`, and writes what the router queued. Its
parts, each in a module of its own:

* ``_hub_endpoint.HubEndpoint``: one connection (who its peers are, its decoder, the
  descriptors waiting for their frame) with its output queue (``_outqueue.OutQueue``);
* ``_hub_accept.Acceptor``: the listening socket and admission (credentials, uids), with
  ``_hub_auth.TcpAuthenticator`` (the TCP authentications, bounded); ``_handshake``: what a
  HELLO may ask (the pid, the link role), decided from what the hub knows;
* ``_hub_flow.Flow``: back-pressure and slow consumers carried out, as the pure policy
  ``_backpressure.BackPressure`` decides (clock injected, unit-tested);
* ``_hub_options.HubOptions``: the limits.

Connections end in two ways: :meth:`Hub.drop` closes one now and forgets what it owned;
a slow consumer is cut off first (``Flow.cut_off``: its queue dropped, it is read no more, its
descriptor kept until the closing NOTICE is written or ``CLOSING_GRACE`` passes). An error
while serving one connection drops only it (SPEC "Resources"). Every router call is
contained the same way.
"""
from __future__ import annotations

import collections
import logging
import os
import selectors
import socket
import threading
import time
import weakref
from typing import Any, Callable

from . import _backpressure as BP
from . import _protocol as P
from . import _transport as T
from ._decoder import FrameDecoder
from ._handshake import HandshakeRefused, read_hello
from ._hub_accept import Acceptor
from ._hub_endpoint import HubEndpoint
from ._hub_flow import Flow
from ._hub_options import HubOptions
from ._hub_shm import ActiveMessage, HubShm
from ._router import Router
from .errors import IpcBusProtocolError
from .traffic import TrafficLog

__all__ = ["Hub", "CLOSING_GRACE", "HARD_LIMIT_FACTOR", "hub_state"]

log = logging.getLogger("ipcbus")

_TICK = 0.25
_CHECK_INTERVAL = 0.01  # deadlines (handshakes, slow consumers, closing) are checked this often
# How long a slow consumer's descriptor is kept after its disconnect, so that the closing NOTICE
# can still be written when it resumes reading (it holds one descriptor and a few bytes).
CLOSING_GRACE = 10.0
# A receiver overflowed by a relay (never paused) is disconnected past this many queue limits.
HARD_LIMIT_FACTOR = 2
_TRIM_INTERVAL = 1.0  # how often idle read buffers shrink back (FrameDecoder.trim)
_READ, _WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE


class Hub:
    """A router behind a selectors loop: accepts, reads, routes, writes. Single-threaded."""

    def __init__(self, options: HubOptions, *, authkey: bytes | None = None,
                 owner_pid: int | None = None) -> None:
        self.options = options
        self.owner_pid = owner_pid  # the process that started this hub (links="owner")
        self.router = Router(os.getpid(), state_extra=lambda: hub_state(self),
                             max_message=options.max_message, dup_fds=T.dup_copies)
        self.selector = selectors.DefaultSelector()
        self.endpoints: set[HubEndpoint] = set()
        self.dirty: set[HubEndpoint] = set()  # endpoints with output to flush
        self.queue_limit = options.queue_limit
        self.flow = Flow(self, BP.BackPressure(
            options.queue_limit, options.slow_consumer_timeout, hard_factor=HARD_LIMIT_FACTOR,
            closing_grace=CLOSING_GRACE))
        self.current: HubEndpoint | None = None  # the endpoint whose frames are being routed
        self._stop = False
        self.inbox = Inbox(lambda exc: self._contain(None, exc))
        self.selector.register(self.inbox.fileno(), selectors.EVENT_READ, self.inbox.run)
        self._next_endpoint = 0
        self.owned: weakref.WeakSet[socket.socket] = weakref.WeakSet()  # closed after fork
        self._next_trim = 0.0
        self._closed = False
        self.acceptor = Acceptor(self, authkey if authkey is not None else T.default_authkey())
        self.traffic: TrafficLog | None = None
        if options.traffic_log:
            self.traffic = TrafficLog(options.traffic_log)
            self.router.observers.append(self.traffic)
        self.on_drop: Callable[[str, str, bool], None] | None = None  # (label, reason, upstream)
        self.thread: threading.Thread | None = None
        self.shm = HubShm(self)  # large payloads through shared memory (_hub_shm.py)
        self.shm_active: ActiveMessage | None = None  # the message with slots being routed
        self.shm.install(self.router._handlers)
        self.state_parts: list[Callable[[], dict[str, Any]]] = []  # more of the state (a link's)

    # -- setup -----------------------------------------------------------------------------------
    def listen(self, address: T.Address) -> T.Address:
        """Accept connections at ``address``; the address bound (the real port for 0)."""
        return self.acceptor.listen(address)

    @property
    def address(self) -> T.Address | None:
        return self.acceptor.address

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop thread (thread-safe). Ignored once the hub has shut down."""
        if not self._closed:
            self.inbox.put(fn)

    def stop(self) -> None:
        self._stop = True

    def start_thread(self, name: str) -> None:
        """Run the loop on a daemon thread of this process (the bridge does)."""
        self.thread = threading.Thread(target=self.serve_forever, name=name, daemon=True)
        _in_process_hubs.add(self)
        self.thread.start()

    # -- the loop -------------------------------------------------------------------------------
    def serve_forever(self) -> None:
        select, monotonic = self.selector.select, time.monotonic
        endpoints = self.endpoints
        next_check = 0.0
        try:
            while not self._stop:
                for key, mask in select(_TICK):
                    data = key.data
                    try:
                        if data.__class__ is HubEndpoint:
                            if mask == _READ:  # the common case: see _on_io
                                if data in endpoints and not data.paused:
                                    self._read(data)
                            else:
                                self._on_io(data, mask)
                        else:
                            data(key, mask)
                        if self.dirty:
                            self._flush_dirty()
                    except Exception as exc:  # serving one connection never stops the hub
                        self._contain(data if isinstance(data, HubEndpoint) else None, exc)
                now = monotonic()
                if now >= next_check:
                    next_check = now + _CHECK_INTERVAL
                    self._check_deadlines(now)
        finally:
            self._shutdown()

    def _contain(self, ep: HubEndpoint | None, exc: Exception) -> None:
        """An unexpected error while serving ``ep`` (or the loop's own work): logged; that
        connection is dropped, the hub goes on (SPEC "Resources")."""
        log.error("internal error while serving %s: %r", ep.label if ep else "the hub", exc,
                  exc_info=exc)
        if ep is not None and ep in self.endpoints:
            self.drop(ep, f"internal error while serving it: {exc!r}")

    def add_endpoint(self, sock: socket.socket, label: str, *, ptype: str, pid: int = 0,
                     cred_pid: int | None = None, relay: bool = False,
                     ready: bool = False, decoder: FrameDecoder | None = None,
                     cls: type[HubEndpoint] = HubEndpoint) -> HubEndpoint:
        """Serve a connected socket (on the loop thread). ``ptype``/``pid``: who its peers are
        (``cred_pid``: the pid the kernel reported; else the HELLO's is taken); ``relay``: a
        link this hub made; ``ready``: handshake already done; ``decoder``: the one that read
        the handshake, with any bytes that followed it; ``cls``: a subclass (a relinked
        bridge's link, ``_bridge_relink``: served by calling it, off the loop's fast path)."""
        sock.setblocking(False)
        T.tune_socket(sock)
        self.owned.add(sock)
        self._next_endpoint += 1
        ep = cls(self, T.StreamTransport(sock), f"#{self._next_endpoint} ({label})", ptype,
                 pid, cred_pid)
        ep.relay = relay
        ep.ready = ready
        if ready:
            ep.decoder.max_message = self.options.max_message
        if decoder is not None:
            decoder.merge_runs = True
            ep.decoder = decoder
            if decoder.has_input:
                self.call_soon(lambda: self._read(ep) if ep in self.endpoints else None)
        self.endpoints.add(ep)
        ep.events = selectors.EVENT_READ
        self.selector.register(ep.transport, selectors.EVENT_READ, ep)
        return ep

    def _on_io(self, ep: HubEndpoint, mask: int) -> None:
        if ep not in self.endpoints:  # dropped earlier in this batch of events
            return
        if mask & selectors.EVENT_WRITE:
            self._flush(ep)
        if mask & selectors.EVENT_READ and ep in self.endpoints and not ep.paused:
            self._read(ep)

    # -- input ----------------------------------------------------------------------------------
    def _read(self, ep: HubEndpoint) -> None:
        decoder = ep.decoder
        try:
            nbytes, fds = ep.transport.recv_into(decoder.get_buffer())
        except (BlockingIOError, InterruptedError):
            return
        except IpcBusProtocolError as exc:
            self.drop(ep, f"protocol error: {exc}")
            return
        except OSError as exc:
            self.drop(ep, f"read failed: {exc}", quiet=T.errno_is_disconnect(exc))
            return
        if fds:
            ep.fd_queue.extend(fds)
        if nbytes == 0:
            self.drop(ep, "closed by peer", quiet=True)
            return
        try:
            decoder.buffer_updated(nbytes)
            frames = decoder.frames()
            self.current = ep
            if ep.ready and len(frames) == 1 and not frames[0].nfds and not ep.fd_queue:
                self.router.handle(ep, frames[0])  # the common case
                return
            self._route(ep, frames)
        except IpcBusProtocolError as exc:
            self.drop(ep, f"protocol error: {exc}")
        except Exception as exc:  # never stop the bus for one connection
            log.exception("error while routing a frame from %s", ep.label)
            self.drop(ep, f"internal error while routing its frame: {exc!r}")
        finally:
            self.current = None

    def _route(self, ep: HubEndpoint, frames: list[P.Frame]) -> None:
        """Frames of one read, with their descriptors; the first one may be the HELLO."""
        for frame in frames:
            if frame.nfds:
                ep.take_fds(frame)
            try:
                if ep.ready:
                    self.router.handle(ep, frame)
                else:
                    self._hello(ep, frame)
            finally:
                if frame.fds:
                    T.close_fds(frame.fds)
            if ep not in self.endpoints:
                return
        if ep.fd_queue:
            ep.check_unclaimed()

    def _hello(self, ep: HubEndpoint, frame: P.Frame) -> None:
        try:
            hello = read_hello(frame, ptype=ep.ptype, cred_pid=ep.cred_pid,
                               links=self.options.links, owner_pid=self.owner_pid)
        except HandshakeRefused as exc:
            try:
                ep.transport.send([P.notice_frame(None, error=str(exc))])
            except OSError:
                pass
            self.drop(ep, f"handshake refused: {exc}")
            return
        ep.welcome(hello)

    # -- output ---------------------------------------------------------------------------------
    def _flush_dirty(self) -> None:
        dirty, self.dirty = self.dirty, set()
        for ep in dirty:
            if ep in self.endpoints:
                self._flush(ep)
        if self.flow.overflowed:
            self.flow.after_flush()

    def _flush(self, ep: HubEndpoint) -> None:
        if ep not in self.endpoints:
            return
        try:
            sent, drained = ep.write(ep.transport)
        except OSError as exc:
            self.drop(ep, f"write failed: {exc}", quiet=T.errno_is_disconnect(exc))
            return
        if ep.full_since is not None:
            self.flow.written(ep, sent)
        if not drained:
            self._want_write(ep, True)
        elif ep.events != _READ:
            self._want_write(ep, False)
        if drained and ep.closing is not None:
            self.drop(ep, ep.closing, quiet=True)

    flush = _flush

    def over_limit(self, ep: HubEndpoint) -> None:
        self.flow.queued(ep)

    def _want_write(self, ep: HubEndpoint, on: bool) -> None:
        events = selectors.EVENT_READ if not ep.paused else 0
        if on:
            events |= selectors.EVENT_WRITE
        self._set_events(ep, events)

    def _set_events(self, ep: HubEndpoint, events: int) -> None:
        if events == ep.events:
            return
        if ep.events and events:
            self.selector.modify(ep.transport, events, ep)
        elif events:
            self.selector.register(ep.transport, events, ep)
        else:
            self.selector.unregister(ep.transport)
        ep.events = events

    def write_only(self, ep: HubEndpoint) -> None:
        self._set_events(ep, selectors.EVENT_WRITE)

    def pause(self, ep: HubEndpoint) -> None:
        ep.paused = True
        self._set_events(ep, ep.events & ~selectors.EVENT_READ)

    def resume(self, ep: HubEndpoint) -> None:
        if ep.closing is not None:  # a disconnected slow consumer is never read again
            return
        ep.paused = False
        self._set_events(ep, ep.events | selectors.EVENT_READ)
        if ep.decoder.has_input:
            self.call_soon(lambda: self._read(ep) if ep in self.endpoints else None)

    # -- deadlines and endings ------------------------------------------------------------------
    def _check_deadlines(self, now: float | None = None) -> None:
        if now is None:
            now = time.monotonic()
        if self.traffic is not None:
            self.traffic.flush()
        self.acceptor.check(now)
        if now >= self._next_trim:  # idle connections give their larger read buffer back
            self._next_trim = now + _TRIM_INTERVAL
            for ep in self.endpoints:
                ep.decoder.trim()
        for ep in list(self.endpoints):
            if not ep.ready and now > ep.deadline:
                self.drop(ep, "handshake not completed in time")
            elif self.flow.check(ep):
                self.drop(ep, ep.closing or "closed", quiet=True)

    def disconnect(self, ep: HubEndpoint, reason: str, *, detail: str = "") -> None:
        """Cut ``ep`` off as a slow consumer (see ``Flow.cut_off``)."""
        self.flow.cut_off(ep, reason, detail=detail)

    def drop(self, ep: HubEndpoint, reason: str, *, quiet: bool = False) -> None:
        """Close an endpoint now and forget everything it owned."""
        if ep not in self.endpoints:
            return
        (log.debug if quiet else log.warning)("dropping %s: %s", ep.label, reason)
        was_upstream = ep is self.router.upstream
        if ep is self.router.federation:  # (a protocol error of the link: logged above)
            self.router.federation = None
        self.endpoints.discard(ep)
        self.dirty.discard(ep)
        self.forget(ep)
        self.flow.dropped(ep)
        if ep.events:
            try:
                self.selector.unregister(ep.transport)
            except (KeyError, ValueError):
                pass
            ep.events = 0
        ep.close_all()
        ep.release_input()
        ep.transport.shutdown()
        ep.transport.close()
        if self.on_drop is not None:
            self.on_drop(ep.label, reason, was_upstream)
        if self.dirty:
            self._flush_dirty()

    def forget(self, ep: HubEndpoint) -> None:
        """The router forgets ``ep``'s peers (telling the bus); an error there is logged and
        never stops the hub, nor keeps the endpoint."""
        current, self.current = self.current, None  # frames the router makes now: no source
        self.shm.forget(ep)  # its slots released, its arena closed (contained: _hub_shm.py)
        try:
            self.router.remove_endpoint(ep)
        except Exception as exc:
            log.error("internal error while removing %s: %r", ep.label, exc, exc_info=exc)
        finally:
            self.current = current

    def _shutdown(self) -> None:
        # Give queued output a moment to drain, then close everything.
        deadline = time.monotonic() + 1.0

        def waiting() -> bool:  # a slow consumer's closing NOTICE is not waited for
            return any(ep.out and ep.closing is None for ep in self.endpoints)

        while waiting() and time.monotonic() < deadline:
            for ep in list(self.endpoints):
                if ep.out:
                    self._flush(ep)
            if waiting():
                time.sleep(0.005)
        for ep in list(self.endpoints):
            self.drop(ep, "the bus is closing", quiet=True)
        self._closed = True
        self.shm.close()
        self.acceptor.close()
        self.selector.close()
        self.inbox.close()
        if self.traffic is not None:
            self.traffic.close()
        _in_process_hubs.discard(self)


def hub_state(hub: Hub) -> dict[str, Any]:
    """The hub's part of ``queryState`` (the router's state plus these), with the parts
    others add (``Hub.state_parts``: a federation link's)."""
    extra = {}
    for part in hub.state_parts:
        extra.update(part())
    return extra | {
        "address": None if hub.address is None else T.format_address(hub.address),
        "connections": sum(1 for ep in hub.endpoints if ep.closing is None),
        # slow consumers kept only until their closing NOTICE is written (CLOSING_GRACE)
        "closing_connections": sum(1 for ep in hub.endpoints if ep.closing is not None),
        "queued_bytes": sum(ep.out_bytes for ep in hub.endpoints),
        "tcp_authentications": hub.acceptor.auth.state(),
    }


class Inbox:
    """Calls other threads hand to the loop thread: a queue, and a self-pipe that wakes the
    loop's ``select``."""

    def __init__(self, contain: Callable[[Exception], None]) -> None:
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self._calls: collections.deque[Callable[[], None]] = collections.deque()
        self._contain = contain  # an exception of a call: logged, the loop goes on

    def fileno(self) -> int:
        return self._r

    def put(self, fn: Callable[[], None]) -> None:
        """Any thread."""
        self._calls.append(fn)
        try:
            os.write(self._w, b"\0")
        except OSError:  # full (the loop will wake anyway), or closed by a shutdown meanwhile
            pass

    def run(self, key: Any, mask: int) -> None:
        """The loop thread, when the pipe is readable: run every call queued."""
        try:
            os.read(self._r, 4096)
        except BlockingIOError:
            pass
        while self._calls:
            try:
                self._calls.popleft()()
            except Exception as exc:
                self._contain(exc)

    def close(self) -> None:
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass


_in_process_hubs: weakref.WeakSet[Hub] = weakref.WeakSet()


def _close_hubs_after_fork() -> None:
    """In a forked child: close the inherited copies of every descriptor of the hubs of this
    process, so the parent's peers still see EOF when the parent goes. Their loop threads do
    not exist here, so nothing else touches them."""
    for hub in list(_in_process_hubs):
        for sock in list(hub.owned):
            try:
                os.close(sock.detach())
            except OSError:
                pass
        hub.inbox.close()
        try:
            hub.selector.close()
        except Exception:
            pass
    _in_process_hubs.clear()


os.register_at_fork(after_in_child=_close_hubs_after_fork)
