"""Large payloads handed to a group's member, as pure code: a hub finds the frame a GROUPED
frame carries without copying it (``_router_groups.carried_at``, ``_hub_shm._carries``),
and a member's connection resolves a GROUPED frame announced by SHM_SLOTS into a
``ShmGrouped`` whose slots go back once delivered, or at once when it is malformed
(``ConnectionShm._grouped``, with a fake connection: no sockets)."""
from __future__ import annotations

import mmap
from typing import Any

import msgpack
from hypothesis import given
from hypothesis import strategies as st

from ipcbus import _protocol as P
from ipcbus._client.shm import ConnectionShm
from ipcbus._client.shm_delivery import ShmFrame, ShmGrouped
from ipcbus._decoder import FrameDecoder
from ipcbus._hub_shm import _carries
from ipcbus._protocol import Kind
from ipcbus._router_groups import carried_at, grouped_frame
from ipcbus._shm_slots import EXT_CODE, ext_data

INFO = ["p1", "sender", "node", 42]
groups = st.text(st.characters(min_codepoint=32, max_codepoint=0xD7FF),
                 min_size=1, max_size=100).filter(
    lambda g: "\x7f" not in g and len(g.encode()) <= P.MAX_GROUP)


@given(group=groups, size=st.sampled_from([0, 1, 31, 255, 256, 65535, 65536, 70000]),
       channel=st.sampled_from(["c", "jobs/" + "x" * 300]))
def test_carried_at_finds_the_carried_frame_of_every_size(group: str, size: int,
                                                         channel: str) -> None:
    inner = P.encode_frame(Kind.SEND, channel, INFO, None, 0, P.pack_payload([b"y" * size]))
    raw = grouped_frame(channel, "p2", group, inner)
    at = carried_at(raw)
    assert at is not None and raw[at:] == inner
    body = msgpack.unpackb(raw[len(raw) - P.PREFIX.unpack_from(raw, 0)[1]:])
    assert body == [group, inner]  # the form msgpack itself reads
    assert _carries(raw, inner)
    other = P.encode_frame(Kind.SEND, channel, INFO, None, 0, P.pack_payload([b"z" * size]))
    assert _carries(raw, other) is (len(other) == len(inner) and other[:30] == inner[:30])


@given(data=st.binary(max_size=200), cut=st.integers(0, 60))
def test_carried_at_never_raises_on_garbage_or_truncated_frames(data: bytes, cut: int
                                                                ) -> None:
    raw = grouped_frame("c", "p2", "g", P.encode_frame(Kind.SEND, "c", INFO, None, 0, b"\x90"))
    for candidate in (data, raw[:len(raw) - cut] if cut else raw, raw + data):
        at = carried_at(candidate)
        assert at is None or 0 < at <= len(candidate)
    assert carried_at(raw) is not None
    assert carried_at(raw[:-1]) is None and (not data or carried_at(raw + data) is None)


# -- a member's connection ---------------------------------------------------------------------
class _Writer:
    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def write_now(self, frame: bytes, member: Any) -> None:
        self.frames.append(frame)


class _Member:
    left = False
    info = INFO


class _Client:
    _member = _Member()


class _Conn:
    def __init__(self) -> None:
        self.writer = _Writer()
        self.client_list = [_Client()]

    def released(self) -> list[tuple[int, Any]]:
        out = []
        for raw in self.writer.frames:
            dec = FrameDecoder()
            dec.feed(raw)
            (frame,) = dec.frames()
            assert frame.kind == Kind.SHM_RELEASE
            out.append((frame.rid, P.unpack_control(frame.body)))
        return out


def _shm_with_arena(data: bytes) -> tuple[ConnectionShm, _Conn, mmap.mmap]:
    conn = _Conn()
    shm = ConnectionShm(conn)
    arena = mmap.mmap(-1, 8192)
    arena[4096:4096 + len(data)] = data
    shm.maps[7] = arena
    shm.pending = (7, [[4096, len(data)]])
    return shm, conn, arena


def _grouped(kind: int, body: bytes) -> P.Frame:
    inner = P.encode_frame(kind, "jobs", INFO, None, 3 if kind != Kind.SEND else 0, body)
    dec = FrameDecoder()
    dec.feed(grouped_frame("jobs", "p2", "pool", inner))
    (frame,) = dec.frames()
    return frame


def test_a_grouped_frame_with_slots_becomes_a_shm_grouped_released_once_delivered() -> None:
    shm, conn, arena = _shm_with_arena(b"payload!")
    body = P.pack_payload([1, msgpack.ExtType(EXT_CODE, ext_data(0))])
    (out,) = shm.on_frame(_grouped(Kind.REQUEST, body))
    assert out.__class__ is ShmGrouped and out.kind == Kind.GROUPED
    assert isinstance(out, ShmGrouped) and out.group == "pool" and out.target == "p2"
    inner = out.inner
    assert inner.__class__ is ShmFrame and inner.kind == Kind.REQUEST and inner.rid == 3
    assert inner.args[0] == 1 and bytes(inner.args[1]) == b"payload!"
    assert inner.copied() == [1, b"payload!"]
    assert conn.writer.frames == []  # held until delivered
    inner.done()
    assert conn.released() == [(7, [4096])]
    shm.close()
    arena.close()


def test_a_malformed_grouped_frame_gives_its_slots_back_at_once() -> None:
    shm, conn, arena = _shm_with_arena(b"payload!")
    raw = grouped_frame("jobs", "p2", "pool", b"not a frame")
    dec = FrameDecoder()
    dec.feed(raw)
    assert shm.on_frame(dec.frames()[0]) == []
    assert conn.released() == [(7, [4096])] and shm.pending is None
    shm.pending = (7, [[4096, 8]])  # a placeholder naming a slot it was not given
    body = P.pack_payload([msgpack.ExtType(EXT_CODE, ext_data(5))])
    assert shm.on_frame(_grouped(Kind.SEND, body)) == []
    assert conn.released() == [(7, [4096]), (7, [4096])]
    shm.close()
    arena.close()
