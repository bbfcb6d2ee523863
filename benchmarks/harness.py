"""Process harness of the benchmark suite: roles in spawned processes, bounded waits.

Every role (publisher, subscriber, requester, responder, relay broker, zmq proxy) runs in its
own process from ``multiprocessing.get_context("spawn")``. The coordinator (``run.py``, the
main process) talks to each role over a control pipe:

    child -> ("ready", info)             set up (connected, subscribed), waiting for commands
    parent -> Round(...)                 run one round
    child -> ("armed", None)             receivers only: about to receive, start the senders
    child -> ("done", result)            the round's result (timings, latencies)
    parent -> None                       tear down
    child -> ("closed", None)
    child -> ("error", traceback)        at any point; the child then exits

The coordinator never sleeps and hopes: every wait is a ``multiprocessing.connection.wait``
on the control pipes *and* the process sentinels, with a deadline. A process that dies, a
role that reports an error and a deadline that passes all raise :class:`BenchFailure`; the
:class:`ProcessGroup` then kills every process it started.
"""
from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Protocol

CTX = multiprocessing.get_context("spawn")

Notify = Callable[[str], None]


class BenchFailure(Exception):
    """A workload failed: a loss, a reordering, an error in a role, a hang or a dead process."""


@dataclass(frozen=True)
class Round:
    """One measured round, sent to every role of a workload."""

    n: int  # messages per subscriber, or measured round trips
    size: int  # payload bytes
    warmup: int = 0  # unmeasured round trips before the measured ones (round-trip workloads)
    window: int = 0  # the most messages a publisher leaves unacknowledged (0: no window)
    ack_every: int = 0  # a subscriber acknowledges every ack_every messages, and the last one
    timeout: float = 30.0  # how long a role may wait for the others within the round


class Role(Protocol):
    """What runs in a role process: set up in ``__init__``, then one ``run`` per round."""

    def run(self, cmd: Round, notify: Notify) -> dict[str, Any]: ...

    def close(self) -> None: ...


@dataclass
class RoleSpec:
    """How to make a role: ``factory(**kwargs)`` in a fresh spawned process."""

    name: str
    factory: Callable[..., Role]
    kwargs: dict[str, Any] = field(default_factory=dict)


def role_main(ctrl: multiprocessing.connection.Connection, factory: Callable[..., Role],
              kwargs: dict[str, Any]) -> None:
    """The body of every role process."""
    try:
        role = factory(**kwargs)
        ctrl.send(("ready", {"pid": os.getpid()}))
        while True:
            cmd = ctrl.recv()
            if cmd is None:
                break
            result = role.run(cmd, lambda tag: ctrl.send((tag, None)))
            ctrl.send(("done", result))
        role.close()
        ctrl.send(("closed", None))
    except EOFError:  # the coordinator has gone: nothing left to report to
        return
    except BenchFailure as exc:  # a loss, a reordering, a timeout: the message says it all
        try:
            ctrl.send(("error", str(exc)))
        except OSError:
            pass
    except BaseException:
        try:
            ctrl.send(("error", traceback.format_exc()))
        except OSError:
            pass


class RoleHandle:
    """The coordinator's side of one role process."""

    def __init__(self, spec: RoleSpec) -> None:
        self.name = spec.name
        parent, child = CTX.Pipe(duplex=True)
        self.conn = parent
        self.proc = CTX.Process(target=role_main, args=(child, spec.factory, spec.kwargs),
                                name=f"bench {spec.name}", daemon=True)
        self.proc.start()
        child.close()
        self.info: dict[str, Any] = {}
        self.closing = False

    @property
    def pid(self) -> int:
        pid = self.proc.pid
        assert pid is not None
        return pid

    def send(self, cmd: Optional[Round]) -> None:
        try:
            self.conn.send(cmd)
        except OSError as exc:
            raise BenchFailure(f"{self.name}: cannot send a command: {exc}") from None


class ProcessGroup:
    """The processes of one workload; on exit, whatever is still alive is killed."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.roles: list[RoleHandle] = []
        self.watched: list[tuple[str, Any]] = []  # (name, multiprocessing.Process) not ours

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill_all()

    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise BenchFailure("the workload's overall timeout has passed")
        return left

    def watch(self, name: str, proc: Any) -> None:
        """Fail at once if ``proc`` (e.g. the ipcbus broker's child) dies during the workload."""
        self.watched.append((name, proc))

    def start(self, specs: Iterable[RoleSpec]) -> list[RoleHandle]:
        """Start the roles in parallel and wait until each is ready."""
        handles = [RoleHandle(spec) for spec in specs]
        self.roles.extend(handles)
        for handle, info in zip(handles, self.expect(handles, "ready")):
            handle.info = info
        return handles

    def expect(self, handles: list[RoleHandle], tag: str) -> list[Any]:
        """The next message of each handle, which must carry ``tag``; its payloads, in order."""
        results: dict[int, Any] = {}
        pending = {id(h.conn): h for h in handles}
        while pending:
            waitables: list[Any] = [h.conn for h in pending.values()]
            waitables += [h.proc.sentinel for h in self.roles if not h.closing]
            waitables += [p.sentinel for _, p in self.watched]
            ready = multiprocessing.connection.wait(waitables, self.remaining())
            if not ready:
                names = ", ".join(h.name for h in pending.values())
                raise BenchFailure(f"timed out waiting for {tag!r} from {names}")
            conns = [r for r in ready if id(r) in pending]
            for conn in conns:
                handle = pending.pop(id(conn))
                try:
                    got, payload = handle.conn.recv()
                except (EOFError, OSError):
                    raise BenchFailure(self._death(handle)) from None
                if got == "error":
                    raise BenchFailure(f"{handle.name} failed: {payload}")
                if got != tag:
                    raise BenchFailure(f"{handle.name}: expected {tag!r}, got {got!r}")
                results[id(handle)] = payload
            if not conns:  # a sentinel: some process has died
                for h in self.roles:
                    if not h.closing and not h.proc.is_alive():
                        if h.conn.poll(0):  # it said something first (its error): read it
                            try:
                                got, payload = h.conn.recv()
                            except (EOFError, OSError):
                                raise BenchFailure(self._death(h)) from None
                            if got == "error":
                                raise BenchFailure(f"{h.name} failed: {payload}")
                        raise BenchFailure(self._death(h))
                for name, proc in self.watched:
                    if not proc.is_alive():
                        raise BenchFailure(f"{name} died (exit code {proc.exitcode})")
        return [results[id(h)] for h in handles]

    @staticmethod
    def _death(handle: RoleHandle) -> str:
        handle.proc.join(1.0)
        return f"{handle.name} died unexpectedly (exit code {handle.proc.exitcode})"

    def run_round(self, receivers: list[RoleHandle], senders: list[RoleHandle],
                  cmd: Round) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Arm the receivers, then start the senders; the results of both."""
        for h in receivers:
            h.send(cmd)
        self.expect(receivers, "armed")
        for h in senders:
            h.send(cmd)
        done = self.expect(receivers + senders, "done")
        return done[:len(receivers)], done[len(receivers):]

    def close(self, handles: list[RoleHandle]) -> None:
        """Tear the roles down gracefully, in the order given."""
        for h in handles:
            h.send(None)
            self.expect([h], "closed")
            h.closing = True
            h.proc.join(max(0.1, min(5.0, self.remaining())))

    def kill_all(self) -> None:
        for h in self.roles:
            if h.proc.is_alive():
                h.proc.kill()
        for h in self.roles:
            h.proc.join(5.0)
            h.conn.close()


@dataclass
class Topology:
    """The roles of one workload for one implementation, and what the coordinator must do.

    ``brokers`` start first (their pid is then known for the memory report), then the
    ``receivers`` (subscribed when ready), then the ``senders``. ``broker_pid`` names a broker
    that lives outside the group (the ipcbus broker's own child, or this process for a
    bridge); ``on_started`` runs once every role is ready, ``close`` at the end, always.
    """

    receivers: list[RoleSpec]
    senders: list[RoleSpec]
    brokers: list[RoleSpec] = field(default_factory=list)
    broker_pid: Optional[int] = None
    broker_label: str = "broker"
    watch: list[tuple[str, Any]] = field(default_factory=list)
    on_started: Callable[[], None] = lambda: None
    close: Callable[[], None] = lambda: None


# -- measurements ------------------------------------------------------------------------------
def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (q in 0..100)."""
    if not sorted_values:
        raise ValueError("no values")
    rank = max(1, -(-len(sorted_values) * q // 100))  # ceil(n * q / 100)
    return sorted_values[int(rank) - 1]


def read_status_kib(pid: int, field_name: str) -> Optional[int]:
    """A ``kB`` field of /proc/PID/status (VmHWM: peak RSS, VmRSS: current RSS), in KiB."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM of ``pid`` to its current RSS (Linux >= 4.0); False if not possible."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
