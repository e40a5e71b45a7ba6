"""A worker process for the tests: serves `pyresearch` (a type no builtin agent serves).

    python pyresearch_worker.py ENDPOINTS NAME

The first attempt of a task saves a checkpoint, says so on stdout, and then waits to be killed;
an attempt that receives a checkpoint answers with it. Prints `ready` once registered.
"""

from __future__ import annotations

import json
import sys
import threading

import maos


def main() -> int:
    endpoints, name = sys.argv[1].split(","), sys.argv[2]
    worker = maos.Worker(maos.Client(endpoints), name=name)

    @worker.agent("pyresearch", capabilities=["python"], slots=1)
    def research(ctx: maos.Context) -> str:
        if ctx.saved_checkpoint is None:
            ctx.progress(10, "phase 1")
            ctx.checkpoint(f"phase-1 of {ctx.input}")
            print(json.dumps({"checkpointed": ctx.task_id, "attempt": ctx.attempt}), flush=True)
            ctx.wait_cancelled(120)  # the test kills this process here
            raise maos.TaskFailed("the first attempt was not killed", retryable=False)
        return json.dumps({"resumed_from": ctx.saved_checkpoint, "attempt": ctx.attempt, "worker": name})

    def announce() -> None:
        if worker.ready.wait(60):
            print("ready", flush=True)

    threading.Thread(target=announce, daemon=True).start()
    worker.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
