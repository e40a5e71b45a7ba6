//! Traces over OTLP on a 3-node cluster of real processes, exported to a collector in this test
//! (the OTLP/gRPC trace service on loopback): a task submitted to a follower with a W3C
//! `traceparent` is one trace from the caller's span through the request and the submit, to
//! which the proposal on the leader, the assignment and the attempt (with its report) attach,
//! across nodes; and the command agent gets its attempt's span as `TRACEPARENT`.

#[path = "support/tasks.rs"]
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use common::{get, tasks_client, STEP};
use maos_client::proto::v1::{SubmitTaskRequest, TaskState};
use maos_testkit::local_cluster::{LocalCluster, LocalClusterOptions};
use maos_testkit::otlp::{Collector, Seen};

/// A command agent that answers with the `TRACEPARENT` it was started with.
const ECHO_PY: &str = r#"import json, os, sys
json.load(sys.stdin)
print(json.dumps({"result": os.environ.get("TRACEPARENT", "")}))
"#;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_submitted_to_a_follower_is_one_trace_across_nodes_into_its_agent() -> anyhow::Result<()> {
    let collector = Collector::keeping();
    let endpoint = collector.start().await?;
    let root = tempfile::tempdir()?;
    let script = root.path().join("echo.py");
    std::fs::write(&script, ECHO_PY)?;
    let types = format!("{{echo: {{backend: command, slots: 1, command: [/usr/bin/python3, {}]}}}}", script.display());
    let env = [
        ("MAOS_AGENTS_TYPES", types.as_str()),
        ("MAOS_TRACING_ENABLED", "true"),
        ("MAOS_TRACING_OTLP_ENDPOINT", endpoint.as_str()),
        // Unsampled roots: only the caller's sampled trace is exported.
        ("MAOS_TRACING_SAMPLE_RATIO", "0.0"),
    ];
    let options = LocalClusterOptions {
        env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ..Default::default()
    };
    let mut cluster = LocalCluster::new(Path::new(env!("CARGO_BIN_EXE_maos")), root.path(), options)?;
    cluster.start_all()?;
    let (leader, _) = cluster.wait_for_leader(&[1, 2, 3], STEP).await?;
    cluster.wait_ready(&[1, 2, 3], STEP).await?;
    let follower = (1..=3).find(|id| *id != leader).unwrap_or(1);
    let mut client = tasks_client(&cluster, follower)?;

    let mut request = tonic::Request::new(SubmitTaskRequest {
        task_type: "echo".into(),
        description: "say where you are in the trace".into(),
        ..Default::default()
    });
    request.metadata_mut().insert("traceparent", format!("00-{TRACE_ID}-{CALLER_SPAN}-01").parse()?);
    let task_id = client.submit(request).await?.into_inner().task_id;

    let deadline = tokio::time::Instant::now() + STEP;
    let view = loop {
        let view = get(&mut client, &task_id).await?;
        if view.state == TaskState::Completed as i32 {
            break view;
        }
        if view.state == TaskState::Failed as i32 || tokio::time::Instant::now() > deadline {
            anyhow::bail!("task did not complete: {view:?}\n{}", cluster.log_tail(follower, 30));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let agent_parent: Vec<&str> = view.result.split('-').collect();
    assert_eq!(agent_parent.len(), 4, "the agent got a W3C traceparent: {:?}", view.result);
    assert_eq!(agent_parent[1], TRACE_ID, "the agent's TRACEPARENT is in the caller's trace");
    assert_eq!(agent_parent[3], "01", "sampled");

    // Spans are sent every 500 ms; wait for the whole chain.
    // The request span is named for its RPC (`otel.name`), as collectors expect.
    let wanted = ["maos.v1.TaskService/Submit", "submit", "propose", "assign", "attempt", "complete"];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let spans = loop {
        let spans = collector.of_trace(TRACE_ID);
        let names: BTreeSet<&str> = spans.iter().map(|s| s.name.as_str()).collect();
        if wanted.iter().all(|w| names.contains(w)) {
            break spans;
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("the trace lacks spans: {names:?} (want {wanted:?}); all: {spans:#?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let by_id: BTreeMap<&str, &Seen> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let named = |name: &str| spans.iter().find(|s| s.name == name).expect("present");
    let (request_span, submit, propose) = (named("maos.v1.TaskService/Submit"), named("submit"), named("propose"));
    let (assign, attempt, complete) = (named("assign"), named("attempt"), named("complete"));

    assert_eq!(request_span.parent_span_id, CALLER_SPAN, "the request continues the caller's span");
    assert_eq!(request_span.instance, follower.to_string(), "the follower took the request");
    assert_eq!(submit.parent_span_id, request_span.span_id);
    assert_eq!(propose.instance, leader.to_string(), "the leader proposed it");
    assert_eq!(propose.parent_span_id, submit.span_id, "the proposal continues the submit, on another node");
    assert_eq!(assign.instance, leader.to_string(), "the leader's scheduler assigned it");
    assert_eq!(assign.parent_span_id, submit.span_id, "the assignment joins the task's trace");
    assert_eq!(attempt.parent_span_id, submit.span_id, "the attempt, on whichever node, joins the task's trace");
    assert_eq!(complete.parent_span_id, attempt.span_id);
    assert_eq!(agent_parent[2], attempt.span_id, "the agent's parent is its attempt");
    for span in &spans {
        let parent = span.parent_span_id.as_str();
        assert!(parent == CALLER_SPAN || by_id.contains_key(parent), "{span:?}'s parent is in the trace");
    }
    let instances: BTreeSet<&str> = spans.iter().map(|s| s.instance.as_str()).collect();
    assert!(instances.len() >= 2, "one trace across nodes: {instances:?}");

    // Nothing else was sampled: with ratio 0, a root without a caller's trace exports nothing.
    let others = collector.kept();
    let stray: Vec<&Seen> = others.iter().filter(|s| s.trace_id != TRACE_ID).collect();
    assert!(stray.is_empty(), "unsampled spans were exported: {stray:?}");
    Ok(())
}
