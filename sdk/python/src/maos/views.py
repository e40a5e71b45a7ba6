"""Plain dataclass views of the API's messages: what the clients return and take."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from .v1 import agents_pb2, kv_pb2, tasks_pb2


class TaskState(str, enum.Enum):
    UNSPECIFIED = "UNSPECIFIED"
    PENDING = "PENDING"
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def finished(self) -> bool:
        return self in (TaskState.COMPLETED, TaskState.FAILED, TaskState.CANCELLED)

    @classmethod
    def from_proto(cls, value: int) -> "TaskState":
        name = tasks_pb2.TaskState.Name(value) if value in tasks_pb2.TaskState.values() else "TASK_STATE_UNSPECIFIED"
        return cls(name.removeprefix("TASK_STATE_"))

    def to_proto(self) -> int:
        return int(tasks_pb2.TaskState.Value(f"TASK_STATE_{self.value}"))


class Priority(str, enum.Enum):
    LOW = "LOW"
    NORMAL = "NORMAL"
    HIGH = "HIGH"
    CRITICAL = "CRITICAL"

    def to_proto(self) -> int:
        return int(tasks_pb2.Priority.Value(f"PRIORITY_{self.value}"))

    @classmethod
    def from_proto(cls, value: int) -> "Priority":
        if value == tasks_pb2.PRIORITY_UNSPECIFIED or value not in tasks_pb2.Priority.values():
            return cls.NORMAL
        return cls(tasks_pb2.Priority.Name(value).removeprefix("PRIORITY_"))


@dataclass
class TaskSpec:
    """One task to submit (the fields of `SubmitTaskRequest`)."""

    task_type: str
    description: str
    input: str = ""
    priority: Priority = Priority.NORMAL
    depends_on: Sequence[str] = ()
    parent: str = ""
    max_retries: int = 0
    timeout_ms: int = 0
    idempotency_key: str = ""
    submitter: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    capabilities: Sequence[str] = ()
    plan: bool = False
    max_agents: int = 0

    def to_proto(self) -> tasks_pb2.SubmitTaskRequest:
        return tasks_pb2.SubmitTaskRequest(
            task_type=self.task_type,
            description=self.description,
            input=self.input,
            priority=Priority(self.priority).to_proto(),  # type: ignore[arg-type]
            depends_on=list(self.depends_on),
            parent=self.parent,
            max_retries=self.max_retries,
            timeout_ms=self.timeout_ms,
            idempotency_key=self.idempotency_key,
            submitter=self.submitter,
            labels=dict(self.labels),
            capabilities=list(self.capabilities),
            plan=self.plan,
            max_agents=self.max_agents,
        )


@dataclass(frozen=True)
class Submitted:
    task_id: str
    duplicate: bool
    idempotency_key: str


@dataclass(frozen=True)
class BatchItem:
    """One answer of `batch_submit`: an id, or the error (`error` names the field)."""

    task_id: str
    duplicate: bool
    error: Optional[Any] = None  # a MaosError when refused

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class Task:
    task_id: str
    task_type: str
    state: TaskState
    priority: Priority
    attempt: int
    description: str
    input: str
    result: str
    cause: str
    slot: str
    node_id: int
    depends_on: list[str]
    parent: str
    submitter: str
    children: list[str]
    planning: bool
    expanded: bool
    checkpoint: str
    checkpoint_attempt: int
    progress_percent: int
    progress_message: str
    input_tokens: int
    output_tokens: int
    max_retries: int
    idempotency_key: str
    #: The W3C trace id of its submit when that was traced (sampled); empty otherwise.
    trace_id: str

    @classmethod
    def from_proto(cls, v: tasks_pb2.TaskView) -> "Task":
        return cls(
            task_id=v.task_id, task_type=v.task_type, state=TaskState.from_proto(v.state),
            priority=Priority.from_proto(v.priority), attempt=v.attempt, description=v.description,
            input=v.input, result=v.result, cause=v.cause, slot=v.slot, node_id=v.node_id,
            depends_on=list(v.depends_on), parent=v.parent, submitter=v.submitter, children=list(v.children),
            planning=v.planning, expanded=v.expanded, checkpoint=v.checkpoint,
            checkpoint_attempt=v.checkpoint_attempt, progress_percent=v.progress_percent,
            progress_message=v.progress_message, input_tokens=v.input_tokens, output_tokens=v.output_tokens,
            max_retries=v.max_retries, idempotency_key=v.idempotency_key, trace_id=v.trace_id,
        )


@dataclass(frozen=True)
class TaskPage:
    tasks: list[Task]
    next_page_token: str


@dataclass(frozen=True)
class TaskEvent:
    task_id: str
    state: TaskState
    attempt: int
    node_id: int
    progress_percent: int
    progress_message: str
    cause: str
    result: str
    applied_index: int
    finished: bool

    @classmethod
    def from_proto(cls, e: tasks_pb2.TaskEvent) -> "TaskEvent":
        return cls(
            task_id=e.task_id, state=TaskState.from_proto(e.state), attempt=e.attempt, node_id=e.node_id,
            progress_percent=e.progress_percent, progress_message=e.progress_message, cause=e.cause,
            result=e.result, applied_index=e.applied_index, finished=e.finished,
        )


@dataclass(frozen=True)
class ChildResult:
    task_id: str
    plan_key: str
    state: TaskState
    result: str
    cause: str


@dataclass(frozen=True)
class TaskResults:
    task_id: str
    state: TaskState
    result: str
    cause: str
    children: list[ChildResult]

    @classmethod
    def from_proto(cls, r: tasks_pb2.TaskResults) -> "TaskResults":
        children = [
            ChildResult(c.task_id, c.plan_key, TaskState.from_proto(c.state), c.result, c.cause) for c in r.children
        ]
        return cls(r.task_id, TaskState.from_proto(r.state), r.result, r.cause, children)


@dataclass(frozen=True)
class Agent:
    agent_id: str
    node_id: int
    agent_type: str
    backend: str
    capabilities: list[str]
    state: str
    task_id: str

    @classmethod
    def from_proto(cls, a: agents_pb2.AgentView) -> "Agent":
        state = agents_pb2.AgentState.Name(a.state).removeprefix("AGENT_STATE_") if a.state in \
            agents_pb2.AgentState.values() else "UNSPECIFIED"
        return cls(a.agent_id, a.node_id, a.agent_type, a.backend, list(a.capabilities), state, a.task_id)


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: str
    revision: int
    applied_index: int


@dataclass(frozen=True)
class CasResult:
    succeeded: bool
    revision: int
    current: Optional[str]  # the value found when not succeeded (None: absent)

    @classmethod
    def from_proto(cls, r: kv_pb2.CompareAndSetResponse) -> "CasResult":
        return cls(r.succeeded, r.revision, r.current if r.HasField("current") else None)


@dataclass(frozen=True)
class KeyEvent:
    key: str
    value: str
    revision: int
    deleted: bool
    applied_index: int
    initial: bool

    @classmethod
    def from_proto(cls, e: kv_pb2.KeyEvent) -> "KeyEvent":
        return cls(e.key, e.value, e.revision, e.deleted, e.applied_index, e.initial)
