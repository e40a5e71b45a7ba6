//! Tasks leased to slots on node B; `kill -9` node B; after the lease runs out the tasks are
//! leased again elsewhere and complete; a completion with the old fencing token is refused;
//! no task is lost.

#[path = "support/tasks.rs"]
mod common;

use std::path::Path;

use common::*;
use maos_client::proto::v1::{CompleteTaskRequest, TaskState};
use maos_testkit::local_cluster::LocalCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_of_a_killed_node_are_leased_again_and_complete_once() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let mut cluster = LocalCluster::new(Path::new(env!("CARGO_BIN_EXE_maos")), root.path(), options())?;
    cluster.start_all()?;
    let (leader, _) = cluster.wait_for_leader(&[1, 2, 3], STEP).await?;
    cluster.wait_ready(&[1, 2, 3], STEP).await?;
    let mut client = tasks_client(&cluster, leader)?;
    // Six slots in the cluster, six tasks: every node runs two.
    let ids = submit_sleepers(&mut client, 6, 4_000).await?;
    let running = wait_all(&mut client, &ids, TaskState::Running).await?;
    let victim = [1, 2, 3].into_iter().find(|id| *id != leader).expect("a follower");
    let on_victim: Vec<(String, u64)> =
        running.iter().filter(|v| v.node_id == victim).map(|v| (v.task_id.clone(), v.fencing_token)).collect();
    anyhow::ensure!(!on_victim.is_empty(), "node {victim} runs nothing: {running:?}");

    cluster.kill(victim)?;
    let done = wait_all(&mut client, &ids, TaskState::Completed)
        .await
        .map_err(|e| anyhow::anyhow!("{e}\nleader log:\n{}", cluster.log_tail(leader, 30)))?;
    for view in &done {
        let was_on_victim = on_victim.iter().any(|(id, _)| *id == view.task_id);
        let expected_attempts = if was_on_victim { 2 } else { 1 };
        assert_eq!(view.attempt, expected_attempts, "task {} (on node {victim}: {was_on_victim})", view.task_id);
        assert_eq!(output_of(&view.result), "echo: sleep:4000");
    }
    // The killed node's owner comes back with its old token: refused, nothing changes.
    for (task_id, old_token) in &on_victim {
        let stale = CompleteTaskRequest { task_id: task_id.clone(), fencing_token: *old_token, result: "stale".into() };
        let status = client.complete(stale).await.expect_err("a stale completion must be refused");
        assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
        let result = &done.iter().find(|v| v.task_id == *task_id).expect("a victim's task").result;
        assert_eq!(&get(&mut client, task_id).await?.result, result, "the stale write changed nothing");
    }
    Ok(())
}
