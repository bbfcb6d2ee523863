"""socket-serializer, the framing of electron-common-ipc, and the value mapping — pure code.

No sockets, no threads: bytes in, values out (and back). Written from the JavaScript sources of
``socket-serializer`` 12.0.x and ``json-helpers`` 5.x (the versions electron-common-ipc 16.0.4
installs).

A stream is packets back to back, with no length prefix and no greeting. One packet:

====================  =============================================================
bytes                 meaning
====================  =============================================================
``0x5B`` (``[``)      header separator
1 byte                type: ``+`` ``-`` ``d`` ``D`` ``T`` ``F`` ``N`` ``U`` (fixed size),
                      ``s`` ``B`` ``o`` ``A`` ``C`` (sized)
u32 LE (sized only)   content size in bytes
content               ``+``/``-``: u32 LE magnitude; ``d``: float64 LE; ``D``: float64 LE ms
                      since the epoch; ``T`` ``F`` ``N`` ``U``: nothing; ``s``: UTF-8;
                      ``B``: bytes; ``o``: JSON text; ``A``: u32 LE count then that many
                      packets; ``C``: 1-byte typed-array code then the raw bytes
``0x5D`` (``]``)      footer
====================  =============================================================

Inside ``o`` JSON, objects ``{"type": T, "data": D}`` are revived by the Node side when ``T`` is
``Date`` (``D`` = ms), ``Buffer`` (``D`` = list of byte values), ``Uint8Array`` (``D`` = a
"binary" string), ``Error`` or ``TypeError`` (``D`` = the message).

The value mapping (Python → wire → Python):

* ``None`` → ``N`` → ``None`` (a Node ``undefined`` also arrives as ``None``); ``bool`` → ``T``/``F``.
* ``int`` → ``+``/``-`` within 32 bits, else ``d``; beyond ±2**53 a JavaScript number cannot
  hold it exactly: ``ValueError``. ``float`` → ``d``. A number arrives as ``int`` when it is
  integral and within ±2**53, else as ``float`` (JavaScript has one number type: a Python
  ``3.0`` arrives as ``3``).
* ``str`` → ``s``; ``bytes``/``bytearray``/``memoryview`` → ``B`` → ``bytes`` (a Node
  ``Buffer``); ``list``/``tuple`` → ``A`` → ``list``; ``datetime`` → ``D`` → an aware UTC
  ``datetime`` (millisecond precision; a naive one is taken as local time, as
  ``datetime.timestamp`` does).
* ``dict`` (``str`` keys only) → ``o`` (JSON) → ``dict``; inside it, ``datetime`` and ``bytes``
  travel as the revivable objects above, and NaN or infinities, which JSON cannot carry, raise
  ``ValueError``, as does a dict that Node would revive as something else (``type`` naming a
  revivable type, with ``data``).
* Node typed arrays (``C``) arrive as ``bytes`` (ArrayBuffer, Uint8Array, Uint8ClampedArray) or
  as lists of numbers (the others); an ``Error`` inside JSON arrives as ``"Error: message"``.
* Anything else raises ``TypeError`` when encoded.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import struct
from typing import Any, Iterator

from ..errors import IpcBusProtocolError

__all__ = ["MAX_SAFE_INTEGER", "DEFAULT_MAX_PACKET", "encode", "encode_array", "array_of", "sized", "utf8", "decode_plain_json", "encode_json",
           "decode", "decode_array_items", "PacketSplitter", "revive", "normalize"]

MAX_SAFE_INTEGER = 2 ** 53
"""Largest magnitude of an ``int`` that crosses (a JavaScript number holds it exactly)."""
DEFAULT_MAX_PACKET = 128 * 1024 * 1024
"""A top-level packet announcing more than this is a protocol error (the connection closes)."""

_OPEN = 0x5B
_CLOSE = 0x5D
_U32 = struct.Struct("<I")
_F64 = struct.Struct("<d")
_FIXED_SIZES = {ord("+"): 4, ord("-"): 4, ord("d"): 8, ord("D"): 8,
                ord("T"): 0, ord("F"): 0, ord("N"): 0, ord("U"): 0}
_SIZED = frozenset(map(ord, "sBoAC"))
_NULL = b"[N]"
_TRUE = b"[T]"
_FALSE = b"[F]"
_UNDEFINED_TOKEN = "_/undefined/_"  # json-helpers' marker: revived as undefined by Node
_REVIVED_TYPES = frozenset({"Date", "Buffer", "Uint8Array", "Error", "TypeError"})
_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)
_MS = _dt.timedelta(milliseconds=1)
# typed-array short codes of socket-serializer -> struct item format (None: raw bytes)
_TYPED: dict[int, str | None] = {0: None, 1: None, 2: None, 3: "H", 4: "I", 5: "b", 6: "h",
                                 8: "i", 9: "q", 10: "Q", 11: "f", 12: "d"}


# -- encoding -------------------------------------------------------------------------------
def sized(kind: bytes, content: bytes | bytearray | memoryview) -> bytes:
    """A sized packet (``s``, ``B``, ``o``, ``A``, ``C``) of ``content``."""
    return b"[" + kind + _U32.pack(len(content)) + bytes(content) + b"]"


def _check_int(value: int) -> None:
    if value > MAX_SAFE_INTEGER or value < -MAX_SAFE_INTEGER:
        raise ValueError(f"int {value} is beyond ±2**53: a JavaScript number cannot hold it"
                         " exactly (send it as a str)")


def _date_ms(value: _dt.datetime) -> float:
    if value.tzinfo is None:
        value = value.astimezone()  # naive: local time, as datetime.timestamp() takes it
    return float((value - _EPOCH) // _MS)


def encode(value: Any) -> bytes:
    """One packet for ``value`` (see the module's docstring); TypeError/ValueError if it
    cannot cross."""
    try:
        return _encode(value)
    except RecursionError:
        raise ValueError("value nested too deeply to be sent") from None


def array_of(packets: list[bytes]) -> bytes:
    """An ``A`` packet of already encoded packets."""
    return b"[A" + _U32.pack(4 + sum(map(len, packets))) + _U32.pack(len(packets)) + \
        b"".join(packets) + b"]"


def encode_array(values: Any) -> bytes:
    """An ``A`` packet of ``values`` (a list or tuple): the args of a message."""
    try:
        return sized(b"A", _U32.pack(len(values)) + b"".join(map(_encode, values)))
    except RecursionError:
        raise ValueError("value nested too deeply to be sent") from None


def _encode(value: Any) -> bytes:
    cls = value.__class__
    if value is None:
        return _NULL
    if cls is bool:
        return _TRUE if value else _FALSE
    if cls is str:
        return sized(b"s", utf8(value))
    if isinstance(value, int) and not isinstance(value, bool):
        if -0xFFFFFFFF <= value <= 0xFFFFFFFF:
            return (b"[+" if value >= 0 else b"[-") + _U32.pack(abs(value)) + b"]"
        _check_int(value)
        return b"[d" + _F64.pack(float(value)) + b"]"
    if isinstance(value, float):
        return b"[d" + _F64.pack(value) + b"]"
    if isinstance(value, (list, tuple)):
        return sized(b"A", _U32.pack(len(value)) + b"".join(map(_encode, value)))
    if isinstance(value, dict):
        return sized(b"o", utf8(encode_json(value)))
    if isinstance(value, (bytes, bytearray, memoryview)):
        return sized(b"B", memoryview(value).cast("B") if isinstance(value, memoryview)
                      else value)
    if isinstance(value, str):
        return sized(b"s", utf8(value))
    if isinstance(value, _dt.datetime):
        return b"[D" + _F64.pack(_date_ms(value)) + b"]"
    raise TypeError(f"{cls.__name__} cannot be sent to electron-common-ipc (None, bool, int,"
                    " float, str, bytes, list, tuple, dict with str keys, datetime)")


def utf8(text: str) -> bytes:
    """UTF-8 of ``text``; ValueError (not a crash on the Node side) for lone surrogates."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"str is not valid Unicode (lone surrogate?): {exc}") from None


def encode_json(value: Any) -> str:
    """The JSON text of ``value`` as json-helpers' JSONParserV1 would write it."""
    return json.dumps(_jsonable(value), ensure_ascii=False, allow_nan=False,
                      separators=(",", ":"))


def _jsonable(value: Any) -> Any:
    if value is None or value is True or value is False:
        return value
    if isinstance(value, str):
        if value == _UNDEFINED_TOKEN:
            raise ValueError(f"the str {_UNDEFINED_TOKEN!r} inside a dict is read as"
                             " undefined by electron-common-ipc")
        return str(value)
    if isinstance(value, int):
        _check_int(value)
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value!r} cannot travel inside a dict (JSON has no NaN or"
                             " infinity); send it as an argument or in a list")
        return _number(float(value))  # JSON.stringify writes integral numbers as integers
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"dict keys must be str to cross to Node, not"
                                f" {type(key).__name__}")
            out[key] = _jsonable(item)
        if isinstance(out.get("type"), str) and out["type"] in _REVIVED_TYPES and "data" in out:
            raise ValueError(f"a dict with type={out['type']!r} and data would be revived as a"
                             f" {out['type']} by electron-common-ipc")
        return out
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"type": "Buffer", "data": list(memoryview(value).cast("B"))}
    if isinstance(value, _dt.datetime):
        return {"type": "Date", "data": _date_ms(value)}
    raise TypeError(f"{type(value).__name__} cannot be sent to electron-common-ipc (None, bool,"
                    " int, float, str, bytes, list, tuple, dict with str keys, datetime)")


# -- decoding -------------------------------------------------------------------------------
def _number(value: float) -> int | float:
    if value.is_integer() and -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
        return int(value)
    return value


def _date(ms: float) -> _dt.datetime | None:
    if not math.isfinite(ms):
        return None  # an Invalid Date
    try:
        return _EPOCH + _dt.timedelta(milliseconds=ms)
    except OverflowError:
        return None


def revive(obj: dict[str, Any]) -> Any:
    """json-helpers' reviver: ``{"type": T, "data": D}`` objects to Python values."""
    kind = obj.get("type")
    if kind.__class__ is not str or "data" not in obj:
        return obj
    data = obj["data"]
    try:
        if kind == "Date":
            if isinstance(data, (int, float)) and not isinstance(data, bool):
                return _date(float(data))
            if data is None:
                return _EPOCH
            return obj
        if kind == "Buffer":
            if isinstance(data, list):
                return bytes(item & 0xFF for item in data if isinstance(item, int))
            if isinstance(data, str):
                return data.encode("utf-8")
            return obj
        if kind == "Uint8Array" and isinstance(data, str):
            return data.encode("latin-1", "replace")
        if kind in ("Error", "TypeError"):
            return f"{kind}: {data}"
    except (ValueError, OverflowError):
        return obj
    return obj


def _typed(code: int, raw: memoryview) -> Any:
    if code not in _TYPED:
        return None  # unknown code: Node reads undefined
    fmt = _TYPED[code]
    if fmt is None:
        return bytes(raw)
    size = struct.calcsize(fmt)
    if len(raw) % size:
        raise IpcBusProtocolError(f"typed array of {len(raw)} bytes is not a whole number of"
                                  f" {size}-byte items")
    return [_number(v) if isinstance(v, float) else v
            for v in struct.unpack(f"<{len(raw) // size}{fmt}", raw)]


def _header(buf: memoryview, pos: int, end: int) -> tuple[int, int, int]:
    """(type byte, content start, content end) of the packet at ``pos``."""
    if pos + 2 > end:
        raise IpcBusProtocolError("truncated packet header")
    if buf[pos] != _OPEN:
        raise IpcBusProtocolError(f"packet does not start with '[' (0x{buf[pos]:02x})")
    kind = buf[pos + 1]
    fixed = _FIXED_SIZES.get(kind)
    if fixed is not None:
        start = pos + 2
        stop = start + fixed
    elif kind in _SIZED:
        if pos + 6 > end:
            raise IpcBusProtocolError("truncated packet header")
        start = pos + 6
        stop = start + _U32.unpack_from(buf, pos + 2)[0]
    else:
        raise IpcBusProtocolError(f"unknown packet type 0x{kind:02x}")
    if stop + 1 > end:
        raise IpcBusProtocolError("packet overruns its container")
    if buf[stop] != _CLOSE:
        raise IpcBusProtocolError("packet does not end with ']'")
    return kind, start, stop


def _decode_at(buf: memoryview, pos: int, end: int) -> tuple[Any, int]:
    kind, start, stop = _header(buf, pos, end)
    after = stop + 1
    if kind == 0x73:  # s
        return str(buf[start:stop], "utf-8", "replace"), after
    if kind == 0x2B:  # +
        return _U32.unpack_from(buf, start)[0], after
    if kind == 0x2D:  # -
        return -_U32.unpack_from(buf, start)[0], after
    if kind == 0x64:  # d
        return _number(_F64.unpack_from(buf, start)[0]), after
    if kind == 0x41:  # A
        return list(_items(buf, start, stop)), after
    if kind == 0x6F:  # o
        return _json(buf[start:stop]), after
    if kind == 0x42:  # B
        return bytes(buf[start:stop]), after
    if kind == 0x54:  # T
        return True, after
    if kind == 0x46:  # F
        return False, after
    if kind == 0x44:  # D
        return _date(_F64.unpack_from(buf, start)[0]), after
    if kind == 0x43:  # C
        if stop == start:
            raise IpcBusProtocolError("typed array without its type code")
        return _typed(buf[start], buf[start + 1:stop]), after
    return None, after  # N, U


def _items(buf: memoryview, start: int, stop: int) -> Iterator[Any]:
    if start + 4 > stop:
        raise IpcBusProtocolError("array without its count")
    count = _U32.unpack_from(buf, start)[0]
    pos = start + 4
    for _ in range(count):
        value, pos = _decode_at(buf, pos, stop)
        yield value
    if pos != stop:
        raise IpcBusProtocolError(f"array of {count} items has {stop - pos} bytes left over")


def _json_int(digits: str) -> int | float:
    """A JSON integer as a number: beyond ±2**53 it is a double on the Node side."""
    value = int(digits)
    return value if -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER else float(value)


def _json(raw: memoryview) -> Any:
    try:
        return json.loads(str(raw, "utf-8"), object_hook=revive, parse_int=_json_int)
    except (ValueError, RecursionError) as exc:
        raise IpcBusProtocolError(f"invalid JSON packet: {exc}") from None


def decode_plain_json(packet: memoryview) -> Any:
    """The JSON of an ``o`` packet without json-helpers' revival (headers have none)."""
    kind, start, stop = _header(packet, 0, len(packet))
    if kind != 0x6F or stop + 1 != len(packet):
        raise IpcBusProtocolError("expected a JSON packet")
    try:
        return json.loads(str(packet[start:stop], "utf-8"))
    except (ValueError, RecursionError) as exc:
        raise IpcBusProtocolError(f"invalid JSON packet: {exc}") from None


def decode(packet: bytes | bytearray | memoryview) -> Any:
    """The value of one whole packet; IpcBusProtocolError if it is malformed."""
    buf = memoryview(packet).cast("B")
    try:
        value, pos = _decode_at(buf, 0, len(buf))
    except (struct.error, RecursionError) as exc:
        raise IpcBusProtocolError(f"malformed packet: {exc}") from None
    if pos != len(buf):
        raise IpcBusProtocolError(f"{len(buf) - pos} bytes after the packet")
    return value


def decode_array_items(packet: bytes | bytearray | memoryview) -> list[memoryview]:
    """The items of an ``A`` packet, each as its own (undecoded) packet: a header can be read
    without decoding the args that follow it."""
    buf = memoryview(packet).cast("B")
    kind, start, stop = _header(buf, 0, len(buf))
    if kind != 0x41 or stop + 1 != len(buf) or start + 4 > stop:
        raise IpcBusProtocolError("expected one array packet")
    count = _U32.unpack_from(buf, start)[0]
    pos = start + 4
    out = []
    for _ in range(count):
        _, _, item_stop = _header(buf, pos, stop)
        out.append(buf[pos:item_stop + 1])
        pos = item_stop + 1
    if pos != stop:
        raise IpcBusProtocolError("array packet has bytes left over")
    return out


class PacketSplitter:
    """Cuts a byte stream into whole top-level packets (the only framing there is).

    ``feed(data)`` returns the packets completed by ``data``; a header announcing more than
    ``max_packet`` bytes, or bytes that cannot start a packet, raise IpcBusProtocolError (the
    stream cannot be resynchronised: close it).
    """

    def __init__(self, max_packet: int = DEFAULT_MAX_PACKET) -> None:
        self._buf = bytearray()
        self._max = max_packet

    @property
    def pending(self) -> int:
        """Bytes held for an incomplete packet."""
        return len(self._buf)

    def bytes_desired(self) -> int:
        """How many more bytes complete the packet in progress (at least 1)."""
        size = self._size()
        return max(1, (size if size is not None else 6) - len(self._buf))

    def _size(self) -> int | None:
        buf = self._buf
        if len(buf) < 2:
            if buf and buf[0] != _OPEN:
                raise IpcBusProtocolError(f"stream does not start a packet (0x{buf[0]:02x})")
            return None
        if buf[0] != _OPEN:
            raise IpcBusProtocolError(f"stream does not start a packet (0x{buf[0]:02x})")
        fixed = _FIXED_SIZES.get(buf[1])
        if fixed is not None:
            return 3 + fixed
        if buf[1] not in _SIZED:
            raise IpcBusProtocolError(f"unknown packet type 0x{buf[1]:02x}")
        if len(buf) < 6:
            return None
        content: int = _U32.unpack_from(buf, 2)[0]
        if content > self._max:
            raise IpcBusProtocolError(f"a packet announces {content} bytes, over the limit of"
                                      f" {self._max}")
        return 7 + content

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        self._buf += data
        out: list[bytes] = []
        while True:
            size = self._size()
            if size is None or len(self._buf) < size:
                return out
            if self._buf[size - 1] != _CLOSE:
                raise IpcBusProtocolError("packet does not end with ']'")
            out.append(bytes(self._buf[:size]))
            del self._buf[:size]


def normalize(value: Any) -> Any:
    """What ``value`` becomes after a round trip through the wire (for tests and docs)."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return _number(value) if math.isfinite(value) else value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, _dt.datetime):
        return _date(_date_ms(value))
    if isinstance(value, (list, tuple)):
        return [normalize(item) for item in value]
    if isinstance(value, dict):
        return {key: normalize(item) for key, item in value.items()}
    return value

