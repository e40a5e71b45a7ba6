//! Task data under faults, with real servers: PostgreSQL crashes and comes back during a load of
//! submits and completions (nothing acknowledged is lost, nothing runs twice, every refusal is
//! UNAVAILABLE); Redis is killed and comes back during a load of reads (no client sees an error,
//! and the cache is correct after); a result written under a stale fencing token changes no row;
//! a node is not ready while its database lacks the schema.

#[path = "support/tasks.rs"]
mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{output_of, tasks_client, STEP};
use maos_client::proto::v1::task_service_client::TaskServiceClient;
use maos_client::proto::v1::{GetTaskRequest, ListTasksRequest, SubmitTaskRequest, TaskState};
use maos_node::config::DatabaseSection;
use maos_node::storage::postgres::PgStore;
use maos_node::storage::StorageError;
use maos_testkit::local_cluster::{LocalCluster, LocalClusterOptions};
use maos_testkit::local_services::{Postgres, Redis};
use sqlx::Row;
use tonic::transport::Channel;

fn options(env: &[(&str, String)]) -> LocalClusterOptions {
    let mut all = vec![
        ("MAOS_SCHEDULER_LEASE_MS".to_string(), "3000".to_string()),
        ("MAOS_SCHEDULER_LEASE_RENEW_INTERVAL_MS".to_string(), "500".to_string()),
        ("MAOS_AGENTS_TYPES".to_string(), "{coder: {slots: 4}}".to_string()),
        ("MAOS_DATABASE_POOL_TIMEOUT".to_string(), "1".to_string()),
    ];
    all.extend(env.iter().map(|(k, v)| (k.to_string(), v.clone())));
    LocalClusterOptions { env: all, ..Default::default() }
}

async fn started(
    root: &Path,
    options: LocalClusterOptions,
) -> anyhow::Result<(LocalCluster, Vec<TaskServiceClient<Channel>>)> {
    let mut cluster = LocalCluster::new(Path::new(env!("CARGO_BIN_EXE_maos")), root, options)?;
    cluster.start_all()?;
    cluster.wait_for_leader(&[1, 2, 3], STEP).await?;
    cluster.wait_ready(&[1, 2, 3], STEP).await?;
    let clients = (1..=3).map(|id| tasks_client(&cluster, id)).collect::<anyhow::Result<Vec<_>>>()?;
    Ok((cluster, clients))
}

/// Every task in the cluster, by id, with its state and result.
async fn all_tasks(client: &mut TaskServiceClient<Channel>) -> anyhow::Result<BTreeMap<String, (i32, String, String)>> {
    let mut tasks = BTreeMap::new();
    let mut page_token = String::new();
    loop {
        let request = ListTasksRequest { page_size: 1000, page_token, ..Default::default() };
        let page = client.list(request).await?.into_inner();
        for view in page.tasks {
            tasks.insert(view.task_id, (view.state, view.input, view.result));
        }
        if page.next_page_token.is_empty() {
            return Ok(tasks);
        }
        page_token = page.next_page_token;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgresql_crash_during_load_loses_no_acknowledged_task_and_refuses_with_unavailable() -> anyhow::Result<()>
{
    const WRITERS: usize = 4;
    const SUBMITS_PER_WRITER: usize = 60;
    let mut postgres = Postgres::start()?;
    let root = tempfile::tempdir()?;
    let (mut cluster, clients) =
        started(root.path(), options(&[("MAOS_DATABASE_PRIMARY_URL", postgres.url())])).await?;

    let acked_count = Arc::new(AtomicUsize::new(0));
    let mut writers = tokio::task::JoinSet::new();
    for writer in 0..WRITERS {
        let mut client = clients[writer % clients.len()].clone();
        let acked_count = acked_count.clone();
        writers.spawn(async move {
            let mut acked = Vec::new();
            let mut refused = Vec::new();
            for i in 0..SUBMITS_PER_WRITER {
                // Half the tasks take a while, so completions are pending while the database is down.
                let input = if i % 2 == 0 { "sleep:300".to_string() } else { format!("load {writer}/{i}") };
                let mut request = tonic::Request::new(SubmitTaskRequest {
                    task_type: "coder".into(),
                    description: "under load".into(),
                    input: input.clone(),
                    max_retries: 3,
                    ..Default::default()
                });
                request.set_timeout(Duration::from_secs(20));
                match client.submit(request).await {
                    Ok(answer) => {
                        acked.push((answer.into_inner().task_id, input));
                        acked_count.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(status) => refused.push(status),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (acked, refused)
        });
    }

    // Crash the database a third of the way in, keep it down for 3 s, bring it back.
    let deadline = tokio::time::Instant::now() + STEP;
    while acked_count.load(Ordering::Relaxed) < WRITERS * SUBMITS_PER_WRITER / 3 {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "the load did not get going");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    postgres.crash()?;
    let acked_before_crash = acked_count.load(Ordering::Relaxed);
    let down_since = tokio::time::Instant::now();
    // Readiness says why: the database does not answer.
    let api = cluster.nodes[&1].api_addr.clone();
    let ready = loop {
        let response =
            reqwest::Client::new().get(format!("http://{api}/ready")).timeout(Duration::from_secs(5)).send().await?;
        let (code, text) = (response.status().as_u16(), response.text().await?);
        if code == 503 || tokio::time::Instant::now() > down_since + Duration::from_secs(3) {
            break (code, text);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(ready.0, 503, "{}", ready.1);
    assert!(ready.1.contains("PostgreSQL at 127.0.0.1"), "{}", ready.1);
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(down_since.elapsed())).await;
    let acked_while_down = acked_count.load(Ordering::Relaxed) - acked_before_crash;
    postgres.resume()?;

    let mut acked: Vec<(String, String)> = Vec::new();
    let mut refused: Vec<tonic::Status> = Vec::new();
    while let Some(outcome) = writers.join_next().await {
        let (a, r) = outcome?;
        acked.extend(a);
        refused.extend(r);
    }
    eprintln!(
        "acknowledged {} (before the crash {acked_before_crash}, while down {acked_while_down}), refused {}",
        acked.len(),
        refused.len()
    );
    assert!(!refused.is_empty(), "the crash refused no submit (acknowledged while down: {acked_while_down})");
    for status in &refused {
        assert_eq!(status.code(), tonic::Code::Unavailable, "a refusal is UNAVAILABLE: {status:?}");
        assert!(status.message().contains("PostgreSQL at 127.0.0.1"), "it names the database: {}", status.message());
    }

    // Every acknowledged task completes with its own result; no refused submit left a task.
    let mut client = clients[0].clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let tasks = loop {
        let tasks = all_tasks(&mut client).await?;
        let done = acked
            .iter()
            .all(|(id, _)| tasks.get(id).is_some_and(|(state, _, _)| *state == TaskState::Completed as i32));
        if done {
            break tasks;
        }
        let open: Vec<_> = acked
            .iter()
            .filter(|(id, _)| tasks.get(id).is_none_or(|t| t.0 != TaskState::Completed as i32))
            .take(5)
            .collect();
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "acknowledged tasks did not complete, e.g. {open:?}\n{}",
            cluster.log_tail(1, 20)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(tasks.len(), acked.len(), "the cluster holds exactly the acknowledged tasks");
    for (id, input) in &acked {
        let (_, stored_input, result) = &tasks[id];
        assert_eq!(stored_input, input, "task {id} kept its input");
        assert_eq!(output_of(result), format!("echo: {input}"), "task {id} has its own result");
    }

    // In the database: one result row per acknowledged task, under the token that completed it.
    let db = postgres.connect().await?;
    let ids: Vec<&String> = acked.iter().map(|(id, _)| id).collect();
    let rows = sqlx::query("SELECT task_id, count(*) AS n FROM task_results WHERE task_id = ANY($1) GROUP BY task_id")
        .bind(&ids)
        .fetch_all(&db)
        .await?;
    assert_eq!(rows.len(), acked.len(), "every acknowledged task has its result row");
    for row in rows {
        assert_eq!(row.try_get::<i64, _>("n")?, 1);
    }
    cluster.stop();
    Ok(())
}

/// The value of the sample `name` in a Prometheus text.
fn sample(text: &str, name: &str) -> f64 {
    text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(0.0)
}

async fn metric_sum(cluster: &LocalCluster, name: &str) -> anyhow::Result<f64> {
    let mut sum = 0.0;
    for node in cluster.nodes.values() {
        let text = reqwest::Client::new()
            .get(format!("http://{}/metrics", node.api_addr))
            .timeout(Duration::from_secs(5))
            .send()
            .await?
            .text()
            .await?;
        sum += sample(&text, name);
    }
    Ok(sum)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_during_load_is_invisible_to_clients_and_the_cache_is_right_after() -> anyhow::Result<()> {
    const TASKS: usize = 40;
    const READERS: usize = 3;
    const READS_PER_READER: usize = 300;
    let postgres = Postgres::start()?;
    let mut redis = Redis::start()?;
    let root = tempfile::tempdir()?;
    let env = [("MAOS_DATABASE_PRIMARY_URL", postgres.url()), ("MAOS_REDIS_URL", redis.url())];
    let (mut cluster, clients) = started(root.path(), options(&env)).await?;
    let mut client = clients[0].clone();
    let mut ids = Vec::new();
    for i in 0..TASKS {
        let request = SubmitTaskRequest {
            task_type: "coder".into(),
            description: "cached".into(),
            input: format!("payload {i}"),
            ..Default::default()
        };
        ids.push(client.submit(request).await?.into_inner().task_id);
    }
    common::wait_all(&mut client, &ids, TaskState::Completed).await?;

    let reads = Arc::new(AtomicUsize::new(0));
    let ids = Arc::new(ids);
    let mut readers = tokio::task::JoinSet::new();
    for reader in 0..READERS {
        let mut client = clients[reader % clients.len()].clone();
        let (reads, ids) = (reads.clone(), ids.clone());
        readers.spawn(async move {
            let mut errors = Vec::new();
            for i in 0..READS_PER_READER {
                let (n, id) = ((i * 7 + reader) % ids.len(), &ids[(i * 7 + reader) % ids.len()]);
                let request = GetTaskRequest { task_id: id.clone(), stale: false };
                match client.results(request).await {
                    Ok(answer) if output_of(&answer.get_ref().result) == format!("echo: payload {n}") => {}
                    Ok(answer) => errors.push(format!("task {id}: wrong result {:?}", answer.get_ref().result)),
                    Err(status) => errors.push(format!("task {id}: {status:?}")),
                }
                reads.fetch_add(1, Ordering::Relaxed);
            }
            errors
        });
    }
    let total = READERS * READS_PER_READER;
    let deadline = tokio::time::Instant::now() + STEP;
    while reads.load(Ordering::Relaxed) < total / 4 {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "the reads did not get going");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    redis.kill()?;
    let errors_before = metric_sum(&cluster, "maos_redis_errors_total").await?;
    while reads.load(Ordering::Relaxed) < total / 2 {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "the reads stalled while Redis was down");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let errors_during = metric_sum(&cluster, "maos_redis_errors_total").await?;
    redis.resume()?;
    let mut errors = Vec::new();
    while let Some(outcome) = readers.join_next().await {
        errors.extend(outcome?);
    }
    assert!(errors.is_empty(), "clients saw errors: {:?}", &errors[..errors.len().min(5)]);
    assert!(errors_during > errors_before, "the outage was hit: Redis errors {errors_before} -> {errors_during}");

    // After Redis returns, reads fill it again and hit it; every cached value is the stored one.
    let hits_before = metric_sum(&cluster, "maos_cache_hits_total").await?;
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        for id in ids.iter() {
            client.results(GetTaskRequest { task_id: id.clone(), stale: false }).await?;
        }
        if metric_sum(&cluster, "maos_cache_hits_total").await? > hits_before {
            break;
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "reads never hit the cache after Redis returned");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut cache = redis.connect().await?;
    let keys: Vec<String> = redis::cmd("KEYS").arg("maos:result:*").query_async(&mut cache).await?;
    assert!(!keys.is_empty(), "results are cached again");
    let db = postgres.connect().await?;
    for key in keys {
        let (id, token) = key
            .strip_prefix("maos:result:")
            .and_then(|rest| rest.rsplit_once(':'))
            .ok_or_else(|| anyhow::anyhow!("unexpected key {key}"))?;
        let cached: String = redis::cmd("GET").arg(&key).query_async(&mut cache).await?;
        let row = sqlx::query("SELECT fencing_token, result FROM task_results WHERE task_id = $1")
            .bind(id)
            .fetch_one(&db)
            .await?;
        assert_eq!(row.try_get::<i64, _>("fencing_token")?.to_string(), token, "{key} names the stored token");
        assert_eq!(row.try_get::<String, _>("result")?, cached, "{key} holds the stored result");
    }
    cluster.stop();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_written_under_a_stale_token_changes_no_row() -> anyhow::Result<()> {
    let postgres = Postgres::start()?;
    let store = PgStore::connect_lazy(&postgres.url(), &DatabaseSection::default(), Default::default())?;
    store.migrate().await?;
    let db = postgres.connect().await?;
    let row = |db: sqlx::PgPool| async move {
        let row =
            sqlx::query("SELECT fencing_token, result, written_at::text AS at FROM task_results WHERE task_id = 't1'")
                .fetch_one(&db)
                .await?;
        anyhow::Ok((
            row.try_get::<i64, _>("fencing_token")?,
            row.try_get::<String, _>("result")?,
            row.try_get::<String, _>("at")?,
        ))
    };

    store.put_result("t1", 4_096, "from the current owner").await?;
    let before = row(db.clone()).await?;
    // The owner of an older lease writes late.
    let stale = store.put_result("t1", 2_048, "from a stale owner").await;
    assert!(
        matches!(stale, Err(StorageError::Stale { token: 2_048, current: 4_096, .. })),
        "a stale write is refused: {stale:?}"
    );
    assert_eq!(row(db.clone()).await?, before, "the row is unchanged, down to its write time");
    // The current owner's retry of the same write is harmless; a newer lease's write replaces it.
    store.put_result("t1", 4_096, "a retried write").await?;
    assert_eq!(row(db.clone()).await?, before, "the first write under a token stands");
    store.put_result("t1", 6_144, "from the next owner").await?;
    assert_eq!(row(db.clone()).await?.0, 6_144);

    // Concurrent writes (merged into shared statements) keep the fence: the newer token wins.
    let (older, newer) = tokio::join!(store.put_result("t2", 10_240, "older"), store.put_result("t2", 20_480, "newer"));
    assert!(newer.is_ok(), "{newer:?}");
    assert!(matches!(older, Ok(()) | Err(StorageError::Stale { .. })), "{older:?}");
    let row = sqlx::query("SELECT fencing_token, result FROM task_results WHERE task_id = 't2'").fetch_one(&db).await?;
    assert_eq!(
        (row.try_get::<i64, _>("fencing_token")?, row.try_get::<String, _>("result")?),
        (20_480, "newer".into())
    );

    // Checkpoints are fenced the same way, and an attempt may replace its own.
    store.put_checkpoint("t1", 4_096, "step 1").await?;
    store.put_checkpoint("t1", 4_096, "step 2").await?;
    assert!(matches!(store.put_checkpoint("t1", 2_048, "stale step").await, Err(StorageError::Stale { .. })));
    let data: String =
        sqlx::query_scalar("SELECT data FROM task_checkpoints WHERE task_id = 't1'").fetch_one(&db).await?;
    assert_eq!(data, "step 2");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_input_no_committed_task_refers_to_is_swept_and_the_others_kept() -> anyhow::Result<()> {
    let postgres = Postgres::start()?;
    let store = PgStore::connect_lazy(&postgres.url(), &DatabaseSection::default(), Default::default())?;
    store.migrate().await?;
    let db = postgres.connect().await?;
    // What a submit leaves when it fails between its input and its Raft entry, an hour ago.
    sqlx::query("INSERT INTO task_inputs (task_id, input, created_at) VALUES ('never-committed', 'x', now() - interval '1 hour')")
        .execute(&db)
        .await?;

    let root = tempfile::tempdir()?;
    let (mut cluster, clients) =
        started(root.path(), options(&[("MAOS_DATABASE_PRIMARY_URL", postgres.url())])).await?;
    let mut client = clients[0].clone();
    let request = SubmitTaskRequest {
        task_type: "coder".into(),
        description: "kept".into(),
        input: "sleep:60000".into(),
        ..Default::default()
    };
    let kept = client.submit(request).await?.into_inner().task_id;
    // As old as the orphan: only the reference tells them apart.
    sqlx::query("UPDATE task_inputs SET created_at = now() - interval '1 hour' WHERE task_id = $1")
        .bind(&kept)
        .execute(&db)
        .await?;

    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM task_inputs WHERE task_id = 'never-committed'")
            .fetch_one(&db)
            .await?;
        if left == 0 {
            break;
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "the orphaned input was never swept");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(metric_sum(&cluster, "maos_orphan_payloads_removed_total").await? >= 1.0);
    let view = client.get(GetTaskRequest { task_id: kept.clone(), stale: false }).await?.into_inner();
    assert_eq!(view.input, "sleep:60000", "the committed task's input is kept");
    cluster.stop();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_is_not_ready_until_its_database_holds_the_schema() -> anyhow::Result<()> {
    let postgres = Postgres::start()?;
    let root = tempfile::tempdir()?;
    let env = [("MAOS_DATABASE_PRIMARY_URL", postgres.url()), ("MAOS_DATABASE_AUTO_MIGRATE", "false".into())];
    let mut cluster = LocalCluster::new(Path::new(env!("CARGO_BIN_EXE_maos")), root.path(), options(&env))?;
    cluster.start_all()?;
    cluster.wait_for_leader(&[1, 2, 3], STEP).await?;
    let mut clients = (1..=3).map(|id| tasks_client(&cluster, id)).collect::<anyhow::Result<Vec<_>>>()?;
    let api = cluster.nodes[&1].api_addr.clone();
    let ready = || async {
        let response = reqwest::Client::new().get(format!("http://{api}/ready")).timeout(STEP).send().await?;
        anyhow::Ok((response.status().as_u16(), response.text().await?))
    };

    // A leader, the database up, but no schema: not ready, and it says why.
    let (code, text) = ready().await?;
    assert_eq!(code, 503, "{text}");
    assert!(text.contains("the schema is missing") && text.contains("maos db migrate"), "{text}");
    let request = SubmitTaskRequest {
        task_type: "coder".into(),
        description: "after the migration".into(),
        input: "x".into(),
        ..Default::default()
    };
    let refused = clients[0].submit(request.clone()).await.expect_err("a submit without the schema is refused");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");

    // The operator migrates; every node becomes ready and takes the submit.
    let migrate = std::process::Command::new(env!("CARGO_BIN_EXE_maos"))
        .args(["db", "migrate", "--database-url", &postgres.url()])
        .output()?;
    assert!(migrate.status.success(), "{}", String::from_utf8_lossy(&migrate.stderr));
    cluster.wait_ready(&[1, 2, 3], STEP).await?;
    let task_id = clients[0].submit(request).await?.into_inner().task_id;
    common::wait_all(&mut clients[0], &[task_id], TaskState::Completed).await?;
    Ok(())
}
