"""Workers written with the SDK: a checkpoint survives `kill -9` of the worker process and is
handed to the successor; a lost lease stops the agent function and fences its reports."""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest

import maos
from conftest import STEP_S, WorkerProcess, wait_for


def served(client: maos.Client, agent_type: str, worker_name: str) -> bool | None:
    agents = client.agents()
    return True if any(a.agent_type == agent_type and f"w:{worker_name}/" in a.agent_id for a in agents) else None


def test_a_killed_workers_checkpoint_is_handed_to_its_successor(client: maos.Client, endpoints: list[str]) -> None:
    joined = ",".join(endpoints)
    # Names unique to this run: a worker registering under an old name would get its old leases.
    run = uuid.uuid4().hex[:8]
    first_name, second_name = f"py-research-a-{run}", f"py-research-b-{run}"
    with WorkerProcess("pyresearch_worker.py", joined, first_name) as first:
        first.expect("ready")
        wait_for("the first worker's agents", lambda: served(client, "pyresearch", first_name))
        task = client.submit("pyresearch", "research with a crash", input="topic-42", max_retries=2,
                             capabilities=["python"])
        line = json.loads(first.expect("{").strip())
        assert line == {"checkpointed": task.task_id, "attempt": 1}
        view = client.get(task.task_id)
        assert (view.state, view.checkpoint, view.checkpoint_attempt) == (
            maos.TaskState.RUNNING, "phase-1 of topic-42", 1), view
        assert view.progress_percent == 10
        first.kill()

    with WorkerProcess("pyresearch_worker.py", joined, second_name) as second:
        second.expect("ready")
        final = client.wait(task.task_id, timeout=STEP_S)
        assert final.state == maos.TaskState.COMPLETED, final
        answer = json.loads(final.result)
        assert answer["resumed_from"] == "phase-1 of topic-42", answer
        assert answer["worker"] == second_name, answer
        # Attempt 2, unless the scheduler leased it once more to the dead worker in the instant
        # its liveness window closed (that lease expires too, and then the successor's is 3).
        assert answer["attempt"] >= 2 and answer["attempt"] == final.attempt, (answer, final)


def test_a_cancelled_task_stops_a_sync_function_and_refuses_its_reports(
        client: maos.Client) -> None:
    worker = maos.Worker(client, name=f"py-cancel-{uuid.uuid4().hex[:8]}")
    started = threading.Event()
    seen: dict[str, object] = {}

    @worker.agent("pycancel", slots=1)
    def slow(ctx: maos.Context) -> str:
        started.set()
        seen["cancelled"] = ctx.wait_cancelled(STEP_S)
        try:
            ctx.checkpoint("too late")
            seen["report"] = "sent"
        except maos.LeaseLost:
            seen["report"] = "refused"
        return "never reported"

    runner = threading.Thread(target=worker.run, daemon=True)
    runner.start()
    try:
        assert worker.ready.wait(STEP_S)
        wait_for("the worker's agents", lambda: served(client, "pycancel", worker.name))
        task = client.submit("pycancel", "to be cancelled")
        assert started.wait(STEP_S)
        assert task.task_id in client.cancel(task.task_id, "the test cancels it")
        wait_for("the function to see the cancellation", lambda: seen.get("report"))
        assert seen == {"cancelled": True, "report": "refused"}
        view = client.get(task.task_id)
        assert (view.state, view.checkpoint, view.result) == (maos.TaskState.CANCELLED, "", ""), view
    finally:
        worker.stop()
        runner.join(timeout=STEP_S)
    assert not runner.is_alive(), "worker.stop() ends run()"


async def test_an_async_agent_function_completes_and_reports(endpoints: list[str]) -> None:
    client = maos.AsyncClient(endpoints)
    worker = maos.Worker(client, name=f"py-async-{uuid.uuid4().hex[:8]}")

    @worker.agent("pyasync", slots=2)
    async def echo(ctx: maos.AsyncContext) -> dict[str, str]:
        await ctx.progress(50, "halfway")
        await ctx.checkpoint("half")
        return {"echo": ctx.input, "checkpoint": ctx.saved_checkpoint or ""}

    import asyncio

    running = asyncio.create_task(worker.run_async())
    try:
        deadline = time.monotonic() + STEP_S
        while not worker.ready.is_set() or not any(a.agent_type == "pyasync" for a in await client.agents()):
            assert time.monotonic() < deadline, "the async worker never registered"
            await asyncio.sleep(0.1)
        task = await client.submit("pyasync", "async echo", input="hi")
        final = await client.wait(task.task_id, timeout=STEP_S)
        assert final.state == maos.TaskState.COMPLETED, final
        assert json.loads(final.result) == {"echo": "hi", "checkpoint": "half"}
    finally:
        worker.stop()
        await asyncio.wait_for(running, timeout=STEP_S)
        await client.close()


def test_a_worker_needs_an_agent() -> None:
    worker = maos.Worker(maos.Client(["127.0.0.1:1"]), name="nothing")
    with pytest.raises(maos.InvalidArgument) as refused:
        worker.run()
    assert refused.value.field == "agent_types"
