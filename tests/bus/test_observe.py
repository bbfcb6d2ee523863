"""Looking into a running bus: the spy, the state and spy CLIs, the traffic log, statistics."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import threading
from typing import Any

import pytest

from ipcbus import IpcBusBroker, IpcBusClient
from ipcbus.spy import IpcBusSpy, TrafficRecord

from helpers import Collector, sync, wait_until


class Records:
    def __init__(self) -> None:
        self.items: list[TrafficRecord] = []
        self.cond = threading.Condition()

    def __call__(self, record: TrafficRecord) -> None:
        with self.cond:
            self.items.append(record)
            self.cond.notify_all()

    def wait(self, count: int, timeout: float = 5.0) -> list[TrafficRecord]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.items) >= count, timeout), self.items
            return list(self.items)


def talk(alice: IpcBusClient, bob: IpcBusClient) -> None:
    """Some traffic between two peers: a broadcast, a send_to, a request, another channel."""
    alice.send("greeting", "hello", {"n": 1})
    alice.send_to(bob.peer, "greeting", "just you")
    assert alice.request("add", 2.0, 2, 3).payload == 5
    alice.send("other", b"xyz")
    sync(alice)


@pytest.fixture
def pair(broker: IpcBusBroker, clients: Any) -> tuple[IpcBusClient, IpcBusClient]:
    alice = clients(broker.address, peer_name="alice")
    bob = clients(broker.address, peer_name="bob")
    bob.on("greeting", lambda event, *args: None)
    bob.on("add", lambda event, a, b: event.request.resolve(a + b))
    sync(bob)
    return alice, bob


@pytest.mark.timeout(30)
def test_spy_sees_the_traffic_of_other_peers(broker: IpcBusBroker, pair: Any) -> None:
    alice, bob = pair
    everything, greetings = Records(), Records()
    with IpcBusSpy(everything).connect(broker.address), \
            IpcBusSpy(greetings, channel="greet*").connect(broker.address):
        talk(alice, bob)
        got = everything.wait(6)
        kinds = [(r.kind, r.channel, r.sender_name) for r in got]
        assert kinds[:5] == [("send", "greeting", "alice"), ("send_to", "greeting", "alice"),
                             ("request", "add", "alice"), ("response", "add", "bob"),
                             ("send", "other", "alice")]
        send_to = got[1]
        assert send_to.target == bob.peer.id and send_to.args() == ["just you"]
        assert got[0].args() == ["hello", {"n": 1}] and got[0].sender_id == alice.peer.id
        assert got[3].preview() == "resolved 5" and got[3].target == alice.peer.id
        assert got[2].rid == got[3].rid > 0
        assert all(r.size > 0 for r in got)
        assert [r.channel for r in greetings.wait(2)] == ["greeting", "greeting"]
        assert broker.query_state()["spies"] == 2
    # spies that left leave no trace
    wait_until(lambda: broker.query_state()["spies"] == 0)
    names = {p["name"] for p in broker.query_state()["peers"]}
    assert names == {"alice", "bob"}
    talk(alice, bob)  # and the bus goes on without them


@pytest.mark.timeout(30)
def test_a_run_of_messages_gives_a_record_each(broker: IpcBusBroker, pair: Any) -> None:
    alice, bob = pair
    records = Records()
    got = Collector()
    bob.on("burst", got)
    sync(bob)
    with IpcBusSpy(records, channel="burst").connect(broker.address):
        for i in range(500):  # sent back to back: they cross the broker as runs
            alice.send("burst", i)
        got.wait(500)
        items = records.wait(500)
    assert [r.args() for r in items] == [[i] for i in range(500)]


def _run_cli(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ipcbus", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.timeout(60)
def test_state_cli(broker: IpcBusBroker, pair: Any) -> None:
    alice, bob = pair
    talk(alice, bob)
    out = _run_cli("state", str(broker.address))
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "PEERS" in text and "CHANNELS" in text and "SERVICES" in text
    assert "alice" in text and "bob" in text and "ipcbus-state" not in text
    bob_line = next(line for line in text.splitlines() if line.strip().startswith("bob"))
    assert "add, greeting" in bob_line and "socket" in bob_line
    out = _run_cli("state", str(broker.address), "--json")
    assert out.returncode == 0, out.stderr
    state = json.loads(out.stdout)
    peers = {p["name"]: p for p in state["peers"]}
    assert set(peers) == {"alice", "bob"}
    assert peers["alice"]["sent"]["messages"] >= 4
    assert state["channels"] == {"greeting": 1, "add": 1}
    assert state["channel_stats"]["greeting"]["messages"] == 2


@pytest.mark.timeout(60)
def test_spy_cli(broker: IpcBusBroker, pair: Any) -> None:
    alice, bob = pair
    proc = subprocess.Popen([sys.executable, "-m", "ipcbus", "spy", str(broker.address),
                             "--json", "--channel", "greeting", "--count", "2",
                             "--seconds", "20"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: broker.query_state()["spies"] == 1, timeout=15)
        talk(alice, bob)
        stdout, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    lines = [json.loads(line) for line in stdout.splitlines()]
    assert [(r["kind"], r["channel"], r["sender_name"]) for r in lines] == [
        ("send", "greeting", "alice"), ("send_to", "greeting", "alice")]
    assert lines[0]["preview"] == "['hello', {'n': 1}]"
    # the plain format: one line per message
    proc = subprocess.Popen([sys.executable, "-m", "ipcbus", "spy", str(broker.address),
                             "--count", "1", "--seconds", "20"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: broker.query_state()["spies"] == 1, timeout=15)
        alice.send("other", "plain")
        stdout, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    (line,) = stdout.splitlines()
    assert " send " in line and "'other'" in line and "alice(" in line and "['plain']" in line


@pytest.mark.timeout(60)
@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_traffic_log_has_a_row_per_routed_message(tmp_path: Any, sock_path: str,
                                                  suffix: str) -> None:
    path = str(tmp_path / f"traffic{suffix}")
    with IpcBusBroker.create(traffic_log=path).connect(sock_path) as broker:
        alice = IpcBusClient.create().connect(broker.address, peer_name="alice")
        bob = IpcBusClient.create().connect(broker.address, peer_name="bob")
        try:
            bob.on("greeting", lambda event, *args: None)
            bob.on("add", lambda event, a, b: event.request.resolve(a + b))
            sync(bob)
            talk(alice, bob)
            for i in range(100):
                alice.send("burst", i)
            sync(alice)
        finally:
            alice.close()
            bob.close()
    # the broker flushes and closes its log when it stops
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f)) if suffix == ".csv" else [json.loads(x) for x in f]
    rows = [r for r in rows if r["channel"] != "/ipcbus/queryState"]  # the tests' syncs
    kinds = [(r["kind"], r["channel"]) for r in rows]
    assert kinds[:5] == [("send", "greeting"), ("send_to", "greeting"), ("request", "add"),
                         ("response", "add"), ("send", "other")]
    assert kinds[5:] == [("send", "burst")] * 100
    response = rows[3]
    assert float(response["rtt_ms"]) > 0 and response["sender_name"] == "bob"
    assert all(int(r["size"]) > 0 and r["sender_id"] for r in rows)


@pytest.mark.timeout(60)
def test_ipcbus_log_environment_variable(tmp_path: Any, sock_path: str) -> None:
    path = str(tmp_path / "env.jsonl")
    env = {**os.environ, "IPCBUS_LOG": path}
    proc = subprocess.Popen([sys.executable, "-m", "ipcbus", "broker", sock_path], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and "listening" in proc.stdout.readline()
        with IpcBusClient.create().connect(sock_path) as client:
            client.on("x", lambda event, *args: None)
            sync(client)
            client.send("x", 1)
            sync(client)
        proc.send_signal(2)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    rows = [json.loads(line) for line in open(path)]
    assert ("send", "x") in [(r["kind"], r["channel"]) for r in rows]


@pytest.mark.timeout(30)
def test_statistics_in_query_state(broker: IpcBusBroker, pair: Any) -> None:
    alice, bob = pair
    talk(alice, bob)
    bob.on("silent", lambda event: None)  # bob answers nothing on "silent"
    sync(bob)
    future = alice.request_async("silent", 10.0)
    state = broker.query_state()
    peers = {p["name"]: p for p in state["peers"]}
    assert peers["alice"]["sent"]["messages"] >= 5 and peers["alice"]["sent"]["bytes"] > 0
    assert peers["alice"]["pending_requests"] == 1
    assert peers["bob"]["connection"]["delivered_messages"] >= 3
    assert peers["bob"]["connection"]["queued_bytes"] == 0
    stats = state["channel_stats"]
    assert stats["greeting"] == {"messages": 2, "bytes": stats["greeting"]["bytes"],
                                 "subscribers": 1}
    assert stats["other"]["subscribers"] == 0 and stats["other"]["messages"] == 1
    assert not future.done()
