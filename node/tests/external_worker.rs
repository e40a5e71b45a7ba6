//! An external worker written with the SDK (`client/examples/echo_worker.rs`, a real process)
//! receives assignments, heartbeats and completes them; `kill -9` of the worker leads to its
//! tasks being leased again to another worker, which completes them.

#[path = "support/tasks.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{get, tasks_client, wait_all, STEP};
use maos_client::proto::v1::agent_service_client::AgentServiceClient;
use maos_client::proto::v1::{ListAgentsRequest, SubmitTaskRequest, TaskState};
use maos_testkit::local_cluster::{LocalCluster, LocalClusterOptions};

/// The example worker, built next to this test by `cargo build --workspace --all-targets`.
fn worker_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let profile_dir = exe.parent().and_then(Path::parent).ok_or_else(|| anyhow::anyhow!("no target dir"))?;
    let binary = profile_dir.join("examples").join("echo_worker");
    anyhow::ensure!(
        binary.exists(),
        "{} is missing; build it with `cargo build -p maos-client --examples`",
        binary.display()
    );
    Ok(binary)
}

struct WorkerProcess(Child);

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_worker(endpoints: &str, name: &str, max_sleep_ms: u64, root: &Path) -> anyhow::Result<WorkerProcess> {
    let log = std::fs::File::create(root.join(format!("{name}.log")))?;
    let child = Command::new(worker_binary()?)
        .args([endpoints, name, "scraper", &max_sleep_ms.to_string()])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    Ok(WorkerProcess(child))
}

fn submit(input: &str, i: usize) -> SubmitTaskRequest {
    SubmitTaskRequest {
        task_type: "scraper".into(),
        description: format!("scrape {i}"),
        input: input.into(),
        max_retries: 3,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sdk_worker_runs_tasks_and_its_death_leads_to_re_lease() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let env = [("MAOS_SCHEDULER_LEASE_MS", "1500"), ("MAOS_SCHEDULER_LEASE_RENEW_INTERVAL_MS", "300")];
    let options = LocalClusterOptions {
        env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ..Default::default()
    };
    let mut cluster = LocalCluster::new(Path::new(env!("CARGO_BIN_EXE_maos")), root.path(), options)?;
    cluster.start_all()?;
    let (leader, _) = cluster.wait_for_leader(&[1, 2, 3], STEP).await?;
    cluster.wait_ready(&[1, 2, 3], STEP).await?;
    let endpoints = cluster.client()?.endpoints().join(",");
    let mut client = tasks_client(&cluster, leader)?;

    let first = start_worker(&endpoints, "worker-a", u64::MAX, root.path())?;
    // Submits of a type nobody serves are refused: wait for the worker's registration.
    let channel = cluster.client_of(leader)?.channel(0).ok_or_else(|| anyhow::anyhow!("channel"))?;
    let mut agents = AgentServiceClient::new(channel);
    let deadline = tokio::time::Instant::now() + STEP;
    while !agents
        .list(ListAgentsRequest::default())
        .await?
        .into_inner()
        .agents
        .iter()
        .any(|a| a.agent_type == "scraper")
    {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "the worker never registered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut quick = Vec::new();
    for i in 0..2 {
        quick.push(client.submit(submit(&format!("hello-{i}"), i)).await?.into_inner().task_id);
    }
    let done = wait_all(&mut client, &quick, TaskState::Completed).await?;
    for (i, view) in done.iter().enumerate() {
        assert_eq!(view.result, format!("worker worker-a: hello-{i}"));
    }

    // Long tasks outlive several lease periods: the worker's heartbeats keep them.
    let mut long = Vec::new();
    for i in 0..2 {
        long.push(client.submit(submit("sleep:600000", 10 + i)).await?.into_inner().task_id);
    }
    wait_all(&mut client, &long, TaskState::Running).await?;
    tokio::time::sleep(Duration::from_millis(4_500)).await;
    for task_id in &long {
        let view = get(&mut client, task_id).await?;
        assert_eq!((view.state, view.attempt), (TaskState::Running as i32, 1), "heartbeats renew the lease: {view:?}");
    }

    // kill -9: nobody heartbeats those leases now; another worker gets the tasks.
    drop(first);
    let _second = start_worker(&endpoints, "worker-b", 0, root.path())?;
    let done = wait_all(&mut client, &long, TaskState::Completed).await.map_err(|e| {
        let log = std::fs::read_to_string(root.path().join("worker-b.log")).unwrap_or_default();
        anyhow::anyhow!("{e}\nworker-b log:\n{log}\nleader log:\n{}", cluster.log_tail(leader, 20))
    })?;
    for view in done {
        assert_eq!(view.result, "worker worker-b: sleep:600000");
        assert_eq!(view.attempt, 2, "the dead worker's attempt counted as failed: {view:?}");
    }
    Ok(())
}
