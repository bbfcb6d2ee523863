"""A connection's requests: starting them, waiting for their answers, giving them up.

The requests in flight are a :class:`~ipcbus._pending.RequestTable` (``table``:
``(requester id, rid) -> Pending``), the same table the router and the service proxy keep,
guarded by the connection's ``lock``. Whoever takes an entry out settles its answer: the
reader (an answer came), the caller or the timer (its deadline passed:
:meth:`Requests.expire`), a caller giving up (:meth:`Requests.abandon`), the end of the
connection (:meth:`Requests.close`) or the close of the client that asked.

How a caller waits (see ``connection.py``): a blocking request on any thread but the
dispatch thread sleeps on a :class:`~.answers.SyncAnswer` until its deadline, then expires
the request itself; a request made in a listener (on the dispatch thread) dispatches while it
waits; a Future's deadline is the timer's.
"""
from __future__ import annotations

import concurrent.futures
import threading
import time
from typing import Any, Protocol

from .. import _protocol as P
from .._pending import RequestTable, TableClosed, settle
from .._protocol import Kind
from .._timer import Timer
from .._types import IpcBusEvent, IpcBusRequestResponse
from ..errors import IpcBusConnectionError, IpcBusRequestTimeoutError
from .answers import AnswerFuture, Pending, SyncAnswer
from .delivery import LocalClient
from .fastpath import Seat
from .shm_requests import ShmArgs, send_request
from .writer import Membership

__all__ = ["Requests", "Key"]

Key = tuple[str, int]
_REQUEST, _REQUEST_ALL, _RESPONSE = int(Kind.REQUEST), int(Kind.REQUEST_ALL), int(Kind.RESPONSE)


class Link(Protocol):
    """What requests need of their connection."""

    def send(self, member: Membership, kind: int, channel: str, target: str | None, rid: int,
             body: P.Body, fds: list[int] | None = None,
             timeout: float | None = None) -> None: ...

    seat: Seat  # where a blocking caller may read its own answer (fastpath.py)

    def on_dispatch_thread(self) -> bool: ...

    def nested_wait(self, future: concurrent.futures.Future[Any]) -> None: ...


class Requests:
    """The requests in flight on one connection."""

    def __init__(self, link: Link, lock: threading.Lock, rids: Any) -> None:
        self.link = link
        self.lock = lock
        self.rids = rids
        self.table: RequestTable[Key, Pending] = RequestTable()
        self.timer = Timer()  # the deadlines of Futures (a blocking caller keeps its own)

    def add(self, key: Key, pending: Pending) -> None:
        with self.lock:
            try:
                self.table.add(key, pending)
            except TableClosed as exc:
                raise IpcBusConnectionError(
                    f"the bus connection has closed: {exc.reason}") from None

    def take(self, key: Key) -> Pending | None:
        """The entry of ``key``, out of the table (its taker settles it), its timeout
        cancelled; None if someone else took it."""
        with self.lock:
            pending = self.table.take(key)
        if pending is not None and pending.timeout is not None:
            self.timer.cancel(pending.timeout)
        return pending

    def take_answer(self, key: Key, kind: int) -> Pending | None:
        """Like :meth:`take`, for an answer frame of ``kind``; a RESPONSE to a request_all
        leaves its entry in flight (more answers may come: see ``gathering.py``)."""
        with self.lock:
            pending = self.table.take(key)
            if pending is not None and pending.gathered is not None and kind == _RESPONSE:
                self.table.add(key, pending)  # under the lock: close() cannot come between
                return pending
        if pending is not None and pending.timeout is not None:
            self.timer.cancel(pending.timeout)
        return pending

    def take_all_of(self, owner: LocalClient) -> list[Pending]:
        """The entries of ``owner``, out of the table (the caller holds the lock)."""
        taken = []
        for key, pending in self.table.items():
            if pending.owner is owner:
                self.table.take(key)
                taken.append(pending)
        return taken

    def close(self, reason: str) -> list[Pending]:
        """The connection has ended: every entry, out of the table (the caller holds the
        lock); later requests raise."""
        self.timer.stop()
        return [p for _, p in self.table.close(reason)]

    def request(self, client: LocalClient, kind: int, channel: str, target: str | None,
                timeout: float | None, body: Any) -> Any:
        """A blocking request from ``client``: its answer's result, or its error raised. The
        caller sleeps until its deadline (no Future, no timer: each would cost time on
        every request); a listener's request dispatches while it waits (:meth:`wait`)."""
        if self.link.on_dispatch_thread():
            return self.wait(self.start(client, kind, channel, target, timeout, body))
        answer = SyncAnswer()
        peer_id = client._peer_id
        assert peer_id is not None
        key = (peer_id, next(self.rids))
        deadline = time.monotonic() + timeout if timeout is not None else None
        link, seat = self.link, self.link.seat
        try:
            try:
                seat.begins(answer)  # it may read its answer: see fastpath.py
                self.add(key, Pending(client, channel, answer))
                self._send(client._member, kind, channel, target, key[1], body, None,
                           timeout if kind == _REQUEST else None)
            except BaseException as exc:
                self.abandon(client, key, channel, cancel=not isinstance(exc, Exception))
                raise
            try:
                seat.read_own(answer, deadline)
                if not answer.done() and not answer.wait(
                        None if deadline is None else max(0.0, deadline - time.monotonic())):
                    assert timeout is not None
                    self.expire(key, timeout)
                    answer.wait(None)  # set by expire(), or by whoever took the entry
            except BaseException:  # an interrupt (Ctrl-C): this request is given up
                self.abandon(client, key, channel, cancel=True)
                raise
        finally:
            seat.ends(answer)
        return answer.result()

    def start(self, client: LocalClient, kind: int, channel: str, target: str | None,
              timeout: float | None, body: Any, fds: list[int] | None = None,
              future: AnswerFuture | None = None) -> concurrent.futures.Future[Any]:
        """Send a request; its Future gets the answer (failed by the timer at the
        deadline; a REQUEST_ALL's gets the list of answers: ``gathering.py``). An interrupt
        once the frame may have gone out cancels it, except a PEER_ADD's (the caller
        decides: see ``joining.py``)."""
        assert client._peer_id is not None
        rid = next(self.rids)
        key = (client._peer_id, rid)
        if future is None:
            future = AnswerFuture()
        pending = Pending(client, channel, future)
        if kind == _REQUEST_ALL:
            pending.gathered = []
        if (kind == _REQUEST or kind == _REQUEST_ALL) and isinstance(future, AnswerFuture):
            future._give_up = (self, client, key, channel)  # cancel() tells the receivers
        if timeout is not None:  # armed first: the answer may come before send() returns
            pending.timeout = self.timer.call_at(time.monotonic() + timeout,
                                                 lambda: self.expire(key, timeout))
        try:
            self.add(key, pending)
            self._send(client._member, kind, channel, target, rid, body, fds,
                       timeout if kind == _REQUEST or kind == _REQUEST_ALL else None)
        except BaseException as exc:
            if isinstance(exc, Exception):  # not written
                self.abandon(client, key, channel, cancel=False)
            elif kind != Kind.PEER_ADD:  # an interrupt, once the frame went out: cancel it
                self.abandon(client, key, channel, cancel=True)
            raise
        return future

    def _send(self, member: Membership, kind: int, channel: str, target: str | None,
              rid: int, body: Any, fds: list[int] | None, timeout: float | None) -> None:
        if body.__class__ is ShmArgs:  # large arguments through shared memory
            send_request(self.link, member, kind, channel, target, rid, body, timeout)
        else:
            self.link.send(member, kind, channel, target, rid, body, fds, timeout)

    def wait(self, future: concurrent.futures.Future[Any]) -> Any:
        """Wait for ``future`` (dispatching meanwhile on the dispatch thread); its result."""
        if not future.done() and self.link.on_dispatch_thread():
            self.link.nested_wait(future)
        return future.result()

    def expire(self, key: Key, timeout: float) -> None:
        """The deadline of request ``key`` has passed: fail it, tell its receivers."""
        pending = self.take(key)
        if pending is None or pending.future.done():
            return
        if pending.gathered is not None:  # request_all: what came, no error
            settle(pending.future, result=list(pending.gathered))
            self._cancel(pending.owner, key[1], pending.channel)
            return
        response = IpcBusRequestResponse(IpcBusEvent(pending.channel, None),
                                         err=f"timed out after {timeout:g} s")
        settle(pending.future, exc=IpcBusRequestTimeoutError(
            f"request on {pending.channel!r} timed out after {timeout:g} s", response))
        self._cancel(pending.owner, key[1], pending.channel)

    def abandon(self, client: LocalClient, key: Key, channel: str, cancel: bool) -> None:
        """Forget a request whose caller gave up (an interrupt, or its frame could not be
        written); ``cancel``: its frame may have gone out, tell the receivers (best effort).
        An answer that comes later is dropped."""
        if self.take(key) is not None and cancel:
            self._cancel(client, key[1], channel)

    def _cancel(self, client: LocalClient, rid: int, channel: str) -> None:
        try:
            self.link.send(client._member, Kind.CANCEL, channel, None, rid, b"")
        except Exception:  # best effort: the receivers drop a late answer anyway
            pass
