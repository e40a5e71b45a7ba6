//! Retention on a 3-node cluster of real processes, on both task-data backends: a finished task
//! leaves every node's replicated state after a short `tasks.retention` while an open one stays;
//! embedded, `Get`, `Results` and `Watch` then answer NOT_FOUND saying it was evicted after the
//! retention; with PostgreSQL (a real server on loopback) they answer from PostgreSQL as before.
//! Either way the task's idempotency key still answers with it.

#[path = "support/tasks.rs"]
mod common;

use std::path::Path;
use std::time::Duration;

use common::{get, output_of, tasks_client, STEP};
use maos_client::proto::v1::task_service_client::TaskServiceClient;
use maos_client::proto::v1::{GetTaskRequest, SubmitTaskRequest, TaskState, WatchTaskRequest};
use maos_testkit::local_cluster::{LocalCluster, LocalClusterOptions};
use maos_testkit::local_services::Postgres;
use tonic::transport::Channel;

fn echo(input: &str, key: &str) -> SubmitTaskRequest {
    SubmitTaskRequest {
        task_type: "coder".into(),
        description: "echo".into(),
        input: input.into(),
        idempotency_key: key.into(),
        ..Default::default()
    }
}

/// Submit once the cluster serves the type and the store is ready (agents register and the
/// schema is migrated just after the leader is elected).
async fn submit_when_ready(
    client: &mut TaskServiceClient<Channel>,
    request: SubmitTaskRequest,
) -> anyhow::Result<String> {
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        match client.submit(request.clone()).await {
            Ok(answer) => return Ok(answer.into_inner().task_id),
            Err(status) if tokio::time::Instant::now() < deadline => {
                let starting =
                    status.code() == tonic::Code::Unavailable || status.message().contains("no agent serves");
                anyhow::ensure!(starting, "submit refused: {status:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(status) => anyhow::bail!("the cluster did not accept a submit within {STEP:?}: {status:?}"),
        }
    }
}

/// Start the cluster, run one task to completion and keep one running; wait until the finished
/// one has left every node's state. Returns the cluster, a client, and (finished, running) ids.
async fn evict_one(
    root: &Path,
    env: Vec<(String, String)>,
) -> anyhow::Result<(LocalCluster, TaskServiceClient<Channel>, String, String)> {
    let mut options = common::options();
    options.env.extend([("MAOS_TASKS_RETENTION".to_string(), "1".to_string())]);
    options.env.extend(env);
    let mut cluster =
        LocalCluster::new(Path::new(env!("CARGO_BIN_EXE_maos")), root, LocalClusterOptions { ..options })?;
    cluster.start_all()?;
    let (leader, _) = cluster.wait_for_leader(&[1, 2, 3], STEP).await?;
    cluster.wait_ready(&[1, 2, 3], STEP).await?;
    let mut client = tasks_client(&cluster, leader)?;
    let finished = submit_when_ready(&mut client, echo("kept after eviction", "retention-1")).await?;
    let running = submit_when_ready(&mut client, echo("sleep:120000", "retention-2")).await?;
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let view = get(&mut client, &finished).await;
        if let Ok(view) = &view {
            if view.state == TaskState::Completed as i32 {
                break;
            }
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "{finished} did not complete: {view:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Evicted on every node: no node counts a completed task any more, the running one stays.
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let mut evicted_everywhere = true;
        for id in 1..=3 {
            let counts = cluster.status(id).await?.tasks.unwrap_or_default();
            evicted_everywhere &= counts.completed == 0 && counts.running + counts.queued == 1;
        }
        if evicted_everywhere {
            break;
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "{finished} was not evicted within {STEP:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_ne!(get(&mut client, &running).await?.state, TaskState::Completed as i32, "the open task is held");
    Ok((cluster, client, finished, running))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_an_evicted_task_is_not_found_and_the_answer_says_it_was_evicted() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let (mut cluster, mut client, finished, _) = evict_one(root.path(), Vec::new()).await?;
    let request = || GetTaskRequest { task_id: finished.clone(), stale: false };
    for status in [
        client.get(request()).await.expect_err("evicted"),
        client.results(request()).await.expect_err("evicted"),
        client
            .watch(WatchTaskRequest { task_id: finished.clone(), include_children: false })
            .await
            .expect_err("evicted"),
    ] {
        assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
        assert!(status.message().contains("evicted"), "{}", status.message());
        assert!(status.message().contains("tasks.retention"), "{}", status.message());
    }
    // An id above every evicted one never existed, and says so.
    let never = client.get(GetTaskRequest { task_id: "ffffffff-never".into(), stale: false }).await.expect_err("none");
    assert_eq!(never.code(), tonic::Code::NotFound);
    assert!(!never.message().contains("evicted"), "{}", never.message());
    // The idempotency key outlives the task (tasks.idempotency_window): a resubmit gets it.
    let again = client.submit(echo("kept after eviction", "retention-1")).await?.into_inner();
    assert_eq!((again.task_id.as_str(), again.duplicate), (finished.as_str(), true));
    cluster.stop();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_postgresql_an_evicted_task_answers_from_postgresql() -> anyhow::Result<()> {
    let postgres = Postgres::start()?;
    let root = tempfile::tempdir()?;
    let env = vec![("MAOS_DATABASE_PRIMARY_URL".to_string(), postgres.url())];
    let (mut cluster, mut client, finished, _) = evict_one(root.path(), env).await?;
    // Every node answers, from PostgreSQL, as it did while the task was held.
    for id in 1..=3 {
        let mut client = tasks_client(&cluster, id)?;
        let view = get(&mut client, &finished).await?;
        assert_eq!(view.state, TaskState::Completed as i32, "node {id}: {view:?}");
        assert_eq!(view.input, "kept after eviction", "node {id}");
        assert_eq!(output_of(&view.result), "echo: kept after eviction", "node {id}");
        assert_eq!(view.idempotency_key, "retention-1");
        let results = client.results(GetTaskRequest { task_id: finished.clone(), stale: false }).await?.into_inner();
        assert_eq!(results.result, view.result, "node {id}");
        assert_eq!(results.state, TaskState::Completed as i32);
    }
    let mut events =
        client.watch(WatchTaskRequest { task_id: finished.clone(), include_children: false }).await?.into_inner();
    let last = events.message().await?.ok_or_else(|| anyhow::anyhow!("no event"))?;
    assert!(last.finished && last.state == TaskState::Completed as i32, "{last:?}");
    assert_eq!(output_of(&last.result), "echo: kept after eviction");
    assert!(events.message().await?.is_none(), "the stream ends after the final event");
    let again = client.submit(echo("kept after eviction", "retention-1")).await?.into_inner();
    assert_eq!((again.task_id.as_str(), again.duplicate), (finished.as_str(), true));
    // The input row of the evicted task is not an orphan: the sweep keeps it.
    let db = postgres.connect().await?;
    let inputs: i64 = sqlx::query_scalar("SELECT count(*) FROM task_inputs WHERE task_id = $1")
        .bind(&finished)
        .fetch_one(&db)
        .await?;
    assert_eq!(inputs, 1);
    cluster.stop();
    Ok(())
}
