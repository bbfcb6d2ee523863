"""The federation link's intake: what NATS brings, handed to the hub.

Every message of the link's subscriptions comes here in the order the NATS client parsed it
(``_federation_link._OrderedClient``), on the link's thread. A frame goes to the hub only if
its sender is a peer the hub knows as one of the link's (another broker's announced peer):
anything else would be a protocol error for the link's connection, so it is dropped and
counted here. Announcements (``ctl``) update ``_federation_state`` and reach the hub as the
other broker made them; answers (``r.<link>.<n>``) end a part of a request this side sent
out, and the hub hears "no receiver left there" only once every part has ended.
"""
from __future__ import annotations

import logging
import time
from typing import Any

from . import _protocol as P
from ._decoder import FrameDecoder
from ._federation_state import announcement
from ._protocol import Kind
from ._routing import fail_frame

__all__ = ["Inbound", "LINK", "OP", "parse_headers"]

log = logging.getLogger("ipcbus")

_RUNS = frozenset((int(Kind.SEND), int(Kind.SEND_TO)))
LINK, OP = "Ipcbus-Link", "Ipcbus-Op"  # NATS headers: the sending link, an announcement's kind


def parse_headers(raw: bytes | None) -> dict[str, str]:
    """NATS headers (``NATS/1.0 [status]`` then ``Name: value`` lines); the status as
    ``"Status"``."""
    out: dict[str, str] = {}
    if not raw:
        return out
    lines = raw.decode("utf-8", "replace").split("\r\n")
    first = lines[0].split(None, 2)
    if len(first) > 1:
        out["Status"] = first[1]
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            out[name.strip()] = value.strip()
    return out


def uniform(data: bytes, hlen: int) -> bool:
    """Whether every frame in ``data`` (one, or a run) carries the first one's header, and
    the last one ends where ``data`` does."""
    size = P.PREFIX_SIZE + hlen + P.PREFIX.unpack_from(data, 0)[1]
    if size == len(data):
        return True
    header = data[P.PREFIX_SIZE:P.PREFIX_SIZE + hlen]
    offset, unpack, end = size, P.PREFIX.unpack_from, len(data)
    while offset < end:
        if end - offset < P.PREFIX_SIZE:
            return False
        h, b, _ = unpack(data, offset)
        start = offset + P.PREFIX_SIZE
        if h != hlen or data[start:start + h] != header:
            return False
        offset = start + int(h) + int(b)
    return bool(offset == end)


class Inbound:
    """NATS -> hub, for one link (``link``: its ``_federation_link.FederationLink``)."""

    def __init__(self, link: Any) -> None:
        self.link = link

    def on_ctl(self, subject: bytes, reply: bytes, data: bytes, raw_headers: bytes | None
                ) -> None:
        headers = parse_headers(raw_headers)
        link, op = headers.get(LINK), headers.get(OP)
        if not link or link == self.link.id:
            return
        with self.link.lock:
            known = self.link.state.heard(link, time.monotonic())
            if op == "hb" and not known:  # forgotten (silent too long), or new: its side?
                self.link.spawn(self.link.nc.publish(
                    self.link.subjects.to_link(link), b"",
                    headers={LINK: self.link.id, OP: "sync", "Reply": self.link.subjects.inbox}))
            elif op == "bye":
                self.link.remote_gone(link)
            elif op == "state":
                self.apply(link, data, whole=True)
                answer = headers.get("Reply")
                if answer:  # tell the newcomer this side
                    self.link.spawn(self.link.send_state(answer))
            elif op == "ann":
                self.apply(link, data)

    def apply(self, link: str, data: bytes, whole: bool = False) -> None:
        """Announcements of ``link`` to the hub. ``whole``: its whole side (when it joins,
        comes back, or was asked): what is new is added, its peers missing from it leave;
        what the hub knows already is not taken away and given back (a proxy would see its
        service stop)."""
        decoder = FrameDecoder(P.MAX_CONTROL_BODY)
        try:
            decoder.feed(data)
            frames = decoder.frames()
        except Exception as exc:
            log.warning("federation: bad announcement from %s: %s", link, exc)
            return
        state = self.link.state
        listed = set()
        for frame in frames:
            if frame.sender is None or not announcement(frame.kind):
                continue
            listed.add(frame.sender[0])
            if state.remote(link, frame.kind, frame.channel, frame.sender, frame.raw,
                            frame.body_offset):
                self.link.to_hub(bytes(frame.raw))
        if whole:
            for info in state.keep_only(link, listed):
                self.link.to_hub(P.encode_frame(Kind.PEER_REMOVE, sender=info))

    def on_channel(self, subject: bytes, reply: bytes, data: bytes,
                    raw_headers: bytes | None) -> None:
        self.link.counters["received"] += 1
        with self.link.lock:
            self.frame_in(data, reply)

    def on_inbox(self, subject: bytes, reply: bytes, data: bytes,
                  raw_headers: bytes | None) -> None:
        if raw_headers:  # a link's answer to our hello: its side
            headers = parse_headers(raw_headers)
            link = headers.get(LINK)
            op = headers.get(OP)
            if link and op == "state":
                with self.link.lock:
                    self.link.state.heard(link, time.monotonic())
                    self.apply(link, data, whole=True)
            elif link and op == "sync" and headers.get("Reply"):
                self.link.spawn(self.link.send_state(headers["Reply"]))
            return
        self.link.counters["received"] += 1
        with self.link.lock:
            self.frame_in(data, reply)

    def frame_in(self, data: bytes, reply: bytes) -> None:
        """A message from another broker: to the hub, if its sender is a peer the hub
        knows as one of the link's (anything else would be a protocol error there)."""
        try:
            hlen, blen, rid = P.PREFIX.unpack_from(data, 0)
            kind, channel, sender, target, _ = P.decode_header(
                memoryview(data)[P.PREFIX_SIZE:P.PREFIX_SIZE + hlen])
        except Exception:
            self.link.state.counters["refused_frames"] += 1
            return
        state = self.link.state
        if kind not in _RUNS and P.PREFIX_SIZE + hlen + blen != len(data):
            state.counters["refused_frames"] += 1  # only messages cross as runs
            return
        if kind == Kind.GROUPED:  # a request's member: the inner frame's requester
            try:
                inner = P.unpack_payload(memoryview(data)[P.PREFIX_SIZE + hlen:])[1]
                ihlen, _, rid = P.PREFIX.unpack_from(inner, 0)
                kind, _, sender, _, _ = P.decode_header(
                    memoryview(inner)[P.PREFIX_SIZE:P.PREFIX_SIZE + ihlen])
            except Exception:
                self.link.state.counters["refused_frames"] += 1
                return
        if sender is None or state.knows(sender[0]) is None:
            state.counters["unknown_senders"] += 1
            return
        if kind == Kind.REQUEST or kind == Kind.REQUEST_ALL:
            if reply:
                state.owe((sender[0], rid), reply.decode(), kind == Kind.REQUEST_ALL)
        elif kind == Kind.CANCEL:
            state.owed.pop((sender[0], rid), None)
        elif kind not in (Kind.SEND, Kind.SEND_TO) or not uniform(data, hlen):
            state.counters["refused_frames"] += 1
            return
        self.link.to_hub(data)

    def on_reply(self, subject: bytes, reply: bytes, data: bytes,
                  raw_headers: bytes | None) -> None:
        try:
            n = int(subject.rsplit(b".", 1)[1])
        except (IndexError, ValueError):
            return
        headers = parse_headers(raw_headers)
        with self.link.lock:
            state = self.link.state
            if headers.get("Status") == "503":  # no responders: no broker listens there
                found = state.no_responders(n)
                if found is not None and found[1]:
                    self.link.to_hub(fail_frame(found[0][0], found[0][1], (
                        "no listener on the other brokers of the bus")))
                return
            link = headers.get(LINK, "")
            try:
                hlen, _, rid = P.PREFIX.unpack_from(data, 0)
                kind, _, sender, _, _ = P.decode_header(
                    memoryview(data)[P.PREFIX_SIZE:P.PREFIX_SIZE + hlen])
            except Exception:
                state.counters["refused_frames"] += 1
                return
            final = kind == Kind.REQUEST_FAIL
            if not final and (sender is None or state.knows(sender[0]) is None):
                state.counters["unknown_senders"] += 1
                return
            found = state.answered(n, link, final)
            if found is None:
                return
            if not final or found[1]:
                self.link.to_hub(data)

