"""Failures reach the caller at once (SPEC 0.2 "Requests: failures"), across real processes.

A responder whose listener raises (``SystemExit`` and ``KeyboardInterrupt`` included: they are
contained), or whose answer cannot be encoded (``resolve(object())`` raises in the listener),
tells the hub; the request fails as soon as every receiver has failed or left, with
``IpcBusRequestError`` whose ``.response.err`` is "TypeName: message", well before its
timeout. A receiver that fails while another may still answer does not end the request.
Through the broker, the bridge (a pipe child) and a bridge linked to a broker.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterator

import pytest

from ipcbus import IpcBusBridge, IpcBusBroker, IpcBusClient, IpcBusRequestError

import helpers
from helpers import elapsed, sync, wait_until

READY_TIMEOUT = 30.0
TIMEOUT = 10.0  # the requests' timeout: a failure must come long before it


class Boom(Exception):
    pass


def _respond(address: Any, mode: str, ready_q: Any, stop: Any) -> None:
    """A responder on "job": "raise" (Boom), "zero" (ZeroDivisionError), "exit"
    (SystemExit), "interrupt" (KeyboardInterrupt), "unencodable" (``resolve(object())``
    uncaught), "echo" (answers its pid), "both" (a raising listener and an answering one in
    the same client), "raise-then-answer" (raises after answering)."""
    client = IpcBusClient.create().connect(address, peer_name=mode)

    def listener(event: Any, *args: Any) -> None:
        req = event.request
        if mode == "raise":
            raise Boom(f"job {args[0]} failed")
        if mode == "zero":
            1 / 0
        if mode == "exit":
            raise SystemExit(3)
        if mode == "interrupt":
            raise KeyboardInterrupt
        if mode == "unencodable":
            req.resolve(object())
        if mode in ("echo", "raise-then-answer"):
            req.resolve(os.getpid())
        if mode == "raise-then-answer":
            raise Boom("after the answer")

    client.on("job", listener)
    if mode == "both":
        client.on("job", lambda event, *args: event.request.resolve(os.getpid()))
    sync(client)
    ready_q.put(os.getpid())
    stop.poll(60)
    client.close()


class Children(helpers.Children):
    def respond(self, address: Any, mode: str) -> int:
        q = self.ctx.Queue()
        self.start(_respond, address, mode, q, self.stop)
        pid: int = q.get(timeout=READY_TIMEOUT)
        return pid


@pytest.fixture
def children(ctx: Any) -> Iterator[Children]:
    kids = Children(ctx)
    try:
        yield kids
    finally:
        kids.close()


def _fails_at_once(client: IpcBusClient, err: str) -> None:
    with elapsed() as t, pytest.raises(IpcBusRequestError) as ei:
        client.request("job", TIMEOUT, 7)
    assert t[0] < TIMEOUT / 4, t[0]
    assert not isinstance(ei.value, TimeoutError)
    assert ei.value.response is not None
    assert ei.value.response.err == err
    assert err in str(ei.value)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode,err", [
    ("raise", "Boom: job 7 failed"),
    ("zero", "ZeroDivisionError: division by zero"),
    ("exit", "SystemExit: 3"),
    ("interrupt", "KeyboardInterrupt"),
    ("unencodable", "TypeError: cannot send this value on the bus:"
                    " can not serialize 'object' object"),
])
def test_a_raising_responder_fails_the_request_at_once(
        broker: IpcBusBroker, children: Children, clients: Callable[..., IpcBusClient],
        mode: str, err: str) -> None:
    children.respond(broker.address, mode)
    c = clients(broker.address)
    _fails_at_once(c, err)
    # contained: the responder's process is still there and fails the next one the same way
    _fails_at_once(c, err)
    assert broker.query_state()["pending_requests"] == 0


@pytest.mark.timeout(60)
def test_a_raising_responder_does_not_end_a_request_another_answers(
        broker: IpcBusBroker, children: Children, clients: Callable[..., IpcBusClient]) -> None:
    children.respond(broker.address, "raise")
    echo = children.respond(broker.address, "echo")
    c = clients(broker.address)
    for i in range(10):  # whichever of the two the broker reaches first
        assert c.request("job", TIMEOUT, i).payload == echo
    assert broker.query_state()["dropped"]["forged_answers"] == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["both", "raise-then-answer"])
def test_a_listener_that_raises_next_to_an_answer_does_not_fail_it(
        broker: IpcBusBroker, children: Children, clients: Callable[..., IpcBusClient],
        mode: str) -> None:
    pid = children.respond(broker.address, mode)
    c = clients(broker.address)
    assert c.request("job", TIMEOUT, 1).payload == pid


@pytest.mark.timeout(60)
def test_every_receiver_failing_fails_the_request_with_a_reason(
        broker: IpcBusBroker, children: Children, clients: Callable[..., IpcBusClient]) -> None:
    children.respond(broker.address, "raise")
    children.respond(broker.address, "zero")
    c = clients(broker.address)
    with elapsed() as t, pytest.raises(IpcBusRequestError) as ei:
        c.request("job", TIMEOUT, 7)
    assert t[0] < TIMEOUT / 4
    assert ei.value.response is not None
    assert ei.value.response.err in ("Boom: job 7 failed", "ZeroDivisionError: division by zero")


@pytest.mark.timeout(60)
def test_the_asynchronous_form_fails_at_once_too(
        broker: IpcBusBroker, children: Children, clients: Callable[..., IpcBusClient]) -> None:
    children.respond(broker.address, "raise")
    c = clients(broker.address)
    fut = c.request_async("job", TIMEOUT, 3)
    exc = fut.exception(timeout=TIMEOUT / 4)
    assert isinstance(exc, IpcBusRequestError) and not isinstance(exc, TimeoutError)
    assert exc.response is not None and exc.response.err == "Boom: job 3 failed"


@pytest.mark.timeout(90)
def test_failures_cross_the_bridge_and_its_link(
        broker: IpcBusBroker, children: Children, clients: Callable[..., IpcBusClient],
        sock_path: str) -> None:
    bridge = IpcBusBridge.create()
    try:
        bridge.connect(broker.address)
        children.respond(bridge.open_pipe(), "raise")  # a pipe child of the bridge
        at_bridge = clients(None)  # the bridge of this process
        at_broker = clients(broker.address)
        sync(at_bridge)
        for c in (at_bridge, at_broker):
            _fails_at_once(c, "Boom: job 7 failed")
        echo = children.respond(broker.address, "echo")
        for c in (at_bridge, at_broker):
            assert c.request("job", TIMEOUT, 1).payload == echo
        wait_until(lambda: broker.query_state()["pending_requests"] == 0)
    finally:
        bridge.close()
