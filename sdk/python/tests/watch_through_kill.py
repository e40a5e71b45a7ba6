"""Run by `node/tests/python_sdk.rs`, which kills a node under this watch:

    python watch_through_kill.py ENDPOINTS

Submits a task that works for a few seconds and watches it through the first endpoint; prints
`{"watching": ...}` after the first event (the test then kills the node behind the first
endpoint) and, at the end, the last event's state. The watch must reopen through another
endpoint for the task's end to be seen at all.
"""

from __future__ import annotations

import json
import sys

import maos


def main() -> int:
    endpoints = sys.argv[1].split(",")
    client = maos.Client(endpoints, deadline=20)
    task = client.submit("coder", "outlive the watching node", input="sleep:4000", max_retries=3)
    events = client.watch(task.task_id, timeout=120)
    first = next(events)
    print(json.dumps({"watching": task.task_id, "via": endpoints[0], "state": first.state.value}), flush=True)
    last = first
    for event in events:
        if event.task_id == task.task_id:
            last = event
    print(json.dumps({"task_id": task.task_id, "state": last.state.value, "finished": last.finished}), flush=True)
    return 0 if last.state == maos.TaskState.COMPLETED else 7


if __name__ == "__main__":
    sys.exit(main())
