//! `maos-bench scheduling`: assignments committed per second with a deep queue, and the memory a
//! queued task costs.
//!
//! 1. Start a 3-node cluster whose nodes have no slots, submit `tasks` tasks (64 concurrent
//!    submitters), and read each node's resident memory before and after: the growth per task
//!    bounds what a queued task costs the state machine (it also counts the Raft log's share).
//! 2. Restart every node with `slots` builtin slots in all for the tasks' type. The leader then
//!    assigns from the full queue; workers finish each task at once, so the measured rate is
//!    assign + complete per task, from the first assignment to the last completion.

use std::path::Path;
use std::time::{Duration, Instant};

use maos_client::proto::v1::task_service_client::TaskServiceClient;
use maos_client::proto::v1::SubmitTaskRequest;
use maos_testkit::local_cluster::{LocalCluster, LocalClusterOptions};

/// Upper bound on the whole benchmark.
const RUN_LIMIT: Duration = Duration::from_secs(900);

fn resident_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS for {pid}"))?;
    Ok(kib * 1024)
}

pub async fn run(maos: &Path, tasks: usize, slots: usize) -> anyhow::Result<()> {
    let started = Instant::now();
    let root = tempfile::Builder::new().prefix("maos-bench-sched-").tempdir()?;
    let env = |slots_per_node: usize| {
        vec![
            ("MAOS_AGENTS_TYPES".to_string(), format!("{{bench: {{slots: {slots_per_node}}}}}")),
            ("MAOS_SYSTEM_MAX_AGENTS".to_string(), slots_per_node.max(1).to_string()),
            // The queue fills before any agent serves the type.
            ("MAOS_SCHEDULER_ACCEPT_UNSERVED_TYPES".to_string(), "true".to_string()),
            ("MAOS_SYSTEM_TASK_QUEUE_SIZE".to_string(), (tasks + 1_000).to_string()),
        ]
    };
    let options = LocalClusterOptions { log_level: "WARN".into(), env: env(0), ..Default::default() };
    let mut cluster = LocalCluster::new(maos, root.path(), options)?;
    cluster.start_all()?;
    let all: Vec<u64> = cluster.nodes.keys().copied().collect();
    let (leader, _) = cluster.wait_for_leader(&all, Duration::from_secs(30)).await?;
    // Let slot registration (none) and the task limits settle.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before: Vec<u64> =
        all.iter().map(|id| cluster.pid(*id).map(resident_bytes).unwrap_or(Ok(0))).collect::<Result<_, _>>()?;

    let submit_started = Instant::now();
    let endpoint = cluster.nodes[&leader].api_addr.clone();
    let submitters = 64;
    let mut handles = Vec::new();
    for worker in 0..submitters {
        let channel = maos_client::endpoint(&endpoint)?.connect_lazy();
        handles.push(tokio::spawn(async move {
            let mut client = TaskServiceClient::new(channel);
            let mut i = worker;
            while i < tasks {
                let request = SubmitTaskRequest {
                    task_type: "bench".into(),
                    description: format!("bench task {i}"),
                    submitter: format!("submitter-{}", worker % 8),
                    idempotency_key: format!("bench-{i}"),
                    ..Default::default()
                };
                client.submit(request).await.map_err(|status| anyhow::anyhow!("submit {i}: {status}"))?;
                i += submitters;
            }
            anyhow::Ok(())
        }));
    }
    for handle in handles {
        handle.await??;
    }
    let submit_elapsed = submit_started.elapsed();
    let status = cluster.status(leader).await?;
    let queued = status.tasks.map(|t| t.queued).unwrap_or(0);
    anyhow::ensure!(queued as usize == tasks, "expected {tasks} queued tasks, the leader reports {queued}");
    let after: Vec<u64> =
        all.iter().map(|id| cluster.pid(*id).map(resident_bytes).unwrap_or(Ok(0))).collect::<Result<_, _>>()?;
    println!(
        "submitted {tasks} tasks in {:.1} s ({:.0} submits/s, 64 concurrent submitters)",
        submit_elapsed.as_secs_f64(),
        tasks as f64 / submit_elapsed.as_secs_f64()
    );
    println!();
    println!("| node | RSS before MiB | RSS with {tasks} queued MiB | growth per queued task (bytes) |");
    println!("|---:|---:|---:|---:|");
    for (i, id) in all.iter().enumerate() {
        let growth = after[i].saturating_sub(before[i]);
        println!(
            "| {id} | {:.1} | {:.1} | {:.0} |",
            before[i] as f64 / 1_048_576.0,
            after[i] as f64 / 1_048_576.0,
            growth as f64 / tasks as f64
        );
    }

    // Phase 2: the same cluster with slots.
    let per_node = slots.div_ceil(all.len());
    cluster.stop();
    cluster.options_mut().env = env(per_node);
    cluster.start_all()?;
    let (leader, _) = cluster.wait_for_leader(&all, Duration::from_secs(60)).await?;
    let mut first_assignment: Option<Instant> = None;
    let mut last = String::new();
    loop {
        anyhow::ensure!(started.elapsed() < RUN_LIMIT, "the benchmark ran over {RUN_LIMIT:?}: {last}");
        let status = cluster.status(leader).await?;
        let counts = status.tasks.unwrap_or_default();
        if first_assignment.is_none() && (counts.running > 0 || counts.completed > 0) {
            first_assignment = Some(Instant::now());
        }
        last = format!("{counts:?}");
        if counts.completed as usize >= tasks {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let elapsed = first_assignment.map(|t| t.elapsed()).unwrap_or_default();
    println!();
    println!(
        "{tasks} queued tasks, {} slots ({per_node} per node): all assigned and completed in {:.2} s from the first assignment: {:.0} assignments/s",
        per_node * all.len(),
        elapsed.as_secs_f64(),
        tasks as f64 / elapsed.as_secs_f64()
    );
    cluster.stop();
    Ok(())
}
