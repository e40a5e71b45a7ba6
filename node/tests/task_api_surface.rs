//! The task API's whole surface on a real cluster: every kind of bad input is refused with the
//! right code and the field named (and changes nothing), batch submit, list with filters and
//! pages, results of a planned task, watch to the end, and retry.

#[path = "support/tasks.rs"]
mod common;

use std::path::Path;

use common::*;
use maos_client::proto::v1::task_service_client::TaskServiceClient;
use maos_client::proto::v1::{
    BatchSubmitRequest, CancelTaskRequest, GetTaskRequest, ListTasksRequest, RetryTaskRequest, SubmitTaskRequest,
    TaskState, WatchTaskRequest,
};
use maos_testkit::local_cluster::LocalCluster;
use tonic::transport::Channel;
use tonic::Code;
use tonic_types::StatusExt;

fn task(description: &str) -> SubmitTaskRequest {
    SubmitTaskRequest { task_type: "coder".into(), description: description.into(), ..Default::default() }
}

async fn refused(client: &mut TaskServiceClient<Channel>, request: SubmitTaskRequest) -> tonic::Status {
    client.submit(request).await.expect_err("must be refused")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_input_is_refused_by_name_and_the_surface_works() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let mut cluster = LocalCluster::new(Path::new(env!("CARGO_BIN_EXE_maos")), root.path(), options())?;
    cluster.start_all()?;
    let (leader, _) = cluster.wait_for_leader(&[1, 2, 3], STEP).await?;
    cluster.wait_ready(&[1, 2, 3], STEP).await?;
    let follower = [1, 2, 3].into_iter().find(|id| *id != leader).expect("a follower");
    let mut client = tasks_client(&cluster, follower)?;
    // Wait until agents serve `coder`.
    let deadline = tokio::time::Instant::now() + STEP;
    let first = loop {
        match client.submit(task("first")).await {
            Ok(answer) => break answer.into_inner().task_id,
            Err(status) if status.code() == Code::InvalidArgument && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await
            }
            Err(status) => return Err(status.into()),
        }
    };
    wait_all(&mut client, std::slice::from_ref(&first), TaskState::Completed).await?;
    let before = client.list(ListTasksRequest::default()).await?.into_inner().tasks.len();

    type Case = (&'static str, SubmitTaskRequest, Code, &'static str);
    let cases: Vec<Case> = vec![
        ("empty description", task(""), Code::InvalidArgument, "description"),
        ("oversized description", task(&"d".repeat(16 * 1024 + 1)), Code::InvalidArgument, "description"),
        (
            "oversized input",
            SubmitTaskRequest { input: "i".repeat(16 * 1024 + 1), ..task("x") },
            Code::InvalidArgument,
            "input",
        ),
        (
            "unknown type",
            SubmitTaskRequest { task_type: "poet".into(), ..task("x") },
            Code::FailedPrecondition,
            "task_type",
        ),
        ("empty type", SubmitTaskRequest { task_type: String::new(), ..task("x") }, Code::InvalidArgument, "task_type"),
        ("bad priority", SubmitTaskRequest { priority: 42, ..task("x") }, Code::InvalidArgument, "priority"),
        (
            "unknown dependency",
            SubmitTaskRequest { depends_on: vec!["no-such-task".into()], ..task("x") },
            Code::NotFound,
            "depends_on",
        ),
        (
            "duplicate dependency",
            SubmitTaskRequest { depends_on: vec![first.clone(), first.clone()], ..task("x") },
            Code::InvalidArgument,
            "depends_on",
        ),
        ("unknown parent", SubmitTaskRequest { parent: "no-such-task".into(), ..task("x") }, Code::NotFound, "parent"),
        (
            "too many retries",
            SubmitTaskRequest { max_retries: 1_000, ..task("x") },
            Code::InvalidArgument,
            "max_retries",
        ),
    ];
    for (name, request, code, field) in cases {
        let status = refused(&mut client, request).await;
        assert_eq!(status.code(), code, "{name}: {status:?}");
        assert!(status.message().contains(field), "{name}: the message names {field}: {}", status.message());
        // Programs read the field from a google.rpc.BadRequest detail.
        let violations = status.get_details_bad_request().map(|b| b.field_violations).unwrap_or_default();
        assert!(
            violations.iter().any(|v| field.starts_with(&v.field) || v.field.starts_with(field)),
            "{name}: details {violations:?}"
        );
    }
    // A payload over the transport's limit.
    let huge = SubmitTaskRequest { input: "h".repeat(80 << 20), ..task("x") };
    let status = refused(&mut client, huge).await;
    assert!(matches!(status.code(), Code::ResourceExhausted | Code::OutOfRange), "{status:?}");
    for unknown in [
        client.get(GetTaskRequest { task_id: "no-such-task".into(), stale: false }).await.expect_err("get"),
        client
            .cancel(CancelTaskRequest { task_id: "no-such-task".into(), reason: String::new() })
            .await
            .expect_err("cancel"),
        client.retry(RetryTaskRequest { task_id: "no-such-task".into() }).await.expect_err("retry"),
        client.results(GetTaskRequest { task_id: "no-such-task".into(), stale: false }).await.expect_err("results"),
    ] {
        assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");
        assert!(unknown.message().contains("no-such-task"), "{unknown:?}");
    }
    let bad_page = client.list(ListTasksRequest { page_size: 5_000, ..Default::default() }).await.expect_err("page");
    assert_eq!(bad_page.code(), Code::InvalidArgument);
    assert!(bad_page.message().contains("page_size"));
    let bad_state = client.list(ListTasksRequest { states: vec![99], ..Default::default() }).await.expect_err("state");
    assert!(bad_state.message().contains("states"), "{bad_state:?}");
    let after = client.list(ListTasksRequest::default()).await?.into_inner().tasks.len();
    assert_eq!(after, before, "no refusal created a task");

    // Batch submit: one answer per task; a bad one refuses only itself.
    let batch = BatchSubmitRequest { tasks: vec![task("b1"), task(""), task("b3")] };
    let results = client.batch_submit(batch).await?.into_inner().results;
    assert_eq!(results.len(), 3);
    assert!(!results[0].task_id.is_empty() && !results[2].task_id.is_empty());
    assert_eq!(results[1].code, Code::InvalidArgument as i32);
    assert!(results[1].error.contains("description"), "{:?}", results[1]);
    let too_many = BatchSubmitRequest { tasks: vec![task("x"); 1_001] };
    assert_eq!(client.batch_submit(too_many).await.expect_err("batch").code(), Code::ResourceExhausted);

    // List: filters and pages cover every task exactly once.
    let mut seen = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list(ListTasksRequest { page_size: 2, page_token: page_token.clone(), ..Default::default() })
            .await?;
        let page = page.into_inner();
        seen.extend(page.tasks.into_iter().map(|t| t.task_id));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(seen.len(), before + 2, "{seen:?}");
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted, seen, "pages are in id order without repeats");

    // Watch a task from submit to its end.
    let watched =
        client.submit(SubmitTaskRequest { input: "sleep:500".into(), ..task("watched") }).await?.into_inner().task_id;
    let mut stream =
        client.watch(WatchTaskRequest { task_id: watched.clone(), include_children: false }).await?.into_inner();
    let mut states = Vec::new();
    while let Some(event) = stream.message().await? {
        states.push(event.state);
        if event.finished {
            assert_eq!(event.state, TaskState::Completed as i32);
            assert!(output_of(&event.result).contains("sleep:500"), "{event:?}");
        }
    }
    assert!(states.contains(&(TaskState::Running as i32)), "{states:?}");
    assert_eq!(states.last(), Some(&(TaskState::Completed as i32)));

    // Retry a failed task: it runs again from its first attempt (and this agent fails it again).
    let failing =
        client.submit(SubmitTaskRequest { input: "fail:1".into(), max_retries: 0, ..task("fails once") }).await?;
    let failing = failing.into_inner().task_id;
    wait_all(&mut client, std::slice::from_ref(&failing), TaskState::Failed).await?;
    let again = client.retry(RetryTaskRequest { task_id: failing.clone() }).await?.into_inner();
    // The retry may already be running (or done) when the answer is read.
    assert!(again.attempt <= 1, "{again:?}");
    let done = wait_all(&mut client, std::slice::from_ref(&failing), TaskState::Failed).await?;
    assert_eq!(done[0].attempt, 1, "the retry ran its own first attempt: {:?}", done[0]);
    let running = client.retry(RetryTaskRequest { task_id: first.clone() }).await.expect_err("completed");
    assert_eq!(running.code(), Code::FailedPrecondition);
    Ok(())
}
