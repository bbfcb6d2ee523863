"""Delivering one received frame to the listeners of this process's clients.

Runs on the connection's dispatch thread (see ``connection.py``). A frame goes to the clients
it is for: a broadcast (SEND) to every client listening on its channel, a SEND_TO or a
REQUEST to the one client it names. Three paths:

* :func:`deliver_spy_copy`: a copy for a spy's handler;
* :func:`deliver_messages`: the common case, a message without descriptors (perhaps a run of
  messages with one header, merged by the decoder);
* :func:`deliver_request_or_ports`: a request (each listener gets an ``event.request`` to
  answer; the first answer wins) or a message carrying descriptors. The frame owns its
  descriptors until a listener's ``event.ports`` takes them: every other path, an exception
  included, closes them.

Whatever a listener raises, ``SystemExit`` and ``KeyboardInterrupt`` included, is logged and
goes no further: the dispatch thread is shared by every client and thread of the process. A
request whose every local receiver (client) had a listener raise, and that none of them
answered, is failed at once: the process tells the hub (REQUEST_FAIL with "TypeName:
message"), which fails the request when no receiver is left anywhere (:func:`fail_unanswered`).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Protocol, Sequence, cast

from .. import _protocol as P
from .. import _transport as T
from .._protocol import Kind
from .._types import IpcBusEvent, IpcBusPeer, IpcBusProcess, IpcBusRequest, _Answered
from .._decoder import FrameDecoder
from ..errors import IpcBusProtocolError
from .cancels import Delivered, run_cancel
from .shm_delivery import ShmFrame, ShmGrouped, call_shm_request, deliver_shm

log = logging.getLogger("ipcbus")

__all__ = ["LocalClient", "PeerCache", "deliver", "ports_of"]

_SEND, _REQUEST, _SPY_COPY = int(Kind.SEND), int(Kind.REQUEST), int(Kind.SPY_COPY)
_REQUEST_ALL, _CANCEL = int(Kind.REQUEST_ALL), int(Kind.CANCEL)
_GROUPED = int(Kind.GROUPED)
_GROUPABLE = frozenset({_SEND, _REQUEST, _REQUEST_ALL})  # what a GROUPED frame may carry
_DECODED = P.DecodedFrame


class LocalClient(Protocol):
    """What delivery needs of a client of this process (``IpcBusClient``)."""

    _peer_id: str | None
    _spy_handler: Callable[[P.Frame], None] | None
    _listeners: dict[str, Any]

    @property
    def _member(self) -> Any: ...

    def _take(self, key: str) -> list[Callable[..., Any]]: ...

    def _connection_ended(self, conn: Any) -> None: ...

    def _pack_answer(self, resolved: bool, value: Any) -> Any: ...

    def _send_answer(self, channel: str, requester: str, rid: int, body: Any,
                     member: Any) -> None: ...


class PeerCache:
    """The :class:`IpcBusPeer` of a sender tuple ``[id, name, type, pid]``, made once per
    peer (at most 4096 kept): called as ``peer_of(info)``."""

    def __init__(self) -> None:
        self.peers: dict[str, IpcBusPeer] = {}

    def __call__(self, info: Any) -> IpcBusPeer | None:
        if info is None:
            return None
        peer = self.peers.get(info[0])
        if peer is None:
            if len(self.peers) > 4096:
                self.peers.clear()
            peer = IpcBusPeer(info[0], info[1], IpcBusProcess(info[2], info[3]))
            self.peers[info[0]] = peer
        return peer


class Refuse(Protocol):
    """Fails a request delivered to this process: REQUEST_FAIL with ``reason`` (None: no
    listener left here) in the name of ``client`` (None: any client of the process)."""

    def __call__(self, frame: P.Frame, reason: str | None = None,
                 client: LocalClient | None = None) -> None: ...


def deliver(frame: P.Frame, clients: Sequence[LocalClient],
            peer_of: Callable[[Any], IpcBusPeer | None], refuse: Refuse,
            delivered: Delivered | None = None) -> None:
    """Run the listeners of ``frame`` among ``clients`` (``peer_of``: the peer of a sender
    tuple; ``refuse``: fails a request none of them listens to any more, or whose every
    local receiver raised; ``delivered``: the requests delivered here, which a CANCEL frame
    looks up: ``cancels.py``)."""
    kind, channel = frame.kind, frame.channel
    if kind == _SPY_COPY:
        deliver_spy_copy(frame, clients)
        return
    if kind == _SEND or frame.target is None:
        if kind == _CANCEL:
            if delivered is not None:
                run_cancel(delivered, frame.sender_id, frame.rid)
            return
        receivers = [c for c in clients if channel in c._listeners]
    elif kind == _GROUPED:
        deliver_grouped(frame, clients, peer_of, refuse, delivered)
        return
    else:
        receivers = [c for c in clients if c._peer_id == frame.target
                     and channel in c._listeners]
    if not receivers:
        if frame.fds:
            T.close_fds(frame.fds)
        if frame.__class__ is ShmFrame:  # its slots go back now (shm_delivery.py)
            frame.done()
        if kind == _REQUEST or kind == _REQUEST_ALL:
            refuse(frame)  # our listeners went away after the router sent it: say so at once
        return
    sender = peer_of(frame.sender)
    if kind != _REQUEST and kind != _REQUEST_ALL and not frame.nfds:
        deliver_messages(frame, receivers, sender)
    else:
        deliver_request_or_ports(frame, receivers, sender, refuse, delivered)


# the headers of frames carried in GROUPED frames, decoded (as a decoder caches its own)
_inner_headers: dict[bytes, tuple[int, str, Any, Any, int]] = {}


def _one_frame(raw: bytes) -> P.Frame | None:
    """``raw`` as one frame, its header decoded once per distinct header (the common case:
    a hub hands one frame per GROUPED); None if it is not exactly one frame."""
    size = len(raw)
    if size < P.PREFIX_SIZE:
        return None
    hlen, blen, rid = P.PREFIX.unpack_from(raw, 0)
    if not 1 <= hlen <= P.MAX_HEADER or rid >= 2**63 or P.PREFIX_SIZE + hlen + blen != size:
        return None
    key = raw[P.PREFIX_SIZE:P.PREFIX_SIZE + hlen]
    fields = _inner_headers.get(key)
    if fields is None:
        fields = P.decode_header(key)
        if len(_inner_headers) >= 256:
            _inner_headers.clear()
        _inner_headers[key] = fields
    kind, channel, sender, target, nfds = fields
    return P.Frame(kind, channel, sender, target, rid, nfds, raw, P.PREFIX_SIZE + hlen)


def grouped_frames(frame: P.Frame) -> tuple[str, list[P.Frame]]:
    """The group and the frames a GROUPED frame carries; IpcBusProtocolError if malformed."""
    body = P.unpack_payload(memoryview(frame.raw)[frame.body_offset:])
    if not (isinstance(body, list) and len(body) == 2 and isinstance(body[0], str)
            and isinstance(body[1], bytes)):
        raise IpcBusProtocolError("malformed GROUPED frame")
    one = _one_frame(body[1])
    if one is not None:
        inner = [one]
    else:
        decoder = FrameDecoder(max_message=2**32 - 1)
        decoder.feed(body[1])
        inner = list(decoder.frames())
    if any(f.kind not in _GROUPABLE or f.channel != frame.channel for f in inner):
        raise IpcBusProtocolError("a GROUPED frame carries a frame that cannot be grouped")
    return body[0], inner


def deliver_grouped(frame: P.Frame, clients: Sequence[LocalClient],
                    peer_of: Callable[[Any], IpcBusPeer | None], refuse: Refuse,
                    delivered: Delivered | None = None) -> None:
    """A message or request the hub gave the client ``frame.target`` as the chosen member of
    a group: only that client's listeners of that group run (``_client/groups.py``). One
    whose large arguments are in shared memory came as a ``ShmGrouped`` (``shm.py``): its
    slots are given back when its listeners return, or now if none is left to run."""
    client: Any = next((c for c in clients if c._peer_id == frame.target), None)  # a
    # GroupedEmitter (_client/groups.py): its _groups and _group_take
    try:
        group, inner = (frame.group, [frame.inner]) if frame.__class__ is ShmGrouped \
            else grouped_frames(frame)
    except IpcBusProtocolError as exc:
        log.error("dropped a grouped frame on %r: %s", frame.channel, exc)
        return
    for one in inner:
        is_request = one.kind == _REQUEST or one.kind == _REQUEST_ALL
        if client is None or not client._groups.listener_count((one.channel, group)):
            if is_request:
                refuse(one, None, client)  # our members went away after the hub chose us
            if one.__class__ is ShmFrame:
                one.done()
            continue
        sender = peer_of(one.sender)
        if is_request:
            deliver_request_or_ports(one, [client], sender, refuse, delivered, group)
        else:
            deliver_messages(one, [client], sender, group)


def deliver_spy_copy(frame: P.Frame, clients: Iterable[LocalClient]) -> None:
    for client in clients:
        if client._peer_id == frame.target and client._spy_handler is not None:
            try:
                client._spy_handler(frame)
            except BaseException:
                log.exception("spy handler raised")


def _bodies(frame: P.Frame) -> Iterable[Any]:
    """The bodies of a message frame: decoded already, or one or more encoded ones."""
    if frame.count > 1:
        return frame.bodies()
    if frame.__class__ is _DECODED:
        return (frame.args,)
    return (memoryview(frame.raw)[frame.body_offset:],)


def deliver_messages(frame: P.Frame, receivers: list[LocalClient],
                     sender: IpcBusPeer | None, group: str | None = None) -> None:
    """The common case: messages without descriptors, to each receiver's listeners (of
    ``group``: a grouped delivery)."""
    channel = frame.channel
    if frame.__class__ is ShmFrame:  # large arguments in shared memory
        deliver_shm(frame, receivers, sender, group, _call)
        return
    for body in _bodies(frame):
        if body.__class__ is list:
            args = body
        else:
            try:
                args = P.unpack_payload(body)
            except IpcBusProtocolError as exc:
                log.error("dropped a message on %r from %s: %s", channel, frame.sender_id, exc)
                continue
        if args.__class__ is not list:
            args = [args]
        for client in receivers:
            listeners = client._take(channel) if group is None else \
                cast(Any, client)._group_take(channel, group)
            if listeners:
                _call(listeners, IpcBusEvent(channel, sender, None, None), args)


def _call(listeners: list[Callable[..., Any]], event: IpcBusEvent, args: list[Any]
          ) -> BaseException | None:
    """Run ``listeners``; the first exception one of them raised (contained), or None."""
    raised = None
    for listener in listeners:
        try:
            listener(event, *args)
        except BaseException as exc:  # contained: see the module docstring
            log.exception("listener %r of channel %r raised", listener, event.channel)
            if raised is None:
                raised = exc
    return raised


def failure_reason(exc: BaseException) -> str:
    """How a listener's exception reaches a requester: "TypeName: message", as the
    rejections of services say it."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _args_and_kinds(frame: P.Frame) -> tuple[list[Any], list[str] | None]:
    """The arguments of a request or a message with descriptors, and the kinds of its
    ports; IpcBusProtocolError if they are malformed."""
    body = P.unpack_payload(memoryview(frame.raw)[frame.body_offset:])
    kinds: list[str] | None = None
    if frame.nfds:
        if not (isinstance(body, list) and len(body) == 2
                and isinstance(body[0], list) and isinstance(body[1], list)
                and len(body[1]) == frame.nfds
                and all(isinstance(k, str) and k in T.PORT_KINDS for k in body[1])):
            raise IpcBusProtocolError("malformed list of port kinds")
        body, kinds = body
    return (body if body.__class__ is list else [body]), kinds


def deliver_request_or_ports(frame: P.Frame, receivers: list[LocalClient],
                             sender: IpcBusPeer | None, refuse: Refuse,
                             delivered: Delivered | None = None,
                             group: str | None = None) -> None:
    """A request, or a message with descriptors: each taker of the frame's listeners gets
    its event (a request to answer, its own ports: duplicates for all but the last taker,
    who gets the frame's). The takers of a REQUEST share one answer (the first wins), those
    of a REQUEST_ALL answer each; a request is kept in ``delivered`` until answered."""
    channel = frame.channel
    fds = frame.fds
    shm = frame if frame.__class__ is ShmFrame else None  # large arguments in shared memory
    try:
        try:
            args, kinds = ([], None) if shm is not None else _args_and_kinds(frame)
        except IpcBusProtocolError as exc:
            log.error("dropped a message on %r from %s: %s", channel, frame.sender_id, exc)
            return
        takers = [(client, listeners) for client in receivers
                  if (listeners := client._take(channel) if group is None
                      else cast(Any, client)._group_take(channel, group))]
        answered = _answer_state(frame, sender, len(takers), delivered)
        failed: list[BaseException] = []  # per taker whose listeners raised: the first error
        for i, (client, listeners) in enumerate(takers):
            request = None
            if answered is not None and sender is not None:
                if i and frame.kind == _REQUEST_ALL:  # each client answers for itself
                    answered = _Answered(answered.cancel)
                request = IpcBusRequest(client, sender.id, frame.rid, channel, answered)
            ports = None
            if kinds is not None:
                if i == len(takers) - 1:
                    given, fds = fds, []
                    ports = ports_of(given, kinds, dup=False)
                else:
                    ports = ports_of(fds, kinds, dup=True)
            if shm is not None:
                raised = call_shm_request(shm, listeners, sender, request, _call)
            else:
                raised = _call(listeners, IpcBusEvent(channel, sender, request, ports), args)
            if raised is not None and answered is not None:
                failed.append(raised)
        if failed and len(failed) == len(takers) and answered is not None:
            fail_unanswered(frame, answered, failed[0], takers[0][0], refuse)
    finally:
        T.close_fds(fds)  # descriptors no listener took
        if shm is not None:
            shm.done()


def fail_unanswered(frame: P.Frame, answered: _Answered, exc: BaseException,
                    client: LocalClient, refuse: Refuse) -> None:
    """Every local receiver of a request had a listener raise (an answer that cannot be
    encoded raises in ``resolve``): unless one answered first, tell the hub at once, in the
    name of a receiver (``refuse``), so the request fails when no other receiver is left on
    the bus (SPEC 0.2 "failures"). Later answers from this process are refused (False)."""
    with answered.lock:
        if answered.done:
            return
        answered.done = True
    refuse(frame, failure_reason(exc), client)
    cancel = answered.cancel
    if cancel is not None:  # failed: no answer will come to forget its cancel state
        cancel.forget(cancel.key)


def _answer_state(frame: P.Frame, sender: IpcBusPeer | None, takers: int,
                  delivered: Delivered | None) -> _Answered | None:
    """The answer state of a request delivered to ``takers`` clients (None: not a
    request), its cancel state kept in ``delivered``."""
    kind = frame.kind
    if kind != _REQUEST and kind != _REQUEST_ALL:
        return None
    if delivered is None or sender is None or not takers:
        return _Answered()
    answers = takers if kind == _REQUEST_ALL else 1
    timeout = frame.timeout if frame.__class__ is ShmFrame else P.request_timeout(frame.raw)
    return _Answered(delivered.add((sender.id, frame.rid), timeout, answers))


def ports_of(fds: list[int], kinds: list[str], dup: bool) -> list[Any]:
    """Received descriptors as the kinds of handle the sender posted: duplicates of ``fds``
    (``dup``), or ``fds`` themselves, which this call then owns (closed if it fails)."""
    own = T.dup_fds(fds) if dup else list(fds)
    ports: list[Any] = []
    try:
        for fd, kind in zip(own, kinds):
            ports.append(T.port_from_descriptor(fd, kind))
        return ports
    except BaseException:
        for port in ports:
            if isinstance(port, int):
                T.close_fds([port])
            else:
                port.close()
        T.close_fds(own[len(ports) + 1:])  # port_from_descriptor closed the failing one
        raise
