"""The asyncio client under load: 200 concurrent submits, and idempotent resubmits."""

from __future__ import annotations

import asyncio

import maos
from conftest import STEP_S


async def test_200_concurrent_submits_all_succeed_with_distinct_ids(endpoints: list[str]) -> None:
    async with maos.AsyncClient(endpoints, deadline=30) as client:
        submits = [client.submit("coder", f"concurrent {i}", input="ok") for i in range(200)]
        answers = await asyncio.wait_for(asyncio.gather(*submits), timeout=STEP_S)
        ids = [a.task_id for a in answers]
        assert len(set(ids)) == 200 and all(ids)
        assert len({a.idempotency_key for a in answers}) == 200
        assert not any(a.duplicate for a in answers)

        again = await client.submit("coder", "concurrent 7", input="ok", idempotency_key=answers[7].idempotency_key)
        assert (again.task_id, again.duplicate) == (answers[7].task_id, True)
        view = await client.get(answers[7].task_id)
        assert view.idempotency_key == answers[7].idempotency_key


async def test_the_async_watch_and_kv(endpoints: list[str]) -> None:
    async with maos.AsyncClient(endpoints) as client:
        task = await client.submit("coder", "async watch", input="sleep:200")
        states = [e.state async for e in client.watch(task.task_id, timeout=STEP_S)]
        assert states[-1] == maos.TaskState.COMPLETED, states
        revision = await client.kv.put("py-async/key", "v1")
        found = await client.kv.get("py-async/key")
        assert found is not None and (found.value, found.revision) == ("v1", revision)
