"""The ipcbus benchmark suite (issue 6): ipcbus side by side with the alternatives.

    python benchmarks/run.py                 # full: ~1 s per measurement, medians of 3 rounds
    python benchmarks/run.py --smoke         # tiny sizes, 1 round, no verdicts (CI)
    python benchmarks/run.py --only W1,W4 --rounds 5 --json results.json
    python benchmarks/run.py --only W1 --federation   # + federation over NATS (federation.py)

See benchmarks/README.md for what each workload measures and how to read the table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import msgpack

import impl_floor
import impl_ipcbus
import impl_relay
import impl_zmq
from harness import (BenchFailure, ProcessGroup, Round, Topology, percentile, read_status_kib,
                     reset_peak_rss)

KiB, MiB = 1 << 10, 1 << 20
SMALL = 100
LARGE_SIZES = (1 * MiB, 16 * MiB)
WINDOW_MIB = 32  # W4: at most this much unacknowledged per publisher (brokers only)
RSS_LIMIT_MIB = 100.0


# -- what is measured --------------------------------------------------------------------------
@dataclass(frozen=True)
class Impl:
    key: str
    topology: Callable[[str, int, str], Topology]
    windowed: bool  # W4 through a broker: the publisher waits for acks (see WINDOW_MIB)
    available: bool = True


IPCBUS = Impl("ipcbus", impl_ipcbus.broker_topology, windowed=True)
BRIDGE = Impl("ipcbus bridge", impl_ipcbus.bridge_topology, windowed=True)
DIRECT = Impl("ipcbus direct", impl_ipcbus.direct_topology, windowed=False)
# large payloads (issue 18): listeners with zero_copy=True; the arena turned off (inline)
ZERO_COPY = Impl("ipcbus zero_copy", impl_ipcbus.zero_copy_topology, windowed=True)
INLINE = Impl("ipcbus inline", impl_ipcbus.inline_topology, windowed=True)
RELAY = Impl("mp-relay", impl_relay.topology, windowed=True)
ZMQ = Impl("zmq", impl_zmq.topology, windowed=True, available=impl_zmq.AVAILABLE)
PIPE = Impl("Pipe", impl_floor.pipe_topology, windowed=False)
SOCKETPAIR = Impl("socketpair", impl_floor.socketpair_topology, windowed=False)
ALTERNATIVES = [RELAY, ZMQ, PIPE, SOCKETPAIR]
BROKERS = {RELAY.key, ZMQ.key}  # the alternatives that are brokers (the others are floors)


@dataclass(frozen=True)
class Case:
    """One set of processes: a kind of exchange, a number of subscribers, payload sizes."""

    kind: str  # "rtt" (request/response round trips) or "stream" (one-way messages)
    nsubs: int
    sizes: tuple[int, ...]


@dataclass(frozen=True)
class Row:
    """One line of the table."""

    workload: str
    label: str
    case: Case
    size: int
    metric: str  # "p50", "p99", "msg/s", "deliveries/s", "MB/s"
    subject: Impl  # what the "ipcbus" column measures
    alternatives: tuple[Impl, ...]
    target: Optional[tuple[str, float]] = None  # (">=" or "<=", value)
    ratio_target: Optional[float] = None  # ipcbus/best broker at least this (same run)

    @property
    def lower_is_better(self) -> bool:
        return self.metric in ("p50", "p99")


W1 = Case("rtt", 1, (SMALL,))
W1G = Case("rtt", 4, (SMALL,))  # ipcbus only: 4 responders in one group, each request to one
W2 = Case("stream", 1, (SMALL,))
W3 = Case("stream", 4, (SMALL,))
W4 = Case("stream", 1, LARGE_SIZES)
W6 = Case("stream", 4, (16 * MiB,))
ALL_ALTS = tuple(ALTERNATIVES)
BROKER_ALTS = (RELAY, ZMQ)


def workload_rows(name: str) -> list[Row]:
    if name == "W1":
        return [Row("W1", "req/resp 100 B", W1, SMALL, "p50", IPCBUS, ALL_ALTS, ("<=", 150.0)),
                Row("W1", "req/resp 100 B", W1, SMALL, "p99", IPCBUS, ALL_ALTS)]
    if name == "W1G":  # a group's dispatch should cost the broker no more than a plain request
        return [Row("W1G", "req/resp 100 B, group of 4", W1G, SMALL, "p50", IPCBUS, ()),
                Row("W1G", "req/resp 100 B, group of 4", W1G, SMALL, "p99", IPCBUS, ())]
    if name == "W2":
        return [Row("W2", "1 -> 1, 100 B", W2, SMALL, "msg/s", IPCBUS, ALL_ALTS,
                    (">=", 300e3))]
    if name == "W3":
        return [Row("W3", "1 -> 4, 100 B", W3, SMALL, "deliveries/s", IPCBUS, BROKER_ALTS,
                    (">=", 600e3))]
    if name == "W4":
        return [Row("W4", "1 -> 1, 1 MiB", W4, 1 * MiB, "MB/s", IPCBUS, ALL_ALTS),
                Row("W4", "1 -> 1, 1 MiB zero_copy", W4, 1 * MiB, "MB/s", ZERO_COPY, ALL_ALTS),
                Row("W4", "1 -> 1, 1 MiB inline", W4, 1 * MiB, "MB/s", INLINE, ALL_ALTS),
                Row("W4", "1 -> 1, 16 MiB", W4, 16 * MiB, "MB/s", IPCBUS, ALL_ALTS,
                    (">=", 1500.0)),
                Row("W4", "1 -> 1, 16 MiB zero_copy", W4, 16 * MiB, "MB/s", ZERO_COPY,
                    ALL_ALTS, ratio_target=3.0),
                Row("W4", "1 -> 1, 16 MiB inline", W4, 16 * MiB, "MB/s", INLINE, ALL_ALTS)]
    if name == "W6":
        return [Row("W6", "1 -> 4, 16 MiB", W6, 16 * MiB, "MB/s", IPCBUS, BROKER_ALTS,
                    ratio_target=4.0),
                Row("W6", "1 -> 4, 16 MiB zero_copy", W6, 16 * MiB, "MB/s", ZERO_COPY,
                    BROKER_ALTS, ratio_target=4.0),
                Row("W6", "1 -> 4, 16 MiB inline", W6, 16 * MiB, "MB/s", INLINE,
                    BROKER_ALTS)]
    if name == "W5":
        rows = []
        for subject, how in ((BRIDGE, "bridge"), (DIRECT, "direct")):
            rows += [Row("W5", f"{how} req/resp 100 B", W1, SMALL, "p50", subject, ALL_ALTS),
                     Row("W5", f"{how} req/resp 100 B", W1, SMALL, "p99", subject, ALL_ALTS),
                     Row("W5", f"{how} 1 -> 1, 100 B", W2, SMALL, "msg/s", subject, ALL_ALTS),
                     Row("W5", f"{how} 1 -> 1, 1 MiB", W4, 1 * MiB, "MB/s", subject, ALL_ALTS),
                     Row("W5", f"{how} 1 -> 1, 16 MiB", W4, 16 * MiB, "MB/s", subject,
                         ALL_ALTS)]
        return rows
    raise ValueError(f"unknown workload {name!r}")


WORKLOADS = ["W1", "W1G", "W2", "W3", "W4", "W5", "W6"]


# -- configuration -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    smoke: bool
    rounds: int
    seconds: float  # wanted duration of one measured round (full mode)
    round_timeout: float  # how long a role waits for the others within a round
    window_mib: int = WINDOW_MIB  # W4 through a broker: unacknowledged MiB per publisher

    def fixed_count(self, kind: str, size: int) -> int:
        """Smoke mode: tiny fixed sizes."""
        if kind == "rtt":
            return 300
        return {SMALL: 5000, 1 * MiB: 20, 16 * MiB: 4}.get(size, 10)

    @staticmethod
    def pilot_count(kind: str, size: int) -> int:
        if kind == "rtt":
            return 500
        return {SMALL: 20000, 1 * MiB: 100, 16 * MiB: 10}.get(size, 20)

    @staticmethod
    def count_bounds(kind: str, size: int) -> tuple[int, int]:
        if kind == "rtt":
            return 1000, 100_000
        return {SMALL: (20_000, 3_000_000), 1 * MiB: (100, 20_000),
                16 * MiB: (16, 2_000)}.get(size, (10, 1000))

    def case_timeout(self, case: Case) -> float:
        per_round = self.round_timeout + 5.0
        return 30.0 + per_round * (self.rounds + 1) * len(case.sizes)


def make_round(impl: Impl, case: Case, size: int, n: int, cfg: Config) -> Round:
    window = ack_every = 0
    if case.kind == "stream" and impl.windowed and size >= 64 * KiB:
        window = max(2, cfg.window_mib * MiB // size)
        ack_every = max(1, window // 4)
    warmup = min(200, n // 10) if case.kind == "rtt" else 0
    return Round(n=n, size=size, warmup=warmup, window=window, ack_every=ack_every,
                 timeout=cfg.round_timeout)


# -- running one case ----------------------------------------------------------------------------
@dataclass
class CaseResult:
    impl: str
    case: Case
    rounds: dict[int, list[dict[str, float]]] = field(default_factory=dict)  # size -> metrics
    counts: dict[int, int] = field(default_factory=dict)  # size -> messages per round
    broker: Optional[str] = None
    peak_rss_kib: Optional[int] = None
    error: Optional[str] = None
    seconds: float = 0.0

    def median(self, size: int, metric: str) -> Optional[float]:
        if self.error is not None or size not in self.rounds:
            return None
        return statistics.median(r[metric] for r in self.rounds[size])


def round_metrics(case: Case, size: int, receivers: list[dict[str, Any]],
                  senders: list[dict[str, Any]]) -> dict[str, float]:
    if case.kind == "rtt":
        lat = sorted(senders[0]["lat_us"])
        return {"p50": percentile(lat, 50), "p99": percentile(lat, 99),
                "mean": statistics.fmean(lat), "seconds": sum(lat) / 1e6}
    total = sum(r["count"] for r in receivers)
    span = max(r["t_last"] for r in receivers) - min(r["t_first"] for r in receivers)
    if span <= 0:
        raise BenchFailure("too few messages to time the stream")
    rate = (total - 1) / span  # deliveries after the first one, over first -> last receipt
    return {"msg/s": rate, "deliveries/s": rate, "MB/s": rate * size / 1e6, "seconds": span}


def run_case(impl: Impl, case: Case, cfg: Config, log: Callable[[str], None]) -> CaseResult:
    result = CaseResult(impl.key, case)
    started = time.monotonic()
    tmpdir = tempfile.mkdtemp(prefix="ipcbench-", dir="/tmp")  # short: Unix socket paths
    topo: Optional[Topology] = None
    try:
        topo = impl.topology(case.kind, case.nsubs, tmpdir)
        with ProcessGroup(time.monotonic() + cfg.case_timeout(case)) as group:
            for name, proc in topo.watch:
                group.watch(name, proc)
            brokers = group.start(topo.brokers)
            broker_pid = brokers[0].pid if brokers else topo.broker_pid
            if broker_pid is not None:
                result.broker = topo.broker_label
                reset_peak_rss(broker_pid)  # a fresh process, except the bridge's host
            receivers = group.start(topo.receivers)
            senders = group.start(topo.senders)
            topo.on_started()
            for size in case.sizes:
                if cfg.smoke:
                    n = cfg.fixed_count(case.kind, size)
                else:  # a pilot round (also a warm-up) sizes the measured rounds
                    pilot_n = cfg.pilot_count(case.kind, size)
                    pilot = round_metrics(case, size, *group.run_round(
                        receivers, senders, make_round(impl, case, size, pilot_n, cfg)))
                    lo, hi = cfg.count_bounds(case.kind, size)
                    # aim a little above cfg.seconds: rounds vary, most should last >= that
                    per_second = pilot_n / max(pilot["seconds"], 1e-6)
                    n = int(min(hi, max(lo, per_second * 1.25 * cfg.seconds)))
                result.counts[size] = n
                result.rounds[size] = [
                    round_metrics(case, size, *group.run_round(
                        receivers, senders, make_round(impl, case, size, n, cfg)))
                    for _ in range(cfg.rounds)]
            if broker_pid is not None:
                result.peak_rss_kib = read_status_kib(broker_pid, "VmHWM")
            group.close(senders + receivers)
            group.watched.clear()  # the ipcbus broker may now stop
            group.close(brokers)
    except BenchFailure as exc:
        result.error = str(exc)
    except Exception as exc:  # a bug of the coordinator or of a library call in it
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        if topo is not None:
            try:
                topo.close()
            except Exception as exc:
                result.error = result.error or f"closing: {type(exc).__name__}: {exc}"
        shutil.rmtree(tmpdir, ignore_errors=True)
        result.seconds = time.monotonic() - started
    log(f"  {impl.key:<14} {case.kind:<6} subs={case.nsubs} "
        f"{'+'.join(_size(s) for s in case.sizes):<12} {result.seconds:5.1f} s"
        + (f"  FAILED: {result.error.splitlines()[0]}" if result.error else ""))
    return result


# -- formatting ----------------------------------------------------------------------------------
def _size(size: int) -> str:
    return f"{size // MiB} MiB" if size >= MiB and size % MiB == 0 else f"{size} B"


def fmt(value: Optional[float], metric: str) -> str:
    if value is None:
        return "-"
    if metric in ("p50", "p99"):
        return f"{value:.0f}" if value >= 100 else f"{value:.1f}"
    if metric == "MB/s":
        return f"{value:.0f}"
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    return f"{value / 1e3:.0f}k"


METRIC_TEXT = {"p50": "p50 us (lower)", "p99": "p99 us (lower)", "msg/s": "msg/s (higher)",
               "deliveries/s": "deliveries/s (higher)", "MB/s": "MB/s (higher)"}


def best_of(values: dict[str, float], lower: bool) -> Optional[tuple[str, float]]:
    if not values:
        return None
    key = (min if lower else max)(values, key=lambda k: values[k])
    return key, values[key]


def table(rows: list[Row], results: dict[tuple[str, Case], CaseResult], cfg: Config
          ) -> tuple[str, list[dict[str, Any]]]:
    alt_keys = [a.key for a in ALTERNATIVES]
    header = (["workload", "metric", "ipcbus"] + alt_keys
              + ["best alt", "ipcbus/best", "ipcbus/best broker", "target"])
    lines: list[list[str]] = []
    records: list[dict[str, Any]] = []

    def cell(impl: Impl, row: Row) -> tuple[str, Optional[float]]:
        if not impl.available:
            return "n/a", None
        res = results.get((impl.key, row.case))
        if res is None:
            return "-", None
        if res.error is not None:
            return "FAIL", None
        value = res.median(row.size, row.metric)
        return fmt(value, row.metric), value

    for row in rows:
        subject_text, subject = cell(row.subject, row)
        alt_values: dict[str, float] = {}
        cells = []
        for alt in ALTERNATIVES:
            text, value = cell(alt, row) if alt in row.alternatives else ("", None)
            cells.append(text)
            if value is not None:
                alt_values[alt.key] = value
        lower = row.lower_is_better
        best = best_of(alt_values, lower)
        best_broker = best_of({k: v for k, v in alt_values.items() if k in BROKERS}, lower)
        ratio = subject / best[1] if subject is not None and best else None
        ratio_b = subject / best_broker[1] if subject is not None and best_broker else None
        target_text, verdict = "", None
        if row.target is not None:
            op, goal = row.target
            target_text = f"{op} {fmt(goal, row.metric)}"
            if subject is not None and not cfg.smoke:
                verdict = subject <= goal if op == "<=" else subject >= goal
                target_text += " ok" if verdict else " MISS"
        if row.ratio_target is not None:
            target_text = f"x >= {row.ratio_target:.1f}"
            if ratio_b is not None and not cfg.smoke:
                verdict = ratio_b >= row.ratio_target
                target_text += " ok" if verdict else " MISS"
        lines.append([f"{row.workload} {row.label}", METRIC_TEXT[row.metric], subject_text] + cells
                     + [f"{best[0]} {fmt(best[1], row.metric)}" if best else "-",
                        f"{ratio:.2f}" if ratio is not None else "-",
                        f"{ratio_b:.2f}" if ratio_b is not None else "-", target_text])
        records.append({"workload": row.workload, "label": row.label, "metric": row.metric,
                        "subject": row.subject.key, "value": subject,
                        "alternatives": alt_values, "best": best, "ratio": ratio,
                        "ratio_best_broker": ratio_b, "target": row.target,
                        "target_met": verdict})
    widths = [max(len(x) for x in col) for col in zip(header, *lines)]
    out = []
    for i, line in enumerate([header] + lines):
        out.append("  ".join(c.ljust(w) if j < 2 else c.rjust(w)
                             for j, (c, w) in enumerate(zip(line, widths))).rstrip())
        if i == 0:
            out.append("-" * len(out[0]))
    return "\n".join(out), records


def memory_lines(results: dict[tuple[str, Case], CaseResult], cfg: Config) -> list[str]:
    lines = []
    for impl in [IPCBUS, RELAY, ZMQ, BRIDGE]:
        parts, peaks = [], []
        for name, case in (("W2", W2), ("W3", W3), ("W4", W4)):
            res = results.get((impl.key, case))
            if res is None or res.peak_rss_kib is None:
                continue
            mib = res.peak_rss_kib / 1024
            peaks.append(mib)
            parts.append(f"{name} {mib:.1f}")
        if not parts:
            continue
        label = (results.get((impl.key, W2)) or results.get((impl.key, W4))
                 or results[(impl.key, W3)]).broker
        verdict = ""
        if impl is IPCBUS:
            verdict = f"; target < {RSS_LIMIT_MIB:.0f} MiB"
            if not cfg.smoke:
                verdict += ": ok" if max(peaks) < RSS_LIMIT_MIB else ": MISS"
        where = " (W5, same cases)" if impl is BRIDGE else ""
        lines.append(f"  {impl.key}: {label} peak RSS (VmHWM){where} {' / '.join(parts)} MiB"
                     f"{verdict}")
    return lines


def machine() -> dict[str, Any]:
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                                text=True, cwd=os.path.dirname(os.path.abspath(__file__)),
                                timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    import ipcbus
    info: dict[str, Any] = {
        "nproc": len(os.sched_getaffinity(0)), "cpu_count": os.cpu_count(), "cpu": model,
        "python": platform.python_version(), "kernel": platform.release(),
        "loadavg": os.getloadavg(),
        "ipcbus": f"{ipcbus.__version__} ({commit or 'no git'})",
        "msgpack": ".".join(map(str, msgpack.version)),
        "pyzmq": impl_zmq.VERSION or "not installed: skipped",
    }
    return info


# -- main ----------------------------------------------------------------------------------------
def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny fixed sizes, 1 round, no target verdicts (CI)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="measured rounds per measurement; medians are reported"
                             " (default 3, or 1 with --smoke)")
    parser.add_argument("--only", default=",".join(WORKLOADS),
                        help="comma-separated workloads to run (default: all of"
                             f" {','.join(WORKLOADS)})")
    parser.add_argument("--seconds", type=float, default=1.0,
                        help="wanted duration of one measured round in full mode (default 1)")
    parser.add_argument("--window-mib", type=int, default=WINDOW_MIB,
                        help="W4 through a broker: the publisher leaves at most this many MiB"
                             f" unacknowledged (at least 2 messages; default {WINDOW_MIB})")
    parser.add_argument("--alternatives", default=",".join(a.key for a in ALTERNATIVES),
                        help="comma-separated alternatives to run beside ipcbus, or 'none'"
                             " (default: all)")
    parser.add_argument("--json", metavar="PATH", help="also write the results there")
    parser.add_argument("--federation", action="store_true",
                        help="also run benchmarks/federation.py (federation over NATS beside raw"
                             " nats-py; skipped when nats-server or nats-py is missing)")
    args = parser.parse_args(argv)
    only = [w.strip().upper() for w in args.only.split(",") if w.strip()]
    unknown = [w for w in only if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workloads {unknown}; choose from {','.join(WORKLOADS)}")
    by_key = {a.key.lower(): a for a in ALTERNATIVES}
    wanted = [a.strip().lower() for a in args.alternatives.split(",") if a.strip()]
    if wanted == ["none"]:
        wanted = []
    if any(a not in by_key for a in wanted):
        parser.error(f"unknown alternatives in {args.alternatives!r}; choose from"
                     f" {','.join(by_key)} or none")
    alternatives = {by_key[a].key for a in wanted}
    rounds = args.rounds if args.rounds is not None else (1 if args.smoke else 3)
    if rounds < 1 or args.seconds <= 0 or args.window_mib < 1:
        parser.error("--rounds, --seconds and --window-mib must be positive")
    cfg = Config(smoke=args.smoke, rounds=rounds, seconds=args.seconds,
                 round_timeout=20.0 if args.smoke else max(30.0, 20 * args.seconds),
                 window_mib=args.window_mib)

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    command = shlex.join(getattr(sys, "orig_argv", [sys.executable] + sys.argv))
    info = machine()
    print(f"command: {command}")
    print(f"machine: nproc {info['nproc']} (cpu_count {info['cpu_count']}), {info['cpu']},"
          f" Linux {info['kernel']}, Python {info['python']}")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in info['loadavg'])}"
          " (other work on the machine skews the numbers)")
    print(f"versions: ipcbus {info['ipcbus']}, msgpack {info['msgpack']}, pyzmq {info['pyzmq']}")
    mode = "smoke (tiny sizes, no verdicts)" if cfg.smoke else \
        f"full (~{cfg.seconds:g} s per measured round, after a pilot round)"
    print(f"mode: {mode}; medians of {cfg.rounds} round(s); workloads {','.join(only)}",
          flush=True)

    t0 = time.monotonic()
    results: dict[tuple[str, Case], CaseResult] = {}
    rows: list[Row] = []
    for name in only:
        log(f"{name}:")
        for row in workload_rows(name):
            rows.append(row)
            for impl in (row.subject,) + row.alternatives:
                if impl in ALTERNATIVES and impl.key not in alternatives:
                    continue
                if impl.available and (impl.key, row.case) not in results:
                    results[(impl.key, row.case)] = run_case(impl, row.case, cfg, log)
    elapsed = time.monotonic() - t0

    text, records = table(rows, results, cfg)
    print()
    print("Ratios read ipcbus/best alternative: for latency (us) lower is better, so < 1 means"
          " ipcbus is faster;")
    print("for throughput higher is better, so > 1 means ipcbus is faster. 'best alt' includes"
          " the raw Pipe/socketpair floor;")
    print("'ipcbus/best broker' compares with mp-relay and zmq only. Throughput is timed at the"
          " subscriber(s), from the first")
    print("to the last message received. W5 rows compare the bridge / direct channel with the"
          " alternatives of W1, W2 and W4.")
    print()
    print(text)
    w1, w1g = results.get((IPCBUS.key, W1)), results.get((IPCBUS.key, W1G))
    if w1 is not None and w1g is not None:
        p50, p50g = w1.median(SMALL, "p50"), w1g.median(SMALL, "p50")
        if p50 and p50g:
            print(f"\nW1G/W1 p50: {p50g / p50:.2f} (a request through a group of 4 vs one"
                  " responder, same run)")
    print()
    print("memory (W2-W4 brokers; the bridge lives in the coordinator's process):")
    for line in memory_lines(results, cfg) or ["  (no broker measured)"]:
        print(line)
    failures = [r for r in results.values() if r.error is not None]
    for res in failures:
        print(f"\nFAILED: {res.impl} {res.case.kind} subs={res.case.nsubs}"
              f" sizes={[_size(s) for s in res.case.sizes]}:\n{res.error}")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\ntotal time {elapsed:.1f} s; {len(failures)} failure(s); load average at end {load}")

    if args.federation:
        import federation  # a workload of its own: its own NATS server and processes
        print()
        federation.main(["--smoke"] if cfg.smoke else [])

    if args.json:
        doc = {"command": command, "machine": info, "mode": "smoke" if cfg.smoke else "full",
               "rounds": cfg.rounds, "seconds": cfg.seconds, "elapsed": elapsed,
               "rows": records,
               "cases": [{"impl": r.impl, "kind": r.case.kind, "nsubs": r.case.nsubs,
                          "counts": r.counts, "rounds": r.rounds, "broker": r.broker,
                          "peak_rss_kib": r.peak_rss_kib, "error": r.error,
                          "seconds": r.seconds} for r in results.values()]}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
