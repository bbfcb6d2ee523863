"""Whatever the Python side can emit, electron-common-ipc's Node broker (and a Node client
listening to it) never crashes (issue 19): hypothesis drives the public API with arbitrary
channels, arguments, targets and peer names; after each example, a round trip through the
broker to the Node process must still work."""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipcbus import IpcBusClient, IpcBusError

from helpers.node import NodeProcess

CHANNELS = ["/fz/a", "/ipcbus/service/call/fz", "/ipcbus/service/event/fz",
            "/electron-ipc-bus/ipc-service/fz/call", "/ping", "/ipcbus/queryState",
            "_/undefined/_", "_target_proc_{}_target_x"]
leaves = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
          | st.binary(max_size=20) | st.datetimes() | st.sets(st.integers(), max_size=2)
          | st.just("_/undefined/_") | st.just({"type": "Date", "data": 1}))
values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=6) | st.integers(), inner, max_size=4),
                      max_leaves=12)
ops = st.tuples(st.sampled_from(["send", "send_to", "request", "request_to", "on", "off",
                                 "post_message"]),
                st.sampled_from(CHANNELS) | st.text(max_size=40),
                st.lists(values, max_size=4),
                st.none() | st.sampled_from(["NODE"]) | st.text(max_size=12))


@pytest.fixture(scope="module")
def bus() -> Iterator[tuple[str, NodeProcess, NodeProcess]]:
    d = tempfile.mkdtemp(prefix="ecf-", dir="/tmp")
    path = os.path.join(d, "bus.sock")
    broker = NodeProcess("broker", path)
    node = NodeProcess("client", path)
    try:
        node("connect", name="n1")
        for channel in CHANNELS[:4]:
            node("on", client="n1", channel=channel)
        node("service", client="n1", name="fz")
        yield f"ecipc:{path}", broker, node
    finally:
        node.close()
        broker.close()
        shutil.rmtree(d, ignore_errors=True)


def _listener(event: Any, *args: Any) -> None:
    if event.request is not None:
        event.request.resolve(args)


@pytest.mark.timeout(180)
@given(st.text(max_size=30), st.lists(ops, min_size=1, max_size=6))
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
def test_node_broker_survives_anything_python_sends(
        bus: tuple[str, NodeProcess, NodeProcess], name: str,
        operations: list[tuple[str, str, list[Any], str | None]]) -> None:
    address, broker, node = bus
    node_id = node("connect", name="probe")["peer"]["id"]
    try:
        client = IpcBusClient.create().connect(address, peer_name=name)
    except (TypeError, ValueError):
        client = IpcBusClient.create().connect(address)  # a name that cannot cross
    try:
        for op, channel, args, target in operations:
            target = node_id if target == "NODE" else target
            try:
                if op == "send":
                    client.send(channel, *args)
                elif op == "send_to":
                    client.send_to(target or node_id, channel, *args)
                elif op == "request":
                    client.request_async(channel, 0.05, *args)
                elif op == "request_to":
                    client.request_async(channel, 0.05, *args)
                    client.request_to(target or node_id, channel, 0.05, *args)
                elif op == "on":
                    client.on(channel, _listener)
                elif op == "off":
                    client.off(channel, _listener)
                else:
                    client.post_message(channel, args)
            except (TypeError, ValueError, IpcBusError):
                pass  # refused at the call: nothing was sent
        # the broker routes, the Node client decodes: both alive, the bus still works
        assert client.request("/ping", 10, "alive").payload == ["alive"]
        assert broker.alive() and node.alive()
    finally:
        client.close()
