//! Logs as operators collect them: with `system.log_format: json` every line a node writes is one
//! JSON object carrying its span's identity (`node_id`, and `task_id`, `agent_id` in an attempt),
//! and a peer that is down is one rate-limited WARN per interval, not a line per failed call.

#[path = "support/tasks.rs"]
mod common;

use std::path::Path;
use std::time::Duration;

use common::{submit_sleepers, tasks_client, wait_all, STEP};
use maos_client::proto::v1::TaskState;
use maos_testkit::local_cluster::LocalCluster;

fn json_cluster(root: &Path) -> anyhow::Result<LocalCluster> {
    let mut options = common::options();
    options.env.push(("MAOS_SYSTEM_LOG_FORMAT".into(), "json".into()));
    LocalCluster::new(Path::new(env!("CARGO_BIN_EXE_maos")), root, options)
}

fn lines(cluster: &LocalCluster, id: u64) -> Vec<String> {
    let text = std::fs::read_to_string(&cluster.nodes[&id].log_path).unwrap_or_default();
    text.lines().map(str::to_string).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_parse_line_by_line_and_a_dead_peer_is_one_warning_per_interval() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let mut cluster = json_cluster(root.path())?;
    cluster.start_all()?;
    let (leader, _) = cluster.wait_for_leader(&[1, 2, 3], STEP).await?;
    cluster.wait_ready(&[1, 2, 3], STEP).await?;
    let mut client = tasks_client(&cluster, leader)?;
    let ids = submit_sleepers(&mut client, 6, 50).await?;
    wait_all(&mut client, &ids, TaskState::Completed).await?;

    // Kill the leader; the survivors elect another and keep trying the dead one.
    let survivors: Vec<u64> = [1, 2, 3].into_iter().filter(|id| *id != leader).collect();
    let before: Vec<usize> = survivors.iter().map(|id| lines(&cluster, *id).len()).collect();
    let dead_raft_addr = cluster.nodes[&leader].raft_addr.clone();
    cluster.kill(leader)?;
    cluster.wait_for_leader(&survivors, STEP).await?;
    tokio::time::sleep(Duration::from_secs(6)).await;

    let mut attempt_spans = 0;
    for id in [1, 2, 3] {
        for line in lines(&cluster, id) {
            let value: serde_json::Value = serde_json::from_str(&line)
                .map_err(|e| anyhow::anyhow!("node {id} wrote a line that is not JSON ({e}): {line}"))?;
            anyhow::ensure!(value["level"].is_string() && value["timestamp"].is_string(), "node {id}: {line}");
            let spans = value["spans"].as_array().cloned().unwrap_or_default();
            if let Some(span) = spans.first() {
                anyhow::ensure!(span["node_id"].as_u64() == Some(id), "node {id}: the node span lacks node_id: {line}");
            }
            if spans.iter().any(|s| s["name"] == "attempt" && s["task_id"].is_string() && s["agent_id"].is_string()) {
                attempt_spans += 1;
            }
        }
    }
    anyhow::ensure!(attempt_spans > 0, "no line was written inside an attempt's span");

    for (survivor, start) in survivors.iter().zip(before) {
        let after = &lines(&cluster, *survivor)[start..];
        let about_dead: Vec<&String> = after
            .iter()
            .filter(|l| {
                l.contains("connection refused")
                    || l.contains(&dead_raft_addr)
                    || l.contains(&format!("\"peer\":{leader}"))
            })
            .collect();
        let errors: Vec<&String> = after.iter().filter(|l| l.contains("\"level\":\"ERROR\"")).collect();
        // openraft's replication to the dead peer warns at every retry (each heartbeat) without
        // naming the peer; only a few warnings (the election's) belong in these 6 s.
        let warnings: Vec<&String> = after.iter().filter(|l| l.contains("\"level\":\"WARN\"")).collect();
        anyhow::ensure!(
            warnings.len() <= 10,
            "node {survivor} wrote {} WARN lines in ~6 s after a peer died:\n{}",
            warnings.len(),
            warnings.iter().take(20).map(|s| s.as_str()).collect::<Vec<_>>().join("\n")
        );
        anyhow::ensure!(
            about_dead.len() <= 4,
            "node {survivor} wrote {} lines about the dead node in ~6 s:\n{}",
            about_dead.len(),
            about_dead.iter().take(20).map(|s| s.as_str()).collect::<Vec<_>>().join("\n")
        );
        anyhow::ensure!(
            errors.is_empty(),
            "node {survivor} logged ERROR lines after a peer died:\n{}",
            errors.iter().take(20).map(|s| s.as_str()).collect::<Vec<_>>().join("\n")
        );
        anyhow::ensure!(!about_dead.is_empty(), "node {survivor} never said the dead peer was unreachable");
    }
    Ok(())
}
