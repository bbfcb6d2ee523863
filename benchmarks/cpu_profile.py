"""Where a workload's time goes: CPU time per message of each process, for A/B comparisons.

    python benchmarks/cpu_profile.py w1            # request round trips, 100 B
    python benchmarks/cpu_profile.py w2            # a stream of 100 B messages, 1 -> 1
    python benchmarks/cpu_profile.py w4            # 16 MiB messages, a window of 2 (N_W4=60)
    python benchmarks/cpu_profile.py w1g           # w1 through a group of N_GROUP=4 responders
    python benchmarks/cpu_profile.py w1rot         # w1 to N_GROUP=4 plain responders in turn
                                                   # (the requester picks: no group)
    PYTHONPATH=/path/to/other/copy python benchmarks/cpu_profile.py w1   # the same, another copy

Prints p50/p99 (w1), msg/s (w2) or MB/s (w4) and, per process (requester or publisher, broker, responder
or subscriber), user and system CPU time per message from ``/proc/PID/stat`` (Linux). Run the
two sides of a comparison interleaved, several times: the machine is shared.
"""
from __future__ import annotations

import multiprocessing
import os
import sys
import tempfile
import threading
import time
from typing import Any

from ipcbus import IpcBusBroker, IpcBusClient, IpcBusEvent

SIZE_W4 = 16 << 20
N_W1, N_W2, N_W4 = 5000, 300_000, int(os.environ.get("N_W4", "60"))


def cpu(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def responder(address: str, ready: Any, group: str | None = None, channel: str = "echo"
              ) -> None:
    client = IpcBusClient.create().connect(address)
    done = threading.Event()
    client.on(channel, lambda event, x: event.request.resolve(x), group=group)
    client.on("stop", lambda event: done.set())
    client.request("/ipcbus/queryState", 5.0)
    ready.set()
    done.wait(120)
    client.close()


def subscriber(address: str, ready: Any, result: Any) -> None:
    client = IpcBusClient.create().connect(address)
    times: dict[int, float] = {}
    done = threading.Event()

    def on_data(event: IpcBusEvent, seq: int, payload: bytes) -> None:
        times[seq] = time.perf_counter()
        client.send("ack", seq)
        if seq == N_W4 - 1:
            done.set()

    client.on("data", on_data)
    client.request("/ipcbus/queryState", 5.0)
    ready.set()
    done.wait(120)
    result.put((N_W4 - 1) * SIZE_W4 / (times[N_W4 - 1] - times[0]) / 1e6)
    client.close()


def counter(address: str, ready: Any, result: Any) -> None:
    client = IpcBusClient.create().connect(address)
    done = threading.Event()
    times = [0.0, 0.0]
    count = [0]

    def on_data(event: IpcBusEvent, seq: int, payload: bytes) -> None:
        if seq != count[0]:
            raise RuntimeError(f"message {seq} arrived as number {count[0]}")
        count[0] += 1
        if seq == 0:
            times[0] = time.perf_counter()
        elif seq == N_W2 - 1:
            times[1] = time.perf_counter()
            done.set()

    client.on("data", on_data)
    client.request("/ipcbus/queryState", 5.0)
    ready.set()
    done.wait(120)
    result.put((N_W2 - 1) / (times[1] - times[0]))
    client.close()


def report(label: str, pids: list[int], before: list[tuple[float, float]], n: int,
           names: tuple[str, ...], scale: float = 1e6, unit: str = "us") -> None:
    after = [cpu(pid) for pid in pids]
    parts = [f"{name} {(b[0] - a[0]) / n * scale:.0f}+{(b[1] - a[1]) / n * scale:.0f}"
             for name, a, b in zip(names, before, after)]
    print(f"{label}; CPU per message, user+system {unit}: " + ", ".join(parts))


def main() -> None:
    which = sys.argv[1] if len(sys.argv) > 1 else "w1"
    ctx = multiprocessing.get_context("spawn")
    address = tempfile.mktemp(prefix="ipcbus-cpu-", dir="/tmp")
    with IpcBusBroker.create().connect(address) as broker:
        ready = ctx.Event()
        client = IpcBusClient.create().connect(address)
        if which in ("w1", "w1g", "w1rot"):
            members = int(os.environ.get("N_GROUP", "4")) if which != "w1" else 1
            group = "pool" if which == "w1g" else None
            channels = [f"echo{i}" if which == "w1rot" else "echo" for i in range(members)]
            procs = []
            for i in range(members):
                ready = ctx.Event()
                procs.append(ctx.Process(target=responder,
                                         args=(address, ready, group, channels[i])))
                procs[-1].start()
                ready.wait(30)
            proc = procs[0]
            payload = b"x" * 100
            for i in range(500):
                client.request(channels[i % members], 5.0, payload)
            pids = [os.getpid(), broker.process.pid] + [p.pid for p in procs]
            before = [cpu(pid) for pid in pids]
            lat = []
            for i in range(N_W1):
                t = time.perf_counter()
                client.request(channels[i % members], 5.0, payload)
                lat.append(time.perf_counter() - t)
            lat.sort()
            report(f"{which.upper()} p50 {lat[N_W1 // 2] * 1e6:.0f} us, p99"
                   f" {lat[N_W1 * 99 // 100] * 1e6:.0f} us", pids, before, N_W1,
                   ("requester", "broker") + tuple(f"responder{i}" for i in range(members)))
            client.send("stop")
            for other in procs[1:]:
                other.join(30)
        elif which == "w2":
            result = ctx.Queue()
            proc = ctx.Process(target=counter, args=(address, ready, result))
            proc.start()
            ready.wait(30)
            client.request("/ipcbus/queryState", 5.0)
            payload = b"x" * 100
            pids = [os.getpid(), broker.process.pid, proc.pid]
            before = [cpu(pid) for pid in pids]
            send = client.send
            for seq in range(N_W2):
                send("data", seq, payload)
            rate = result.get(timeout=120)
            report(f"W2 {rate / 1000:.0f} k msg/s", pids, before, N_W2,
                   ("publisher", "broker", "subscriber"), scale=1e9, unit="ns")
        else:
            result = ctx.Queue()
            proc = ctx.Process(target=subscriber, args=(address, ready, result))
            proc.start()
            cond = threading.Condition()
            acked = [-1]

            def on_ack(event: IpcBusEvent, seq: int) -> None:
                with cond:
                    acked[0] = seq
                    cond.notify()

            client.on("ack", on_ack)
            client.request("/ipcbus/queryState", 5.0)
            ready.wait(30)
            payload = b"x" * SIZE_W4
            pids = [os.getpid(), broker.process.pid, proc.pid]
            before = [cpu(pid) for pid in pids]
            for seq in range(N_W4):
                with cond:
                    cond.wait_for(lambda: seq - acked[0] <= 2, 30)
                client.send("data", seq, payload)
            rate = result.get(timeout=60)
            report(f"W4 16 MiB {rate:.0f} MB/s", pids, before, N_W4,
                   ("publisher", "broker", "subscriber"))
        proc.join(30)
        client.close()


if __name__ == "__main__":
    main()
