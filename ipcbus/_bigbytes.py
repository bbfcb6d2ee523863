"""The one use of ``ctypes`` in ipcbus: a new ``bytes`` object whose contents the kernel fills.

A client receives the large ``bytes`` argument of a message straight into the object its
listener gets (``FrameDecoder.direct_bytes``): CPython's ``PyBytes_FromStringAndSize(NULL, n)``
makes an unfilled ``bytes``, and a writable view of its buffer is read into before anyone else
sees the object (the documented C-API pattern). ``new_bytes`` is None where that is not
available or does not behave (not CPython, no ``ctypes``): large arguments then take the
ordinary path (received into a buffer, copied by msgpack). Figures: ``docs/performance.md``.
"""
from __future__ import annotations

import ctypes
from typing import Any

__all__ = ["new_bytes"]


def _bytes_maker() -> Any:
    """CPython's ``PyBytes_FromStringAndSize(NULL, n)``: a new bytes object whose contents are
    not set yet, for C code (here: the kernel, through a writable view) to fill before anyone
    else sees it. None where that is not available or does not behave (then large arguments
    take the ordinary path: received into a buffer, then copied by msgpack)."""
    try:
        make = ctypes.pythonapi.PyBytes_FromStringAndSize
        make.restype, make.argtypes = ctypes.py_object, (ctypes.c_void_p, ctypes.c_ssize_t)
        where = ctypes.pythonapi.PyBytes_AsString
        where.restype, where.argtypes = ctypes.c_void_p, (ctypes.py_object,)
        probe = make(None, 5)
        memoryview((ctypes.c_ubyte * 5).from_address(where(probe))).cast("B")[:] = b"probe"
        if probe != b"probe" or hash(probe) != hash(b"probe"):
            return None
    except Exception:  # not CPython, no ctypes
        return None

    def new_bytes(n: int) -> tuple[bytes, memoryview]:
        obj = make(None, n)
        return obj, memoryview((ctypes.c_ubyte * n).from_address(where(obj))).cast("B")

    return new_bytes


new_bytes = _bytes_maker()
