//! `maos-bench agents`: how fast agents start.
//!
//! 1. Spawn latency of `command` agents: each attempt runs through the command backend (process
//!    group, rlimits, pipes, memory watchdog) exactly as a node runs it. "Start" is the time from
//!    the call until the agent's first protocol line arrives (the process is running and has
//!    read nothing yet); "round trip" runs to the reaped exit with the answer parsed. Attempts run
//!    one at a time, so the numbers are latency, not contention.
//! 2. End-to-end dispatch with `builtin` agents on a local 3-node cluster: from just before the
//!    submit call to the moment the agent starts the attempt (the `started_at_us` a builtin agent
//!    reports; one machine, one clock). Submits are paced, so the queue stays short.
//!
//! Every loop is bounded in count.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use maos_client::proto::v1::task_service_client::TaskServiceClient;
use maos_client::proto::v1::{GetTaskRequest, SubmitTaskRequest, TaskState};
use maos_node::agents::command::CommandBackend;
use maos_node::agents::envelope::{AgentEvent, ApiAccess, Envelope, OutcomeKind};
use maos_testkit::local_cluster::{LocalCluster, LocalClusterOptions};
use tokio::sync::mpsc;

fn histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("constant histogram bounds are valid")
}

fn envelope(i: usize) -> Envelope {
    Envelope {
        format: 1,
        task_id: format!("bench-{i}"),
        attempt: 1,
        agent_id: "bench/command/0".into(),
        task_type: "bench".into(),
        description: "spawn latency".into(),
        input: String::new(),
        planning: false,
        dependency_results: Default::default(),
        checkpoint: None,
        fencing_token: 1,
        timeout_ms: 60_000,
        checkpoint_interval_ms: 300_000,
        api: ApiAccess { endpoint: "http://127.0.0.1:8000".into(), ..Default::default() },
        trace_parent: String::new(),
    }
}

fn row(name: &str, h: &Histogram<u64>) {
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "| {name} | {} | {:.2} | {:.2} | {:.2} | {:.2} |",
        h.len(),
        ms(0.5),
        ms(0.99),
        ms(0.999),
        h.max() as f64 / 1000.0
    );
}

async fn spawn_latency(name: &str, program: Vec<String>, spawns: usize) -> anyhow::Result<()> {
    let backend = CommandBackend {
        program,
        env: Default::default(),
        max_memory_bytes: 512 << 20,
        timeout: Duration::from_secs(60),
        // The node's fence keeper costs one pipe write per spawn; the spawn is measured alone.
        keeper: None,
    };
    let (mut start, mut round_trip) = (histogram(), histogram());
    for i in 0..spawns {
        let (events, mut received) = mpsc::channel(4);
        let envelope = envelope(i);
        let began = Instant::now();
        // Its own task, so the line is timed when it arrives, not when the loop next looks.
        let watcher = tokio::spawn(async move {
            match received.recv().await {
                Some(AgentEvent::Progress { .. }) => Some(began.elapsed()),
                _ => None,
            }
        });
        let outcome = backend.run(&envelope, events).await;
        anyhow::ensure!(matches!(outcome.kind, OutcomeKind::Completed(_)), "agent {name} failed: {outcome:?}");
        let started = watcher.await?.ok_or_else(|| anyhow::anyhow!("agent {name} sent no progress line"))?;
        start.record(started.as_micros() as u64)?;
        round_trip.record(began.elapsed().as_micros() as u64)?;
    }
    row(&format!("command `{name}`: start"), &start);
    row(&format!("command `{name}`: round trip"), &round_trip);
    Ok(())
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

async fn dispatch_latency(maos: &Path, tasks: usize, rate_per_s: u64) -> anyhow::Result<()> {
    let root = tempfile::Builder::new().prefix("maos-bench-agents-").tempdir()?;
    let env = vec![("MAOS_AGENTS_TYPES".to_string(), "{bench: {slots: 8}}".to_string())];
    let options = LocalClusterOptions { log_level: "WARN".into(), env, ..Default::default() };
    let mut cluster = LocalCluster::new(maos, root.path(), options)?;
    cluster.start_all()?;
    let all: Vec<u64> = cluster.nodes.keys().copied().collect();
    let (leader, _) = cluster.wait_for_leader(&all, Duration::from_secs(30)).await?;
    cluster.wait_ready(&all, Duration::from_secs(30)).await?;
    let channel = cluster.client_of(leader)?.channel(0).ok_or_else(|| anyhow::anyhow!("no channel"))?;
    let mut client = TaskServiceClient::new(channel);
    // Slot registration and the first renewals settle.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pause = Duration::from_micros(1_000_000 / rate_per_s.max(1));
    let mut submitted = Vec::with_capacity(tasks);
    for i in 0..tasks {
        let at_us = now_us();
        let request =
            SubmitTaskRequest { task_type: "bench".into(), description: format!("dispatch {i}"), ..Default::default() };
        let task_id = client.submit(request).await?.into_inner().task_id;
        submitted.push((task_id, at_us));
        tokio::time::sleep(pause).await;
    }
    let mut dispatch = histogram();
    let deadline = Instant::now() + Duration::from_secs(120);
    for (task_id, at_us) in &submitted {
        let view = loop {
            let view = client.get(GetTaskRequest { task_id: task_id.clone(), stale: false }).await?.into_inner();
            if view.state == TaskState::Completed as i32 {
                break view;
            }
            anyhow::ensure!(Instant::now() < deadline, "task {task_id} did not complete: {view:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let result: serde_json::Value = serde_json::from_str(&view.result)?;
        let started_us =
            result["started_at_us"].as_u64().ok_or_else(|| anyhow::anyhow!("no start time in {}", view.result))?;
        dispatch.record(started_us.saturating_sub(*at_us).max(1))?;
    }
    row(&format!("builtin: submit to agent start ({rate_per_s}/s paced)"), &dispatch);
    cluster.stop();
    Ok(())
}

pub async fn run(maos: &Path, spawns: usize, tasks: usize, rate_per_s: u64) -> anyhow::Result<()> {
    println!("| measure | samples | p50 ms | p99 ms | p999 ms | max ms |");
    println!("|---|---:|---:|---:|---:|---:|");
    let sh = "echo '@maos {\"progress\": 1}' >&2; cat > /dev/null; echo '{\"result\": \"ok\"}'";
    spawn_latency("sh", vec!["/bin/sh".into(), "-c".into(), sh.into()], spawns).await?;
    let py = "import sys, json\nsys.stderr.write('@maos {\"progress\": 1}\\n'); sys.stderr.flush()\njson.load(sys.stdin)\nprint('{\"result\": \"ok\"}')";
    spawn_latency("python3", vec!["/usr/bin/python3".into(), "-c".into(), py.into()], spawns).await?;
    dispatch_latency(maos, tasks, rate_per_s).await
}
