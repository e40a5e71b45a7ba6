"""The Celery side of `maos-bench e2e --peer celery` (bench/src/e2e.rs).

One module is both the Celery app (the worker imports it: `celery -A noop worker`) and the
driver (`python noop.py --tasks N --submitters S`). The driver waits for the worker, submits N
no-op tasks from S threads, then reads every result back in submit order, and prints one JSON
line: submit and end-to-end seconds and the submit-to-start latencies (the task reports the wall
time it started; one machine, one clock). Every wait is bounded.

Broker and result backend are Redis (`CELERY_BROKER`, `CELERY_BACKEND`); the broker does not
fsync, unlike MAOS, which commits every task on a majority of fsynced logs before it answers.
"""

import argparse
import json
import os
import sys
import threading
import time

from celery import Celery

app = Celery("noop", broker=os.environ.get("CELERY_BROKER"), backend=os.environ.get("CELERY_BACKEND"))
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)

WORKER_WAIT_S = 60
RESULT_WAIT_S = 300


def now_us():
    return time.time_ns() // 1000


@app.task(name="noop")
def noop(i):
    return {"i": i, "started_at_us": now_us()}


def wait_for_worker():
    deadline = time.monotonic() + WORKER_WAIT_S
    while time.monotonic() < deadline:
        if app.control.ping(timeout=0.5):
            return
    sys.exit(f"no Celery worker answered a ping within {WORKER_WAIT_S} s")


def quantile_ms(sorted_us, q):
    return sorted_us[min(len(sorted_us) - 1, int(q * len(sorted_us)))] / 1000.0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, required=True)
    parser.add_argument("--submitters", type=int, default=8)
    args = parser.parse_args()
    if args.tasks <= 0 or args.submitters <= 0:
        sys.exit("--tasks and --submitters must be positive")
    wait_for_worker()

    submitted_at = [0] * args.tasks
    handles = [None] * args.tasks

    def submit(first):
        for i in range(first, args.tasks, args.submitters):
            submitted_at[i] = now_us()
            handles[i] = noop.apply_async((i,))

    began = time.perf_counter()
    threads = [threading.Thread(target=submit, args=(s,)) for s in range(args.submitters)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    submit_s = time.perf_counter() - began

    latencies = []
    for i, handle in enumerate(handles):
        result = handle.get(timeout=RESULT_WAIT_S)
        if result.get("i") != i:
            sys.exit(f"task {i} answered {result!r}")
        latencies.append(max(1, result["started_at_us"] - submitted_at[i]))
    e2e_s = time.perf_counter() - began
    latencies.sort()
    print(
        json.dumps(
            {
                "tasks": args.tasks,
                "submit_s": submit_s,
                "e2e_s": e2e_s,
                "start_p50_ms": quantile_ms(latencies, 0.5),
                "start_p99_ms": quantile_ms(latencies, 0.99),
                "start_max_ms": latencies[-1] / 1000.0,
            }
        )
    )


if __name__ == "__main__":
    main()
