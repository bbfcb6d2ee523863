"""Federation over NATS beside raw nats-py doing the same (issue 20).

    python benchmarks/federation.py                  # about 30 s on 2 vCPUs
    python benchmarks/federation.py --smoke          # tiny counts (what run.py --smoke runs)
    python benchmarks/federation.py --rounds 5 --requests 3000 --messages 50000

One nats-server (Debian's package) on a free loopback port; every role in its own spawned
process. Measured, with the median over the rounds:

* a request round trip, 100 B ``bytes`` answered with itself: a client of broker A asks, a
  client of broker B answers (two brokers linked to the server) — beside a nats-py client
  calling ``request()`` on a subject a nats-py responder answers (p50 and p99 µs);
* a stream of 100 B messages one way, 1 -> 1: a client of A sends, a client of B receives —
  beside a nats-py publisher and subscriber (messages/s at the receiver, first to last).

The goal (issue 20): the federation costs no more than 1.5x raw NATS. Exits 0 with a note
when nats-server or nats-py is missing.
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

PAYLOAD = b"x" * 100


def nats_server_path() -> str | None:
    found = shutil.which("nats-server")
    if found is None and os.path.exists("/usr/sbin/nats-server"):
        found = "/usr/sbin/nats-server"
    return found


def start_server(path: str) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([path, "-a", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), 0.5) as c:
                if c.recv(4) == b"INFO":
                    return proc, f"nats://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.02)
    proc.kill()
    raise RuntimeError("nats-server did not start")


# -- roles (module level: spawned) ----------------------------------------------------------------
def bus_responder(address: str, ready: Any, stop: Any) -> None:
    from ipcbus import IpcBusClient
    client = IpcBusClient.create().connect(address)
    client.on("echo", lambda event, data: event.request.resolve(data))
    client.on("stream", lambda event, data: None)  # replaced per round by the receiver role
    client.sync()
    ready.put("ready")
    stop.get()
    client.close()


def bus_requester(address: str, n: int, out: Any) -> None:
    from ipcbus import IpcBusClient
    client = IpcBusClient.create().connect(address)
    client.wait_for_listeners("echo", 1, timeout=20.0)
    lat = []
    for i in range(n + n // 10):
        t0 = time.perf_counter()
        client.request("echo", 5.0, PAYLOAD)
        if i >= n // 10:  # warm-up first
            lat.append((time.perf_counter() - t0) * 1e6)
    client.close()
    out.put(lat)


def bus_receiver(address: str, n: int, ready: Any, out: Any) -> None:
    from ipcbus import IpcBusClient
    import threading
    client = IpcBusClient.create().connect(address)
    times: list[float] = []
    done = threading.Event()

    def got(event: Any, data: bytes) -> None:
        times.append(time.perf_counter())
        if len(times) == n:
            done.set()

    client.on("stream", got)
    client.sync()
    ready.put("ready")
    done.wait(60.0)
    out.put((len(times), times[-1] - times[0] if len(times) > 1 else 0.0))
    client.close()


def bus_sender(address: str, n: int) -> None:
    from ipcbus import IpcBusClient
    client = IpcBusClient.create().connect(address)
    client.wait_for_listeners("stream", 1, timeout=20.0)
    for _ in range(n):
        client.send("stream", PAYLOAD)
    client.sync()
    client.close()


def nats_responder(url: str, ready: Any, stop: Any) -> None:
    async def main() -> None:
        import nats
        nc = await nats.connect(url)

        async def echo(msg: Any) -> None:
            await msg.respond(msg.data)

        await nc.subscribe("echo", cb=echo)
        await nc.flush()
        ready.put("ready")
        await asyncio.get_running_loop().run_in_executor(None, stop.get)
        await nc.close()
    asyncio.run(main())


def nats_requester(url: str, n: int, out: Any) -> None:
    async def main() -> list[float]:
        import nats
        nc = await nats.connect(url)
        lat = []
        for i in range(n + n // 10):
            t0 = time.perf_counter()
            await nc.request("echo", PAYLOAD, timeout=5.0)
            if i >= n // 10:
                lat.append((time.perf_counter() - t0) * 1e6)
        await nc.close()
        return lat
    out.put(asyncio.run(main()))


def nats_receiver(url: str, n: int, ready: Any, out: Any) -> None:
    async def main() -> tuple[int, float]:
        import nats
        nc = await nats.connect(url)
        times: list[float] = []
        done = asyncio.Event()

        async def got(msg: Any) -> None:
            times.append(time.perf_counter())
            if len(times) == n:
                done.set()

        await nc.subscribe("stream", cb=got, pending_msgs_limit=10 * n)
        await nc.flush()
        ready.put("ready")
        try:
            await asyncio.wait_for(done.wait(), 60.0)
        except asyncio.TimeoutError:
            pass
        await nc.close()
        return len(times), (times[-1] - times[0] if len(times) > 1 else 0.0)
    out.put(asyncio.run(main()))


def nats_sender(url: str, n: int) -> None:
    async def main() -> None:
        import nats
        nc = await nats.connect(url)
        for _ in range(n):
            await nc.publish("stream", PAYLOAD)
        await nc.flush()
        await nc.close()
    asyncio.run(main())


# -- the coordinator --------------------------------------------------------------------------------
def run_rtt(ctx: Any, responder: Any, requester: Any, near: str, far: str, n: int
            ) -> list[float]:
    ready, stop, out = ctx.Queue(), ctx.Queue(), ctx.Queue()
    resp = ctx.Process(target=responder, args=(far, ready, stop), daemon=True)
    resp.start()
    ready.get(timeout=60)
    req = ctx.Process(target=requester, args=(near, n, out), daemon=True)
    req.start()
    lat: list[float] = out.get(timeout=120)
    stop.put("stop")
    for p in (req, resp):
        p.join(10)
        if p.is_alive():
            p.kill()
    return lat


def run_stream(ctx: Any, receiver: Any, sender: Any, near: str, far: str, n: int
               ) -> tuple[int, float]:
    ready, out = ctx.Queue(), ctx.Queue()
    recv = ctx.Process(target=receiver, args=(far, n, ready, out), daemon=True)
    recv.start()
    ready.get(timeout=60)
    send = ctx.Process(target=sender, args=(near, n), daemon=True)
    send.start()
    count, span = out.get(timeout=120)
    for p in (send, recv):
        p.join(10)
        if p.is_alive():
            p.kill()
    return count, span


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny counts, 1 round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--messages", type=int, default=30000)
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds, args.requests, args.messages = 1, 100, 1000
    path = nats_server_path()
    try:
        import nats  # noqa: F401
    except ImportError:
        path = None
    if path is None:
        print("federation benchmark skipped: nats-server or nats-py is not installed")
        return 0
    from ipcbus import IpcBusBroker
    ctx = multiprocessing.get_context("spawn")
    server, url = start_server(path)
    tmp = tempfile.mkdtemp(prefix="ipcfed-", dir="/tmp")
    results: dict[str, list[Any]] = {k: [] for k in ("fed_rtt", "nats_rtt", "fed_stream",
                                                     "nats_stream")}
    try:
        a = IpcBusBroker.create(federation=url, bus="bench").connect(f"{tmp}/a.sock")
        b = IpcBusBroker.create(federation=url, bus="bench").connect(f"{tmp}/b.sock")
        assert isinstance(a.address, str) and isinstance(b.address, str)
        try:
            for _ in range(args.rounds):  # interleaved: federation, then raw NATS, each round
                results["fed_rtt"].append(statistics.median(run_rtt(
                    ctx, bus_responder, bus_requester, a.address, b.address, args.requests)))
                results["nats_rtt"].append(statistics.median(run_rtt(
                    ctx, nats_responder, nats_requester, url, url, args.requests)))
                results["fed_stream"].append(run_stream(
                    ctx, bus_receiver, bus_sender, a.address, b.address, args.messages))
                results["nats_stream"].append(run_stream(
                    ctx, nats_receiver, nats_sender, url, url, args.messages))
        finally:
            a.close()
            b.close()
    finally:
        server.kill()
        server.wait(5)
        shutil.rmtree(tmp, ignore_errors=True)

    def rate(rounds: list[tuple[int, float]]) -> tuple[float, int]:
        rates = [(count - 1) / span for count, span in rounds if span > 0]
        return (statistics.median(rates) if rates else 0.0), min(c for c, _ in rounds)

    fed_rtt, nats_rtt = statistics.median(results["fed_rtt"]), statistics.median(results["nats_rtt"])
    (fed_rate, fed_min), (nats_rate, nats_min) = rate(results["fed_stream"]), rate(
        results["nats_stream"])
    print(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; rounds {args.rounds},"
          f" {args.requests} requests and {args.messages} messages a round")
    print(f"{'':34}{'federation':>12}{'raw nats-py':>14}{'ratio':>8}")
    print(f"{'request round trip 100 B, p50 us':34}{fed_rtt:12.0f}{nats_rtt:14.0f}"
          f"{fed_rtt / nats_rtt:8.2f}")
    print(f"{'1 -> 1 stream 100 B, msg/s':34}{fed_rate:12.0f}{nats_rate:14.0f}"
          f"{(nats_rate / fed_rate if fed_rate else float('inf')):8.2f}")
    print("per round, federation | raw:",
          " ".join(f"{x:.0f}" for x in results["fed_rtt"]), "|",
          " ".join(f"{x:.0f}" for x in results["nats_rtt"]), "us;",
          " ".join(f"{(c - 1) / s / 1e3:.0f}k" for c, s in results["fed_stream"] if s), "|",
          " ".join(f"{(c - 1) / s / 1e3:.0f}k" for c, s in results["nats_stream"] if s),
          "msg/s")
    print(f"(fewest messages received in a round: federation {fed_min}, raw {nats_min} of"
          f" {args.messages}; the ratio is the federation's cost: > 1 is slower)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
