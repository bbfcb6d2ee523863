"""The hub's side of the handshake as a unit (``ipcbus._handshake``): what a HELLO may ask is
decided from what the hub knows (the kind of connection, the kernel's pid, the links policy),
never from the HELLO alone."""
from __future__ import annotations

from typing import Any

import pytest

from ipcbus import _protocol as P
from ipcbus._decoder import FrameDecoder
from ipcbus._handshake import HandshakeRefused, read_hello
from ipcbus._protocol import Kind

OWNER = 4242


def hello(**body: Any) -> P.Frame:
    fields = {"magic": P.MAGIC, "version": P.VERSION, "pid": 77, **body}
    dec = FrameDecoder()
    dec.feed(P.encode_frame(Kind.HELLO, body=P.pack_payload(fields)))
    frame = dec.take_frame()
    assert frame is not None
    return frame


def read(frame: P.Frame, ptype: str = "socket", cred_pid: int | None = OWNER,
         links: str = "owner") -> Any:
    return read_hello(frame, ptype=ptype, cred_pid=cred_pid, links=links, owner_pid=OWNER)


def test_a_plain_hello_is_accepted_with_its_pid_and_no_link() -> None:
    got = read(hello())
    assert (got.pid, got.relay, got.max_message, got.version) == (77, False, None, P.VERSION)


@pytest.mark.parametrize("body, reason", [
    ({"magic": "other"}, "magic"),
    ({"pid": 0}, "invalid pid"),
    ({"pid": 2**31}, "invalid pid"),
    ({"pid": "1"}, "invalid pid"),
    ({"version": 0}, "invalid version"),
])
def test_a_bad_hello_is_refused_with_a_reason(body: dict[str, Any], reason: str) -> None:
    with pytest.raises(HandshakeRefused, match=reason):
        read(hello(**body))


def test_a_first_frame_that_is_not_hello_is_refused() -> None:
    dec = FrameDecoder()
    dec.feed(P.encode_frame(Kind.SEND, "ch", ["a", "a", "socket", 1]))
    frame = dec.take_frame()
    assert frame is not None
    with pytest.raises(HandshakeRefused, match="HELLO"):
        read(frame)


@pytest.mark.parametrize("ptype, cred_pid, links, granted", [
    ("socket", OWNER, "owner", True),  # the owner process, on the Unix socket
    ("socket", OWNER + 1, "owner", False),  # another process of the same uid
    ("socket", None, "owner", True),  # TCP: it proved the authkey
    ("socket", OWNER + 1, "any", True),
    ("socket", OWNER, "none", False),
    ("pipe", None, "any", False),  # a pipe child never links
    ("main", OWNER, "any", False),
])
def test_the_link_role_is_granted_by_the_hub(ptype: str, cred_pid: int | None, links: str,
                                             granted: bool) -> None:
    frame = hello(relay=True, max_message=1000)
    if granted:
        got = read(frame, ptype, cred_pid, links)
        assert got.relay and got.max_message == 1000
    else:
        with pytest.raises(HandshakeRefused, match="link"):
            read(frame, ptype, cred_pid, links)


def test_a_link_limit_that_is_not_a_positive_int_is_ignored() -> None:
    for limit in (0, -5, "big", True):
        assert read(hello(relay=True, max_message=limit)).max_message is None
