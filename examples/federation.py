"""Two brokers on one machine standing for two hosts, one bus over NATS.

Run it as is:  python examples/federation.py   (needs nats-server on PATH or in /usr/sbin,
e.g. ``apt-get install nats-server``, and ``pip install 'ipcbus[nats]'``)

It starts a NATS server on a free loopback port, then two brokers of the bus "shop" linked to
it ("host A" and "host B": on real hosts each runs its own broker with the same URL and bus
name). A worker pool has one member on each host (a group: each order is prepared once), a
stock service runs on host B, and a client on host A sends orders, asks for the stock and
gathers every host's answer with ``request_all``.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from ipcbus import IpcBusBroker, IpcBusClient, IpcBusService, IpcBusServiceProxy


class Stock:
    def count(self, item: str) -> int:
        return {"apple": 12, "pear": 0}.get(item, 0)


def start_nats() -> tuple[subprocess.Popen[bytes], str]:
    server = shutil.which("nats-server") or "/usr/sbin/nats-server"
    if not os.path.exists(server):
        sys.exit("nats-server is not installed (apt-get install nats-server)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([server, "-a", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(500):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            time.sleep(0.01)
    return proc, f"nats://127.0.0.1:{port}"


def main() -> None:
    nats, url = start_nats()
    tmp = tempfile.mkdtemp(prefix="ipcbus-fed-")
    try:
        host_a = IpcBusBroker.create(federation=url, bus="shop").connect(f"{tmp}/a.bus")
        host_b = IpcBusBroker.create(federation=url, bus="shop").connect(f"{tmp}/b.bus")
        with host_a, host_b, \
                IpcBusClient.create().connect(host_a.address, peer_name="till") as till, \
                IpcBusClient.create().connect(host_a.address, peer_name="cook-a") as cook_a, \
                IpcBusClient.create().connect(host_b.address, peer_name="cook-b") as cook_b, \
                IpcBusClient.create().connect(host_b.address, peer_name="store") as store:
            prepared: list[tuple[str, Any]] = []
            lock = threading.Lock()

            def cook(name: str) -> Any:
                def prepare(event: Any, order: int) -> None:
                    with lock:
                        prepared.append((name, order))
                return prepare

            cook_a.on("orders", cook("cook-a"), group="cooks")  # one member per host
            cook_b.on("orders", cook("cook-b"), group="cooks")
            for cook_client, where in ((cook_a, "A"), (cook_b, "B")):
                cook_client.on("hello", lambda event, where=where: event.request.resolve(where))
            service = IpcBusService.create(store, "stock", Stock()).start()

            till.wait_for_listeners("orders", 2, timeout=10.0)  # both hosts' cooks joined
            till.wait_for_listeners("hello", 2, timeout=10.0)
            for order in range(6):
                till.send("orders", order)
            proxy = IpcBusServiceProxy.create(till, "stock", call_timeout=5.0)
            print("apples in stock (asked on host A, served on host B):",
                  proxy.connect(10.0).count("apple"))
            hosts = sorted(r.payload for r in till.request_all("hello", 5.0))
            print("hosts that answered request_all:", hosts)
            deadline = time.monotonic() + 10
            while len(prepared) < 6 and time.monotonic() < deadline:
                time.sleep(0.01)
            print("orders prepared, each once:", sorted(order for _, order in prepared),
                  "by", sorted({name for name, _ in prepared}))
            peers = [p["name"] for p in host_a.query_state()["peers"]]
            print("host A's broker sees:", sorted(peers))
            proxy.close()
            service.stop()
    finally:
        nats.kill()
        nats.wait(5)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
