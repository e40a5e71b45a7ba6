//! `maos status`, `maos health` and `maos cluster …`: each node's view, health probes, and
//! membership changes (which go to the first endpoint and wait for the cluster's answer).

use std::time::Duration;

use anyhow::Context;
use maos_client::proto::v1::cluster_service_client::ClusterServiceClient;
use maos_client::proto::v1::{AddNodeRequest, RemoveNodeRequest, TransferLeaderRequest};
use maos_client::{Authorization, Client};
use tonic::service::interceptor::InterceptedService;

use super::args::{ClusterCommand, Target};
use super::output::{print_members, print_table, table};
use super::progress::Progress;
use super::Unhealthy;

/// Deadline of a membership change from the CLI; the server bounds its own part tighter.
const ADMIN_CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

async fn admin_call<T>(
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(ADMIN_CALL_TIMEOUT, call).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        // Typed, so the exit code says what went wrong (3 refused, 4 not found, 5 unavailable).
        Ok(Err(status)) => Err(maos_client::ClientError::from_status(status).into()),
        Err(_) => Err(maos_client::ClientError::Unavailable {
            deadline_ms: ADMIN_CALL_TIMEOUT.as_millis() as u64,
            last: "no answer from the first endpoint".into(),
        }
        .into()),
    }
}

type RawCluster = ClusterServiceClient<InterceptedService<tonic::transport::Channel, Authorization>>;

async fn cluster_client(target: &Target) -> anyhow::Result<(Client, RawCluster)> {
    let client = super::client(target)?;
    let channel = client.channel(0).context("no endpoint")?;
    let raw = ClusterServiceClient::with_interceptor(channel, client.authorization());
    Ok((client, raw))
}

/// `maos cluster init`: ask the first endpoint to form the cluster, then wait for a leader.
async fn cluster_init(target: &Target) -> anyhow::Result<()> {
    let (client, mut cluster) = cluster_client(target).await?;
    let answer = admin_call(cluster.initialize(maos_client::proto::v1::InitializeRequest {})).await?;
    let deadline = tokio::time::Instant::now() + ADMIN_CALL_TIMEOUT;
    let progress = Progress::new(target.json);
    progress.set_message("waiting for the new cluster to elect a leader");
    let status = loop {
        match client.status_of(0, false).await {
            Ok(status) if status.leader_id.is_some() => {
                progress.finish();
                break status;
            }
            _ if tokio::time::Instant::now() >= deadline => {
                return Err(Unhealthy(format!(
                    "the cluster formed but elected no leader within {} s; check `maos status`",
                    ADMIN_CALL_TIMEOUT.as_secs()
                ))
                .into());
            }
            _ => {}
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    if target.json {
        let members: Vec<u64> = answer.members.iter().map(|m| m.id).collect();
        println!(
            "{}",
            serde_json::json!({"already_initialized": answer.already_initialized, "members": members,
                "leader_id": status.leader_id, "term": status.current_term})
        );
    } else {
        let what = if answer.already_initialized { "was already formed" } else { "formed" };
        println!(
            "cluster {} {what}: leader node {} (term {})",
            status.cluster_name,
            status.leader_id.unwrap_or(0),
            status.current_term
        );
        print_members(&answer.members, false);
    }
    Ok(())
}

/// `maos cluster …`.
pub async fn run(command: ClusterCommand) -> anyhow::Result<()> {
    match command {
        ClusterCommand::TransferLeader { to, target } => {
            let (_, mut cluster) = cluster_client(&target).await?;
            let answer = admin_call(cluster.transfer_leader(TransferLeaderRequest { node_id: to })).await?;
            if target.json {
                println!("{}", serde_json::json!({"leader_id": answer.leader_id, "term": answer.term}));
            } else {
                println!("node {} leads (term {})", answer.leader_id, answer.term);
            }
            Ok(())
        }
        ClusterCommand::Init { target } => cluster_init(&target).await,
        ClusterCommand::Members { target } => {
            let (client, _) = cluster_client(&target).await?;
            let status = client.status_of(0, false).await?;
            print_members(&status.members, target.json);
            Ok(())
        }
        ClusterCommand::AddNode { id, raft_addr, api_addr, learner_only, target } => {
            let (_, mut cluster) = cluster_client(&target).await?;
            let response =
                admin_call(cluster.add_node(AddNodeRequest { id, raft_addr, api_addr, learner_only })).await?;
            print_members(&response.members, target.json);
            Ok(())
        }
        ClusterCommand::RemoveNode { id, target } => {
            let (_, mut cluster) = cluster_client(&target).await?;
            let response = admin_call(cluster.remove_node(RemoveNodeRequest { id })).await?;
            print_members(&response.members, target.json);
            Ok(())
        }
    }
}

/// `maos status`: each endpoint's view of the cluster.
pub async fn status(target: &Target) -> anyhow::Result<()> {
    let client = super::client(target)?;
    let mut rows = Vec::new();
    for (index, endpoint) in client.endpoints().iter().enumerate() {
        match client.status_of(index, true).await {
            Ok(s) => rows.push(serde_json::json!({
                "endpoint": endpoint, "node_id": s.node_id, "role": s.role, "term": s.current_term,
                "leader_id": s.leader_id, "last_log_index": s.last_log_index,
                "last_applied_index": s.last_applied_index, "state_hash": s.state_hash,
                "cluster_id": s.cluster_id, "cluster_name": s.cluster_name,
            })),
            Err(error) => rows.push(serde_json::json!({"endpoint": endpoint, "error": error.to_string()})),
        }
    }
    if target.json {
        println!("{}", serde_json::Value::Array(rows));
    } else {
        let mut table = table(&["ENDPOINT", "NODE", "ROLE", "TERM", "LEADER", "APPLIED", "STATE HASH"], &[1, 3, 4, 5]);
        for row in rows {
            let text = |key: &str| match &row[key] {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Null => "-".into(),
                other => other.to_string(),
            };
            if let Some(error) = row.get("error") {
                let error = format!("unreachable: {}", error.as_str().unwrap_or(""));
                table.add_row(vec![text("endpoint"), "-".into(), error, "".into(), "".into(), "".into(), "".into()]);
                continue;
            }
            let hash = text("state_hash").get(..16).unwrap_or("").to_string();
            table.add_row(vec![
                text("endpoint"),
                text("node_id"),
                text("role"),
                text("term"),
                text("leader_id"),
                text("last_applied_index"),
                hash,
            ]);
        }
        print_table(&table);
    }
    Ok(())
}

/// `/health` and `/ready` of every endpoint, and with `all_components` the cluster's status; an
/// unhealthy answer is an error (exit code 5).
pub async fn health(target: &Target, all_components: bool) -> anyhow::Result<()> {
    let (endpoints, json) = (&target.endpoints, target.json);
    let (http, scheme) = super::http_of(target)?;
    let mut rows = Vec::new();
    let mut unhealthy = Vec::new();
    for endpoint in endpoints {
        let base = super::base_url(endpoint, scheme);
        let mut row = serde_json::json!({"endpoint": endpoint});
        for probe in ["health", "ready"] {
            let answer = http.get(format!("{base}/{probe}")).send().await;
            let (ok, detail) = match answer {
                Ok(response) => {
                    let ok = response.status().is_success();
                    (ok, response.text().await.unwrap_or_default().trim().to_string())
                }
                Err(error) if base.starts_with("http://") => (
                    false,
                    format!("unreachable: {error} (if the nodes serve TLS, pass --ca-file or an https:// endpoint)"),
                ),
                Err(error) => (false, format!("unreachable: {error}")),
            };
            if !ok {
                unhealthy.push(format!("{endpoint} {probe}: {detail}"));
            }
            row[probe] = serde_json::json!({"ok": ok, "detail": detail});
        }
        if all_components {
            let client = super::client_of(vec![endpoint.clone()], target)?.with_deadline(Duration::from_secs(3));
            match client.status_of(0, false).await {
                Ok(status) => {
                    let tasks = status.tasks.unwrap_or_default();
                    row["raft"] = serde_json::json!({"node_id": status.node_id, "role": status.role,
                        "term": status.current_term, "leader_id": status.leader_id,
                        "applied": status.last_applied_index, "members": status.members.len()});
                    row["tasks"] = serde_json::json!({"queued": tasks.queued, "running": tasks.running,
                        "pending": tasks.pending, "queue_limit": tasks.queue_limit});
                }
                Err(error) => row["raft"] = serde_json::json!({"error": error.to_string()}),
            }
            // The task-data store, from the node's metrics (readiness above says whether it answers).
            match http.get(format!("{base}/metrics")).send().await {
                Ok(response) => {
                    let text = response.text().await.unwrap_or_default();
                    let backend = text
                        .lines()
                        .find_map(|l| {
                            l.strip_prefix("maos_storage_backend{backend=\"")?
                                .split_once('"')
                                .map(|(b, _)| b.to_string())
                        })
                        .unwrap_or_else(|| "unknown".into());
                    let signed = |name: &str| -> Option<f64> {
                        text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse::<f64>().ok())
                    };
                    let sample = |name: &str| -> u64 { signed(name).unwrap_or(0.0) as u64 };
                    row["storage"] = serde_json::json!({"backend": backend,
                        "reachable": !row["ready"]["detail"].as_str().unwrap_or("").contains("task-data store"),
                        "database_connection_errors": sample("maos_database_connection_errors_total"),
                        "redis_errors": sample("maos_redis_errors_total"),
                        "cache_hits": sample("maos_cache_hits_total"), "cache_misses": sample("maos_cache_misses_total")});
                    // The node's clock against a quorum's (signed: positive is ahead).
                    row["clock"] = serde_json::json!({"skew_ms": signed("maos_clock_skew_seconds").map(|v| (v * 1_000.0).round() as i64),
                        "synchronized": signed("maos_clock_synchronized").map(|v| v == 1.0)});
                }
                Err(error) => row["storage"] = serde_json::json!({"error": error.to_string()}),
            }
            match client.agents(0).await {
                Ok(agents) => row["agents"] = serde_json::json!({"total": agents.total, "busy": agents.active}),
                Err(error) => row["agents"] = serde_json::json!({"error": error.to_string()}),
            }
        }
        rows.push(row);
    }
    if json {
        println!("{}", serde_json::Value::Array(rows));
    } else {
        for row in &rows {
            let mark = |probe: &str| if row[probe]["ok"].as_bool() == Some(true) { "ok" } else { "FAIL" };
            println!(
                "{:<22} health {:<4} ready {:<4} {}",
                row["endpoint"].as_str().unwrap_or(""),
                mark("health"),
                mark("ready"),
                row["ready"]["detail"].as_str().unwrap_or("")
            );
            if all_components {
                println!("   raft:    {}", row["raft"]);
                println!("   storage: {}", row["storage"]);
                println!("   tasks:   {}", row["tasks"]);
                println!("   agents:  {}", row["agents"]);
                println!("   clock:   {}", row["clock"]);
            }
        }
    }
    if !unhealthy.is_empty() {
        return Err(Unhealthy(format!("unhealthy: {}", unhealthy.join("; "))).into());
    }
    Ok(())
}
