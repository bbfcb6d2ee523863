"""Shared memory when parties crash or stall (SPEC "Large payloads through shared memory"):
a SIGKILLed sender or receiver mid-stream leaves no descriptor, mapping or memory behind
(counted in /proc for the broker and the clients); a stuck receiver bounds the sender's
arena and the broker's memory (the sender waits, then gets a clear error; the slow-consumer
rule frees the slots)."""
from __future__ import annotations

import os
import signal
import time
from typing import Any

import pytest

from ipcbus import IpcBusBroker, IpcBusClient, IpcBusTimeoutError
from ipcbus._client import shm as client_shm
from ipcbus._shm_arena import AVAILABLE

from helpers import Children, Collector, Reports, pid_of, sync, wait_until
from helpers.measure import MiB, arena_fds, arena_maps, fd_count, report, rss

pytestmark = pytest.mark.skipif(not AVAILABLE, reason="no memfd on this platform")

CHANNEL = "big"


def streaming_sender(path: str, q: Any, stop: Any) -> None:
    """Sends 1 MiB messages until killed."""
    client = IpcBusClient.create().connect(path, peer_name="sender", shm_limit=8 * MiB)
    data = os.urandom(MiB)
    client.send(CHANNEL, 0, data)
    q.put(("ready", "sender"))
    seq = 1
    while not stop.poll(0):
        client.send(CHANNEL, seq, data)
        seq += 1
        time.sleep(0.002)


def slow_receiver(path: str, q: Any, stop: Any, stuck: bool) -> None:
    """Holds every message a while (or until stopped: ``stuck``) in its listener."""
    client = IpcBusClient.create().connect(path, peer_name="receiver")

    def on(event: Any, seq: int, data: Any) -> None:
        q.put(("got", seq))
        stop.poll(30 if stuck else 0.05)

    client.on(CHANNEL, on, zero_copy=True)
    sync(client)
    q.put(("ready", "receiver"))
    stop.poll(60)


@pytest.mark.timeout(60)
def test_a_killed_sender_leaves_no_descriptor_mapping_or_memory(
        reporters: tuple[Children, Reports, Any], sock_path: str) -> None:
    children, reports, q = reporters
    with IpcBusBroker.create().connect(sock_path) as broker:
        bpid = pid_of(broker.process)
        receiver = IpcBusClient.create().connect(sock_path, peer_name="receiver")
        got = Collector()
        receiver.on(CHANNEL, got)
        sync(receiver)
        fds0, maps0, rss0 = fd_count(bpid), arena_maps(bpid), rss(bpid)
        sender = children.start(streaming_sender, sock_path, q, children.stop)
        reports.next("ready")
        got.wait(10, timeout=20)
        assert arena_maps() == 1  # the receiver maps the sender's arena
        os.kill(pid_of(sender), signal.SIGKILL)
        sender.join(5)
        wait_until(lambda: fd_count(bpid) == fds0 and arena_maps() == 0 and arena_fds() == 0,
                   timeout=10)
        assert arena_maps(bpid) == maps0 == 0  # the broker maps nothing it forwards
        grown = rss(bpid) - rss0
        report("shm killed sender", messages=len(got.items), broker_rss_growth_mib=grown / MiB)
        assert grown < 16 * MiB
        receiver.close()


@pytest.mark.timeout(60)
def test_a_killed_receiver_gives_its_slots_back(
        reporters: tuple[Children, Reports, Any], sock_path: str) -> None:
    children, reports, q = reporters
    with IpcBusBroker.create().connect(sock_path) as broker:
        bpid = pid_of(broker.process)
        sender = IpcBusClient.create().connect(sock_path, peer_name="sender",
                                               shm_limit=16 * MiB)
        data = os.urandom(MiB)
        sender.send("nobody", data)  # the arena exists, announced to the broker
        sync(sender)
        fds0, rss0 = fd_count(bpid), rss(bpid)
        receiver = children.start(slow_receiver, sock_path, q, children.stop, True)
        reports.next("ready")
        for seq in range(6):
            sender.send(CHANNEL, seq, data)
        reports.next("got")  # stuck in its listener, holding the slots
        shm = sender._connection().shm
        assert shm.slots is not None and shm.slots.used_bytes >= 5 * MiB
        os.kill(pid_of(receiver), signal.SIGKILL)
        receiver.join(5)
        wait_until(lambda: shm.slots is not None and shm.slots.used_bytes == 0, timeout=10)
        wait_until(lambda: fd_count(bpid) == fds0, timeout=10)
        assert rss(bpid) - rss0 < 16 * MiB
        sender.close()


@pytest.mark.timeout(60)
def test_a_stuck_receiver_bounds_the_senders_arena_and_the_brokers_memory(
        reporters: tuple[Children, Reports, Any], sock_path: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    children, reports, q = reporters
    monkeypatch.setattr(client_shm, "FULL_WAIT", 1.0)
    with IpcBusBroker.create(queue_limit=4 * MiB, slow_consumer_timeout=3.0
                             ).connect(sock_path) as broker:
        bpid = pid_of(broker.process)
        rss0 = rss(bpid)
        children.start(slow_receiver, sock_path, q, children.stop, True)
        reports.next("ready")
        sender = IpcBusClient.create().connect(sock_path, peer_name="sender",
                                               shm_limit=8 * MiB)
        data = os.urandom(MiB)
        sent = 0
        with pytest.raises(IpcBusTimeoutError, match="arena"):
            for sent in range(100):
                sender.send(CHANNEL, sent, data)
        shm = sender._connection().shm
        assert shm.slots is not None and shm.slots.used_bytes <= 8 * MiB
        assert sent <= 8  # what the arena holds, no more
        assert rss(bpid) - rss0 < 8 * MiB  # the broker holds references, not payloads
        # the slow-consumer rule cuts the receiver off: its slots come back
        wait_until(lambda: shm.slots is not None and shm.slots.used_bytes == 0, timeout=15)
        sender.send(CHANNEL, 1000, data)
        report("shm stuck receiver", sent_before_full=sent,
               broker_rss_growth_mib=(rss(bpid) - rss0) / MiB)
        sender.close()
