//! Task API behaviour on a real cluster: the queue bound, idempotent submits, validation,
//! dependencies and cancellation.

#[path = "support/tasks.rs"]
mod common;

use std::path::Path;

use common::*;
use maos_client::proto::v1::{CancelTaskRequest, GetTaskRequest, SubmitTaskRequest, TaskState};
use maos_testkit::local_cluster::LocalCluster;

fn unserved(i: usize) -> SubmitTaskRequest {
    SubmitTaskRequest {
        task_type: "nobody-runs-this".into(),
        description: format!("waits forever {i}"),
        idempotency_key: format!("unserved-{i}"),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submits_are_bounded_idempotent_validated_and_cancellable() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let mut options = options();
    options.env.push(("MAOS_SYSTEM_TASK_QUEUE_SIZE".into(), "3".into()));
    // The queue is filled with tasks nobody serves, so none finishes meanwhile.
    options.env.push(("MAOS_SCHEDULER_ACCEPT_UNSERVED_TYPES".into(), "true".into()));
    let mut cluster = LocalCluster::new(Path::new(env!("CARGO_BIN_EXE_maos")), root.path(), options)?;
    cluster.start_all()?;
    let (leader, _) = cluster.wait_for_leader(&[1, 2, 3], STEP).await?;
    cluster.wait_ready(&[1, 2, 3], STEP).await?;
    let follower = [1, 2, 3].into_iter().find(|id| *id != leader).expect("a follower");
    let mut client = tasks_client(&cluster, follower)?;

    // The leader applies the configured limit shortly after it is elected.
    let deadline = tokio::time::Instant::now() + STEP;
    while cluster.status(follower).await?.tasks.map(|t| t.queue_limit) != Some(3) {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "the configured queue size never applied");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let first = client.submit(unserved(0)).await?.into_inner();
    let again = client.submit(unserved(0)).await?.into_inner();
    assert_eq!((again.task_id.as_str(), again.duplicate), (first.task_id.as_str(), true), "same idempotency key");
    let mut submitted = 1;
    let refusal = loop {
        match client.submit(unserved(submitted)).await {
            Ok(_) => submitted += 1,
            Err(status) => break status,
        }
        anyhow::ensure!(submitted <= 3, "more than 3 open tasks were accepted");
    };
    assert_eq!(refusal.code(), tonic::Code::ResourceExhausted, "{refusal:?}");
    assert!(refusal.message().contains("queue is full"), "{refusal:?}");
    assert_eq!(submitted, 3);

    let bad = SubmitTaskRequest { task_type: "coder".into(), description: String::new(), ..Default::default() };
    let status = client.submit(bad).await.expect_err("an empty description is refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("description"), "{status:?}");
    let unknown = GetTaskRequest { task_id: "no-such-task".into(), stale: false };
    assert_eq!(client.get(unknown).await.expect_err("unknown").code(), tonic::Code::NotFound);

    let cancelled =
        client.cancel(CancelTaskRequest { task_id: first.task_id.clone(), reason: "test".into() }).await?.into_inner();
    assert_eq!(cancelled.cancelled, vec![first.task_id.clone()]);
    assert_eq!(get(&mut client, &first.task_id).await?.state, TaskState::Cancelled as i32);
    // A finished task frees its place in the queue.
    client.submit(unserved(10)).await?;
    Ok(())
}
