//! `/health`, `/ready` and `/metrics` on the API port, next to gRPC: liveness before the cluster
//! forms, readiness only with a leader, and the metrics operators scrape (Raft, tasks, agents).

#[path = "support/tasks.rs"]
mod common;

use std::path::Path;
use std::time::Duration;

use common::{tasks_client, wait_all, STEP};
use maos_client::proto::v1::{SubmitTaskRequest, TaskState};
use maos_testkit::local_cluster::{LocalCluster, LocalClusterOptions};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::ServerReflectionRequest;

async fn grpc_health(addr: &str) -> anyhow::Result<i32> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?.connect().await?;
    let answer = HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await?;
    Ok(answer.into_inner().status)
}

async fn fetch(addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let response =
        reqwest::Client::new().get(format!("http://{addr}{path}")).timeout(Duration::from_secs(5)).send().await?;
    Ok((response.status().as_u16(), response.text().await?))
}

/// The value of the sample line `name` (with labels, if any) in a Prometheus text.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_ready_and_metrics_are_served_beside_grpc() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let mut cluster =
        LocalCluster::new(Path::new(env!("CARGO_BIN_EXE_maos")), root.path(), LocalClusterOptions::default())?;
    // Node 1 alone cannot form the cluster: alive, not ready.
    cluster.start_node(1)?;
    let first = cluster.nodes[&1].api_addr.clone();
    let deadline = tokio::time::Instant::now() + STEP;
    let health = loop {
        match fetch(&first, "/health").await {
            Ok(answer) => break answer,
            Err(error) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(%error, "not listening yet");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => return Err(error),
        }
    };
    assert_eq!(health.0, 200);
    let (status, body) = fetch(&first, "/ready").await?;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("not a member"), "{body}");
    assert_eq!(grpc_health(&first).await?, ServingStatus::NotServing as i32);

    cluster.start_node(2)?;
    cluster.start_node(3)?;
    let (leader, _) = cluster.wait_for_leader(&[1, 2, 3], STEP).await?;
    cluster.wait_ready(&[1, 2, 3], STEP).await?;
    for node in cluster.nodes.values() {
        let (status, body) = fetch(&node.api_addr, "/ready").await?;
        assert_eq!(status, 200, "{body}");
        let deadline = tokio::time::Instant::now() + STEP;
        while grpc_health(&node.api_addr).await? != ServingStatus::Serving as i32 {
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "gRPC health never SERVING on node {}", node.id);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Server reflection lists the API, so grpcurl and friends need no proto files.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{first}"))?.connect().await?;
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection.server_reflection_info(futures::stream::iter([request])).await?.into_inner();
    let answer = answers.message().await?.ok_or_else(|| anyhow::anyhow!("no reflection answer"))?;
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        anyhow::bail!("unexpected reflection answer: {answer:?}")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for service in ["maos.v1.TaskService", "maos.v1.AgentService", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|n| n == service), "{service} in {names:?}");
    }
    let mut client = tasks_client(&cluster, leader)?;
    let mut ids = Vec::new();
    for i in 0..3 {
        let request =
            SubmitTaskRequest { task_type: "coder".into(), description: format!("t{i}"), ..Default::default() };
        ids.push(client.submit(request).await?.into_inner().task_id);
    }
    wait_all(&mut client, &ids, TaskState::Completed).await?;
    let leader_addr = cluster.nodes[&leader].api_addr.clone();
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let (status, text) = fetch(&leader_addr, "/metrics").await?;
        assert_eq!(status, 200);
        let settled =
            sample(&text, "maos_tasks_completed_total") == Some(3.0) && sample(&text, "maos_agents") == Some(10.0);
        if settled {
            assert_eq!(sample(&text, "maos_raft_is_leader"), Some(1.0));
            assert!(sample(&text, "maos_raft_term").is_some_and(|t| t >= 1.0), "{text}");
            assert_eq!(sample(&text, "maos_tasks{state=\"completed\"}"), Some(3.0));
            assert!(
                sample(&text, "maos_agents_active").is_some()
                    && sample(&text, "maos_agent_spawn_failures_total") == Some(0.0)
            );
            assert!(text.contains("maos_agent_slots{type=\"coder\",state=\"idle\"}"), "{text}");
            break;
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "metrics never showed the finished tasks:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// `metrics.enabled: false`: the node records nothing and says so on `/metrics`, and works as
/// before (a task runs to completion).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_turned_off_answer_404_naming_the_key() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let options = LocalClusterOptions {
        nodes: 1,
        env: vec![("MAOS_METRICS_ENABLED".into(), "false".into())],
        ..Default::default()
    };
    let mut cluster = LocalCluster::new(Path::new(env!("CARGO_BIN_EXE_maos")), root.path(), options)?;
    cluster.start_all()?;
    let (leader, _) = cluster.wait_for_leader(&[1], STEP).await?;
    cluster.wait_ready(&[1], STEP).await?;
    let mut client = tasks_client(&cluster, leader)?;
    let request = SubmitTaskRequest { task_type: "coder".into(), description: "t".into(), ..Default::default() };
    let id = client.submit(request).await?.into_inner().task_id;
    wait_all(&mut client, &[id], TaskState::Completed).await?;
    let (status, body) = fetch(&cluster.nodes[&1].api_addr, "/metrics").await?;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("metrics.enabled: false"), "{body}");
    Ok(())
}
