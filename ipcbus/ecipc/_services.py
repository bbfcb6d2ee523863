"""Services across the two protocols: ipcbus's service channels ↔ electron-common-ipc's — pure.

:class:`~ipcbus.IpcBusService` and :class:`~ipcbus.IpcBusServiceProxy` are built on ordinary
client calls on two channels per service (see :mod:`ipcbus.service`). On an electron-common-ipc
bus the client translates those channels and their arguments, so the same service and proxy
classes talk to Node's ``CreateIpcBusService`` / ``CreateIpcBusServiceProxy``:

===================================  ==========================================================
ipcbus                               electron-common-ipc (``/electron-ipc-bus/ipc-service/N``)
===================================  ==========================================================
call channel, args ``[name, *a]``    ``…/N/call``, args ``[{"handlerName": name, "args": a}]``
status call ``__getServiceStatus``   the same handler; the status dict carries both spellings:
                                     ``calls``/``callHandlers``, plus ``host`` and
                                     ``supportEventEmitter``
event channel ``["start", st]``      ``…/N/event`` ``{"eventName": "service-event-start",
                                     "args": [st]}`` (``["status", st]`` travels as a start
                                     too: a started Node proxy ignores it, ours updates)
``["stop", reason]``                 ``{"eventName": "service-event-stop", "args":
                                     [{"reason": reason}]}``
``["event", name, *a]``              ``{"eventName": name, "args": a}`` (and Node's
                                     ``service-wrapper-event`` ``[name, a]`` comes back as one)
===================================  ==========================================================

What Node's protocol lacks: a service name is not claimed on the bus (two hosts of one name
both answer; the first answer wins), a host that dies sends no "stop" (calls time out), and a
status request with no host times out instead of failing at once.
"""
from __future__ import annotations

from typing import Any

from .. import _protocol as P

__all__ = ["NODE_NAMESPACE", "NODE_PREFIX", "STATUS_CALL", "wire_channel", "local_channel", "call_to_wire",
           "call_from_wire", "notice_to_wire", "notice_from_wire", "status_to_wire",
           "status_from_wire", "is_status_probe"]

NODE_NAMESPACE = "/electron-ipc-bus/"
"""electron-common-ipc's own channels: a user does not send there (as under ``/ipcbus/``)."""
NODE_PREFIX = NODE_NAMESPACE + "ipc-service/"
STATUS_CALL = "__getServiceStatus"
_START = "service-event-start"
_STOP = "service-event-stop"
_WRAPPER_EVENT = "service-wrapper-event"
_RESERVED_EVENTS = frozenset({_START, _STOP, _WRAPPER_EVENT})


def wire_channel(channel: str) -> tuple[str, str | None]:
    """(channel on the wire, "call"/"event" or None) for an ipcbus channel."""
    if channel.startswith(P.SERVICE_CALL_PREFIX):
        return f"{NODE_PREFIX}{channel[len(P.SERVICE_CALL_PREFIX):]}/call", "call"
    if channel.startswith(P.SERVICE_EVENT_PREFIX):
        return f"{NODE_PREFIX}{channel[len(P.SERVICE_EVENT_PREFIX):]}/event", "event"
    return channel, None


def local_channel(channel: str) -> tuple[str, str | None]:
    """(ipcbus channel, "call"/"event" or None) for a channel from the wire."""
    if channel.startswith(NODE_PREFIX):
        name, _, role = channel[len(NODE_PREFIX):].rpartition("/")
        if name and role == "call":
            return P.service_call_channel(name), "call"
        if name and role == "event":
            return P.service_event_channel(name), "event"
    return channel, None


def is_status_probe(args: tuple[Any, ...]) -> bool:
    """A proxy's first status request (``[STATUS_CALL, True]``): it wants a start notice."""
    return len(args) == 2 and args[0] == STATUS_CALL and args[1] is True


def call_to_wire(args: tuple[Any, ...]) -> list[Any]:
    """ipcbus call args ``(name, *a)`` as Node's call message (ValueError without a name)."""
    if not args or not isinstance(args[0], str):
        raise ValueError("a service call starts with the call's name (a str)")
    if is_status_probe(args):
        args = args[:1]
    return [{"handlerName": args[0], "args": list(args[1:])}]


def call_from_wire(args: list[Any]) -> list[Any]:
    """Node's call message as ipcbus call args (empty, which the service rejects, if
    malformed)."""
    if len(args) != 1 or not isinstance(args[0], dict):
        return []
    call = args[0]
    name = call.get("handlerName")
    call_args = call.get("args", [])
    if not isinstance(name, str) or not isinstance(call_args, list):
        return []
    return [name, *call_args]


def status_to_wire(status: Any) -> Any:
    """An ipcbus status dict with Node's keys added."""
    if not isinstance(status, dict):
        return status
    return {"callHandlers": list(status.get("calls", [])), "supportEventEmitter": False,
            **status}


def status_from_wire(status: Any, host: dict[str, Any] | None) -> Any:
    """A Node status dict with ipcbus's keys added (``host`` from the answering peer)."""
    if not isinstance(status, dict):
        return status
    calls = status.get("callHandlers", [])
    return {"calls": [c for c in calls if isinstance(c, str)] if isinstance(calls, list) else [],
            "host": host, **status}


def notice_to_wire(args: tuple[Any, ...]) -> list[Any]:
    """An ipcbus notice (event channel args) as Node's service event message.

    ValueError for anything else: a Node proxy throws (and its process dies) on a start
    without a status, or on an event named like its own notices."""
    kind = args[0] if args else None
    if kind in ("start", "status") and len(args) == 2 and isinstance(args[1], dict) \
            and all(isinstance(c, str) for c in args[1].get("calls", [])):
        return [{"eventName": _START, "args": [status_to_wire(args[1])]}]
    if kind == "stop" and len(args) <= 2:
        return [{"eventName": _STOP, "args": [{"reason": args[1] if len(args) > 1 else ""}]}]
    if kind == "event" and len(args) > 1 and isinstance(args[1], str) \
            and args[1] not in _RESERVED_EVENTS:
        return [{"eventName": args[1], "args": list(args[2:])}]
    raise ValueError("not a service notice: the service event channel carries only what"
                     " IpcBusService sends")


def notice_from_wire(args: list[Any], host: dict[str, Any] | None) -> list[Any]:
    """Node's service event message as ipcbus notice args (empty if malformed)."""
    if len(args) != 1 or not isinstance(args[0], dict):
        return []
    name = args[0].get("eventName")
    event_args = args[0].get("args", [])
    if not isinstance(name, str) or not isinstance(event_args, list):
        return []
    if name == _START:
        return ["start", status_from_wire(event_args[0] if event_args else {}, host)]
    if name == _STOP:
        detail = event_args[0] if event_args else None
        reason = detail.get("reason") if isinstance(detail, dict) else None
        return ["stop", reason if isinstance(reason, str) and reason else "service stopped"]
    if name == _WRAPPER_EVENT:
        if len(event_args) == 2 and isinstance(event_args[0], str) \
                and isinstance(event_args[1], list):
            return ["event", event_args[0], *event_args[1]]
        return []
    return ["event", name, *event_args]
