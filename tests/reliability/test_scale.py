"""Scale (docs/reliability.md, section 5): 1 000 connections and 1 000 peers receive a
broadcast; what an idle connection costs; connection storms leave no state; silent TCP
connections and running out of descriptors do not stop the broker.

Real processes and sockets, no mocked transport. Every test has a hard timeout; waits are
bounded (events, queues, ``wait_until``); children are module-level functions, joined with a
bound and killed in a ``finally``.
"""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import re
import resource
import signal
import socket
import struct
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from ipcbus import IpcBusBroker, IpcBusClient, IpcBusService
from ipcbus import _protocol as P
from ipcbus._decoder import FrameDecoder
from ipcbus._protocol import Kind

from helpers import elapsed, pid_of, sync, wait_until
from helpers.bus import join_pipelined, tcp_address
from helpers.measure import MiB, fd_count, report, rss, settle
from helpers.rawpeer import RawPeer  # a hand-driven peer on a raw socket


@pytest.fixture
def many_fds() -> Iterator[int]:
    """Raise this process's descriptor limit (a broker started afterwards inherits it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 8192 if hard == resource.RLIM_INFINITY else min(hard, 8192)
    if want < 2200:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is too low for 1 000 connections")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    try:
        yield want
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.timeout(120)
def test_1000_connections_receive_a_broadcast(sock_path: str, many_fds: int) -> None:
    """1 000 connections at once (raw sockets of this process that do the handshake, become
    peers and subscribe: 1 000 connections need 1 000 processes otherwise, since a process's
    clients share one) all receive one broadcast; closing them all at once leaves the
    broker's state clean."""
    n = 1000
    with IpcBusBroker.create().connect(sock_path) as broker:
        bpid = broker.process.pid
        rss_idle, fds_idle = rss(bpid), fd_count(bpid)
        sender = IpcBusClient.create().connect(sock_path, peer_name="sender")
        peers: list[RawPeer] = []
        try:
            with elapsed() as t_join:
                peers = join_pipelined(sock_path, n, "scale")
            sync(sender)
            state = broker.query_state()
            assert state["connections"] == n + 1 and len(state["peers"]) == n + 1
            assert state["channels"] == {"scale": n}
            rss_busy, fds_busy = rss(bpid), fd_count(bpid)
            with elapsed() as t_bcast:
                sender.send("scale", "to everyone")
                for peer in peers:
                    frame = peer.expect(Kind.SEND)
                    assert frame.channel == "scale"
                    assert P.unpack_payload(frame.body) == ["to everyone"]
            with elapsed() as t_close:
                for peer in peers:
                    peer.close()
                wait_until(lambda: broker.query_state()["connections"] == 1, timeout=10)
            state = broker.query_state()
            report("1000 connections", join_s=round(t_join[0], 2),
                   broadcast_all_received_s=round(t_bcast[0], 3),
                   close_all_clean_s=round(t_close[0], 2),
                   broker_rss_idle_MiB=round(rss_idle / MiB, 1),
                   broker_rss_1000_MiB=round(rss_busy / MiB, 1),
                   broker_fds=(fds_idle, fds_busy, fd_count(bpid)))
            assert [p["name"] for p in state["peers"]] == ["sender"]
            assert state["channels"] == {} and state["pending_requests"] == 0
            assert fd_count(bpid) == fds_idle + 1
        finally:
            for peer in peers:
                peer.close()
            sender.close()


@pytest.mark.timeout(120)
def test_idle_connections_cost_the_broker_little_memory(sock_path: str, many_fds: int) -> None:
    """1 000 idle connections (handshake, peer, subscription; then silence): the broker's RSS
    per connection, now that a connection's read buffer starts at FrameDecoder.INITIAL
    (16 KiB) instead of a preallocated 256 KiB chunk. Then a burst on each connection grows
    its buffer, and the hub's periodic trim gives it back once the connections are idle."""
    n = 1000
    with IpcBusBroker.create().connect(sock_path) as broker:
        bpid = broker.process.pid
        settle()
        rss_idle = rss(bpid)
        peers: list[RawPeer] = []
        try:
            peers = join_pipelined(sock_path, n, "idle")
            settle()
            rss_joined = rss(bpid)
            per_connection = (rss_joined - rss_idle) / n
            # a burst on 100 of them: ~200 KB of small broadcasts (to nobody) in one write
            for peer in peers[:100]:
                peer.send(b"".join(peer.frame(Kind.SEND, "nobody", body=P.pack_payload([i]))
                                   for i in range(5000)))
            assert broker.query_state(10.0)["connections"] == n
            settle()
            rss_burst = rss(bpid)
            threading.Event().wait(2.5)  # two trim intervals of idleness
            settle()
            rss_trimmed = rss(bpid)
            report("1000 idle connections", broker_rss_idle_MiB=round(rss_idle / MiB, 1),
                   broker_rss_1000_MiB=round(rss_joined / MiB, 1),
                   per_connection_KiB=round(per_connection / 1024, 1),
                   after_a_200KB_burst_on_100_MiB=round(rss_burst / MiB, 1),
                   after_trim_MiB=round(rss_trimmed / MiB, 1))
            assert per_connection < 64 * 1024, per_connection  # was ~260 KiB
        finally:
            for peer in peers:
                peer.close()


@pytest.mark.timeout(60)
def test_decoder_buffer_starts_small_grows_under_a_burst_and_shrinks_when_idle() -> None:
    """FrameDecoder's reusable buffer: INITIAL (16 KiB) at first; a read that fills it makes
    it grow fourfold up to CHUNK (two full reads reach 256 KiB); a frame that does not fit
    grows it too (up to CHUNK; larger frames still get a buffer of their own); trim() brings
    it back to INITIAL after an interval of small reads only. Frames decode the same all
    along."""
    init, chunk = FrameDecoder.INITIAL, FrameDecoder.CHUNK
    assert init == 16 * 1024 and chunk == 256 * 1024
    a, b = socket.socketpair()
    try:
        dec = FrameDecoder(merge_runs=True)
        assert dec.buffer_size == init
        frames = [P.encode_frame(Kind.SEND, "c", ["p", "p", "socket", 1],
                                 body=P.pack_payload([i, b"x" * 100])) for i in range(20_000)]
        data = b"".join(frames)
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        threading.Thread(target=a.sendall, args=(data,), daemon=True).start()
        sizes, got = [], 0
        while got < len(frames):
            n = b.recv_into(dec.get_buffer())
            dec.buffer_updated(n)
            got += sum(f.count for f in dec.frames())
            sizes.append(dec.buffer_size)
        assert sizes[0] in (init * 4, init), sizes[:3]
        assert max(sizes) == chunk and sizes.index(chunk) <= 3, sizes[:5]
        dec.trim()  # large reads since the last call: kept
        assert dec.buffer_size == chunk
        a.sendall(frames[0])  # a quiet interval: one small read
        dec.buffer_updated(b.recv_into(dec.get_buffer()))
        assert len(dec.frames()) == 1
        dec.trim()  # back to INITIAL
        assert dec.buffer_size == init
        # a 100 KiB frame grows the buffer to hold it; a 1 MiB one gets a buffer of its own
        # (the first 16 KiB of it filled the small buffer: that alone grows it once)
        for size, expect in ((100_000, chunk), (1 << 20, 4 * init)):
            dec = FrameDecoder()
            frame = P.encode_frame(Kind.SEND, "c", None, body=P.pack_payload(b"y" * size))
            dec.feed(frame)
            (out,) = dec.frames()
            assert bytes(out.raw) == frame
            assert dec.buffer_size == expect, (size, dec.buffer_size)
    finally:
        a.close()
        b.close()


def many_clients(address: str, count: int, ready_q: Any, report_q: Any, stop: Any) -> None:
    """``count`` clients of one process (one shared connection), each listening."""
    got = [0] * count
    done = threading.Event()
    clients: list[IpcBusClient] = []

    def listener(i: int) -> Callable[..., None]:
        def on_message(event: Any, text: str) -> None:
            got[i] += 1
            if all(got):
                done.set()
        return on_message

    for i in range(count):
        client = IpcBusClient.create().connect(address, peer_name=f"many-{os.getpid()}-{i}")
        client.on("scale", listener(i))
        clients.append(client)
    sync(clients[-1])
    ready_q.put(os.getpid())
    done.wait(60)
    report_q.put((os.getpid(), sorted(set(got)), sum(got)))
    stop.poll(60)
    for client in clients:
        client.close()


@pytest.mark.timeout(120)
def test_1000_peers_in_4_processes_receive_a_broadcast(sock_path: str, many_fds: int) -> None:
    """1 000 IpcBusClient peers (4 processes x 250 clients, 4 connections) each get one
    broadcast exactly once; after they close, the broker's state is clean."""
    nproc, per = 4, 250
    ctx = multiprocessing.get_context("spawn")
    ready_q, report_q = ctx.Queue(), ctx.Queue()
    stop_r, stop_w = ctx.Pipe(duplex=False)
    with IpcBusBroker.create().connect(sock_path) as broker:
        procs = [ctx.Process(target=many_clients, args=(sock_path, per, ready_q, report_q,
                                                        stop_r), daemon=True)
                 for _ in range(nproc)]
        sender = IpcBusClient.create().connect(sock_path, peer_name="sender")
        try:
            with elapsed() as t_up:
                for p in procs:
                    p.start()
                for _ in procs:
                    ready_q.get(timeout=60)
            state = broker.query_state()
            assert len(state["peers"]) == nproc * per + 1
            assert state["channels"] == {"scale": nproc * per}
            with elapsed() as t_bcast:
                sender.send("scale", "hi")
                results = [report_q.get(timeout=30) for _ in procs]
            assert all(seen == [1] and total == per for _, seen, total in results), results
            stop_w.send_bytes(b"stop")
            for p in procs:
                p.join(30)
            assert [p.exitcode for p in procs] == [0] * nproc
            wait_until(lambda: [p["name"] for p in broker.query_state()["peers"]] == ["sender"],
                       timeout=10)
            report("1000 peers in 4 processes", start_and_connect_s=round(t_up[0], 2),
                   broadcast_all_received_s=round(t_bcast[0], 3))
            assert broker.query_state()["channels"] == {}
        finally:
            stop_w.send_bytes(b"stop")
            sender.close()
            for p in procs:
                p.join(5)
                if p.is_alive():
                    p.kill()
                    p.join(5)


def _storm_one(path: str, how: str) -> None:
    """One connection of a storm, ending in one of several ways."""
    try:
        peer = RawPeer.unix(path)
    except OSError:
        return
    try:
        if how == "connect-close":
            pass
        elif how == "hello-close":
            peer.send(P.encode_frame(Kind.HELLO, body=P.hello_body(os.getpid())))
        else:
            peer.join("storm")
            peer.send(peer.frame(Kind.SUBSCRIBE, f"storm-{how}", rid=1))
            if how == "request-reset":
                peer.send(peer.frame(Kind.REQUEST, "storm-hang", rid=9, body=b"\x90"))
                peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                     struct.pack("ii", 1, 0))
            elif how == "half-frame":
                peer.send(peer.frame(Kind.SEND, "storm-x", body=b"\x91\x01")[:-1])
            elif how == "service":
                assert peer.info is not None
                peer.send(peer.frame(Kind.SERVICE_ADD, f"storm-svc-{peer.info[0]}", rid=2))
    except (OSError, EOFError, TimeoutError):
        pass
    finally:
        peer.close()


def storm_process(path: str, rounds: int, ready_q: Any, go: Any, report_q: Any) -> None:
    """Real clients joining and leaving, with subscriptions, requests and services."""
    ready_q.put(os.getpid())
    go.poll(60)
    errors = 0
    for i in range(rounds):
        try:
            client = IpcBusClient.create().connect(path, peer_name=f"storm-{os.getpid()}")
            client.on(f"storm-{i % 7}", lambda event, *args: None)
            client.on("storm-hang", lambda event, *args: None)
            if i % 5 == 0:
                client.request_async("storm-hang", 30.0)
            if i % 11 == 0:
                IpcBusService.create(client, f"svc-{os.getpid()}-{i}").start()
            client.send(f"storm-{i % 7}", i)
            client.close()
        except Exception:
            errors += 1
    report_q.put((os.getpid(), errors))


def doomed_process(path: str, ready_q: Any) -> None:
    """Holds subscriptions, a pending request and a service; the test SIGKILLs it."""
    client = IpcBusClient.create().connect(path, peer_name="doomed")
    client.on("storm-hang", lambda event, *args: None)
    for i in range(20):
        client.on(f"doomed-{i}", lambda event, *args: None)
    IpcBusService.create(client, f"doomed-{os.getpid()}").start()
    sync(client)
    client.request_async("storm-hang", 30.0)
    sync(client)
    ready_q.put(os.getpid())
    threading.Event().wait(60)


@pytest.mark.timeout(120)
def test_connection_and_disconnection_storms_leave_the_state_clean(sock_path: str,
                                                                   many_fds: int) -> None:
    """1 000 raw connections from 8 threads, ending in six ways (closed at once, after
    HELLO, after joining, with a pending request and SO_LINGER 0, mid-frame, holding a
    service), plus 6 processes of real clients joining and leaving 60 times each, plus 2
    processes SIGKILLed with subscriptions, a pending request and a service: afterwards the
    broker has no peer, channel, service or pending request left."""
    ctx = multiprocessing.get_context("spawn")
    ready_q, report_q = ctx.Queue(), ctx.Queue()
    go_r, go_w = ctx.Pipe(duplex=False)
    with IpcBusBroker.create().connect(sock_path) as broker:
        bpid = broker.process.pid
        fds_idle = fd_count(bpid)
        stormers = [ctx.Process(target=storm_process, args=(sock_path, 60, ready_q, go_r,
                                                            report_q), daemon=True)
                    for _ in range(6)]
        doomed = [ctx.Process(target=doomed_process, args=(sock_path, ready_q), daemon=True)
                  for _ in range(2)]
        procs = stormers + doomed
        try:
            for p in procs:
                p.start()
            for _ in procs:
                ready_q.get(timeout=60)
            ways = ["connect-close", "hello-close", "join", "request-reset", "half-frame",
                    "service"]
            jobs = [ways[i % len(ways)] for i in range(1000)]
            with elapsed() as t:
                go_w.send_bytes(b"go")
                with concurrent.futures.ThreadPoolExecutor(8) as pool:
                    list(pool.map(lambda how: _storm_one(sock_path, how), jobs))
                for p in doomed:
                    os.kill(pid_of(p), signal.SIGKILL)
                results = [report_q.get(timeout=60) for _ in stormers]

                def clean() -> bool:
                    s = broker.query_state()
                    return bool(s["peers"] == [] and s["channels"] == {} and s["services"] == {}
                                and s["pending_requests"] == 0 and s["connections"] == 0)
                wait_until(clean, timeout=10)
            report("storms", raw_connections=len(jobs), process_rounds=6 * 60,
                   killed_processes=len(doomed), seconds_until_clean=round(t[0], 2),
                   broker_fds=(fds_idle, fd_count(bpid)))
            assert all(errors == 0 for _, errors in results), results
            assert fd_count(bpid) == fds_idle
            assert broker.process.is_alive()
        finally:
            for p in procs:
                p.join(10)
                if p.is_alive():
                    p.kill()
                    p.join(5)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _threads(pid: int) -> int:
    return int(re.findall(r"Threads:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())[0])


class ThreadSampler:
    """The most threads a process had, sampled every 5 ms from /proc."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _threads(self.pid))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(2)
        return self.peak


@pytest.mark.timeout(60)
def test_silent_tcp_connections_do_not_stop_the_broker(capfd: Any) -> None:
    """500 TCP connections that never answer the authentication challenge: at most
    MAX_AUTHENTICATIONS (32) authentication threads at once, the rest wait (newest first, at
    most 256, each for at most handshake_timeout) or are dropped with a log line; the broker
    serves a canary meanwhile, every one of the 500 is refused, and its threads are back to
    one."""
    from ipcbus.broker import MAX_AUTHENTICATIONS
    with IpcBusBroker.create(handshake_timeout=1.0).connect(port=0) as broker:
        bpid = broker.process.pid
        canary = IpcBusClient.create().connect(broker.address, peer_name="canary")
        socks: list[socket.socket] = []
        try:
            canary.on("canary", lambda event, x: event.request.resolve(x))
            sync(canary)
            sampler = ThreadSampler(bpid)
            for _ in range(500):
                socks.append(socket.create_connection(tcp_address(broker), timeout=5))
            with elapsed() as t:
                assert canary.request("canary", 5.0, 1).payload == 1
            wait_until(lambda: _threads(bpid) == 1 and broker.query_state()[
                "tcp_authentications"]["waiting"] == 0, timeout=10)
            threads = sampler.stop()
            err = capfd.readouterr().err
            failed = err.count("refused a TCP connection: authentication failed")
            auth = broker.query_state()["tcp_authentications"]
            report("500 silent TCP connections", canary_answered_s=round(t[0], 3),
                   broker_threads_seen=threads, refused_by_authentication=failed,
                   dropped_while_waiting=auth["dropped_waiting"],
                   log=re.findall(r"refused \d+ TCP connection.*", err))
            assert threads <= 1 + MAX_AUTHENTICATIONS, threads
            assert failed + auth["dropped_waiting"] == 500, (failed, auth)
            assert re.search(r"refused \d+ TCP connection\(s\) waiting for authentication", err)
            assert auth["running"] == 0
            assert broker.query_state()["connections"] == 1
        finally:
            for sock in socks:
                sock.close()
            canary.close()


@pytest.mark.timeout(60)
def test_good_tcp_client_served_during_a_burst_of_silent_connections(capfd: Any) -> None:
    """300 silent TCP connections hold every authentication slot, then a client with the
    right key connects: it waits for a free slot (it is the newest waiting, so the next one
    is its own), not behind the whole burst, and is served within about one
    handshake_timeout; the broker never runs more than 32 authentication threads."""
    from ipcbus.broker import MAX_AUTHENTICATIONS
    with IpcBusBroker.create(handshake_timeout=1.0).connect(port=0) as broker:
        bpid = broker.process.pid
        socks: list[socket.socket] = []
        good: IpcBusClient | None = None
        try:
            sampler = ThreadSampler(bpid)
            for _ in range(300):
                socks.append(socket.create_connection(tcp_address(broker), timeout=5))
            wait_until(lambda: broker.query_state()["tcp_authentications"]["waiting"] > 0)
            with elapsed() as t:
                good = IpcBusClient.create().connect(broker.address, peer_name="good",
                                                     timeout=10.0)
            good.on("echo", lambda event, x: event.request.resolve(x))
            assert good.request("echo", 5.0, 7).payload == 7
            auth = broker.query_state()["tcp_authentications"]
            threads = sampler.stop()
            report("good TCP client during 300 silent ones", connected_after_s=round(t[0], 2),
                   broker_threads_seen=threads, authentications=auth)
            assert threads <= 1 + MAX_AUTHENTICATIONS, threads
            assert t[0] < 1.0 + 1.5, t[0]
            assert [p["name"] for p in broker.query_state()["peers"]] == ["good"]
        finally:
            for sock in socks:
                sock.close()
            if good is not None:
                good.close()


@pytest.mark.timeout(60)
def test_out_of_descriptors_the_broker_neither_spins_nor_floods_its_log(sock_path: str,
                                                                        capfd: Any) -> None:
    """A broker whose descriptor limit (64 here) is exhausted by waiting connections keeps
    serving its peers, and does not burn a CPU or flood its log while it cannot accept."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # low, but above every descriptor this process holds (starting the broker needs a few)
    limit = max(64, max(int(fd) for fd in os.listdir("/proc/self/fd")) + 16)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        broker = IpcBusBroker.create().connect(sock_path)  # inherits the low limit
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    canary = IpcBusClient.create().connect(sock_path, peer_name="canary")
    socks: list[socket.socket] = []
    try:
        canary.on("canary", lambda event, x: event.request.resolve(x))
        sync(canary)
        for _ in range(limit + 40):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(5)
            sock.connect(sock_path)  # the backlog takes what accept() cannot
            socks.append(sock)
        wait_until(lambda: "Too many open files" in capfd.readouterr().err, timeout=5)
        cpu0 = _cpu_seconds(broker.process.pid)
        threading.Event().wait(1.0)  # a second of the broker out of descriptors
        cpu = _cpu_seconds(broker.process.pid) - cpu0
        lines = capfd.readouterr().err.count("accept failed")
        assert canary.request("canary", 5.0, 1).payload == 1  # still serving
        report("out of descriptors", broker_cpu_s_per_s=round(cpu, 2),
               accept_failed_lines_per_s=lines)
        assert cpu < 0.5, cpu
        assert lines < 100, lines
    finally:
        for sock in socks:
            sock.close()
        canary.close()
        broker.close()
        capfd.readouterr()  # thousands of lines: not replayed at teardown
