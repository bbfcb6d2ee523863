"""The hub decides who a client is (issue 14, Trust): a client writes no frame of its own
before its PEER_ADD is answered, and once the answer carries the hub's record of the peer,
every frame carries exactly that record. The hub here is a hand-driven one on a real Unix
socket, so that the answer can be held and its payload chosen."""
from __future__ import annotations

import os
import queue
import socket
import threading
from typing import Any, Iterator

import pytest

from ipcbus import IpcBusClient, IpcBusConnectionError
from ipcbus import _protocol as P
from ipcbus._decoder import FrameDecoder
from ipcbus._protocol import Kind


class FakeHub:
    """Accepts one client: WELCOME, then hands every frame it reads to the test."""

    def __init__(self, path: str) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(1)
        self.sock: socket.socket | None = None
        self.decoder = FrameDecoder()
        self.frames: queue.Queue[P.Frame] = queue.Queue()
        self.accepted = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.listener.settimeout(20)
        sock, _ = self.listener.accept()
        self.sock = sock
        hello, *rest = self._read_frames()  # (the client waits for the WELCOME: no rest)
        for frame in rest:
            self.frames.put(frame)
        assert hello.kind == Kind.HELLO
        sock.sendall(P.welcome_frame(os.getpid(), True, 1 << 20))
        self.accepted.set()
        while True:
            try:
                for frame in self._read_frames():
                    self.frames.put(frame)
            except (OSError, EOFError):
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # the client's close() waits for this
                except OSError:
                    pass
                return

    def _read_frames(self) -> list[P.Frame]:
        """The frames of the next read(s), in order (a read may hold several)."""
        assert self.sock is not None
        while True:
            ready = self.decoder.frames()
            if ready:
                return ready
            data = self.sock.recv(65536)
            if not data:
                raise EOFError
            self.decoder.feed(data)

    def next(self, timeout: float = 5.0) -> P.Frame:
        return self.frames.get(timeout=timeout)

    def answer(self, frame: P.Frame, payload: Any) -> None:
        assert self.sock is not None
        self.sock.sendall(P.encode_frame(Kind.RESPONSE, target=frame.sender_id, rid=frame.rid,
                                         body=P.pack_payload([True, payload])))

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()
        self.listener.close()
        self.thread.join(5)


@pytest.fixture
def hub(sock_path: str) -> Iterator[FakeHub]:
    h = FakeHub(sock_path)
    try:
        yield h
    finally:
        h.close()


def _record(declared: list[Any], change: str) -> list[Any]:
    if change == "pid":
        return [declared[0], declared[1], "socket", 4242]
    if change == "id":
        return ["hub-given-id", declared[1], "socket", 4242]
    return list(declared)  # an older hub: the answer is its pid only, see below


@pytest.mark.parametrize("change", ["pid", "id", "none", "old-hub"])
@pytest.mark.timeout(30)
def test_no_frame_before_peer_add_is_answered_then_the_hubs_record_only(
        hub: FakeHub, sock_path: str, change: str) -> None:
    c = IpcBusClient.create()
    c.on("before", lambda event, *a: None)  # subscribed only once the hub said yes
    connected: queue.Queue[BaseException | None] = queue.Queue()

    def connect() -> None:
        try:
            c.connect(sock_path, timeout=10)
            connected.put(None)
        except BaseException as exc:  # pragma: no cover - reported below
            connected.put(exc)

    threading.Thread(target=connect, daemon=True).start()
    peer_add = hub.next()
    assert peer_add.kind == Kind.PEER_ADD
    assert peer_add.sender is not None
    declared = list(peer_add.sender)
    # While the answer is held: a new listener is not subscribed yet, a send raises.
    c.on("during", lambda event, *a: None)
    with pytest.raises(IpcBusConnectionError):
        c.send("during", 1)
    assert hub.sock is not None
    hub.sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        hub.sock.recv(1)  # nothing was written after PEER_ADD
    hub.sock.setblocking(True)
    assert hub.frames.empty()
    record = _record(declared, change)
    hub.answer(peer_add, os.getpid() if change == "old-hub"
               else {"pid": os.getpid(), "peer": record})
    assert connected.get(timeout=10) is None
    assert c.peer.id == record[0] and c.peer.process.pid == record[3]
    assert c.peer.process.type == record[2]
    subscriptions = [hub.next() for _ in range(2)]
    c.send("before", 1)
    c.send_to("someone", "x", 2)
    frames = [hub.next() for _ in range(2)]
    c.close()
    frames.append(hub.next())
    assert {f.channel for f in subscriptions} == {"before", "during"}
    assert [f.kind for f in subscriptions + frames] == [Kind.SUBSCRIBE] * 2 + [
        Kind.SEND, Kind.SEND_TO, Kind.PEER_REMOVE]
    assert all(f.sender == record for f in subscriptions + frames)
