"""MAOS for Python: `Client` and `AsyncClient` for a MAOS cluster, and `Worker` for agents
written in Python.

    import maos
    client = maos.Client(["127.0.0.1:8000", "127.0.0.1:8001"])
    task = client.submit("coder", "fix the parser", input="...")
    for event in client.watch(task.task_id):
        print(event.state, event.progress_percent)

The gRPC code under `maos.v1` is generated from the repository's `client/proto` when the package
is built. See docs/PYTHON.md.
"""

from ._core import Plan, Step, TlsOptions, Workflow
from .aio import AsyncClient
from .client import Client, KvClient
from .errors import (
    DeadlineExceeded, FailedPrecondition, InvalidArgument, LeaseLost, MaosError, NotFound, PermissionDenied,
    ResourceExhausted, TaskFailed, Unauthenticated, Unavailable,
)
from .views import (
    Agent, BatchItem, CasResult, ChildResult, KeyEvent, KeyValue, Priority, Submitted, Task, TaskEvent, TaskPage,
    TaskResults, TaskSpec, TaskState,
)
from .worker import Assignment, AsyncContext, Context, Worker

__version__ = "0.1.0"

__all__ = [
    "Agent", "Assignment", "AsyncClient", "AsyncContext", "BatchItem", "CasResult", "ChildResult", "Client",
    "Context", "DeadlineExceeded", "FailedPrecondition", "InvalidArgument", "KeyEvent", "KeyValue", "KvClient",
    "LeaseLost", "MaosError", "NotFound", "PermissionDenied", "Plan", "Priority", "ResourceExhausted", "Step",
    "Submitted", "Task", "TaskEvent", "TaskFailed", "TaskPage", "TaskResults", "TaskSpec", "TaskState",
    "TlsOptions", "Unauthenticated", "Unavailable", "Worker", "Workflow",
]
