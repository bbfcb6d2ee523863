"""IpcBusBroker: the router behind a selectors loop, run in a child process.

:class:`Hub` is the loop: it owns the listening socket, every connected endpoint, their
output queues and the back-pressure policy, and hands each decoded frame to the shared
:class:`~ipcbus._router.Router`. One thread runs it; nothing else touches its state.
:class:`IpcBusBroker` is the handle the parent keeps: it starts the hub in a
``multiprocessing`` child (``spawn`` by default) and talks to it over a Connection pipe.

Back-pressure and the slow-consumer rule (SPEC "Limits and policies") are decided by
:class:`ipcbus._backpressure.BackPressure` (pure, clock injected, unit-tested; its docstring
states the rules, relays included); the hub tells it what happened to each output queue and
carries out what it answers: pause or resume reading from a source, disconnect a receiver.
Nothing is dropped silently. Memory stays bounded by the limit (for a relay's receivers, the
hard cap) plus at most one read's worth.

A slow consumer's disconnect (:meth:`Hub.disconnect`) drops its undelivered queue at once
(keeping only the rest of a frame already partly written, so the stream stays frame-aligned),
stops reading from it (``shutdown(SHUT_RD)``), and keeps its descriptor, holding only that
frame tail and the closing NOTICE, until the NOTICE is written or ``CLOSING_GRACE`` seconds
pass: a consumer that was stopped and resumes within that grace learns the reason.
"""
from __future__ import annotations

import collections
import logging
import multiprocessing
import multiprocessing.connection
import os
import selectors
import signal
import socket
import sys
import threading
import time
import types
import weakref
from typing import Any, Callable

import msgpack
from typing_extensions import Self

from . import _backpressure as BP
from . import _protocol as P
from . import _transport as T
from ._decoder import FrameDecoder
from ._router import Peer, Router
from ._timeouts import DEFAULT_TIMEOUT, resolve_timeout
from .spy import TrafficLog
from .errors import IpcBusConnectionError, IpcBusError, IpcBusProtocolError, IpcBusTimeoutError

log = logging.getLogger("ipcbus")

ENV_LOG = "IPCBUS_LOG"  # a broker writes its traffic log there (.csv, or JSON lines)
DEFAULT_QUEUE_LIMIT = 64 * 1024 * 1024
DEFAULT_SLOW_CONSUMER_TIMEOUT = 10.0
_TICK = 0.25
_CHECK_INTERVAL = 0.01  # deadlines (handshakes, slow consumers, closing) are checked this often
# How long a slow consumer's descriptor is kept after its disconnect, so that the closing NOTICE
# can still be written when it resumes reading (it holds one descriptor and a few bytes).
CLOSING_GRACE = 10.0
# A receiver overflowed by a relay (never paused) is disconnected past this many queue limits.
HARD_LIMIT_FACTOR = 2
_ACCEPT_BACKOFF = 0.25
_TRIM_INTERVAL = 1.0  # how often idle read buffers shrink back (FrameDecoder.trim)
# TCP authentication runs on a thread each (multiprocessing's challenge is blocking): at most
# MAX_AUTHENTICATIONS at once. Further connections wait for a slot without a thread, newest
# first, at most _AUTH_WAITING of them (the oldest gives way) and each for at most
# 2 x handshake_timeout: a slot frees within one handshake_timeout, so a client arriving right
# after a burst must be able to wait a little longer than that (with exactly one, it raced the
# burst's timeouts and was dropped about half the time); a started authentication has
# handshake_timeout of its own.
MAX_AUTHENTICATIONS = 32
_AUTH_WAITING = 256
_BATCH = 512
# Who may link a bridge to a broker (SPEC "Trust": the relay role is granted by the hub, never
# taken from a peer's word). "owner": on the Unix socket, only the process that started the
# broker (its IpcBusBroker handle's process, known by the kernel's credentials of the
# connection), and on TCP whoever proved the authkey; "any": every connection the broker
# admits; "none": no links.
LINK_POLICIES = frozenset({"owner", "any", "none"})
_READ, _WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
_GONE_RELAY = types.SimpleNamespace(relay=True, paused=True)  # a relay dropped meanwhile



class HubOptions:
    """The limits a hub enforces (broker and bridge share them)."""

    def __init__(self, *, max_message: int = P.DEFAULT_MAX_MESSAGE,
                 max_fds: int = P.DEFAULT_MAX_FDS, queue_limit: int = DEFAULT_QUEUE_LIMIT,
                 slow_consumer_timeout: float = DEFAULT_SLOW_CONSUMER_TIMEOUT,
                 handshake_timeout: float = T.HANDSHAKE_TIMEOUT,
                 allowed_uids: list[int] | None = None,
                 traffic_log: str | None = None, links: str = "owner",
                 ecipc: bool = False) -> None:
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

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


class _Endpoint:
    """One connection of a hub: its socket, decoder, peers and output queue."""

    __slots__ = ("hub", "transport", "decoder", "fd_queue", "peers", "relay", "label", "out",
                 "out_bytes", "out_fds", "head_sent", "blocked", "paused", "full_since",
                 "progress_at", "unsent", "ready", "deadline", "closing", "events", "on_ready",
                 "can_pass_fds", "delivered_msgs", "delivered_bytes", "ptype", "pid", "cred_pid",
                 "max_in", "__weakref__")

    def __init__(self, hub: Hub, transport: T.StreamTransport, label: str, ptype: str,
                 pid: int = 0, cred_pid: int | None = None) -> None:
        self.hub = hub
        # Who its peers are, as the hub knows it (SPEC "Trust"): the kind of connection, and
        # the pid the kernel reported (cred_pid) or, for a pipe or TCP, the HELLO's.
        self.ptype = ptype
        self.pid = pid
        self.cred_pid = cred_pid
        self.max_in = hub.options.max_message  # the largest frame it takes (a link: its own)
        self.transport = transport
        # Until HELLO, nothing larger than a control frame: a peer that has not introduced
        # itself cannot make the broker allocate a large buffer.
        self.decoder = FrameDecoder(P.MAX_CONTROL_BODY, merge_runs=True)
        self.fd_queue: collections.deque[int] = collections.deque()
        self.peers: dict[str, Peer] = {}
        self.relay = False
        self.label = label
        self.out: collections.deque[list[Any]] = collections.deque()  # [view, fds]
        self.out_bytes = 0
        self.out_fds = 0
        self.head_sent = 0  # bytes of out[0] already written (a frame partly written)
        self.blocked: set[_Endpoint] = set()  # endpoints paused because this one is full
        self.paused = False
        self.full_since: float | None = None
        self.progress_at = 0.0  # while over the limit: when a write last made progress
        self.unsent: int | None = None  # the kernel's send queue at the last look (_reading)
        self.ready = False  # handshake done
        self.deadline = time.monotonic() + hub.options.handshake_timeout
        self.closing: str | None = None
        self.events = 0
        self.on_ready: Callable[[], None] | None = None
        self.can_pass_fds = transport.can_pass_fds
        self.delivered_msgs = 0  # messages delivered to this connection, for query_state
        self.delivered_bytes = 0

    def deliver(self, raw: bytes | bytearray, fds: list[int], count: int = 1) -> None:
        """Queue a frame (or run) for this endpoint, which owns ``fds`` from now on."""
        if self.closing is not None:
            T.close_fds(fds)
            return
        size = len(raw)
        if size > self.max_in and self._over_limit(raw, count):
            T.close_fds(fds)
            self.hub.router.undeliverable(self, raw, (
                f"a frame of {size} bytes is over the message limit of {self.label}"
                f" ({self.max_in} bytes)"))
            return
        own = fds if fds else []
        self.out.append([memoryview(raw), own])
        self.out_bytes += size
        self.delivered_msgs += count
        self.delivered_bytes += size
        self.out_fds += len(own)
        hub = self.hub
        hub.dirty.add(self)
        if self.out_bytes > hub.queue_limit:  # see ipcbus._backpressure
            source = hub.current
            verdict = hub.back_pressure.queued(self, source)
            if verdict == BP.PAUSE:
                assert source is not None
                hub.pause(source)
            elif verdict == BP.OVERFLOW:  # decided once the queues are flushed
                assert source is not None
                hub.overflowed[self] = source

    def _over_limit(self, raw: bytes | bytearray, count: int) -> bool:
        """Whether the body of a frame in ``raw`` (one, or a run) is over ``max_in``."""
        offset = 0
        while offset < len(raw):
            hlen, blen, _ = P.PREFIX.unpack_from(raw, offset)
            if blen > self.max_in:
                return True
            offset += P.PREFIX_SIZE + hlen + blen
        return False

    def __repr__(self) -> str:
        return f"<endpoint {self.label}>"


class Hub:
    """A router behind a selectors loop: accepts, reads, routes, writes. Single-threaded."""

    def __init__(self, options: HubOptions, *, authkey: bytes | None = None,
                 owner_pid: int | None = None) -> None:
        self.options = options
        self.authkey = authkey if authkey is not None else T.default_authkey()
        self.owner_pid = owner_pid  # the process that started this hub (links="owner")
        self.router = Router(os.getpid(), state_extra=self._state_extra,
                             max_message=options.max_message, dup_fds=T.dup_copies)
        self.selector = selectors.DefaultSelector()
        self.endpoints: set[_Endpoint] = set()
        self.dirty: set[_Endpoint] = set()
        # receivers past the hard cap, fed by a relay: disconnect, or pause that relay
        self.overflowed: dict[_Endpoint, _Endpoint] = {}
        self.queue_limit = options.queue_limit
        self.back_pressure = BP.BackPressure(options.queue_limit, options.slow_consumer_timeout,
                                             hard_factor=HARD_LIMIT_FACTOR)
        self.current: _Endpoint | None = None
        self.listener: socket.socket | None = None
        self.address: T.Address | None = None
        self._stop = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._inbox: collections.deque[Callable[[], None]] = collections.deque()
        self.selector.register(self._wake_r, selectors.EVENT_READ, self._on_wake)
        self._next_endpoint = 0
        self.owned: weakref.WeakSet[socket.socket] = weakref.WeakSet()  # closed after fork
        self.traffic: TrafficLog | None = None
        self._accept_paused_until = 0.0  # out of descriptors: accept again after this time
        self._accept_logged = -1e9
        self._next_trim = 0.0
        self._closed = False
        self._auth_running = 0  # TCP authentication threads alive (loop thread's count)
        self._auth_waiting: collections.deque[tuple[socket.socket, float]] = collections.deque()
        self._auth_dropped = 0  # connections dropped while waiting for a slot, in all
        self._auth_dropped_unlogged = 0
        self._auth_logged = -1e9
        # running authentications: socket -> overall deadline (loop thread only); one past
        # its deadline is shut down, and its thread, which owns the socket, closes it
        self._auth_deadlines: dict[socket.socket, float] = {}
        self._socket_file: tuple[int, int] | None = None  # (st_dev, st_ino) of our socket
        if options.traffic_log:
            self.traffic = TrafficLog(options.traffic_log)
            self.router.observers.append(self.traffic)
        self.on_drop: Callable[[str, str, bool], None] | None = None  # (label, reason, upstream)
        self.thread: threading.Thread | None = None

    # -- setup -----------------------------------------------------------------------------------
    def listen(self, address: T.Address) -> T.Address:
        if self.options.ecipc and not isinstance(address, str):
            raise ValueError("ecipc=True needs a Unix socket path (Node clients cannot"
                             " authenticate over TCP)")
        sock = T.listen(address)
        sock.setblocking(False)
        self.owned.add(sock)
        self.listener = sock
        self.address = address if isinstance(address, str) else sock.getsockname()[:2]
        if isinstance(address, str):
            # Closing removes the file only if it is still ours (another broker may have
            # replaced it meanwhile).
            st = os.stat(address)
            self._socket_file = (st.st_dev, st.st_ino)
        self.selector.register(sock, selectors.EVENT_READ, self._on_accept)
        return self.address

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop thread (thread-safe). Ignored once the hub has shut down."""
        if self._closed:
            return
        self._inbox.append(fn)
        try:
            os.write(self._wake_w, b"\0")
        except OSError:  # full (the loop will wake anyway), or closed by a shutdown meanwhile
            pass

    def stop(self) -> None:
        self._stop = True

    def start_thread(self, name: str) -> None:
        """Run the loop on a daemon thread of this process (the bridge does)."""
        self.thread = threading.Thread(target=self.serve_forever, name=name, daemon=True)
        _in_process_hubs.add(self)
        self.thread.start()

    def close_after_fork(self) -> None:
        """In a forked child: close the inherited copies of every descriptor of this hub, so
        the parent's peers still see EOF when the parent goes. The loop thread does not exist
        here, so nothing else touches them."""
        for sock in list(self.owned):
            try:
                os.close(sock.detach())
            except OSError:
                pass
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            self.selector.close()
        except Exception:
            pass

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
                        if data.__class__ is _Endpoint:
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
                        self._contain(data if data.__class__ is _Endpoint else None, exc)
                now = monotonic()
                if now >= next_check:
                    next_check = now + _CHECK_INTERVAL
                    self._check_deadlines(now)
        finally:
            self._shutdown()

    def _contain(self, ep: _Endpoint | None, exc: Exception) -> None:
        """An unexpected error while serving ``ep`` (or the loop's own work): logged; that
        connection is dropped, the hub goes on (SPEC "Resources")."""
        log.error("internal error while serving %s: %r", ep.label if ep else "the hub", exc,
                  exc_info=exc)
        if ep is not None and ep in self.endpoints:
            self.drop(ep, f"internal error while serving it: {exc!r}")

    def _on_wake(self, key: selectors.SelectorKey, mask: int) -> None:
        try:
            os.read(self._wake_r, 4096)
        except BlockingIOError:
            pass
        while self._inbox:
            try:
                self._inbox.popleft()()
            except Exception as exc:
                self._contain(None, exc)

    def _on_accept(self, key: selectors.SelectorKey, mask: int) -> None:
        assert self.listener is not None
        for _ in range(64):
            try:
                sock, addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: back off, keep serving the others
                now = time.monotonic()
                if now - self._accept_logged > 10.0:
                    log.error("accept failed (new connections wait %g s): %s",
                              _ACCEPT_BACKOFF, exc)
                    self._accept_logged = now
                # The listener stays readable: stop watching it for a while instead of spinning.
                self.selector.unregister(self.listener)
                self._accept_paused_until = now + _ACCEPT_BACKOFF
                return
            self._admit(sock)

    def _admit(self, sock: socket.socket) -> None:
        if sock.family == socket.AF_UNIX:
            try:
                pid, uid, _ = T.peer_credentials(sock)
            except OSError as exc:
                log.warning("refused a connection: no peer credentials (%s)", exc)
                sock.close()
                return
            if not T.peer_uid_allowed(uid, os.getuid(), self.options.allowed_uids):
                reason = f"uid {uid} is not allowed"
                log.warning("refused a connection from pid %d: %s", pid, reason)
                T.send_refusal(sock, reason)  # so its client can say why, not "Broken pipe"
                sock.close()
                return
            if self.options.ecipc:  # the first byte tells the protocols apart (issue 19)
                from .ecipc.gateway import gateway_of

                def as_ipcbus(conn: socket.socket, label: str) -> None:  # on its thread
                    def add() -> None:
                        self.add_endpoint(conn, label, ptype="socket", pid=pid, cred_pid=pid)
                    self.call_soon(add)
                gateway_of(self).classify(sock, f"pid {pid}", as_ipcbus)
                return
            self.add_endpoint(sock, f"pid {pid}", ptype="socket", pid=pid, cred_pid=pid)
        elif self._auth_running < MAX_AUTHENTICATIONS:
            self._start_authentication(sock)
        else:
            if len(self._auth_waiting) >= _AUTH_WAITING:  # the oldest waiting one gives way
                self._drop_waiting(self._auth_waiting.popleft()[0])
            self._auth_waiting.append(
                (sock, time.monotonic() + 2 * self.options.handshake_timeout))

    def _start_authentication(self, sock: socket.socket) -> None:
        self._auth_running += 1
        self._auth_deadlines[sock] = time.monotonic() + self.options.handshake_timeout
        try:
            threading.Thread(target=self._authenticate, args=(sock,), daemon=True,
                             name="ipcbus-auth").start()
        except RuntimeError as exc:  # cannot start a thread
            self._auth_running -= 1
            del self._auth_deadlines[sock]
            log.warning("refused a TCP connection: %s", exc)
            sock.close()

    def _authenticate(self, sock: socket.socket) -> None:
        """TCP challenge, on a short-lived thread so a slow peer never stalls the loop."""
        try:
            peer = sock.getpeername()
            sock.setblocking(True)
            T.set_timeouts(sock, self.options.handshake_timeout)
            T.authenticate_server(sock, self.authkey)
            T.set_timeouts(sock, None)
        except (OSError, EOFError, multiprocessing.AuthenticationError) as exc:
            log.warning("refused a TCP connection: authentication failed (%s)", exc)
            sock.close()
            self.call_soon(lambda: None if self._authentication_done(sock) else None)
            return
        label = f"tcp {peer[0]}:{peer[1]}"

        def admit() -> None:
            if self._authentication_done(sock):
                self._admit_authenticated(sock, label)
            else:  # past its overall deadline meanwhile
                sock.close()

        self.call_soon(admit)
        if self._closed:
            sock.close()

    def _authentication_done(self, sock: socket.socket) -> bool:
        """A slot is free: start the newest waiting connection (the older ones are likelier
        to be the silent part of a burst; each gives up after 2 x handshake_timeout).
        False if ``sock``'s authentication had passed its overall deadline."""
        in_time = self._auth_deadlines.pop(sock, 0.0) >= 0.0
        self._auth_running -= 1
        self._expire_waiting(time.monotonic())
        while self._auth_waiting and self._auth_running < MAX_AUTHENTICATIONS:
            self._start_authentication(self._auth_waiting.pop()[0])
        return in_time

    def _expire_authentications(self, now: float) -> None:
        """One overall deadline per TCP authentication (a peer trickling bytes gets no more
        time): shut the socket down, so its thread fails at once and closes it."""
        for sock, deadline in list(self._auth_deadlines.items()):
            if 0.0 <= deadline < now:
                self._auth_deadlines[sock] = -1.0  # shut down once; the thread closes it
                log.warning("refused a TCP connection: authentication not completed in %g s",
                            self.options.handshake_timeout)
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _expire_waiting(self, now: float) -> None:
        waiting = self._auth_waiting
        while waiting and waiting[0][1] <= now:
            self._drop_waiting(waiting.popleft()[0])

    def _drop_waiting(self, sock: socket.socket) -> None:
        sock.close()
        self._auth_dropped += 1
        self._auth_dropped_unlogged += 1
        self._log_dropped_waiting()

    def _log_dropped_waiting(self) -> None:
        now = time.monotonic()
        if self._auth_dropped_unlogged and now - self._auth_logged > 10.0:
            log.warning("refused %d TCP connection(s) waiting for authentication: %d"
                        " authentications running (the cap), %d waiting (at most %d, each for"
                        " at most %g s)", self._auth_dropped_unlogged, self._auth_running,
                        len(self._auth_waiting), _AUTH_WAITING,
                        2 * self.options.handshake_timeout)
            self._auth_dropped_unlogged = 0
            self._auth_logged = now

    def _admit_authenticated(self, sock: socket.socket, label: str) -> None:
        self.add_endpoint(sock, label, ptype="socket")

    def add_endpoint(self, sock: socket.socket, label: str, *, ptype: str, pid: int = 0,
                     cred_pid: int | None = None, relay: bool = False,
                     ready: bool = False, decoder: FrameDecoder | None = None) -> _Endpoint:
        """Serve a connected socket (on the loop thread). ``ptype``/``pid``: who its peers are
        (``cred_pid``: the pid the kernel reported; else the HELLO's is taken); ``relay``: a
        link this hub made; ``ready``: handshake already done; ``decoder``: the one that read
        the handshake, with any bytes that followed it."""
        sock.setblocking(False)
        T.tune_socket(sock)
        self.owned.add(sock)
        self._next_endpoint += 1
        ep = _Endpoint(self, T.StreamTransport(sock), f"#{self._next_endpoint} ({label})",
                       ptype, pid, cred_pid)
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
        self.selector.register(sock, selectors.EVENT_READ, ep)
        return ep

    def _on_io(self, ep: _Endpoint, mask: int) -> None:
        if ep not in self.endpoints:  # dropped earlier in this batch of events
            return
        if mask & selectors.EVENT_WRITE:
            self._flush(ep)
        if mask & selectors.EVENT_READ and ep in self.endpoints and not ep.paused:
            self._read(ep)

    def _read(self, ep: _Endpoint) -> None:
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
            for frame in frames:
                if frame.nfds:
                    self._take_fds(ep, frame)
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
                self._check_unclaimed(ep)
        except IpcBusProtocolError as exc:
            self.drop(ep, f"protocol error: {exc}")
        except Exception as exc:  # never stop the bus for one connection
            log.exception("error while routing a frame from %s", ep.label)
            self.drop(ep, f"internal error while routing its frame: {exc!r}")
        finally:
            self.current = None

    def _take_fds(self, ep: _Endpoint, frame: P.Frame) -> None:
        """Give a frame the descriptors it announces (they arrive with its first byte, or
        with an earlier byte of the same write): it owns them from now on."""
        if frame.kind not in P.FD_KINDS or not ep.ready:
            raise IpcBusProtocolError(f"a {P.Kind(frame.kind).name} frame cannot carry"
                                      " descriptors")
        if frame.nfds > self._fd_limit(ep):
            raise IpcBusProtocolError(
                f"frame carries {frame.nfds} descriptors, over the limit of {self._fd_limit(ep)}")
        if len(ep.fd_queue) < frame.nfds:
            raise IpcBusProtocolError(
                f"frame announces {frame.nfds} descriptors, {len(ep.fd_queue)} arrived")
        frame.fds = [ep.fd_queue.popleft() for _ in range(frame.nfds)]

    def _fd_limit(self, ep: _Endpoint) -> int:
        # a link writes several frames (and their descriptors) in one go, like this hub does
        return P.MAX_FDS if ep.relay else self.options.max_fds

    def _check_unclaimed(self, ep: _Endpoint) -> None:
        """Descriptors left after the frames of a read belong to a frame not complete yet;
        any others were announced by no frame (SPEC "Resources": a protocol error). Never
        more than one message's worth waits. (A link writes the descriptors of several frames
        with the first byte of one write, like this hub does, so a read that ends between
        them may leave some for frames not begun yet: bounded by MAX_FDS for a link.)"""
        if not ep.decoder.pending_bytes and not ep.relay:
            raise IpcBusProtocolError(f"{len(ep.fd_queue)} descriptors arrived that no frame"
                                      " announced")
        if len(ep.fd_queue) > self._fd_limit(ep):
            raise IpcBusProtocolError(f"{len(ep.fd_queue)} descriptors wait for a frame, over"
                                      f" the limit of {self._fd_limit(ep)}")

    def _hello(self, ep: _Endpoint, frame: P.Frame) -> None:
        try:
            body = P.check_hello(frame)
        except IpcBusProtocolError as exc:
            self._refuse(ep, str(exc))
            return
        pid = body.get("pid")
        if type(pid) is not int or not 0 < pid < 2**31:
            self._refuse(ep, f"HELLO with an invalid pid {pid!r}")
            return
        if body.get("relay"):
            refusal = self._link_refusal(ep)
            if refusal is not None:
                self._refuse(ep, refusal)
                return
            ep.relay = True
            limit = body.get("max_message")
            if type(limit) is int and 0 < limit < ep.max_in:
                ep.max_in = limit  # a link takes no frame over its own limit
        if ep.cred_pid is None:  # a pipe or TCP: the pid it reports, fixed from now on
            ep.pid = pid
        ep.ready = True
        ep.decoder.max_message = self.options.max_message
        if ep.cred_pid is None:
            ep.label = f"{ep.label} pid {pid}"
        if ep.relay:
            ep.label = f"{ep.label} link"
        ep.deliver(P.welcome_frame(os.getpid(), ep.transport.can_pass_fds,
                                   self.options.max_message, body["version"],
                                   self.options.max_fds), [])
        if ep.on_ready is not None:
            ep.on_ready()

    def _link_refusal(self, ep: _Endpoint) -> str | None:
        """Why this connection may not act as a bridge's link (None: it may). The relay role
        changes policy (it speaks for the peers of a whole side and is not paused like a
        sender), so the hub grants it from what it knows, never from the HELLO alone."""
        policy = self.options.links
        if ep.ptype != "socket" or policy == "none":
            return "this hub accepts no bridge links on this connection"
        if policy == "any" or ep.cred_pid is None:  # TCP: it proved the authkey
            return None
        if self.owner_pid is not None and ep.cred_pid == self.owner_pid:
            return None
        return ("this broker accepts a bridge link only from the process that started it"
                f" (pid {self.owner_pid}); start it with links='any' to accept links from"
                " other processes")

    def _refuse(self, ep: _Endpoint, reason: str) -> None:
        try:
            ep.transport.send([P.notice_frame(None, error=reason)])
        except OSError:
            pass
        self.drop(ep, f"handshake refused: {reason}")

    # -- output ---------------------------------------------------------------------------------
    def _flush_dirty(self) -> None:
        dirty, self.dirty = self.dirty, set()
        for ep in dirty:
            if ep in self.endpoints:
                self._flush(ep)
        if self.overflowed:
            self._relay_overflowed()

    def _relay_overflowed(self) -> None:
        """Receivers a relay filled past the hard cap (``BackPressure.overflowed``)."""
        overflowed, self.overflowed = self.overflowed, {}
        policy = self.back_pressure
        for ep, relay in overflowed.items():
            if ep not in self.endpoints or ep.closing is not None \
                    or ep.out_bytes <= policy.hard_limit:
                continue
            source = relay if relay in self.endpoints else _GONE_RELAY
            verdict = policy.overflowed(ep, source, self._reading(ep))
            if verdict == BP.DISCONNECT:
                self.disconnect(ep, "slow consumer", detail=policy.overflow_detail(ep))
            elif verdict == BP.PAUSE:
                self.pause(relay)

    def _flush(self, ep: _Endpoint) -> None:
        if ep not in self.endpoints:
            return
        out = ep.out
        if len(out) == 1 and not out[0][1] and ep.closing is None:
            # The common case: one frame (or run) without descriptors.
            view = out[0][0]
            try:
                sent = ep.transport.sock.send(view)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self.drop(ep, f"write failed: {exc}", quiet=T.errno_is_disconnect(exc))
                return
            ep.out_bytes -= sent
            if ep.full_since is not None:
                self._written(ep, sent)
            if sent == len(view):
                out.clear()
                ep.head_sent = 0
                if ep.events != _READ:
                    self._want_write(ep, False)
                return
            out[0][0] = view[sent:]  # the rest: the general case below (it waits to write)
            ep.head_sent += sent
        send = ep.transport.send
        while out:
            views: list[memoryview] = []
            fds: list[int] = []
            total = 0
            for entry in out:
                if entry[1]:
                    if len(fds) + len(entry[1]) > P.MAX_FDS:
                        break
                    fds.extend(entry[1])
                views.append(entry[0])
                total += len(entry[0])
                if len(views) >= _BATCH:
                    break
            try:
                sent = send(views, fds)
            except (BlockingIOError, InterruptedError):
                self._want_write(ep, True)
                return
            except OSError as exc:
                self.drop(ep, f"write failed: {exc}", quiet=T.errno_is_disconnect(exc))
                return
            if fds:  # the kernel took them with the first byte of this write
                T.close_fds(fds)
                ep.out_fds -= len(fds)
                for i in range(len(views)):
                    out[i][1] = []
            ep.out_bytes -= sent
            if ep.full_since is not None:
                self._written(ep, sent)
            left = sent
            while left:
                head = out[0][0]
                if left >= len(head):
                    left -= len(head)
                    out.popleft()
                    ep.head_sent = 0
                else:
                    out[0][0] = head[left:]
                    ep.head_sent += left
                    left = 0
            if sent < total:
                self._want_write(ep, True)
                return
        self._want_write(ep, False)
        if ep.closing is not None:
            self._finish_close(ep)

    def _written(self, ep: _Endpoint, sent: int) -> None:
        """Some of ``ep``'s queue went out: the sources it held may be read again."""
        for source in self.back_pressure.written(ep, sent):
            if source in self.endpoints and not self._still_blocked(source):
                self.resume(source)

    def _still_blocked(self, source: _Endpoint) -> bool:
        return any(source in other.blocked for other in self.endpoints)

    def _want_write(self, ep: _Endpoint, on: bool) -> None:
        events = selectors.EVENT_READ if not ep.paused else 0
        if on:
            events |= selectors.EVENT_WRITE
        self._set_events(ep, events)

    def _set_events(self, ep: _Endpoint, events: int) -> None:
        if events == ep.events:
            return
        sock = ep.transport.sock
        if ep.events and events:
            self.selector.modify(sock, events, ep)
        elif events:
            self.selector.register(sock, events, ep)
        else:
            self.selector.unregister(sock)
        ep.events = events

    def pause(self, ep: _Endpoint) -> None:
        ep.paused = True
        self._set_events(ep, ep.events & ~selectors.EVENT_READ)

    def resume(self, ep: _Endpoint) -> None:
        if ep.closing is not None:  # a disconnected slow consumer is never read again
            return
        ep.paused = False
        self._set_events(ep, ep.events | selectors.EVENT_READ)
        if ep.decoder.has_input:
            self.call_soon(lambda: self._read(ep) if ep in self.endpoints else None)

    # -- ending -----------------------------------------------------------------------------------
    def _check_deadlines(self, now: float | None = None) -> None:
        if now is None:
            now = time.monotonic()
        if self.traffic is not None:
            self.traffic.flush()
        if self._accept_paused_until and now >= self._accept_paused_until:
            self._accept_paused_until = 0.0
            assert self.listener is not None
            self.selector.register(self.listener, selectors.EVENT_READ, self._on_accept)
        if self._auth_waiting:
            self._expire_waiting(now)
        if self._auth_deadlines:
            self._expire_authentications(now)
        if self._auth_dropped_unlogged:
            self._log_dropped_waiting()
        if now >= self._next_trim:  # idle connections give their larger read buffer back
            self._next_trim = now + _TRIM_INTERVAL
            for ep in self.endpoints:
                ep.decoder.trim()
        check = self.back_pressure.check
        for ep in list(self.endpoints):
            if not ep.ready and now > ep.deadline:
                self.drop(ep, "handshake not completed in time")
            elif ep.closing is not None:
                if now > ep.deadline:
                    self._finish_close(ep)
            elif ep.full_since is not None or ep.blocked:
                detail = check(ep, lambda ep=ep: self._reading(ep))  # type: ignore[misc]
                if detail is not None:
                    self.disconnect(ep, "slow consumer", detail=detail)

    def _reading(self, ep: _Endpoint) -> bool:
        """Whether the peer has read some of what the kernel holds for it since the last look.
        A reader that keeps reading, slowly, can go a second without a write from us: the
        kernel makes a socket writable again only once its send queue is below a quarter of
        the buffer (4 MiB here). Write progress alone would call it stopped."""
        unsent, before = ep.transport.unsent(), ep.unsent
        ep.unsent = unsent
        return unsent is not None and before is not None and unsent < before

    def disconnect(self, ep: _Endpoint, reason: str, *, detail: str = "") -> None:
        """Tell the endpoint why it is dropped, then drop it once that is written.

        Its undelivered queue is discarded now (it is being dropped anyway), except the rest
        of a frame already partly written, which must be completed or the stream would be
        corrupt. Reading from it stops (``shutdown(SHUT_RD)``: what it sends is refused, not
        buffered). Its descriptor is kept, with only that tail and the NOTICE, until they are
        written or ``CLOSING_GRACE`` seconds pass, so a consumer that was stopped (SIGSTOP, a
        debugger) and resumes within the grace still learns the reason. Never blocks."""
        log.warning("disconnecting %s: %s%s", ep.label, reason, f" ({detail})" if detail else "")
        self._discard_undelivered(ep)
        ep.full_since = None
        self._forget_endpoint(ep)
        self._release_blocked(ep)
        for other in self.endpoints:
            other.blocked.discard(ep)
        ep.paused = True  # never read again (and never resumed: see _want_write)
        notice = P.notice_frame(None, closing=reason)
        ep.out.append([memoryview(notice), []])
        ep.out_bytes += len(notice)
        ep.closing = reason
        ep.deadline = time.monotonic() + CLOSING_GRACE
        try:
            ep.transport.sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass
        self.dirty.discard(ep)
        self._set_events(ep, selectors.EVENT_WRITE)
        self._flush(ep)

    def _discard_undelivered(self, ep: _Endpoint) -> None:
        """Drop every queued frame not yet started; keep the unwritten rest of the frame that
        is partly written (a run of frames is cut after that frame)."""
        out = ep.out
        keep: memoryview | None = None
        if out and ep.head_sent:
            head = out[0][0]
            keep = head
            whole = memoryview(head.obj).cast("B") if isinstance(head.obj, (bytes, bytearray)) \
                else None
            if whole is not None and len(whole) == ep.head_sent + len(head):
                offset, sent = 0, ep.head_sent
                while offset + P.PREFIX_SIZE <= len(whole):
                    hlen, blen, _ = P.PREFIX.unpack_from(whole, offset)
                    offset += P.PREFIX_SIZE + hlen + blen
                    if offset >= sent:
                        break
                keep = head[:max(0, min(offset, len(whole)) - sent)]
        entries = list(out)
        out.clear()
        for i, entry in enumerate(entries):
            if i or keep is None:
                T.close_fds(entry[1])
        ep.out_fds = 0
        if keep is not None and len(keep):
            out.append([keep, entries[0][1]])
            ep.out_fds = len(entries[0][1])
        else:
            ep.head_sent = 0
        ep.out_bytes = len(keep) if keep is not None else 0

    def _finish_close(self, ep: _Endpoint) -> None:
        self.drop(ep, ep.closing or "closed", quiet=True)

    def _release_blocked(self, ep: _Endpoint) -> None:
        blocked, ep.blocked = ep.blocked, set()
        for source in blocked:
            if source in self.endpoints and source.paused and not self._still_blocked(source):
                self.resume(source)

    def drop(self, ep: _Endpoint, reason: str, *, quiet: bool = False) -> None:
        """Close an endpoint now and forget everything it owned."""
        if ep not in self.endpoints:
            return
        (log.debug if quiet else log.warning)("dropping %s: %s", ep.label, reason)
        was_upstream = ep is self.router.upstream
        self.endpoints.discard(ep)
        self.dirty.discard(ep)
        self._forget_endpoint(ep)
        self._release_blocked(ep)
        for other in self.endpoints:
            other.blocked.discard(ep)
        if ep.events:
            try:
                self.selector.unregister(ep.transport.sock)
            except (KeyError, ValueError):
                pass
            ep.events = 0
        for entry in ep.out:
            T.close_fds(entry[1])
        ep.out.clear()
        T.close_fds(ep.fd_queue)
        ep.fd_queue.clear()
        ep.transport.shutdown()
        ep.transport.close()
        if self.on_drop is not None:
            self.on_drop(ep.label, reason, was_upstream)
        if self.dirty:
            self._flush_dirty()

    def _forget_endpoint(self, ep: _Endpoint) -> None:
        """The router forgets ``ep``'s peers (telling the bus); an error there is logged and
        never stops the hub, nor keeps the endpoint."""
        current, self.current = self.current, None  # frames the router makes now: no source
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
        while self._auth_waiting:
            self._auth_waiting.popleft()[0].close()
        self._auth_logged = -1e9
        self._log_dropped_waiting()  # the count not logged yet
        if self.listener is not None:
            try:
                self.selector.unregister(self.listener)
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
        self.selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        if self.traffic is not None:
            self.traffic.close()
        _in_process_hubs.discard(self)

    def _state_extra(self) -> dict[str, Any]:
        return {
            "address": None if self.address is None else T.format_address(self.address),
            "connections": sum(1 for ep in self.endpoints if ep.closing is None),
            # slow consumers kept only until their closing NOTICE is written (CLOSING_GRACE)
            "closing_connections": sum(1 for ep in self.endpoints if ep.closing is not None),
            "queued_bytes": sum(ep.out_bytes for ep in self.endpoints),
            "tcp_authentications": {"running": self._auth_running,
                                    "waiting": len(self._auth_waiting),
                                    "dropped_waiting": self._auth_dropped},
        }


_in_process_hubs: weakref.WeakSet[Hub] = weakref.WeakSet()


def _close_hubs_after_fork() -> None:
    for hub in list(_in_process_hubs):
        hub.close_after_fork()
    _in_process_hubs.clear()


os.register_at_fork(after_in_child=_close_hubs_after_fork)


# -- the broker process -------------------------------------------------------------------------
def _child_logging() -> None:
    logger = logging.getLogger("ipcbus")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"ipcbus broker[{os.getpid()}] %(levelname)s:"
                                               " %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING)


def _ctl_send(ctl: multiprocessing.connection.Connection, *msg: Any) -> None:
    ctl.send_bytes(msgpack.packb(list(msg), use_bin_type=True))


def _ctl_recv(ctl: multiprocessing.connection.Connection) -> list[Any]:
    msg = msgpack.unpackb(ctl.recv_bytes(), raw=False, strict_map_key=False)
    assert isinstance(msg, list)
    return msg


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc malloc.h)
BROKER_MALLOC_KEEP = 64 * 1024 * 1024


def _keep_large_buffers() -> None:
    """In the broker's own process (glibc only): serve frames under 64 MiB from the heap and
    keep up to 64 MiB of freed memory, instead of an mmap/munmap pair and fresh page faults
    for every large frame. A 16 MiB message cost the broker 10 ms of system time a message
    before, 6 ms after (W4 16 MiB: ~1.0 -> ~1.5 GB/s, with the client's buffer reuse). The
    peak RSS is unchanged; RSS may stay up to 64 MiB above its floor after large traffic."""
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return
    mallopt(_M_MMAP_THRESHOLD, BROKER_MALLOC_KEEP)
    mallopt(_M_TRIM_THRESHOLD, BROKER_MALLOC_KEEP)


def run_broker_child(address: Any, options: dict[str, Any], authkey: bytes,
                     ctl: multiprocessing.connection.Connection,
                     owner_pid: int | None = None) -> None:
    """Entry point of the broker process (module level, so ``spawn`` can import it).
    ``owner_pid``: the process that started it (with forkserver, not the parent)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _child_logging()
    _keep_large_buffers()
    address = tuple(address) if isinstance(address, list) else address
    if options.get("traffic_log") is None and os.environ.get(ENV_LOG):
        options = {**options, "traffic_log": os.environ[ENV_LOG]}
    hub = Hub(HubOptions(**options), authkey=authkey, owner_pid=owner_pid)
    try:
        bound = hub.listen(address)
    except Exception as exc:
        _ctl_send(ctl, "error", str(exc))
        return

    def on_ctl(key: selectors.SelectorKey, mask: int) -> None:
        try:
            msg = _ctl_recv(ctl)
        except (EOFError, OSError):
            hub.stop()  # the parent is gone: so is its bus
            return
        if msg[0] == "state":
            seq = msg[1] if len(msg) > 1 else None  # the parent drops answers to older asks
            try:
                _ctl_send(ctl, "state", hub.router.state(), seq)
            except (TypeError, ValueError, OverflowError) as exc:
                _ctl_send(ctl, "error", f"the state cannot be encoded: {exc}", seq)
        elif msg[0] == "close":
            hub.stop()

    hub.selector.register(ctl.fileno(), selectors.EVENT_READ, on_ctl)
    _ctl_send(ctl, "ready", T.format_address(bound), list(bound) if not isinstance(bound, str)
              else bound)
    try:
        hub.serve_forever()
    finally:
        try:
            _ctl_send(ctl, "closed")
        except OSError:
            pass


def run_broker_foreground(address: T.Address, options: HubOptions,
                          authkey: bytes | None = None,
                          ready: Callable[[T.Address], None] | None = None) -> None:
    """Run a broker in this process until SIGINT/SIGTERM (``python -m ipcbus broker``)."""
    if options.traffic_log is None and os.environ.get(ENV_LOG):
        options.traffic_log = os.environ[ENV_LOG]
    hub = Hub(options, authkey=authkey)
    bound = hub.listen(address)

    def stop(signum: int, frame: Any) -> None:
        hub.call_soon(hub.stop)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    if ready is not None:
        ready(bound)
    hub.serve_forever()


class IpcBusBroker:
    """A bus broker running in a child process; this object is the parent's handle on it.

    Options (keyword arguments of the constructor / :meth:`create`): ``max_message`` (bytes,
    128 MiB), ``max_fds`` (per message, 64), ``queue_limit`` (per receiver, 64 MiB),
    ``slow_consumer_timeout`` (s, 10), ``handshake_timeout`` (s, 5), ``allowed_uids`` (extra
    uids let in on a Unix socket), ``traffic_log`` (a path: a row per routed message, CSV if
    it ends in ``.csv``, else JSON lines; default ``$IPCBUS_LOG``), ``ecipc`` (also serve
    electron-common-ipc clients on the Unix socket: :mod:`ipcbus.ecipc.gateway`), and ``context`` (a multiprocessing context or start method
    name; ``"spawn"`` by default, since a process with threads must not fork).
    """

    def __init__(self, *, context: Any = None, **options: Any) -> None:
        self._options = HubOptions(**options)
        if context is None or isinstance(context, str):
            context = multiprocessing.get_context(context or "spawn")
        self._context = context
        self._process: Any = None
        self._ctl: multiprocessing.connection.Connection | None = None
        self._lock = threading.Lock()
        self._address: T.Address | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._seq = 0  # of the asks over the control pipe

    @classmethod
    def create(cls, **options: Any) -> IpcBusBroker:
        """A broker handle (not started yet: :meth:`connect` starts it). Every option is a
        keyword, with its default and unit:

        - ``max_message`` (int, bytes; default 134217728 = 128 MiB): the largest frame; a
          client's larger send raises ``ValueError`` before anything is sent, a peer announcing
          a larger frame is disconnected.
        - ``max_fds`` (int, descriptors per message; default 64, at most 253).
        - ``queue_limit`` (int, bytes per receiver; default 67108864 = 64 MiB): past it the broker
          stops reading from the senders that feed that receiver (back-pressure).
        - ``slow_consumer_timeout`` (float, seconds; default 10.0): a receiver that stays over
          ``queue_limit`` this long is disconnected with the reason "slow consumer".
        - ``handshake_timeout`` (float, seconds; default 5.0): a connection that has not said
          hello (and, on TCP, authenticated) by then is dropped.
        - ``allowed_uids`` (list of int; default None = only the broker's own uid): more uids
          let in on a Unix socket.
        - ``traffic_log`` (str path; default ``$IPCBUS_LOG``, else None): a row per routed
          message, CSV if the path ends in ``.csv``, else JSON lines.
        - ``links`` (str; default ``"owner"``): who may link an ``IpcBusBridge`` to this broker.
          ``"owner"``: on the Unix socket only the process that called :meth:`connect` (the
          kernel's credentials tell), on TCP whoever proved the authkey; ``"any"``: every
          connection the broker admits; ``"none"``: nobody. A link speaks for the peers of a
          whole side and is not paused like an ordinary sender, so the broker grants the role;
          a bridge refused it gets ``IpcBusConnectionError`` naming this option.
        - ``ecipc`` (bool; default False): also serve electron-common-ipc (Node/Electron)
          clients on the same Unix socket; the first byte of a connection tells the protocols
          apart (``ipcbus.ecipc.gateway``). Not with a TCP address.
        - ``context`` (a multiprocessing context or a start method name; default ``"spawn"``):
          how the broker's child process is started.

        Bad values raise ``ValueError``/``TypeError`` here.
        """
        return cls(**options)

    @property
    def process(self) -> Any:
        """The ``multiprocessing.Process`` running the broker (None before connect)."""
        return self._process

    @property
    def address(self) -> T.Address | None:
        """Where the broker listens (with the real port if port 0 was asked)."""
        return self._address

    @property
    def closed(self) -> bool:
        return self._ctl is None

    def connect(self, address: Any = None, *, path: str | None = None, port: int | None = None,
                host: str | None = None, timeout: float | None = None,
                authkey: bytes | None = None) -> Self:
        """Start the broker process listening on ``address``; return ``self`` once it accepts
        peers (``with IpcBusBroker.create().connect(path) as broker:`` stops it at the end).

        - ``address``: a ``str`` Unix socket path (at most 107 bytes; created owner-only; a
          stale file of a dead broker is replaced, a live broker's never), an ``int`` TCP port
          on 127.0.0.1 (``0``: a free one, see :attr:`address`), or a ``(host, port)`` tuple.
          Default None: use ``path``/``port``/``host``.
        - ``path``, ``port``, ``host`` (default None): the same, as keywords (``host`` defaults
          to 127.0.0.1).
        - ``timeout`` (float, seconds; default None = 2.0 s, a negative value waits forever):
          how long the child may take to start, never less than 10 s, since starting a
          ``spawn`` child takes a while on a busy machine.
        - ``authkey`` (bytes; default None = ``$IPCBUS_AUTHKEY`` if set, else
          ``multiprocessing.current_process().authkey``): the key TCP peers must prove.

        Raises ``ValueError`` for a bad address, :class:`~ipcbus.IpcBusConnectionError` if the
        broker cannot listen there (e.g. "a bus is already listening on ..."), and
        :class:`~ipcbus.IpcBusTimeoutError` if its process does not start in time.
        """
        addr = T.parse_address(address, path=path, port=port, host=host)
        wait = resolve_timeout(timeout)
        if wait is not None:
            wait = max(wait, 10.0)  # starting a spawn child takes a while on a busy machine
        with self._lock:
            if self._ctl is not None:
                raise IpcBusConnectionError("this broker is already running")
            parent, child = self._context.Pipe(duplex=True)
            key = bytes(authkey) if authkey is not None else T.default_authkey()
            proc = self._context.Process(
                target=run_broker_child, name=f"ipcbus-broker {T.format_address(addr)}",
                args=(addr, self._options.to_dict(), key, child, os.getpid()), daemon=True)
            proc.start()
            child.close()
            try:
                if not parent.poll(wait):
                    raise IpcBusTimeoutError("the broker process did not start in time")
                msg = _ctl_recv(parent)
            except (EOFError, OSError) as exc:
                proc.join(1.0)
                parent.close()
                raise IpcBusConnectionError(f"the broker process died while starting"
                                            f" (exit code {proc.exitcode}): {exc}") from None
            except BaseException:
                proc.kill()
                parent.close()
                raise
            if msg[0] != "ready":
                proc.join(5.0)
                parent.close()
                raise IpcBusConnectionError(f"the broker could not start: {msg[1]}")
            bound = msg[2]
            self._address = bound if isinstance(bound, str) else (bound[0], bound[1])
            self._process, self._ctl = proc, parent
            self._finalizer = weakref.finalize(self, _stop_child, proc, parent)
        return self

    def _ask(self, timeout: float | None, what: str) -> list[Any]:
        """Ask the broker process; its answer, as ``[what, value, seq]``. Each ask carries
        a number the answer repeats: an answer that comes after its ask timed out is
        dropped by the next ask, never taken for that one's."""
        wait = resolve_timeout(timeout)
        deadline = None if wait is None else time.monotonic() + wait
        with self._lock:
            ctl = self._ctl
            if ctl is None:
                raise IpcBusConnectionError("the broker is not running")
            self._seq += 1
            try:
                _ctl_send(ctl, what, self._seq)
                while True:
                    left = None if deadline is None else max(0.0, deadline - time.monotonic())
                    if not ctl.poll(left):
                        raise IpcBusTimeoutError(f"the broker did not answer {what!r} in time")
                    reply = _ctl_recv(ctl)
                    if reply[-1] == self._seq:
                        break
            except (EOFError, OSError) as exc:
                if isinstance(exc, IpcBusTimeoutError):
                    raise
                raise IpcBusConnectionError(f"the broker process has gone: {exc}") from None
        if reply[0] == "error":
            raise IpcBusError(f"the broker could not answer {what!r}: {reply[1]}")
        return reply

    def query_state(self, timeout: float | None = None) -> dict[str, Any]:
        """The broker's view of the bus: pid, peers, channels with subscriber counts, services."""
        reply = self._ask(timeout, "state")
        state: dict[str, Any] = reply[1]
        return state

    def is_service_available(self, name: str, timeout: float | None = None) -> bool:
        if not isinstance(name, str):
            raise TypeError("service name must be a str")
        return name in self.query_state(timeout)["services"]

    def close(self, timeout: float | None = None) -> None:
        """Stop the broker process and remove its socket file. Idempotent."""
        with self._lock:
            ctl, self._ctl = self._ctl, None
            if ctl is None:
                return
            if self._finalizer is not None:
                self._finalizer.detach()
            _stop_child(self._process, ctl, resolve_timeout(timeout))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = T.format_address(self._address) if self._address is not None else "-"
        state = "closed" if self._ctl is None else f"pid {self._process.pid}"
        return f"<IpcBusBroker {where} {state}>"


def _stop_child(proc: Any, ctl: multiprocessing.connection.Connection,
                timeout: float | None = DEFAULT_TIMEOUT) -> None:
    try:
        _ctl_send(ctl, "close")
        if ctl.poll(timeout if timeout is not None else None):
            try:
                _ctl_recv(ctl)
            except (EOFError, OSError):
                pass
    except (OSError, ValueError):
        pass
    proc.join(timeout if timeout is not None else None)
    if proc.is_alive():
        proc.kill()
        proc.join(1.0)
    ctl.close()
