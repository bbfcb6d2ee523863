"""numpy arrays as message arguments: same dtype and shape on arrival, numpy never imported
for it (SPEC "Large payloads through shared memory").

numpy is not a dependency. An argument is recognised as an array by its class's module and
name (``numpy.ndarray``), so nothing here imports numpy to *send*; a receiver imports it
when an array arrives (it was sent by a process that has numpy; without numpy the receiver
logs the message as malformed and drops it).

Two msgpack ext types carry an array: :data:`ARRAY_EXT` inline (``[dtype.str, shape,
bytes]``, the bytes in C order: a non-contiguous slice is packed as its contiguous copy) and
:data:`ARRAY_SLOT_EXT` through a shared-memory slot (``[dtype.str, shape, slot index]``,
``_client/shm.py``). A receiver always gets its own writable array. Arrays of Python objects
(dtype ``object``) and of structured dtypes are refused with ``TypeError`` at the call.
"""
from __future__ import annotations

from typing import Any

import msgpack

__all__ = ["ARRAY_EXT", "ARRAY_SLOT_EXT", "is_array", "array_header", "encode_default",
           "decode_array", "ext_hook"]

ARRAY_EXT = 0x4E  # "N": an array inline
ARRAY_SLOT_EXT = 0x4F  # an array in a shared-memory slot


def is_array(obj: Any) -> bool:
    """Whether ``obj`` is a numpy array (by its class: numpy is not imported)."""
    cls = obj.__class__
    return bool(cls.__name__ == "ndarray" and cls.__module__ == "numpy")


def array_header(arr: Any) -> list[Any]:
    """``[dtype.str, shape]`` of an array; TypeError for an array of Python objects."""
    if arr.dtype.hasobject:
        raise TypeError("cannot send a numpy array of Python objects (dtype object)")
    if arr.dtype.fields is not None or arr.dtype.subdtype is not None:
        raise TypeError(f"cannot send a numpy array of the structured dtype {arr.dtype}"
                        " (send its fields as arrays)")
    return [arr.dtype.str, list(arr.shape)]


def encode_default(obj: Any) -> Any:
    """msgpack's ``default`` hook: an array as an ext type, anything else refused."""
    if is_array(obj):
        return msgpack.ExtType(ARRAY_EXT, msgpack.packb([*array_header(obj), obj.tobytes()],
                                                        use_bin_type=True))
    raise TypeError(f"can not serialize {type(obj).__name__!r} object")


def decode_array(dtype: object, shape: object, data: bytes | memoryview) -> Any:
    """A new writable array of ``dtype`` and ``shape`` holding ``data``; ValueError if they do
    not agree (or numpy is not installed)."""
    try:
        import numpy as np  # only here: a process that receives no array never imports it
    except ImportError:
        raise ValueError("a numpy array arrived, and numpy is not installed here") from None
    if type(dtype) is not str or type(shape) is not list or \
            not all(type(n) is int and n >= 0 for n in shape):
        raise ValueError("malformed numpy array header")
    kind = np.dtype(dtype)
    if kind.hasobject or kind.fields is not None:
        raise ValueError("a numpy array of Python objects or of a structured dtype")
    count = 1
    for n in shape:
        count *= n
    if count * kind.itemsize != len(data):
        raise ValueError("a numpy array's bytes do not match its dtype and shape")
    out = np.empty(shape, dtype=kind)
    if len(data):
        out.reshape(-1).view(np.uint8)[:] = np.frombuffer(data, dtype=np.uint8)
    return out


def ext_hook(code: int, data: bytes) -> Any:
    """msgpack's ``ext_hook``: an inline array decoded, other ext types as they came."""
    if code == ARRAY_EXT:
        fields = msgpack.unpackb(data, raw=False)
        if type(fields) is not list or len(fields) != 3 or type(fields[2]) is not bytes:
            raise ValueError("malformed numpy array")
        return decode_array(fields[0], fields[1], fields[2])
    return msgpack.ExtType(code, data)
