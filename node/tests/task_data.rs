//! One behavioural suite, two task-data backends: the embedded default (data in the replicated
//! state) and PostgreSQL (data in a real server on loopback). Each runs a 3-node cluster of real
//! processes through the same behaviours: inputs and results round-trip, size limits refuse by
//! field, dependency results reach the dependent, a planned workflow aggregates its children, a
//! checkpoint reaches the next attempt, a stale completion is refused, an idempotent resubmit
//! keeps the first task, and every result survives a leader kill. The PostgreSQL run then reads
//! the tables directly.

#[path = "support/tasks.rs"]
mod common;

use std::path::Path;
use std::time::Duration;

use common::{get, output_of, tasks_client, STEP};
use maos_client::proto::v1::task_service_client::TaskServiceClient;
use maos_client::proto::v1::{
    CancelTaskRequest, CompleteTaskRequest, GetTaskRequest, SubmitTaskRequest, TaskState, TaskView,
};
use maos_testkit::local_cluster::{LocalCluster, LocalClusterOptions};
use maos_testkit::local_services::{Postgres, Redis};
use sqlx::Row;
use tonic::transport::Channel;

/// What the suite needs to know of a backend.
struct Backend {
    env: Vec<(String, String)>,
    /// The largest input a submit may carry.
    input_bytes_max: usize,
}

/// Ids the suite made, for the backend-specific checks after it.
#[derive(Default)]
struct Made {
    echoed: String,
    cancelled: String,
    planned: String,
    /// Refused a completion under a stale token.
    blocker: String,
    /// The nodes still running after the leader kill.
    live: Vec<u64>,
}

fn options(root: &Path, backend: &Backend) -> anyhow::Result<LocalClusterOptions> {
    let script = root.join("crasher.py");
    std::fs::write(&script, common::CRASHER_PY)?;
    let types = format!(
        "{{coder: {{slots: 2}}, coordinator: {{slots: 1}}, crasher: {{backend: command, slots: 1, command: [/usr/bin/python3, {}]}}}}",
        script.display()
    );
    let mut env = vec![
        ("MAOS_SCHEDULER_LEASE_MS".to_string(), "3000".to_string()),
        ("MAOS_SCHEDULER_LEASE_RENEW_INTERVAL_MS".to_string(), "500".to_string()),
        ("MAOS_AGENTS_TYPES".to_string(), types),
    ];
    env.extend(backend.env.iter().cloned());
    Ok(LocalClusterOptions { env, ..Default::default() })
}

fn coder(description: &str, input: &str) -> SubmitTaskRequest {
    SubmitTaskRequest {
        task_type: "coder".into(),
        description: description.into(),
        input: input.into(),
        max_retries: 2,
        ..Default::default()
    }
}

async fn submit(client: &mut TaskServiceClient<Channel>, request: SubmitTaskRequest) -> anyhow::Result<String> {
    Ok(client.submit(request).await?.into_inner().task_id)
}

/// Wait until `task_id` is in `state`.
async fn reach(
    cluster: &LocalCluster,
    client: &mut TaskServiceClient<Channel>,
    task_id: &str,
    state: TaskState,
) -> anyhow::Result<TaskView> {
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let view = get(client, task_id).await?;
        if view.state == state as i32 {
            return Ok(view);
        }
        if tokio::time::Instant::now() > deadline {
            let logs: Vec<String> = (1..=3).map(|id| cluster.log_tail(id, 15)).collect();
            anyhow::bail!("task {task_id} did not reach {state:?}: {view:?}\nlogs:\n{}", logs.join("\n---\n"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn suite(root: &Path, backend: &Backend) -> anyhow::Result<(LocalCluster, Made)> {
    let mut cluster = LocalCluster::new(Path::new(env!("CARGO_BIN_EXE_maos")), root, options(root, backend)?)?;
    cluster.start_all()?;
    let (leader, _) = cluster.wait_for_leader(&[1, 2, 3], STEP).await?;
    cluster.wait_ready(&[1, 2, 3], STEP).await?;
    let mut client = tasks_client(&cluster, leader)?;
    let mut made = Made::default();

    // An input and its result round-trip, through get and results.
    let id = submit(&mut client, coder("echo", "hello, stored world")).await?;
    let view = reach(&cluster, &mut client, &id, TaskState::Completed).await?;
    assert_eq!(view.input, "hello, stored world");
    assert_eq!(output_of(&view.result), "echo: hello, stored world");
    let results = client.results(GetTaskRequest { task_id: id.clone(), stale: false }).await?.into_inner();
    assert_eq!(results.result, view.result);
    made.echoed = id;

    // A completion under a stale token is refused and changes nothing.
    let blocker = submit(&mut client, coder("long", "sleep:60000")).await?;
    let running = reach(&cluster, &mut client, &blocker, TaskState::Running).await?;
    let stale = CompleteTaskRequest {
        task_id: blocker.clone(),
        fencing_token: running.fencing_token - 1,
        result: "from a stale owner".into(),
    };
    let refused = client.complete(stale).await.expect_err("a stale token is refused");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
    let view = get(&mut client, &blocker).await?;
    assert_eq!((view.state, view.result.as_str()), (TaskState::Running as i32, ""));

    // Size limits: one byte over is refused naming the field; at the limit the input is kept
    // whole (the task waits on the blocker, so it never runs).
    let over = "x".repeat(backend.input_bytes_max + 1);
    let refused = client.submit(coder("too big", &over)).await.expect_err("an oversized input is refused");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().starts_with("input"), "the field is named: {}", refused.message());
    let mut at_limit = coder("at the limit", &"x".repeat(backend.input_bytes_max));
    at_limit.depends_on = vec![blocker.clone()];
    let id = submit(&mut client, at_limit).await?;
    assert_eq!(get(&mut client, &id).await?.input.len(), backend.input_bytes_max);
    // A NUL cannot be stored as task data on either backend; a reason only reported may hold one.
    let refused = client.submit(coder("nul", "a\0b")).await.expect_err("a NUL in an input is refused");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().starts_with("input") && refused.message().contains("NUL"), "{}", refused.message());
    client.cancel(CancelTaskRequest { task_id: id.clone(), reason: "done\0with it".into() }).await?;
    client.cancel(CancelTaskRequest { task_id: blocker.clone(), reason: String::new() }).await?;
    made.cancelled = id;
    made.blocker = blocker;

    // A dependency's result reaches the dependent.
    let first = submit(&mut client, coder("first", "alpha")).await?;
    let mut second = coder("second", "beta");
    second.depends_on = vec![first.clone()];
    let second = submit(&mut client, second).await?;
    let view = reach(&cluster, &mut client, &second, TaskState::Completed).await?;
    let first_result = get(&mut client, &first).await?.result;
    let combined: serde_json::Value = serde_json::from_str(&view.result)?;
    assert_eq!(combined["combined"][&first], serde_json::Value::String(first_result.clone()));

    // A planned workflow completes with its children's results aggregated.
    let plan = SubmitTaskRequest {
        task_type: "mixed".into(),
        description: "fan out".into(),
        input: r#"{"branches": 3, "branch_type": "coder", "branch_input": "branch", "aggregate_type": "coder"}"#.into(),
        max_retries: 2,
        ..Default::default()
    };
    let parent = submit(&mut client, plan).await?;
    reach(&cluster, &mut client, &parent, TaskState::Completed).await?;
    let results = client.results(GetTaskRequest { task_id: parent.clone(), stale: false }).await?.into_inner();
    let aggregate: serde_json::Value = serde_json::from_str(&results.result)?;
    assert_eq!(results.children.len(), 4, "3 branches and the aggregating step");
    for child in &results.children {
        assert!(!child.result.is_empty(), "child {} has its result", child.plan_key);
        let in_aggregate = &aggregate[&child.plan_key];
        assert_eq!(in_aggregate, &serde_json::from_str::<serde_json::Value>(&child.result)?);
    }
    made.planned = parent;

    // A checkpoint saved by a crashed attempt reaches the next one.
    let crash = SubmitTaskRequest {
        task_type: "crasher".into(),
        description: "crash once".into(),
        max_retries: 2,
        ..Default::default()
    };
    let id = submit(&mut client, crash).await?;
    let view = reach(&cluster, &mut client, &id, TaskState::Completed).await?;
    assert_eq!(view.result, "resumed from phase-1 done (saved by attempt 1) on attempt 2");
    assert_eq!((view.checkpoint.as_str(), view.checkpoint_attempt), ("phase-1 done", 1));

    // An idempotent resubmit keeps the first task and its input.
    let mut once = coder("once", "first input");
    once.idempotency_key = "suite-once".into();
    let first = client.submit(once.clone()).await?.into_inner();
    once.input = "second input".into();
    let again = client.submit(once).await?.into_inner();
    assert_eq!((again.task_id.as_str(), again.duplicate), (first.task_id.as_str(), true));
    assert_eq!(get(&mut client, &first.task_id).await?.input, "first input");

    // Results outlive the leader.
    let before = get(&mut client, &made.echoed).await?.result;
    cluster.kill(leader)?;
    let others: Vec<u64> = [1, 2, 3].into_iter().filter(|id| *id != leader).collect();
    let (new_leader, _) = cluster.wait_for_leader(&others, STEP).await?;
    let mut client = tasks_client(&cluster, new_leader)?;
    assert_eq!(get(&mut client, &made.echoed).await?.result, before);
    made.live = others;
    Ok((cluster, made))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_default_keeps_task_data_in_the_replicated_state() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let backend = Backend { env: Vec::new(), input_bytes_max: maos_raft_store::tasks::TASK_TEXT_BYTES_MAX };
    let (mut cluster, _) = suite(root.path(), &backend).await?;
    cluster.stop();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_keeps_task_data_in_its_tables() -> anyhow::Result<()> {
    let postgres = Postgres::start()?;
    let root = tempfile::tempdir()?;
    let backend = Backend {
        env: vec![
            ("MAOS_DATABASE_PRIMARY_URL".into(), postgres.url()),
            ("MAOS_DATABASE_PAYLOAD_BYTES_MAX".into(), "65536".into()),
        ],
        input_bytes_max: 65_536,
    };
    let (mut cluster, made) = suite(root.path(), &backend).await?;
    let db = postgres.connect().await?;

    // The input and result are rows; the result row carries the completing lease's token.
    let input: String = sqlx::query_scalar("SELECT input FROM task_inputs WHERE task_id = $1")
        .bind(&made.echoed)
        .fetch_one(&db)
        .await?;
    assert_eq!(input, "hello, stored world");
    let row = sqlx::query("SELECT fencing_token, result FROM task_results WHERE task_id = $1")
        .bind(&made.echoed)
        .fetch_one(&db)
        .await?;
    assert!(row.try_get::<i64, _>("fencing_token")? > 0);
    assert_eq!(output_of(&row.try_get::<String, _>("result")?), "echo: hello, stored world");

    // The stale completion wrote nothing.
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM task_results WHERE task_id = $1")
        .bind(&made.blocker)
        .fetch_one(&db)
        .await?;
    assert_eq!(rows, 0, "a refused stale completion left a row");

    // The leader mirrors tasks and their history (it lags the log by a round or two).
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let states: Vec<String> =
            sqlx::query_scalar("SELECT state FROM task_events WHERE task_id = $1 ORDER BY at, id")
                .bind(&made.echoed)
                .fetch_all(&db)
                .await?;
        let mirrored: Option<String> = sqlx::query_scalar("SELECT state FROM tasks WHERE task_id = $1")
            .bind(&made.planned)
            .fetch_optional(&db)
            .await?;
        if states.last().map(String::as_str) == Some("COMPLETED") && mirrored.as_deref() == Some("COMPLETED") {
            break;
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "the mirror did not catch up: {states:?} {mirrored:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let children: i64 =
        sqlx::query_scalar("SELECT count(*) FROM tasks WHERE parent = $1").bind(&made.planned).fetch_one(&db).await?;
    assert_eq!(children, 4);

    // The cancel is in the audit log, its reason's NUL shown as U+FFFD (jsonb cannot hold one).
    let reasons: Vec<String> =
        sqlx::query_scalar("SELECT detail->>'reason' FROM audit_log WHERE action = 'task.cancel' AND target = $1")
            .bind(&made.cancelled)
            .fetch_all(&db)
            .await?;
    assert_eq!(reasons, ["done\u{FFFD}with it"]);
    let cause: Option<String> =
        sqlx::query_scalar("SELECT cause FROM tasks WHERE task_id = $1").bind(&made.cancelled).fetch_one(&db).await?;
    assert!(cause.is_some_and(|c| c.contains("done\u{FFFD}with it")), "the mirror holds the cause");

    shared_state_is_mirrored(&cluster, &made.live, &db).await?;
    cluster.stop();
    Ok(())
}

/// The leader mirrors the key-value space into `shared_state`: writes, TTLs and deletes, a NUL
/// as U+FFFD; a new leader also removes rows for keys deleted before its term.
async fn shared_state_is_mirrored(cluster: &LocalCluster, live: &[u64], db: &sqlx::PgPool) -> anyhow::Result<()> {
    use maos_client::proto::v1::cluster_service_client::ClusterServiceClient;
    use maos_client::proto::v1::kv_service_client::KvServiceClient;
    use maos_client::proto::v1::{CompareAndSetRequest, DeleteRequest, PutRequest, TransferLeaderRequest};

    let (leader, term) = cluster.wait_for_leader(live, STEP).await?;
    let channel = cluster.client_of(leader)?.channel(0).ok_or_else(|| anyhow::anyhow!("no channel"))?;
    let mut kv = KvServiceClient::new(channel.clone());
    let put = |key: &str, value: &str, ttl_ms| PutRequest { key: key.into(), value: value.into(), ttl_ms };
    kv.put(put("workflows/w1/plan", "v1", 0)).await?;
    let plan = kv.put(put("workflows/w1/plan", "v2", 0)).await?.into_inner().revision;
    let lease = kv.put(put("workflows/w1/lease", "worker-7", 600_000)).await?.into_inner().revision;
    kv.put(put("workflows/w1/gone", "soon", 0)).await?;
    kv.delete(DeleteRequest { key: "workflows/w1/gone".into() }).await?;
    let cas = CompareAndSetRequest { key: "workflows/w1/count".into(), expected: None, value: "1".into(), ttl_ms: 0 };
    let count = kv.compare_and_set(cas).await?.into_inner().revision;
    let odd = kv.put(put("workflows/w1/odd", "a\0b", 0)).await?.into_inner().revision;
    let mut expected = vec![
        ("workflows/w1/count".to_string(), "1".to_string(), count, false),
        ("workflows/w1/lease".to_string(), "worker-7".to_string(), lease, true),
        ("workflows/w1/odd".to_string(), "a\u{FFFD}b".to_string(), odd, false),
        ("workflows/w1/plan".to_string(), "v2".to_string(), plan, false),
    ];
    let mirrored = || async {
        let rows =
            sqlx::query("SELECT key, value, revision, expires_at > now() AS live FROM shared_state ORDER BY key")
                .fetch_all(db)
                .await?;
        rows.iter()
            .map(|row| {
                let revision: i64 = row.try_get("revision")?;
                anyhow::Ok((
                    row.try_get::<String, _>("key")?,
                    row.try_get::<String, _>("value")?,
                    u64::try_from(revision)?,
                    row.try_get::<Option<bool>, _>("live")?.unwrap_or(false),
                ))
            })
            .collect::<anyhow::Result<Vec<_>>>()
    };
    let caught_up = |expected: Vec<(String, String, u64, bool)>, what: &'static str| {
        let mirrored = &mirrored;
        async move {
            let deadline = tokio::time::Instant::now() + STEP;
            loop {
                let rows = mirrored().await?;
                if rows == expected {
                    return anyhow::Ok(());
                }
                anyhow::ensure!(tokio::time::Instant::now() < deadline, "{what}: {rows:?}, expected {expected:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    caught_up(expected.clone(), "the mirror did not catch up").await?;

    // A key that expires leaves the mirror when it leaves the replicated space.
    let brief = kv.put(put("workflows/w1/brief", "for now", 5_000)).await?.into_inner().revision;
    let mut with_brief = expected.clone();
    with_brief.insert(0, ("workflows/w1/brief".to_string(), "for now".to_string(), brief, true));
    caught_up(with_brief, "the mirror did not take the key with a TTL").await?;
    caught_up(expected.clone(), "the expired key stayed in the mirror").await?;

    // A row the cluster never had, as if its key were deleted while no leader mirrored. The
    // leader leaves rows it did not write alone: the next write is mirrored beside it.
    sqlx::query(
        "INSERT INTO shared_state (key, value, revision, updated_at) VALUES ('workflows/ghost', 'boo', 1, now())",
    )
    .execute(db)
    .await?;
    let after = kv.put(put("workflows/w1/after", "x", 0)).await?.into_inner().revision;
    expected.push(("workflows/w1/after".to_string(), "x".to_string(), after, false));
    expected.sort();
    let mut with_ghost = expected.clone();
    with_ghost.insert(0, ("workflows/ghost".to_string(), "boo".to_string(), 1, false));
    caught_up(with_ghost, "the mirror did not take the next write").await?;

    // A new leader reads the mirror back and removes what the replicated space does not hold.
    let to = live.iter().copied().find(|id| *id != leader).ok_or_else(|| anyhow::anyhow!("a second live node"))?;
    // With one node down the transfer may be won by the old leader again ("try again"); any new
    // term starts the projector afresh, which is what this checks.
    if let Err(status) = ClusterServiceClient::new(channel).transfer_leader(TransferLeaderRequest { node_id: to }).await
    {
        anyhow::ensure!(status.code() == tonic::Code::FailedPrecondition, "transfer: {status:?}");
    }
    let (_, new_term) = cluster.wait_for_leader(live, STEP).await?;
    anyhow::ensure!(new_term > term, "the transfer started no new term");
    caught_up(expected, "the new leader kept the ghost").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_holds_scratch_state_and_carries_task_events() -> anyhow::Result<()> {
    use futures::StreamExt;
    use maos_client::proto::v1::kv_service_client::KvServiceClient;
    use maos_client::proto::v1::{CompareAndSetRequest, GetRequest, PutRequest};

    let redis = Redis::start()?;
    let root = tempfile::tempdir()?;
    let backend = Backend { env: vec![("MAOS_REDIS_URL".into(), redis.url())], input_bytes_max: 0 };
    let mut cluster =
        LocalCluster::new(Path::new(env!("CARGO_BIN_EXE_maos")), root.path(), options(root.path(), &backend)?)?;
    cluster.start_all()?;
    let (leader, _) = cluster.wait_for_leader(&[1, 2, 3], STEP).await?;
    cluster.wait_ready(&[1, 2, 3], STEP).await?;
    let mut events = redis::Client::open(redis.url())?.get_async_pubsub().await?;
    events.subscribe("maos:events").await?;

    // Task events reach a subscriber of maos:events, whichever node ran the task.
    let mut client = tasks_client(&cluster, leader)?;
    let id = submit(&mut client, coder("announced", "hello")).await?;
    let mut seen = Vec::new();
    let mut stream = events.on_message();
    let deadline = tokio::time::Instant::now() + STEP;
    while !seen.contains(&"COMPLETED".to_string()) {
        let message =
            tokio::time::timeout_at(deadline, stream.next()).await?.ok_or_else(|| anyhow::anyhow!("closed"))?;
        let event: serde_json::Value = serde_json::from_str(&message.get_payload::<String>()?)?;
        if event["task_id"] == id.as_str() {
            seen.push(event["state"].as_str().unwrap_or_default().to_string());
        }
    }
    assert_eq!(seen.last().map(String::as_str), Some("COMPLETED"), "{seen:?}");

    // Scratch keys live in Redis under maos:, with their TTL, on any node.
    let channel = cluster.client_of(leader % 3 + 1)?.channel(0).ok_or_else(|| anyhow::anyhow!("no channel"))?;
    let mut kv = KvServiceClient::new(channel);
    let put = |value: &str, ttl_ms| PutRequest { key: "scratch/run-1/notes".into(), value: value.into(), ttl_ms };
    assert_eq!(kv.put(put("draft 1", 60_000)).await?.into_inner().revision, 1);
    assert_eq!(kv.put(put("draft 2", 60_000)).await?.into_inner().revision, 2);
    let got = kv.get(GetRequest { key: "scratch/run-1/notes".into(), stale: false }).await?.into_inner();
    assert_eq!((got.found, got.value.as_str(), got.revision), (true, "draft 2", 2));
    let mut direct = redis.connect().await?;
    let ttl_ms: i64 = redis::cmd("PTTL").arg("maos:scratch:scratch/run-1/notes").query_async(&mut direct).await?;
    assert!(ttl_ms > 0 && ttl_ms <= 60_000, "the key expires: {ttl_ms}");
    let refused = kv.put(put("forever", 0)).await.expect_err("scratch needs a TTL");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().starts_with("ttl_ms"), "{}", refused.message());
    let cas =
        CompareAndSetRequest { key: "scratch/run-1/notes".into(), expected: None, value: "x".into(), ttl_ms: 1_000 };
    assert_eq!(kv.compare_and_set(cas).await.expect_err("no CAS on scratch").code(), tonic::Code::FailedPrecondition);
    cluster.stop();
    Ok(())
}
