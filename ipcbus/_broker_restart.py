"""``IpcBusBroker.create(restart=True)``: a thread of the parent that restarts a broker child
that dies, on the same address.

The :class:`Supervisor` waits (no polling) on the live child's sentinel and on a pipe that
``stop()`` writes to. When the child dies while the broker is not closed, it starts a new one
with the broker's own start routine (``IpcBusBroker._start_child``: the same address, options
and key; the dead child's socket file is replaced, as any stale file of a dead broker), then
swaps it in under the broker's lock (``broker.process`` is always the live child). A child
that cannot start is tried again after a pause that doubles up to ``MAX_PAUSE``. Every restart
is logged under the "ipcbus" logger. The thread holds the broker's lock only to swap (never
while starting a child), and the broker only weakly. Clients connected with ``reconnect``
find the new broker (README "Surviving a broker restart").
"""
from __future__ import annotations

import logging
import multiprocessing.connection
import os
import threading
import weakref
from typing import Any

log = logging.getLogger("ipcbus")

__all__ = ["Supervisor", "MAX_PAUSE"]

FIRST_PAUSE = 0.1  # seconds before starting again a child that could not start
MAX_PAUSE = 5.0


class Supervisor:
    """Restarts the child of ``broker`` (an ``IpcBusBroker``) until :meth:`stop`."""

    def __init__(self, broker: Any) -> None:
        self._broker = weakref.ref(broker)
        self._lock = threading.Lock()
        self._stopped = False
        self._read_fd, self._write_fd = os.pipe()  # stop() -> the thread; each end closed once
        self.restarts = 0
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"ipcbus-broker-supervisor {broker.address}")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """No more restarts (``close()``); returns at once (the thread ends by itself)."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            try:
                os.write(self._write_fd, b"x")
            except OSError:  # the thread has ended and closed its end
                pass
            os.close(self._write_fd)

    def _run(self) -> None:
        try:
            pause = FIRST_PAUSE
            while True:
                broker = self._broker()
                if broker is None:
                    return
                proc = broker.process
                del broker  # not kept alive by this thread while it waits
                if self._wait([proc.sentinel]):
                    return
                if self._restart(proc):
                    pause = FIRST_PAUSE
                elif self._stopped or self._wait([], pause):
                    return
                else:
                    pause = min(pause * 2, MAX_PAUSE)
        except BaseException:  # pragma: no cover - a bug: report it
            log.exception("ipcbus: the broker supervisor failed")
        finally:
            os.close(self._read_fd)

    def _wait(self, objects: list[Any], timeout: float | None = None) -> bool:
        """Wait for ``objects`` (or ``timeout``); True if stop() was called."""
        ready = multiprocessing.connection.wait([*objects, self._read_fd], timeout)
        return self._read_fd in ready

    def _restart(self, dead: Any) -> bool:
        """Start a new child in place of ``dead``; False if it could not start."""
        broker = self._broker()
        if broker is None or broker.closed or broker.process is not dead:
            return True  # closed (the loop ends), or already replaced
        dead.join(5.0)  # reaped (its exit code known), and let go by multiprocessing
        log.warning("ipcbus: the broker at %s (pid %s) died with exit code %s; restarting it",
                    broker.address, dead.pid, dead.exitcode)
        try:
            child = broker._start_child(broker.address, broker._authkey)
        except Exception as exc:
            log.error("ipcbus: the broker at %s could not be restarted: %s", broker.address,
                      exc)
            return False
        if not broker._replace_child(dead, *child):
            return True
        self.restarts += 1
        log.warning("ipcbus: the broker at %s restarted (pid %s)", broker.address,
                    child[0].pid)
        return True
