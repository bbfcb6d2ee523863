"""Remote services: :class:`IpcBusService` (the host side), :class:`IpcBusServiceProxy` and the
wrapper a proxy hands out (:class:`IpcBusServiceWrapper`).

The protocol is made of ordinary bus messages on two channels per service name ``N`` (see
:func:`ipcbus._protocol.service_call_channel` and :func:`~ipcbus._protocol.service_event_channel`):

* **Calls** are requests on ``/ipcbus/service/call/N`` with the args ``[call_name, *args]``.
  The host resolves them with the handler's result, or rejects them with
  ``"TypeName: message"`` (the handler's exception), so the caller's
  :class:`~ipcbus.IpcBusRequestError` carries the remote type name and text. ``send_call`` sends
  the same args as a broadcast: the handler runs, nobody waits for an answer.
* **Status**: the call named ``"__getServiceStatus"`` (the name electron-common-ipc uses) returns
  ``{"started": bool, "calls": [names...], "host": {"id", "name", "pid"}}``. Only a *started*
  service listens on its call channel, so while none is started the status request fails at
  once (no listener): "not started". Called with the extra argument ``True``, the host also
  sends the requesting peer a ``["start", status]`` notice (``send_to`` on the event channel)
  before answering.
* **Notices** are broadcasts on ``/ipcbus/service/event/N`` whose first argument is their kind:
  ``["start", status]``, ``["stop", reason]``, ``["status", status]`` (the calls changed while
  started) and ``["event", event_name, *args]`` (``send_event``). Only the service's host may
  send them (the hub refuses anyone else's), and ``["stop", reason]`` comes from the router
  itself, when the host releases the name (``stop()``) or leaves the bus without stopping
  (closed, crashed, killed).
* The service name is claimed on the bus (the router's registry) before the host listens, so a
  second ``start()`` of the same name anywhere on the bus fails with
  :class:`IpcBusServiceError` naming the host that has it.

A proxy subscribes to the notices *first*, then asks the status with ``True``: whatever the
order in which the service and the proxy came, the proxy cannot miss a start. It learns the
state from notices only (a proxy starts "not started"; the answer itself is not used): the
notices from one host reach it in the order they were sent, through the same dispatch path,
while answers take a faster path that would overtake them. So the proxy's view is always the
latest the bus told it, never an older notice applied over a newer answer.

Proxy notifications: besides the service's own events, a proxy (and its wrapper) emits
``"service-event-start"`` with the status dict when the service becomes available, and
``"service-event-stop"`` with the reason (a str) when it stops, its host leaves the bus, or the
proxy's own connection ends (the names of electron-common-ipc; see :data:`SERVICE_EVENT_START`
and :data:`SERVICE_EVENT_STOP`). A service cannot send events under those names.

Calls and their failures:

* A call made while the service is not started is *queued* and sent when "start" arrives, still
  bound by its timeout (counted from the call); past it, it fails with
  :class:`~ipcbus.IpcBusRequestTimeoutError`. One shared timer thread expires queued calls.
* When the service stops (or its host dies), the calls in flight fail at once with
  :class:`~ipcbus.IpcBusRequestError`; the proxy queues new calls until the service starts
  again, so a restarted service is used again without a new proxy.
* Errors raised by calls: :class:`~ipcbus.IpcBusRequestError` (rejected by the handler, no such
  call, service stopped), :class:`~ipcbus.IpcBusRequestTimeoutError` (also a ``TimeoutError``),
  :class:`~ipcbus.IpcBusConnectionError` (the proxy or its client was closed). Arguments that
  cannot be serialized raise ``TypeError``/``ValueError`` at the call, before anything is sent.

Threads: every public method may be called from any thread. Call handlers run on the service
client's dispatch thread, one at a time, in arrival order; they may make bus requests and
service calls themselves (nested dispatch keeps the process answering meanwhile). A handler
that must not hold the dispatch thread may return a :class:`concurrent.futures.Future`: the
call is answered when it completes. Proxy event handlers run on the proxy client's dispatch
thread and get the event's args only (``handler(*args)``, no :class:`~ipcbus.IpcBusEvent`).

Where the code is (this module only gathers the public names):

* :mod:`ipcbus._service_host`: :class:`IpcBusService`, the handlers, start/stop, answering;
* :mod:`ipcbus._service_proxy`: :class:`IpcBusServiceProxy`, its queued and in-flight calls,
  the notices it follows;
* :mod:`ipcbus._service_wrapper`: :class:`IpcBusServiceWrapper`, calls as attributes;
* :mod:`ipcbus._service_common`: the reserved names, the name check, the shared timer.

They import in that order (wrapper and common below the proxy and the host), never in a cycle.
"""
from __future__ import annotations

from ._service_common import SERVICE_EVENT_START, SERVICE_EVENT_STOP, STATUS_CALL
from ._service_host import IpcBusService
from ._service_proxy import IpcBusServiceProxy
from ._service_wrapper import IpcBusServiceWrapper
from .errors import IpcBusServiceError

__all__ = ["IpcBusService", "IpcBusServiceProxy", "IpcBusServiceWrapper", "IpcBusServiceError",
           "SERVICE_EVENT_START", "SERVICE_EVENT_STOP", "STATUS_CALL"]
