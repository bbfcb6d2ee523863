"""The Python half of examples/node_bus.js: a Python peer on an electron-common-ipc bus.

    node examples/node_bus.js /tmp/app.bus     # the Node app: broker, "clock" service
    python examples/node_bus.py /tmp/app.bus   # this script

It calls the Node "clock" service, asks Node on "/greet", hosts the "py-math" service that the
Node side then calls, answers Node's request on "/py-answers", and leaves when Node says bye.
"""
from __future__ import annotations

import math
import sys
import threading

from ipcbus import IpcBusClient, IpcBusService, IpcBusServiceProxy


class PyMath:
    def hypot(self, a: float, b: float) -> float:
        return math.hypot(a, b)


def main(path: str) -> None:
    client = IpcBusClient.create().connect(f"ecipc:{path}", peer_name="python-worker")
    bye = threading.Event()
    client.on("/bye", lambda event, text: bye.set())
    client.on("/py-answers", lambda event, q: event.request.resolve({"answer": q["question"]}))
    IpcBusService.create(client, "py-math", PyMath()).start()

    clock = IpcBusServiceProxy.create(client, "clock").connect(timeout=5)
    print("python: clock.now() =", clock.now(), "| clock.add(2, 3) =", clock.add(2, 3))
    greeting = client.request("/greet", 2.0, "python")
    print("python: /greet ->", greeting.payload, "| from", greeting.event.sender)
    client.send("/hello", "hi from Python", b"\x00\x01\x02")
    if not bye.wait(10):
        raise SystemExit("python: Node did not say bye")
    print("python: Node said bye")
    client.close()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/app.bus")
