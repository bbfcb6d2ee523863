"""A client's listeners in groups: ``client.on(channel, listener, group="pool")``.

Listeners in a group share the work of the group's members (SPEC 0.2, "groups"): the hub
hands each message or request of the channel to ONE member process of each group, wrapped in
a GROUPED frame that names the group (``_router_groups``). A client keeps its group listeners
in a second registry, keyed by ``(channel, group)``, so that:

* its plain listeners of the channel (``channel`` key) run for every message, as before, and
  its group listeners only for the frames the hub chose it for in that group;
* a channel's first listener of a group sends SUBSCRIBE with the group as its body, the last
  one UNSUBSCRIBE (ordered with the plain registry's: both share the client's lock);
* a client that has group listeners only on a channel is not a plain subscriber of it.

:class:`GroupedEmitter` is the client's base: its ``on``/``add_listener``/``once``/
``prepend_listener``/``prepend_once_listener``/``off``/``remove_listener`` take an optional
``group``.
"""
from __future__ import annotations

import logging
from typing import Any

from typing_extensions import Self

from .. import _protocol as P
from .._protocol import Kind
from ..emitter import Emitter, Listener
from ..errors import IpcBusError
from .shm_delivery import ZeroCopyListener

__all__ = ["GroupedEmitter", "GroupListeners"]

log = logging.getLogger("ipcbus")


class GroupListeners(Emitter[tuple[str, str]]):
    """A client's listeners in groups, keyed by ``(channel, group)``."""

    def __init__(self, owner: GroupedEmitter) -> None:
        super().__init__()
        self._owner = owner
        self._lock = owner._lock  # ordered with the plain registry's subscriptions

    def _first_listener(self, key: tuple[str, str]) -> None:
        self._owner._group_subscription(Kind.SUBSCRIBE, key)

    def _last_listener(self, key: tuple[str, str]) -> None:
        self._owner._group_subscription(Kind.UNSUBSCRIBE, key)


def group_frame(kind: int, key: tuple[str, str], info: Any) -> bytes:
    """The SUBSCRIBE / UNSUBSCRIBE of a group (body: the group's name)."""
    channel, group = key
    return P.encode_frame(kind, channel, info, None, 1 if kind == Kind.SUBSCRIBE else 0,
                          P.pack_payload(group))


class GroupedEmitter(Emitter[str]):
    """The listener registry of a client, with groups (see the module docstring)."""

    _conn: Any
    _member: Any

    def __init__(self) -> None:
        super().__init__()
        self._groups = GroupListeners(self)

    def _group_key(self, channel: str, group: str) -> tuple[str, str]:
        channel = P.check_channel(channel)
        if channel.startswith(P.RESERVED_PREFIX):
            raise ValueError(f"channel {channel!r} is reserved: it has no groups")
        return channel, P.check_group(group)

    def _group_subscription(self, kind: int, key: tuple[str, str]) -> None:
        conn = self._conn
        if conn is not None and not conn.closed:
            member = self._member
            try:
                conn.send_surely(member, group_frame(kind, key, member.info))
            except IpcBusError as exc:
                log.debug("%s of group %r of %r not sent: %s", Kind(kind).name, key[1],
                          key[0], exc)

    def _on_reserved_group(self, channel: str, listener: Listener, group: str,
                           on: bool) -> None:
        """``on``/``off`` in ``group`` of a reserved channel: for the library's own protocols
        only (a service hosted by a group listens on its call channel so; the hub lets only
        the pool's members join)."""
        key = (P.check_channel(channel), P.check_group(group))
        if on:
            self._groups.on(key, listener)
        else:
            self._groups.off(key, listener)

    def _rejoin_reserved_group(self, channel: str, group: str) -> None:
        """Subscribe again the membership of a reserved channel after a reconnection (the
        replay of ``joining.join`` leaves those out: the hub takes a pooled service's
        membership only once its host has claimed the name again)."""
        key = (channel, group)
        with self._lock:
            if self._groups._listeners.get(key):
                self._group_subscription(Kind.SUBSCRIBE, key)

    def _group_take(self, channel: str, group: str) -> list[Listener]:
        return self._groups._take((channel, group))

    def on(self, channel: str, listener: Listener, group: str | None = None,
           zero_copy: bool = False) -> Self:
        """Call ``listener`` for every event of ``channel`` (``group``: for those the hub
        gives this client as the chosen member of that group; ``zero_copy``: large
        arguments that came through shared memory as read-only memoryviews, valid until it
        returns or a ``event.retain()`` is released: ``shm_delivery.py``). While the bus is
        down (a client connected with ``reconnect``) this changes the registry only: it is
        subscribed again on reconnection (nothing raises)."""
        if zero_copy:
            listener = ZeroCopyListener(listener)
        if group is None:
            return super().on(channel, listener)
        self._groups.on(self._group_key(channel, group), listener)
        return self

    add_listener = on

    def once(self, channel: str, listener: Listener, group: str | None = None) -> Self:
        if group is None:
            return super().once(channel, listener)
        self._groups.once(self._group_key(channel, group), listener)
        return self

    def prepend_listener(self, channel: str, listener: Listener,
                         group: str | None = None) -> Self:
        if group is None:
            return super().prepend_listener(channel, listener)
        self._groups.prepend_listener(self._group_key(channel, group), listener)
        return self

    def prepend_once_listener(self, channel: str, listener: Listener,
                              group: str | None = None) -> Self:
        if group is None:
            return super().prepend_once_listener(channel, listener)
        self._groups.prepend_once_listener(self._group_key(channel, group), listener)
        return self

    def off(self, channel: str, listener: Listener, group: str | None = None) -> Self:
        if group is None:
            return super().off(channel, listener)
        self._groups.off(self._group_key(channel, group), listener)
        return self

    remove_listener = off

    def remove_all_listeners(self, channel: str | None = None) -> Self:
        """Remove every listener of ``channel`` (or of every channel), groups included."""
        with self._lock:
            super().remove_all_listeners(channel)
            for key in list(self._groups._listeners):
                if channel is None or key[0] == channel:
                    self._groups._replace(key, [])
        return self
