//! The agent runtime on 3-node clusters of real processes: a crashed command agent's task is
//! retried and resumes from its checkpoint; a claude agent's answer and token usage land on the
//! task (against a local Messages API); a planned task fans out to parallel agents on different
//! nodes and completes with their results aggregated.

#[path = "support/tasks.rs"]
mod common;
#[path = "support/fake_messages.rs"]
mod fake_messages;

use std::path::Path;
use std::time::Duration;

use common::{get, tasks_client, STEP};
use fake_messages::{FakeMessages, Reply};
use maos_client::proto::v1::task_service_client::TaskServiceClient;
use maos_client::proto::v1::{SubmitTaskRequest, TaskState, TaskView};
use maos_testkit::local_cluster::{LocalCluster, LocalClusterOptions};
use tonic::transport::Channel;

fn options(types: &str, extra: &[(&str, &str)]) -> LocalClusterOptions {
    let mut env = vec![
        ("MAOS_SCHEDULER_LEASE_MS".to_string(), "3000".to_string()),
        ("MAOS_SCHEDULER_LEASE_RENEW_INTERVAL_MS".to_string(), "500".to_string()),
        ("MAOS_AGENTS_TYPES".to_string(), types.to_string()),
    ];
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    LocalClusterOptions { env, ..Default::default() }
}

async fn started(
    root: &Path,
    options: LocalClusterOptions,
) -> anyhow::Result<(LocalCluster, TaskServiceClient<Channel>)> {
    let mut cluster = LocalCluster::new(Path::new(env!("CARGO_BIN_EXE_maos")), root, options)?;
    cluster.start_all()?;
    let (leader, _) = cluster.wait_for_leader(&[1, 2, 3], STEP).await?;
    cluster.wait_ready(&[1, 2, 3], STEP).await?;
    let client = tasks_client(&cluster, leader)?;
    Ok((cluster, client))
}

/// Wait until `task_id` is terminal; it must be COMPLETED.
async fn completed(
    cluster: &LocalCluster,
    client: &mut TaskServiceClient<Channel>,
    task_id: &str,
) -> anyhow::Result<TaskView> {
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let view = get(client, task_id).await?;
        if view.state == TaskState::Completed as i32 {
            return Ok(view);
        }
        let terminal = [TaskState::Failed as i32, TaskState::Cancelled as i32].contains(&view.state);
        if terminal || tokio::time::Instant::now() > deadline {
            let logs: Vec<String> = (1..=3).map(|id| cluster.log_tail(id, 15)).collect();
            anyhow::bail!("task {task_id} did not complete: {view:?}\nlogs:\n{}", logs.join("\n---\n"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn submit(client: &mut TaskServiceClient<Channel>, request: SubmitTaskRequest) -> anyhow::Result<String> {
    Ok(client.submit(request).await?.into_inner().task_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_agent_is_retried_and_resumes_from_its_last_checkpoint() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let script = root.path().join("crasher.py");
    std::fs::write(&script, common::CRASHER_PY)?;
    let types =
        format!("{{crasher: {{backend: command, slots: 1, command: [/usr/bin/python3, {}]}}}}", script.display());
    let (cluster, mut client) = started(root.path(), options(&types, &[])).await?;
    let request = SubmitTaskRequest {
        task_type: "crasher".into(),
        description: "crash once".into(),
        max_retries: 2,
        ..Default::default()
    };
    let task_id = submit(&mut client, request).await?;
    let view = completed(&cluster, &mut client, &task_id).await?;
    assert_eq!(view.result, "resumed from phase-1 done (saved by attempt 1) on attempt 2");
    assert_eq!((view.attempt, view.checkpoint_attempt), (2, 1));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claude_agent_answers_and_its_token_usage_is_recorded_without_logging_the_key() -> anyhow::Result<()> {
    const KEY: &str = "sk-ant-cluster-test-key-77f1c0de";
    let server = FakeMessages::start(vec![Reply::rate_limited(1), Reply::message("Three findings.", 321, 45)]).await?;
    let root = tempfile::tempdir()?;
    let extra = [("CLAUDE_API_KEY", KEY), ("MAOS_AGENTS_CLAUDE_BASE_URL", server.base_url.as_str())];
    let mut options = options("{researcher: {backend: claude, slots: 1}}", &extra);
    options.log_level = "DEBUG".into();
    let (cluster, mut client) = started(root.path(), options).await?;
    let request = SubmitTaskRequest {
        task_type: "researcher".into(),
        description: "find three things".into(),
        ..Default::default()
    };
    let task_id = submit(&mut client, request).await?;
    let view = completed(&cluster, &mut client, &task_id).await?;
    assert_eq!(view.result, "Three findings.");
    assert_eq!((view.input_tokens, view.output_tokens), (321, 45));
    assert_eq!(server.seen().len(), 2, "the 429 was retried once");
    for id in 1..=3 {
        let log = cluster.log_tail(id, 100_000);
        assert!(!log.is_empty(), "node {id} logged nothing");
        assert!(!log.contains(KEY), "node {id} logged the key");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planned_task_fans_out_to_parallel_agents_on_different_nodes_and_aggregates() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let types = "{coordinator: {slots: 1}, researcher: {slots: 1}, analyst: {slots: 1}}";
    let (cluster, mut client) = started(root.path(), options(types, &[])).await?;
    let request = SubmitTaskRequest {
        task_type: "mixed".into(),
        description: "research three topics and combine them".into(),
        input:
            r#"{"branches": 3, "branch_type": "researcher", "branch_input": "sleep:1500", "aggregate_type": "analyst"}"#
                .into(),
        ..Default::default()
    };
    let parent_id = submit(&mut client, request).await?;
    let parent = completed(&cluster, &mut client, &parent_id).await?;
    assert!(parent.planning && parent.expanded, "{parent:?}");
    assert_eq!(parent.children.len(), 4, "three branches and the aggregate: {:?}", parent.children);

    let result: serde_json::Value = serde_json::from_str(&parent.result)?;
    let branches: Vec<&serde_json::Value> = (1..=3).map(|i| &result[format!("branch-{i}")]).collect();
    let nodes: std::collections::BTreeSet<String> = branches
        .iter()
        .filter_map(|b| b["agent"].as_str())
        .filter_map(|agent| agent.split('/').next().map(String::from))
        .collect();
    assert!(nodes.len() >= 2, "the branches ran on {nodes:?}; want at least two nodes");
    let starts: Vec<u64> = branches.iter().filter_map(|b| b["started_at_us"].as_u64()).collect();
    assert_eq!(starts.len(), 3, "{result}");
    let spread_ms = (starts.iter().max().unwrap_or(&0) - starts.iter().min().unwrap_or(&0)) / 1_000;
    assert!(spread_ms < 1_500, "the branches started {spread_ms} ms apart, so they did not all run at once");
    let combined = result["aggregate"]["combined"].as_object().map(|c| c.len());
    assert_eq!(combined, Some(3), "the aggregate step saw every branch: {result}");
    for child in &parent.children {
        assert_eq!(get(&mut client, child).await?.parent, parent_id);
    }
    Ok(())
}
