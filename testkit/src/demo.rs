//! `maos demo`: the main job. A local 3-node cluster on the embedded default runs a multi-agent
//! workflow (a planner fans out to parallel builtin agents, then an aggregating step), the
//! leader is killed mid-way, and the workflow still completes: every step once, nothing lost.
//! Every node serves its dashboard on a free port, printed at the start; with `keep` the cluster
//! stays up after the summary until Ctrl-C, to look at it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use std::io::IsTerminal;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use maos_client::proto::v1::{SubmitTaskRequest, TaskState};

use crate::local_cluster::{LocalCluster, LocalClusterOptions};
use maos_client::views::state_name;

const STEP_TIMEOUT: Duration = Duration::from_secs(60);
/// Parallel branches in the demo workflow, and how long each works.
const BRANCHES: u64 = 6;
const BRANCH_WORK_MS: u64 = 3_000;
/// The submit's idempotency key: resubmitting it must return the same workflow.
const WORKFLOW_KEY: &str = "demo-workflow";

/// Short leases so a dead node's work moves within seconds.
fn options() -> LocalClusterOptions {
    let env = [
        ("MAOS_SCHEDULER_LEASE_MS", "3000"),
        ("MAOS_SCHEDULER_LEASE_RENEW_INTERVAL_MS", "500"),
        ("MAOS_SYSTEM_LOG_LEVEL", "WARN"),
    ];
    LocalClusterOptions {
        log_level: "WARN".into(),
        env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        // Auth on, as in production: the demo calls as the bootstrap admin.
        auth: true,
        ..Default::default()
    }
}

/// Lines above a progress bar on a terminal (a spinner while waiting, a bar counting the
/// workflow's subtasks), plain lines when stdout is not a terminal.
struct Progress(Option<ProgressBar>);

impl Progress {
    fn new() -> Self {
        let bar = std::io::stdout().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stdout());
            bar.set_style(
                ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.enable_steady_tick(Duration::from_millis(100));
            bar
        });
        Self(bar)
    }
    fn println(&self, line: String) {
        match &self.0 {
            Some(bar) => bar.println(line),
            None => println!("{line}"),
        }
    }
    fn waiting(&self, what: &str) {
        if let Some(bar) = &self.0 {
            bar.set_message(what.to_string());
        }
    }
    /// Count `done` of `total` subtasks ended.
    fn subtasks(&self, done: u64, total: u64) {
        if let Some(bar) = &self.0 {
            if bar.length() != Some(total) {
                bar.set_style(
                    ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} subtasks completed ({elapsed})")
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("#>-"),
                );
                bar.set_length(total);
            }
            bar.set_position(done);
        }
    }
    fn finish(&self) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
    }
}

/// Run the demo with the `maos` binary at `binary`; data lives under `root` while it runs. With
/// `keep`, the cluster stays up after the summary until Ctrl-C.
pub async fn run(binary: &std::path::Path, root: &std::path::Path, keep: bool) -> anyhow::Result<()> {
    let started = Instant::now();
    let elapsed = move || format!("[{:>5.1}s]", started.elapsed().as_secs_f64());
    let mut cluster = LocalCluster::new(binary, root, options())?;
    let all: Vec<u64> = cluster.nodes.keys().copied().collect();
    println!("== Starting a local {}-node MAOS cluster (embedded storage, data in {})", all.len(), root.display());
    for node in cluster.nodes.values() {
        println!(
            "   node {}: api {}  raft {}  dashboard http://{}",
            node.id, node.api_addr, node.raft_addr, node.dashboard_addr
        );
    }
    let dashboard = cluster.nodes.values().next().map(|n| n.dashboard_addr.clone()).unwrap_or_default();
    println!("== Dashboard: http://{dashboard} (every node serves one; open it to watch the run)");
    cluster.start_all()?;
    let progress = Progress::new();
    progress.waiting("waiting for a leader");
    let (leader, term) = cluster.wait_for_leader(&all, STEP_TIMEOUT).await?;
    progress.println(format!("{} leader elected: node {leader} (term {term})", elapsed()));
    cluster.wait_ready(&all, STEP_TIMEOUT).await?;
    cluster.wait_for_bootstrap_token(STEP_TIMEOUT).await?;
    if let Some(path) = cluster.bootstrap_token_path() {
        progress.println(format!(
            "   auth is on; the bootstrap admin token is in {} (the dashboard asks for it, or another admin, operator or viewer key)",
            path.display()
        ));
        progress.println(format!("   (for the CLI: export MAOS_TOKEN=$(cat {}))", path.display()));
    }
    progress.waiting("waiting for the agent pools to register");
    let client = cluster.client()?;
    let deadline = Instant::now() + STEP_TIMEOUT;
    while client.agents(0).await?.total < 30 {
        anyhow::ensure!(Instant::now() < deadline, "the agent pools did not register");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    progress.println(format!("{} 30 builtin agents registered (5 types x 2 per node)", elapsed()));

    let input = serde_json::json!({
        "branches": BRANCHES, "branch_type": "researcher",
        "branch_input": format!("sleep:{BRANCH_WORK_MS}"), "aggregate_type": "analyst",
    });
    let request = SubmitTaskRequest {
        task_type: "mixed".into(),
        description: "research six topics in parallel, then combine the findings".into(),
        input: input.to_string(),
        max_retries: 3,
        idempotency_key: WORKFLOW_KEY.into(),
        ..Default::default()
    };
    let workflow = client.submit(request.clone()).await?.task_id;
    progress.println(format!("{} submitted workflow {workflow} (type mixed: a coordinator plans it)", elapsed()));
    progress.println(format!("   watch it live: http://{dashboard}/workflows/{workflow}"));
    progress.waiting("waiting for the coordinator's plan");

    // Watch from a node that survives the failover.
    let watcher_node = *all.iter().find(|id| **id != leader).context("a follower")?;
    let mut events = cluster.client_of(watcher_node)?.watch(&workflow, true).await?;
    let mut killed: Option<(u64, Instant)> = None;
    let mut failover_ms = None;
    let mut last_state: BTreeMap<String, i32> = BTreeMap::new();
    let finished = loop {
        let event = match tokio::time::timeout(STEP_TIMEOUT, events.message()).await {
            Ok(Ok(Some(event))) => event,
            Ok(Ok(None)) => bail!("the watch ended before the workflow finished"),
            Ok(Err(status)) => bail!("the watch failed: {}", status.message()),
            Err(_) => bail!("no progress for {} s", STEP_TIMEOUT.as_secs()),
        };
        let name = if event.task_id == workflow {
            "workflow".to_string()
        } else {
            event.task_id.rsplit('.').next().unwrap_or("?").to_string()
        };
        if last_state.get(&event.task_id) != Some(&event.state) || event.state == TaskState::Running as i32 {
            let place = if event.node_id > 0 { format!(" on node {}", event.node_id) } else { String::new() };
            let attempt = if event.attempt > 1 { format!(" (attempt {})", event.attempt) } else { String::new() };
            let waiting_or_failed = [TaskState::Queued as i32, TaskState::Failed as i32, TaskState::Cancelled as i32];
            let cause = if waiting_or_failed.contains(&event.state) && !event.cause.is_empty() {
                format!(": {}", event.cause)
            } else {
                String::new()
            };
            progress.println(format!("{} {name:<10} {}{place}{attempt}{cause}", elapsed(), state_name(event.state)));
            last_state.insert(event.task_id.clone(), event.state);
            let subtasks = last_state.keys().filter(|id| **id != workflow).count() as u64;
            let done =
                last_state.iter().filter(|(id, s)| **id != workflow && **s == TaskState::Completed as i32).count()
                    as u64;
            if subtasks > 0 {
                progress.subtasks(done, subtasks);
            }
        }
        let running = last_state.iter().filter(|(id, s)| **s == TaskState::Running as i32 && **id != workflow).count();
        if killed.is_none() && running as u64 >= BRANCHES / 2 {
            let leader = cluster.wait_for_leader(&all, STEP_TIMEOUT).await?.0;
            if leader == watcher_node {
                // Leadership moved to the node serving the watch: follow from another one.
                let other = *all.iter().find(|id| **id != leader).context("another node")?;
                events = cluster.client_of(other)?.watch(&workflow, true).await?;
            }
            progress
                .println(format!("{} == kill -9 the leader, node {leader}, while {running} branches run", elapsed()));
            cluster.kill(leader)?;
            killed = Some((leader, Instant::now()));
            let survivors: Vec<u64> = all.iter().copied().filter(|id| *id != leader).collect();
            let (new_leader, new_term) = cluster.wait_for_leader(&survivors, STEP_TIMEOUT).await?;
            let took = killed.map(|(_, at)| at.elapsed().as_millis()).unwrap_or(0);
            failover_ms = Some(took);
            progress.println(format!(
                "{} == new leader: node {new_leader} (term {new_term}), {took} ms after the kill",
                elapsed()
            ));
        }
        if event.finished {
            break event;
        }
    };
    progress.finish();
    let (victim, _) = killed.context("the workflow finished before the failover; nothing was shown")?;
    if finished.state != TaskState::Completed as i32 {
        bail!("the workflow ended {}: {}", state_name(finished.state), finished.cause);
    }

    // The same submit again (a client retrying after the failover) must find the same workflow.
    let again = client.submit(request).await?;
    let results = client.results(&workflow).await?;
    let mut attempts = 0u32;
    let mut retried = 0;
    for child in &results.children {
        let view = client.task(&child.task_id).await?;
        attempts += view.attempt;
        retried += usize::from(view.attempt > 1);
        if child.state != TaskState::Completed as i32 {
            bail!("subtask {} ended {}", child.plan_key, state_name(child.state));
        }
    }
    let workflows_for_key = usize::from(again.task_id == workflow && again.duplicate);
    let duplicates = (1 - workflows_for_key) + results.children.len().saturating_sub(BRANCHES as usize + 1);
    let aggregate: serde_json::Value =
        serde_json::from_str(&results.result).context("the workflow's result is JSON")?;
    let combined = aggregate["aggregate"]["combined"].as_object().map_or(0, |c| c.len());
    println!("{} == restarting node {victim} from its RocksDB data", elapsed());
    cluster.start_node(victim)?;
    let hash = cluster.wait_for_same_state(&all, STEP_TIMEOUT).await?;

    println!();
    println!("== Summary");
    println!("   workflow:        COMPLETED in {:.1} s ({workflow})", started.elapsed().as_secs_f64());
    println!("   failover:        {} ms from kill -9 of node {victim} to a new leader", failover_ms.unwrap_or(0));
    println!(
        "   tasks run:       {} ({} parallel branches and 1 aggregate step, planned by 1 coordinator), {attempts} attempts, {retried} moved off the killed node",
        results.children.len() + 1,
        BRANCHES
    );
    println!("   aggregate:       combined the results of {combined} branches");
    println!("   duplicates:      {duplicates} (the resubmitted workflow returned the original; one task per step)");
    println!("   replicas:        all {} nodes applied the same state (hash {})", all.len(), &hash[..16]);
    if duplicates > 0 || combined != BRANCHES as usize {
        bail!("the workflow ran with {duplicates} duplicates and combined {combined} of {BRANCHES} branches");
    }
    if keep {
        println!(
            "== The cluster keeps running (--keep): dashboard http://{dashboard}, API {}",
            client.endpoints().join(",")
        );
        println!("   press Ctrl-C to stop it");
        tokio::signal::ctrl_c().await.context("waiting for Ctrl-C")?;
        cluster.stop();
        println!("== Cluster stopped.");
        return Ok(());
    }
    cluster.stop();
    println!("== Demo finished; cluster stopped and its data removed.");
    Ok(())
}
