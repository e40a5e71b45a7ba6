//! `maos-bench failover`: how long a leader's loss costs the clients.
//!
//! A local 3-node cluster of `maos serve` processes (RocksDB, fsync on) takes a steady write load
//! from SDK clients that know every endpoint, each starting on a different node. Then, `kills`
//! times: the leader is `kill -9`ed and restarted `restart_ms` later; once it has caught up and
//! the cluster has been steady for `steady_seconds`, the next kill. After the kills, `transfers`
//! planned leadership transfers. For each fault it reports:
//!
//! - **new leader**: from the fault until both survivors name the same new leader (polled every
//!   10 ms through their `Status`);
//! - **first write**: from the fault until the first write *sent after it* is acknowledged, as a
//!   client sees it;
//! - **longest gap**: the longest time between two acknowledgements, over all clients, around
//!   the fault (what a dashboard of the write rate shows);
//! - **terms**: how many terms the election used (1 is a clean election; more is a split vote or
//!   a candidate whose log was behind).
//!
//! And, between the faults, **spurious elections**: terms that passed while no node was killed or
//! transferred, under the same load. Every loop is bounded in count and time.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use maos_client::proto::v1::cluster_service_client::ClusterServiceClient;
use maos_client::proto::v1::TransferLeaderRequest;
use maos_client::Client;
use maos_testkit::local_cluster::{LocalCluster, LocalClusterOptions};

/// Upper bound on one fault's wait for a new leader or a first write.
const FAULT_WAIT_MAX: Duration = Duration::from_secs(20);
/// Upper bound on waiting for the cluster to settle after a restart.
const SETTLE_MAX: Duration = Duration::from_secs(60);
/// How often the survivors' status is polled during a fault.
const POLL: Duration = Duration::from_millis(10);
/// Writes one client sends at most over the whole run.
const WRITES_PER_CLIENT_MAX: u64 = 2_000_000;

pub struct Settings {
    pub kills: usize,
    pub transfers: usize,
    pub clients: usize,
    pub keys_per_client: u64,
    pub restart_ms: u64,
    pub steady_seconds: u64,
    /// More environment for every node (`MAOS_RAFT_*` to try other timings).
    pub env: Vec<(String, String)>,
    /// Where to copy the nodes' logs at the end, if anywhere.
    pub logs: Option<std::path::PathBuf>,
}

/// What the clients saw, shared by the writers and the fault loop.
#[derive(Default)]
struct Timeline {
    /// The fault under way, if one is.
    fault: Option<Instant>,
    /// The first acknowledgement of a write sent after `fault`.
    first_write: Option<Instant>,
    /// The last acknowledgement of any write.
    last_ack: Option<Instant>,
    /// The longest gap between acknowledgements since `fault`.
    longest_gap: Duration,
    writes: u64,
    errors: u64,
}

impl Timeline {
    fn acked(&mut self, sent: Instant, now: Instant) {
        self.writes += 1;
        if let (Some(fault), Some(last)) = (self.fault, self.last_ack) {
            if now > fault {
                self.longest_gap = self.longest_gap.max(now.saturating_duration_since(last));
            }
        }
        self.last_ack = Some(now);
        if let Some(fault) = self.fault {
            if sent >= fault && self.first_write.is_none() {
                self.first_write = Some(now);
            }
        }
    }

    fn begin_fault(&mut self, at: Instant) {
        self.fault = Some(at);
        self.first_write = None;
        self.longest_gap = Duration::ZERO;
    }
}

/// One fault's figures, in milliseconds.
struct FaultResult {
    new_leader_ms: f64,
    first_write_ms: f64,
    longest_gap_ms: f64,
    terms: u64,
}

impl FaultResult {
    fn new(at: Instant, elected: Instant, written: Instant, longest_gap: Duration, terms: u64) -> Self {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        Self {
            new_leader_ms: ms(elected - at),
            first_write_ms: ms(written - at),
            longest_gap_ms: ms(longest_gap),
            terms,
        }
    }
}

impl std::fmt::Display for FaultResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "new leader {:.0} ms, first write {:.0} ms, longest gap {:.0} ms, {} term(s)",
            self.new_leader_ms, self.first_write_ms, self.longest_gap_ms, self.terms
        )
    }
}

async fn write_loop(client: Client, worker: usize, keys: u64, timeline: Arc<Mutex<Timeline>>, until: Instant) {
    let value = "x".repeat(256);
    let mut sent_count = 0u64;
    while Instant::now() < until && sent_count < WRITES_PER_CLIENT_MAX {
        let key = format!("failover/{worker}/{}", sent_count % keys);
        sent_count += 1;
        let sent = Instant::now();
        let outcome = client.put(&key, &value).await;
        let now = Instant::now();
        let mut timeline = timeline.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match outcome {
            Ok(_) => timeline.acked(sent, now),
            Err(_) => timeline.errors += 1,
        }
    }
}

/// Each node's `(leader, term)` as it answers now; `None` for a node that does not answer.
async fn views(clients: &[&(u64, Client)]) -> Vec<(u64, Option<(Option<u64>, u64)>)> {
    let mut seen = Vec::with_capacity(clients.len());
    for (id, client) in clients {
        let view = client.status_of(0, false).await.ok().map(|s| (s.leader_id, s.current_term));
        seen.push((*id, view));
    }
    seen
}

/// Poll `among` until all name one leader other than `not`, in a term above `after`; returns the
/// leader, the term and when they first agreed.
async fn await_new_leader(
    status: &[(u64, Client)],
    among: &[u64],
    not: Option<u64>,
    after: u64,
) -> anyhow::Result<(u64, u64, Instant)> {
    let clients: Vec<&(u64, Client)> = status.iter().filter(|(id, _)| among.contains(id)).collect();
    let deadline = Instant::now() + FAULT_WAIT_MAX;
    while Instant::now() < deadline {
        let seen = views(&clients).await;
        let now = Instant::now();
        let first = seen.first().and_then(|(_, v)| *v);
        if let Some((Some(leader), term)) = first {
            let agreed = seen.iter().all(|(_, v)| *v == Some((Some(leader), term)));
            if agreed && Some(leader) != not && term > after {
                return Ok((leader, term, now));
            }
        }
        tokio::time::sleep(POLL).await;
    }
    anyhow::bail!("no new leader among {among:?} within {FAULT_WAIT_MAX:?}")
}

/// Wait for the first write sent after the fault; when it was acknowledged.
async fn await_first_write(timeline: &Mutex<Timeline>) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + FAULT_WAIT_MAX;
    while Instant::now() < deadline {
        if let Some(at) = timeline.lock().unwrap_or_else(|p| p.into_inner()).first_write {
            return Ok(at);
        }
        tokio::time::sleep(POLL).await;
    }
    anyhow::bail!("no write was acknowledged within {FAULT_WAIT_MAX:?} of the fault")
}

/// Every node's term, for counting elections nobody caused.
async fn settled_term(cluster: &LocalCluster, all: &[u64]) -> anyhow::Result<(u64, u64)> {
    cluster.wait_for_leader(all, SETTLE_MAX).await
}

fn histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 600_000, 3).expect("constant histogram bounds are valid")
}

/// One row of the report: its name and the figure it reads from a fault's result.
type Column = (&'static str, fn(&FaultResult) -> f64);

fn report(name: &str, results: &[FaultResult]) {
    let columns: [Column; 3] = [
        ("new leader", |r| r.new_leader_ms),
        ("first write", |r| r.first_write_ms),
        ("longest gap", |r| r.longest_gap_ms),
    ];
    for (column, value) in columns {
        let mut h = histogram();
        for r in results {
            let _ = h.record(value(r).max(1.0) as u64);
        }
        println!(
            "| {name} | {column} | {} | {} | {} | {} | {} |",
            results.len(),
            h.min(),
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.99),
            h.max()
        );
    }
}

pub async fn run(maos: &Path, settings: Settings) -> anyhow::Result<()> {
    let root = tempfile::Builder::new().prefix("maos-bench-failover-").tempdir()?;
    let options = LocalClusterOptions { log_level: "WARN".into(), env: settings.env.clone(), ..Default::default() };
    let mut cluster = LocalCluster::new(maos, &root.path().join("maos"), options)?;
    cluster.start_all()?;
    let outcome = faults(&mut cluster, &settings).await;
    cluster.stop();
    // The logs are copied on failure too: they are what explains it.
    if let Some(dir) = &settings.logs {
        std::fs::create_dir_all(dir)?;
        for (id, node) in &cluster.nodes {
            std::fs::copy(&node.log_path, dir.join(format!("node-{id}.log")))?;
        }
    }
    let outcome = outcome?;
    let (kills, transfers) = (&outcome.kills, &outcome.transfers);

    println!();
    println!(
        "{} clients over all nodes, 256-byte puts over {} keys each, fsync on; kill -9 of the leader, restart after {} ms, {} s steady between faults",
        settings.clients, settings.keys_per_client, settings.restart_ms, settings.steady_seconds
    );
    println!();
    println!("| fault | from the fault to | count | min ms | p50 ms | p99 ms | max ms |");
    println!("|---|---|---:|---:|---:|---:|---:|");
    report("leader kill -9", kills);
    report("planned transfer", transfers);
    println!();
    let extra_terms: u64 = kills.iter().chain(transfers).map(|r| r.terms.saturating_sub(1)).sum();
    println!(
        "elections: {} faults used {} terms beyond one each; spurious elections between faults: {}; writes acknowledged {}, failed {}",
        kills.len() + transfers.len(),
        extra_terms,
        outcome.spurious,
        outcome.writes,
        outcome.errors
    );
    Ok(())
}

/// What a run of faults measured.
struct Outcome {
    kills: Vec<FaultResult>,
    transfers: Vec<FaultResult>,
    spurious: u64,
    writes: u64,
    errors: u64,
}

async fn faults(cluster: &mut LocalCluster, settings: &Settings) -> anyhow::Result<Outcome> {
    let all: Vec<u64> = cluster.nodes.keys().copied().collect();
    let (mut leader, mut term) = cluster.wait_for_leader(&all, SETTLE_MAX).await?;
    cluster.wait_ready(&all, SETTLE_MAX).await?;
    let status: Vec<(u64, Client)> = all
        .iter()
        .map(|id| Ok((*id, cluster.client_of(*id)?.with_deadline(Duration::from_millis(300)))))
        .collect::<anyhow::Result<_>>()?;

    let addrs: Vec<String> = cluster.nodes.values().map(|n| n.api_addr.clone()).collect();
    let timeline = Arc::new(Mutex::new(Timeline::default()));
    let per_fault = Duration::from_millis(settings.restart_ms) + Duration::from_secs(settings.steady_seconds + 30);
    let until = Instant::now() + per_fault * (settings.kills + settings.transfers + 2) as u32;
    let writers: Vec<_> = (0..settings.clients)
        .map(|worker| {
            // Each client starts on a different node and fails over to the others.
            let mut endpoints = addrs.clone();
            endpoints.rotate_left(worker % addrs.len());
            let client = Client::new(endpoints)?;
            Ok(tokio::spawn(write_loop(client, worker, settings.keys_per_client, timeline.clone(), until)))
        })
        .collect::<anyhow::Result<_>>()?;
    tokio::time::sleep(Duration::from_secs(settings.steady_seconds)).await;
    let steady_term = settled_term(cluster, &all).await?;
    let mut spurious = (steady_term.1 - term) + u64::from(steady_term.0 != leader);
    (leader, term) = steady_term;

    let mut kills = Vec::new();
    for round in 0..settings.kills {
        let killed = leader;
        let at = Instant::now();
        timeline.lock().unwrap_or_else(|p| p.into_inner()).begin_fault(at);
        cluster.kill(killed)?;
        let survivors: Vec<u64> = all.iter().copied().filter(|id| *id != killed).collect();
        let restart_at = at + Duration::from_millis(settings.restart_ms);
        let (new_leader, new_term, elected) = await_new_leader(&status, &survivors, Some(killed), term).await?;
        let written = await_first_write(&timeline).await?;
        tokio::time::sleep(restart_at.saturating_duration_since(Instant::now())).await;
        let longest_gap = timeline.lock().unwrap_or_else(|p| p.into_inner()).longest_gap;
        cluster.start_node(killed)?;
        let result = FaultResult::new(at, elected, written, longest_gap, new_term - term);
        println!("kill {round}: node {killed} -> node {new_leader}: {result}");
        kills.push(result);
        // The restarted node catches up, then a steady spell under load; any term that passes in
        // it is an election nobody caused.
        let (_, rejoined_term) = settled_term(cluster, &all).await?;
        tokio::time::sleep(Duration::from_secs(settings.steady_seconds)).await;
        let (steady_leader, steady_term) = settled_term(cluster, &all).await?;
        spurious += (steady_term - rejoined_term) + u64::from(rejoined_term != new_term);
        if rejoined_term != new_term {
            println!("kill {round}: the rejoining node {killed} moved the term from {new_term} to {rejoined_term}");
        }
        (leader, term) = (steady_leader, steady_term);
    }

    let mut transfers = Vec::new();
    for round in 0..settings.transfers {
        let to = *all.iter().find(|id| **id != leader).unwrap_or(&leader);
        let channel = status
            .iter()
            .find(|(id, _)| *id == leader)
            .and_then(|(_, c)| c.channel(0))
            .ok_or_else(|| anyhow::anyhow!("no channel to node {leader}"))?;
        let at = Instant::now();
        timeline.lock().unwrap_or_else(|p| p.into_inner()).begin_fault(at);
        let answer = ClusterServiceClient::new(channel).transfer_leader(TransferLeaderRequest { node_id: to }).await;
        if let Err(status) = answer {
            println!("transfer {round}: node {leader} -> node {to} refused: {}", status.message());
            tokio::time::sleep(Duration::from_secs(settings.steady_seconds)).await;
            (leader, term) = settled_term(cluster, &all).await?;
            continue;
        }
        let (new_leader, new_term, elected) = await_new_leader(&status, &all, Some(leader), term).await?;
        let written = await_first_write(&timeline).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let longest_gap = timeline.lock().unwrap_or_else(|p| p.into_inner()).longest_gap;
        let result = FaultResult::new(at, elected, written, longest_gap, new_term - term);
        println!("transfer {round}: node {leader} -> node {new_leader}: {result}");
        transfers.push(result);
        tokio::time::sleep(Duration::from_secs(settings.steady_seconds)).await;
        let (steady_leader, steady_term) = settled_term(cluster, &all).await?;
        spurious += steady_term - new_term;
        (leader, term) = (steady_leader, steady_term);
    }
    for writer in writers {
        writer.abort();
    }
    let (writes, errors) = {
        let t = timeline.lock().unwrap_or_else(|p| p.into_inner());
        (t.writes, t.errors)
    };
    Ok(Outcome { kills, transfers, spurious, writes, errors })
}
