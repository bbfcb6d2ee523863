"""Traffic records and the traffic log: what a router's observers see of the messages it routes.

* :class:`TrafficRecord` is one message as a router saw it (kind, channel, sender, target,
  sizes); :func:`records_of` gives the records of a routed frame (one per message of a run).
* :class:`TrafficLog` is a router observer that writes one row per routed message to a CSV or
  JSON-lines file, with the round-trip time of every answered request. A broker writes one
  when given ``traffic_log=PATH`` or when ``IPCBUS_LOG=PATH`` is set in its environment
  (``.csv`` for CSV, anything else for JSON lines). It runs on the hub's loop thread.

Only the message kinds appear here (send, send_to, request, response, fail). A module of its
own so that a hub can keep a log without importing the client (``spy.py`` is a client).
"""
from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import asdict, dataclass
from typing import IO, Any

from . import _protocol as P
from ._protocol import Frame, Kind
from .errors import IpcBusProtocolError

__all__ = ["TrafficRecord", "TrafficLog", "records_of", "KIND_NAMES", "LOG_FIELDS"]

log = logging.getLogger("ipcbus")

KIND_NAMES = {Kind.SEND: "send", Kind.SEND_TO: "send_to", Kind.REQUEST: "request",
              Kind.RESPONSE: "response", Kind.REQUEST_FAIL: "fail",
              Kind.REQUEST_ALL: "request_all"}
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
