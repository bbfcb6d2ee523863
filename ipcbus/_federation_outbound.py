"""The federation link's output: what the hub routes to the link, published on NATS.

The hub gives the link (a relay endpoint) only what the other brokers need: this side's
announcements (published on ``ctl``; a channel a local peer starts or stops listening to
plainly is a NATS subscription taken or dropped), and messages for their peers: broadcasts
and requests to the channel's subject, send_to and a group's chosen member to the broker of
the target, answers to the reply subject the request came with. A request out is recorded in
``_federation_state`` (the links expected to end a part of it) under the number of its reply
subject; with no link listening it fails at once, without reaching NATS.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from . import _protocol as P
from ._decoder import FrameDecoder
from ._federation_inbound import LINK, OP
from ._federation_state import announcement
from ._protocol import Kind
from ._routing import fail_frame

__all__ = ["Outbound"]

log = logging.getLogger("ipcbus")

_RUNS = frozenset((int(Kind.SEND), int(Kind.SEND_TO)))  # kinds that cross as runs


class Outbound:
    """hub -> NATS, for one link (``link``: its ``_federation_link.FederationLink``)."""

    def __init__(self, link: Any) -> None:
        self.link = link

    async def read_hub(self) -> None:
        loop = asyncio.get_running_loop()
        sock = self.link.sock
        assert sock is not None
        # Runs of messages with one header (one sender's stream on a channel) come as one
        # frame: they cross NATS as one message when it fits (the other link checks that
        # every frame of it carries that header).
        decoder = FrameDecoder(self.link.hub.options.max_message, merge_runs=True)
        while True:
            try:
                n = await loop.sock_recv_into(sock, decoder.get_buffer())
            except OSError:
                n = 0
            if n == 0:  # the hub is closing
                await self.link.stop()
                return
            decoder.buffer_updated(n)
            for frame in self.split(decoder.frames()):
                try:
                    await self.from_hub(frame)
                except Exception as exc:
                    log.warning("federation: could not send %s on %r over NATS: %r",
                                Kind(frame.kind).name, frame.channel, exc)

    def split(self, frames: list[P.Frame]) -> list[P.Frame]:
        """Runs stay whole only for messages that fit in one NATS message; anything else
        (requests of one requester, a run over the server's max_payload) one by one."""
        if all(f.count == 1 for f in frames):
            return frames
        limit = self.link.endpoint_limit
        out: list[P.Frame] = []
        for frame in frames:
            if frame.count == 1 or (frame.kind in _RUNS and len(frame.raw) <= limit):
                out.append(frame)
                continue
            decoder = FrameDecoder(self.link.hub.options.max_message)
            decoder.feed(frame.raw)
            out.extend(decoder.frames())
        return out

    async def from_hub(self, frame: P.Frame) -> None:
        kind, nc, state, subjects = frame.kind, self.link.nc, self.link.state, self.link.subjects
        raw = bytes(frame.raw)
        if announcement(kind):
            assert frame.sender is not None
            with self.link.lock:
                change = state.local(kind, frame.channel, frame.sender, frame.raw,
                                     frame.body_offset)
            if change is not None:
                await self.interest(*change)
            await nc.publish(subjects.ctl, raw, headers={LINK: self.link.id, OP: "ann"})
            return
        if kind == Kind.SEND:
            if frame.sender is not None:  # (the hub's own broadcasts: each hub makes them)
                await self.publish(subjects.channel(frame.channel), raw)
        elif kind == Kind.SEND_TO:
            link = state.knows(frame.target or "")
            if link is not None:
                await self.publish(subjects.to_link(link), raw)
        elif kind == Kind.REQUEST or kind == Kind.REQUEST_ALL:
            await self.request_out(frame, raw)
        elif kind == Kind.GROUPED:
            await self.grouped_out(frame, raw)
        elif kind == Kind.RESPONSE or kind == Kind.REQUEST_FAIL:
            if frame.rid == 0:  # the hub's answer to an announced peer or service
                if kind == Kind.REQUEST_FAIL:
                    log.warning("federation: the broker refused %r from another broker: %s",
                                frame.target, P.unpack_control(frame.body))
                return
            with self.link.lock:
                where = state.answer_to((frame.target or "", frame.rid),
                                        kind == Kind.REQUEST_FAIL)
            if where is not None:
                await self.publish(where, raw, headers={LINK: self.link.id})
        elif kind == Kind.CANCEL and frame.sender is not None:
            with self.link.lock:
                links = state.cancel((frame.sender[0], frame.rid))
            for link in links:
                await self.publish(subjects.to_link(link), raw)

    async def publish(self, subject: str, raw: bytes, reply: str = "",
                       headers: dict[str, str] | None = None) -> None:
        self.link.counters["published"] += 1
        await self.link.nc.publish(subject, raw, reply=reply, headers=headers)

    async def request_out(self, frame: P.Frame, raw: bytes) -> None:
        assert frame.sender is not None
        key = (frame.sender[0], frame.rid)
        state = self.link.state
        with self.link.lock:
            # to one peer: its broker; a call of a service: its host's broker (the hub chose
            # the host, the frame does not say); else every broker listening on the channel
            target = frame.target
            if target is None and frame.channel.startswith(P.SERVICE_CALL_PREFIX):
                target = state.service_host(frame.channel[len(P.SERVICE_CALL_PREFIX):])
            if target is not None:
                link = state.knows(target)
                links = {link} if link is not None else set()
            else:
                links = state.interest(frame.channel)
            if not links:
                self.link.to_hub(fail_frame(key[0], key[1], "no listener on the other brokers"))
                return
            n, evicted = state.send_out(key, links, frame.kind == Kind.REQUEST_ALL,
                                        frame.channel, target is None)
            for old in evicted:
                self.link.to_hub(fail_frame(old[0], old[1], "too many requests across the"
                                        " federation link"))
        subject = (self.link.subjects.channel(frame.channel) if target is None
                   else self.link.subjects.to_link(next(iter(links))))
        await self.publish(subject, raw, reply=self.link.subjects.reply(n))

    async def grouped_out(self, frame: P.Frame, raw: bytes) -> None:
        link = self.link.state.knows(frame.target or "")
        if link is None:
            return
        inner = P.unpack_payload(frame.body)[1]
        hlen, _, rid = P.PREFIX.unpack_from(inner, 0)
        kind, channel, sender, _, _ = P.decode_header(
            memoryview(inner)[P.PREFIX_SIZE:P.PREFIX_SIZE + hlen])
        reply = ""
        if (kind == Kind.REQUEST or kind == Kind.REQUEST_ALL) and sender is not None:
            with self.link.lock:
                n, _ = self.link.state.send_out((sender[0], rid), {link}, kind == Kind.REQUEST_ALL,
                                           channel, False)
            reply = self.link.subjects.reply(n)
        await self.publish(self.link.subjects.to_link(link), raw, reply=reply)

    async def interest(self, change: str, channel: str) -> None:
        """Hold the channel's subject while a local peer listens there."""
        if change == "sub" and channel not in self.link.channel_subs:
            self.link.channel_subs[channel] = await self.link.subscribe(
                self.link.subjects.channel(channel), self.link.inbound.on_channel)
        elif change == "unsub":
            sub = self.link.channel_subs.pop(channel, None)
            if sub is not None:
                self.link.nc.ordered.pop(sub._id, None)
                await sub.unsubscribe()


