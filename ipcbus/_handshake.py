"""The hub's side of the handshake: what a client's HELLO may ask, decided from what the hub
knows (pure; the frame layout and the bodies are in ``_protocol``).

A HELLO names the client's pid and may ask for the *relay* role (a bridge's link). The hub
decides who the connection's peers are (SPEC "Trust"): on a Unix socket the pid is the
kernel's (``cred_pid``), on a pipe or TCP the HELLO's, fixed from then on. The relay role
changes policy (a link speaks for the peers of a whole side and is not paused like an ordinary
sender), so it is granted by the hub's ``links`` policy, never taken from the HELLO alone:

* ``"owner"``: on the Unix socket, only the process that started the hub (``owner_pid``); on
  TCP, whoever proved the authkey;
* ``"any"``: every connection the hub admits; ``"none"``: no links. Pipes never link.

A link also tells its own message limit (``max_message``): the hub never sends it a larger
frame.
"""
from __future__ import annotations

from typing import NamedTuple

from . import _protocol as P
from .errors import IpcBusProtocolError

__all__ = ["Hello", "HandshakeRefused", "read_hello", "link_refusal", "LINK_POLICIES"]

LINK_POLICIES = frozenset({"owner", "any", "none"})


class HandshakeRefused(Exception):
    """The HELLO is refused; the reason is told to the client in a NOTICE."""


class Hello(NamedTuple):
    """An accepted HELLO."""

    pid: int  # the pid it reports (used where the kernel tells none)
    version: int  # the highest protocol version it speaks
    relay: bool  # granted the link role
    max_message: int | None  # a link's own limit, if it told one


def read_hello(frame: P.Frame, *, ptype: str, cred_pid: int | None, links: str,
               owner_pid: int | None) -> Hello:
    """Check a connection's first frame; :class:`HandshakeRefused` with the reason if it may
    not join. ``ptype``: the kind of connection; ``cred_pid``: the pid the kernel reported
    (None for a pipe or TCP)."""
    try:
        body = P.check_hello(frame)
    except IpcBusProtocolError as exc:
        raise HandshakeRefused(str(exc)) from None
    pid = body.get("pid")
    if type(pid) is not int or not 0 < pid < 2**31:
        raise HandshakeRefused(f"HELLO with an invalid pid {pid!r}")
    relay = bool(body.get("relay"))
    limit = None
    if relay:
        refusal = link_refusal(ptype, cred_pid, links, owner_pid)
        if refusal is not None:
            raise HandshakeRefused(refusal)
        asked = body.get("max_message")
        if type(asked) is int and asked > 0:
            limit = asked
    return Hello(pid, body["version"], relay, limit)


def link_refusal(ptype: str, cred_pid: int | None, links: str,
                 owner_pid: int | None) -> str | None:
    """Why this connection may not act as a bridge's link (None: it may)."""
    if ptype != "socket" or links == "none":
        return "this hub accepts no bridge links on this connection"
    if links == "any" or cred_pid is None:  # TCP: it proved the authkey
        return None
    if owner_pid is not None and cred_pid == owner_pid:
        return None
    return ("this broker accepts a bridge link only from the process that started it"
            f" (pid {owner_pid}); start it with links='any' to accept links from"
            " other processes")
