//! `maos-bench`: load generators with hdrhistogram reports.
//!
//! `maos-bench raft-writes` starts a local cluster of real `maos serve` processes (RocksDB, fsync
//! on), then for each client count drives key-value writes at the leader for a fixed time and
//! reports committed writes per second and latency percentiles. Every load loop is bounded in
//! count and time.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use maos_client::Client;
use maos_node::local_cluster::{LocalCluster, LocalClusterOptions};

/// Upper bound on writes in one phase, whatever the duration.
const WRITES_PER_PHASE_MAX: u64 = 5_000_000;

#[derive(Parser)]
#[command(name = "maos-bench", about = "MAOS benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Bench,
}

#[derive(Subcommand)]
enum Bench {
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
        /// Nodes in the cluster.
        #[arg(long, default_value_t = 3)]
        nodes: u64,
    },
}

struct PhaseResult {
    clients: usize,
    writes: u64,
    errors: u64,
    elapsed: Duration,
    latency_us: Histogram<u64>,
}

async fn drive(client: Arc<Client>, worker: usize, until: Instant, value: Arc<String>) -> (Histogram<u64>, u64, u64) {
    let mut latency_us = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds");
    let (mut writes, mut errors) = (0u64, 0u64);
    while Instant::now() < until && writes < WRITES_PER_PHASE_MAX {
        let key = format!("bench/{worker}/{writes}");
        let started = Instant::now();
        match client.put(&key, &value).await {
            Ok(_) => {
                let _ = latency_us.record(started.elapsed().as_micros() as u64);
                writes += 1;
            }
            Err(_) => errors += 1,
        }
    }
    (latency_us, writes, errors)
}

async fn phase(endpoint: &str, clients: usize, seconds: u64, value: Arc<String>) -> anyhow::Result<PhaseResult> {
    // One connection per 8 clients: realistic for an SDK fleet, and HTTP/2 multiplexes the rest.
    let connections: Vec<Arc<Client>> = (0..clients.div_ceil(8))
        .map(|_| Client::new([endpoint.to_string()]).map(Arc::new))
        .collect::<Result<_, _>>()?;
    let started = Instant::now();
    let until = started + Duration::from_secs(seconds);
    let tasks: Vec<_> = (0..clients)
        .map(|worker| tokio::spawn(drive(connections[worker / 8].clone(), worker, until, value.clone())))
        .collect();
    let mut latency_us = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let (mut writes, mut errors) = (0, 0);
    for task in tasks {
        let (histogram, w, e) = task.await?;
        latency_us.add(&histogram)?;
        writes += w;
        errors += e;
    }
    Ok(PhaseResult { clients, writes, errors, elapsed: started.elapsed(), latency_us })
}

async fn raft_writes(
    maos: PathBuf,
    client_counts: Vec<usize>,
    seconds: u64,
    warmup_seconds: u64,
    value_bytes: usize,
    nodes: u64,
) -> anyhow::Result<()> {
    let root = tempfile::Builder::new().prefix("maos-bench-").tempdir()?;
    let options = LocalClusterOptions { nodes, log_level: "WARN".into(), ..Default::default() };
    let mut cluster = LocalCluster::new(&maos, root.path(), options)?;
    cluster.start_all()?;
    let all: Vec<u64> = cluster.nodes.keys().copied().collect();
    let (leader, _) = cluster.wait_for_leader(&all, Duration::from_secs(30)).await?;
    let endpoint = cluster.nodes[&leader].api_addr.clone();
    let value = Arc::new("x".repeat(value_bytes));
    println!("cluster: {nodes} nodes, RocksDB with fsync, leader node {leader}; value {value_bytes} bytes; {seconds} s per phase");
    println!();
    println!("| clients | writes/s | p50 ms | p99 ms | p999 ms | max ms | errors |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for clients in client_counts {
        if warmup_seconds > 0 {
            phase(&endpoint, clients, warmup_seconds, value.clone()).await?;
        }
        let result = phase(&endpoint, clients, seconds, value.clone()).await?;
        let ms = |q: f64| result.latency_us.value_at_quantile(q) as f64 / 1000.0;
        println!(
            "| {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {} |",
            result.clients,
            result.writes as f64 / result.elapsed.as_secs_f64(),
            ms(0.5),
            ms(0.99),
            ms(0.999),
            result.latency_us.max() as f64 / 1000.0,
            result.errors
        );
    }
    cluster.stop();
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Bench::RaftWrites { maos, clients, seconds, warmup_seconds, value_bytes, nodes } => {
            let maos = match maos {
                Some(path) => path,
                None => std::env::current_exe()?.parent().context("no parent directory")?.join("maos"),
            };
            anyhow::ensure!(maos.exists(), "no maos binary at {}; build it or pass --maos", maos.display());
            raft_writes(maos, clients, seconds, warmup_seconds, value_bytes, nodes).await
        }
    }
}
