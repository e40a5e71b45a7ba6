"""The asyncio client (grpc.aio): the same calls, policy and views as `maos.Client`."""

from __future__ import annotations

import asyncio
from typing import Any, List, AsyncIterator, Iterable, Mapping, Optional, Sequence, TypeVar, Union

import grpc
import grpc.aio

from . import _core
from ._core import Call, Plan, Stubs, TlsOptions, Workflow
from .errors import DeadlineExceeded, MaosError, Unavailable, from_rpc_error
from .v1 import kv_pb2, tasks_pb2
from .views import (
    Agent, BatchItem, CasResult, KeyEvent, KeyValue, Priority, Submitted, Task, TaskEvent, TaskPage,
    TaskResults, TaskSpec, TaskState,
)

T = TypeVar("T")


class AsyncClient:
    """Like `maos.Client`, with `async` methods; make it inside the event loop that uses it."""

    def __init__(self, endpoints: Union[str, Iterable[str]], token: Optional[str] = None,
                 tls: Optional[TlsOptions] = None, deadline: float = _core.DEADLINE_DEFAULT_S) -> None:
        self.options = _core.make_options(endpoints, token, tls, deadline)
        credentials = self.options.tls.credentials() if self.options.tls is not None else None
        channel_options = self.options.channel_options()
        self._channels = [
            grpc.aio.secure_channel(t, credentials, channel_options) if credentials is not None
            else grpc.aio.insecure_channel(t, channel_options)
            for t in self.options.endpoints
        ]
        self._stubs = [Stubs(c) for c in self._channels]
        self._preferred = 0
        self.kv = AsyncKvClient(self)

    @property
    def endpoints(self) -> tuple[str, ...]:
        return self.options.endpoints

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def _run(self, call: Call[T], deadline: Optional[float] = None) -> T:
        loop = asyncio.get_running_loop()
        total = self.options.deadline_s if deadline is None else deadline
        started = loop.time()
        index = self._preferred
        last: Optional[MaosError] = None
        count = len(self._stubs)
        attempts = 0
        while attempts < _core.ATTEMPTS_MAX:
            remaining = total - (loop.time() - started)
            if remaining <= 0:
                break
            limit = min(remaining, self.options.attempt_timeout_s)
            endpoint = self.options.endpoints[index]
            try:
                answer = await call.invoke(self._stubs[index], limit, self.options.metadata())
            except grpc.RpcError as e:
                error = from_rpc_error(e, endpoint)
                if _core.pushed_back(error, remaining):
                    # Refused before anything was done, with when to call again: wait, then
                    # retry here (not counted as an attempt; the deadline bounds it).
                    last = error
                    await asyncio.sleep(max(error.pushback_s or 0, 0.001))
                    continue
                if not _core.retryable(error.code, call.idempotent):
                    raise error from None
                attempts += 1
                last = error
                index = (index + 1) % count
                if index == 0 or count == 1:
                    await asyncio.sleep(min(_core.ROUND_BACKOFF_S, max(remaining, 0)))
                continue
            self._preferred = index
            return call.convert(answer)
        raise Unavailable(
            f"no endpoint could serve {call.method} within {total:.1f} s; last: {last}",
            code=grpc.StatusCode.UNAVAILABLE, endpoint=last.endpoint if last else None,
        )

    async def submit(self, task_type: Union[str, TaskSpec], description: str = "", input: str = "", *,
                     priority: Priority = Priority.NORMAL, depends_on: Sequence[str] = (), parent: str = "",
                     max_retries: int = 0, timeout_ms: int = 0, idempotency_key: str = "", submitter: str = "",
                     labels: Optional[Mapping[str, str]] = None, capabilities: Sequence[str] = (),
                     plan: bool = False, max_agents: int = 0) -> Submitted:
        spec = _core._spec(task_type, description, input=input, priority=priority, depends_on=depends_on,
                           parent=parent, max_retries=max_retries, timeout_ms=timeout_ms,
                           idempotency_key=idempotency_key, submitter=submitter, labels=labels or {},
                           capabilities=capabilities, plan=plan, max_agents=max_agents)
        return await self._run(_core.submit(spec))

    async def batch_submit(self, specs: Sequence[TaskSpec]) -> List[BatchItem]:
        return await self._run(_core.batch_submit(specs))

    async def get(self, task_id: str, *, stale: bool = False) -> Task:
        return await self._run(_core.get(task_id, stale))

    async def list(self, *, states: Sequence[Union[TaskState, str]] = (), task_type: str = "",
                   parent: str = "", submitter: str = "", page_size: int = 100, stale: bool = False,
                   pages_max: Optional[int] = None) -> AsyncIterator[TaskPage]:
        token = ""
        pages = 0
        while pages_max is None or pages < pages_max:
            page = await self._run(_core.list_page(states, task_type, parent, submitter, page_size, token, stale))
            pages += 1
            yield page
            token = page.next_page_token
            if not token:
                return

    async def results(self, task_id: str) -> TaskResults:
        return await self._run(_core.results(task_id))

    async def cancel(self, task_id: str, reason: str = "") -> List[str]:
        return await self._run(_core.cancel(task_id, reason))

    async def retry(self, task_id: str) -> Task:
        return await self._run(_core.retry(task_id))

    async def agents(self, node_id: int = 0) -> List[Agent]:
        return await self._run(_core.agents(node_id))

    async def watch(self, task_id: str, *, include_children: bool = False, timeout: Optional[float] = None,
                    reconnects_max: int = _core.WATCH_RECONNECTS_MAX) -> AsyncIterator[TaskEvent]:
        """As `Client.watch`."""
        loop = asyncio.get_running_loop()
        request = tasks_pb2.WatchTaskRequest(task_id=task_id, include_children=include_children)
        started = loop.time()
        reconnects = 0
        index = self._preferred
        while True:
            remaining = None if timeout is None else timeout - (loop.time() - started)
            if remaining is not None and remaining <= 0:
                raise DeadlineExceeded(f"Watch did not finish within {timeout} s",
                                       code=grpc.StatusCode.DEADLINE_EXCEEDED)
            endpoint = self.options.endpoints[index]
            stream = self._stubs[index].tasks.Watch(request, timeout=remaining, metadata=self.options.metadata())
            error: Optional[MaosError] = None
            try:
                async for message in stream:
                    event = TaskEvent.from_proto(message)
                    yield event
                    if event.finished and event.task_id == task_id:
                        return
            except grpc.RpcError as e:
                error = _core.stream_error(e, endpoint, remaining is not None)
            finally:
                stream.cancel()
            reconnects = _core.count_reconnect(reconnects, reconnects_max, f"watch of {task_id}", error,
                                               "the stream ended early", endpoint)
            index = (index + 1) % len(self._stubs)
            await asyncio.sleep(_core.STREAM_RETRY_S)

    async def wait(self, task_id: str, *, timeout: Optional[float] = None) -> Task:
        async for _ in self.watch(task_id, timeout=timeout):
            pass
        return await self.get(task_id)

    async def submit_workflow(self, plan: Union[Plan, Mapping[str, Any], None] = None, *, description: str = "",
                              planner_input: Union[str, Mapping[str, Any], None] = None,
                              task_type: str = "mixed", max_retries: int = 3, max_agents: int = 0,
                              idempotency_key: str = "", submitter: str = "", priority: Priority = Priority.NORMAL,
                              labels: Optional[Mapping[str, str]] = None) -> Workflow:
        """As `Client.submit_workflow`."""
        key = idempotency_key or _core.idempotency_key()
        base = TaskSpec(task_type=task_type, description=description, priority=priority, max_retries=max_retries,
                        idempotency_key=key, submitter=submitter, labels=dict(labels or {}), max_agents=max_agents)
        if plan is None:
            base.input = _core.planner_input(planner_input)
            base.plan = True
            if not base.description:
                base.description = "a planned workflow"
            return Workflow((await self._run(_core.submit(base))).task_id, {}, key)
        steps = (plan if isinstance(plan, Plan) else Plan.from_dict(plan)).ordered()
        ids: dict[str, str] = {}
        for step in steps:
            ids[step.key] = (await self._run(_core.submit(_core.step_spec(step, ids, key, base)))).task_id
        return Workflow(ids[steps[-1].key], ids, key)


class AsyncKvClient:
    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def get(self, key: str, *, stale: bool = False) -> Optional[KeyValue]:
        return await self._client._run(_core.kv_get(key, stale))

    async def put(self, key: str, value: str, *, ttl_ms: int = 0) -> int:
        return await self._client._run(_core.kv_put(key, value, ttl_ms))

    async def delete(self, key: str) -> bool:
        return await self._client._run(_core.kv_delete(key))

    async def cas(self, key: str, expected: Optional[str], value: str, *, ttl_ms: int = 0) -> CasResult:
        return await self._client._run(_core.kv_cas(key, expected, value, ttl_ms))

    async def watch(self, prefix: str, *, timeout: Optional[float] = None,
                    reconnects_max: int = _core.WATCH_RECONNECTS_MAX) -> AsyncIterator[KeyEvent]:
        client = self._client
        loop = asyncio.get_running_loop()
        request = kv_pb2.WatchKeysRequest(prefix=prefix)
        started = loop.time()
        reconnects = 0
        index = client._preferred
        while True:
            remaining = None if timeout is None else timeout - (loop.time() - started)
            if remaining is not None and remaining <= 0:
                raise DeadlineExceeded(f"Watch did not finish within {timeout} s",
                                       code=grpc.StatusCode.DEADLINE_EXCEEDED)
            endpoint = client.options.endpoints[index]
            stream = client._stubs[index].kv.Watch(request, timeout=remaining, metadata=client.options.metadata())
            error: Optional[MaosError] = None
            try:
                async for message in stream:
                    yield KeyEvent.from_proto(message)
            except grpc.RpcError as e:
                error = _core.stream_error(e, endpoint, remaining is not None)
            finally:
                stream.cancel()
            reconnects = _core.count_reconnect(reconnects, reconnects_max, f"key watch of {prefix!r}", error,
                                               "the stream ended", endpoint)
            index = (index + 1) % len(client._stubs)
            await asyncio.sleep(_core.STREAM_RETRY_S)
