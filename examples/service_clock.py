"""A remote service: a clock hosted by one spawned worker, used by two others through proxies.

Run it as is:  python examples/service_clock.py

The main process runs a bridge and hands each worker a pipe. The viewers start first: their
proxies wait until the clock service starts (a call made before would be queued, not lost).
Each viewer says hello with a call (``wrapper.hello(name)``), reads the time, listens to the
clock's "tick" events, and sees the service stop. The clock ticks once every viewer has said
hello, then stops. The same code works over a broker: connect the workers by address.
"""
from __future__ import annotations

import multiprocessing
import threading
import time
from typing import Any

from ipcbus import IpcBusBridge, IpcBusClient, IpcBusService, IpcBusServiceProxy

VIEWERS = 2
TICKS = 5


class Clock:
    """The service's implementation: its public methods are the calls proxies can make."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.greeted: list[str] = []
        self.all_here = threading.Event()

    def now(self) -> str:
        return time.strftime("%H:%M:%S")

    def uptime(self) -> float:
        return round(time.monotonic() - self.started, 3)

    def hello(self, name: str) -> str:
        self.greeted.append(name)
        if len(self.greeted) == VIEWERS:
            self.all_here.set()
        return f"hello {name}, you are viewer #{len(self.greeted)}"


def clock_worker(conn: Any) -> None:
    client = IpcBusClient.create().connect(conn, peer_name="clock")
    clock = Clock()
    service = IpcBusService.create(client, "clock", clock)
    service.start()
    print(f"[clock] service started with calls {service.calls}", flush=True)
    if not clock.all_here.wait(20):
        print("[clock] the viewers did not come", flush=True)
    for n in range(1, TICKS + 1):
        time.sleep(0.1)
        service.send_event("tick", n, clock.now())
    service.stop()
    print("[clock] service stopped", flush=True)
    client.close()


def viewer_worker(conn: Any, name: str) -> None:
    client = IpcBusClient.create().connect(conn, peer_name=name)
    proxy = IpcBusServiceProxy.create(client, "clock", call_timeout=5.0)
    print(f"[{name}] waiting for the clock (started: {proxy.is_started})", flush=True)
    clock = proxy.connect(timeout=20)  # the wrapper: the service's calls as methods
    stopped = threading.Event()
    ticks: list[int] = []

    def on_tick(n: int, at: str) -> None:
        ticks.append(n)
        print(f"[{name}] tick {n} at {at}", flush=True)

    def on_stop(reason: str) -> None:
        print(f"[{name}] the clock stopped: {reason}", flush=True)
        stopped.set()

    clock.on("tick", on_tick)
    proxy.on("service-event-stop", on_stop)
    print(f"[{name}] calls available: {[c for c in dir(clock) if c in proxy.status['calls']]}",
          flush=True)
    print(f"[{name}] it is {clock.now()}; the clock says: {clock.hello(name)!r}", flush=True)
    stopped.wait(20)
    print(f"[{name}] saw {len(ticks)} ticks; is_started={proxy.is_started}", flush=True)
    proxy.close()
    client.close()


def main() -> None:
    ctx = multiprocessing.get_context("spawn")
    with IpcBusBridge.create().connect() as bridge:
        viewers = [ctx.Process(target=viewer_worker, args=(bridge.open_pipe(), f"viewer-{i}"))
                   for i in range(1, VIEWERS + 1)]
        for p in viewers:
            p.start()
        clock = ctx.Process(target=clock_worker, args=(bridge.open_pipe(),))
        clock.start()
        procs = [clock, *viewers]
        for p in procs:
            p.join(30)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        codes = [p.exitcode for p in procs]
    print(f"done: exit codes {codes}")
    if any(codes):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
