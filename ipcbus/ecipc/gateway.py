"""Node peers on a Python broker: ``IpcBusBroker.create(ecipc=True)`` (issue 19, part 2).

The broker's accept path looks at the first byte a new Unix-socket connection sends: ``[``
opens every electron-common-ipc packet, while an ipcbus client starts with its HELLO frame
(whose first byte, the low byte of a small header length, is never ``[``). An ipcbus
connection goes on to the hub as usual; an electron-common-ipc one is served here, by the
*gateway*, in the broker process:

* each Node peer (``HAN``) becomes an ordinary :class:`~ipcbus.IpcBusClient` of the hub, named
  like the Node peer; the gateway's clients share one connection to the hub (the broker's own
  socket), as the clients of any process do;
* ``LICA``/``LICR``/``LIR`` become that client's listeners (reference-counted per channel);
  ``SHT`` or the end of the Node connection closes its clients;
* a Node ``MES`` becomes ``send`` / ``send_to`` / ``request_async`` of the sender's client, its
  answer an ``RQR`` back; a message the hub delivers to a Node peer's client becomes a ``MES``
  to that Node connection (targeted at that peer, so the Node process hands it to that client
  only), and a request an ``MES`` with ``request``, answered by the Node ``RQR``;
* payloads are converted only here, where they cross protocols; Node↔Node traffic through the
  hub is converted twice (the hub itself speaks msgpack); service channels and their
  arguments are translated both ways (:mod:`._services`), so services and proxies of either
  side meet.

What the Python side sees of a Node peer: an :class:`~ipcbus.IpcBusPeer` with the Node peer's
name, on the broker's connection (its id is the gateway client's; Node peers see each other
with their own ids). Limits: Unix sockets only (a TCP broker authenticates first, and Node
clients cannot); values a msgpack bus cannot carry (``Date``) are refused on the way in
(the message is dropped with a logged warning; a request is rejected).

Threads: one thread per Node connection reads it and acts for its peers; the clients'
listeners (the way back to Node) run on their connection's I/O threads; writes to a Node
socket are whole packets under its send lock.
"""
from __future__ import annotations

import concurrent.futures
import functools
import logging
import socket
import threading
import uuid
import weakref
from typing import Any, Callable

from .. import _protocol as P
from .. import _local
from .._types import IpcBusEvent, IpcBusPeer, IpcBusRequest
from ..client import IpcBusClient
from ..errors import IpcBusError, IpcBusProtocolError, IpcBusRequestError
from . import _codec as C
from . import _envelope as E
from . import _services as S

log = logging.getLogger("ipcbus")

__all__ = ["Gateway", "FIRST_BYTE", "gateway_of"]

FIRST_BYTE = b"["
_REQUEST_CAP = 300.0  # seconds: a Node request carries no timeout; its requester has one


class _NodePeer:
    """One Node peer: its wire identity and the hub client that acts for it."""

    __slots__ = ("raw", "conn", "client", "refs", "forwarders")

    def __init__(self, raw: dict[str, Any], conn: _NodeConnection, client: IpcBusClient) -> None:
        self.raw = raw
        self.conn = conn
        self.client = client
        self.refs: dict[str, int] = {}
        self.forwarders: dict[str, Callable[..., None]] = {}


class _NodeConnection:
    """One electron-common-ipc connection accepted by the broker."""

    def __init__(self, gateway: Gateway, sock: socket.socket, label: str) -> None:
        self.gateway = gateway
        self.sock = sock
        self.label = label
        self.send_lock = threading.Lock()
        self.peers: dict[str, _NodePeer] = {}
        self.pending: dict[str, tuple[IpcBusRequest, bool, str | None, str]] = {}
        self.lock = threading.Lock()
        self.closed = False

    def write(self, packet: bytes) -> None:
        try:
            with self.send_lock:
                self.sock.sendall(packet)
        except OSError as exc:
            log.debug("ecipc gateway: %s: write failed: %s", self.label, exc)

    def serve(self) -> None:
        """Read and act until the Node side ends (on this connection's thread)."""
        splitter = C.PacketSplitter()
        try:
            self.sock.settimeout(None)
            while True:
                data = self.sock.recv(256 * 1024)
                if not data:
                    break
                for packet in splitter.feed(data):
                    try:
                        self._on_packet(E.parse(packet))
                    except IpcBusProtocolError as exc:
                        log.warning("ecipc gateway: %s: dropped a malformed packet: %s",
                                    self.label, exc)
        except IpcBusProtocolError as exc:
            log.warning("ecipc gateway: %s: closed: %s", self.label, exc)
        except OSError as exc:
            log.debug("ecipc gateway: %s: %s", self.label, exc)
        except Exception:  # never let one connection take the broker down
            log.exception("ecipc gateway: %s: failed", self.label)
        finally:
            self.close()

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
            peers = list(self.peers.values())
            self.peers.clear()
            pending = list(self.pending.values())
            self.pending.clear()
        for request, *_ in pending:
            try:
                request.reject("the Node peer left the bus")
            except IpcBusError:
                pass
        for peer in peers:
            self.gateway.forget(peer)
        try:
            self.sock.close()
        except OSError:  # pragma: no cover
            pass

    # -- from Node --------------------------------------------------------------------------
    def _peers_of(self, header: dict[str, Any]) -> list[dict[str, Any]]:
        peers = header.get("peers")
        if isinstance(peers, list):
            return [p for p in peers if isinstance(p, dict) and isinstance(p.get("id"), str)]
        peer = header.get("peer")
        return [peer] if isinstance(peer, dict) and isinstance(peer.get("id"), str) else []

    def _on_packet(self, incoming: E.Incoming) -> None:
        header, kind = incoming.header, incoming.kind
        if kind == "HAN":
            for raw in self._peers_of(header):
                if self.gateway.node_peer(raw) is not None:  # ids are unique on the bus
                    log.warning("ecipc gateway: %s: peer id %r is taken", self.label, raw["id"])
                elif raw["id"] not in self.peers:
                    self._add_peer(raw)
            return
        # a connection acts only for the peers it registered itself
        mine = [self.peers[r["id"]] for r in self._peers_of(header) if r["id"] in self.peers]
        channel = header.get("channel")
        if kind in ("LICA", "LICR", "LICRA") and isinstance(channel, str) and channel:
            for peer in mine:
                self._subscription(peer, kind, channel)
        elif kind == "LIR":
            for peer in mine:
                for local in list(peer.forwarders):
                    peer.client.off(local, peer.forwarders.pop(local))
                peer.refs.clear()
        elif kind == "SHT":
            for peer in mine:
                with self.lock:
                    self.peers.pop(peer.raw["id"], None)
                self.gateway.forget(peer)
        elif kind == "MES" and mine and isinstance(channel, str) and channel:
            self._on_message(mine[0], header, incoming)
        elif kind == "RQR":
            self._on_answer(header, incoming)
        else:
            log.debug("ecipc gateway: %s: ignored a %r command", self.label, kind)

    def _add_peer(self, raw: dict[str, Any]) -> None:
        name = raw.get("name")
        client = IpcBusClient.create().connect(  # no address: this process's gateway
            peer_name=name if isinstance(name, str) and name else f"node-{raw['id']}")
        peer = _NodePeer(dict(raw), self, client)
        with self.lock:
            self.peers[raw["id"]] = peer
        self.gateway.remember(peer)

    def _subscription(self, peer: _NodePeer, kind: str, channel: str) -> None:
        local, role = S.local_channel(channel)
        try:
            P.check_channel(local)
        except (TypeError, ValueError):
            return
        count = peer.refs.get(local, 0)
        count = count + 1 if kind == "LICA" else 0 if kind == "LICRA" else count - 1
        if count > 0:
            peer.refs[local] = count
            if local not in peer.forwarders:
                forwarder: Callable[..., None] = functools.partial(self._to_node, peer, local,
                                                                    role)
                peer.forwarders[local] = forwarder
                peer.client.on(local, forwarder)
        else:
            peer.refs.pop(local, None)
            old = peer.forwarders.pop(local, None)
            if old is not None:
                peer.client.off(local, old)

    def _on_message(self, peer: _NodePeer, header: dict[str, Any],
                    incoming: E.Incoming) -> None:
        channel, role = S.local_channel(header["channel"])
        request = header.get("request")
        try:
            args = E.decode_args(incoming.args)
            if role == "call":
                args = S.call_from_wire(args)
            elif role == "event":
                args = S.notice_from_wire(args, _host(peer.client.peer))
                if not args:
                    return
                if args[0] == "start":
                    self._claim_service(peer, channel[len(P.SERVICE_EVENT_PREFIX):])
            target = header.get("target")
            target_id = target.get("id") if isinstance(target, dict) else None
            if isinstance(target_id, str):
                target_id = self.gateway.client_id(target_id)
            client = peer.client
            # a service's channels are reserved on ipcbus: the library's private calls (the hub
            # still decides: only the service's host may send its notices)
            service = role in ("call", "event")
            if isinstance(request, dict) and isinstance(request.get("id"), str):
                if target_id is not None:
                    future = client._start_request(P.Kind.REQUEST, P.check_channel(channel),
                                                   target_id, _REQUEST_CAP, P.pack_args(args))
                elif service:
                    future = client._request_async_reserved(channel, _REQUEST_CAP, *args)
                else:
                    future = client.request_async(channel, _REQUEST_CAP, *args)
                status = role == "call" and bool(args) and args[0] == S.STATUS_CALL
                future.add_done_callback(functools.partial(
                    self._answer_node, peer, header["peer"], request, status))
            elif target_id is not None:
                (client._send_to_reserved if service else client.send_to)(target_id, channel,
                                                                          *args)
            elif service:
                client._send_reserved(channel, *args)
            else:
                client.send(channel, *args)
        except (TypeError, ValueError, IpcBusProtocolError) as exc:
            log.warning("ecipc gateway: %s: a message on %r from %s cannot cross: %s",
                        self.label, channel, peer.raw.get("name"), exc)
            if isinstance(request, dict) and isinstance(request.get("id"), str):
                self._answer_node_value(peer, header["peer"], request, False,
                                        f"cannot cross to ipcbus: {exc}")
        except IpcBusError as exc:
            log.warning("ecipc gateway: %s: %s", self.label, exc)

    def _claim_service(self, peer: _NodePeer, name: str) -> None:
        """A Node service started: claim its name on the hub, as an IpcBusService would."""
        try:
            peer.client._register_service(name, None)
        except IpcBusError as exc:
            log.warning("ecipc gateway: service %r of %s: %s", name, peer.raw.get("name"), exc)

    def _answer_node(self, peer: _NodePeer, requester: Any, request: dict[str, Any],
                     status: bool, future: concurrent.futures.Future[Any]) -> None:
        exc = future.exception()
        if exc is None:
            value = future.result().payload
            self._answer_node_value(peer, requester, request, True,
                                    S.status_to_wire(value) if status else value)
        elif isinstance(exc, IpcBusRequestError) and exc.response is not None:
            self._answer_node_value(peer, requester, request, False, str(exc.response.err))
        else:
            self._answer_node_value(peer, requester, request, False, str(exc))

    def _answer_node_value(self, peer: _NodePeer, requester: Any, request: dict[str, Any],
                           resolved: bool, value: Any) -> None:
        try:
            args = C.encode_array([value])
        except (TypeError, ValueError) as exc:
            resolved, args = False, C.encode_array([f"the answer cannot cross to Node: {exc}"])
        answer = {"channel": request.get("channel"), "id": request["id"], "resolve": resolved}
        self.write(E.message("RQR", request["id"], peer.raw, args, target=requester,
                             request=answer))

    def _on_answer(self, header: dict[str, Any], incoming: E.Incoming) -> None:
        rid = header.get("channel")
        with self.lock:
            entry = self.pending.pop(rid, None) if isinstance(rid, str) else None
        if entry is None:
            return
        ipc_request, status, probe, requester = entry
        request = header.get("request")
        resolved = isinstance(request, dict) and request.get("resolve") is True
        try:
            args = E.decode_args(incoming.args)
        except IpcBusProtocolError as exc:
            ipc_request.reject(f"undecodable answer from Node: {exc}")
            return
        value = args[0] if args else None
        try:
            if not resolved:
                ipc_request.reject(value if isinstance(value, str) else str(value))
                return
            if status:
                answering = self.gateway.node_peer(header.get("peer"))
                value = S.status_from_wire(
                    value, _host(answering.client.peer) if answering is not None else None)
                if probe is not None and isinstance(value, dict) and value.get("started") \
                        and answering is not None:
                    answering.client._send_to_reserved(requester, probe, "start", value)
            ipc_request.resolve(value)
        except (TypeError, ValueError) as exc:
            ipc_request.reject(f"the answer from Node cannot cross to ipcbus: {exc}")
        except IpcBusError as exc:
            log.debug("ecipc gateway: answer not delivered: %s", exc)

    # -- to Node (on the hub client's I/O thread) ---------------------------------------------
    def _to_node(self, peer: _NodePeer, channel: str, role: str | None, event: IpcBusEvent,
                 *args: Any) -> None:
        sender = event.sender
        origin = self.gateway.by_client.get(sender.id) if sender is not None else None
        if origin is not None and origin.conn is self:
            return  # the Node process delivered it to its own listeners already
        wire, _ = S.wire_channel(channel)
        request = event.request
        try:
            if role == "call":
                wire_args = S.call_to_wire(tuple(args))
            elif role == "event":
                wire_args = S.notice_to_wire(tuple(args))
            else:
                wire_args = list(args)
            body = C.encode_array(wire_args)
        except (TypeError, ValueError) as exc:
            log.warning("ecipc gateway: a message on %r cannot cross to Node: %s", channel, exc)
            if request is not None:
                request.reject(f"cannot cross to Node: {exc}")
            return
        sender_raw = origin.raw if origin is not None else _peer_json(sender)
        request_raw = None
        if request is not None:
            rid = uuid.uuid4().hex
            status = role == "call" and bool(args) and args[0] == S.STATUS_CALL
            probe = P.service_event_channel(channel[len(P.SERVICE_CALL_PREFIX):]) \
                if status and S.is_status_probe(tuple(args)) else None
            with self.lock:
                if self.closed:
                    return
                self.pending[rid] = (request, status, probe, sender.id if sender else "")
            request_raw = {"channel": wire, "id": rid}
        self.write(E.message("MES", wire, sender_raw, body, target=peer.raw,
                             request=request_raw))


def _peer_json(peer: IpcBusPeer | None) -> dict[str, Any]:
    if peer is None:
        return {"id": "ipcbus", "type": E.NODE_TYPE, "name": "ipcbus"}
    return E.peer_json(peer)


def _host(peer: IpcBusPeer) -> dict[str, Any]:
    return {"id": peer.id, "name": peer.name, "pid": peer.process.pid}


class Gateway:
    """The electron-common-ipc side of a broker: its Node connections and their peers.

    Its hub clients join through socketpairs the hub serves as connections of type "node"
    (the hub records that type, and pid 0: Node does not tell), registered as this process's
    local hub (``ipcbus._local``), so ``IpcBusClient.connect()`` with no address joins here."""

    def __init__(self, hub: Any) -> None:
        self.hub = hub
        self.address = hub.address
        self.handshake_timeout = hub.options.handshake_timeout
        self.lock = threading.Lock()
        self.by_node: dict[str, _NodePeer] = {}
        self.by_client: dict[str, _NodePeer] = {}

    def classify(self, sock: socket.socket, label: str,
                 ipcbus: Callable[[socket.socket, str], None]) -> None:
        """On a thread: peek at the first byte; an ipcbus peer goes to ``ipcbus(sock,
        label)``, an electron-common-ipc one is served here."""
        try:
            threading.Thread(target=self._classify, args=(sock, label, ipcbus), daemon=True,
                             name=f"ipcbus-ecipc-gateway {label}").start()
        except RuntimeError as exc:  # cannot start a thread: refuse this one, serve the others
            log.warning("refused a connection (%s): %s", label, exc)
            sock.close()

    def _classify(self, sock: socket.socket, label: str,
                  ipcbus: Callable[[socket.socket, str], None]) -> None:
        try:
            sock.settimeout(self.handshake_timeout)
            first = sock.recv(1, socket.MSG_PEEK)
        except OSError as exc:
            log.warning("refused a connection (%s): nothing received: %s", label, exc)
            sock.close()
            return
        if first != FIRST_BYTE:
            ipcbus(sock, label)
            return
        _NodeConnection(self, sock, f"node {label}").serve()

    @property
    def closed(self) -> bool:
        return bool(self.hub._closed)

    def attach_local(self) -> socket.socket:
        """A socket for a hub client of a Node peer (see the class docstring)."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        hub = self.hub
        hub.owned.add(mine)
        hub.call_soon(lambda: hub.add_endpoint(mine, "node", ptype="node", pid=0, cred_pid=0))
        return theirs

    def remember(self, peer: _NodePeer) -> None:
        with self.lock:
            self.by_node[peer.raw["id"]] = peer
            self.by_client[peer.client.peer.id] = peer

    def forget(self, peer: _NodePeer) -> None:
        with self.lock:
            if self.by_node.get(peer.raw["id"]) is peer:
                del self.by_node[peer.raw["id"]]
            self.by_client.pop(peer.client.peer.id, None)
        try:
            peer.client.close()
        except IpcBusError:
            pass

    def client_id(self, node_or_ipcbus_id: str) -> str:
        """The hub id of a target: a Node peer's gateway client, or an ipcbus peer as is."""
        peer = self.by_node.get(node_or_ipcbus_id)
        return peer.client.peer.id if peer is not None else node_or_ipcbus_id

    def node_peer(self, raw: Any) -> _NodePeer | None:
        if isinstance(raw, dict) and isinstance(raw.get("id"), str):
            return self.by_node.get(raw["id"])
        return None


_gateways: weakref.WeakKeyDictionary[Any, Gateway] = weakref.WeakKeyDictionary()
_gateways_lock = threading.Lock()


def gateway_of(hub: Any) -> Gateway:
    """The gateway of a broker's hub (made on its first electron-common-ipc connection)."""
    with _gateways_lock:
        gateway = _gateways.get(hub)
        if gateway is None:
            gateway = Gateway(hub)
            _gateways[hub] = gateway
            with _local.lock:
                if _local.bridge_of_this_process() is None:
                    _local.register(gateway)
        return gateway
