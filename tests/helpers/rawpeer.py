"""A hand-driven bus peer for tests: a real socket, the real handshake, frames (and
descriptors) written by hand, frames read with the library's decoder."""
from __future__ import annotations

import array
import collections
import itertools
import os
import socket
import time
from typing import Any

from ipcbus import _protocol as P
from ipcbus._decoder import FrameDecoder
from ipcbus._protocol import Kind

_raw_ids = itertools.count(1)


class RawPeer:
    """A connection driven by hand: the test writes bytes, reads frames, watches for EOF."""

    def __init__(self, sock: socket.socket, ptype: str = "socket") -> None:
        self.sock = sock
        self.ptype = ptype
        self.decoder = FrameDecoder()
        self.frames: collections.deque[P.Frame] = collections.deque()
        self.info: list[Any] | None = None
        self.fds: list[int] = []  # descriptors received, in order (the test closes them)

    @classmethod
    def unix(cls, path: str, timeout: float = 5.0) -> RawPeer:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    def send(self, data: bytes, fds: list[int] | None = None) -> bool:
        """Write (descriptors with the first byte); False if the other side had already
        closed (that may be the point)."""
        try:
            self.sock.settimeout(5.0)
            if fds:
                sent = socket.send_fds(self.sock, [data], fds)
                data = data[sent:]
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def recv_frame(self, timeout: float = 5.0) -> P.Frame:
        deadline = time.monotonic() + timeout
        while not self.frames:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no frame")
            self.sock.settimeout(remaining)
            if self.sock.family == socket.AF_UNIX:
                data, ancillary, _, _ = self.sock.recvmsg(1 << 16, socket.CMSG_SPACE(253 * 4))
                for level, kind, payload in ancillary:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        fds = array.array("i")
                        fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
                        self.fds.extend(fds)
            else:
                data = self.sock.recv(1 << 16)
            if not data:
                raise EOFError("closed")
            self.decoder.feed(data)
            self.frames.extend(self.decoder.frames())
        return self.frames.popleft()

    def expect(self, kind: int, timeout: float = 5.0) -> P.Frame:
        """The next frame of ``kind`` (others are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self.recv_frame(max(deadline - time.monotonic(), 0.001))
            if frame.kind == kind:
                return frame

    def handshake(self) -> dict[str, Any]:
        self.send(P.encode_frame(Kind.HELLO, body=P.hello_body(os.getpid())))
        return P.check_welcome(self.recv_frame())

    def join(self, name: str = "raw") -> list[Any]:
        """Handshake, then become a peer of the bus (PEER_ADD, answered by RESPONSE)."""
        self.handshake()
        info = [f"{os.getpid()}.raw{next(_raw_ids)}", name, self.ptype, os.getpid()]
        self.send(P.encode_frame(Kind.PEER_ADD, sender=info, rid=1))
        answer = self.expect(Kind.RESPONSE)
        assert answer.target == info[0] and answer.rid == 1
        body = P.unpack_control(answer.body)
        value = body[1] if isinstance(body, list) and len(body) == 2 else None
        if isinstance(value, dict) and isinstance(value.get("peer"), list):
            info = list(value["peer"])  # the hub decides who we are (issue 14)
        self.info = info
        return info

    def frame(self, kind: int, channel: str = "", target: str | None = None, rid: int = 0,
              body: bytes = b"", nfds: int = 0) -> bytes:
        return P.encode_frame(kind, channel, self.info, target, rid, body, nfds)

    def wait_eof(self, timeout: float) -> float | None:
        """Read (and drop) until the other side closes: the seconds it took, or None."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    self.sock.setblocking(False)
                    data = self.sock.recv(1 << 16)
                else:
                    self.sock.settimeout(remaining)
                    data = self.sock.recv(1 << 16)
            except (BlockingIOError, socket.timeout):
                return None
            except (ConnectionResetError, BrokenPipeError):
                return time.monotonic() - t0
            if not data:
                return time.monotonic() - t0

    def close(self) -> None:
        self.sock.close()
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()
