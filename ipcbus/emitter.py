"""The thread-safe, channel-oriented listener registry behind IpcBusClient and service proxies.

It follows Node's EventEmitter: listeners run in registration order (``prepend*`` puts them
first); ``once`` listeners are removed as they are taken for a dispatch, so each runs at most
once even when events race; an emit works on a snapshot, so removing a listener during a
dispatch affects the next event, not the one in progress; ``off`` removes the most recently
added registration of that listener.

Subclasses learn when a channel gains its first listener or loses its last through
:meth:`Emitter._first_listener` / :meth:`Emitter._last_listener`, called under the registry's
lock so those notifications are ordered like the changes they report.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Generic, TypeVar

from typing_extensions import Self

Listener = Callable[..., Any]
K = TypeVar("K")


class _Entry:
    __slots__ = ("listener", "once")

    def __init__(self, listener: Listener, once: bool) -> None:
        self.listener = listener
        self.once = once


def _check_listener(listener: object) -> None:
    if not callable(listener):
        raise TypeError(f"listener must be callable, not {type(listener).__name__}")


class Emitter(Generic[K]):
    """Listeners by key (a channel name for clients, an event name for proxies)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._listeners: dict[K, list[_Entry]] = {}
        # key -> listeners, for keys without ``once`` listeners: read without the lock
        self._plain: dict[K, list[Listener]] = {}

    # hooks --------------------------------------------------------------------------------
    def _check_key(self, key: object) -> K:
        return key  # type: ignore[return-value]

    def _first_listener(self, key: K) -> None:
        """``key`` got its first listener (called with the lock held)."""

    def _last_listener(self, key: K) -> None:
        """``key`` lost its last listener (called with the lock held)."""

    # adding -------------------------------------------------------------------------------
    def _add(self, key: object, listener: Listener, once: bool, prepend: bool) -> Self:
        k = self._check_key(key)
        _check_listener(listener)
        entry = _Entry(listener, once)
        with self._lock:
            entries = self._listeners.get(k)
            if entries is None:
                self._set(k, [entry])
                self._first_listener(k)
            elif prepend:
                self._set(k, [entry, *entries])
            else:
                self._set(k, [*entries, entry])
        return self

    def _set(self, key: K, entries: list[_Entry]) -> None:
        self._listeners[key] = entries
        if any(e.once for e in entries):
            self._plain.pop(key, None)
        else:
            self._plain[key] = [e.listener for e in entries]

    def on(self, channel: K, listener: Listener) -> Self:
        """Call ``listener`` for every event of ``channel``."""
        return self._add(channel, listener, False, False)

    add_listener = on

    def once(self, channel: K, listener: Listener) -> Self:
        """Call ``listener`` for the next event of ``channel`` only."""
        return self._add(channel, listener, True, False)

    def prepend_listener(self, channel: K, listener: Listener) -> Self:
        return self._add(channel, listener, False, True)

    def prepend_once_listener(self, channel: K, listener: Listener) -> Self:
        return self._add(channel, listener, True, True)

    # removing -----------------------------------------------------------------------------
    def off(self, channel: K, listener: Listener) -> Self:
        """Remove the most recent registration of ``listener`` on ``channel`` (if any).

        Like Node's ``removeListener``, a ``listener`` that is not callable raises
        ``TypeError`` (a listener that is not registered is ignored)."""
        k = self._check_key(channel)
        _check_listener(listener)
        with self._lock:
            entries = self._listeners.get(k)
            if not entries:
                return self
            for i in range(len(entries) - 1, -1, -1):
                if entries[i].listener == listener:
                    self._replace(k, entries[:i] + entries[i + 1:])
                    break
        return self

    remove_listener = off

    def remove_all_listeners(self, channel: K | None = None) -> Self:
        """Remove every listener of ``channel``, or of every channel."""
        with self._lock:
            keys = list(self._listeners) if channel is None else [self._check_key(channel)]
            for k in keys:
                if k in self._listeners:
                    self._replace(k, [])
        return self

    def _replace(self, key: K, entries: list[_Entry]) -> None:
        if entries:
            self._set(key, entries)
        else:
            self._plain.pop(key, None)
            if self._listeners.pop(key, None) is not None:
                self._last_listener(key)

    # reading ------------------------------------------------------------------------------
    def listeners(self, channel: K) -> list[Listener]:
        with self._lock:
            return [e.listener for e in self._listeners.get(self._check_key(channel), ())]

    def listener_count(self, channel: K) -> int:
        with self._lock:
            return len(self._listeners.get(self._check_key(channel), ()))

    def event_names(self) -> list[K]:
        with self._lock:
            return list(self._listeners)

    def _take(self, key: K) -> list[Listener]:
        """The listeners to call for one event, removing the ``once`` ones atomically."""
        plain = self._plain.get(key)  # the common case: no once listeners, no lock
        if plain is not None:
            return plain
        with self._lock:
            entries = self._listeners.get(key)
            if not entries:
                return []
            if any(e.once for e in entries):
                self._replace(key, [e for e in entries if not e.once])
            return [e.listener for e in entries]

    def _emit_local(self, key: K, *args: Any) -> int:
        """Call the listeners of ``key`` on this thread (for proxies); return how many ran."""
        listeners = self._take(key)
        for listener in listeners:
            listener(*args)
        return len(listeners)


Callback = Callable[[], None]


class Callbacks:
    """A small thread-safe list of no-argument callbacks (``on_closed`` handlers)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[Callback] = []

    def add(self, fn: Callback) -> None:
        _check_listener(fn)
        with self._lock:
            self._items.append(fn)

    def remove(self, fn: Callback) -> None:
        _check_listener(fn)
        with self._lock:
            if fn in self._items:
                self._items.remove(fn)

    def snapshot(self) -> list[Callback]:
        with self._lock:
            return list(self._items)
