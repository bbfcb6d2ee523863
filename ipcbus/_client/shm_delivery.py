"""Delivering a message whose large arguments are slots of a shared-memory arena.

The reader (``shm.py``) turns such a message into a :class:`ShmFrame`: its arguments with
read-only ``memoryview``s of the mapped arena in place of the placeholders, and a
:class:`Lease` on its slots. The dispatcher (``delivery.py`` calls :func:`deliver_shm`) gives

* a listener registered with ``zero_copy=True`` (:class:`ZeroCopyListener`) those views:
  valid until it returns, or, if it called ``event.retain()``, until the returned object is
  released (``release()`` or the end of a ``with`` block);
* every other listener ``bytes``: one copy out of the arena per message (made once, shared).

A message or request handed to a group's chosen member comes as a :class:`ShmGrouped`
(the GROUPED frame, its group, and the carried message as a ``ShmFrame``):
``delivery.deliver_grouped`` runs the member's listeners of that group the same way.

When the delivery is over and nothing retains them, the views are released (a view used
after that raises ``ValueError``) and the slots given back to the hub (SHM_RELEASE). An
object that still exports a view's buffer then (``numpy.frombuffer`` of it kept past the
listener without ``retain()``) keeps the memory mapped but not the slot: it is logged, and
the sender may write new data there.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Sequence

from .. import _protocol as P
from .._protocol import Kind
from .._types import IpcBusEvent, IpcBusPeer

log = logging.getLogger("ipcbus")

_REQUESTS = frozenset({int(Kind.REQUEST), int(Kind.REQUEST_ALL)})

__all__ = ["ShmFrame", "ShmGrouped", "Lease", "ZeroCopyListener", "deliver_shm",
           "call_shm_request"]


class ZeroCopyListener:
    """A listener registered with ``zero_copy=True`` (compares equal to the function it
    wraps, so ``off(channel, fn)`` finds it)."""

    __slots__ = ("listener",)

    def __init__(self, listener: Callable[..., Any]) -> None:
        self.listener = listener

    def __call__(self, *args: Any) -> Any:
        return self.listener(*args)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ZeroCopyListener):
            return other.listener == self.listener
        return bool(other == self.listener)

    def __hash__(self) -> int:
        return hash(self.listener)

    def __repr__(self) -> str:
        return f"ZeroCopyListener({self.listener!r})"


class Lease:
    """The slots of one received message: given back once its delivery is over and every
    retained hold is released (``release``: sends SHM_RELEASE; any thread)."""

    __slots__ = ("views", "count", "lock", "give_back")

    def __init__(self, views: list[memoryview], give_back: Callable[[], None]) -> None:
        self.views = views
        self.count = 1  # the delivery itself
        self.lock = threading.Lock()
        self.give_back = give_back

    def retain(self) -> Retained:
        with self.lock:
            if self.count <= 0:
                raise ValueError("the views of this event were released already: call"
                                 " event.retain() in the listener")
            self.count += 1
        return Retained(self)

    def done(self) -> None:
        with self.lock:
            self.count -= 1
            if self.count:
                return
        for view in self.views:
            try:
                view.release()
            except BufferError:
                log.warning("a zero_copy view is still in use after its listener returned"
                            " (use event.retain()); its slot is given back anyway")
        self.give_back()


class Retained:
    """What ``event.retain()`` returns: the views stay valid until :meth:`release`."""

    __slots__ = ("lease",)

    def __init__(self, lease: Lease) -> None:
        self.lease: Lease | None = lease

    def release(self) -> None:
        lease, self.lease = self.lease, None
        if lease is not None:
            lease.done()

    def __enter__(self) -> Retained:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class ShmFrame(P.DecodedFrame):
    """A message (or request) whose ``args`` hold views of an arena; ``copied()`` gives
    them as bytes. ``timeout``: a request's, from its header (``raw`` is not the frame)."""

    __slots__ = ("lease", "copy_args", "_copied", "timeout")

    def __init__(self, frame: P.Frame, args: list[Any], lease: Lease,
                 copy_args: Callable[[], list[Any]], size: Any) -> None:
        super().__init__(frame.kind, frame.channel, frame.sender, frame.target, frame.rid,
                         size, args)
        self.lease = lease
        self.copy_args = copy_args
        self._copied: list[Any] | None = None
        self.timeout = P.request_timeout(frame.raw) if frame.kind in _REQUESTS else None

    def copied(self) -> list[Any]:
        if self._copied is None:
            self._copied = self.copy_args()
        return self._copied

    def done(self) -> None:
        """Its delivery is over: the copy goes, the lease's delivery hold ends."""
        self._copied = None  # freed now: the next message's copy reuses its memory
        self.args = []
        self.lease.done()


class ShmGrouped(P.Frame):
    """A GROUPED frame (a group's chosen member, ``delivery.deliver_grouped``) whose carried
    message or request has its large arguments in shared memory: ``group``, and ``inner``
    that message as a :class:`ShmFrame` (whoever drops it calls ``inner.done()``, which
    gives the slots back)."""

    __slots__ = ("group", "inner")

    def __init__(self, frame: P.Frame, group: str, inner: ShmFrame) -> None:
        super().__init__(frame.kind, frame.channel, None, frame.target, 0, 0, inner.raw,
                         len(inner.raw))
        self.group = group
        self.inner = inner


Call = Callable[[list[Callable[..., Any]], IpcBusEvent, list[Any]], Any]


def deliver_shm(frame: ShmFrame, receivers: Sequence[Any], sender: IpcBusPeer | None,
                group: str | None, call: Call) -> None:
    """Run the listeners of ``frame`` among ``receivers`` (``call``: runs listeners,
    containing what they raise); then the lease's delivery is over."""
    channel = frame.channel
    try:
        for client in receivers:
            listeners = client._take(channel) if group is None else \
                client._group_take(channel, group)
            for listener in listeners:
                if listener.__class__ is ZeroCopyListener:
                    call([listener], IpcBusEvent(channel, sender, None, None, frame.lease),
                         frame.args)
                else:
                    call([listener], IpcBusEvent(channel, sender, None, None), frame.copied())
    finally:
        frame.done()


def call_shm_request(frame: ShmFrame, listeners: list[Callable[..., Any]],
                     sender: IpcBusPeer | None, request: Any, call: Call
                     ) -> BaseException | None:
    """Run one receiving client's ``listeners`` of a request whose arguments are in shared
    memory (as :func:`deliver_shm`: views for ``zero_copy`` listeners, bytes for the
    others); the first exception one raised, or None. The caller ends the delivery
    (``frame.done()``) once every client's listeners ran."""
    raised = None
    channel = frame.channel
    for listener in listeners:
        if listener.__class__ is ZeroCopyListener:
            event = IpcBusEvent(channel, sender, request, None, frame.lease)
            exc = call([listener], event, frame.args)
        else:
            exc = call([listener], IpcBusEvent(channel, sender, request, None), frame.copied())
        if raised is None:
            raised = exc
    return raised
