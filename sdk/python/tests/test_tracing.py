"""Trace context: a call made inside an OpenTelemetry span carries it (`traceparent`), so the
task it submits joins the caller's trace. The cluster under test traces at sample ratio 0, so
only calls that bring a sampled trace are traced."""

from __future__ import annotations

import random
import threading
import uuid

from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

import maos
from conftest import STEP_S, wait_for


def test_a_task_submitted_inside_a_span_joins_its_trace_and_one_outside_has_none(client: maos.Client) -> None:
    trace_id = random.getrandbits(128) | 1
    caller = SpanContext(trace_id=trace_id, span_id=random.getrandbits(64) | 1, is_remote=False,
                         trace_flags=TraceFlags(TraceFlags.SAMPLED))
    with trace.use_span(NonRecordingSpan(caller)):
        traced = client.submit("analyst", "submitted inside the caller's span")
    assert client.get(traced.task_id).trace_id == format(trace_id, "032x")

    untraced = client.submit("analyst", "submitted outside any span")
    assert client.get(untraced.task_id).trace_id == ""


async def test_the_asyncio_client_carries_the_trace_too(endpoints: list[str]) -> None:
    trace_id = random.getrandbits(128) | 1
    caller = SpanContext(trace_id=trace_id, span_id=random.getrandbits(64) | 1, is_remote=False,
                         trace_flags=TraceFlags(TraceFlags.SAMPLED))
    async with maos.AsyncClient(endpoints, deadline=15) as client:
        with trace.use_span(NonRecordingSpan(caller)):
            submitted = await client.submit("analyst", "submitted inside the caller's span")
        assert (await client.get(submitted.task_id)).trace_id == format(trace_id, "032x")


def test_a_workers_agent_function_runs_in_the_trace_of_the_tasks_submit(client: maos.Client) -> None:
    worker = maos.Worker(client, name=f"py-traced-{uuid.uuid4().hex[:8]}")
    seen: dict[str, object] = {}

    @worker.agent("pytraced", slots=1)
    def traced(ctx: maos.Context) -> str:
        seen["trace_id"] = trace.get_current_span().get_span_context().trace_id
        seen["sent"] = dict(maos._core.trace_context()).get("traceparent", "")
        return "done"

    runner = threading.Thread(target=worker.run, daemon=True)
    runner.start()
    try:
        assert worker.ready.wait(STEP_S)
        wait_for("the worker's agents",
                 lambda: True if any(a.agent_type == "pytraced" for a in client.agents()) else None)
        trace_id = random.getrandbits(128) | 1
        caller = SpanContext(trace_id=trace_id, span_id=random.getrandbits(64) | 1, is_remote=False,
                             trace_flags=TraceFlags(TraceFlags.SAMPLED))
        with trace.use_span(NonRecordingSpan(caller)):
            task = client.submit("pytraced", "traced through a worker")
        final = client.wait(task.task_id, timeout=STEP_S)
        assert final.state == maos.TaskState.COMPLETED, final
        assert seen["trace_id"] == trace_id, seen
        # Its calls (the completion among them) carry the trace on to the cluster.
        assert str(seen["sent"]).split("-")[1] == format(trace_id, "032x"), seen
    finally:
        worker.stop()
        runner.join(timeout=STEP_S)
