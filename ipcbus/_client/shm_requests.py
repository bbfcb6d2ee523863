"""Requests whose arguments carry large buffers: through the connection's shared-memory arena
(SPEC "Large payloads through shared memory"; the arena and its frames: ``shm.py``).

``request``/``request_to``/``request_async``/``request_all`` encode their arguments with
:func:`request_body`: small flat arguments are packed at once, as ``send()`` packs them
(``P.pack_small``: a small request pays nothing more); only arguments that ``pack_small``
does not take, or whose body reaches the client's ``shm_threshold``, are looked at for a
large ``bytes``/``bytearray``/``memoryview`` (top level, or one level down in a list,
tuple or dict). Such arguments become a :class:`ShmArgs`, which ``Requests`` (``requests.py``)
sends with :func:`send_request`: a SHM_MESSAGE wrapping the REQUEST or REQUEST_ALL frame
(rid and timeout in its header as usual), or inline when the buffers could never fit in the
arena. The rules are ``send()``'s: a full arena is waited for (``shm.FULL_WAIT``), the bus's
size limit holds for the request as a whole, receivers that cannot map the arena get the
request inline from the hub, ``zero_copy`` listeners get views (``shm_delivery.py``).

The slots of a request's arguments are held by its receivers until their listeners return
(or a ``retain()`` ends), whatever becomes of the request: an answer, a cancel or a timeout
does not change when they come back.

*Answers* (``event.request.resolve(payload)``): ``IpcBusClient._pack_answer`` makes
``[resolved, payload]`` with :func:`request_body` and :func:`send_answer` sends a
:class:`ShmArgs` as a SHM_MESSAGE wrapping the RESPONSE. The requester's reader decodes it at
once (``ConnectionShm.answer``): the payload arrives as ``bytes``, the slots are released
then. An answer the hub drops (a second one, a late one, a forged one) has its slots freed
by the hub at once. Unlike an inline answer, a large one that cannot be encoded raises in
``resolve`` after the request was marked answered (the encoding happens as it is sent).
"""
from __future__ import annotations

from typing import Any

from .. import _protocol as P
from .._protocol import Kind
from .shm import wants

__all__ = ["ShmArgs", "request_body", "send_request", "send_answer"]

_RESPONSE = int(Kind.RESPONSE)


class ShmArgs:
    """A request's arguments with large buffers, to send through the arena."""

    __slots__ = ("args", "threshold", "limit")

    def __init__(self, args: tuple[Any, ...], threshold: int, limit: int) -> None:
        self.args = args
        self.threshold = threshold
        self.limit = limit


def request_body(client: Any, args: tuple[Any, ...]) -> Any:
    """The body of a request of ``client`` with ``args``: encoded bytes (or buffers), or a
    :class:`ShmArgs` when a large buffer goes through the arena."""
    body = P.pack_small(args)
    threshold = client._shm_threshold
    if body is not None and not len(body) >= threshold > 0:
        return body  # the common case: small and flat
    if threshold and wants(args, threshold):
        return ShmArgs(args, threshold, client._shm_limit)
    return body if body is not None else P.pack_args(args)


def send_request(conn: Any, member: Any, kind: int, channel: str, target: str | None,
                 rid: int, body: ShmArgs, timeout: float | None) -> None:
    """Write a request whose arguments are ``body`` through ``conn``'s arena (inline if they
    could never fit). Raises as ``Connection.send`` does, and IpcBusTimeoutError when the
    arena stays full."""
    if not conn.shm.send(member, kind, channel, target, body.args, body.threshold,
                         body.limit, rid, timeout):
        conn.send(member, kind, channel, target, rid, P.pack_args(body.args), None, timeout)


def send_answer(conn: Any, member: Any, channel: str, requester: str, rid: int,
                body: Any) -> None:
    """Write an answer (RESPONSE) whose body :func:`request_body` made of ``[resolved,
    value]``: through the arena if it is a :class:`ShmArgs`."""
    if body.__class__ is ShmArgs:
        send_request(conn, member, _RESPONSE, channel, requester, rid, body, None)
    else:
        conn.send(member, _RESPONSE, channel, requester, rid, body)
