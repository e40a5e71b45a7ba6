"""What the sync and asyncio clients share: options, channels' settings, the retry policy, and
each call as data (`Call`: which service and method, the request, how to read the answer,
whether repeating it is safe). The clients only differ in how they wait."""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterable, Mapping, Optional, Sequence, TypeVar, Union

import grpc

try:  # Optional: with OpenTelemetry's API installed, calls carry the caller's trace context.
    from opentelemetry import propagate as _propagate
except ImportError:  # pragma: no cover - exercised by installs without it
    _propagate = None

from .errors import InvalidArgument, MaosError, Unavailable, code_from_number, error_for, from_rpc_error
from .v1 import agents_pb2, agents_pb2_grpc, cluster_pb2_grpc, kv_pb2, kv_pb2_grpc, tasks_pb2, tasks_pb2_grpc
from .views import (
    Agent, BatchItem, CasResult, KeyValue, Priority, Submitted, Task, TaskPage, TaskResults, TaskSpec, TaskState,
)

T = TypeVar("T")

#: How long one call may take, retries included, unless the client is given another deadline.
DEADLINE_DEFAULT_S = 10.0
#: Attempts per call, across all endpoints.
ATTEMPTS_MAX = 16
#: Pause after every endpoint failed once, before the next round.
ROUND_BACKOFF_S = 0.1
#: Reconnects of one watch (task or keys) before it gives up.
WATCH_RECONNECTS_MAX = 8
#: Pause before reopening a broken stream.
STREAM_RETRY_S = 0.2
#: The server's largest message (64 MiB).
MESSAGE_BYTES_MAX = 64 * 1024 * 1024
#: Tasks in one BatchSubmit, at most (the server's limit).
BATCH_MAX = 1000

#: Codes after which another endpoint may succeed.
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNKNOWN,
              grpc.StatusCode.CANCELLED}


def retryable(code: Optional[grpc.StatusCode], idempotent: bool) -> bool:
    """Whether a failed attempt may be repeated on the next endpoint. A call that is not safe to
    repeat is only moved on UNAVAILABLE (not sent, or refused before it was proposed)."""
    if code is None:
        return False
    if idempotent:
        return code in _RETRYABLE
    return bool(code == grpc.StatusCode.UNAVAILABLE)


def pushed_back(error: MaosError, remaining_s: float) -> bool:
    """Whether the server refused the call before doing anything and said when to call again
    (`grpc-retry-pushback-ms`: a rate limit, a busy node), and that wait fits in `remaining_s`."""
    return error.pushback_s is not None and error.pushback_s < remaining_s


def stream_error(e: grpc.RpcError, endpoint: str, deadline_set: bool) -> MaosError:
    """The error a watch stream broke with, raised unless another endpoint may continue it: its
    own deadline ran out, or the code is not one a stream is reopened for."""
    error = from_rpc_error(e, endpoint)
    if error.code == grpc.StatusCode.DEADLINE_EXCEEDED and deadline_set:
        raise error from None
    if not retryable(error.code, True):
        raise error from None
    return error


def count_reconnect(reconnects: int, reconnects_max: int, what: str, error: Optional[MaosError],
                    ended: str, endpoint: str) -> int:
    """One more reconnect of a watch of `what`, or Unavailable when it broke too often."""
    reconnects += 1
    if reconnects > reconnects_max:
        raise Unavailable(f"the {what} broke {reconnects} times; last: {error.message if error else ended}",
                          code=grpc.StatusCode.UNAVAILABLE, endpoint=endpoint)
    return reconnects


@dataclass(frozen=True)
class TlsOptions:
    """TLS for every endpoint: `ca_file` (PEM roots; None: the system's), `cert_file` and
    `key_file` (a client certificate, both or neither), `server_name` (the name the server's
    certificate must carry, when it differs from the endpoint's host)."""

    ca_file: Optional[str] = None
    cert_file: Optional[str] = None
    key_file: Optional[str] = None
    server_name: Optional[str] = None

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.cert_file is None) != (self.key_file is None):
            raise InvalidArgument("tls: give cert_file and key_file together, or neither", field="tls")

        def read(path: Optional[str], what: str) -> Optional[bytes]:
            if path is None:
                return None
            try:
                with open(path, "rb") as f:
                    return f.read()
            except OSError as e:
                raise InvalidArgument(f"tls.{what}: cannot read {path}: {e.strerror}", field=f"tls.{what}") from e

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca_file, "ca_file"),
            private_key=read(self.key_file, "key_file"),
            certificate_chain=read(self.cert_file, "cert_file"),
        )


@dataclass(frozen=True)
class Options:
    endpoints: tuple[str, ...]
    token: Optional[str] = None
    tls: Optional[TlsOptions] = None
    deadline_s: float = DEADLINE_DEFAULT_S

    @property
    def attempt_timeout_s(self) -> float:
        # One attempt gets a third of the deadline, so an endpoint that hangs costs part of it.
        return self.deadline_s / 3

    def metadata(self) -> tuple[tuple[str, str], ...]:
        auth = (("authorization", f"Bearer {self.token}"),) if self.token else ()
        return auth + trace_context()

    def channel_options(self) -> list[tuple[str, Any]]:
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", MESSAGE_BYTES_MAX),
            ("grpc.max_send_message_length", MESSAGE_BYTES_MAX),
            ("grpc.keepalive_time_ms", 5000),
            ("grpc.keepalive_timeout_ms", 5000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
            ("grpc.enable_retries", 0),
        ]
        if self.tls is not None and self.tls.server_name:
            options.append(("grpc.ssl_target_name_override", self.tls.server_name))
        return options


def make_options(endpoints: Union[str, Iterable[str]], token: Optional[str], tls: Optional[TlsOptions],
                 deadline: float) -> Options:
    if isinstance(endpoints, str):
        endpoints = [e for e in endpoints.split(",") if e]
    targets = tuple(target(e) for e in endpoints)
    if not targets:
        raise InvalidArgument("endpoints: give at least one host:port", field="endpoints")
    if deadline <= 0:
        raise InvalidArgument("deadline: must be positive (seconds)", field="deadline")
    if token is None:
        # As the CLI: MAOS_TOKEN, else the token file under the user's config dir.
        token = os.environ.get("MAOS_TOKEN") or _token_file() or None
    if token is not None and (not token or not token.isascii() or not token.isprintable()):
        raise InvalidArgument("token: must be non-empty printable ASCII", field="token")
    if tls is None:
        tls = tls_from_environment()
    return Options(targets, token, tls, float(deadline))


def tls_from_environment() -> Optional[TlsOptions]:
    """As the CLI: `MAOS_CA_FILE` turns TLS on, checked against that CA, and `MAOS_CLIENT_CERT`
    with `MAOS_CLIENT_KEY` present a client certificate. None when `MAOS_CA_FILE` is unset."""
    ca_file = os.environ.get("MAOS_CA_FILE") or None
    if ca_file is None:
        return None
    return TlsOptions(ca_file=ca_file, cert_file=os.environ.get("MAOS_CLIENT_CERT") or None,
                      key_file=os.environ.get("MAOS_CLIENT_KEY") or None)


def _token_file() -> Optional[str]:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    try:
        with open(os.path.join(base, "maos", "token"), encoding="utf-8") as file:
            return file.read().strip() or None
    except FileNotFoundError:
        return None


def target(endpoint: str) -> str:
    """`host:port`, `http://host:port` or `https://host:port` → the gRPC target `host:port`."""
    address = endpoint.strip()
    for scheme in ("http://", "https://", "grpc://"):
        if address.startswith(scheme):
            address = address[len(scheme):]
    address = address.rstrip("/")
    if not address or ":" not in address:
        raise InvalidArgument(f"endpoints: {endpoint!r} is not host:port", field="endpoints")
    return address


def idempotency_key() -> str:
    """A key unique to this call: set once per submit, reused by every retry of it."""
    return f"py-{os.getpid():x}-{uuid.uuid4().hex}"


class Stubs:
    """The service stubs over one channel (sync or asyncio: the stubs are the same classes)."""

    def __init__(self, channel: Any) -> None:
        self.tasks = tasks_pb2_grpc.TaskServiceStub(channel)  # type: ignore[no-untyped-call]
        self.kv = kv_pb2_grpc.KvServiceStub(channel)  # type: ignore[no-untyped-call]
        self.agents = agents_pb2_grpc.AgentServiceStub(channel)  # type: ignore[no-untyped-call]
        self.workers = agents_pb2_grpc.WorkerServiceStub(channel)  # type: ignore[no-untyped-call]
        self.cluster = cluster_pb2_grpc.ClusterServiceStub(channel)  # type: ignore[no-untyped-call]


@dataclass(frozen=True)
class Call(Generic[T]):
    service: str
    method: str
    request: Any
    convert: Callable[[Any], T]
    idempotent: bool = True

    def invoke(self, stubs: Stubs, timeout_s: float, metadata: Sequence[tuple[str, str]]) -> Any:
        return getattr(getattr(stubs, self.service), self.method)(self.request, timeout=timeout_s,
                                                                 metadata=metadata)


def trace_context() -> tuple[tuple[str, str], ...]:
    """The caller's W3C trace context (`traceparent`, `tracestate`) from OpenTelemetry's current
    span, when `opentelemetry-api` is installed and a span is current: the cluster's spans of the
    call, and of a task it submits (its attempts too, minutes later on another node), join the
    caller's trace. Nothing otherwise."""
    if _propagate is None:
        return ()
    carrier: dict[str, str] = {}
    _propagate.inject(carrier)
    return tuple((k, v) for k, v in carrier.items() if k in ("traceparent", "tracestate"))


def continue_trace(traceparent: str) -> None:
    """Make the W3C `traceparent` the current OpenTelemetry context of the running context (an
    asyncio task's own copy), when `opentelemetry-api` is installed and it is not empty."""
    if _propagate is None or not traceparent:
        return
    from opentelemetry import context

    context.attach(_propagate.extract({"traceparent": traceparent}))


def _spec(task_type: Union[str, TaskSpec], description: str, **fields: Any) -> TaskSpec:
    if isinstance(task_type, TaskSpec):
        return task_type
    return TaskSpec(task_type=task_type, description=description, **fields)


def submit(spec: TaskSpec) -> Call[Submitted]:
    request = spec.to_proto()
    if not request.idempotency_key:
        request.idempotency_key = idempotency_key()
    key = request.idempotency_key
    return Call("tasks", "Submit", request, lambda r: Submitted(r.task_id, r.duplicate, key))


def batch_submit(specs: Sequence[TaskSpec]) -> Call[list[BatchItem]]:
    if not 1 <= len(specs) <= BATCH_MAX:
        raise InvalidArgument(f"tasks: a batch holds 1..={BATCH_MAX} tasks, not {len(specs)}", field="tasks")
    requests = [s.to_proto() for s in specs]
    for request in requests:
        if not request.idempotency_key:
            request.idempotency_key = idempotency_key()

    def convert(r: tasks_pb2.BatchSubmitResponse) -> list[BatchItem]:
        items = []
        for item in r.results:
            error: Optional[MaosError] = None
            if item.code != 0 or item.error:
                error = error_for(code_from_number(item.code), item.error)
            items.append(BatchItem(item.task_id, item.duplicate, error))
        return items

    return Call("tasks", "BatchSubmit", tasks_pb2.BatchSubmitRequest(tasks=requests), convert)


def get(task_id: str, stale: bool) -> Call[Task]:
    return Call("tasks", "Get", tasks_pb2.GetTaskRequest(task_id=task_id, stale=stale), Task.from_proto)


def list_page(states: Sequence[Union[TaskState, str]], task_type: str, parent: str, submitter: str,
              page_size: int, page_token: str, stale: bool) -> Call[TaskPage]:
    request = tasks_pb2.ListTasksRequest(
        states=[TaskState(s).to_proto() for s in states],  # type: ignore[misc]
        task_type=task_type, parent=parent,
        submitter=submitter, page_size=page_size, page_token=page_token, stale=stale,
    )
    return Call("tasks", "List", request,
                lambda r: TaskPage([Task.from_proto(t) for t in r.tasks], r.next_page_token))


def results(task_id: str) -> Call[TaskResults]:
    return Call("tasks", "Results", tasks_pb2.GetTaskRequest(task_id=task_id), TaskResults.from_proto)


def cancel(task_id: str, reason: str) -> Call[list[str]]:
    return Call("tasks", "Cancel", tasks_pb2.CancelTaskRequest(task_id=task_id, reason=reason),
                lambda r: list(r.cancelled))


def retry(task_id: str) -> Call[Task]:
    # Not repeated after an answer that may hide a success: a second Retry would restart it again.
    return Call("tasks", "Retry", tasks_pb2.RetryTaskRequest(task_id=task_id), Task.from_proto, idempotent=False)


def agents(node_id: int) -> Call[list[Agent]]:
    return Call("agents", "List", agents_pb2.ListAgentsRequest(node_id=node_id),
                lambda r: [Agent.from_proto(a) for a in r.agents])


def kv_get(key: str, stale: bool) -> Call[Optional[KeyValue]]:
    return Call("kv", "Get", kv_pb2.GetRequest(key=key, stale=stale),
                lambda r: KeyValue(key, r.value, r.revision, r.applied_index) if r.found else None)


def kv_put(key: str, value: str, ttl_ms: int) -> Call[int]:
    return Call("kv", "Put", kv_pb2.PutRequest(key=key, value=value, ttl_ms=ttl_ms), lambda r: int(r.revision))


def kv_delete(key: str) -> Call[bool]:
    return Call("kv", "Delete", kv_pb2.DeleteRequest(key=key), lambda r: bool(r.existed))


def kv_cas(key: str, expected: Optional[str], value: str, ttl_ms: int) -> Call[CasResult]:
    request = kv_pb2.CompareAndSetRequest(key=key, value=value, ttl_ms=ttl_ms)
    if expected is not None:
        request.expected = expected
    # Not repeated after an ambiguous answer: a repeat of a CAS that applied reports a mismatch.
    return Call("kv", "CompareAndSet", request, CasResult.from_proto, idempotent=False)


# Workflows -------------------------------------------------------------------------------------


@dataclass
class Step:
    key: str
    task_type: str
    description: str
    input: str = ""
    depends_on: list[str] = field(default_factory=list)
    capabilities: list[str] = field(default_factory=list)


class Plan:
    """A workflow as explicit steps (the shape a planner answers: `{"subtasks": [...]}`).

    >>> plan = Plan().step("search", "researcher", "find sources").step(
    ...     "write", "analyst", "summarise", depends_on=["search"])
    """

    STEPS_MAX = 64

    def __init__(self) -> None:
        self.steps: list[Step] = []

    def step(self, key: str, task_type: str, description: str, input: str = "",
             depends_on: Sequence[str] = (), capabilities: Sequence[str] = ()) -> "Plan":
        self.steps.append(Step(key, task_type, description, input, list(depends_on), list(capabilities)))
        return self

    @classmethod
    def from_dict(cls, plan: Mapping[str, Any]) -> "Plan":
        subtasks = plan.get("subtasks")
        if not isinstance(subtasks, list):
            raise InvalidArgument("plan.subtasks: a plan is {\"subtasks\": [{\"key\", \"task_type\", "
                                  "\"description\", \"input\", \"depends_on\"}]}", field="plan.subtasks")
        built = cls()
        for s in subtasks:
            built.step(str(s.get("key", "")), str(s.get("task_type", "")), str(s.get("description", "")),
                       str(s.get("input", "")), [str(d) for d in s.get("depends_on", [])],
                       [str(c) for c in s.get("capabilities", [])])
        return built

    def to_dict(self) -> dict[str, Any]:
        return {"subtasks": [s.__dict__ for s in self.steps]}

    def ordered(self) -> list[Step]:
        """The steps with every dependency before its dependants; refuses what the server would."""
        if not 1 <= len(self.steps) <= self.STEPS_MAX:
            raise InvalidArgument(f"plan.subtasks: 1..={self.STEPS_MAX} steps, not {len(self.steps)}",
                                  field="plan.subtasks")
        by_key: dict[str, Step] = {}
        for s in self.steps:
            ok = 1 <= len(s.key) <= 24 and all(c.isascii() and (c.isalnum() or c in "-_") for c in s.key)
            if not ok:
                raise InvalidArgument(f"plan.subtasks[{s.key}].key: 1..=24 of A-Z a-z 0-9 - _",
                                      field=f"plan.subtasks[{s.key}].key")
            if s.key in by_key:
                raise InvalidArgument(f"plan.subtasks[{s.key}].key: repeated", field=f"plan.subtasks[{s.key}].key")
            by_key[s.key] = s
        order: list[Step] = []
        state: dict[str, int] = {}  # 1: visiting, 2: done

        def visit(step: Step, depth: int) -> None:
            if state.get(step.key) == 2:
                return
            if state.get(step.key) == 1 or depth > len(self.steps):
                raise InvalidArgument(f"plan.subtasks[{step.key}].depends_on: a cycle",
                                      field=f"plan.subtasks[{step.key}].depends_on")
            state[step.key] = 1
            for d in step.depends_on:
                if d not in by_key:
                    raise InvalidArgument(f"plan.subtasks[{step.key}].depends_on: no step {d!r}",
                                          field=f"plan.subtasks[{step.key}].depends_on")
                visit(by_key[d], depth + 1)
            state[step.key] = 2
            order.append(step)

        for s in self.steps:
            visit(s, 0)
        return order


@dataclass(frozen=True)
class Workflow:
    """A submitted workflow. Planned by the cluster: `root` is the planned task and `steps` is
    empty until it is expanded (see `results`). Given as a `Plan`: `root` is the last step in
    dependency order and `steps` maps every step's key to its task id."""

    root: str
    steps: Mapping[str, str]
    key: str


def planner_input(value: Union[str, Mapping[str, Any], None]) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value)


def step_spec(step: Step, ids: Mapping[str, str], workflow_key: str, base: TaskSpec) -> TaskSpec:
    return TaskSpec(
        task_type=step.task_type, description=step.description, input=step.input,
        priority=base.priority, depends_on=[ids[d] for d in step.depends_on], max_retries=base.max_retries,
        timeout_ms=base.timeout_ms, idempotency_key=f"{workflow_key}/{step.key}", submitter=base.submitter,
        labels={**base.labels, "maos.workflow": workflow_key, "maos.plan_key": step.key},
        capabilities=step.capabilities,
    )


__all__ = ["Options", "TlsOptions", "Plan", "Workflow", "Priority"]
