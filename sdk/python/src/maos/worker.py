"""External workers: agents written in Python that take tasks from a MAOS cluster under the same
leases and fencing as a node's own agents (`maos.v1.WorkerService`; the Rust SDK's
`client/src/worker.rs` is the reference and this follows its rules).

    worker = maos.Worker(client, name="py-worker-1")

    @worker.agent("researcher", capabilities=["web"], slots=2)
    def research(ctx: maos.Context) -> str:
        ctx.checkpoint("fetched")
        return f"found {ctx.input}"

    worker.run()  # blocks; worker.stop() ends it

The library registers the worker (its holder id derives from `name`: a restart under the same
name gets its still-live leases back), keeps one assignment stream open (reopened through any
endpoint), heartbeats every lease it holds in one call per the interval Register answered (the
heartbeat is also its liveness), and sends every report with the lease's fencing token, which the
agent function never sees. A lease reported lost, or not renewed within the lease time, stops its
function: an async one is cancelled; a sync one (in its own thread) sees `ctx.cancelled`, its
further reports raise `LeaseLost` and are not sent, and its answer is dropped.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import json
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping, Optional, Sequence, Union

import grpc

from . import _core
from ._core import Call, Plan
from .aio import AsyncClient
from .errors import FailedPrecondition, InvalidArgument, LeaseLost, MaosError, NotFound, TaskFailed, Unavailable, \
    from_rpc_error
from .v1 import agents_pb2

log = logging.getLogger("maos.worker")

#: Slots of one agent type, at most (the server's limit).
SLOTS_MAX = 64
#: Agent types of one worker, at most (the server's limit).
TYPES_MAX = 16


@dataclass(frozen=True)
class Assignment:
    """What an attempt receives: the task, its attempt number, the dependency results and the
    latest checkpoint (`None`: none saved yet)."""

    task_id: str
    attempt: int
    agent_id: str
    task_type: str
    description: str
    input: str
    planning: bool
    dependency_results: Mapping[str, str]
    checkpoint: Optional[str]
    timeout_ms: int
    #: The W3C trace context of the task's submit when it was traced; empty otherwise. With
    #: `opentelemetry-api` installed it is the current context while the agent function runs.
    traceparent: str = ""

    @classmethod
    def from_proto(cls, a: agents_pb2.Assignment) -> "Assignment":
        return cls(a.task_id, a.attempt, a.agent_id, a.task_type, a.description, a.input, a.planning,
                   dict(a.dependency_results), a.checkpoint or None, a.timeout_ms, a.traceparent)


class _Lease:
    """One attempt the worker holds: its token (never shown to the agent) and how to stop it."""

    def __init__(self, assignment: Assignment, token: int) -> None:
        self.assignment = assignment
        self.token = token
        self.lost = threading.Event()
        self.task: Optional[asyncio.Task[None]] = None


class _ContextBase:
    def __init__(self, worker: "Worker", lease: _Lease) -> None:
        self._worker = worker
        self._lease = lease
        self.envelope = lease.assignment

    @property
    def task_id(self) -> str:
        return self.envelope.task_id

    @property
    def attempt(self) -> int:
        return self.envelope.attempt

    @property
    def input(self) -> str:
        return self.envelope.input

    @property
    def description(self) -> str:
        return self.envelope.description

    @property
    def dependency_results(self) -> Mapping[str, str]:
        return self.envelope.dependency_results

    @property
    def saved_checkpoint(self) -> Optional[str]:
        """The latest checkpoint saved for this task (by an earlier attempt or this one)."""
        return self.envelope.checkpoint

    @property
    def planning(self) -> bool:
        return self.envelope.planning

    @property
    def cancelled(self) -> bool:
        """True once the lease is gone (lost, cancelled, expired, or the worker stopped)."""
        return self._lease.lost.is_set()

    def _check(self) -> None:
        if self._lease.lost.is_set():
            raise LeaseLost(f"{self.task_id}: this attempt's lease is gone; its reports are refused",
                            code=grpc.StatusCode.FAILED_PRECONDITION)


class Context(_ContextBase):
    """The context of a sync agent function (it runs in its own thread)."""

    def checkpoint(self, data: str) -> None:
        """Save a checkpoint (at most 64 KiB): a later attempt of this task receives it."""
        self._check()
        self._worker._call_from_thread(self._worker._report_checkpoint(self._lease, data))
        object.__setattr__(self, "envelope", _with_checkpoint(self.envelope, data))

    def progress(self, percent: int, message: str = "") -> None:
        self._check()
        self._worker._call_from_thread(self._worker._report_progress(self._lease, percent, message))

    def wait_cancelled(self, timeout: float) -> bool:
        """Sleep up to `timeout` seconds, waking early if the lease goes; returns `cancelled`."""
        return self._lease.lost.wait(timeout)


class AsyncContext(_ContextBase):
    """The context of an async agent function (it runs on the worker's event loop)."""

    async def checkpoint(self, data: str) -> None:
        self._check()
        await self._worker._report_checkpoint(self._lease, data)
        self.envelope = _with_checkpoint(self.envelope, data)

    async def progress(self, percent: int, message: str = "") -> None:
        self._check()
        await self._worker._report_progress(self._lease, percent, message)


def _with_checkpoint(a: Assignment, data: str) -> Assignment:
    return Assignment(a.task_id, a.attempt, a.agent_id, a.task_type, a.description, a.input, a.planning,
                      a.dependency_results, data, a.timeout_ms)


Handler = Callable[..., Any]


@dataclass
class _AgentType:
    agent_type: str
    function: Handler
    capabilities: Sequence[str] = ()
    slots: int = 1
    is_async: bool = field(default=False)


class Worker:
    """A worker serving the agent types its `@worker.agent` functions declare."""

    def __init__(self, client: Union["_core.Options", Any], name: str) -> None:
        # Any client (sync or async) lends its endpoints, token, TLS and deadline; the worker makes
        # its own asyncio channels in the loop that runs it.
        self._options: _core.Options = client if isinstance(client, _core.Options) else client.options
        self.name = name
        self._types: dict[str, _AgentType] = {}
        self._held: dict[str, _Lease] = {}
        self._stopping = threading.Event()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._wake: Optional[asyncio.Event] = None
        self._client: Optional[AsyncClient] = None
        self.worker_id: Optional[int] = None
        self.heartbeat_interval_s = 1.0
        self.lease_s = 10.0
        #: Set once registered and the assignment stream is first open.
        self.ready = threading.Event()

    def agent(self, agent_type: str, *, capabilities: Sequence[str] = (),
              slots: int = 1) -> Callable[[Handler], Handler]:
        """Serve `agent_type` with the decorated function: `fn(ctx) -> str` (or `async def`).
        Its answer completes the task (a dict or list is sent as JSON; for a planning attempt,
        the plan: a `maos.Plan` or `{"subtasks": [...]}`); raising fails the attempt retryably
        (`maos.TaskFailed(..., retryable=False)` fails the task for good)."""
        if agent_type in self._types:
            raise InvalidArgument(f"agent_type: {agent_type!r} is already served by this worker", field="agent_type")
        if not 1 <= slots <= SLOTS_MAX:
            raise InvalidArgument(f"slots: must be in 1..={SLOTS_MAX}", field="slots")
        if len(self._types) >= TYPES_MAX:
            raise InvalidArgument(f"agent_types: a worker serves at most {TYPES_MAX} types", field="agent_types")

        def register(function: Handler) -> Handler:
            self._types[agent_type] = _AgentType(agent_type, function, tuple(capabilities), slots,
                                                 inspect.iscoroutinefunction(function))
            return function

        return register

    # Running ---------------------------------------------------------------------------------

    def run(self) -> None:
        """Register and serve until `stop()` (or until no endpoint answers for a whole deadline)."""
        asyncio.run(self.run_async())

    def stop(self) -> None:
        """End `run()`; safe from any thread or a signal handler. Held leases are left to expire."""
        self._stopping.set()
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:  # the loop has already closed
                pass

    async def run_async(self) -> None:
        if not self._types:
            raise InvalidArgument("agent_types: decorate at least one function with @worker.agent", field="agent_types")
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        o = self._options
        self._client = AsyncClient(o.endpoints, token=o.token, tls=o.tls, deadline=o.deadline_s)
        try:
            await self._register()
            if self._stopping.is_set():
                return
            beat: asyncio.Task[Any] = asyncio.create_task(self._heartbeats())
            receive: asyncio.Task[Any] = asyncio.create_task(self._receive())
            stop: asyncio.Task[Any] = asyncio.create_task(self._wake.wait())
            done, _ = await asyncio.wait({beat, receive, stop}, return_when=asyncio.FIRST_COMPLETED)
            for t in (beat, receive, stop):
                t.cancel()
            await asyncio.gather(beat, receive, stop, return_exceptions=True)
            for lease in list(self._held.values()):
                self._drop(lease, "the worker stopped")
            pending = [lease.task for lease in self._held.values() if lease.task is not None]
            await asyncio.gather(*pending, return_exceptions=True)
            for t in done:
                if t is not stop and not t.cancelled() and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
        finally:
            self.ready.clear()
            await self._client.close()

    async def _register(self) -> None:
        request = agents_pb2.RegisterWorkerRequest(name=self.name, agent_types=[
            agents_pb2.WorkerAgentType(agent_type=t.agent_type, capabilities=list(t.capabilities), slots=t.slots)
            for t in self._types.values()
        ])
        answer = await self._run(Call("workers", "Register", request, lambda r: r))
        self.worker_id = int(answer.worker_id)
        self.heartbeat_interval_s = max(answer.heartbeat_interval_ms, 1) / 1000
        self.lease_s = max(answer.lease_ms, 1) / 1000
        log.info("worker %s registered as %d (heartbeat every %.2f s)", self.name, self.worker_id,
                 self.heartbeat_interval_s)

    async def _run(self, call: Call[Any]) -> Any:
        assert self._client is not None, "the worker is not running"
        return await self._client._run(call)

    async def _receive(self) -> None:
        assert self._client is not None
        client = self._client
        failures = 0
        index = client._preferred
        while not self._stopping.is_set():
            endpoint = client.options.endpoints[index]
            stream = client._stubs[index].workers.Assignments(
                agents_pb2.AssignmentsRequest(worker_id=self.worker_id), metadata=client.options.metadata())
            try:
                await stream.initial_metadata()  # the server has answered the stream's opening
                if not stream.done():
                    failures = 0
                    self.ready.set()
                async for message in stream:
                    self._start(message)
                # A stream that ended (the node is stopping) is reopened elsewhere.
            except grpc.RpcError as e:
                error = from_rpc_error(e, endpoint)
                if isinstance(error, NotFound):
                    raise error from None
                failures += 1
                if failures > _core.ATTEMPTS_MAX:
                    raise Unavailable(f"the assignment stream failed {failures} times in a row; last: {error}",
                                      code=grpc.StatusCode.UNAVAILABLE, endpoint=endpoint) from None
                log.debug("assignment stream from %s broke: %s", endpoint, error)
            finally:
                stream.cancel()
            index = (index + 1) % len(client._stubs)
            await asyncio.sleep(_core.STREAM_RETRY_S)

    def _start(self, message: agents_pb2.Assignment) -> None:
        held = self._held.get(message.task_id)
        if held is not None and held.token == message.fencing_token:
            return  # sent again after a reconnect: it is already running
        if held is not None:
            self._drop(held, "a newer lease on the task")
        agent = _by_agent_id(self._types, message.agent_id) or self._types.get(message.task_type)
        lease = _Lease(Assignment.from_proto(message), message.fencing_token)
        self._held[message.task_id] = lease
        if agent is None:
            lease.task = asyncio.create_task(self._fail(lease, f"this worker serves no type {message.task_type!r}"))
            return
        lease.task = asyncio.create_task(self._attempt(agent, lease))

    async def _attempt(self, agent: _AgentType, lease: _Lease) -> None:
        task_id = lease.assignment.task_id
        # This asyncio task's own context: the attempt (and its function) continue the task's trace.
        _core.continue_trace(lease.assignment.traceparent)
        try:
            try:
                if agent.is_async:
                    answer = await agent.function(AsyncContext(self, lease))
                else:
                    answer = await self._in_thread(agent.function, Context(self, lease), lease)
            except asyncio.CancelledError:
                raise
            except LeaseLost:
                return
            except TaskFailed as e:
                await self._fail(lease, str(e) or type(e).__name__, e.retryable)
                return
            except Exception as e:  # the agent's own error fails its attempt
                log.warning("agent %s failed on %s: %r", agent.agent_type, task_id, e)
                await self._fail(lease, f"{type(e).__name__}: {e}", True)
                return
            if lease.lost.is_set():
                return
            await self._outcome(lease, answer)
        except asyncio.CancelledError:
            log.info("attempt %d of %s stopped: its lease is gone", lease.assignment.attempt, task_id)
        finally:
            if self._held.get(task_id) is lease:
                del self._held[task_id]

    async def _in_thread(self, function: Handler, ctx: Context, lease: _Lease) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        # A thread starts with an empty context: run the function in the attempt's (its trace).
        context = contextvars.copy_context()

        def settle(ok: bool, value: Any) -> None:
            if not future.done():
                future.set_result(value) if ok else future.set_exception(value)

        def body() -> None:
            try:
                value, ok = context.run(function, ctx), True
            except BaseException as e:  # handed to the loop as the attempt's failure
                value, ok = e, False
            try:
                loop.call_soon_threadsafe(settle, ok, value)
            except RuntimeError:
                pass  # the worker has stopped; the answer is dropped

        threading.Thread(target=body, name=f"maos-{lease.assignment.task_id}", daemon=True).start()
        return await future

    async def _outcome(self, lease: _Lease, answer: Any) -> None:
        a, token = lease.assignment, lease.token
        try:
            if a.planning:
                plan = answer if isinstance(answer, Plan) else Plan.from_dict(_as_json(answer))
                subtasks = [agents_pb2.PlannedSubtask(key=s.key, task_type=s.task_type, description=s.description,
                                                      input=s.input, depends_on=s.depends_on,
                                                      capabilities=s.capabilities) for s in plan.steps]
                request: Any = agents_pb2.SubmitPlanRequest(task_id=a.task_id, fencing_token=token, subtasks=subtasks)
                await self._run(Call("workers", "SubmitPlan", request, lambda r: r))
            else:
                result = answer if isinstance(answer, str) else json.dumps(answer)
                request = agents_pb2.WorkerCompleteRequest(task_id=a.task_id, fencing_token=token, result=result)
                await self._run(Call("workers", "Complete", request, lambda r: r))
        except InvalidArgument as e:
            # A result or plan the server refused: fail the attempt with why, so it is visible.
            await self._fail(lease, str(e), True)
        except MaosError as e:
            log.warning("reporting %s failed (%s); the lease will expire and the task retry", a.task_id, e)

    async def _fail(self, lease: _Lease, error: str, retryable: bool = True) -> None:
        request = agents_pb2.WorkerFailRequest(task_id=lease.assignment.task_id, fencing_token=lease.token,
                                               error=error[:4096], retryable=retryable)
        try:
            await self._run(Call("workers", "Fail", request, lambda r: r))
        except MaosError as e:
            log.warning("failing %s was refused (%s)", lease.assignment.task_id, e)

    async def _report_checkpoint(self, lease: _Lease, data: str) -> None:
        request = agents_pb2.SaveCheckpointRequest(task_id=lease.assignment.task_id, fencing_token=lease.token,
                                                   data=data)
        await self._fenced(lease, Call("workers", "SaveCheckpoint", request, lambda r: r))

    async def _report_progress(self, lease: _Lease, percent: int, message: str) -> None:
        request = agents_pb2.ReportProgressRequest(task_id=lease.assignment.task_id, fencing_token=lease.token,
                                                   percent=percent, message=message)
        await self._fenced(lease, Call("workers", "ReportProgress", request, lambda r: r))

    async def _fenced(self, lease: _Lease, call: Call[Any]) -> None:
        """A report under the lease's token; a refusal for staleness means the lease is gone."""
        if lease.lost.is_set():
            raise LeaseLost(f"{lease.assignment.task_id}: the lease is gone", code=grpc.StatusCode.FAILED_PRECONDITION)
        try:
            await self._run(call)
        except FailedPrecondition as e:
            self._drop(lease, str(e))
            raise LeaseLost(str(e), code=e.code, endpoint=e.endpoint) from None

    def _call_from_thread(self, coroutine: Awaitable[None]) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            raise LeaseLost("the worker has stopped", code=grpc.StatusCode.FAILED_PRECONDITION)
        future = asyncio.run_coroutine_threadsafe(coroutine, loop)
        future.result(timeout=self._options.deadline_s + 1)

    def _drop(self, lease: _Lease, why: str) -> None:
        """Stop an attempt whose lease is gone: fence its reports, cancel an async function."""
        if not lease.lost.is_set():
            log.info("lease on %s (attempt %d) gone: %s", lease.assignment.task_id, lease.assignment.attempt, why)
        lease.lost.set()
        if lease.task is not None and not lease.task.done() and lease.task is not asyncio.current_task():
            lease.task.cancel()
        if self._held.get(lease.assignment.task_id) is lease:
            del self._held[lease.assignment.task_id]

    async def _heartbeats(self) -> None:
        """Renew every held lease once per interval. A renewal sent at `t` proves the leases until
        `t + lease` at best, so past that (less a margin) without one, every attempt is stopped."""
        assert self._client is not None
        loop = asyncio.get_running_loop()
        margin_s = self.lease_s * 0.02 + 0.1
        renewed_at = loop.time()
        while not self._stopping.is_set():
            if loop.time() - renewed_at > self.lease_s - margin_s:
                for lease in list(self._held.values()):
                    self._drop(lease, f"not renewed for {self.lease_s:.1f} s")
            sent = dict(self._held)
            leases = [agents_pb2.LeaseRef(task_id=t, fencing_token=lease.token) for t, lease in sent.items()]
            request = agents_pb2.HeartbeatRequest(worker_id=self.worker_id, leases=leases)
            sent_at = loop.time()
            try:
                call = Call("workers", "Heartbeat", request, lambda r: r)
                answer = await self._client._run(call, deadline=min(self._options.deadline_s, self.lease_s))
                renewed_at = sent_at
                for task_id in answer.lost:
                    if task_id in sent:
                        self._drop(sent[task_id], "the heartbeat reported it lost")
            except NotFound:
                raise
            except MaosError as e:
                log.warning("heartbeat failed (%s); retrying next interval", e)
            await asyncio.sleep(self.heartbeat_interval_s)


def _by_agent_id(types: Mapping[str, _AgentType], agent_id: str) -> Optional[_AgentType]:
    # Slots are `w:<name>/<type>/<n>`: a planning assignment's task type is the planned task's.
    parts = agent_id.split("/")
    return types.get(parts[1]) if len(parts) >= 3 else None


def _as_json(answer: Any) -> Mapping[str, Any]:
    if isinstance(answer, Mapping):
        return answer
    text = str(answer)
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        raise InvalidArgument("plan: a planning answer is {\"subtasks\": [...]} (or a maos.Plan)", field="plan")
    value = json.loads(text[start:end + 1])
    if not isinstance(value, Mapping):
        raise InvalidArgument("plan: a planning answer is {\"subtasks\": [...]}", field="plan")
    return value
