"""``request_all``: every receiver's answer, gathered.

A REQUEST_ALL goes to every listener of its channel, like a request; the hub forwards each
receiver's answer (RESPONSE, resolved or rejected) and ends the gathering with one
REQUEST_FAIL when no receiver is left (each answered, failed or left; at once when nobody
listens). Through a bridge's link, the broker gathers its own receivers and ends its side the
same way, so the bridge ends the whole only once both sides are done (``_router_requests``).

The caller's entry stays in the request table while answers come (``Requests.take_answer``);
the end, the timeout (no error: the answers that came; the receivers are told the request
was cancelled), or the end of the connection takes it out, and its Future gets the list.
"""
from __future__ import annotations

import concurrent.futures
from typing import Any

from .. import _protocol as P
from .._pending import settle
from .._protocol import Kind
from .._types import IpcBusEvent, IpcBusPeer, IpcBusRequestResponse
from ..errors import IpcBusProtocolError
from .answers import Pending
from .delivery import LocalClient
from .shm_requests import request_body

__all__ = ["gathered", "request_all"]

_RESPONSE = int(Kind.RESPONSE)


def gathered(pending: Pending, frame: P.Frame, sender: IpcBusPeer | None) -> None:
    """An answer frame of a request_all: one more answer (RESPONSE), or the end."""
    assert pending.gathered is not None
    if frame.kind != _RESPONSE:  # the end: no receiver is left
        settle(pending.future, result=list(pending.gathered))
        return
    event = IpcBusEvent(pending.channel, sender)
    try:
        # (decoded already: an answer from shared memory, ``ConnectionShm.answer``)
        body = frame.args if isinstance(frame, P.DecodedFrame) else P.unpack_payload(frame.body)
        if not (isinstance(body, list) and len(body) == 2):
            raise IpcBusProtocolError("malformed answer")
    except IpcBusProtocolError as exc:
        pending.gathered.append(IpcBusRequestResponse(event, err=f"undecodable answer: {exc}"))
        return
    if body[0]:
        pending.gathered.append(IpcBusRequestResponse(event, payload=body[1]))
    else:
        pending.gathered.append(IpcBusRequestResponse(event, err=body[1]))


def request_all(client: LocalClient, conn: Any, channel: str, timeout: float | None,
                args: tuple[Any, ...]) -> list[IpcBusRequestResponse]:
    """Send a REQUEST_ALL of ``args`` as ``client`` on ``conn`` (large buffers through
    shared memory: ``shm_requests.py``); wait for every answer, or the timeout. An
    interrupt gives the request up (its receivers are told)."""
    body = request_body(client, args)
    requests = conn.requests
    future: concurrent.futures.Future[Any] = requests.start(
        client, int(Kind.REQUEST_ALL), channel, None, timeout, body)
    try:
        return requests.wait(future)  # type: ignore[no-any-return]
    except BaseException:
        future.cancel()  # an interrupt: the receivers are told (AnswerFuture.cancel)
        raise
