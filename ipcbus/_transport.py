"""Stream endpoints behind one small interface: Unix sockets, TCP, and pipe Connections.

Everything ipcbus carries travels over a stream socket: a Unix socket path, TCP, or a
``multiprocessing`` duplex Connection (which is a Unix socketpair on POSIX). This module owns
the bytes-and-descriptors I/O of such a socket (:class:`StreamTransport`), the address syntax,
and the handshake; the broker, the bridge and the client share it.

Descriptor rules: a descriptor handed to :meth:`StreamTransport.send` stays owned by the
caller (the kernel duplicates it into the message); a descriptor returned by
:meth:`StreamTransport.recv_into` is owned by the caller, who must close it. A truncated
control message (``MSG_CTRUNC``) closes whatever did arrive and fails the connection.
"""
from __future__ import annotations

import array
import errno
import fcntl
import multiprocessing
import multiprocessing.connection
import os
import socket
import stat
import struct
import termios
from typing import Any, Callable, Iterable, Sequence, Tuple, Union

from . import _protocol as P
from ._decoder import FrameDecoder
from .errors import IpcBusConnectionError, IpcBusProtocolError

Address = Union[str, Tuple[str, int]]  # a Unix path, or (host, port)

_IOV_MAX = 1024
_FD_SIZE = array.array("i").itemsize
_ANC_SIZE = socket.CMSG_SPACE(P.MAX_FDS * _FD_SIZE)
_MSG_CTRUNC = int(socket.MSG_CTRUNC)  # a plain int: IntFlag's ``&`` costs microseconds a read
HANDSHAKE_TIMEOUT = 5.0
# Kernel buffers of Unix sockets (the kernel caps them at net.core.[rw]mem_max): large messages
# cross in fewer sleep/wake cycles (+20% at 1 MiB, measured with benchmarks/run.py --only W4).
SOCKET_BUFFER_BYTES = 4 << 20
ENV_ADDRESS = "IPCBUS_ADDRESS"


def parse_address(address: Any = None, *, path: str | None = None, port: int | None = None,
                  host: str | None = None) -> Address:
    """Turn the ``connect()`` arguments into a Unix path or a (host, port) pair.

    ``str`` -> Unix path (a string "HOST:PORT" or "PORT" is accepted from IPCBUS_ADDRESS only);
    ``int`` -> TCP port on 127.0.0.1; ``(host, port)`` -> TCP.
    """
    given = [a for a in (address, path, port) if a is not None]
    if len(given) > 1:
        raise ValueError("give one of address, path= or port=")
    if path is not None:
        address = path
    elif port is not None:
        address = (host or "127.0.0.1", port)
    elif address is None:
        env = os.environ.get(ENV_ADDRESS)
        if not env:
            raise IpcBusConnectionError(
                f"no bus address: pass one, create an IpcBusBridge, or set {ENV_ADDRESS}")
        address = parse_env_address(env)
    if isinstance(address, bool):
        raise TypeError("address must be a path, a port or (host, port), not a bool")
    if isinstance(address, int):
        address = (host or "127.0.0.1", address)
    if isinstance(address, os.PathLike):
        address = os.fspath(address)
    if isinstance(address, str):
        if not address:
            raise ValueError("empty socket path")
        if len(os.fsencode(address)) > 107:
            raise ValueError(f"Unix socket path is longer than 107 bytes: {address!r}")
        return address
    if (isinstance(address, (tuple, list)) and len(address) == 2
            and isinstance(address[0], str) and isinstance(address[1], int)
            and not isinstance(address[1], bool)):
        if not 0 <= address[1] <= 65535:
            raise ValueError(f"port out of range: {address[1]}")
        return (address[0], address[1])
    raise TypeError(f"address must be a str path, an int port or (host, port), not {address!r}")


def parse_env_address(text: str) -> Address:
    """IPCBUS_ADDRESS syntax: a path, ``PORT``, or ``HOST:PORT``."""
    if text.isdigit():
        return ("127.0.0.1", int(text))
    host, sep, port = text.rpartition(":")
    if sep and port.isdigit() and "/" not in text:
        return (host.strip("[]") or "127.0.0.1", int(port))
    return text


def format_address(address: Address) -> str:
    return address if isinstance(address, str) else f"{address[0]}:{address[1]}"


def is_tcp(address: Address) -> bool:
    return not isinstance(address, str)


# -- the decision functions of the security checks (pure, tested directly) ------------------
def peer_uid_allowed(peer_uid: int, own_uid: int, allowed_uids: Iterable[int] | None) -> bool:
    """May a Unix socket peer with ``peer_uid`` join a broker run by ``own_uid``?

    ``allowed_uids`` None: only the same uid. Otherwise also the uids listed. Root (uid 0) is
    not let in implicitly: a broker that wants it says so.
    """
    if peer_uid == own_uid:
        return True
    return allowed_uids is not None and peer_uid in set(allowed_uids)


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket."""
    fmt = "3i"
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize(fmt))
    pid, uid, gid = struct.unpack(fmt, data)
    return pid, uid, gid


def send_refusal(sock: socket.socket, reason: str) -> None:
    """Tell a peer refused before its handshake why (a NOTICE ``{"error": reason}``, which its
    handshake reports), without ever blocking: a fresh socket has room for these few bytes."""
    try:
        sock.send(P.notice_frame(None, error=reason), socket.MSG_DONTWAIT)
    except OSError:
        pass


def default_authkey() -> bytes:
    """The authkey of a TCP ``connect()`` given none: ``$IPCBUS_AUTHKEY`` (its bytes) when set
    and not empty, else ``multiprocessing.current_process().authkey`` (inherited by children)."""
    return os.environb.get(b"IPCBUS_AUTHKEY") or bytes(multiprocessing.current_process().authkey)


def _as_connection(sock: socket.socket) -> multiprocessing.connection.Connection:
    return multiprocessing.connection.Connection(os.dup(sock.fileno()))


def authenticate_server(sock: socket.socket, authkey: bytes) -> None:
    """Broker side of the TCP challenge (mutual, as multiprocessing.connection does)."""
    conn = _as_connection(sock)
    try:
        multiprocessing.connection.deliver_challenge(conn, authkey)
        multiprocessing.connection.answer_challenge(conn, authkey)
    finally:
        conn.close()


def authenticate_client(sock: socket.socket, authkey: bytes) -> None:
    conn = _as_connection(sock)
    try:
        multiprocessing.connection.answer_challenge(conn, authkey)
        multiprocessing.connection.deliver_challenge(conn, authkey)
    except multiprocessing.AuthenticationError as exc:
        raise IpcBusConnectionError(f"authentication with the broker failed (wrong authkey?):"
                                    f" {exc}") from None
    except (EOFError, OSError) as exc:
        raise IpcBusConnectionError(f"the broker closed the connection during authentication"
                                    f" (wrong authkey?): {exc}") from None
    finally:
        conn.close()



# -- sockets -------------------------------------------------------------------------------------
def set_timeouts(sock: socket.socket, seconds: float | None) -> None:
    """Bound blocking reads and writes with SO_RCVTIMEO/SO_SNDTIMEO (keeps the fd blocking,
    so it works for code that reads the fd directly, like multiprocessing's challenge)."""
    secs = 0.0 if seconds is None else max(seconds, 0.001)
    tv = struct.pack("ll", int(secs), int((secs - int(secs)) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def stale_unix_socket(path: str) -> bool:
    """True if ``path`` is a Unix socket that nobody listens on (left by a dead broker)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(st.st_mode):
        raise IpcBusConnectionError(f"{path!r} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return True
    except OSError:
        return False
    finally:
        probe.close()
    return False


def listen(address: Address, backlog: int = 1024) -> socket.socket:
    """Bind and listen; a Unix socket is created owner-only (0600), replacing a stale one."""
    if isinstance(address, str):
        if os.path.lexists(address):
            if not stale_unix_socket(address):
                raise IpcBusConnectionError(f"a bus is already listening on {address!r}")
            os.unlink(address)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(address)
        except OSError as exc:
            sock.close()
            raise IpcBusConnectionError(f"cannot listen on {address!r}: {exc}") from None
        finally:
            os.umask(old)
        os.chmod(address, 0o600)
    else:
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            sock.close()
            raise IpcBusConnectionError(f"cannot listen on {format_address(address)}: {exc}") \
                from None
    sock.listen(backlog)
    return sock


def connect_socket(address: Address, timeout: float) -> socket.socket:
    if isinstance(address, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(address)
    except OSError as exc:
        sock.close()
        raise IpcBusConnectionError(
            f"cannot connect to the bus at {format_address(address)}: {exc}") from None
    if not isinstance(address, str):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def tune_socket(sock: socket.socket) -> None:
    """Give a Unix socket large kernel buffers (memory is used only while data waits)."""
    if sock.family == socket.AF_UNIX:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)
        except OSError:
            pass


def close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def dup_fds(fds: Iterable[int]) -> list[int]:
    """Duplicates of ``fds``, all or none: if one ``os.dup`` fails (EMFILE), those made are
    closed and the OSError is raised."""
    made: list[int] = []
    try:
        for fd in fds:
            made.append(os.dup(fd))
    except BaseException:
        close_fds(made)
        raise
    return made


def dup_copies(fds: list[int], n: int) -> list[list[int]]:
    """``n`` independent sets of duplicates of ``fds`` (one per receiver), all or none."""
    copies: list[list[int]] = []
    try:
        for _ in range(n):
            copies.append(dup_fds(fds))
    except BaseException:
        for made in copies:
            close_fds(made)
        raise
    return copies


class StreamTransport:
    """Bytes and descriptors over one stream socket."""

    __slots__ = ("sock", "can_pass_fds", "_fileno", "send_one")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.can_pass_fds = sock.family == socket.AF_UNIX
        self._fileno = sock.fileno()
        # One ``send`` of one buffer, without descriptors: the number of bytes written
        # (BlockingIOError if none can be now). The socket's own method: no Python frame.
        self.send_one: Callable[[memoryview], int] = sock.send

    def fileno(self) -> int:
        return self._fileno

    def recv_into(self, buf: memoryview) -> tuple[int, list[int]]:
        """Read what is there (blocking or not, as the socket is); return (nbytes, fds).

        0 bytes means the other side has closed. Raises BlockingIOError when a non-blocking
        socket has nothing, IpcBusProtocolError on a truncated control message.
        """
        if not self.can_pass_fds:
            return self.sock.recv_into(buf), []
        return recv_result(self.sock.recvmsg_into([buf], _ANC_SIZE))

    def send(self, buffers: Sequence[bytes | bytearray | memoryview], fds: Sequence[int] = ()
             ) -> int:
        """One ``sendmsg`` of up to IOV_MAX buffers; the descriptors go with its first byte."""
        if len(buffers) > _IOV_MAX:
            buffers = buffers[:_IOV_MAX]
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
            return self.sock.sendmsg(buffers, anc)
        return self.sock.sendmsg(buffers)

    def sendall(self, buffers: Sequence[bytes | bytearray | memoryview],
                fds: Sequence[int] = ()) -> None:
        """Write everything on a blocking socket (the descriptors with the first chunk)."""
        if not fds and len(buffers) == 1:
            self.sock.sendall(buffers[0])  # the common case: one frame, a loop in C
            return
        views = [memoryview(b).cast("B") for b in buffers if len(b)]
        first = True
        while views or (first and fds):
            sent = self.send(views, fds if first else ())
            first = False
            while sent and views:
                head = views[0]
                if sent >= len(head):
                    sent -= len(head)
                    views.pop(0)
                else:
                    views[0] = head[sent:]
                    sent = 0

    def unsent(self) -> int | None:
        """Bytes written to this socket that the peer has not read yet (the kernel's send
        queue, SIOCOUTQ), or None where that cannot be asked."""
        buf = array.array("i", [0])
        try:
            fcntl.ioctl(self.sock.fileno(), termios.TIOCOUTQ, buf, True)
        except (OSError, ValueError):
            return None
        return buf[0]

    def shutdown_read(self) -> None:
        """Read nothing more: what the peer sends from now on is refused (it gets EPIPE)
        instead of filling this side's buffers."""
        try:
            self.sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass

    def shutdown_write(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def shutdown(self) -> None:
        """Wake any thread blocked in recv on this socket (close() alone does not)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()


# -- reads and writes that an interrupt cannot cut in two ----------------------------------------
# A signal handler that raises (Ctrl-C's KeyboardInterrupt, in the main thread) runs at the
# first check after a system call returns to Python code: the count returned by a send or a
# receive would be lost, and with it the frame boundaries of a stream that every client of
# the process shares. ``list.extend(map(call, ...))`` stores the result from C code, before
# any such check: the count survives, so a write can be finished and a read kept.
def send_whole(sock: socket.socket, buffers: Sequence[bytes | bytearray | memoryview],
               fds: Sequence[int] = ()) -> None:
    """Write one or more whole frames on a blocking socket (the descriptors with the first
    byte), like :meth:`StreamTransport.sendall`; OSError as from it. A write that has begun
    is finished: an interrupt (a BaseException that is not an Exception) meanwhile is raised
    again once everything is written, so the caller knows the frames went out."""
    counts: list[int] = []
    if len(buffers) == 1 and not fds:  # the common case: one call
        try:
            counts.extend(map(sock.send, (buffers[0],)))
            if counts[0] == len(buffers[0]):
                return
        except Exception:
            raise
        except BaseException as exc:
            _send_rest(sock, buffers, fds, counts, exc)
    _send_rest(sock, buffers, fds, counts, None)


def _send_rest(sock: socket.socket, buffers: Sequence[bytes | bytearray | memoryview],
               fds: Sequence[int], counts: list[int], interrupted: BaseException | None
               ) -> None:
    """Write what ``counts`` (the byte counts written so far) says is left of ``buffers``;
    interrupts meanwhile are kept, and the first is raised at the end."""
    views = [memoryview(b).cast("B") for b in buffers if len(b)]
    total = sum(len(v) for v in views)
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds \
        else []
    while True:
        try:
            done = sum(counts)
            if done >= total:
                break
            rest: list[memoryview] = []
            for view in views:
                if done >= len(view):
                    done -= len(view)
                else:
                    rest.append(view[done:] if done else view)
                    done = 0
            if anc and not counts:
                counts.extend(map(sock.sendmsg, (rest[:_IOV_MAX],), (anc,)))
            else:
                counts.extend(map(sock.sendmsg, (rest[:_IOV_MAX],)))
        except Exception:
            raise
        except BaseException as exc:
            if interrupted is None:
                interrupted = exc
    if interrupted is not None:
        raise interrupted


def recv_kept(transport: StreamTransport, buf: memoryview, out: list[Any]) -> None:
    """One read into ``buf`` (blocking or not, as the socket is), its raw result appended
    to ``out`` even when an interrupt is raised right after the system call (see above);
    :func:`recv_result` decodes it."""
    if transport.can_pass_fds:
        out.extend(map(transport.sock.recvmsg_into, ([buf],), (_ANC_SIZE,)))
    else:
        out.extend(map(transport.sock.recv_into, (buf,)))


def recv_result(raw: Any) -> tuple[int, list[int]]:
    """(nbytes, fds) of a ``recv_into`` or ``recvmsg_into`` result; IpcBusProtocolError (the
    descriptors closed) on a truncated control message."""
    if raw.__class__ is int:
        return raw, []
    nbytes, ancdata, flags, _ = raw
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[:len(data) - (len(data) % _FD_SIZE)])
            fds.extend(arr)
    if flags & _MSG_CTRUNC:
        close_fds(fds)
        raise IpcBusProtocolError("descriptors were truncated in transit (MSG_CTRUNC)")
    return nbytes, fds


# -- handles: what a descriptor was on the sender's side, and the same kind on the receiver's --
PORT_KINDS = frozenset({"fd", "socket", "connection:r", "connection:w", "connection:rw"})


def create_channel() -> tuple[multiprocessing.connection.Connection,
                              multiprocessing.connection.Connection]:
    """A connected duplex Connection pair (the MessageChannel analog): keep one end, post the
    other to a peer with ``post_message``, and talk directly, without the broker."""
    return multiprocessing.Pipe(duplex=True)


def port_descriptor(port: object) -> tuple[int, str]:
    """(fd, kind) of a handle given to ``post_message``; TypeError/ValueError if unusable.

    The caller keeps ownership of ``port``: the kernel duplicates the descriptor into the
    message, so the sender may close its handle as soon as the call returns.
    """
    if isinstance(port, bool):
        raise TypeError("a port must be a Connection, a socket or an int descriptor, not a bool")
    if isinstance(port, int):
        try:
            os.fstat(port)
        except OSError:
            raise ValueError(f"{port} is not an open file descriptor") from None
        return port, "fd"
    if isinstance(port, socket.socket):
        fd = port.fileno()
        if fd < 0:
            raise ValueError("cannot send a closed socket")
        return fd, "socket"
    if isinstance(port, multiprocessing.connection.Connection):
        if port.closed:
            raise ValueError("cannot send a closed Connection")
        flags = ("r" if port.readable else "") + ("w" if port.writable else "")
        return port.fileno(), f"connection:{flags}"
    raise TypeError(f"a port must be a multiprocessing Connection, a socket.socket or an int"
                    f" descriptor, not {type(port).__name__}")


def port_from_descriptor(fd: int, kind: str) -> Any:
    """Wrap a received descriptor (owned by the caller from now on) as the sender's kind."""
    if kind == "fd":
        return fd
    if kind == "socket":
        try:
            return socket.socket(fileno=fd)
        except OSError:
            close_fds([fd])
            raise IpcBusProtocolError("a descriptor announced as a socket is not one") from None
    if kind in PORT_KINDS:
        flags = kind.partition(":")[2]
        return multiprocessing.connection.Connection(fd, readable="r" in flags,
                                                     writable="w" in flags)
    close_fds([fd])
    raise IpcBusProtocolError(f"unknown port kind {kind!r}")


def recv_frame_blocking(transport: StreamTransport, decoder: FrameDecoder,
                        fd_queue: list[int]) -> P.Frame:
    """Read until one frame is decoded (socket blocking with a timeout); for handshakes."""
    while True:
        frame = decoder.take_frame()  # a handshake is one frame: what follows is the loop's
        if frame is not None:
            return frame
        try:
            n, fds = transport.recv_into(decoder.get_buffer())
        except (socket.timeout, BlockingIOError):
            raise IpcBusConnectionError("handshake timed out") from None
        fd_queue.extend(fds)
        if n == 0:
            raise IpcBusConnectionError("the other side closed the connection during the handshake")
        decoder.buffer_updated(n)


def client_handshake(sock: socket.socket, *, tcp: bool, authkey: bytes | None, timeout: float,
                     relay: bool = False, max_message: int | None = None
                     ) -> tuple[StreamTransport, FrameDecoder, dict[str, Any]]:
    """Authenticate (TCP), send HELLO, and wait for WELCOME. Returns the ready transport.
    ``relay``: a bridge's link, which takes no frame over ``max_message``."""
    transport = StreamTransport(sock)
    sock.settimeout(timeout)
    try:
        if tcp:
            set_timeouts(sock, timeout)
            sock.setblocking(True)
            authenticate_client(sock, authkey if authkey is not None else default_authkey())
            set_timeouts(sock, None)
            sock.settimeout(timeout)
        body: dict[str, Any] = {"magic": P.MAGIC, "version": P.VERSION, "pid": os.getpid(),
                                "relay": relay}
        if max_message is not None:
            body["max_message"] = max_message
        decoder = FrameDecoder()
        fd_queue: list[int] = []
        try:
            transport.sendall([P.encode_frame(P.Kind.HELLO, body=P.pack_payload(body))])
        except OSError:
            # Refused before our HELLO went out (e.g. the uid check): its NOTICE says why.
            _raise_refusal(transport, decoder)
            raise
        welcome = P.check_welcome(recv_frame_blocking(transport, decoder, fd_queue))
        close_fds(fd_queue)
        decoder.max_message = welcome["max_message"]
    except IpcBusProtocolError as exc:
        raise IpcBusConnectionError(str(exc)) from None
    except OSError as exc:
        if isinstance(exc, IpcBusConnectionError):
            raise
        raise IpcBusConnectionError(f"handshake with the bus failed: {exc}") from None
    return transport, decoder, welcome


def _raise_refusal(transport: StreamTransport, decoder: FrameDecoder) -> None:
    """If the server left a NOTICE before closing, raise it as the handshake's error."""
    fds: list[int] = []
    try:
        frame = recv_frame_blocking(transport, decoder, fds)
    except (OSError, IpcBusProtocolError):
        return
    finally:
        close_fds(fds)
    if frame.kind == P.Kind.NOTICE:
        P.check_welcome(frame)  # raises IpcBusProtocolError with the server's reason


def errno_is_disconnect(exc: OSError) -> bool:
    return exc.errno in (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.EBADF,
                         errno.ESHUTDOWN)
