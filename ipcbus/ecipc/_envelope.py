"""electron-common-ipc's commands and messages (16.0.1+), and how ipcbus maps onto them — pure.

Every top-level packet is an array (see :mod:`._codec`): a *command* is ``[header]``, a
*message* is ``[header, [args...]]``. The header is a JSON object with a ``kind``:

=========  ==================================================================================
``HAN``    handshake of one peer: ``{"kind", "peer"}``; no reply
``LICA``   the peer listens to ``channel``: ``{"kind", "channel", "peer"}`` (Node sends
           ``peers``; the broker takes either, and counts references per peer and channel)
``LICR``   releases one reference; ``LIR`` drops every subscription of the peer
``SHT``    the peer leaves: ``{"kind", "peer"}``
``MES``    a message: ``{"kind", "channel", "peer", "isRawData": true}``, plus
           ``"target": peer`` for sendTo and ``"request": {"channel", "id"}`` for a request
``RQR``    an answer: ``{"kind", "channel": request id, "peer": responder, "target":
           requester, "request": {"channel", "id", "resolve": bool}}``, args ``[value]``
=========  ==================================================================================

A peer is ``{"id", "type", "name", "process"}``; type 1 is a Node process. ipcbus peers send
type 1 too (the broker routes a type 2 or 6 target to Electron's bridge) and add
``process.ipcbus``, the ipcbus process type, so that other ipcbus peers know them; every other
peer appears as ``IpcBusProcess("node", pid)``. Peers are keyed by id (16.0.1 and later; 16.0.0
and older key by process and are not supported).

The broker decodes only the header and forwards the packet unchanged; it routes ``MES`` to the
target's connection, else once to every *other* connection with a listener of the channel, so
each process delivers to its own listeners itself (the sender's included). It trusts every
header: an unknown ``kind`` or a header without a peer crashes it, so this module only ever
builds the headers above, from checked values.
"""
from __future__ import annotations

import json
from typing import Any, NamedTuple

from .._types import IpcBusPeer, IpcBusProcess
from ..errors import IpcBusProtocolError
from . import _codec as C

__all__ = ["NODE_TYPE", "KINDS", "Incoming", "peer_json", "command", "message", "parse",
           "to_peer", "target_json"]

NODE_TYPE = 1
"""electron-common-ipc's process type of a Node peer (``IpcBusProcessType.Node``)."""
KINDS = frozenset({"HAN", "LICA", "LICR", "LIR", "SHT", "MES", "RQR"})
"""The only kinds this side ever sends."""


def peer_json(peer: IpcBusPeer) -> dict[str, Any]:
    """An ipcbus peer as electron-common-ipc carries it."""
    return {"id": peer.id, "type": NODE_TYPE, "name": peer.name,
            "process": {"pid": peer.process.pid, "ipcbus": peer.process.type}}


def target_json(target_id: str, known: dict[str, Any] | None) -> dict[str, Any]:
    """The ``target`` of a sendTo: the peer as last seen, or a Node peer of that id."""
    if known is not None:
        return known
    return {"id": target_id, "type": NODE_TYPE}


def to_peer(raw: Any) -> IpcBusPeer | None:
    """The IpcBusPeer of a peer object from the wire (None if it is not one)."""
    if not isinstance(raw, dict) or not isinstance(raw.get("id"), str):
        return None
    name = raw.get("name")
    process = raw.get("process")
    pid = 0
    ptype = "node"
    if isinstance(process, dict):
        if isinstance(process.get("pid"), int) and not isinstance(process.get("pid"), bool):
            pid = process["pid"]
        if isinstance(process.get("ipcbus"), str):
            ptype = process["ipcbus"]
    return IpcBusPeer(raw["id"], name if isinstance(name, str) else "", IpcBusProcess(ptype, pid))


def _header(fields: dict[str, Any]) -> bytes:
    """The header packet. Its fields are ours (checked channel, peer, ids) or peers read from
    the wire, so plain JSON serves; the full mapping only if they hold something else."""
    if fields.get("kind") not in KINDS:  # never give the Node broker a kind it would throw on
        raise ValueError(f"not a kind this side sends: {fields.get('kind')!r}")
    try:
        text = _dumps(fields)
    except (TypeError, ValueError):
        return C.encode(fields)
    return C.sized(b"o", C.utf8(text))


_dumps = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode


def command(kind: str, peer: dict[str, Any], channel: str | None = None) -> bytes:
    """A ``[header]`` command packet (HAN, LICA, LICR, LIR, SHT)."""
    fields: dict[str, Any] = {"kind": kind, "peer": peer}
    if channel is not None:
        fields["channel"] = channel
    return C.array_of([_header(fields)])


def message_header(kind: str, channel: str, peer: dict[str, Any], *,
                   target: dict[str, Any] | None = None,
                   request: dict[str, Any] | None = None) -> bytes:
    """The header packet of a message (a sender may reuse it: it depends on nothing else)."""
    fields: dict[str, Any] = {"kind": kind, "channel": channel, "peer": peer, "isRawData": True}
    if target is not None:
        fields["target"] = target
    if request is not None:
        fields["request"] = request
    return _header(fields)


def message(kind: str, channel: str, peer: dict[str, Any], args: bytes, *,
            target: dict[str, Any] | None = None,
            request: dict[str, Any] | None = None) -> bytes:
    """A ``[header, args]`` message packet; ``args`` is an encoded array packet."""
    return C.array_of([message_header(kind, channel, peer, target=target, request=request),
                       args])


class Incoming(NamedTuple):
    """A packet from the broker: its header and, for messages, the undecoded args packet."""

    kind: str
    header: dict[str, Any]
    args: memoryview | None
    local: bool = False  # made by this process (delivered without crossing the broker)


def parse(packet: bytes) -> Incoming:
    """Split a top-level packet; IpcBusProtocolError if it is not a command or message."""
    items = C.decode_array_items(packet)
    if not items or len(items) > 2:
        raise IpcBusProtocolError(f"a top-level array of {len(items)} items")
    header = C.decode_plain_json(items[0])
    if not isinstance(header, dict) or not isinstance(header.get("kind"), str):
        raise IpcBusProtocolError("a header without a kind")
    return Incoming(header["kind"], header, items[1] if len(items) == 2 else None)


def decode_args(args: memoryview | None) -> list[Any]:
    """The arguments of a message (an empty list for a command)."""
    if args is None:
        return []
    value = C.decode(args)
    if not isinstance(value, list):
        raise IpcBusProtocolError("message arguments are not an array")
    return value
