"""Hand a worker one end of a fresh channel, then stream data directly, without the broker.

Run it as is:  python examples/direct_channel.py

The main process creates a channel (a connected duplex Connection pair), posts one end to a
spawned worker over the bus, and the two exchange 1 000 chunks on the private channel. The
broker only carried the handle; it saw none of the streamed bytes.
"""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import tempfile
import threading
import time

from ipcbus import IpcBusBroker, IpcBusClient, IpcBusEvent, create_channel

CHUNKS = 1000
CHUNK = 64 * 1024


def worker(address: str) -> None:
    client = IpcBusClient.create().connect(address, peer_name="worker")
    done = threading.Event()

    def on_stream(event: IpcBusEvent, info: dict) -> None:
        assert event.ports is not None
        (channel,) = event.ports  # our own end, ours to close
        digest = hashlib.sha256()
        for _ in range(info["chunks"]):
            digest.update(channel.recv_bytes())
        channel.send(digest.hexdigest())  # answer on the private channel too
        channel.close()
        done.set()

    client.on("stream", on_stream)
    client.request("/ipcbus/queryState", 2.0)  # our listener is registered on the bus
    client.send("ready")
    done.wait(60)
    client.close()


def main() -> None:
    folder = tempfile.mkdtemp(prefix="ipcbus-direct-")
    address = os.path.join(folder, "bus")
    with IpcBusBroker.create().connect(address) as broker:
        client = IpcBusClient.create().connect(address, peer_name="main")
        ready = threading.Event()
        client.once("ready", lambda event: ready.set())
        client.request("/ipcbus/queryState", 2.0)
        proc = multiprocessing.get_context("spawn").Process(target=worker, args=(address,))
        proc.start()
        ready.wait(30)

        mine, theirs = create_channel()
        client.post_message("stream", {"chunks": CHUNKS}, ports=[theirs])
        theirs.close()  # the worker has its own duplicate

        data = os.urandom(CHUNK)
        expected = hashlib.sha256()
        started = time.perf_counter()
        for _ in range(CHUNKS):
            mine.send_bytes(data)
            expected.update(data)
        answer = mine.recv()
        elapsed = time.perf_counter() - started
        mine.close()
        assert answer == expected.hexdigest(), "the worker saw different bytes"
        size = CHUNKS * CHUNK
        print(f"streamed {size >> 20} MiB to the worker on a private channel in {elapsed:.2f} s"
              f" ({size / elapsed / 1e6:.0f} MB/s); checksums match")
        state = broker.query_state()
        print(f"the broker routed the handle only: {state['connections']} connections,"
              f" {state['queued_bytes']} bytes queued")
        proc.join(10)
        client.close()
    os.rmdir(folder)


if __name__ == "__main__":
    main()
