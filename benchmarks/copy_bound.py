"""The most a 1 -> N fan-out of large ``bytes`` can reach on this machine (issue 18, W6).

    python benchmarks/copy_bound.py            # 16 MiB, 4 receivers, 2 copying processes
    python benchmarks/copy_bound.py --smoke    # a few copies (CI)

With ``bytes`` delivery (SPEC "Large payloads through shared memory") one message of ``size``
bytes to ``N`` receivers costs at least ``N + 1`` copies of ``size`` bytes: the sender's into its
arena and one out of it per receiver (a ``bytes`` owns its memory). Whatever the bus does, the
fan-out cannot deliver more than ``N * size`` bytes per ``(N + 1) * t / cores`` seconds, where
``t`` is the time of one copy while every core copies at once. This script measures ``t`` as
the W6 stream makes it: each of ``cores`` processes copies ``size`` bytes from a slot of one
shared mapping (rotating over ``--slots`` slots, as the arena's first-fit allocator does over
the messages in flight) into a new ``bytes``, all processes at the same time, and prints that
bound next to the time of one copy alone. No bus is involved: it is the ceiling a W6 figure
is to be read against.
"""
from __future__ import annotations

import argparse
import mmap
import multiprocessing
import os
import statistics
import sys
import time
from typing import Any

MiB = 1 << 20


def copier(mapping: mmap.mmap, size: int, slots: int, count: int, start: Any, out: Any
           ) -> None:
    view = memoryview(mapping)
    for i in range(slots):  # warm: every page mapped, the allocator's heap grown
        bytes(view[i * size:(i + 1) * size])
    start.wait()
    times = []
    for i in range(count):
        offset = (i % slots) * size
        t0 = time.perf_counter()
        data = bytes(view[offset:offset + size])
        times.append(time.perf_counter() - t0)
        del data
    view.release()
    out.put(statistics.median(times))


def copy_time(size: int, slots: int, count: int, procs: int) -> float:
    """Median seconds of one copy of ``size`` bytes while ``procs`` processes copy at once."""
    ctx = multiprocessing.get_context("fork")  # the children share the parent's mapping
    mapping = mmap.mmap(-1, size * slots)  # shared, as an arena's slots are among receivers
    for i in range(slots):
        mapping[i * size:(i + 1) * size] = b"x" * size
    start, out = ctx.Barrier(procs), ctx.Queue()
    workers = [ctx.Process(target=copier, args=(mapping, size, slots, count, start, out))
               for _ in range(procs)]
    for w in workers:
        w.start()
    medians = [out.get(timeout=120) for _ in workers]
    for w in workers:
        w.join(30)
    mapping.close()
    return float(statistics.median(medians))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=16, help="MiB per message (16)")
    parser.add_argument("--receivers", type=int, default=4)
    parser.add_argument("--slots", type=int, default=3, help="slots in flight (3)")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    size, n = args.size * MiB, args.receivers
    count = 5 if args.smoke else 60
    print(f"command: {' '.join([sys.executable] + sys.argv)}")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    alone = copy_time(size, args.slots, count, 1)
    together = copy_time(size, args.slots, count, args.cores)
    bound = n * size / ((n + 1) * together / args.cores) / 1e6
    print(f"one {args.size} MiB copy: {alone * 1e3:.2f} ms alone,"
          f" {together * 1e3:.2f} ms with {args.cores} processes copying at once")
    print(f"1 -> {n} fan-out with bytes delivery: at most {bound:.0f} MB/s"
          f" ({n + 1} copies per message on {args.cores} cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
