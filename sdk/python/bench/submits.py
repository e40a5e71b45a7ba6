"""Submits per second from one Python process, through the SDK, against a running cluster.

    python sdk/python/bench/submits.py --endpoints 127.0.0.1:8000,127.0.0.1:8001,127.0.0.1:8002

Three modes, each bounded by `--count` submits and `--seconds` seconds (whichever ends first):
`sync-sequential` (one `maos.Client`, one submit after another), `sync-threads` (one client
shared by `--threads` threads), `async` (one `maos.AsyncClient`, `--concurrency` submits in flight).
Tasks are builtin `coder` echoes (`--task-type`), so the cluster also runs what is submitted.
Prints one line per mode: submits/s and latency percentiles (ms).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import maos

COUNT_MAX = 100_000
SECONDS_MAX = 600.0


def percentile(latencies_s: list[float], q: float) -> float:
    if not latencies_s:
        return float("nan")
    ordered = sorted(latencies_s)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def report(mode: str, done: int, elapsed_s: float, latencies_s: list[float], errors: int, as_json: bool) -> None:
    row = {
        "mode": mode, "submits": done, "errors": errors, "seconds": round(elapsed_s, 2),
        "submits_per_s": round(done / elapsed_s, 1) if elapsed_s > 0 else 0.0,
        "p50_ms": round(percentile(latencies_s, 0.50), 2), "p99_ms": round(percentile(latencies_s, 0.99), 2),
        "mean_ms": round(statistics.fmean(latencies_s) * 1000, 2) if latencies_s else float("nan"),
    }
    if as_json:
        print(json.dumps(row), flush=True)
    else:
        print(f"{mode:<16} {row['submits_per_s']:>8} submits/s  p50 {row['p50_ms']:>7} ms  p99 {row['p99_ms']:>7} ms"
              f"  ({done} submits in {row['seconds']} s, {errors} errors)", flush=True)


def sync_run(client: maos.Client, args: argparse.Namespace, threads: int) -> tuple[int, float, list[float], int]:
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    next_index = 0
    started = time.monotonic()
    stop_at = started + args.seconds

    def take() -> int:
        nonlocal next_index
        with lock:
            if next_index >= args.count or time.monotonic() > stop_at:
                return -1
            next_index += 1
            return next_index

    def loop() -> None:
        nonlocal errors
        while (i := take()) >= 0:
            t0 = time.monotonic()
            try:
                client.submit(args.task_type, f"bench {i}", input="ok")
            except maos.MaosError:
                with lock:
                    errors += 1
                continue
            with lock:
                latencies.append(time.monotonic() - t0)

    if threads == 1:
        loop()
    else:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for f in [pool.submit(loop) for _ in range(threads)]:
                f.result()
    return len(latencies), time.monotonic() - started, latencies, errors


async def async_run(args: argparse.Namespace) -> tuple[int, float, list[float], int]:
    latencies: list[float] = []
    errors = 0
    async with maos.AsyncClient(args.endpoints.split(","), deadline=30) as client:
        loop = asyncio.get_running_loop()
        started = loop.time()
        stop_at = started + args.seconds
        counter = iter(range(args.count))

        async def submitter() -> None:
            nonlocal errors
            for i in counter:
                if loop.time() > stop_at:
                    return
                t0 = loop.time()
                try:
                    await client.submit(args.task_type, f"bench {i}", input="ok")
                except maos.MaosError:
                    errors += 1
                    continue
                latencies.append(loop.time() - t0)

        await asyncio.gather(*(submitter() for _ in range(args.concurrency)))
        return len(latencies), loop.time() - started, latencies, errors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--endpoints", default=os.environ.get("MAOS_ENDPOINTS", "127.0.0.1:8000"))
    parser.add_argument("--count", type=int, default=2000, help=f"submits per mode (at most {COUNT_MAX})")
    parser.add_argument("--seconds", type=float, default=30.0, help=f"time per mode (at most {SECONDS_MAX})")
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--task-type", default="coder")
    parser.add_argument("--modes", default="sync-sequential,sync-threads,async")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not 1 <= args.count <= COUNT_MAX or not 0 < args.seconds <= SECONDS_MAX:
        parser.error(f"--count must be in 1..={COUNT_MAX} and --seconds in (0, {SECONDS_MAX}]")
    runs: dict[str, Callable[[], tuple[int, float, list[float], int]]] = {}
    client = maos.Client(args.endpoints.split(","), deadline=30)
    runs["sync-sequential"] = lambda: sync_run(client, args, 1)
    runs["sync-threads"] = lambda: sync_run(client, args, args.threads)
    runs["async"] = lambda: asyncio.run(async_run(args))
    client.submit(args.task_type, "warm-up", input="ok")  # connect before timing
    for mode in args.modes.split(","):
        done, elapsed, latencies, errors = runs[mode]()
        report(f"{mode}" + (f" x{args.threads}" if mode == "sync-threads" else "")
               + (f" x{args.concurrency}" if mode == "async" else ""), done, elapsed, latencies, errors, args.json)
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
