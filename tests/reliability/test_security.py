"""Security (docs/reliability.md, section 6): socket permissions and the SO_PEERCRED uid
check (as uid 65534 in a forked child), the TCP authkey before any frame, sizes refused before
allocation, and no code loading driven by wire data (service call names, the library's code).

Real processes and sockets, no mocked transport. Every test has a hard timeout; waits are
bounded (events, queues, ``wait_until``); children are module-level functions, joined with a
bound and killed in a ``finally``.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import stat
import struct
import time
from pathlib import Path
from typing import Any, Callable

import msgpack
import pytest

from ipcbus import (IpcBusBroker, IpcBusClient, IpcBusConnectionError, IpcBusRequestError,
                    IpcBusService)
from ipcbus import _protocol as P
from ipcbus._decoder import FrameDecoder
from ipcbus._protocol import Kind

from helpers import sync, wait_until
from helpers.bus import tcp_address
from helpers.measure import MiB, report, rss, settle
from helpers.rawpeer import RawPeer  # a hand-driven peer on a raw socket

ROOT = Path(__file__).resolve().parents[2]


class _Impl:
    def __init__(self) -> None:
        self.touched: list[str] = []

    def ping(self) -> str:
        return "pong"

    def _secret(self) -> str:
        self.touched.append("_secret")
        return "leaked"


@pytest.mark.timeout(60)
def test_service_calls_reach_only_registered_handlers(sock_path: str) -> None:
    """Call names come from the wire: private and dunder names, and the service object's own
    methods, are refused ("no call"), never looked up as attributes."""
    with IpcBusBroker.create().connect(sock_path) as broker:
        host = IpcBusClient.create().connect(broker.address, peer_name="host")
        user = IpcBusClient.create().connect(broker.address, peer_name="user")
        impl = _Impl()
        service = IpcBusService.create(host, "svc", impl).start()
        try:
            assert service.calls == ["ping"]
            channel = P.service_call_channel("svc")
            assert user._request_reserved(channel, 5.0, "ping").payload == "pong"
            for name in ["_secret", "__init__", "__class__", "__reduce__", "__dict__",
                         "register_call_handler", "stop", "os.system", ""]:
                with pytest.raises(IpcBusRequestError, match="no call"):
                    user._request_reserved(channel, 5.0, name)
            with pytest.raises(IpcBusRequestError, match="malformed call"):
                user._request_reserved(channel, 5.0, {"__class__": 1})
            assert impl.touched == []
            assert service.is_started
        finally:
            service.stop()
            user.close()
            host.close()


_FORBIDDEN = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle",
              "eval", "exec", "compile", "__import__", "importlib", "import_module",
              "ForkingPickler", "reduction", "runpy", "yaml"}


@pytest.mark.timeout(30)
def test_no_code_loading_in_the_library() -> None:
    """No name of the library's code (comments and strings excluded) loads code or objects:
    no pickle (nor a Connection's recv(), which unpickles), eval, exec, compile, imports."""
    import io
    import tokenize

    hits: list[str] = []
    files = sorted((ROOT / "ipcbus").rglob("*.py"))  # subpackages too
    assert len(files) >= 10
    for path in files:
        tokens = list(tokenize.generate_tokens(io.StringIO(path.read_text()).readline))
        for i, tok in enumerate(tokens):
            if tok.type != tokenize.NAME:
                continue
            where = f"{path.relative_to(ROOT)}:{tok.start[0]}: {tok.line.strip()}"
            if tok.string in _FORBIDDEN:
                hits.append(where)
            # Connection.recv() unpickles; recv_bytes() does not
            if (tok.string == "recv" and i and tokens[i - 1].string == "."
                    and tokens[i + 1].string == "(" and tokens[i + 2].string == ")"):
                hits.append(where)
    assert hits == []


NOBODY = 65534


def as_other_uid(fn: Callable[[], Any], uid: int = NOBODY, timeout: float = 10.0) -> Any:
    """Run ``fn`` in a forked child that dropped to ``uid`` (and its gid); return what it
    returned (msgpack-able), or "ExcName: text" if it raised. Needs root."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            try:
                out = fn()
            except BaseException as exc:
                out = f"{type(exc).__name__}: {exc}"
            os.write(w, msgpack.packb([os.getpid(), os.getuid(), out], use_bin_type=True))
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    try:
        import select
        chunks = []
        deadline = time.monotonic() + timeout
        while True:
            ready, _, _ = select.select([r], [], [], max(deadline - time.monotonic(), 0))
            if not ready:
                raise AssertionError("the child running as another uid did not answer")
            data = os.read(r, 65536)
            if not data:
                break
            chunks.append(data)
        child_pid, child_uid, out = msgpack.unpackb(b"".join(chunks), raw=False)
        assert child_pid == pid and child_uid == uid
        return out
    finally:
        os.close(r)
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
        os.waitpid(pid, 0)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a child as uid"
                                                          f" {NOBODY}")


def _try_unix(path: str) -> dict[str, Any]:
    """In the other-uid child: connect, say HELLO, and tell what came back."""
    out: dict[str, Any] = {}
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    try:
        sock.connect(path)
        out["connect"] = "ok"
        try:
            sock.sendall(P.encode_frame(Kind.HELLO, body=P.hello_body(os.getpid())))
        except BrokenPipeError:
            pass  # closed before our HELLO went out: what did it say before closing?
        data = sock.recv(65536)
        if not data:
            out["answer"] = "closed"
        else:
            dec = FrameDecoder()
            dec.feed(data)
            frames = dec.frames()
            out["answer"] = Kind(frames[0].kind).name if frames else "partial"
            if frames and frames[0].kind == Kind.NOTICE:
                out["notice"] = P.unpack_control(frames[0].body)
    except ConnectionResetError:
        out["answer"] = "closed"  # closed before reading what we sent: a reset
    except OSError as exc:
        out["connect"] = f"{type(exc).__name__}: {exc.strerror}"
    finally:
        sock.close()
    try:
        client = IpcBusClient.create().connect(path, timeout=5.0)
        out["client"] = f"connected as {client.peer.process.type}"
        client.close()
    except Exception as exc:
        out["client"] = type(exc).__name__
        out["client_error"] = str(exc)
    return out


def _traversable(path: str) -> None:
    """Let any uid reach the socket's directory (mkdtemp makes it 0700)."""
    os.chmod(os.path.dirname(path), 0o711)


@needs_root
@pytest.mark.timeout(60)
def test_other_uid_stopped_by_the_socket_permission(sock_path: str, capfd: Any) -> None:
    """The socket file is 0600 and owned by the broker's uid: a process of another uid
    (65534, in a forked child) cannot even connect (EACCES); the broker sees nothing."""
    with IpcBusBroker.create().connect(sock_path) as broker:
        st_ = os.stat(sock_path)
        assert stat.S_IMODE(st_.st_mode) == 0o600 and st_.st_uid == os.getuid()
        _traversable(sock_path)
        out = as_other_uid(lambda: _try_unix(sock_path))
        report("other uid vs the 0600 socket", outcome=out)
        assert out["connect"].startswith("PermissionError"), out
        assert "answer" not in out and out["client"] == "IpcBusConnectionError", out
        assert "Permission denied" in out["client_error"], out
        assert broker.query_state()["connections"] == 0
        assert "refused" not in capfd.readouterr().err  # it never reached the broker


@needs_root
@pytest.mark.timeout(60)
def test_other_uid_refused_by_peer_credentials(sock_path: str, capfd: Any) -> None:
    """With the permission bit opened (0666), the uid check (SO_PEERCRED) still refuses the
    other uid, and says why before closing: a raw socket reads a NOTICE {"error": "uid 65534
    is not allowed"}, and IpcBusClient.connect raises IpcBusConnectionError naming the reason
    (even when the broker closed before the client's HELLO went out); logged as "refused"; a
    canary is served on. With allowed_uids=[65534] the same child gets WELCOME (the refusal
    was the uid check)."""
    with IpcBusBroker.create().connect(sock_path) as broker:
        canary = IpcBusClient.create().connect(sock_path, peer_name="canary")
        try:
            canary.on("canary", lambda event, x: event.request.resolve(x))
            sync(canary)
            _traversable(sock_path)
            os.chmod(sock_path, 0o666)
            out = as_other_uid(lambda: _try_unix(sock_path))
            err = capfd.readouterr().err
            report("other uid vs the uid check", outcome=out,
                   broker_log=re.findall(r"refused a connection.*", err))
            reason = f"uid {NOBODY} is not allowed"
            assert out == {"connect": "ok", "answer": "NOTICE", "notice": {"error": reason},
                           "client": "IpcBusConnectionError",
                           "client_error": f"the server refused the connection: {reason}"
                           }, out
            assert len(re.findall(rf"refused a connection from pid \d+: {reason}", err)) == 2, err
            assert canary.request("canary", 5.0, 1).payload == 1
            assert [p["name"] for p in broker.query_state()["peers"]] == ["canary"]
        finally:
            canary.close()
    with IpcBusBroker.create(allowed_uids=[NOBODY]).connect(sock_path) as broker:
        _traversable(sock_path)
        os.chmod(sock_path, 0o666)
        out = as_other_uid(lambda: _try_unix(sock_path))
        assert out == {"connect": "ok", "answer": "WELCOME",
                       "client": "connected as socket"}, out


@pytest.mark.timeout(30)
def test_refusal_sent_before_the_hello_is_still_reported() -> None:
    """A server that refuses a peer at once (as the uid check does) writes a NOTICE and closes,
    possibly before the client's HELLO goes out: the client's HELLO then fails with EPIPE,
    and the handshake reads the NOTICE left in its socket and reports that reason instead of
    "Broken pipe"."""
    from ipcbus import _transport as T
    server, client = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        T.send_refusal(server, "uid 65534 is not allowed")
        server.close()
        with pytest.raises(IpcBusConnectionError) as info:
            T.client_handshake(client, tcp=False, authkey=None, timeout=2.0)
        report("refusal before HELLO", client_error=str(info.value))
        assert str(info.value) == "the server refused the connection: uid 65534 is not allowed"
    finally:
        client.close()


def _tcp_raw(address: tuple[str, int]) -> socket.socket:
    sock = socket.create_connection(address, timeout=5)
    return sock


@pytest.mark.timeout(60)
def test_tcp_needs_the_authkey_before_any_frame(capfd: Any) -> None:
    """On TCP the broker speaks first (a challenge) and reads no frame before the key is
    proved: a HELLO sent straight away, a frame announcing 2 GiB, and a wrong key are all
    refused by the authentication ("refused a TCP connection"), never by the frame decoder;
    the broker's memory does not move; a client with the right key is served throughout."""
    with IpcBusBroker.create(handshake_timeout=1.0).connect(port=0) as broker:
        addr = broker.address
        good = IpcBusClient.create().connect(addr, peer_name="good")
        try:
            good.on("canary", lambda event, x: event.request.resolve(x))
            sync(good)
            settle()
            before = rss(broker.process.pid)
            outcomes = {}
            for name, data in [
                    ("hello-first", P.encode_frame(Kind.HELLO, body=P.hello_body(1))),
                    ("2GiB-frame-first", P.PREFIX.pack(20, 2 * 1024 ** 3, 0) + b"\0" * 4096),
                    ("2GiB-length-as-answer", struct.pack("!i", 0x7FFFFFFF) + b"\0" * 64),
                    ("silence", b"")]:
                sock = _tcp_raw(tcp_address(broker))
                try:
                    challenge = sock.recv(4096)  # multiprocessing's #CHALLENGE# message
                    if data:
                        sock.sendall(data)
                    sock.settimeout(5)
                    rest = b""
                    try:
                        while chunk := sock.recv(4096):
                            rest += chunk
                    except (ConnectionResetError, socket.timeout):
                        pass
                    outcomes[name] = (b"#CHALLENGE#" in challenge, rest[:20])
                finally:
                    sock.close()
            with pytest.raises(IpcBusConnectionError, match="auth"):
                IpcBusClient.create().connect(addr, authkey=b"not the key")
            assert good.request("canary", 5.0, 1).payload == 1
            growth = rss(broker.process.pid) - before
            err = capfd.readouterr().err
            report("tcp authkey", outcomes=outcomes, broker_rss_growth_KiB=growth >> 10,
                   refusals=len(re.findall("refused a TCP connection", err)))
            assert all(saw_challenge for saw_challenge, _ in outcomes.values()), outcomes
            assert all(rest == b"" or rest.startswith(b"#FAILURE#")
                       for _, rest in outcomes.values()), outcomes
            assert len(re.findall(r"refused a TCP connection: authentication failed", err)) \
                == len(outcomes) + 1, err
            assert "protocol error" not in err and "dropping" not in err, err
            assert growth < 4 * MiB, growth
            assert [p["name"] for p in broker.query_state()["peers"]] == ["good"]
            assert broker.query_state()["connections"] == 1
        finally:
            good.close()


@pytest.mark.timeout(60)
def test_frame_announcing_2GiB_is_refused_before_allocation(sock_path: str,
                                                            capfd: Any) -> None:
    """Frames announcing 2 GiB and 4 GiB - 1 (before and after the handshake, and a header
    announcing 64 KiB - 1): each connection is closed on the length prefix, and the broker's
    RSS does not grow."""
    with IpcBusBroker.create().connect(sock_path) as broker:
        bpid = broker.process.pid
        settle()
        before = rss(bpid)
        for phase in ("pre", "post"):
            for prefix in (P.PREFIX.pack(20, 2 * 1024 ** 3, 0), P.PREFIX.pack(20, 0xFFFFFFFF, 0),
                           P.PREFIX.pack(0xFFFF, 10, 0)):
                for _ in range(5):
                    peer = RawPeer.unix(sock_path)
                    try:
                        if phase == "post":
                            peer.join()
                        peer.send(prefix + b"\0" * 8192)
                        assert peer.wait_eof(3.0) is not None
                    finally:
                        peer.close()
        wait_until(lambda: broker.query_state()["connections"] == 0)
        growth = rss(bpid) - before
        err = capfd.readouterr().err
        report("2 GiB announced", connections=30, broker_rss_growth_KiB=growth >> 10)
        assert len(re.findall(r"over the limit|outside 1\.\.8192", err)) == 30, err
        assert growth < 4 * MiB, growth


@pytest.mark.timeout(60)
def test_unauthenticated_connection_cannot_make_the_broker_allocate(sock_path: str) -> None:
    """Before its handshake a connection may only send a HELLO (a control frame, at most
    64 KiB): announcing a 100 MiB frame and sending one more byte must not make the broker
    allocate 100 MiB (two such connections here; a process could open thousands)."""
    with IpcBusBroker.create(handshake_timeout=5.0).connect(sock_path) as broker:
        bpid = broker.process.pid
        settle()
        before = rss(bpid)
        header = P.encode_header(Kind.HELLO, "", None, None)
        peers = [RawPeer.unix(sock_path) for _ in range(2)]
        try:
            for peer in peers:
                peer.send(P.PREFIX.pack(len(header), 100 * MiB, 0) + header)
            sync_client = IpcBusClient.create().connect(sock_path)
            sync(sync_client)
            for peer in peers:
                peer.send(b"x")
            sync(sync_client)
            sync_client.close()
            growth = rss(bpid) - before
            report("pre-handshake 100 MiB announced x2", broker_rss_growth_MiB=growth // MiB)
            assert growth < 32 * MiB, f"broker RSS grew by {growth // MiB} MiB"
        finally:
            for peer in peers:
                peer.close()
