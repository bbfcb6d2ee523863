"""NATS subjects of a federated bus: channel and bus names as subject tokens, and back.

Pure. A NATS subject is tokens separated by ``.``; a token cannot hold ``.``, whitespace,
``*`` or ``>`` (and the server's control line bounds its length). :func:`encode_token` maps
any name to a token that round-trips (:func:`decode_token`): ASCII letters, digits, ``_``,
``-`` and ``/`` stay as they are, every other byte of the UTF-8 becomes ``%XX``, the empty
name is ``%``. A token longer than :data:`MAX_TOKEN` is replaced by ``#`` and the SHA-256 of
the name (the frame carries the channel itself, so a subject only has to tell channels
apart): such a token does not decode (None).

The subjects of bus ``B`` (``ipcbus.<B>.``...):

* ``c.<channel>``: broadcasts and requests on a channel (a link subscribes it only while a
  peer of its broker listens there plainly: NATS carries only what someone wants);
* ``l.<link>``: frames for one broker (send_to, targeted requests, a group's chosen member,
  cancels);
* ``r.<link>.<n>``: the answers to request ``n`` a link sent out (a request's reply subject,
  so NATS's "no responders" status names the request it is about);
* ``ctl``: the links' announcements (peers, subscriptions, services, hello and bye).
"""
from __future__ import annotations

import hashlib

__all__ = ["encode_token", "decode_token", "Subjects", "MAX_TOKEN"]

MAX_TOKEN = 512  # longer encodings are hashed (NATS's control line is 4 KiB by default)
_SAFE_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-/"
_SAFE = frozenset(_SAFE_CHARS.encode())
_SAFE_STR = frozenset(_SAFE_CHARS)


def encode_token(name: str) -> str:
    """``name`` as one NATS subject token (see the module's docstring)."""
    if not name:
        return "%"
    if _SAFE_STR.issuperset(name):
        token = name
    else:
        token = "".join(chr(b) if b in _SAFE else f"%{b:02X}" for b in name.encode("utf-8"))
    if len(token) > MAX_TOKEN:
        return "#" + hashlib.sha256(name.encode("utf-8")).hexdigest()
    return token


def decode_token(token: str) -> str | None:
    """The name :func:`encode_token` made ``token`` from (None for a hashed token)."""
    if token == "%":
        return ""
    if token.startswith("#"):
        return None
    if "%" not in token:
        return token
    out = bytearray()
    i = 0
    while i < len(token):
        ch = token[i]
        if ch == "%":
            out.append(int(token[i + 1:i + 3], 16))
            i += 3
        else:
            out.append(ord(ch))
            i += 1
    return out.decode("utf-8")


class Subjects:
    """The subjects of one bus name, for one link (``link``: its id)."""

    def __init__(self, bus: str, link: str) -> None:
        self.prefix = f"ipcbus.{encode_token(bus)}"
        self.link = link
        self.ctl = f"{self.prefix}.ctl"
        self.inbox = self.to_link(link)
        self.replies = f"{self.prefix}.r.{link}"

    def channel(self, name: str) -> str:
        return f"{self.prefix}.c.{encode_token(name)}"

    def to_link(self, link: str) -> str:
        return f"{self.prefix}.l.{link}"

    def reply(self, n: int) -> str:
        return f"{self.replies}.{n}"
