"""The ipcbus demo: the greeting sample of electron-common-ipc's README, with processes.

Workers live here, not in ``__main__``, because ``spawn`` children cannot import a package's
``__main__`` module.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import tempfile
import threading
import time

from .broker import IpcBusBroker
from ._types import IpcBusEvent
from .client import IpcBusClient
from .errors import IpcBusRequestError, IpcBusTimeoutError


def demo_worker(address: str, name: str, answers: bool) -> None:
    """A worker: greets back, answers requests (or not), and leaves when told."""
    client = IpcBusClient.create().connect(address, peer_name=name)
    done = threading.Event()

    def on_greeting(event: IpcBusEvent, message: str) -> None:
        assert event.sender is not None
        if event.request is not None:
            event.request.resolve(f"thanks to you, dear {event.sender.name}, from {name}")
        else:
            client.send("greeting-reply", f"{name} got {message!r} from {event.sender.name}")

    def on_question(event: IpcBusEvent, question: str) -> None:
        if answers and event.request is not None:
            event.request.resolve(f"{name} says 42")
        # the others keep silent: the asker's request will time out

    client.on("greeting", on_greeting)
    client.on("question", on_question)
    client.once("bye", lambda event: done.set())
    client.send("ready", name)
    done.wait(30)
    client.close()


def run_demo(args: argparse.Namespace | None = None) -> int:
    """Start a broker and three workers that greet each other; print what happens."""
    folder = tempfile.mkdtemp(prefix="ipcbus-demo-")
    try:
        return _demo(os.path.join(folder, "bus"))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _demo(address: str) -> int:
    ctx = multiprocessing.get_context("spawn")
    out = print
    with IpcBusBroker.create().connect(address) as broker:
        out(f"broker: pid {broker.process.pid}, listening on {address}")
        main = IpcBusClient.create().connect(address, peer_name="main")
        ready: list[str] = []
        replies: list[str] = []
        cond = threading.Condition()

        def on_ready(event: IpcBusEvent, name: str) -> None:
            with cond:
                ready.append(name)
                cond.notify_all()

        def on_reply(event: IpcBusEvent, text: str) -> None:
            with cond:
                replies.append(text)
                cond.notify_all()

        main.on("ready", on_ready)
        main.on("greeting-reply", on_reply)
        workers = [ctx.Process(target=demo_worker, args=(address, f"worker-{i}", i == 1),
                               daemon=True) for i in (1, 2, 3)]
        for w in workers:
            w.start()
        with cond:
            if not cond.wait_for(lambda: len(ready) == len(workers), 30):
                out("workers did not start in time")
                return 1
        out(f"workers ready: {', '.join(sorted(ready))}")

        main.send("greeting", "hello everyone")
        with cond:
            cond.wait_for(lambda: len(replies) == len(workers), 10)
        for text in sorted(replies):
            out(f"  broadcast reply: {text}")

        response = main.request("greeting", 2.0, "hello, whoever answers first")
        assert response.event.sender is not None
        out(f"request -> first answer from {response.event.sender.name}: {response.payload!r}")

        state = main.request("/ipcbus/queryState", 2.0).payload
        second = next(p for p in state["peers"] if p["name"] == "worker-2")
        response = main.request_to(second["id"], "greeting", 2.0, "hello, worker-2 only")
        out(f"request_to worker-2 -> {response.payload!r}")

        response = main.request("question", 1.0, "the meaning of life?")
        out(f"request 'question' -> {response.payload!r} (worker-1 answers, the others stay silent)")

        started = time.monotonic()
        try:
            main.request_to(next(p["id"] for p in state["peers"] if p["name"] == "worker-3"),
                            "question", 0.5, "worker-3, are you there?")
        except IpcBusTimeoutError as exc:
            out(f"request_to worker-3 timed out after {time.monotonic() - started:.2f} s: {exc}")

        started = time.monotonic()
        try:
            main.request("nobody-listens", 5.0)
        except IpcBusRequestError as exc:
            out(f"request with no listener failed after {1000 * (time.monotonic() - started):.1f}"
                f" ms (not 5 s): {exc}")

        state = broker.query_state()
        out(f"broker state: {len(state['peers'])} peers, channels {sorted(state['channels'])}")
        main.send("bye")
        for w in workers:
            w.join(10)
        out(f"workers exited with codes {[w.exitcode for w in workers]}")
        main.close()
    ok = all(w.exitcode == 0 for w in workers)
    out("demo finished" if ok else "demo FAILED")
    return 0 if ok else 1
