"""Joining the bus and leaving it: a client's membership of its connection.

``join`` writes PEER_ADD and, once the hub has answered it (never before: through a linked
bridge the peer exists only then), SUBSCRIBE for the listeners added before ``connect()``;
the answer may carry the hub's record of the peer, which every later frame then carries
(``adopt``). ``leave_connection`` runs the steps of ``close()``: each may run again after an
interrupt. Sends racing with a close from other threads are written before the PEER_REMOVE
(and routed), or raise ``IpcBusConnectionError``: never after it (``writer.Membership``).
"""
from __future__ import annotations

import concurrent.futures
import os
import threading
from typing import Any, Protocol

from .. import _protocol as P
from .._protocol import Kind
from .._types import IpcBusPeer
from ..errors import IpcBusConnectionError, IpcBusError, IpcBusRequestError
from .._pending import settle
from .answers import AnswerFuture
from .connection import Connection
from .groups import GroupListeners, group_frame
from .opening import forget
from .writer import Membership

__all__ = ["join", "adopt", "leave_connection"]


class Joiner(Protocol):
    """What joining needs of a client (``IpcBusClient``)."""

    _member: Membership
    _conn: Connection | None
    _peer: IpcBusPeer | None
    _peer_id: str | None
    _closed_fired: bool
    _lock: threading.RLock
    _listeners: dict[str, Any]
    _groups: GroupListeners

    def _set_peer(self, info: list[Any]) -> None: ...

    def _drop_from(self, clients: dict[str, Any]) -> None: ...

    def _take(self, key: str) -> list[Any]: ...

    def _group_take(self, channel: str, group: str) -> list[Any]: ...

    def _connection_ended(self, conn: Any) -> None: ...

    def _pack_answer(self, resolved: bool, value: Any) -> Any: ...

    def _send_answer(self, channel: str, requester: str, rid: int, body: Any,
                     member: Any) -> None: ...

    _spy_handler: Any


def leave(conn: Connection, member: Membership) -> None:
    """Write ``member``'s PEER_REMOVE if the connection still can; it has left either way."""
    try:
        conn.leave(member)
    except IpcBusError:
        member.left = True


def _leave_if_joined(conn: Connection, member: Membership,
                     future: concurrent.futures.Future[Any]) -> None:
    """A ``connect()`` was interrupted before the hub answered its PEER_ADD: if the answer
    is yes, leave (the peer would otherwise stay on the bus until the connection ends)."""
    if future.cancelled() or future.exception() is not None:
        member.left = True
    else:
        leave(conn, member)


def join(client: Joiner, conn: Connection, info: list[Any], wait: float | None) -> None:
    """PEER_ADD, and once the hub has answered it (never before: through a linked bridge
    the peer exists only then), SUBSCRIBE for the listeners added before ``connect()``.
    The answer may carry the hub's record of this peer (``{"pid": ..., "peer": [id,
    name, type, pid]}``): every later frame carries exactly that."""
    member = client._member = Membership(info)
    client._set_peer(info)
    client._closed_fired = False
    conn.set_clients(lambda clients: clients.__setitem__(info[0], client))
    future: AnswerFuture | None = AnswerFuture()
    try:
        try:
            conn.requests.start(client, Kind.PEER_ADD, "", None, wait, b"", future=future)
        except Exception:
            future = None  # not written
            raise
        assert future is not None
        response = conn.requests.wait(future)
        adopt(client, conn, member, response.payload)
        with client._lock:  # ordered with _first_listener/_last_listener
            client._conn = conn  # joined: sends and subscriptions go out from now on
            for channel in client._listeners:
                conn.send(member, Kind.SUBSCRIBE, channel, None, 1, b"")
            for key in client._groups._listeners:  # groups: _client/groups.py
                if not key[0].startswith(P.RESERVED_PREFIX):  # a pooled service's: its
                    # host joins again once it has claimed the name (_service_host)
                    conn.send_surely(member, group_frame(Kind.SUBSCRIBE, key, member.info))
    except BaseException as exc:
        client._conn = None
        conn.set_clients(client._drop_from)
        if future is None or (future.done() and future.exception() is not None):
            member.left = True  # never joined (or PEER_ADD not known to be written)
        elif future.done():
            leave(conn, member)  # joined, but what followed failed
        else:  # interrupted while the hub decides: leave if it says yes
            future.add_done_callback(lambda f: _leave_if_joined(conn, member, f))
        client._peer = None
        if isinstance(exc, IpcBusRequestError):
            raise IpcBusConnectionError(f"the bus refused this peer: {exc}") from None
        raise


def adopt(client: Joiner, conn: Connection, member: Membership, payload: Any) -> None:
    """Take the hub's record of this peer, from the answer to PEER_ADD (an older hub
    answers with its pid only: the declared tuple stands)."""
    peer = payload.get("peer") if isinstance(payload, dict) else None
    if not (isinstance(peer, list) and len(peer) == 4 and isinstance(peer[0], str)
            and peer[0] and isinstance(peer[1], str) and isinstance(peer[2], str)
            and isinstance(peer[3], int)) or peer == member.info:
        return

    def move(clients: dict[str, Any]) -> None:
        client._drop_from(clients)
        clients[peer[0]] = client

    conn.set_clients(move)
    member.info = list(peer)
    member.headers.clear()
    client._set_peer(member.info)


def leave_connection(client: Joiner, conn: Connection, wait: float | None) -> bool:
    """The steps of ``close()``, each of which may be run again; False if the
    connection is not this process's."""
    member = client._member
    if conn.pid != os.getpid() or conn.forked:
        member.left = True
        return False
    with conn.lock:
        client._drop_from(conn.clients)
        conn.client_list = tuple(conn.clients.values())
        last = not conn.clients
        pending = conn.requests.take_all_of(client)
    for p in pending:
        if p.timeout is not None:
            conn.requests.timer.cancel(p.timeout)
        settle(p.future, exc=IpcBusConnectionError(
            f"request on {p.channel!r} failed: the client was closed"))
    # Sends racing with this close from other threads are written before the
    # PEER_REMOVE (and routed), or raise IpcBusConnectionError: never after it.
    leave(conn, member)
    if last:
        forget(conn)
        conn.close(wait)
    return True
