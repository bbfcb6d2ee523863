"""Node processes of electron-common-ipc 16.0.4 for the interop tests (tests/node/agent.js).

Every wait is bounded: a line not read within its deadline fails the test, and every process
started is killed at the end.
"""
from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import os
import queue
import shutil
import subprocess
import threading
import time
from typing import Any, Iterator

import pytest

NODE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "node")
AGENT = os.path.join(NODE_DIR, "agent.js")
NODE = shutil.which("node")


def require_node() -> str:
    """The node executable; skip when there is none, fail when the package is not installed."""
    if NODE is None:
        pytest.skip("node is not installed: the electron-common-ipc interop tests need Node 16+")
    if not os.path.isdir(os.path.join(NODE_DIR, "node_modules", "electron-common-ipc")):
        pytest.fail("electron-common-ipc is not installed: run `npm ci --prefix tests/node`")
    return NODE


def tag(value: Any) -> Any:
    """A Python value as the agent's JSON lines carry it."""
    if isinstance(value, bytes):
        return {"$bytes": base64.b64encode(value).decode()}
    if isinstance(value, dt.datetime):
        return {"$date": int(value.timestamp() * 1000)}
    if isinstance(value, (list, tuple)):
        return [tag(v) for v in value]
    if isinstance(value, dict):
        return {k: tag(v) for k, v in value.items()}
    return value


def untag(value: Any) -> Any:
    if isinstance(value, list):
        return [untag(v) for v in value]
    if isinstance(value, dict):
        if "$bytes" in value:
            return base64.b64decode(value["$bytes"])
        if "$date" in value:
            return dt.datetime.fromtimestamp(value["$date"] / 1000, dt.timezone.utc)
        if "$undefined" in value:
            return None
        if "$error" in value:
            return f"Error: {value['$error']}"
        return {k: untag(v) for k, v in value.items()}
    return value


class NodeProcess:
    """``node agent.js MODE ADDRESS``, its stdout read line by line on a thread."""

    def __init__(self, mode: str, address: str | int = "", timeout: float = 10.0) -> None:
        node = require_node()
        self.proc = subprocess.Popen([node, AGENT, mode, str(address)], cwd=NODE_DIR,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, bufsize=1)
        self.lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._ids = 0
        self.ready = self.next_line(timeout)
        if "ready" not in self.ready:
            raise AssertionError(f"node {mode} did not start: {self.ready}")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            msg = json.loads(line)
            if "event" in msg or "serviceEvent" in msg:
                self.events.put(msg)
            else:
                self.lines.put(msg)
        self.lines.put(None)

    def next_line(self, timeout: float = 10.0) -> dict[str, Any]:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"node said nothing in {timeout} s") from None
        if line is None:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise AssertionError(f"node exited ({self.proc.poll()}): {err}")
        return line

    def __call__(self, op: str, timeout: float = 10.0, **fields: Any) -> Any:
        """Run one command; its result (AssertionError if the agent failed)."""
        self._ids += 1
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"id": self._ids, "op": op, **fields}) + "\n")
        self.proc.stdin.flush()
        line = self.next_line(timeout)
        assert line.get("id") == self._ids, line
        if "error" in line:
            raise AssertionError(f"node {op} failed: {line['error']}")
        return line["ok"]

    def event(self, timeout: float = 5.0) -> dict[str, Any]:
        """The next message a Node listener received (or service event a proxy emitted)."""
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"node received nothing in {timeout} s") from None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(5)
        finally:
            for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
                if stream is not None:
                    stream.close()


@contextlib.contextmanager
def node_client(path: str, name: str = "n1") -> Iterator[NodeProcess]:
    """A Node process with one client named ``name`` connected to the bus at ``path``."""
    proc = NodeProcess("client", path)
    try:
        proc("connect", name=name)
        yield proc
    finally:
        proc.close()


def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    """Poll ``predicate`` (bounded)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.01)
