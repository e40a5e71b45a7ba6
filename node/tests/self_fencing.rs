//! Two live owners, two ways (issue 16, breaks 2 and 5), with real processes:
//! - a node cut off from its majority stops its own agent before its lease can expire, by its own
//!   monotonic clock (fencing refuses a stale owner's report; self-fencing stops its work);
//! - a node whose whole process is stalled (`SIGSTOP`) has its agent stopped all the same, by
//!   its fence keeper, a process of its own;
//! - a node restarted while it held leases does not run them again as the same attempt: they are
//!   interrupted attempts, and the task runs again as a new one.

#[path = "support/tasks.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use maos_client::proto::v1::{SubmitTaskRequest, TaskState};
use maos_testkit::local_cluster::{LocalCluster, LocalClusterOptions};

const LEASE_MS: u64 = 3_000;

/// A command agent that appends `<unix ms>` to `<dir>/<task id>-<attempt>` every 50 ms for 60 s.
const TICKER: &str = r#"
import os, sys, time
path = os.path.join(sys.argv[1], os.environ["MAOS_TASK_ID"] + "-" + os.environ["MAOS_ATTEMPT"])
end = time.time() + 60
while time.time() < end:
    with open(path, "a") as f:
        f.write("%d\n" % int(time.time() * 1000))
    time.sleep(0.05)
print('{"result": "ticked"}')
"#;

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The ticks an attempt wrote, in order.
fn ticks(dir: &Path, task_id: &str, attempt: u32) -> Vec<u64> {
    std::fs::read_to_string(dir.join(format!("{task_id}-{attempt}")))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn ticker_options(script: &Path, ticks: &Path) -> LocalClusterOptions {
    let types = format!(
        "{{ticker: {{backend: command, command: [/usr/bin/python3, {}, {}], slots: 1}}}}",
        script.display(),
        ticks.display()
    );
    let env = [
        ("MAOS_SCHEDULER_LEASE_MS".to_string(), LEASE_MS.to_string()),
        ("MAOS_SCHEDULER_LEASE_RENEW_INTERVAL_MS".to_string(), "500".to_string()),
        ("MAOS_AGENTS_TYPES".to_string(), types),
    ];
    LocalClusterOptions { env: env.into_iter().collect(), ..Default::default() }
}

/// A cluster of ticker agents under `root`, one task ticking on node `owner`.
struct Ticking {
    cluster: LocalCluster,
    tick_dir: PathBuf,
    task_id: String,
    owner: u64,
}

/// Start a cluster of ticker agents and a task, and return once its agent really works.
async fn ticking(root: &Path) -> anyhow::Result<Ticking> {
    let script = root.join("ticker.py");
    std::fs::write(&script, TICKER)?;
    let tick_dir: PathBuf = root.join("ticks");
    std::fs::create_dir_all(&tick_dir)?;
    let mut cluster =
        LocalCluster::new(Path::new(env!("CARGO_BIN_EXE_maos")), root, ticker_options(&script, &tick_dir))?;
    cluster.start_all()?;
    let (leader, _) = cluster.wait_for_leader(&[1, 2, 3], STEP).await?;
    cluster.wait_ready(&[1, 2, 3], STEP).await?;
    let mut client = tasks_client(&cluster, leader)?;
    let deadline = tokio::time::Instant::now() + STEP;
    while cluster.client()?.agents(0).await?.total < 3 {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "the ticker agents never registered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let request = SubmitTaskRequest {
        task_type: "ticker".into(),
        description: "tick for a minute".into(),
        timeout_ms: 120_000,
        idempotency_key: "ticker-1".into(),
        ..Default::default()
    };
    let task_id = client.submit(request).await?.into_inner().task_id;
    let running = wait_all(&mut client, std::slice::from_ref(&task_id), TaskState::Running).await?;
    let owner = running[0].node_id;
    let deadline = tokio::time::Instant::now() + STEP;
    while ticks(&tick_dir, &task_id, 1).len() < 5 {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "the agent never ticked");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(Ticking { cluster, tick_dir, task_id, owner })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_node_stops_its_agent_before_its_lease_can_expire() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let Ticking { mut cluster, tick_dir, task_id, owner } = ticking(root.path()).await?;

    // Cut the owner off from its majority: the other two nodes die, so no renewal can commit.
    let cut_at_ms = now_ms();
    for id in [1, 2, 3].into_iter().filter(|id| *id != owner) {
        cluster.kill(id)?;
    }
    // Every renewal the owner could have had committed was sent before the cut, so no lease it
    // holds can be proven live past cut + lease. The agent must have stopped by then.
    tokio::time::sleep(Duration::from_millis(LEASE_MS + 1_500)).await;
    let before = ticks(&tick_dir, &task_id, 1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = ticks(&tick_dir, &task_id, 1);
    let last = after.last().copied().unwrap_or(0);
    assert_eq!(
        before.len(),
        after.len(),
        "node {owner}'s agent still works {} ms after it was cut off",
        now_ms() - cut_at_ms
    );
    assert!(
        last <= cut_at_ms + LEASE_MS,
        "node {owner}'s agent worked until {} ms after the cut, past the {LEASE_MS} ms lease\n{}",
        last.saturating_sub(cut_at_ms),
        cluster.log_tail(owner, 30)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_node_s_agent_is_stopped_by_its_keeper_before_its_lease_can_expire() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let Ticking { cluster, tick_dir, task_id, owner } = ticking(root.path()).await?;

    // Stall the owner's whole process: its runtime can stop nothing now, while its agent, a
    // process of its own, runs on. Only its fence keeper can stop it before the lease expires.
    let stalled_at_ms = now_ms();
    cluster.signal(owner, libc::SIGSTOP)?;
    tokio::time::sleep(Duration::from_millis(LEASE_MS + 1_500)).await;
    let before = ticks(&tick_dir, &task_id, 1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = ticks(&tick_dir, &task_id, 1);
    cluster.signal(owner, libc::SIGCONT)?;
    let last = after.last().copied().unwrap_or(0);
    assert_eq!(before.len(), after.len(), "node {owner}'s agent still works while its node is stalled");
    assert!(
        last <= stalled_at_ms + LEASE_MS,
        "node {owner}'s agent worked until {} ms after its node stalled, past the {LEASE_MS} ms lease\n{}",
        last.saturating_sub(stalled_at_ms),
        cluster.log_tail(owner, 30)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_runs_its_old_leases_as_new_attempts_not_again_as_the_same_one() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    // Long leases: the restarted node is back well before they could expire, so it finds them
    // still its own.
    let mut options = options();
    options.env.retain(|(k, _)| k != "MAOS_SCHEDULER_LEASE_MS");
    options.env.push(("MAOS_SCHEDULER_LEASE_MS".into(), "20000".into()));
    let mut cluster = LocalCluster::new(Path::new(env!("CARGO_BIN_EXE_maos")), root.path(), options)?;
    cluster.start_all()?;
    let (leader, _) = cluster.wait_for_leader(&[1, 2, 3], STEP).await?;
    cluster.wait_ready(&[1, 2, 3], STEP).await?;
    let mut client = tasks_client(&cluster, leader)?;
    let ids = submit_sleepers(&mut client, 6, 4_000).await?;
    let running = wait_all(&mut client, &ids, TaskState::Running).await?;
    let victim = [1, 2, 3].into_iter().find(|id| *id != leader).expect("a follower");
    let on_victim: Vec<String> = running.iter().filter(|v| v.node_id == victim).map(|v| v.task_id.clone()).collect();
    anyhow::ensure!(!on_victim.is_empty(), "node {victim} runs nothing: {running:?}");

    cluster.kill(victim)?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.start_node(victim)?;
    let done = wait_all(&mut client, &ids, TaskState::Completed)
        .await
        .map_err(|e| anyhow::anyhow!("{e}\nnode {victim} log:\n{}", cluster.log_tail(victim, 30)))?;
    for view in &done {
        let was_on_victim = on_victim.contains(&view.task_id);
        let expected_attempts = if was_on_victim { 2 } else { 1 };
        assert_eq!(
            view.attempt, expected_attempts,
            "task {} (on the restarted node {victim}: {was_on_victim}) must not run again as the same attempt",
            view.task_id
        );
    }
    Ok(())
}
