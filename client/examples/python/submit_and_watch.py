"""Submit a task to MAOS and watch it to completion, using only client/proto.

    python -m grpc_tools.protoc -I client/proto --python_out=OUT --grpc_python_out=OUT \
        client/proto/maos/v1/*.proto
    PYTHONPATH=OUT python submit_and_watch.py 127.0.0.1:8000 coder "say hello" hello

Prints one JSON line per event and exits 0 when the task completed, 7 when it failed.
"""
import json
import sys

import grpc

from maos.v1 import tasks_pb2, tasks_pb2_grpc


def main() -> int:
    endpoint, task_type, description, task_input = sys.argv[1:5]
    with grpc.insecure_channel(endpoint) as channel:
        tasks = tasks_pb2_grpc.TaskServiceStub(channel)
        submitted = tasks.Submit(
            tasks_pb2.SubmitTaskRequest(
                task_type=task_type,
                description=description,
                input=task_input,
                priority=tasks_pb2.PRIORITY_HIGH,
                idempotency_key="python-example-" + description,
            ),
            timeout=10,
        )
        print(json.dumps({"submitted": submitted.task_id, "duplicate": submitted.duplicate}), flush=True)
        final = None
        for event in tasks.Watch(tasks_pb2.WatchTaskRequest(task_id=submitted.task_id), timeout=60):
            print(
                json.dumps(
                    {
                        "task_id": event.task_id,
                        "state": tasks_pb2.TaskState.Name(event.state),
                        "attempt": event.attempt,
                        "finished": event.finished,
                        "result": event.result,
                    }
                ),
                flush=True,
            )
            if event.finished:
                final = event
        if final is None:
            print("the watch ended before the task finished", file=sys.stderr)
            return 1
        try:
            tasks.Get(tasks_pb2.GetTaskRequest(task_id="no-such-task"), timeout=10)
        except grpc.RpcError as error:
            print(json.dumps({"unknown_task_code": error.code().name, "message": error.details()}), flush=True)
        return 0 if final.state == tasks_pb2.TASK_STATE_COMPLETED else 7


if __name__ == "__main__":
    sys.exit(main())
