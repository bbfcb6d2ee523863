"""Writing a connection's frames: whole frames under one lock, bursts coalesced.

Any thread may write. A frame is written whole under the *send lock*, so frames of one
sender reach the bus in the order of their calls. The main thread (the only one signal
handlers run in) writes with ``T.send_whole``, which finishes a write it has begun before an
interrupt is raised; other threads use the plain calls.

*Bursts*: a small broadcast or peer-to-peer send that follows the previous one within
``BURST_GAP`` seconds is buffered and written with its neighbours (inline every
``coalesce`` bytes, else by the *flusher* thread right after the burst, started on first
use); a lone send is written at once. Requests, answers, control frames and frames with
descriptors are never held back: they flush what is buffered first, so order is kept.

*Membership* (:class:`Membership`): one per ``connect()`` of a client: the peer tuple its
frames carry (the hub's record once PEER_ADD is answered), their cached headers, and a
``left`` flag set where its PEER_REMOVE is written and read under the send lock: no frame
in a client's name follows its PEER_REMOVE, whatever other threads do.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

from .. import _protocol as P
from .. import _transport as T
from .._protocol import Kind
from ..errors import IpcBusConnectionError

log = logging.getLogger("ipcbus")

__all__ = ["Membership", "NOT_JOINED", "Writer", "BURST_GAP", "COALESCE_FRAME"]

BURST_GAP = 50e-6  # seconds between two sends that makes them one burst
COALESCE_FRAME = 16 * 1024  # larger frames are written on their own, without a copy
_SEND, _SEND_TO = int(Kind.SEND), int(Kind.SEND_TO)
_wire_timeout = P.wire_timeout
_PREFIX_PACK = P.PREFIX.pack
_send_whole = T.send_whole  # see there: a frame is written whole even when interrupted
_get_ident = threading.get_ident


class Membership:
    """One joining of the bus by a client (see the module docstring). A new ``connect()``
    makes a new membership, so a thread still sending for the old one cannot write in the
    new one's name."""

    __slots__ = ("info", "headers", "left")

    def __init__(self, info: list[Any] | None, left: bool = False) -> None:
        self.info = info
        self.headers: dict[tuple[Any, ...], bytes] = {}  # frames without fds
        self.left = left


NOT_JOINED = Membership(None, left=True)


def raise_left() -> None:
    raise IpcBusConnectionError("the client was closed")


class Writer:
    """The writing half of one connection. ``check`` raises the connection's own error
    (closed, inherited through fork) when a write fails or the connection has ended."""

    def __init__(self, transport: T.StreamTransport, coalesce: int, max_message: int) -> None:
        self.transport = transport
        self.sock = transport.sock
        self.max_message = max_message
        self.lock = threading.Lock()  # the send lock: out, out_size, last_write, every write
        self.coalesce = coalesce  # bytes of a burst buffered before an inline write; 0: off
        self.out: list[bytes] = []  # a burst's frames, not written yet
        self.out_size = 0
        self.last_write = 0.0
        self.main_ident = threading.main_thread().ident  # the thread signal handlers run in
        self.ended = False  # no more writes (the flusher ends)
        self._flusher: threading.Thread | None = None
        self._flush_wanted = threading.Event()

    # -- frames ------------------------------------------------------------------------------
    def frame(self, member: Membership, kind: int, channel: str, target: str | None, rid: int,
              body: P.Body, fds: list[int] | None = None, timeout: float | None = None) -> None:
        """Encode and write one frame in the name of ``member`` (headers of frames without
        descriptors are cached per membership; ``timeout``: a request's, in its header).
        ValueError over the bus's size limit; OSError from the socket."""
        size = len(body) if body.__class__ is bytes else P.body_size(body)
        if size > self.max_message:
            raise ValueError(f"message of {size} bytes exceeds the bus limit of"
                             f" {self.max_message} bytes")
        if timeout is not None:
            timeout = _wire_timeout(timeout)
        if fds:
            header = P.encode_header(kind, channel, member.info, target, len(fds), timeout)
        else:
            key = (kind, channel, target) if timeout is None else (kind, channel, target, timeout)
            headers = member.headers
            header = headers.get(key)  # type: ignore[assignment]
            if header is None:
                header = P.encode_header(kind, channel, member.info, target, 0, timeout)
                if len(headers) >= 1024:
                    headers.clear()
                headers[key] = header
        prefix = _PREFIX_PACK(len(header), size, rid)
        if body.__class__ is not bytes:  # large arguments, written in place
            self.write([prefix + header, *body], fds, member)
        elif fds or size > COALESCE_FRAME:
            self.write([prefix + header, body], fds, member)
        elif kind == _SEND or kind == _SEND_TO:
            self.write_burst(prefix + header + body, member)
        else:
            self.write_now(prefix + header + body, member)

    def write(self, buffers: list[bytes], fds: list[int] | None, member: Membership) -> None:
        """Write one frame of several buffers (or with descriptors) at once."""
        with self.lock:
            if member.left:
                raise_left()
            if self.out:
                self._flush_locked()
            _send_whole(self.sock, buffers, fds or ())

    def write_burst(self, data: bytes, member: Membership) -> None:
        """Write one small frame that may join a burst."""
        with self.lock:
            if member.left:
                raise_left()
            if self.coalesce:
                self._burst_locked(data)
            else:
                _send_whole(self.sock, (data,))

    def write_now(self, data: bytes, member: Membership) -> None:
        """Write one urgent frame without descriptors (requests, answers): the path of every
        round trip, kept short."""
        with self.lock:
            if member.left:
                raise_left()
            if self.out:
                self._flush_locked()
            if _get_ident() == self.main_ident:
                _send_whole(self.sock, (data,))
            else:
                self.sock.sendall(data)

    def write_surely(self, data: bytes, member: Membership) -> None:
        """:meth:`write_now`, except that an interrupt while waiting for the send lock is
        raised only once the frame is written."""
        interrupted: BaseException | None = None
        acquired: list[bool] = []
        while not acquired:
            try:  # (the result is stored by C code: see T.send_whole)
                acquired.extend(map(self.lock.acquire, (True,)))
            except Exception:
                raise
            except BaseException as exc:
                interrupted = interrupted or exc
        try:
            if member.left:
                raise_left()
            if self.out:
                self._flush_locked()
            _send_whole(self.sock, (data,))
        finally:
            self.lock.release()
        if interrupted is not None:
            raise interrupted

    def leave(self, member: Membership) -> None:
        """Write the PEER_REMOVE of ``member``, after what its burst left buffered; from
        then on, every write in its name raises."""
        with self.lock:
            if member.left:
                return
            if self.out:
                self._flush_locked()
            try:  # (an interrupt before this point: the caller may call leave() again)
                _send_whole(self.sock, (P.encode_frame(Kind.PEER_REMOVE, sender=member.info),))
            finally:
                member.left = True

    # -- bursts ------------------------------------------------------------------------------
    def _burst_locked(self, data: bytes) -> None:
        now = time.monotonic()
        if self.out:
            self.out.append(data)
            self.out_size += len(data)
            if self.out_size >= self.coalesce:
                self._flush_locked()
        elif now - self.last_write < BURST_GAP:
            self.out.append(data)
            self.out_size = len(data)
            self._wake_flusher()
        elif _get_ident() == self.main_ident:
            _send_whole(self.sock, (data,))
        else:
            self.sock.sendall(data)
        self.last_write = now

    def _flush_locked(self) -> None:
        out, self.out, self.out_size = self.out, [], 0
        _send_whole(self.sock, (b"".join(out),))

    def flush(self) -> None:
        """Write whatever a burst left buffered (the flusher does it on its own too)."""
        with self.lock:
            if self.out and not self.ended:
                self._flush_locked()

    def flush_at_exit(self) -> None:
        """The process is ending: write the tail of a burst, within a bound, so that nothing
        sent is lost."""
        if self.ended or not self.lock.acquire(timeout=1.0):
            return
        try:
            if self.out:
                self.sock.settimeout(2.0)
                self._flush_locked()
        except OSError as exc:
            log.warning("could not write the last messages at exit: %s", exc)
        finally:
            self.lock.release()

    def end(self, shutdown_write: bool) -> None:
        """No more writes: write what a burst left (best effort), optionally shut the
        socket's writing side (the bus then sees our end of stream), end the flusher."""
        with self.lock:
            if self.out and not self.ended:
                try:
                    self._flush_locked()
                except OSError:
                    pass
            self.ended = True
            if shutdown_write:
                self.transport.shutdown_write()
        self._flush_wanted.set()

    def stop(self) -> None:
        """The connection has ended: no more writes, the flusher ends (nothing is flushed)."""
        self.ended = True
        self._flush_wanted.set()

    def _wake_flusher(self) -> None:
        if self._flusher is None:
            self._flusher = threading.Thread(target=self._flush_loop, daemon=True,
                                             name="ipcbus-flusher")
            self._flusher.start()
        self._flush_wanted.set()

    def _flush_loop(self) -> None:
        while True:
            self._flush_wanted.wait()
            self._flush_wanted.clear()
            while not self.ended:
                time.sleep(BURST_GAP)  # let the burst go on; its sender flushes full buffers
                with self.lock:
                    if not self.out or self.ended:
                        break
                    if time.monotonic() - self.last_write >= BURST_GAP:
                        try:
                            self._flush_locked()
                        except OSError as exc:
                            log.debug("flush failed: %s", exc)
                        break
            if self.ended:
                return
