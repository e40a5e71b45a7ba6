//! REST under /api/v1 on the gRPC port: the task, agent and cluster calls, JSON errors with the
//! field named and the right HTTP status for every kind of bad input, and the OpenAPI document.

#[path = "support/tasks.rs"]
mod common;

use std::path::Path;
use std::time::Duration;

use common::{options, STEP};
use maos_testkit::local_cluster::LocalCluster;
use serde_json::{json, Value};

struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<&str>) -> anyhow::Result<(u16, Value)> {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(body) = body {
            request = request.header("content-type", "application/json").body(body.to_string());
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        let text = response.text().await?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::String(text))))
    }

    async fn post(&self, path: &str, body: &Value) -> anyhow::Result<(u16, Value)> {
        self.call(reqwest::Method::POST, path, Some(&body.to_string())).await
    }

    async fn get(&self, path: &str) -> anyhow::Result<(u16, Value)> {
        self.call(reqwest::Method::GET, path, None).await
    }
}

fn assert_error(answer: &(u16, Value), status: u16, field: &str) {
    assert_eq!(answer.0, status, "{answer:?}");
    let message = answer.1["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(field), "the error names {field}: {answer:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_mirrors_the_api_and_refuses_bad_input_with_the_right_status() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let mut options = options();
    options.env.push(("MAOS_SYSTEM_TASK_QUEUE_SIZE".into(), "30".into()));
    let mut cluster = LocalCluster::new(Path::new(env!("CARGO_BIN_EXE_maos")), root.path(), options)?;
    cluster.start_all()?;
    let (leader, _) = cluster.wait_for_leader(&[1, 2, 3], STEP).await?;
    cluster.wait_ready(&[1, 2, 3], STEP).await?;
    let follower = [1, 2, 3].into_iter().find(|id| *id != leader).expect("a follower");
    let api = Api {
        http: reqwest::Client::builder().timeout(Duration::from_secs(20)).build()?,
        base: format!("http://{}", cluster.nodes[&follower].api_addr),
    };
    let deadline = tokio::time::Instant::now() + STEP;
    while api.get("/api/v1/agents").await?.1["total"].as_u64() != Some(6) {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "agents never registered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Submit, read, list, results.
    let (status, submitted) = api.post("/api/v1/tasks", &json!({"task_type": "coder", "description": "rest", "input": "hi", "priority": "high", "idempotency_key": "rest-1"})).await?;
    assert_eq!(status, 201, "{submitted}");
    let task_id = submitted["task_id"].as_str().unwrap_or_default().to_string();
    let (again, duplicate) = api
        .post("/api/v1/tasks", &json!({"task_type": "coder", "description": "rest", "idempotency_key": "rest-1"}))
        .await?;
    assert_eq!(
        (again, duplicate["task_id"].as_str(), duplicate["duplicate"].as_bool()),
        (200, Some(task_id.as_str()), Some(true))
    );
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let (status, task) = api.get(&format!("/api/v1/tasks/{task_id}")).await?;
        assert_eq!(status, 200);
        if task["state"] == "COMPLETED" {
            assert!(task["result"].as_str().unwrap_or_default().contains("echo: hi"), "{task}");
            break;
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "never completed: {task}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, page) = api.get("/api/v1/tasks?state=completed&page_size=10").await?;
    assert_eq!(status, 200);
    assert!(page["tasks"].as_array().is_some_and(|t| t.iter().any(|t| t["task_id"] == task_id.as_str())), "{page}");
    // The REST task carries what gRPC's TaskView does.
    let (_, task) = api.get(&format!("/api/v1/tasks/{task_id}")).await?;
    assert_eq!(
        (
            task["description"].as_str(),
            task["input"].as_str(),
            task["idempotency_key"].as_str(),
            task["priority"].as_str()
        ),
        (Some("rest"), Some("hi"), Some("rest-1"), Some("high")),
        "{task}"
    );
    let (status, results) = api.get(&format!("/api/v1/tasks/{task_id}/results")).await?;
    assert_eq!((status, results["state"].as_str()), (200, Some("COMPLETED")));

    // Every kind of bad input.
    let api = &api;
    let submit = |body: Value| async move { api.post("/api/v1/tasks", &body).await };
    assert_error(&submit(json!({"task_type": "coder", "description": ""})).await?, 400, "description");
    assert_error(
        &submit(json!({"task_type": "coder", "description": "x".repeat(16 * 1024 + 1)})).await?,
        400,
        "description",
    );
    // A type nothing serves is the cluster's state, not bad input: 409; a name no agent type can
    // have is bad input.
    assert_error(&submit(json!({"task_type": "poet", "description": "x"})).await?, 409, "task_type");
    assert_error(&submit(json!({"task_type": "po et", "description": "x"})).await?, 400, "task_type");
    assert_error(&submit(json!({"task_type": "x".repeat(65), "description": "x"})).await?, 400, "task_type");
    assert_error(
        &submit(json!({"task_type": "coder", "description": "x", "idempotency_key": "clé"})).await?,
        400,
        "idempotency_key",
    );
    assert_error(
        &submit(json!({"task_type": "coder", "description": "x", "timeout_ms": 1u64 << 53})).await?,
        400,
        "timeout_ms",
    );
    assert_error(
        &submit(json!({"task_type": "coder", "description": "x", "priority": "urgent"})).await?,
        400,
        "priority",
    );
    assert_error(
        &submit(json!({"task_type": "coder", "description": "x", "depends_on": ["nope"]})).await?,
        404,
        "depends_on",
    );
    assert_error(&submit(json!({"task_type": "coder", "description": "x", "parent": "nope"})).await?, 404, "parent");
    assert_error(
        &submit(json!({"task_type": "coder", "description": "x", "depends_on": [task_id, task_id]})).await?,
        400,
        "depends_on",
    );
    assert_error(&submit(json!({"task_type": "coder", "description": "x", "colour": "red"})).await?, 400, "colour");
    assert_error(&submit(json!({"description": "x"})).await?, 400, "task_type");
    assert_error(&api.call(reqwest::Method::POST, "/api/v1/tasks", Some("{not json")).await?, 400, "body");
    // On a connection of its own: the server closes a connection whose body it refused, and the
    // pooled client would otherwise send the next request on it.
    let oversized = format!("{{\"task_type\": \"coder\", \"description\": \"{}\"}}", "x".repeat(2 << 20));
    let status = api
        .http
        .post(format!("{}/api/v1/tasks", api.base))
        .header("content-type", "application/json")
        .header("connection", "close")
        .body(oversized)
        .send()
        .await?
        .status();
    assert_eq!(status, 413);
    assert_error(&api.get("/api/v1/tasks/no-such-task").await?, 404, "no-such-task");
    assert_error(&api.post("/api/v1/tasks/no-such-task/cancel", &json!({})).await?, 404, "no-such-task");
    let path = format!("/api/v1/tasks/{task_id}/cancel");
    assert_error(&api.call(reqwest::Method::POST, &path, Some("{not json")).await?, 400, "body");
    assert_error(&api.post("/api/v1/tasks/no-such-task/retry", &json!({})).await?, 404, "no-such-task");
    assert_error(&api.post(&format!("/api/v1/tasks/{task_id}/retry"), &json!({})).await?, 409, task_id.as_str());
    assert_error(&api.get("/api/v1/tasks?state=sleeping").await?, 400, "state");
    assert_error(&api.get("/api/v1/tasks?page_size=5000").await?, 400, "page_size");
    // 0 is gRPC's "the default"; REST has absence for that, and the document says 1..=1000.
    assert_error(&api.get("/api/v1/tasks?page_size=0").await?, 400, "page_size");
    assert_error(&api.get("/api/v1/tasks?state=completed,,queued").await?, 400, "state");
    assert_eq!(api.get("/api/v1/nothing-here").await?.0, 404);

    // The queue bound answers 429.
    let mut last = (0, Value::Null);
    for i in 0..40 {
        last =
            submit(json!({"task_type": "coder", "description": format!("fill {i}"), "input": "sleep:20000"})).await?;
        if last.0 != 201 {
            break;
        }
    }
    assert_error(&last, 429, "queue is full");

    // Agents and the cluster.
    let (status, agent) = api.post("/api/v1/agents/n1/coder/0/pause", &json!({})).await?;
    assert_eq!((status, agent["state"].as_str()), (200, Some("DRAINING")), "{agent}");
    assert_error(&api.post("/api/v1/agents/n1/coder/0/dance", &json!({})).await?, 400, "dance");
    assert_error(&api.post("/api/v1/agents/n9/coder/0/pause", &json!({})).await?, 404, "n9/coder/0");
    assert_error(&api.post("/api/v1/agents", &json!({"agent_type": "poet"})).await?, 409, "agent_type");
    let (status, cluster_view) = api.get("/api/v1/cluster").await?;
    assert_eq!((status, cluster_view["members"].as_array().map(Vec::len)), (200, Some(3)));
    assert_error(&api.post("/api/v1/cluster/leader", &json!({"node_id": 9})).await?, 404, "node_id");

    // Server-sent events of a task, to its end.
    let (_, sse_task) = api.post("/api/v1/agents/n1/coder/0/resume", &json!({})).await?;
    assert_eq!(sse_task["state"].as_str().map(|s| s != "TERMINATED"), Some(true));
    let cancel_all = api.get("/api/v1/tasks?state=queued,running&page_size=100").await?.1;
    for task in cancel_all["tasks"].as_array().cloned().unwrap_or_default() {
        let id = task["task_id"].as_str().unwrap_or_default();
        api.post(&format!("/api/v1/tasks/{id}/cancel"), &json!({"reason": "make room"})).await?;
    }
    let (status, quick) = submit(json!({"task_type": "coder", "description": "sse", "input": "sleep:300"})).await?;
    assert_eq!(status, 201, "{quick}");
    let quick_id = quick["task_id"].as_str().unwrap_or_default().to_string();
    let body = api.http.get(format!("{}/api/v1/tasks/{quick_id}/events", api.base)).send().await?.text().await?;
    assert!(body.contains("event: task") && body.contains("\"finished\":true") && body.contains("COMPLETED"), "{body}");
    // Membership through REST: a bad address is refused by field.
    assert_error(
        &api.post("/api/v1/cluster/nodes", &json!({"id": 9, "raft_addr": "nowhere", "api_addr": "x:1"})).await?,
        400,
        "raft_addr",
    );

    // Exactly once through REST (issue 16, break 1): a submit without an idempotency key, sent
    // twice on one session sequence (a resend after a lost answer, here through another node),
    // makes one task; without the session it would make two.
    let (status, session) = api.post("/api/v1/sessions", &json!({"ttl_seconds": 60})).await?;
    assert_eq!((status, session["ttl_ms"].as_u64()), (201, Some(60_000)), "{session}");
    let header = format!("{}/1/0", session["session_id"].as_u64().unwrap_or_default());
    let mut ids = Vec::new();
    for node in [follower, leader] {
        let response = api
            .http
            .post(format!("http://{}/api/v1/tasks", cluster.nodes[&node].api_addr))
            .header("content-type", "application/json")
            .header("maos-session", &header)
            .body(json!({"task_type": "coder", "description": "once", "input": "hi"}).to_string())
            .send()
            .await?;
        let status = response.status().as_u16();
        let body: Value = response.json().await?;
        assert_eq!(status, 201, "{body}");
        ids.push(body["task_id"].as_str().unwrap_or_default().to_string());
    }
    assert_eq!(ids[0], ids[1], "the resend must answer the first task, not make a second");
    assert_error(&api.post("/api/v1/sessions", &json!({"ttl_seconds": 86_401})).await?, 400, "ttl_seconds");
    let malformed = api.http.post(format!("{}/api/v1/tasks", api.base)).header("maos-session", "x").send().await?;
    assert_eq!(malformed.status().as_u16(), 400);
    assert!(malformed.text().await?.contains("maos-session"));

    // The OpenAPI document describes what is served.
    let (status, document) = api.get("/api/v1/openapi.json").await?;
    assert_eq!((status, document["openapi"].as_str()), (200, Some("3.1.0")));
    for path in [
        "/api/v1/tasks",
        "/api/v1/tasks/{task_id}",
        "/api/v1/tasks/{task_id}/events",
        "/api/v1/cluster/nodes",
        "/api/v1/agents",
        "/api/v1/cluster",
        "/api/v1/sessions",
        "/health",
        "/ready",
    ] {
        assert!(document["paths"].get(path).is_some(), "{path} is documented");
    }
    Ok(())
}
