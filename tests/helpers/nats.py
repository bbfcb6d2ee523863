"""A nats-server of the test's own on a free loopback port, and a raw NATS subscriber.

``NatsServer`` starts ``nats-server`` (the Debian package; CI installs it), waits until it
accepts connections, and stops it by pid (``helpers.pid_of``); ``restart()`` brings it back
on the same port (a NATS outage). ``NatsSpy`` is a subscriber speaking the NATS text protocol
on a plain socket (no asyncio in the test): it records the subjects of what NATS carries, so
a test can tell that a message never reached NATS.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time

from helpers.processes import pid_of

NATS_SERVER = shutil.which("nats-server") or (
    "/usr/sbin/nats-server" if os.path.exists("/usr/sbin/nats-server") else None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class NatsServer:
    """One nats-server process on 127.0.0.1 (``args``: more command-line options)."""

    def __init__(self, *args: str) -> None:
        assert NATS_SERVER is not None, "nats-server is not installed"
        self.port = free_port()
        self.args = list(args)
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        assert NATS_SERVER is not None
        self.proc = subprocess.Popen([NATS_SERVER, "-a", "127.0.0.1", "-p", str(self.port),
                                      *self.args], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.5) as s:
                    if s.recv(4).startswith(b"INFO"):
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nats-server did not start on port {self.port}")
            time.sleep(0.02)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.kill(pid_of(proc), signal.SIGKILL)
        proc.wait(10)

    def restart(self) -> None:
        self.stop()
        self.start()


class NatsSpy:
    """A raw NATS subscriber to ``subject`` (e.g. ``ipcbus.>``): ``subjects`` lists what it
    received."""

    def __init__(self, port: int, subject: str) -> None:
        self.subjects: list[str] = []
        self._lock = threading.Lock()
        self._sock = socket.create_connection(("127.0.0.1", port), 5.0)
        self._file = self._sock.makefile("rb")
        self._file.readline()  # INFO
        self._sock.sendall(b'CONNECT {"verbose":false,"headers":true}\r\n'
                           + f"SUB {subject} 1\r\nPING\r\n".encode())
        while self._file.readline().strip() != b"PONG":
            pass
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            while True:
                line = self._file.readline()
                if not line:
                    return
                parts = line.split()
                if not parts:
                    continue
                if parts[0] == b"PING":
                    self._sock.sendall(b"PONG\r\n")
                elif parts[0] in (b"MSG", b"HMSG"):
                    self._file.read(int(parts[-1]) + 2)
                    with self._lock:
                        self.subjects.append(parts[1].decode())
        except (OSError, ValueError):
            return

    def seen(self) -> list[str]:
        with self._lock:
            return list(self.subjects)

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._thread.join(2.0)


def skip_reason() -> str | None:
    """Why the federation tests cannot run here (None: they can)."""
    if NATS_SERVER is None:
        return "nats-server is not installed (apt-get install nats-server; CI installs it)"
    try:
        import nats  # noqa: F401
    except ImportError:
        return "nats-py is not installed (pip install 'ipcbus[nats]')"
    return None
