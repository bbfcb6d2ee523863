"""One connection of a hub, as the router and the hub's loop see it.

:class:`HubEndpoint` is what :class:`ipcbus._router.Router` delivers to (its ``Endpoint``
protocol): who its peers are (``ptype``, ``pid``, ``cred_pid``, decided by the hub from the
kind of connection and the kernel's credentials, SPEC "Trust"), its transport and decoder, its
output queue (:class:`ipcbus._outqueue.OutQueue`, the base class), and the descriptors it
received that wait for their frame (``fd_queue``).

Descriptor rules of the intake (SPEC "Resources"): descriptors arrive with the first byte of
their frame, or an earlier byte of the same write. Only SEND/SEND_TO may carry them, at most
``max_fds`` a frame (a link: ``MAX_FDS``); after the frames of a read, descriptors left with
no partial frame to claim them are a protocol error, and never more than one message's worth
may wait. Threads: the hub's loop thread only.
"""
from __future__ import annotations

import collections
import os
import time
from typing import Any, Callable, Protocol

from . import _protocol as P
from ._decoder import FrameDecoder
from ._handshake import Hello
from ._hub_options import HubOptions
from ._outqueue import OutQueue
from ._router import Peer, Router
from ._transport import StreamTransport, close_fds
from .errors import IpcBusProtocolError

__all__ = ["HubEndpoint", "EndpointOwner"]


class EndpointOwner(Protocol):
    """What an endpoint needs of its hub."""

    options: HubOptions
    router: Router
    queue_limit: int
    dirty: set[HubEndpoint]  # endpoints with output to flush
    shm_active: Any  # the message with shared-memory slots being routed (_hub_shm.py)
    shm: Any  # _hub_shm.HubShm

    def over_limit(self, ep: HubEndpoint) -> None:
        """``ep``'s queue just went over ``queue_limit`` (back-pressure decides)."""


class HubEndpoint(OutQueue):
    """One connection of a hub: its socket, decoder, peers and output queue."""

    __slots__ = ("hub", "transport", "decoder", "fd_queue", "peers", "relay", "label", "paused",
                 "ready", "deadline", "closing", "events", "on_ready", "can_pass_fds",
                 "delivered_msgs", "delivered_bytes", "ptype", "pid", "cred_pid", "max_in",
                 "__weakref__")

    def __init__(self, hub: EndpointOwner, transport: StreamTransport, label: str, ptype: str,
                 pid: int = 0, cred_pid: int | None = None) -> None:
        super().__init__()
        self.hub = hub
        # Who its peers are, as the hub knows it: the kind of connection, and the pid the
        # kernel reported (cred_pid) or, for a pipe or TCP, the HELLO's.
        self.ptype = ptype
        self.pid = pid
        self.cred_pid = cred_pid
        self.max_in = hub.options.max_message  # the largest frame it takes (a link: its own)
        self.transport = transport
        # Until HELLO, nothing larger than a control frame: a peer that has not introduced
        # itself cannot make the hub allocate a large buffer.
        self.decoder = FrameDecoder(P.MAX_CONTROL_BODY, merge_runs=True)
        self.fd_queue: collections.deque[int] = collections.deque()
        self.peers: dict[str, Peer] = {}
        self.relay = False
        self.label = label
        self.paused = False  # not read (back-pressure, or cut off)
        self.ready = False  # handshake done
        self.deadline = time.monotonic() + hub.options.handshake_timeout  # or CLOSING_GRACE
        self.closing: str | None = None  # cut off as a slow consumer: the reason
        self.events = 0  # the selector events it is registered for
        self.on_ready: Callable[[], None] | None = None
        self.can_pass_fds = transport.can_pass_fds
        self.delivered_msgs = 0  # messages delivered to this connection, for query_state
        self.delivered_bytes = 0

    def deliver(self, raw: bytes | bytearray, fds: list[int], count: int = 1) -> None:
        """Queue a frame (or run) for this endpoint, which owns ``fds`` from now on."""
        if self.closing is not None:
            close_fds(fds)
            return
        if self.hub.shm_active is not None:  # slots go first (_hub_shm.py)
            raw = self.hub.shm.attach(self, raw)
        size = len(raw)
        if size > self.max_in and self._over_limit(raw):
            close_fds(fds)
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
            hub.over_limit(self)

    def _over_limit(self, raw: bytes | bytearray) -> bool:
        """Whether the body of a frame in ``raw`` (one, or a run) is over ``max_in``."""
        offset = 0
        while offset < len(raw):
            hlen, blen, _ = P.PREFIX.unpack_from(raw, offset)
            if blen > self.max_in:
                return True
            offset += P.PREFIX_SIZE + hlen + blen
        return False

    def welcome(self, hello: Hello) -> None:
        """The HELLO was accepted (``_handshake.read_hello``): the peers of this connection
        are who the hub decided, and it may now send frames up to the hub's limit."""
        options = self.hub.options
        if hello.relay:
            self.relay = True
            if hello.max_message is not None and hello.max_message < self.max_in:
                self.max_in = hello.max_message  # a link takes no frame over its own limit
        if self.cred_pid is None:  # a pipe or TCP: the pid it reports, fixed from now on
            self.pid = hello.pid
            self.label = f"{self.label} pid {hello.pid}"
        if self.relay:
            self.label = f"{self.label} link"
        self.ready = True
        self.decoder.max_message = options.max_message
        self.deliver(P.welcome_frame(os.getpid(), self.can_pass_fds, options.max_message,
                                     hello.version, options.max_fds), [])
        if self.on_ready is not None:
            self.on_ready()

    # -- the intake's descriptors -------------------------------------------------------------
    @property
    def fd_limit(self) -> int:
        """Descriptors a frame may carry (a link writes several frames, and their descriptors,
        in one go, as a hub does)."""
        return P.MAX_FDS if self.relay else self.hub.options.max_fds

    def take_fds(self, frame: P.Frame) -> None:
        """Give a frame the descriptors it announces: it owns them from now on."""
        if frame.kind not in P.FD_KINDS or not self.ready:
            raise IpcBusProtocolError(f"a {P.Kind(frame.kind).name} frame cannot carry"
                                      " descriptors")
        limit = self.fd_limit
        if frame.nfds > limit:
            raise IpcBusProtocolError(
                f"frame carries {frame.nfds} descriptors, over the limit of {limit}")
        if len(self.fd_queue) < frame.nfds:
            raise IpcBusProtocolError(
                f"frame announces {frame.nfds} descriptors, {len(self.fd_queue)} arrived")
        frame.fds = [self.fd_queue.popleft() for _ in range(frame.nfds)]

    def check_unclaimed(self) -> None:
        """After the frames of a read: descriptors left belong to a frame not complete yet;
        any others were announced by no frame. (A link's read may end between frames whose
        descriptors came with one write: bounded by MAX_FDS for a link.)"""
        if not self.decoder.pending_bytes and not self.relay:
            raise IpcBusProtocolError(f"{len(self.fd_queue)} descriptors arrived that no frame"
                                      " announced")
        if len(self.fd_queue) > self.fd_limit:
            raise IpcBusProtocolError(f"{len(self.fd_queue)} descriptors wait for a frame, over"
                                      f" the limit of {self.fd_limit}")

    def release_input(self) -> None:
        """Close the descriptors waiting for a frame (the endpoint is dropped)."""
        close_fds(self.fd_queue)
        self.fd_queue.clear()

    def __repr__(self) -> str:
        return f"<endpoint {self.label}>"
