"""Looking into a running bus: traffic records, the spy, the traffic log and the state table.

* :class:`IpcBusSpy` asks a broker (or a bridge) for a copy of every message it routes, or of
  those on channels matching a glob, and calls a handler with a :class:`TrafficRecord` for each.
  The router copies frames only while a spy is attached; without one, routing pays a single
  truth test per frame. A spy is a peer like any other: when it leaves, nothing of it remains.
* :class:`TrafficLog` is a router observer that writes one row per routed message to a CSV or
  JSON-lines file, with the round-trip time of every answered request. A broker writes one
  when given ``traffic_log=PATH`` or when ``IPCBUS_LOG=PATH`` is set in its environment
  (``.csv`` for CSV, anything else for JSON lines).
* :func:`format_state` and :func:`format_record` are the text of ``python -m ipcbus state`` and
  ``python -m ipcbus spy``.

Only the message kinds travel here (send, send_to, request, response, fail); the bus's own
bookkeeping (subscriptions, peers joining) shows in the state instead.
"""
from __future__ import annotations

import csv
import json
import logging
import threading
import time
from dataclasses import asdict, dataclass
from typing import IO, Any, Callable

from typing_extensions import Self

from . import _protocol as P
from ._protocol import Frame, Kind
from .client import IpcBusClient
from ._decoder import FrameDecoder
from .errors import IpcBusProtocolError

log = logging.getLogger("ipcbus")

KIND_NAMES = {Kind.SEND: "send", Kind.SEND_TO: "send_to", Kind.REQUEST: "request",
              Kind.RESPONSE: "response", Kind.REQUEST_FAIL: "fail"}
LOG_FIELDS = ["time", "kind", "channel", "sender_id", "sender_name", "target", "rid", "size",
              "nfds", "rtt_ms"]
_MAX_OPEN_REQUESTS = 100_000


@dataclass
class TrafficRecord:
    """One message as a router saw it. ``size`` is the body's length in bytes; ``rtt_ms`` is the
    request's round trip, for answers seen by a traffic log."""

    time: float
    kind: str
    channel: str
    sender_id: str | None
    sender_name: str | None
    target: str | None
    rid: int
    size: int
    nfds: int
    body: bytes = b""
    rtt_ms: float | None = None

    def args(self) -> Any:
        """The decoded payload (a list of arguments for messages and requests)."""
        return P.unpack_payload(self.body)

    def preview(self, width: int = 60) -> str:
        """A short text of the payload, cut to ``width`` characters."""
        try:
            value = self.args()
            if self.nfds and isinstance(value, list) and len(value) == 2:
                value = value[0]  # [args, port kinds]
            if self.kind == "response" and isinstance(value, list) and len(value) == 2:
                text = ("resolved " if value[0] else "rejected ") + repr(value[1])
            else:
                text = repr(value)
        except IpcBusProtocolError:
            text = f"<{self.size} undecodable bytes>"
        return text if len(text) <= width else text[:width - 3] + "..."

    def as_row(self) -> dict[str, Any]:
        row = asdict(self)
        del row["body"]
        return row


def records_of(frame: Frame, when: float, *, with_body: bool = True) -> list[TrafficRecord]:
    """The records of a routed frame (a run of frames gives one record per message)."""
    sender = frame.sender
    kind = KIND_NAMES.get(Kind(frame.kind), str(frame.kind))
    return [TrafficRecord(when, kind, frame.channel, sender[0] if sender else None,
                          sender[1] if sender else None, frame.target, frame.rid, len(body),
                          frame.nfds, bytes(body) if with_body else b"")
            for body in frame.bodies()]


class TrafficLog:
    """A router observer writing a row per routed message (CSV or JSON lines)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.csv = path.endswith(".csv")
        self._file: IO[str] = open(path, "a", newline="", encoding="utf-8")
        self._writer = csv.DictWriter(self._file, LOG_FIELDS) if self.csv else None
        if self._writer is not None and self._file.tell() == 0:
            self._writer.writeheader()
        self._open: dict[tuple[str | None, int], float] = {}  # (requester, rid) -> time

    def __call__(self, endpoint: Any, frame: Frame) -> None:
        now = time.time()
        for record in records_of(frame, now, with_body=False):
            if record.kind == "request":
                if len(self._open) >= _MAX_OPEN_REQUESTS:  # unanswered ones: drop the oldest
                    for key in list(self._open)[:_MAX_OPEN_REQUESTS // 10]:
                        del self._open[key]
                self._open[(record.sender_id, record.rid)] = now
            elif record.kind in ("response", "fail"):
                started = self._open.pop((record.target, record.rid), None)
                if started is not None:
                    record.rtt_ms = round((now - started) * 1000.0, 3)
            row = record.as_row()
            if self._writer is not None:
                self._writer.writerow(row)
            else:
                self._file.write(json.dumps(row) + "\n")

    def flush(self) -> None:
        try:
            self._file.flush()
        except (OSError, ValueError) as exc:
            log.warning("traffic log %s: %s", self.path, exc)

    def close(self) -> None:
        self.flush()
        self._file.close()


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
    lines += ["", "SERVICES"]
    names = {p["id"]: p["name"] for p in state.get("peers", [])}
    rows = [("SERVICE", "HOST")]
    for service, host in sorted(state.get("services", {}).items()):
        rows.append((str(service), f"{names.get(host, '?')} ({host})"))
    lines += _table(rows)
    return "\n".join(lines)


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    if len(rows) == 1:
        return ["  (none)"]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
            for row in rows]
