"""Tasks against the real cluster: a planned workflow watched to completion, refusals that name
the field, failover past a dead endpoint, pages."""

from __future__ import annotations

import json

import pytest

import maos
from conftest import STEP_S, free_dead_endpoint


def test_a_planned_workflow_is_watched_to_completed_and_results_show_its_children(client: maos.Client) -> None:
    planner_input = {"branches": 3, "branch_type": "researcher", "branch_input": "sleep:300",
                     "aggregate_type": "analyst"}
    workflow = client.submit_workflow(description="research three topics, then combine them",
                                      planner_input=planner_input)
    events = list(client.watch(workflow.root, include_children=True, timeout=STEP_S))
    last = events[-1]
    assert (last.task_id, last.state, last.finished) == (workflow.root, maos.TaskState.COMPLETED, True), events
    children_seen = {e.task_id for e in events if e.task_id != workflow.root}
    assert len(children_seen) == 4, children_seen

    results = client.results(workflow.root)
    assert results.state == maos.TaskState.COMPLETED
    keys = sorted(c.plan_key for c in results.children)
    assert keys == ["aggregate", "branch-1", "branch-2", "branch-3"], results.children
    assert all(c.state == maos.TaskState.COMPLETED for c in results.children), results.children
    assert {c.task_id for c in results.children} == children_seen
    combined = json.loads(results.result)
    assert set(combined) == set(keys)
    root = client.get(workflow.root)
    assert root.planning and root.expanded and len(root.children) == 4


def test_an_explicit_plan_runs_its_steps_in_dependency_order(client: maos.Client) -> None:
    plan = (maos.Plan()
            .step("search", "researcher", "find sources", input="sleep:100")
            .step("write", "analyst", "combine them", depends_on=["search"]))
    workflow = client.submit_workflow(plan)
    again = client.submit_workflow(plan, idempotency_key=workflow.key)
    assert again.steps == workflow.steps, "the same workflow key submits the same tasks"
    final = client.wait(workflow.steps["write"], timeout=STEP_S)
    assert final.state == maos.TaskState.COMPLETED, final
    assert final.depends_on == [workflow.steps["search"]]
    combined = json.loads(final.result)["combined"]
    assert workflow.steps["search"] in combined
    with pytest.raises(maos.InvalidArgument) as refused:
        client.submit_workflow({"subtasks": [{"key": "a", "task_type": "coder", "description": "x",
                                              "depends_on": ["a"]}]})
    assert refused.value.field == "plan.subtasks[a].depends_on"


def test_bad_input_raises_naming_the_field(client: maos.Client) -> None:
    with pytest.raises(maos.InvalidArgument) as empty_type:
        client.submit("", "no type")
    assert empty_type.value.field == "task_type", empty_type.value
    assert empty_type.value.code is not None and empty_type.value.code.name == "INVALID_ARGUMENT"

    with pytest.raises(maos.InvalidArgument) as oversized:
        client.submit("coder", "too big", input="x" * (16 * 1024 + 1))
    assert oversized.value.field == "input", oversized.value

    with pytest.raises(maos.NotFound):
        client.get("no-such-task")

    answers = client.batch_submit([maos.TaskSpec("coder", "fine", input="ok"), maos.TaskSpec("coder", "")])
    assert answers[0].ok and answers[0].task_id
    assert not answers[1].ok and answers[1].error is not None
    assert answers[1].error.field == "description", answers[1].error


def test_the_field_comes_from_the_status_detail_first() -> None:
    from google.protobuf import any_pb2
    from google.rpc import error_details_pb2, status_pb2

    from maos.errors import field_from_details, field_from_message

    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.BadRequest(field_violations=[
        error_details_pb2.BadRequest.FieldViolation(field="labels", description="too many")]))
    trailer = status_pb2.Status(code=3, message="x", details=[detail]).SerializeToString()
    assert field_from_details([("grpc-status-details-bin", trailer)]) == "labels"
    assert field_from_details([("other", b"")]) is None
    assert field_from_message("task_type: must not be empty") == "task_type"
    assert field_from_message("no leader is known yet: retry") is None


def test_a_client_given_a_dead_endpoint_first_still_works(endpoints: list[str]) -> None:
    with maos.Client([free_dead_endpoint(), endpoints[0]], deadline=15) as client:
        submitted = client.submit("coder", "through failover", input="hello")
        assert client.wait(submitted.task_id, timeout=STEP_S).state == maos.TaskState.COMPLETED
        assert client._preferred == 1, "calls start at the endpoint that answered"
    with maos.Client([free_dead_endpoint()], deadline=1) as dead:
        with pytest.raises(maos.Unavailable):
            dead.get("anything")


def test_list_pages_through_tasks(client: maos.Client) -> None:
    # Children of a parent of their own: with auth on, a task's submitter is the caller's
    # principal, which every test here shares.
    parent = client.submit("coder", "the pager's parent").task_id
    ids = [item.task_id for item in client.batch_submit(
        [maos.TaskSpec("coder", f"page {i}", parent=parent) for i in range(5)])]
    pages = list(client.list(parent=parent, page_size=2, pages_max=10))
    assert [len(p.tasks) for p in pages] == [2, 2, 1]
    assert [t.task_id for p in pages for t in p.tasks] == sorted(ids)
