"""Looking into a running bus: traffic records, the spy, the traffic log and the state table.

* :class:`IpcBusSpy` asks a broker (or a bridge) for a copy of every message it routes, or of
  those on channels matching a glob, and calls a handler with a :class:`TrafficRecord` for each.
  The router copies frames only while a spy is attached; without one, routing pays a single
  truth test per frame. A spy is a peer like any other: when it leaves, nothing of it remains.
* :class:`TrafficRecord` and :class:`TrafficLog` (a router observer writing a row per routed
  message) live in :mod:`ipcbus.traffic`, which a hub uses without importing the client; they
  are re-exported here.
* :func:`format_state` and :func:`format_record` are the text of ``python -m ipcbus state`` and
  ``python -m ipcbus spy``.

Only the message kinds travel here (send, send_to, request, response, fail); the bus's own
bookkeeping (subscriptions, peers joining) shows in the state instead.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Callable

from typing_extensions import Self

from ._protocol import Frame
from .client import IpcBusClient
from ._decoder import FrameDecoder
from .errors import IpcBusProtocolError
from .traffic import KIND_NAMES, LOG_FIELDS, TrafficLog, TrafficRecord, records_of

__all__ = ["IpcBusSpy", "TrafficRecord", "TrafficLog", "records_of", "KIND_NAMES", "LOG_FIELDS",
           "format_record", "format_state"]

log = logging.getLogger("ipcbus")

class IpcBusSpy:
    """Receives a copy of the traffic a broker (or bridge) routes: ``handler(record)`` runs on
    the spy's dispatch thread for every message on a channel matching ``channel`` (a glob;
    ``"*"`` or ``""`` for all)."""

    def __init__(self, handler: Callable[[TrafficRecord], None], channel: str = "*") -> None:
        if not callable(handler):
            raise TypeError("handler must be callable")
        if not isinstance(channel, str):
            raise TypeError("channel must be a str (a glob)")
        self._handler = handler
        self._pattern = "" if channel in ("", "*") else channel
        self._client: Any = None
        self._lock = threading.Lock()

    def connect(self, address: Any = None, *, timeout: float | None = None,
                peer_name: str = "ipcbus-spy", **options: Any) -> Self:
        """Join the bus at ``address`` (the syntax of ``IpcBusClient.connect``) and start."""
        client = IpcBusClient.create().connect(address, peer_name=peer_name, timeout=timeout,
                                               **options)
        try:
            client._start_spy(self._pattern, self._on_copy, timeout)
        except BaseException:
            client.close()
            raise
        self._client = client
        return self

    @property
    def client(self) -> Any:
        return self._client

    def _on_copy(self, frame: Frame) -> None:
        decoder = FrameDecoder(max_message=2**32 - 1)
        try:
            decoder.feed(frame.body)
        except IpcBusProtocolError as exc:
            log.error("spy: undecodable copy: %s", exc)
            return
        now = time.time()
        for inner in decoder.frames():
            for record in records_of(inner, now):
                self._handler(record)

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- text for the command line ----------------------------------------------------------------------
def format_record(record: TrafficRecord, as_json: bool = False) -> str:
    """One line of ``python -m ipcbus spy``."""
    if as_json:
        row = record.as_row()
        row["preview"] = record.preview(200)
        return json.dumps(row)
    stamp = time.strftime("%H:%M:%S", time.localtime(record.time)) + \
        f".{int(record.time * 1000) % 1000:03d}"
    sender = f"{record.sender_name}({record.sender_id})" if record.sender_id else "(bus)"
    target = f" -> {record.target}" if record.target else ""
    rid = f" #{record.rid}" if record.rid else ""
    return (f"{stamp} {record.kind:<8} {record.channel!r} {sender}{target}{rid}"
            f" {record.size}B {record.preview()}")


def format_state(state: dict[str, Any], hide: set[str] | None = None) -> str:
    """The readable table of ``python -m ipcbus state``."""
    hide = hide or set()
    peers = [p for p in state.get("peers", []) if p["id"] not in hide]
    lines = [f"bus at {state.get('address') or '-'}: pid {state.get('pid')},"
             f" {len(peers)} peers, {len(state.get('channels', {}))} channels,"
             f" {len(state.get('services', {}))} services,"
             f" {state.get('pending_requests', 0)} pending requests", "", "PEERS"]
    rows: list[tuple[str, ...]] = [
        ("NAME", "ID", "TYPE", "PID", "SENT", "DELIVERED", "QUEUED", "CHANNELS")]
    for p in sorted(peers, key=lambda p: (p["name"], p["id"])):
        sent = p.get("sent", {})
        conn = p.get("connection", {})
        rows.append((p["name"], p["id"], p["type"], str(p["pid"]),
                     f"{sent.get('messages', 0)} msg", f"{conn.get('delivered_messages', 0)} msg",
                     f"{conn.get('queued_bytes', 0)} B", ", ".join(sorted(p["channels"]))))
    lines += _table(rows)
    if len(rows) > 1:
        lines.append("  (DELIVERED and QUEUED count per connection: a process's clients share one)")
    lines += ["", "CHANNELS"]
    stats = state.get("channel_stats", {})
    rows = [("CHANNEL", "SUBSCRIBERS", "MESSAGES", "BYTES")]  # a new table
    for channel in sorted(set(state.get("channels", {})) | set(stats)):
        st = stats.get(channel, {})
        rows.append((str(channel), str(state.get("channels", {}).get(channel, 0)),
                     str(st.get("messages", 0)), str(st.get("bytes", 0))))
    lines += _table(rows)
    names = {p["id"]: p["name"] for p in state.get("peers", [])}

    def who(ids: Any) -> str:  # one peer id, or a list of them (a group, a service's pool)
        ids = ids if isinstance(ids, list) else [ids]
        return ", ".join(f"{names.get(i, '?')} ({i})" for i in ids)

    lines += ["", "GROUPS"]
    rows = [("CHANNEL", "GROUP", "MEMBERS")]
    for channel, groups in sorted(state.get("groups", {}).items()):
        for group, members in sorted(groups.items()):
            rows.append((str(channel), str(group), who(members)))
    lines += _table(rows)
    lines += ["", "SERVICES"]
    rows = [("SERVICE", "HOSTS")]
    for service, host in sorted(state.get("services", {}).items()):
        rows.append((str(service), who(host)))
    lines += _table(rows)
    return "\n".join(lines)


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    if len(rows) == 1:
        return ["  (none)"]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
            for row in rows]
