//! `maos demo`: a local 3-node cluster on the embedded default, a failover, and proof that every
//! acknowledged write survived it.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::local_cluster::{LocalCluster, LocalClusterOptions};

/// Writes made before and after the failover.
const WRITES_PER_PHASE: usize = 50;
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// Run the demo with the `maos` binary at `binary`; data lives under `root` while it runs.
pub async fn run(binary: &std::path::Path, root: &std::path::Path) -> anyhow::Result<()> {
    let mut cluster = LocalCluster::new(binary, root, LocalClusterOptions::default())?;
    let all: Vec<u64> = cluster.nodes.keys().copied().collect();
    println!("== Starting a local {}-node MAOS cluster (embedded storage, data in {})", all.len(), root.display());
    for node in cluster.nodes.values() {
        println!("   node {}: api {}  raft {}", node.id, node.api_addr, node.raft_addr);
    }
    cluster.start_all()?;
    let (leader, term) = cluster.wait_for_leader(&all, STEP_TIMEOUT).await?;
    println!("== Leader elected: node {leader} (term {term})");

    let follower = *all.iter().find(|id| **id != leader).context("a follower")?;
    let third = *all.iter().find(|id| **id != leader && **id != follower).context("a third node")?;
    let through_follower = cluster.client_of(follower)?;
    let started = Instant::now();
    for i in 0..WRITES_PER_PHASE {
        through_follower.put(&format!("demo/before/{i:03}"), &format!("value {i}")).await?;
    }
    println!(
        "== Wrote {WRITES_PER_PHASE} keys through follower node {follower} (forwarded to the leader) in {} ms",
        started.elapsed().as_millis()
    );
    let from_third = cluster.client_of(third)?;
    match from_third.get("demo/before/049", false).await? {
        Some((value, revision)) => println!("== Node {third} reads demo/before/049 = {value:?} (revision {revision})"),
        None => bail!("node {third} does not see demo/before/049"),
    }

    println!("== kill -9 the leader, node {leader}");
    let killed_at = Instant::now();
    cluster.kill(leader)?;
    let survivors: Vec<u64> = all.iter().copied().filter(|id| *id != leader).collect();
    let (new_leader, new_term) = cluster.wait_for_leader(&survivors, STEP_TIMEOUT).await?;
    let failover = killed_at.elapsed();
    println!("== New leader: node {new_leader} (term {new_term}), {} ms after the kill", failover.as_millis());

    let client = cluster.client()?;
    for i in 0..WRITES_PER_PHASE {
        client.put(&format!("demo/after/{i:03}"), &format!("value {i}")).await?;
    }
    println!("== Wrote {WRITES_PER_PHASE} more keys with node {leader} down");

    println!("== Restarting node {leader} from its RocksDB data");
    cluster.start_node(leader)?;
    let hash = cluster.wait_for_same_state(&all, STEP_TIMEOUT).await?;
    println!("== All {} nodes applied the same state (hash {})", all.len(), &hash[..16]);

    let mut missing = 0;
    for phase in ["before", "after"] {
        for i in 0..WRITES_PER_PHASE {
            if cluster.client_of(leader)?.get(&format!("demo/{phase}/{i:03}"), true).await?.is_none() {
                missing += 1;
            }
        }
    }
    println!(
        "== Summary: {} writes acknowledged, {missing} missing on the restarted node; failover took {} ms",
        2 * WRITES_PER_PHASE,
        failover.as_millis()
    );
    cluster.stop();
    if missing > 0 {
        bail!("{missing} acknowledged writes are missing");
    }
    println!("== Demo finished; cluster stopped.");
    Ok(())
}
