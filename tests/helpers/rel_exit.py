"""Exit the interpreter with ipcbus clients still connected (used by reliability/test_leaks.py).

    python tests/helpers/rel_exit.py socket PATH     clients of the broker at PATH
    python tests/helpers/rel_exit.py bridge          a bridge, main clients, a spawned pipe child
    python tests/helpers/rel_exit.py own-broker DIR  a broker started here, and its clients

Each mode connects clients, subscribes, sends, leaves a request pending, and returns without
closing anything. The test asserts exit code 0, an empty stderr, and a prompt exit.
"""
from __future__ import annotations

import multiprocessing
import os
import sys
from typing import Any

from ipcbus import IpcBusBridge, IpcBusBroker, IpcBusClient


def pipe_child(conn: Any) -> None:
    """Joins through the bridge pipe, sends, leaves a request pending, returns unclosed."""
    client = IpcBusClient.create().connect(conn, peer_name="pipe-child")
    client.on("exit-hang", lambda event: None)
    client.request("/ipcbus/queryState", 5.0)
    client.request_async("exit-hang", 30.0)
    for i in range(1000):
        client.send("exit-chan", i)


def use(clients: list[IpcBusClient]) -> None:
    clients[0].on("exit-hang", lambda event: None)
    clients[0].on("exit-chan", lambda event, i: None)
    clients[1].request("/ipcbus/queryState", 5.0)
    clients[1].request_async("exit-hang", 30.0)  # pending at exit
    for i in range(1000):
        clients[2].send("exit-chan", i)


def main() -> None:
    mode = sys.argv[1]
    if mode == "socket":
        path = sys.argv[2]
        use([IpcBusClient.create().connect(path, peer_name=f"exit-{i}") for i in range(3)])
    elif mode == "bridge":
        bridge = IpcBusBridge.create().connect()
        use([IpcBusClient.create().connect(peer_name=f"main-{i}") for i in range(3)])
        child = multiprocessing.get_context("spawn").Process(target=pipe_child,
                                                             args=(bridge.open_pipe(),))
        child.start()
        child.join(30)
        assert child.exitcode == 0, child.exitcode
    elif mode == "own-broker":
        broker = IpcBusBroker.create().connect(os.path.join(sys.argv[2], "own.bus"))
        use([IpcBusClient.create().connect(broker.address, peer_name=f"own-{i}")
             for i in range(3)])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    print("exiting", flush=True)


if __name__ == "__main__":
    main()
