"""The federation link: a broker's relay endpoint for the other brokers, fed by NATS.

``IpcBusBroker.create(federation="nats://HOST:PORT", bus="NAME")`` gives the broker one
:class:`FederationLink`. To the hub it is an endpoint like a bridge's link (a *relay*): it
speaks for the peers of every other broker of the bus, so the router routes to them as it
routes to the peers behind a bridge, and sends it a message only when one of them listens
(no remote interest: nothing reaches the link, nor NATS). The router also tells it of this
side's peers, subscriptions and services (``_routing.tell_federation``), which the link
announces to the other links and turns into NATS subscriptions (interest).

The link runs nats-py's asyncio loop on a thread of the broker process; the hub and the link
talk ipcbus frames over a socketpair (the hub's loop never waits for NATS, and a stall of
NATS never blocks the local bus). What crosses, and how (``_federation_subjects`` names the
subjects, ``_federation_state`` keeps what the link knows):

* the payload of every NATS message is the ipcbus frame as the broker routed it (it carries
  the kind, channel, sender and rid); NATS headers carry only what the frame does not (the
  sending link, the kind of announcement);
* broadcasts and requests go to the channel's subject, send_to and a group's chosen member to
  the broker of the target, answers to the request's reply subject; a request to a subject
  no one subscribes gets NATS's "no responders" status: it fails at once;
* order: NATS keeps one publisher's order to one subscriber; nats-py hands each subscription
  its own task, which would lose it across subjects, so the link takes its subscriptions'
  messages as the client parses them (:class:`_OrderedClient`);
* groups: the broker where a message starts chooses the member (among every member of the
  bus, each broker having announced its members), and hands it a GROUPED frame through its
  broker; the other brokers never choose for a message that came over NATS, so each job
  runs once across the federation (NATS queue groups would choose without seeing the local
  members and their load);
* outages: when NATS goes, requests out fail with the reason and the other brokers' peers
  leave the bus; the local bus goes on; nats-py reconnects by itself, and the link then
  announces its side again and asks the others for theirs.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
import time
import urllib.parse
import uuid
from typing import Any, Callable

from . import _protocol as P
from ._federation_inbound import LINK, OP, Inbound
from ._federation_outbound import Outbound
from ._federation_state import FederationState
from ._federation_subjects import Subjects
from ._protocol import Kind
from ._routing import fail_frame
from .errors import IpcBusConnectionError

__all__ = ["FederationLink", "public_url", "LINK_QUEUE_LIMIT"]

log = logging.getLogger("ipcbus")

LINK_QUEUE_LIMIT = 64 * 1024 * 1024
HEARTBEAT = 1.0  # seconds between a link's beats on ctl
SILENCE_LIMIT = 3.5  # seconds without a word from a link: it is gone  # bytes waiting for the hub before the link is "slow"
_HEADER_ROOM = 1024  # of NATS's max_payload, kept for headers


def public_url(url: str) -> str:
    """``url`` (or comma-separated URLs: a cluster's) without credentials (logs, state)."""
    if "," in url:
        return ",".join(public_url(u.strip()) for u in url.split(","))
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def tls_options(options: dict[str, Any]) -> dict[str, Any]:
    """nats-py options from ``federation_options``: ``tls_ca``, ``tls_cert``, ``tls_key``
    (file paths: a broker's options cross a process boundary, an SSLContext does not) make
    the ``tls`` context."""
    ca, cert, key = (options.pop(k, None) for k in ("tls_ca", "tls_cert", "tls_key"))
    if ca or cert:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
        if cert:
            context.load_cert_chain(cert, key)
        options["tls"] = context
    return options


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _ordered_client_class() -> Any:
    from nats.aio.client import Client

    class _OrderedClient(Client):
        """A nats-py client that hands the messages of the link's subscriptions to one
        callback, in the order it parsed them (see the module's docstring)."""

        ordered: dict[int, Callable[[bytes, bytes, bytes, bytes | None], None]] = {}

        async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes,
                               headers: bytes | None) -> None:
            handler = self.ordered.get(sid)
            if handler is None:
                await super()._process_msg(sid, subject, reply, data, headers)  # type: ignore[arg-type]
                return
            self.stats["in_msgs"] += 1
            self.stats["in_bytes"] += len(data)
            try:
                handler(subject, reply, data, headers)
            except Exception as exc:  # one message never stops the client's reading
                log.error("federation: a message on %r was not handled: %r", subject, exc,
                          exc_info=exc)

    return _OrderedClient


class FederationLink:
    """One broker's link to NATS (see the module's docstring)."""

    def __init__(self, url: str, bus: str, options: dict[str, Any] | None = None) -> None:
        self.url = url
        self.bus = bus
        self.options = tls_options(dict(options or {}))
        self.where = public_url(url)
        self.id = uuid.uuid4().hex[:16]
        self.subjects = Subjects(bus, self.id)
        self.state = FederationState(self.id)
        self.lock = threading.Lock()  # the state, between this thread and the hub's
        self.connected = False
        self.stopping = False
        self.slow = False
        self.counters = dict.fromkeys(("published", "received", "link_slow", "outages"), 0)
        self._error: str | None = None
        self._started = threading.Event()
        self._thread: threading.Thread | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.nc: Any = None
        self.sock: socket.socket | None = None
        self._out: list[memoryview] = []
        self._batch: list[bytes | bytearray] = []
        self.endpoint_limit = 0  # the largest frame (or run) one NATS message carries
        self._out_bytes = 0
        self.channel_subs: dict[str, Any] = {}
        self.hub: Any = None
        self.inbound = Inbound(self)
        self.outbound = Outbound(self)

    # -- the broker's side (the hub's thread) ---------------------------------------------------
    def start(self, hub: Any, timeout: float = 10.0) -> None:
        """Attach to ``hub`` (before it serves) and connect to NATS; IpcBusConnectionError
        naming the cause if NATS cannot be reached or refuses the credentials."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        theirs.setblocking(False)
        self.sock, self.hub = theirs, hub
        self._thread = threading.Thread(target=self._run, name="ipcbus-federation",
                                        daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            self._error = f"no answer from {self.where} in {timeout:g} s"
        if self._error is not None:
            mine.close()
            self.close()
            raise IpcBusConnectionError(f"federation: cannot join bus {self.bus!r} over NATS"
                                        f" at {self.where}: {self._error}")
        ep = hub.add_endpoint(mine, f"federation {self.where} bus {self.bus}",
                              ptype="socket", relay=True, ready=True)
        ep.can_pass_fds = False  # descriptors stay on their host
        ep.max_in = self.endpoint_limit = max(1, int(self.nc.max_payload) - _HEADER_ROOM)
        hub.router.federation = ep
        hub.state_parts.append(self.snapshot)

    def snapshot(self) -> dict[str, Any]:
        """The link's part of the bus state (``query_state()["federation"]``)."""
        with self.lock:
            state = self.state.state()
        return {"federation": {"url": self.where, "bus": self.bus,
                               "connected": self.connected, "slow": self.slow,
                               "queued_bytes": self._out_bytes, **self.counters, **state}}

    def close(self) -> None:
        loop = self.loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self.stop()))
            except RuntimeError:
                pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(3.0)

    # -- the link's thread ----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except Exception as exc:  # never the broker's end
            log.error("federation link stopped: %r", exc, exc_info=exc)
        finally:
            self._started.set()
            if self.sock is not None:
                self.sock.close()

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._done = asyncio.Event()
        nc = _ordered_client_class()()
        nc.ordered = {}
        self.nc = nc
        # The first connection must succeed at once (a wrong password, nothing listening:
        # a clear error at the broker's connect()); later ones are retried for ever.
        self._connecting = asyncio.ensure_future(nc.connect(
            servers=[u.strip() for u in self.url.split(",")], name=f"ipcbus {self.bus} {self.id}", no_echo=True,
            allow_reconnect=True, max_reconnect_attempts=-1, reconnect_time_wait=0.25,
            connect_timeout=2, error_cb=self._on_error,
            disconnected_cb=self._on_disconnected, reconnected_cb=self._on_reconnected,
            **self.options))
        try:
            await self._connecting
        except (Exception, asyncio.CancelledError) as exc:
            if self._error is None:
                self._error = _describe(exc)
            try:
                await nc.close()
            except Exception:
                pass
            self._started.set()
            return
        self.connected = True
        await self.subscribe(self.subjects.ctl, self.inbound.on_ctl)
        await self.subscribe(self.subjects.inbox, self.inbound.on_inbox)
        await self.subscribe(f"{self.subjects.replies}.*", self.inbound.on_reply)
        await nc.flush()
        await self._announce()
        self._started.set()
        reader = asyncio.ensure_future(self.outbound.read_hub())
        beat = asyncio.ensure_future(self._heartbeat())
        await self._done.wait()
        reader.cancel()
        beat.cancel()

    async def stop(self) -> None:
        """Say goodbye (the other brokers forget this side's peers at once), then close."""
        nc, self.stopping = self.nc, True
        if nc is not None and nc.is_connected:
            try:
                await nc.publish(self.subjects.ctl, b"", headers={LINK: self.id, OP: "bye"})
                await nc.flush(timeout=1)
            except Exception:
                pass
        if nc is not None and not nc.is_closed:
            try:
                await nc.close()
            except Exception:
                pass
        self._done.set()

    async def subscribe(self, subject: str, handler: Callable[..., None]) -> Any:
        sub = await self.nc.subscribe(subject)
        self.nc.ordered[sub._id] = handler
        return sub

    async def _heartbeat(self) -> None:
        """Beat on ``ctl`` every HEARTBEAT seconds; forget the links silent for
        SILENCE_LIMIT (a broker killed, or cut off from NATS, says no bye)."""
        while True:
            await asyncio.sleep(HEARTBEAT)
            if not self.connected:
                continue
            try:
                await self.nc.publish(self.subjects.ctl, b"", headers={LINK: self.id, OP: "hb"})
            except Exception as exc:
                log.debug("federation: heartbeat not sent: %r", exc)
            with self.lock:
                for link in self.state.silent(time.monotonic(), SILENCE_LIMIT):
                    log.warning("federation: broker %s is silent for %g s: its peers leave the"
                                " bus", link, SILENCE_LIMIT)
                    self.remote_gone(link, f"broker {link} of the federation is silent (gone,"
                                           " or cut off from NATS)")

    async def _announce(self) -> None:
        """Tell the bus this link's side, and ask the others for theirs."""
        with self.lock:
            frames = b"".join(self.state.local_frames())
        await self.nc.publish(self.subjects.ctl, frames,
                               headers={LINK: self.id, OP: "state", "Reply": self.subjects.inbox})

    async def send_state(self, subject: str) -> None:
        with self.lock:  # this side as it is when it goes (announcements after it follow it)
            frames = b"".join(self.state.local_frames())
        await self.nc.publish(subject, frames, headers={LINK: self.id, OP: "state"})

    # -- NATS's news --------------------------------------------------------------------------
    async def _on_error(self, exc: Exception) -> None:
        if not self._started.is_set() and self._error is None:  # the first connection
            self._error = _describe(exc)
            self._connecting.cancel()
            return
        # (while NATS is away, each reconnection attempt fails: not worth a warning each)
        (log.warning if self.connected else log.debug)("federation link to %s: %s",
                                                       self.where, exc)

    async def _on_disconnected(self) -> None:
        if not self.connected or self.stopping:
            return
        self.connected = False
        self.counters["outages"] += 1
        log.warning("federation: NATS at %s is unreachable; the other brokers' peers leave"
                    " the bus until it is back", self.where)
        reason = (f"the federation link to NATS at {self.where} is down: the"
                  " other brokers cannot be reached (connection lost)")
        with self.lock:
            for key in self.state.fail_all():
                self.to_hub(fail_frame(key[0], key[1], reason))
            self.state.owed.clear()
            for link in list(self.state.remotes):
                self.remote_gone(link)

    async def _on_reconnected(self) -> None:
        self.connected = True
        log.warning("federation: NATS at %s is back; announcing this side again",
                    self.where)
        await self._announce()

    def remote_gone(self, link: str, reason: str = "") -> None:
        reason = reason or f"broker {link} left the federation"
        for key in self.state.link_failed(link):
            self.to_hub(fail_frame(key[0], key[1], reason))
        for info in self.state.remote_gone(link):
            self.to_hub(P.encode_frame(Kind.PEER_REMOVE, sender=info))

    # -- from NATS to the hub -------------------------------------------------------------------
    def to_hub(self, raw: bytes | bytearray) -> None:
        """Write a frame to the hub (the link's own queue holds what the socket does not
        take yet; past LINK_QUEUE_LIMIT the link is "slow": messages are dropped, counted and
        logged, bookkeeping frames kept)."""
        sock = self.sock
        if sock is None:
            return
        if self._out:
            if self._out_bytes > LINK_QUEUE_LIMIT:
                if not self.slow:
                    log.warning("federation: link slow: %d bytes wait for the broker; messages"
                                " from other brokers are dropped", self._out_bytes)
                self.slow = True
                self.counters["link_slow"] += 1
                kind = P.decode_header(memoryview(raw)[P.PREFIX_SIZE:P.PREFIX_SIZE +
                                                       P.PREFIX.unpack_from(raw, 0)[0]])[0]
                if kind in (Kind.SEND, Kind.SEND_TO):
                    return
            self._out.append(memoryview(raw))
            self._out_bytes += len(raw)
            return
        # The frames of one batch of NATS messages go in one write (the loop runs the
        # flush once the NATS client has handed over what it parsed).
        batch = self._batch
        batch.append(raw)
        if len(batch) == 1:
            assert self.loop is not None
            self.loop.call_soon(self._send_batch)

    def _send_batch(self) -> None:
        batch, self._batch = self._batch, []
        sock = self.sock
        if not batch or sock is None:
            return
        data = batch[0] if len(batch) == 1 else b"".join(batch)
        try:
            n = sock.send(data)
        except BlockingIOError:
            n = 0
        except OSError:
            return
        if n < len(data):
            self._out.append(memoryview(data)[n:])
            self._out_bytes += len(data) - n
            assert self.loop is not None
            self.loop.add_writer(sock, self.flush_out)

    def flush_out(self) -> None:
        sock = self.sock
        assert sock is not None and self.loop is not None
        with self.lock:
            while self._out:
                chunk = self._out[0]
                try:
                    n = sock.send(chunk)
                except BlockingIOError:
                    return
                except OSError:
                    self._out.clear()
                    break
                self._out_bytes -= n
                if n < len(chunk):
                    self._out[0] = chunk[n:]
                    return
                self._out.pop(0)
            self._out_bytes = 0
            self.slow = False
            self.loop.remove_writer(sock)

    def spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        task.add_done_callback(_quiet)

def _quiet(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.debug("federation: %r", task.exception())
