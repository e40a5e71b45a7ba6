//! `maos-bench task-data`: what the task-data store costs, in one run with the same clients.
//!
//! 1. Submits on a local 3-node cluster with the embedded default, then with PostgreSQL:
//!    concurrent clients submit tasks with an input of `--input-bytes` (builtin agents run them
//!    meanwhile, so results are written too); throughput and acknowledgement latency.
//! 2. Reads of finished tasks (`Results`, linearizable) on the PostgreSQL cluster without Redis,
//!    then with Redis (started empty, so each task's first read misses), and on the embedded
//!    cluster for reference: latency and the cache's hit ratio.
//!
//! PostgreSQL and Redis are real servers started here on loopback (`local_services`). Every loop
//! is bounded in count and time.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use maos_client::proto::v1::task_service_client::TaskServiceClient;
use maos_client::proto::v1::{GetTaskRequest, SubmitTaskRequest, TaskState};
use maos_testkit::local_cluster::{LocalCluster, LocalClusterOptions};
use maos_testkit::local_services::{Postgres, Redis};
use tonic::transport::Channel;

/// Submits or reads one client makes in a phase, at most.
const REQUESTS_PER_CLIENT_MAX: usize = 200_000;

pub struct Settings {
    pub clients: usize,
    pub seconds: u64,
    pub input_bytes: usize,
    pub read_tasks: usize,
}

fn histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("constant histogram bounds are valid")
}

fn options(env: Vec<(String, String)>) -> LocalClusterOptions {
    let mut all = vec![("MAOS_AGENTS_TYPES".to_string(), "{coder: {slots: 16}}".to_string())];
    all.extend(env);
    LocalClusterOptions { env: all, ..Default::default() }
}

async fn cluster(
    maos: &Path,
    root: &Path,
    env: Vec<(String, String)>,
) -> anyhow::Result<(LocalCluster, Vec<TaskServiceClient<Channel>>)> {
    let mut cluster = LocalCluster::new(maos, root, options(env))?;
    cluster.start_all()?;
    cluster.wait_for_leader(&[1, 2, 3], Duration::from_secs(60)).await?;
    cluster.wait_ready(&[1, 2, 3], Duration::from_secs(60)).await?;
    let mut clients = Vec::new();
    for id in 1..=3 {
        let channel = cluster.client_of(id)?.channel(0).ok_or_else(|| anyhow::anyhow!("no channel to node {id}"))?;
        clients.push(TaskServiceClient::new(channel));
    }
    Ok((cluster, clients))
}

fn row(label: &str, count: u64, elapsed: Duration, h: &Histogram<u64>, extra: &str) {
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "| {label} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} |{extra}",
        count as f64 / elapsed.as_secs_f64(),
        ms(0.5),
        ms(0.99),
        ms(0.999),
        h.max() as f64 / 1000.0
    );
}

/// A phase's outcome: latencies of the calls that succeeded, the failures, and its length.
struct Phase {
    latency_us: Histogram<u64>,
    errors: u64,
    elapsed: Duration,
}

/// `settings.clients` workers spread over the nodes, each making calls (`call(client, worker,
/// i)`, true when it succeeded) until `settings.seconds` have passed.
async fn load<F, Fut>(clients: &[TaskServiceClient<Channel>], settings: &Settings, call: F) -> anyhow::Result<Phase>
where
    F: Fn(TaskServiceClient<Channel>, usize, usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let until = Instant::now() + Duration::from_secs(settings.seconds);
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..settings.clients {
        let client = clients[worker % clients.len()].clone();
        let call = call.clone();
        workers.spawn(async move {
            let mut latency_us = histogram();
            let mut errors = 0u64;
            for i in 0..REQUESTS_PER_CLIENT_MAX {
                if Instant::now() >= until {
                    break;
                }
                let began = Instant::now();
                if call(client.clone(), worker, i).await {
                    let _ = latency_us.record(began.elapsed().as_micros() as u64);
                } else {
                    errors += 1;
                }
            }
            (latency_us, errors)
        });
    }
    let mut phase = Phase { latency_us: histogram(), errors: 0, elapsed: Duration::ZERO };
    while let Some(done) = workers.join_next().await {
        let (h, e) = done?;
        phase.latency_us.add(&h)?;
        phase.errors += e;
    }
    phase.elapsed = started.elapsed();
    Ok(phase)
}

/// Submits with `settings.input_bytes` inputs.
async fn submits(label: &str, clients: &[TaskServiceClient<Channel>], settings: &Settings) -> anyhow::Result<()> {
    let input = Arc::new("i".repeat(settings.input_bytes));
    let phase = load(clients, settings, move |mut client, _, _| {
        let request = SubmitTaskRequest {
            task_type: "coder".into(),
            description: "bench".into(),
            input: input.to_string(),
            ..Default::default()
        };
        async move { client.submit(request).await.is_ok() }
    })
    .await?;
    row(label, phase.latency_us.len(), phase.elapsed, &phase.latency_us, &format!(" {} |", phase.errors));
    Ok(())
}

/// Submit `count` tasks and wait until they completed; returns their ids.
async fn finished_tasks(
    client: &mut TaskServiceClient<Channel>,
    count: usize,
    input_bytes: usize,
) -> anyhow::Result<Vec<String>> {
    let input = "r".repeat(input_bytes);
    let mut ids = Vec::with_capacity(count);
    for _ in 0..count {
        let request = SubmitTaskRequest {
            task_type: "coder".into(),
            description: "to read".into(),
            input: input.clone(),
            ..Default::default()
        };
        ids.push(client.submit(request).await?.into_inner().task_id);
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let mut done = 0;
        for id in &ids {
            let view = client.get(GetTaskRequest { task_id: id.clone(), stale: true }).await?.into_inner();
            if view.state == TaskState::Completed as i32 {
                done += 1;
            }
        }
        if done == ids.len() {
            return Ok(ids);
        }
        anyhow::ensure!(Instant::now() < deadline, "{done} of {} tasks completed in 300 s", ids.len());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Sum of the sample `name` over the cluster's nodes.
async fn metric(cluster: &LocalCluster, name: &str) -> anyhow::Result<f64> {
    let mut sum = 0.0;
    for node in cluster.nodes.values() {
        let text = http_get(&node.api_addr, "/metrics").await?;
        sum += text
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
    }
    Ok(sum)
}

/// A plain HTTP/1.1 GET (the bench has no HTTP client dependency).
async fn http_get(addr: &str, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut text)).await??;
    Ok(text.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or_default())
}

/// Readers spread over the nodes read `ids` in turn for `settings.seconds`.
async fn reads(
    label: &str,
    cluster: &LocalCluster,
    clients: &[TaskServiceClient<Channel>],
    ids: Arc<Vec<String>>,
    settings: &Settings,
) -> anyhow::Result<()> {
    let (hits_before, misses_before) =
        (metric(cluster, "maos_cache_hits_total").await?, metric(cluster, "maos_cache_misses_total").await?);
    let phase = load(clients, settings, move |mut client, worker, i| {
        let task_id = ids[(i * 31 + worker * 7) % ids.len()].clone();
        async move { client.results(GetTaskRequest { task_id, stale: false }).await.is_ok() }
    })
    .await?;
    let hits = metric(cluster, "maos_cache_hits_total").await? - hits_before;
    let misses = metric(cluster, "maos_cache_misses_total").await? - misses_before;
    let ratio = if hits + misses > 0.0 { format!("{:.1}%", 100.0 * hits / (hits + misses)) } else { "-".into() };
    row(label, phase.latency_us.len(), phase.elapsed, &phase.latency_us, &format!(" {} | {ratio} |", phase.errors));
    Ok(())
}

pub async fn run(maos: &Path, settings: Settings) -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    // Durable: fsync and synchronous commit on, as in production.
    let postgres = Postgres::start_with(true)?;
    let mut redis = Redis::start()?;
    let pg_env = vec![("MAOS_DATABASE_PRIMARY_URL".to_string(), postgres.url())];
    println!(
        "Submits: {} clients over 3 nodes, {} s, {} B inputs, builtin agents running the tasks.\n",
        settings.clients, settings.seconds, settings.input_bytes
    );
    println!("| store | submits/s | p50 ms | p99 ms | p999 ms | max ms | errors |");
    println!("|---|---|---|---|---|---|---|");
    let (mut embedded, embedded_clients) = cluster(maos, &root.path().join("embedded"), Vec::new()).await?;
    submits("embedded", &embedded_clients, &settings).await?;
    let (mut with_pg, pg_clients) = cluster(maos, &root.path().join("postgres"), pg_env.clone()).await?;
    submits("PostgreSQL", &pg_clients, &settings).await?;
    with_pg.stop();

    println!(
        "\nReads: `Results` (linearizable) of {} finished tasks, {} clients over 3 nodes, {} s.\n",
        settings.read_tasks, settings.clients, settings.seconds
    );
    println!("| store | reads/s | p50 ms | p99 ms | p999 ms | max ms | errors | cache hits |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut client = embedded_clients[0].clone();
    let ids = Arc::new(finished_tasks(&mut client, settings.read_tasks, settings.input_bytes).await?);
    reads("embedded", &embedded, &embedded_clients, ids, &settings).await?;
    embedded.stop();

    // The same database, without and then with the cache (each cluster reads its own tasks).
    let (mut no_cache, clients) = cluster(maos, &root.path().join("read-pg"), pg_env.clone()).await?;
    let mut client = clients[0].clone();
    let ids = Arc::new(finished_tasks(&mut client, settings.read_tasks, settings.input_bytes).await?);
    reads("PostgreSQL, no Redis", &no_cache, &clients, ids, &settings).await?;
    no_cache.stop();
    let mut cached_env = pg_env;
    cached_env.push(("MAOS_REDIS_URL".to_string(), redis.url()));
    let (mut cached, clients) = cluster(maos, &root.path().join("read-pg-redis"), cached_env).await?;
    let mut client = clients[0].clone();
    let ids = Arc::new(finished_tasks(&mut client, settings.read_tasks, settings.input_bytes).await?);
    // Start the cache cold (waiting for the tasks above filled it): every task's first read misses.
    redis.kill()?;
    redis.resume()?;
    reads("PostgreSQL + Redis", &cached, &clients, ids, &settings).await?;
    cached.stop();
    Ok(())
}
