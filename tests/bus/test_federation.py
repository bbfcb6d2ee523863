"""Federation over NATS (SPEC "Several hosts"): brokers of one bus name on a real nats-server.

Every test starts its own nats-server on a free loopback port (``helpers.nats``) and two (or
three) brokers, each a process of its own, linked to it. Starting a broker pair costs about a
second, so the smoke test (a receiver in a child process, broadcasts in order, send_to and a
request across) runs under every start method (``ctx``) and the other tests under the
default one, with their clients in the test process (the brokers, the server and the clients
are still separate processes). Skipped, with the reason, only where nats-server or nats-py
is not installed (CI installs both).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, Iterator

import pytest

from ipcbus import (IpcBusBroker, IpcBusClient, IpcBusConnectionError, IpcBusRequestError,
                    IpcBusService, IpcBusServiceProxy)
from ipcbus.errors import IpcBusRequestTimeoutError
from ipcbus.testing import temporary_socket_path

from helpers import Collector, pid_of, wait_until
from helpers.nats import NatsServer, NatsSpy, free_port, skip_reason

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))


@pytest.fixture
def nats_server() -> Iterator[NatsServer]:
    server = NatsServer()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def federated(url: str, *buses: str, **options: Any) -> Iterator[list[IpcBusBroker]]:
    """One broker per bus name in ``buses``, all linked to the NATS server at ``url``."""
    with contextlib.ExitStack() as stack:
        brokers = []
        for bus in buses:
            path = stack.enter_context(temporary_socket_path())
            broker = IpcBusBroker.create(federation=url, bus=bus, **options).connect(path)
            stack.callback(broker.close)
            brokers.append(broker)
        yield brokers


@pytest.fixture
def pair(nats_server: NatsServer) -> Iterator[list[IpcBusBroker]]:
    with federated(nats_server.url, "t", "t") as brokers:
        yield brokers


def remote(broker: IpcBusBroker) -> dict[str, Any]:
    state: dict[str, Any] = broker.query_state(5.0)["federation"]["remote_brokers"]
    return state


def _receiver(path: str, q: Any, stop: Any) -> None:
    """A child on the second broker: reports the broadcasts and send_to it gets, answers."""
    client = IpcBusClient.create().connect(path, peer_name="far")
    got = Collector()
    client.on("hello", got)
    client.on("ask", lambda event, x: event.request.resolve(x * 2))
    client.sync()
    q.put(("ready", client.peer.id))
    got.wait(21, timeout=20.0)
    q.put(("got", [args for args in got.args]))
    stop.poll(30)
    client.close()


@pytest.mark.timeout(60)
def test_smoke_across_two_brokers(ctx: Any, reporters: Any, pair: list[IpcBusBroker]) -> None:
    children, reports, q = reporters
    a, b = pair
    children.start(_receiver, b.address, q, children.stop)
    far_id = reports.next("ready")[1]
    with IpcBusClient.create().connect(a.address, peer_name="near") as near:
        assert near.wait_for_listeners("ask", 1, timeout=10.0) >= 1  # (its last listener)
        for i in range(20):
            near.send("hello", i)
        near.send_to(far_id, "hello", "direct")
        assert near.request("ask", 5.0, 21).payload == 42
        got = reports.next("got")[1]
    assert got == [(i,) for i in range(20)] + [("direct",)]  # one sender's order is kept


def test_no_remote_interest_no_nats_traffic(nats_server: NatsServer,
                                            pair: list[IpcBusBroker]) -> None:
    a, b = pair
    spy = NatsSpy(nats_server.port, "ipcbus.t.c.>")
    try:
        with IpcBusClient.create().connect(a.address) as near, \
                IpcBusClient.create().connect(b.address) as far:
            local, shared = Collector(), Collector()
            near.on("local", local)
            far.on("shared", shared)
            near.wait_for_listeners("shared", 1, timeout=10.0)
            near.send("lonely", 1)  # nobody listens
            near.send("local", 2)  # only this broker listens
            near.send("shared", 3)
            shared.wait(1)
            local.wait(1)
            with pytest.raises(IpcBusRequestError):  # no listener anywhere: never sent
                near.request("lonely", 2.0)
            wait_until(lambda: spy.seen())
            assert spy.seen() == ["ipcbus.t.c.shared"]
            state = a.query_state(5.0)["federation"]
            assert state["interest"] == ["local"] and state["connected"]
    finally:
        spy.close()


def test_two_bus_names_on_one_server_are_isolated(nats_server: NatsServer) -> None:
    with federated(nats_server.url, "x", "y", "x") as (a, other, c):
        with IpcBusClient.create().connect(a.address) as near, \
                IpcBusClient.create().connect(other.address) as stranger, \
                IpcBusClient.create().connect(c.address) as far:
            got_far, got_stranger = Collector(), Collector()
            far.on("news", got_far)
            stranger.on("news", got_stranger)
            near.wait_for_listeners("news", 1, timeout=10.0)
            near.send("news", "x only")
            got_far.wait(1)
            stranger.sync()
            assert got_stranger.items == []
            assert list(remote(other)) == []
            names = {p["name"] for p in other.query_state(5.0)["peers"]}
            assert len(names) == 1  # its own client only


def test_requests_across(pair: list[IpcBusBroker]) -> None:
    a, b = pair
    with IpcBusClient.create().connect(a.address) as near, \
            IpcBusClient.create().connect(b.address) as far, \
            IpcBusClient.create().connect(a.address) as neighbour:
        far.on("who", lambda event: event.request.resolve("far"))
        neighbour.on("who", lambda event: event.request.resolve("neighbour"))
        far.on("silent", lambda event: None)
        far.on("boom", lambda event: 1 / 0)
        near.wait_for_listeners("boom", 1, timeout=10.0)
        assert near.wait_for_listeners("who", 2, timeout=10.0) == 2
        assert near.request("who", 5.0).payload in ("far", "neighbour")  # the first wins
        assert near.request_to(far.peer.id, "who", 5.0).payload == "far"
        t0 = time.monotonic()
        with pytest.raises(IpcBusRequestError) as failed:
            near.request("boom", 5.0)  # the far listener raised: at once, with its error
        assert failed.value.response is not None
        assert "ZeroDivisionError" in str(failed.value.response.err)
        with pytest.raises(IpcBusRequestError):
            near.request("nobody", 5.0)
        assert time.monotonic() - t0 < 2.0
        with pytest.raises(IpcBusRequestTimeoutError):
            near.request("silent", 0.3)
        answers = near.request_all("who", 5.0)
        assert sorted(r.payload for r in answers) == ["far", "neighbour"]
        assert a.query_state(5.0)["federation"]["requests_out"] == 0


def test_groups_across_brokers_run_each_job_once(pair: list[IpcBusBroker]) -> None:
    a, b = pair
    with IpcBusClient.create().connect(a.address) as boss, \
            IpcBusClient.create().connect(a.address) as near_worker, \
            IpcBusClient.create().connect(b.address) as far_worker:
        done_near, done_far = Collector(), Collector()
        near_worker.on("jobs", done_near, group="pool")
        far_worker.on("jobs", done_far, group="pool")
        far_worker.on("work", lambda event, x: event.request.resolve(("far", x)), group="pool")
        near_worker.on("work", lambda event, x: event.request.resolve(("near", x)),
                       group="pool")
        boss.wait_for_listeners("jobs", 2, timeout=10.0)
        boss.wait_for_listeners("work", 2, timeout=10.0)
        for i in range(20):
            boss.send("jobs", i)
        wait_until(lambda: len(done_near.items) + len(done_far.items) >= 20)
        jobs = sorted(args[0] for args in done_near.args + done_far.args)
        assert jobs == list(range(20))  # each once, across the federation
        assert done_near.items and done_far.items  # both members had work
        sides = {boss.request("work", 5.0, i).payload[0] for i in range(6)}
        assert sides == {"near", "far"}
        near_worker.sync()
        far_worker.sync()
        assert len(done_near.items) + len(done_far.items) == 20


class Clock:
    def now(self) -> str:
        return "tick"


def test_services_and_state_across(pair: list[IpcBusBroker]) -> None:
    a, b = pair
    with IpcBusClient.create().connect(b.address, peer_name="host") as host, \
            IpcBusClient.create().connect(a.address, peer_name="user") as user:
        service = IpcBusService.create(host, "clock", Clock()).start()
        wait_until(lambda: a.is_service_available("clock"))
        proxy = IpcBusServiceProxy.create(user, "clock", call_timeout=5.0)
        assert proxy.connect(5.0).now() == "tick"
        state = a.query_state(5.0)
        names = {p["name"] for p in state["peers"]}
        assert {"host", "user"} <= names
        (far_side,) = remote(a).values()
        assert far_side["services"] == ["clock"] and host.peer.id in far_side["peers"]
        service.stop()
        wait_until(lambda: not a.is_service_available("clock"))
        proxy.close()


class Where:
    def __init__(self, here: str) -> None:
        self.here = here

    def where(self) -> str:
        return self.here


def test_a_pooled_service_across_brokers(pair: list[IpcBusBroker]) -> None:
    """A service hosted by a group with a member on each broker: each call runs once."""
    a, b = pair
    with IpcBusClient.create().connect(a.address) as near_host, \
            IpcBusClient.create().connect(b.address) as far_host, \
            IpcBusClient.create().connect(a.address) as user:
        near = IpcBusService.create(near_host, "where", Where("A"), group="pool").start()
        wait_until(lambda: a.is_service_available("where") and b.is_service_available("where"))
        far = IpcBusService.create(far_host, "where", Where("B"), group="pool").start()
        wait_until(lambda: len(a.query_state(5.0)["services"]["where"]) == 2)
        proxy = IpcBusServiceProxy.create(user, "where", call_timeout=5.0)
        calc = proxy.connect(5.0)
        assert {calc.where() for _ in range(8)} == {"A", "B"}
        proxy.close()
        far.stop()
        near.stop()


def test_large_bytes_cross_inline(tmp_path: Any) -> None:
    """Above the shared-memory threshold, bytes reach a remote listener inline."""
    conf = tmp_path / "nats.conf"
    conf.write_text("max_payload: 4194304\n")
    server = NatsServer("-c", str(conf))
    try:
        with federated(server.url, "t", "t") as (a, b), \
                IpcBusClient.create().connect(a.address) as near, \
                IpcBusClient.create().connect(b.address) as far:
            far.on("big", lambda event, data: event.request.resolve(
                hashlib.sha256(data).hexdigest()))
            near.wait_for_listeners("big", 1, timeout=10.0)
            data = os.urandom(3 << 19)  # 1.5 MiB: through the sender's arena locally
            assert near.request("big", 10.0, data).payload == hashlib.sha256(data).hexdigest()
    finally:
        server.stop()


def test_nats_outage_keeps_the_local_bus(nats_server: NatsServer,
                                         pair: list[IpcBusBroker]) -> None:
    a, b = pair
    with IpcBusClient.create().connect(a.address) as near, \
            IpcBusClient.create().connect(a.address) as neighbour, \
            IpcBusClient.create().connect(b.address) as far:
        held: list[Any] = []
        far.on("slow", lambda event: held.append(event))
        far.on("ping", lambda event: event.request.resolve("far"))
        neighbour.on("local", lambda event: event.request.resolve("here"))
        near.wait_for_listeners("slow", 1, timeout=10.0)
        pending = near.request_async("slow", 20.0)
        wait_until(lambda: held)
        nats_server.stop()
        with pytest.raises(IpcBusRequestError) as failed:
            pending.result(10.0)
        assert "NATS" in str(failed.value)
        assert near.request("local", 5.0).payload == "here"  # the local bus goes on
        wait_until(lambda: not a.query_state(5.0)["federation"]["connected"])
        with pytest.raises(IpcBusRequestError):
            near.request("ping", 5.0)  # the far side is gone: at once
        nats_server.start()
        wait_until(lambda: a.query_state(5.0)["federation"]["connected"], timeout=15.0)
        near.wait_for_listeners("ping", 1, timeout=15.0)  # announced again
        assert near.request("ping", 5.0).payload == "far"


def test_a_broker_killed_leaves_the_bus(pair: list[IpcBusBroker]) -> None:
    """A broker that dies says no bye: the others notice its silence (heartbeats on ctl)."""
    a, b = pair
    with IpcBusClient.create().connect(a.address) as near:
        far = IpcBusClient.create().connect(b.address)
        held: list[Any] = []
        far.on("slow", lambda event: held.append(event))
        near.wait_for_listeners("slow", 1, timeout=10.0)
        pending = near.request_async("slow", 30.0)
        wait_until(lambda: held)
        os.kill(pid_of(b.process), signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(IpcBusRequestError):
            pending.result(15.0)
        assert time.monotonic() - t0 < 10.0
        wait_until(lambda: not remote(a), timeout=10.0)
        assert a.query_state(5.0)["federation"]["connected"]
        far.close()


def test_credentials(tmp_path: Any) -> None:
    server = NatsServer("--user", "ipc", "--pass", "s3cret")
    try:
        with pytest.raises(IpcBusConnectionError, match="(?i)authorization"):
            with federated(f"nats://ipc:wrong@127.0.0.1:{server.port}", "t"):
                pass
        url = f"nats://ipc:s3cret@127.0.0.1:{server.port}"
        with federated(url, "t", "t") as (a, b):
            assert "s3cret" not in str(a.query_state(5.0)["federation"])
            with IpcBusClient.create().connect(a.address) as near, \
                    IpcBusClient.create().connect(b.address) as far:
                far.on("ask", lambda event: event.request.resolve("ok"))
                near.wait_for_listeners("ask", 1, timeout=10.0)
                assert near.request("ask", 5.0).payload == "ok"
    finally:
        server.stop()
    with pytest.raises(IpcBusConnectionError, match="federation"):
        with federated(f"nats://127.0.0.1:{server.port}", "t"):  # nothing listens there
            pass
    token = NatsServer("--auth", "t0ken")
    try:
        with pytest.raises(IpcBusConnectionError, match="(?i)authorization"):
            with federated(f"nats://wrong@127.0.0.1:{token.port}", "t"):
                pass
        with federated(f"nats://t0ken@127.0.0.1:{token.port}", "t") as (a,):
            assert a.query_state(5.0)["federation"]["connected"]
    finally:
        token.stop()


def _certificates(where: Any) -> tuple[str, str, str]:
    """A CA and a server certificate for 127.0.0.1 (openssl's command line)."""
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=where, check=True, capture_output=True,
                       timeout=60)
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "2", "-subj", "/CN=ipcbus-test-ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=127.0.0.1")
    (where / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf")
    return str(where / "ca.pem"), str(where / "server.pem"), str(where / "server.key")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_tls(tmp_path: Any) -> None:
    ca, cert, key = _certificates(tmp_path)
    conf = tmp_path / "tls.conf"
    conf.write_text(f'tls {{\n  cert_file: "{cert}"\n  key_file: "{key}"\n}}\n')
    server = NatsServer("-c", str(conf))
    try:
        url = f"tls://127.0.0.1:{server.port}"
        with pytest.raises(IpcBusConnectionError, match="federation"):
            with federated(url, "t"):  # the server's certificate is not trusted
                pass
        with federated(url, "t", "t", federation_options={"tls_ca": ca}) as (a, b), \
                IpcBusClient.create().connect(a.address) as near, \
                IpcBusClient.create().connect(b.address) as far:
            far.on("ask", lambda event: event.request.resolve("over tls"))
            near.wait_for_listeners("ask", 1, timeout=10.0)
            assert near.request("ask", 5.0).payload == "over tls"
    finally:
        server.stop()


def test_a_cluster_of_two_servers(tmp_path: Any) -> None:
    """Each broker on its own server of a NATS cluster: NATS routes between them."""
    c1, c2 = free_port(), free_port()
    one = NatsServer("--cluster_name", "c", "--cluster", f"nats://127.0.0.1:{c1}",
                     "--routes", f"nats://127.0.0.1:{c2}")
    two = NatsServer("--cluster_name", "c", "--cluster", f"nats://127.0.0.1:{c2}",
                     "--routes", f"nats://127.0.0.1:{c1}")
    try:
        with federated(one.url, "t") as (a,), federated(f"{two.url},{one.url}", "t") as (b,), \
                IpcBusClient.create().connect(a.address) as near, \
                IpcBusClient.create().connect(b.address) as far:
            got = Collector()
            far.on("news", got)
            near.wait_for_listeners("news", 1, timeout=15.0)
            near.send("news", "routed")
            got.wait(1)
    finally:
        one.stop()
        two.stop()


@pytest.mark.timeout(60)
def test_the_example_runs_as_is() -> None:
    example = pathlib.Path(__file__).parents[2] / "examples" / "federation.py"
    out = subprocess.run([sys.executable, str(example)], capture_output=True, text=True,
                         timeout=50)
    assert out.returncode == 0, out.stderr
    assert "each once: [0, 1, 2, 3, 4, 5]" in out.stdout
    assert "['A', 'B']" in out.stdout


def test_descriptors_and_large_payloads_stay_local(tmp_path: Any) -> None:
    conf = tmp_path / "nats.conf"
    conf.write_text("max_payload: 65536\n")
    server = NatsServer("-c", str(conf))
    try:
        with federated(server.url, "t", "t") as (a, b), \
                IpcBusClient.create().connect(a.address) as near, \
                IpcBusClient.create().connect(b.address) as far:
            got = Collector()
            far.on("stream", got)
            far.on("big", lambda event, data: event.request.resolve(len(data)))
            near.wait_for_listeners("big", 1, timeout=10.0)
            r, w = os.pipe()
            try:
                with pytest.raises((IpcBusRequestError, IpcBusConnectionError),
                                   match="descriptors to a listener on another host"):
                    near.post_message("stream", "port", ports=[r])
            finally:
                os.close(r)
                os.close(w)
            assert near.request("big", 5.0, b"x" * 1000).payload == 1000
            with pytest.raises(IpcBusRequestError, match="limit"):
                near.request("big", 5.0, b"x" * 100_000)  # over the server's max_payload
    finally:
        server.stop()
