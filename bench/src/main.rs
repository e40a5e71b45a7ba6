//! `maos-bench`: load generators with hdrhistogram reports.
//!
//! `maos-bench scheduling` measures assignments per second from a deep queue and the memory a
//! queued task costs (see `scheduling.rs`).
//!
//! `maos-bench agents` measures command-agent spawn latency and submit-to-agent-start dispatch
//! with builtin agents (see `agents.rs`).
//!
//! `maos-bench e2e` runs no-op tasks end to end (submit, builtin agent, result read back) with
//! single submits and with `BatchSubmit`, and with `--peer celery` through Celery 5 on a Redis
//! broker in the same run (see `e2e.rs`).
//!
//! `maos-bench failover` kills the leader of a local cluster under a steady write load, again and
//! again, then transfers leadership, and reports how long each costs the clients (see
//! `failover.rs`).
//!
//! `maos-bench raft-writes` starts a local cluster of real `maos serve` processes (RocksDB, fsync
//! on), then for each client count drives key-value writes for a fixed time and reports committed
//! writes per second and latency percentiles. With `--peer etcd` it also starts a 3-member etcd
//! cluster (the `etcd` binary from Debian's `etcd-server`) on loopback and drives it with the same
//! load generator, in the same run, for a side-by-side comparison. With `--secure` it also runs
//! a cluster with TLS on port 8000 and auth on, its clients calling with an API key, for the cost
//! of both against the plaintext cluster of the same run. With `--telemetry` it compares, in one
//! run, clusters with metrics off, with metrics (the default) and with tracing at sample ratio 1.0
//! exporting to a span sink (`maos_testkit::otlp`), for key-value puts and for task submits, in rounds
//! that alternate the order. Every load loop is bounded in count and time.

mod agents;
mod e2e;
mod etcd;
mod failover;
mod scheduling;
mod task_data;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use hdrhistogram::Histogram;
use maos_client::proto::v1::SubmitTaskRequest;
use maos_client::Client;
use maos_testkit::local_cluster::{LocalCluster, LocalClusterOptions, TlsFiles};

/// Upper bound on writes in one phase, whatever the duration.
const WRITES_PER_PHASE_MAX: u64 = 5_000_000;
/// Keys each writer cycles through, so the key space stays bounded however long a run lasts.
const KEYS_PER_WRITER: u64 = 1024;
/// Clients sharing one connection (HTTP/2 multiplexes them), as an SDK fleet would.
const CLIENTS_PER_CONNECTION: usize = 8;

#[derive(Parser)]
#[command(name = "maos-bench", about = "MAOS benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Bench,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Peer {
    Etcd,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum TaskPeer {
    Celery,
}

#[derive(Subcommand)]
enum Bench {
    /// No-op tasks end to end: submits/s, tasks/s from submit to the result read back, and
    /// submit-to-start latency; with `--peer celery` Celery 5 on Redis in the same run.
    E2e {
        /// The `maos` binary to run (default: next to this one).
        #[arg(long)]
        maos: Option<PathBuf>,
        /// Tasks per system (and per MAOS submit mode).
        #[arg(long, default_value_t = 10_000)]
        tasks: usize,
        /// Concurrent single submitters and result readers (Celery: at most 16 threads).
        #[arg(long, default_value_t = 64)]
        submitters: usize,
        /// Also run the same tasks through this system.
        #[arg(long)]
        peer: Option<TaskPeer>,
        /// The Python with Celery for `--peer celery` (default: what `bench/celery/setup.sh`
        /// makes, `$CARGO_TARGET_DIR/celery-bench/bin/python`).
        #[arg(long)]
        celery_python: Option<PathBuf>,
    },
    /// Assignments per second from a deep queue, and memory per queued task.
    Scheduling {
        /// The `maos` binary to run (default: next to this one).
        #[arg(long)]
        maos: Option<PathBuf>,
        #[arg(long, default_value_t = 100_000)]
        tasks: usize,
        #[arg(long, default_value_t = 1_000)]
        slots: usize,
    },
    /// Command-agent spawn latency and end-to-end dispatch to builtin agents.
    Agents {
        /// The `maos` binary to run (default: next to this one).
        #[arg(long)]
        maos: Option<PathBuf>,
        /// Command agents started per program.
        #[arg(long, default_value_t = 500)]
        spawns: usize,
        /// Tasks submitted for the dispatch measurement.
        #[arg(long, default_value_t = 2_000)]
        tasks: usize,
        /// Submits per second for the dispatch measurement.
        #[arg(long, default_value_t = 200)]
        rate: u64,
    },
    /// Submit throughput with the embedded store and with PostgreSQL; read latency and cache
    /// hit ratio with and without Redis (real servers started on loopback).
    TaskData {
        /// The `maos` binary to run (default: next to this one).
        #[arg(long)]
        maos: Option<PathBuf>,
        /// Concurrent clients in every phase.
        #[arg(long, default_value_t = 32)]
        clients: usize,
        /// Length of each phase in seconds.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Input size in bytes.
        #[arg(long, default_value_t = 1024)]
        input_bytes: usize,
        /// Finished tasks the read phases read.
        #[arg(long, default_value_t = 2_000)]
        read_tasks: usize,
    },
    /// Leader `kill -9` and planned transfers under a steady write load: time to a new leader
    /// and to the first committed write, the longest gap, and spurious elections.
    Failover {
        /// The `maos` binary to run (default: next to this one).
        #[arg(long)]
        maos: Option<PathBuf>,
        /// Leader kills, one after another.
        #[arg(long, default_value_t = 20)]
        kills: usize,
        /// Planned leadership transfers after the kills.
        #[arg(long, default_value_t = 10)]
        transfers: usize,
        /// Concurrent writers, spread over every node.
        #[arg(long, default_value_t = 8)]
        clients: usize,
        /// Keys each writer overwrites in turn (the replicated state, and so every snapshot, holds
        /// clients x keys of 256 bytes).
        #[arg(long, default_value_t = 64)]
        keys_per_client: u64,
        /// How long after its kill a node is restarted, in milliseconds.
        #[arg(long, default_value_t = 3_000)]
        restart_ms: u64,
        /// Steady load between faults, in seconds (spurious elections are counted in it).
        #[arg(long, default_value_t = 5)]
        steady_seconds: u64,
        /// More environment for every node, as KEY=VALUE (to try other `MAOS_RAFT_*` timings).
        #[arg(long = "node-env", value_parser = parse_env)]
        node_env: Vec<(String, String)>,
        /// Copy the nodes' logs into this directory at the end.
        #[arg(long)]
        logs: Option<PathBuf>,
    },
    /// Committed key-value writes per second on a local 3-node cluster.
    RaftWrites {
        /// The `maos` binary to run (default: next to this one).
        #[arg(long)]
        maos: Option<PathBuf>,
        /// Client counts to measure, one phase each.
        #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
        clients: Vec<usize>,
        /// Length of each phase in seconds.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Warm-up before each phase in seconds (not measured).
        #[arg(long, default_value_t = 2)]
        warmup_seconds: u64,
        /// Value size in bytes.
        #[arg(long, default_value_t = 256)]
        value_bytes: usize,
        /// Nodes in the MAOS cluster (the etcd peer always has 3 members).
        #[arg(long, default_value_t = 3)]
        nodes: u64,
        /// Also measure a peer system with the same load, in the same run.
        #[arg(long)]
        peer: Option<Peer>,
        /// The `etcd` binary for `--peer etcd`.
        #[arg(long, default_value = "etcd")]
        etcd: PathBuf,
        /// Also measure a cluster with TLS on port 8000 and auth on (clients send an API key).
        #[arg(long)]
        secure: bool,
        /// Also measure clients that write without a client session (exactly-once off), on the
        /// same cluster right after the default run through all nodes.
        #[arg(long)]
        compare_sessions: bool,
        /// Instead of the runs above: what metrics and tracing cost. Each round starts a cluster
        /// with `metrics.enabled: false`, one with the defaults (metrics on, tracing off) and one
        /// with tracing at sample ratio 1.0 exporting to a span sink in this process, and drives
        /// puts and then no-op task submits through all nodes on each; rounds alternate the order.
        #[arg(long)]
        telemetry: bool,
        /// Rounds of `--telemetry`.
        #[arg(long, default_value_t = 2)]
        rounds: usize,
    },
}

/// Where the load goes.
#[derive(Clone)]
enum Target {
    /// Key-value puts.
    Maos(Arc<Client>),
    /// Task submits of the type `noop` (the key is the task's description).
    MaosTask(Arc<Client>),
    Etcd(etcd::KvClient),
}

impl Target {
    async fn put(&mut self, key: String, value: &str) -> Result<(), String> {
        match self {
            Target::Maos(client) => client.put(&key, value).await.map(|_| ()).map_err(|e| e.to_string()),
            Target::MaosTask(client) => {
                let request = SubmitTaskRequest { task_type: "noop".into(), description: key, ..Default::default() };
                client.submit(request).await.map(|_| ()).map_err(|e| e.to_string())
            }
            Target::Etcd(client) => client.put(key, value).await,
        }
    }
}

struct PhaseResult {
    writes: u64,
    errors: u64,
    /// The first error seen, to say what went wrong.
    first_error: Option<String>,
    elapsed: Duration,
    latency_us: Histogram<u64>,
}

fn histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("constant histogram bounds are valid")
}

async fn drive(
    mut target: Target,
    worker: usize,
    until: Instant,
    value: Arc<String>,
) -> (Histogram<u64>, u64, u64, Option<String>) {
    let mut latency_us = histogram();
    let (mut writes, mut errors) = (0u64, 0u64);
    let mut first_error = None;
    while Instant::now() < until && writes + errors < WRITES_PER_PHASE_MAX {
        let key = format!("bench/{worker}/{}", writes % KEYS_PER_WRITER);
        let started = Instant::now();
        match target.put(key, &value).await {
            Ok(()) => {
                let _ = latency_us.record(started.elapsed().as_micros() as u64);
                writes += 1;
            }
            Err(error) => {
                errors += 1;
                first_error.get_or_insert(error);
            }
        }
    }
    (latency_us, writes, errors, first_error)
}

/// Drive `clients` concurrent writers for `seconds`; connection `i` goes to `endpoints[i % n]`.
async fn phase(
    connect: &dyn Fn(usize) -> anyhow::Result<Target>,
    clients: usize,
    seconds: u64,
    value: Arc<String>,
) -> anyhow::Result<PhaseResult> {
    let connections: Vec<Target> =
        (0..clients.div_ceil(CLIENTS_PER_CONNECTION)).map(connect).collect::<anyhow::Result<_>>()?;
    let started = Instant::now();
    let until = started + Duration::from_secs(seconds);
    let tasks: Vec<_> = (0..clients)
        .map(|worker| {
            let target = connections[worker / CLIENTS_PER_CONNECTION].clone();
            tokio::spawn(drive(target, worker, until, value.clone()))
        })
        .collect();
    let mut latency_us = histogram();
    let (mut writes, mut errors) = (0, 0);
    let mut first_error = None;
    for task in tasks {
        let (h, w, e, error) = task.await?;
        latency_us.add(&h)?;
        writes += w;
        errors += e;
        first_error = first_error.or(error);
    }
    Ok(PhaseResult { writes, errors, first_error, elapsed: started.elapsed(), latency_us })
}

struct Settings {
    client_counts: Vec<usize>,
    seconds: u64,
    warmup_seconds: u64,
    nodes: u64,
    value: Arc<String>,
    secure: bool,
    compare_sessions: bool,
    telemetry: bool,
    rounds: usize,
}

/// One table row per client count; returns the writes per second of each.
async fn measure(
    system: &str,
    connect: &dyn Fn(usize) -> anyhow::Result<Target>,
    settings: &Settings,
) -> anyhow::Result<Vec<f64>> {
    let mut rates = Vec::new();
    for &clients in &settings.client_counts {
        if settings.warmup_seconds > 0 {
            phase(connect, clients, settings.warmup_seconds, settings.value.clone()).await?;
        }
        let r = phase(connect, clients, settings.seconds, settings.value.clone()).await?;
        let ms = |q: f64| r.latency_us.value_at_quantile(q) as f64 / 1000.0;
        let rate = r.writes as f64 / r.elapsed.as_secs_f64();
        println!(
            "| {system} | {clients} | {rate:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {} |",
            ms(0.5),
            ms(0.99),
            ms(0.999),
            r.latency_us.max() as f64 / 1000.0,
            r.errors
        );
        if let Some(error) = &r.first_error {
            eprintln!("{system}, {clients} clients: {} errors, the first: {error}", r.errors);
        }
        rates.push(rate);
    }
    Ok(rates)
}

async fn raft_writes(maos: PathBuf, settings: Settings, peer: Option<(Peer, PathBuf)>) -> anyhow::Result<()> {
    let root = tempfile::Builder::new().prefix("maos-bench-").tempdir()?;
    println!(
        "value {} bytes; {} s per phase after {} s warm-up; {CLIENTS_PER_CONNECTION} clients per connection; fsync on",
        settings.value.len(),
        settings.seconds,
        settings.warmup_seconds
    );
    println!();
    println!("| system | clients | writes/s | p50 ms | p99 ms | p999 ms | max ms | errors |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");

    if settings.telemetry {
        return telemetry(&maos, root.path(), &settings).await;
    }
    let options = LocalClusterOptions { nodes: settings.nodes, log_level: "WARN".into(), ..Default::default() };
    let mut cluster = LocalCluster::new(&maos, &root.path().join("maos"), options)?;
    cluster.start_all()?;
    let all: Vec<u64> = cluster.nodes.keys().copied().collect();
    let (leader, _) = cluster.wait_for_leader(&all, Duration::from_secs(30)).await?;
    let leader_addr = cluster.nodes[&leader].api_addr.clone();
    let to_leader =
        move |_: usize| -> anyhow::Result<Target> { Ok(Target::Maos(Arc::new(Client::new([leader_addr.clone()])?))) };
    measure("maos (to leader)", &to_leader, &settings).await?;
    let addrs: Vec<String> = cluster.nodes.values().map(|n| n.api_addr.clone()).collect();
    let spread = move |i: usize| -> anyhow::Result<Target> {
        Ok(Target::Maos(Arc::new(Client::new([addrs[i % addrs.len()].clone()])?)))
    };
    measure("maos (all nodes)", &spread, &settings).await?;
    if settings.compare_sessions {
        let addrs: Vec<String> = cluster.nodes.values().map(|n| n.api_addr.clone()).collect();
        let sessionless = move |i: usize| -> anyhow::Result<Target> {
            Ok(Target::Maos(Arc::new(Client::new([addrs[i % addrs.len()].clone()])?.without_sessions())))
        };
        measure("maos (all nodes, no client session)", &sessionless, &settings).await?;
    }
    cluster.stop();

    if settings.secure {
        let options = LocalClusterOptions {
            nodes: settings.nodes,
            log_level: "WARN".into(),
            auth: true,
            tls: Some(tls_files(&root.path().join("tls"))?),
            ..Default::default()
        };
        let mut cluster = LocalCluster::new(&maos, &root.path().join("maos-secure"), options)?;
        cluster.start_all()?;
        cluster.wait_for_leader(&all, Duration::from_secs(30)).await?;
        cluster.wait_ready(&all, Duration::from_secs(30)).await?;
        let token = cluster.wait_for_bootstrap_token(Duration::from_secs(30)).await?;
        let tls = cluster.tls()?;
        let addrs: Vec<String> = cluster.nodes.values().map(|n| n.api_addr.clone()).collect();
        let spread = move |i: usize| -> anyhow::Result<Target> {
            let client = Client::new_with_tls([addrs[i % addrs.len()].clone()], tls.as_ref())?;
            Ok(Target::Maos(Arc::new(client.with_credentials(&token)?)))
        };
        measure("maos (all nodes, TLS + API key)", &spread, &settings).await?;
        cluster.stop();
    }

    if let Some((Peer::Etcd, binary)) = peer {
        let etcd = etcd::EtcdCluster::start(&binary, &root.path().join("etcd"), 3).await?;
        let endpoints = etcd.client_addrs();
        let spread = move |i: usize| -> anyhow::Result<Target> {
            Ok(Target::Etcd(etcd::KvClient::connect(&endpoints[i % endpoints.len()])?))
        };
        measure(&format!("etcd {} (all nodes)", etcd.version), &spread, &settings).await?;
    }
    Ok(())
}

/// A `--telemetry` cluster's configuration.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Telemetry {
    MetricsOff,
    Metrics,
    Traced,
}

impl Telemetry {
    fn name(self) -> &'static str {
        match self {
            Telemetry::MetricsOff => "metrics off",
            Telemetry::Metrics => "metrics on (default)",
            Telemetry::Traced => "metrics + tracing 1.0",
        }
    }

    fn env(self, collector: &str) -> Vec<(String, String)> {
        let pairs: &[(&str, &str)] = match self {
            Telemetry::MetricsOff => &[("MAOS_METRICS_ENABLED", "false")],
            Telemetry::Metrics => &[],
            Telemetry::Traced => &[
                ("MAOS_TRACING_ENABLED", "true"),
                ("MAOS_TRACING_SAMPLE_RATIO", "1.0"),
                ("MAOS_TRACING_OTLP_ENDPOINT", collector),
            ],
        };
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }
}

/// Builtin agents per node for the submits of `--telemetry` (they finish every task at once).
const TELEMETRY_SLOTS_PER_NODE: usize = 64;

/// `raft-writes --telemetry`: metrics off, on, and on with tracing at ratio 1.0, each on a fresh
/// cluster, puts then submits through all nodes; rounds alternate the order so neither warm-up
/// nor the machine's drift favours one. Ends with each variant's mean and the two ratios.
async fn telemetry(maos: &Path, root: &Path, settings: &Settings) -> anyhow::Result<()> {
    let sink = maos_testkit::otlp::Collector::counting();
    let collector = sink.start().await?;
    let variants = [Telemetry::MetricsOff, Telemetry::Metrics, Telemetry::Traced];
    // (variant, workload, client count) -> writes/s of each round.
    let mut rates: std::collections::BTreeMap<(Telemetry, &str, usize), Vec<f64>> = Default::default();
    for round in 0..settings.rounds {
        let mut order = variants;
        if round % 2 == 1 {
            order.reverse();
        }
        for variant in order {
            let mut env = variant.env(&collector);
            env.extend([
                ("MAOS_AGENTS_TYPES".to_string(), format!("{{noop: {{slots: {TELEMETRY_SLOTS_PER_NODE}}}}}")),
                ("MAOS_SYSTEM_MAX_AGENTS".to_string(), TELEMETRY_SLOTS_PER_NODE.to_string()),
                ("MAOS_SYSTEM_TASK_QUEUE_SIZE".to_string(), WRITES_PER_PHASE_MAX.to_string()),
            ]);
            let options =
                LocalClusterOptions { nodes: settings.nodes, log_level: "WARN".into(), env, ..Default::default() };
            let dir = root.join(format!("round-{round}-{}", variant as u8));
            let mut cluster = LocalCluster::new(maos, &dir, options)?;
            cluster.start_all()?;
            let all: Vec<u64> = cluster.nodes.keys().copied().collect();
            cluster.wait_for_leader(&all, Duration::from_secs(30)).await?;
            cluster.wait_ready(&all, Duration::from_secs(30)).await?;
            let spans_before = sink.spans();
            for workload in ["puts", "submits"] {
                let addrs: Vec<String> = cluster.nodes.values().map(|n| n.api_addr.clone()).collect();
                let connect = move |i: usize| -> anyhow::Result<Target> {
                    let client = Arc::new(Client::new([addrs[i % addrs.len()].clone()])?);
                    Ok(match workload {
                        "puts" => Target::Maos(client),
                        _ => Target::MaosTask(client),
                    })
                };
                let system = format!("round {} {}: {workload}", round + 1, variant.name());
                let measured = measure(&system, &connect, settings).await?;
                for (&clients, rate) in settings.client_counts.iter().zip(measured) {
                    rates.entry((variant, workload, clients)).or_default().push(rate);
                }
            }
            // Spans are sent every 500 ms: wait for the last batch before the cluster goes.
            tokio::time::sleep(Duration::from_secs(1)).await;
            let spans = sink.spans() - spans_before;
            println!("|  ↳ spans received by the sink from this cluster: {spans} | | | | | | | |");
            cluster.stop();
        }
    }
    println!();
    println!("| workload | clients | metrics off, writes/s (mean, range) | metrics on | tracing 1.0 | metrics cost | tracing cost |");
    println!("|---|---:|---|---|---|---:|---:|");
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let range = |v: &[f64]| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(0.0, f64::max);
        format!("{:.0} ({lo:.0}–{hi:.0})", mean(v))
    };
    for workload in ["puts", "submits"] {
        for &clients in &settings.client_counts {
            let of = |variant| rates.get(&(variant, workload, clients)).cloned().unwrap_or_default();
            let (off, on, traced) = (of(Telemetry::MetricsOff), of(Telemetry::Metrics), of(Telemetry::Traced));
            println!(
                "| {workload} | {clients} | {} | {} | {} | {:.1}% | {:.1}% |",
                range(&off),
                range(&on),
                range(&traced),
                100.0 * (1.0 - mean(&on) / mean(&off)),
                100.0 * (1.0 - mean(&traced) / mean(&on)),
            );
        }
    }
    Ok(())
}

fn parse_env(text: &str) -> Result<(String, String), String> {
    let (key, value) = text.split_once('=').ok_or_else(|| format!("{text:?}: expected KEY=VALUE"))?;
    Ok((key.to_string(), value.to_string()))
}

/// A CA and a certificate for 127.0.0.1 it signed, written under `dir`.
fn tls_files(dir: &Path) -> anyhow::Result<TlsFiles> {
    std::fs::create_dir_all(dir)?;
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_key = rcgen::KeyPair::generate()?;
    let ca_pem = ca.self_signed(&ca_key)?.pem();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate()?;
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])?.signed_by(&key, &issuer)?;
    let files = TlsFiles {
        cert_file: dir.join("node.pem"),
        key_file: dir.join("node.key"),
        ca_file: dir.join("ca.pem"),
        ..Default::default()
    };
    std::fs::write(&files.cert_file, cert.pem())?;
    std::fs::write(&files.key_file, key.serialize_pem())?;
    std::fs::write(&files.ca_file, ca_pem)?;
    Ok(files)
}

/// The `maos` binary a benchmark runs: `--maos`, else the one next to this binary; it must exist.
fn maos_binary(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let maos = match given {
        Some(path) => path,
        None => std::env::current_exe()?.parent().context("no parent directory")?.join("maos"),
    };
    anyhow::ensure!(maos.exists(), "no maos binary at {}; build it or pass --maos", maos.display());
    Ok(maos)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Bench::Scheduling { maos, tasks, slots } => {
            let maos = maos_binary(maos)?;
            scheduling::run(&maos, tasks, slots).await
        }
        Bench::Agents { maos, spawns, tasks, rate } => {
            let maos = maos_binary(maos)?;
            agents::run(&maos, spawns, tasks, rate).await
        }
        Bench::TaskData { maos, clients, seconds, input_bytes, read_tasks } => {
            let maos = maos_binary(maos)?;
            anyhow::ensure!(
                clients > 0 && seconds > 0 && read_tasks > 0,
                "clients, seconds and read tasks must be positive"
            );
            task_data::run(&maos, task_data::Settings { clients, seconds, input_bytes, read_tasks }).await
        }
        Bench::E2e { maos, tasks, submitters, peer, celery_python } => {
            anyhow::ensure!(
                (1..=1_000_000).contains(&tasks) && (1..=1_024).contains(&submitters),
                "--tasks must be in 1..=1000000 and --submitters in 1..=1024"
            );
            let celery_python = (peer == Some(TaskPeer::Celery)).then(|| {
                celery_python.unwrap_or_else(|| {
                    let target =
                        std::env::var_os("CARGO_TARGET_DIR").unwrap_or_else(|| "/var/cache/maos-target".into());
                    PathBuf::from(target).join("celery-bench/bin/python")
                })
            });
            let maos = maos_binary(maos)?;
            e2e::run(e2e::Settings { maos, tasks, submitters, celery_python }).await
        }
        Bench::Failover {
            maos,
            kills,
            transfers,
            clients,
            keys_per_client,
            restart_ms,
            steady_seconds,
            node_env,
            logs,
        } => {
            let maos = maos_binary(maos)?;
            anyhow::ensure!(clients > 0, "--clients must be at least 1");
            anyhow::ensure!(keys_per_client > 0, "--keys-per-client must be at least 1");
            let settings = failover::Settings {
                kills,
                transfers,
                clients,
                keys_per_client,
                restart_ms,
                steady_seconds,
                env: node_env,
                logs,
            };
            failover::run(&maos, settings).await
        }
        Bench::RaftWrites {
            maos,
            clients,
            seconds,
            warmup_seconds,
            value_bytes,
            nodes,
            peer,
            etcd,
            secure,
            compare_sessions,
            telemetry,
            rounds,
        } => {
            anyhow::ensure!((1..=20).contains(&rounds), "--rounds must be in 1..=20");
            let maos = maos_binary(maos)?;
            let settings = Settings {
                client_counts: clients,
                seconds,
                warmup_seconds,
                nodes,
                value: Arc::new("x".repeat(value_bytes)),
                secure,
                compare_sessions,
                telemetry,
                rounds,
            };
            raft_writes(maos, settings, peer.map(|p| (p, etcd))).await
        }
    }
}
