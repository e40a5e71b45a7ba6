//! Kill the leader while tasks run: the new leader extends every live lease before anything can
//! expire, so no task on a surviving node loses its lease, and every task completes exactly once.

#[path = "support/tasks.rs"]
mod common;

use std::path::Path;

use common::*;
use maos_client::proto::v1::TaskState;
use maos_testkit::local_cluster::LocalCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_failover_expires_no_lease_early() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let mut cluster = LocalCluster::new(Path::new(env!("CARGO_BIN_EXE_maos")), root.path(), options())?;
    cluster.start_all()?;
    let (leader, _) = cluster.wait_for_leader(&[1, 2, 3], STEP).await?;
    cluster.wait_ready(&[1, 2, 3], STEP).await?;
    let survivor = [1, 2, 3].into_iter().find(|id| *id != leader).expect("a follower");
    let mut client = tasks_client(&cluster, survivor)?;
    let ids = submit_sleepers(&mut client, 6, 6_000).await?;
    let running = wait_all(&mut client, &ids, TaskState::Running).await?;
    let on_leader: Vec<String> = running.iter().filter(|v| v.node_id == leader).map(|v| v.task_id.clone()).collect();

    cluster.kill(leader)?;
    let done = wait_all(&mut client, &ids, TaskState::Completed).await?;
    for view in &done {
        if on_leader.contains(&view.task_id) {
            assert_eq!(view.attempt, 2, "task {} ran on the killed leader and was leased again", view.task_id);
        } else {
            assert_eq!(
                view.attempt, 1,
                "task {} on a surviving node must keep its lease through the election: {}",
                view.task_id, view.cause
            );
        }
    }
    Ok(())
}
