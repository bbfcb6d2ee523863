"""Python and Node peers on one electron-common-ipc broker, side by side (issue 19).

    npm ci --prefix tests/node          # electron-common-ipc 16.0.4, once
    python benchmarks/ecipc.py          # about a minute on 2 vCPUs
    python benchmarks/ecipc.py --rounds 3 --requests 2000 --messages 20000

One Node broker (``CreateIpcBusBroker``) in its own process; every role in its own process
(Node roles: benchmarks/ecipc_node.js; Python roles: spawned). Measured, with the median over
the rounds:

* request round trip, 100 B ``Buffer``/``bytes`` payload, answered with it: Node → Node,
  Python → Node, Node → Python, Python → Python (p50 and p99 µs, at the requester);
* a stream of 1 KiB and 64 KiB messages one way: Node → Node, Python → Node, Node → Python
  (messages/s and MB/s at the receiver, from its first message to its last);
* then the same through a Python broker that serves both protocols
  (``IpcBusBroker.create(ecipc=True)``; Python peers connect to it natively).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NODE_ROLE = os.path.join(ROOT, "benchmarks", "ecipc_node.js")
AGENT = os.path.join(ROOT, "tests", "node", "agent.js")


class Node:
    """A Node process of ecipc_node.js (or the test agent's broker), its stdout as JSON lines."""

    def __init__(self, script: str, *args: str) -> None:
        node = shutil.which("node")
        if node is None:
            raise SystemExit("node is not installed")
        self.proc = subprocess.Popen([node, script, *args], stdout=subprocess.PIPE, text=True)
        self.ready = self.line()

    def line(self, timeout: float = 60.0) -> dict[str, Any]:
        result: list[str] = []
        reader = threading.Thread(target=lambda: result.append(
            self.proc.stdout.readline() if self.proc.stdout else ""), daemon=True)
        reader.start()
        reader.join(timeout)
        if not result or not result[0]:
            raise RuntimeError(f"node {self.proc.args!r} said nothing (exit {self.proc.poll()})")
        return json.loads(result[0])  # type: ignore[no-any-return]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        if self.proc.stdout:
            self.proc.stdout.close()


# -- Python roles (spawned) ---------------------------------------------------------------------
def _py_respond(address: str, channel: str, ready: Connection, stop: Connection) -> None:
    from ipcbus import IpcBusClient
    client = IpcBusClient.create().connect(address, peer_name="py-respond")
    client.on(channel, lambda event, x: event.request.resolve(x))
    client.on(channel + "/ping", lambda event: event.request.resolve(True))
    ready.send(True)
    stop.recv()
    client.close()


def _py_sink(address: str, channel: str, count: int, ready: Connection) -> None:
    from ipcbus import IpcBusClient
    client = IpcBusClient.create().connect(address, peer_name="py-sink")
    done = threading.Event()
    state = {"seen": 0, "t0": 0.0, "t1": 0.0}

    def on_message(event: Any, seq: int, payload: bytes) -> None:
        if state["seen"] == 0:
            state["t0"] = time.perf_counter()
        state["seen"] += 1
        if state["seen"] == count:
            state["t1"] = time.perf_counter()
            done.set()

    client.on(channel, on_message)
    client.on(channel + "/ping", lambda event: event.request.resolve(True))
    ready.send(True)
    done.wait(120)
    ready.send(state["t1"] - state["t0"] if done.is_set() else None)
    client.close()


def _ping(client: Any, channel: str) -> None:
    """Wait until the receiver's subscription is in the broker (a Node broker times a request
    with no listener out; ours fails it at once)."""
    from ipcbus import IpcBusRequestError
    for _ in range(1000):
        try:
            client.request(channel + "/ping", 1.0)
            return
        except IpcBusRequestError:
            time.sleep(0.01)
    raise RuntimeError("the receiver never subscribed")


def _py_request(address: str, channel: str, n: int) -> tuple[float, float]:
    from ipcbus import IpcBusClient
    client = IpcBusClient.create().connect(address, peer_name="py-request")
    try:
        _ping(client, channel)
        payload = b"x" * 100
        for _ in range(min(200, n)):
            client.request(channel, 5.0, payload)
        times = []
        for _ in range(n):
            t0 = time.perf_counter_ns()
            client.request(channel, 5.0, payload)
            times.append((time.perf_counter_ns() - t0) / 1000)
        times.sort()
        return times[n // 2], times[int(n * 0.99)]
    finally:
        client.close()


def _py_source(address: str, channel: str, count: int, size: int) -> None:
    from ipcbus import IpcBusClient
    client = IpcBusClient.create().connect(address, peer_name="py-source")
    try:
        _ping(client, channel)
        payload = b"x" * size
        for seq in range(count):
            client.send(channel, seq, payload)
    finally:
        client.close()


# -- measurements -------------------------------------------------------------------------------
def _receiver(lang: str, node_args: list[str], target: Any, args: tuple[Any, ...],
              ready: Connection) -> tuple[Node | None, Any]:
    """Start the receiving role: a Node process, or a spawned Python one that says ready."""
    if lang == "node":
        return Node(NODE_ROLE, *node_args), None
    child = multiprocessing.get_context("spawn").Process(target=target, args=args)
    child.start()
    if not ready.poll(60):
        raise RuntimeError(f"python {node_args[0]} did not start")
    ready.recv()
    return None, child


def rtt(where: str, requester: str, responder: str, n: int, prefix: str = "ecipc:"
        ) -> tuple[float, float]:
    ctx = multiprocessing.get_context("spawn")
    address = f"{prefix}{where}"  # Python peers: "ecipc:" on a Node broker, none on ours
    channel = f"/bench/rtt/{requester}-{responder}"
    stop_r, stop_w = ctx.Pipe(duplex=False)
    ready_r, ready_w = ctx.Pipe(duplex=False)
    node_responder, child = None, None
    try:
        node_responder, child = _receiver(responder, ["respond", where, channel], _py_respond,
                                          (address, channel, ready_w, stop_r), ready_r)
        if requester == "node":
            req = Node(NODE_ROLE, "request", where, channel, str(n))
            try:
                res = req.line(120)
            finally:
                req.close()
            return float(res["p50"]), float(res["p99"])
        return _py_request(address, channel, n)
    finally:
        stop_w.send(True)
        if child is not None:
            child.join(10)
        if node_responder is not None:
            node_responder.close()
        for end in (stop_r, stop_w, ready_r, ready_w):
            end.close()


def stream(where: str, sender: str, receiver: str, count: int, size: int,
           prefix: str = "ecipc:") -> float:
    """Seconds from the receiver's first message to its last."""
    ctx = multiprocessing.get_context("spawn")
    address = f"{prefix}{where}"  # Python peers: "ecipc:" on a Node broker, none on ours
    channel = f"/bench/stream/{sender}-{receiver}-{size}"
    parent, child_end = ctx.Pipe()
    sink_node, child = None, None
    try:
        sink_node, child = _receiver(receiver, ["sink", where, channel, str(count)], _py_sink,
                                     (address, channel, count, child_end), parent)
        if sender == "node":
            src = Node(NODE_ROLE, "source", where, channel, str(count), str(size))
        else:
            src = None
            _py_source(address, channel, count, size)
        try:
            if sink_node is not None:
                seconds = float(sink_node.line(180)["seconds"])
            else:
                if not parent.poll(180):
                    raise RuntimeError("python sink did not finish")
                seconds = parent.recv()
        finally:
            if src is not None:
                src.close()
        if seconds is None:
            raise RuntimeError("the sink missed messages")
        return seconds
    finally:
        if child is not None:
            child.join(10)
        if sink_node is not None:
            sink_node.close()
        parent.close()
        child_end.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--messages", type=int, default=20000)
    args = parser.parse_args()
    print(f"$ python benchmarks/ecipc.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"machine: {os.cpu_count()} CPUs, {platform.platform()}, Python"
          f" {platform.python_version()}, node {subprocess.run(['node', '--version'], text=True, capture_output=True).stdout.strip()},"
          f" electron-common-ipc 16.0.4; load {os.getloadavg()[0]:.2f}")
    d = tempfile.mkdtemp(prefix="ecbench-", dir="/tmp")
    where = os.path.join(d, "bus.sock")
    try:
        for title, prefix in [("the Node broker", "ecipc:"),
                              ("the Python broker (IpcBusBroker.create(ecipc=True))", "")]:
            if prefix:
                broker: Any = Node(AGENT, "broker", where)
            else:
                from ipcbus import IpcBusBroker
                where = os.path.join(d, "py.sock")
                broker = IpcBusBroker.create(ecipc=True).connect(where)
            try:
                measure(title, where, prefix, args)
            finally:
                broker.close()
    finally:
        shutil.rmtree(d, ignore_errors=True)


def measure(title: str, where: str, prefix: str, args: argparse.Namespace) -> None:
    print(f"\nrequest round trip through {title}, 100 B (median of rounds)")
    print(f"{'requester -> responder':<26}{'p50 µs':>10}{'p99 µs':>10}")
    for requester, responder in [("node", "node"), ("python", "node"), ("node", "python"),
                                 ("python", "python")]:
        runs = [rtt(where, requester, responder, args.requests, prefix)
                for _ in range(args.rounds)]
        p50 = statistics.median(r[0] for r in runs)
        p99 = statistics.median(r[1] for r in runs)
        print(f"{requester + ' -> ' + responder:<26}{p50:>10.0f}{p99:>10.0f}", flush=True)
    print(f"\nstream one way through {title} (median of rounds)")
    print(f"{'sender -> receiver':<26}{'size':>8}{'msg/s':>12}{'MB/s':>10}")
    for size, count in [(1024, args.messages), (65536, max(200, args.messages // 20))]:
        for sender, receiver in [("node", "node"), ("python", "node"), ("node", "python")]:
            secs = statistics.median(stream(where, sender, receiver, count, size, prefix)
                                     for _ in range(args.rounds))
            rate = (count - 1) / secs
            print(f"{sender + ' -> ' + receiver:<26}{size:>8}{rate:>12.0f}"
                  f"{rate * size / 1e6:>10.1f}", flush=True)


if __name__ == "__main__":
    main()
