//! Shared by the task tests (included with `#[path]`; not a test target itself). Each test uses
//! a different part of it.
#![allow(dead_code)]

use std::time::Duration;

use maos_client::proto::v1::task_service_client::TaskServiceClient;
use maos_client::proto::v1::{GetTaskRequest, SubmitTaskRequest, TaskState, TaskView};
use maos_testkit::local_cluster::{LocalCluster, LocalClusterOptions};
use tonic::transport::Channel;

pub const STEP: Duration = Duration::from_secs(60);

/// Short leases so failures show within seconds; one agent type, two slots per node.
pub fn options() -> LocalClusterOptions {
    let env = [
        ("MAOS_SCHEDULER_LEASE_MS", "3000"),
        ("MAOS_SCHEDULER_LEASE_RENEW_INTERVAL_MS", "500"),
        ("MAOS_AGENTS_TYPES", "{coder: {slots: 2}}"),
    ];
    LocalClusterOptions { env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(), ..Default::default() }
}

pub fn tasks_client(cluster: &LocalCluster, id: u64) -> anyhow::Result<TaskServiceClient<Channel>> {
    let channel = cluster.client_of(id)?.channel(0).ok_or_else(|| anyhow::anyhow!("no channel"))?;
    Ok(TaskServiceClient::new(channel))
}

pub async fn submit_sleepers(
    client: &mut TaskServiceClient<Channel>,
    count: usize,
    sleep_ms: u64,
) -> anyhow::Result<Vec<String>> {
    let mut ids = Vec::new();
    for i in 0..count {
        let request = SubmitTaskRequest {
            task_type: "coder".into(),
            description: format!("sleeper {i}"),
            input: format!("sleep:{sleep_ms}"),
            max_retries: 3,
            idempotency_key: format!("sleeper-{i}"),
            ..Default::default()
        };
        ids.push(client.submit(request).await?.into_inner().task_id);
    }
    Ok(ids)
}

pub async fn get(client: &mut TaskServiceClient<Channel>, task_id: &str) -> anyhow::Result<TaskView> {
    Ok(client.get(GetTaskRequest { task_id: task_id.into(), stale: false }).await?.into_inner())
}

/// Wait until every task in `ids` is in `state`; returns their views.
pub async fn wait_all(
    client: &mut TaskServiceClient<Channel>,
    ids: &[String],
    state: TaskState,
) -> anyhow::Result<Vec<TaskView>> {
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let mut views = Vec::new();
        for id in ids {
            views.push(get(client, id).await?);
        }
        if views.iter().all(|v| v.state == state as i32) {
            return Ok(views);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "tasks did not all reach {state:?}: {:?}",
            views.iter().map(|v| (v.task_id.as_str(), v.state, v.attempt, v.cause.as_str())).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The `output` of a builtin agent's JSON result.
pub fn output_of(result: &str) -> String {
    serde_json::from_str::<serde_json::Value>(result)
        .ok()
        .and_then(|v| v["output"].as_str().map(String::from))
        .unwrap_or_else(|| format!("<not a builtin result: {result}>"))
}

/// A command agent (Python) that saves a checkpoint and kills itself on its first attempt, and
/// on the next answers with where it resumed from.
pub const CRASHER_PY: &str = r#"import json, os, sys, time
envelope = json.load(sys.stdin)
checkpoint = envelope.get("checkpoint")
if checkpoint is None:
    sys.stderr.write('@maos {"checkpoint": "phase-1 done"}\n')
    sys.stderr.flush()
    time.sleep(0.2)
    os.kill(os.getpid(), 9)
print(json.dumps({"result": "resumed from %s (saved by attempt %d) on attempt %d"
    % (checkpoint["data"], checkpoint["attempt"], envelope["attempt"])}))
"#;
