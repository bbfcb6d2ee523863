"""numpy arrays as arguments (SPEC "Large payloads through shared memory"): the same dtype and
shape on arrival, non-contiguous slices included, inline below the threshold and through the
arena above it, through a bridge's link too; numpy is never imported by ipcbus for a process
that sends none."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import Any

import pytest

from ipcbus import IpcBusBridge, IpcBusBroker, IpcBusClient

from helpers import Collector, sync, wait_until

np = pytest.importorskip("numpy")

CHANNEL = "arrays"


def _cases() -> list[Any]:
    big = np.arange(300_000, dtype=np.float64).reshape(500, 600)  # 2.3 MiB: the arena
    return [np.arange(10, dtype=np.int16), big, big[::2, 1::3], big.T,
            np.asfortranarray(big[:50]), np.array(3.5), np.zeros((0, 4), np.uint8),
            np.array([1 + 2j, 3j], dtype=np.complex64), np.array([True, False]),
            np.array(["2026-12-03"], dtype="datetime64[D]"), np.array([b"ab", b"c"]),
            np.arange(24, dtype=">u4").reshape(2, 3, 4)[:, ::2]]


def _check(sent: list[Any], got: tuple[Any, ...]) -> None:
    assert len(got) == len(sent)
    for x, y in zip(sent, got):
        assert type(y) is np.ndarray, type(y)
        assert (y.dtype, y.shape) == (x.dtype, x.shape)
        assert np.array_equal(x, y) and y.flags.writeable


@pytest.mark.timeout(30)
@pytest.mark.parametrize("zero_copy", [False, True])
def test_arrays_keep_dtype_and_shape_inline_and_through_the_arena(
        broker: IpcBusBroker, sock_path: str, clients: Any, zero_copy: bool) -> None:
    sender = clients(sock_path)
    receiver = clients(sock_path)
    got = Collector()
    receiver.on(CHANNEL, got, zero_copy=zero_copy)
    sync(receiver)
    sent = _cases()
    sender.send(CHANNEL, *sent)
    sender.send(CHANNEL, [sent[1][:3], sent[0]], {"k": sent[2]})  # nested one level
    (_, first), (_, second) = got.wait(2)
    _check(sent, first)
    _check([sent[1][:3], sent[0]], tuple(second[0]))
    _check([sent[2]], (second[1]["k"],))
    for refused in (np.array([object()]), np.array([(1, 2.0)], dtype="i4,f8")):
        with pytest.raises(TypeError):
            sender.send(CHANNEL, refused)  # Python objects, structured dtypes: at the call


@pytest.mark.timeout(60)
def test_arrays_through_a_bridge_and_its_link(sock_path: str) -> None:
    with IpcBusBroker.create().connect(sock_path) as broker, \
            IpcBusBridge.create().connect(sock_path):
        sender = IpcBusClient.create().connect(peer_name="sender")
        far = IpcBusClient.create().connect(sock_path, peer_name="far")
        got = Collector()
        far.on(CHANNEL, got)
        sync(far)
        wait_until(lambda: broker.query_state()["channels"].get(CHANNEL) == 1)
        sent = _cases()[1:3]
        sender.send(CHANNEL, *sent)  # slots on the bridge, inline across the link
        _check(sent, got.wait()[0][1])
        far.close()
        sender.close()


@pytest.mark.timeout(60)
def test_numpy_is_not_imported_for_a_process_that_sends_none(sock_path: str) -> None:
    script = textwrap.dedent(f"""
        import os, sys, threading
        from ipcbus import IpcBusBroker, IpcBusClient
        if __name__ == "__main__":
            with IpcBusBroker.create().connect({sock_path!r}):
                a = IpcBusClient.create().connect({sock_path!r})
                b = IpcBusClient.create().connect({sock_path!r})
                done = threading.Event()
                b.on("x", lambda event, *args: done.set(), zero_copy=True)
                b.sync()
                a.send("x", os.urandom(2 << 20), [b"x" * (2 << 20)], 1, "s")
                assert done.wait(10)
                print("numpy" in sys.modules)
                a.close()
                b.close()
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=50)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
