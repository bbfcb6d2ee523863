"""The requests an electron-common-ipc connection has in flight, and how an answer settles one.

:class:`Requests` keeps them in the library's one request table
(:class:`ipcbus._pending.RequestTable`, keyed by the request id that electron-common-ipc
answers on), under the connection's lock, with their deadlines on one :class:`~ipcbus._timer.Timer`.
The table's rule holds here: whoever takes a request out settles it, exactly once — the
answer (:meth:`Requests.take`), its deadline (the timer), its client's ``close()``
(:meth:`Requests.take_of`) or the end of the connection (:meth:`Requests.close`).

electron-common-ipc has no "no listener" failure and no notice of a peer that leaves: a
request ends with its answer or its timeout, never with its receivers (the table's receivers
are not used).
"""
from __future__ import annotations

import concurrent.futures
import threading
import time
from typing import Any, Callable

from .. import _protocol as P
from .._pending import RequestTable, TableClosed, settle
from .._timer import Timer
from .._types import IpcBusEvent, IpcBusPeer, IpcBusRequestResponse
from ..errors import (IpcBusConnectionError, IpcBusProtocolError, IpcBusRequestError,
                      IpcBusRequestTimeoutError)
from . import _codec as C
from . import _envelope as E
from . import _services as S

__all__ = ["Pending", "Requests", "settle_answer"]


class Pending:
    """One request in flight: its future, who asked, and how its answer is read."""

    __slots__ = ("future", "client", "channel", "wait", "timer_entry", "status", "probe")

    def __init__(self, client: Any, channel: str) -> None:
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self.client = client  # the EcipcClient that asked
        self.channel = channel
        self.wait: float | None = None  # its timeout (seconds), None: none
        self.timer_entry: list[Any] | None = None
        self.status = False  # a service status call: the answer gets ipcbus's keys
        self.probe = False  # a proxy's first status call: a started answer is a start notice

    def timeout_error(self) -> IpcBusRequestTimeoutError:
        response = IpcBusRequestResponse(IpcBusEvent(self.channel, None),
                                         err=f"timed out after {self.wait:g} s")
        return IpcBusRequestTimeoutError(
            f"request on {self.channel!r} timed out after {self.wait:g} s (on an"
            " electron-common-ipc bus a request with no listener ends this way)", response)


class Requests:
    """The connection's requests in flight (thread-safe: any thread adds, the reader takes
    answers, the timer takes expired ones). ``lock`` guards the table: the connection's own
    lock (a new one if None); it is never held while calling out of this class."""

    def __init__(self, lock: threading.Lock | None = None) -> None:
        self._lock = threading.Lock() if lock is None else lock
        self._table: RequestTable[str, Pending] = RequestTable()
        self._timer = Timer()

    def __len__(self) -> int:
        return len(self._table)

    def add(self, rid: str, pending: Pending, wait: float | None) -> None:
        """Put ``pending`` in flight under ``rid``, failing at ``wait`` seconds from now
        (None: never). :class:`~ipcbus.IpcBusConnectionError` once the connection ended."""
        pending.wait = wait
        deadline = None if wait is None else time.monotonic() + wait
        with self._lock:
            try:
                self._table.add(rid, pending, deadline=deadline)
            except TableClosed as exc:
                raise IpcBusConnectionError(
                    f"the bus connection has closed: {exc.reason}") from None
        if deadline is not None:
            pending.timer_entry = self._timer.call_at(deadline, self._expire)

    def take(self, rid: str) -> Pending | None:
        """Take request ``rid`` out (its answer came, or its sending failed); None if it is
        no longer in flight."""
        with self._lock:
            pending = self._table.take(rid)
        if pending is not None:
            self._forget_deadline(pending)
        return pending

    def take_of(self, client: object) -> list[Pending]:
        """Take out every request ``client`` made (it is closing)."""
        with self._lock:
            mine = [p for rid, p in self._table.items()
                    if p.client is client and self._table.take(rid) is not None]
        for pending in mine:
            self._forget_deadline(pending)
        return mine

    def close(self, reason: str) -> list[Pending]:
        """The connection ended: take out every request (later ``add`` calls raise)."""
        with self._lock:
            taken = self._table.close(reason)
        self._timer.stop()
        return [pending for _, pending in taken]

    def _forget_deadline(self, pending: Pending) -> None:
        if pending.timer_entry is not None:
            self._timer.cancel(pending.timer_entry)

    def _expire(self) -> None:
        """On the timer's thread: fail the requests whose deadline has passed."""
        with self._lock:
            due = self._table.expired(time.monotonic())
        for _, pending in due:
            settle(pending.future, exc=pending.timeout_error())


def settle_answer(pending: Pending, incoming: E.Incoming, sender: IpcBusPeer | None,
                  call_soon: Callable[[Callable[[], None]], None]) -> None:
    """Complete ``pending`` with the answer ``incoming`` (an RQR) from ``sender``: its value,
    or the rejection as :class:`~ipcbus.IpcBusRequestError`. A status call's answer is told
    in ipcbus's keys; a proxy's first status call that finds the service started also runs
    the client's listeners of the service's events with a "start" notice (``call_soon``: where
    listeners run)."""
    event = IpcBusEvent(pending.channel, sender)
    request = incoming.header.get("request")
    resolved = isinstance(request, dict) and request.get("resolve") is True
    try:
        args = E.decode_args(incoming.args)
    except IpcBusProtocolError as exc:
        settle(pending.future, exc=IpcBusRequestError(
            f"request on {pending.channel!r}: undecodable answer: {exc}",
            IpcBusRequestResponse(event, err=str(exc))))
        return
    value = args[0] if args else None
    if not resolved:
        err = value if isinstance(value, str) else C.encode_json(value) \
            if isinstance(value, (dict, list)) else str(value)
        settle(pending.future, exc=IpcBusRequestError(
            f"request on {pending.channel!r} was rejected: {err}",
            IpcBusRequestResponse(event, err=err)))
        return
    if pending.status:
        host = None if sender is None else {"id": sender.id, "name": sender.name,
                                            "pid": sender.process.pid}
        value = S.status_from_wire(value, host)
        if pending.probe and isinstance(value, dict) and value.get("started"):
            name = pending.channel[len(P.SERVICE_CALL_PREFIX):]
            call_soon(lambda: pending.client._notify(
                P.service_event_channel(name), ["start", value], sender))
    settle(pending.future, result=IpcBusRequestResponse(event, payload=value))
