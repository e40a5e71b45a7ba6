"""The synchronous client: every call has a deadline, fails over to the next endpoint when one
cannot serve it, and is repeated only when repeating is safe (a submit carries an idempotency key,
set once when the caller gave none)."""

from __future__ import annotations

import threading
import time
from typing import Any, List, Iterable, Iterator, Mapping, Optional, Sequence, TypeVar, Union

import grpc

from . import _core
from ._core import Call, Plan, Stubs, TlsOptions, Workflow
from .errors import MaosError, Unavailable, from_rpc_error
from .v1 import kv_pb2, tasks_pb2
from .views import (
    Agent, BatchItem, CasResult, KeyEvent, KeyValue, Priority, Submitted, Task, TaskEvent, TaskPage,
    TaskResults, TaskSpec, TaskState,
)

T = TypeVar("T")


class Client:
    """A client of a MAOS cluster.

    `endpoints`: every node's `host:port` (or one load balancer); calls start at the endpoint that
    answered last. `token`: sent as `authorization: Bearer <token>` (default: `MAOS_TOKEN`, else
    `~/.config/maos/token`). `tls`: TLS for every endpoint (default: `MAOS_CA_FILE`, with
    `MAOS_CLIENT_CERT` and `MAOS_CLIENT_KEY`, as the CLI; unset: plaintext). `deadline`: seconds
    one call may take, retries included; a call the server pushes back (a rate limit, a busy
    node: `grpc-retry-pushback-ms`) is retried after the wait it asked for, within the deadline.
    """

    def __init__(self, endpoints: Union[str, Iterable[str]], token: Optional[str] = None,
                 tls: Optional[TlsOptions] = None, deadline: float = _core.DEADLINE_DEFAULT_S) -> None:
        self.options = _core.make_options(endpoints, token, tls, deadline)
        credentials = self.options.tls.credentials() if self.options.tls is not None else None
        channel_options = self.options.channel_options()
        self._channels = [
            grpc.secure_channel(t, credentials, channel_options) if credentials is not None
            else grpc.insecure_channel(t, channel_options)
            for t in self.options.endpoints
        ]
        self._stubs = [Stubs(c) for c in self._channels]
        self._preferred = 0
        self._lock = threading.Lock()
        self.kv = KvClient(self)

    @property
    def endpoints(self) -> tuple[str, ...]:
        return self.options.endpoints

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _run(self, call: Call[T], deadline: Optional[float] = None) -> T:
        total = self.options.deadline_s if deadline is None else deadline
        started = time.monotonic()
        with self._lock:
            index = self._preferred
        last: Optional[MaosError] = None
        count = len(self._stubs)
        attempts = 0
        while attempts < _core.ATTEMPTS_MAX:
            remaining = total - (time.monotonic() - started)
            if remaining <= 0:
                break
            limit = min(remaining, self.options.attempt_timeout_s)
            endpoint = self.options.endpoints[index]
            try:
                answer = call.invoke(self._stubs[index], limit, self.options.metadata())
            except grpc.RpcError as e:
                error = from_rpc_error(e, endpoint)
                if _core.pushed_back(error, remaining):
                    # Refused before anything was done, with when to call again: wait, then
                    # retry here (not counted as an attempt; the deadline bounds it).
                    last = error
                    time.sleep(max(error.pushback_s or 0, 0.001))
                    continue
                if not _core.retryable(error.code, call.idempotent):
                    raise error from None
                attempts += 1
                last = error
                index = (index + 1) % count
                if index == 0 or count == 1:
                    time.sleep(min(_core.ROUND_BACKOFF_S, max(remaining, 0)))
                continue
            with self._lock:
                self._preferred = index
            return call.convert(answer)
        raise Unavailable(
            f"no endpoint could serve {call.method} within {total:.1f} s; last: {last}",
            code=grpc.StatusCode.UNAVAILABLE, endpoint=last.endpoint if last else None,
        )

    # Tasks ----------------------------------------------------------------------------------

    def submit(self, task_type: Union[str, TaskSpec], description: str = "", input: str = "", *,
               priority: Priority = Priority.NORMAL, depends_on: Sequence[str] = (), parent: str = "",
               max_retries: int = 0, timeout_ms: int = 0, idempotency_key: str = "", submitter: str = "",
               labels: Optional[Mapping[str, str]] = None, capabilities: Sequence[str] = (),
               plan: bool = False, max_agents: int = 0) -> Submitted:
        """Submit a task (or a `TaskSpec`). Without an idempotency key one is set, so a retry on
        another node never creates a second task; `Submitted.duplicate` says a key was seen."""
        spec = _core._spec(task_type, description, input=input, priority=priority, depends_on=depends_on,
                           parent=parent, max_retries=max_retries, timeout_ms=timeout_ms,
                           idempotency_key=idempotency_key, submitter=submitter, labels=labels or {},
                           capabilities=capabilities, plan=plan, max_agents=max_agents)
        return self._run(_core.submit(spec))

    def batch_submit(self, specs: Sequence[TaskSpec]) -> List[BatchItem]:
        """Submit 1..=1000 tasks in one call; one answer each, in order."""
        return self._run(_core.batch_submit(specs))

    def get(self, task_id: str, *, stale: bool = False) -> Task:
        return self._run(_core.get(task_id, stale))

    def list(self, *, states: Sequence[Union[TaskState, str]] = (), task_type: str = "", parent: str = "",
             submitter: str = "", page_size: int = 100, stale: bool = False,
             pages_max: Optional[int] = None) -> Iterator[TaskPage]:
        """Pages of tasks in id order, until the last page (or `pages_max` pages)."""
        token = ""
        pages = 0
        while pages_max is None or pages < pages_max:
            page = self._run(_core.list_page(states, task_type, parent, submitter, page_size, token, stale))
            pages += 1
            yield page
            token = page.next_page_token
            if not token:
                return

    def results(self, task_id: str) -> TaskResults:
        return self._run(_core.results(task_id))

    def cancel(self, task_id: str, reason: str = "") -> List[str]:
        """Cancel a task and its descendants; returns the ids cancelled."""
        return self._run(_core.cancel(task_id, reason))

    def retry(self, task_id: str) -> Task:
        return self._run(_core.retry(task_id))

    def agents(self, node_id: int = 0) -> List[Agent]:
        """Agents of one node or worker, or of all (0)."""
        return self._run(_core.agents(node_id))

    def watch(self, task_id: str, *, include_children: bool = False, timeout: Optional[float] = None,
              reconnects_max: int = _core.WATCH_RECONNECTS_MAX) -> Iterator[TaskEvent]:
        """The task's current view, then an event per change, until it finishes. When the serving
        node goes away the watch reopens through another endpoint (at most `reconnects_max`
        times; each reopening starts with the current view again). `timeout`: seconds in all."""
        request = tasks_pb2.WatchTaskRequest(task_id=task_id, include_children=include_children)
        started = time.monotonic()
        reconnects = 0
        with self._lock:
            index = self._preferred
        while True:
            remaining = None if timeout is None else timeout - (time.monotonic() - started)
            if remaining is not None and remaining <= 0:
                raise _core_deadline("Watch", timeout)
            endpoint = self.options.endpoints[index]
            stream = self._stubs[index].tasks.Watch(request, timeout=remaining, metadata=self.options.metadata())
            error: Optional[MaosError] = None
            try:
                for message in stream:
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
            time.sleep(_core.STREAM_RETRY_S)

    def wait(self, task_id: str, *, timeout: Optional[float] = None) -> Task:
        """Watch until the task finishes; returns its final view."""
        for _ in self.watch(task_id, timeout=timeout):
            pass
        return self.get(task_id)

    def submit_workflow(self, plan: Union[Plan, Mapping[str, Any], None] = None, *, description: str = "",
                        planner_input: Union[str, Mapping[str, Any], None] = None, task_type: str = "mixed",
                        max_retries: int = 3, max_agents: int = 0, idempotency_key: str = "",
                        submitter: str = "", priority: Priority = Priority.NORMAL,
                        labels: Optional[Mapping[str, str]] = None) -> Workflow:
        """Submit a workflow.

        Without `plan`, the cluster plans it: a task of `task_type` submitted with `plan: true`
        (type `mixed` always is) runs first on the planner agent, which reads `planner_input`;
        its subtasks become the root's children and the root completes with their results.

        With `plan` (a `Plan` or a dict `{"subtasks": [...]}`), the steps are submitted as tasks
        in dependency order, each depending on its steps' ids, labelled `maos.workflow` and
        `maos.plan_key`, with idempotency keys `<workflow key>/<step key>`, so submitting the
        same workflow key again returns the same tasks. The server has no call that takes a
        client's plan as a parent with children yet, so such a workflow has no aggregating root.
        """
        key = idempotency_key or _core.idempotency_key()
        base = TaskSpec(task_type=task_type, description=description, priority=priority, max_retries=max_retries,
                        idempotency_key=key, submitter=submitter, labels=dict(labels or {}), max_agents=max_agents)
        if plan is None:
            base.input = _core.planner_input(planner_input)
            base.plan = True
            if not base.description:
                base.description = "a planned workflow"
            return Workflow(self._run(_core.submit(base)).task_id, {}, key)
        steps = (plan if isinstance(plan, Plan) else Plan.from_dict(plan)).ordered()
        ids: dict[str, str] = {}
        for step in steps:
            ids[step.key] = self._run(_core.submit(_core.step_spec(step, ids, key, base))).task_id
        return Workflow(ids[steps[-1].key], ids, key)


def _core_deadline(method: str, timeout: Optional[float]) -> MaosError:
    from .errors import DeadlineExceeded

    return DeadlineExceeded(f"{method} did not finish within {timeout} s", code=grpc.StatusCode.DEADLINE_EXCEEDED)


class KvClient:
    """The shared key-value space (`client.kv`): linearizable unless `stale`."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def get(self, key: str, *, stale: bool = False) -> Optional[KeyValue]:
        return self._client._run(_core.kv_get(key, stale))

    def put(self, key: str, value: str, *, ttl_ms: int = 0) -> int:
        """Write `key`; returns the revision."""
        return self._client._run(_core.kv_put(key, value, ttl_ms))

    def delete(self, key: str) -> bool:
        return self._client._run(_core.kv_delete(key))

    def cas(self, key: str, expected: Optional[str], value: str, *, ttl_ms: int = 0) -> CasResult:
        """Write `key` only if it holds `expected` (None: only if absent)."""
        return self._client._run(_core.kv_cas(key, expected, value, ttl_ms))

    def watch(self, prefix: str, *, timeout: Optional[float] = None,
              reconnects_max: int = _core.WATCH_RECONNECTS_MAX) -> Iterator[KeyEvent]:
        """The keys under `prefix` (`initial`), then their changes. A broken stream reopens through
        another endpoint (at most `reconnects_max` times) and starts again with the keys as they
        are then. Ends only on error or `timeout` (DeadlineExceeded); stop iterating to end it."""
        client = self._client
        request = kv_pb2.WatchKeysRequest(prefix=prefix)
        started = time.monotonic()
        reconnects = 0
        index = client._preferred
        while True:
            remaining = None if timeout is None else timeout - (time.monotonic() - started)
            if remaining is not None and remaining <= 0:
                raise _core_deadline("Watch", timeout)
            endpoint = client.options.endpoints[index]
            stream = client._stubs[index].kv.Watch(request, timeout=remaining, metadata=client.options.metadata())
            error: Optional[MaosError] = None
            try:
                for message in stream:
                    yield KeyEvent.from_proto(message)
            except grpc.RpcError as e:
                error = _core.stream_error(e, endpoint, remaining is not None)
            finally:
                stream.cancel()
            reconnects = _core.count_reconnect(reconnects, reconnects_max, f"key watch of {prefix!r}", error,
                                               "the stream ended", endpoint)
            index = (index + 1) % len(client._stubs)
            time.sleep(_core.STREAM_RETRY_S)
