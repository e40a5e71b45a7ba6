"""Run by `node/tests/python_sdk.rs`, which kills a node under this process:

    python watch_through_kill.py ENDPOINTS

A worker (serving `pyfailover`) and a watch both start on the first endpoint. The script submits
a task that works for a few seconds, watches it, and prints `{"watching": ...}` after the first
event; the test then kills the node behind the first endpoint. The watch must reopen through
another endpoint to see the task's end, and the worker's assignment stream and heartbeats must
move too for a `pyfailover` task submitted after the kill to complete. Prints the outcome.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import uuid

import maos


def main() -> int:
    endpoints = sys.argv[1].split(",")
    client = maos.Client(endpoints, deadline=20)
    worker = maos.Worker(client, name=f"py-failover-{uuid.uuid4().hex[:8]}")

    @worker.agent("pyfailover", slots=1)
    def answer(ctx: maos.Context) -> str:
        return f"served after the kill: {ctx.input}"

    runner = threading.Thread(target=worker.run, daemon=True)
    runner.start()
    if not worker.ready.wait(60):
        print(json.dumps({"error": "the worker never registered"}), flush=True)
        return 7
    deadline = time.monotonic() + 60
    while not any(a.agent_type == "pyfailover" for a in client.agents()):
        if time.monotonic() > deadline:
            print(json.dumps({"error": "the worker's agents never showed"}), flush=True)
            return 7
        time.sleep(0.1)

    task = client.submit("coder", "outlive the watching node", input="sleep:4000", max_retries=3)
    events = client.watch(task.task_id, timeout=120)
    first = next(events)
    print(json.dumps({"watching": task.task_id, "via": endpoints[0], "state": first.state.value}), flush=True)
    last = first
    for event in events:
        if event.task_id == task.task_id:
            last = event

    after = client.submit("pyfailover", "after the kill", input="ping")
    served = client.wait(after.task_id, timeout=60)
    worker.stop()
    runner.join(timeout=30)
    print(json.dumps({"task_id": task.task_id, "state": last.state.value, "finished": last.finished,
                      "worker_task": served.state.value, "worker_result": served.result}), flush=True)
    ok = last.state == maos.TaskState.COMPLETED and served.state == maos.TaskState.COMPLETED
    return 0 if ok else 7


if __name__ == "__main__":
    sys.exit(main())
