//! Three real `maos serve` processes on loopback: writes through a follower, `kill -9` of the
//! leader, and the killed node's restart from its RocksDB data.

use std::path::Path;
use std::time::Duration;

use maos_testkit::local_cluster::{LocalCluster, LocalClusterOptions};

const STEP: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_survive_a_leader_kill_and_the_restarted_node_catches_up() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let options = LocalClusterOptions {
        // Small thresholds: the killed node falls behind a purged log and must take a snapshot.
        snapshot_after_logs: 40,
        logs_kept_after_snapshot: 5,
        ..Default::default()
    };
    let mut cluster = LocalCluster::new(Path::new(env!("CARGO_BIN_EXE_maos")), root.path(), options)?;
    cluster.start_all()?;
    let all: Vec<u64> = cluster.nodes.keys().copied().collect();
    let (leader, term) = cluster
        .wait_for_leader(&all, STEP)
        .await
        .map_err(|e| anyhow::anyhow!("{e}\nnode 1 log:\n{}", cluster.log_tail(1, 30)))?;

    let follower = *all.iter().find(|id| **id != leader).expect("a follower");
    let third = *all.iter().find(|id| **id != leader && **id != follower).expect("a third node");
    let through_follower = cluster.client_of(follower)?;
    for i in 0..20 {
        through_follower.put(&format!("before/{i}"), &format!("v{i}")).await?;
    }
    let from_third = cluster.client_of(third)?;
    for i in 0..20 {
        let read = from_third.get(&format!("before/{i}"), false).await?;
        assert_eq!(read.map(|(v, _)| v), Some(format!("v{i}")), "linearizable read of before/{i} on node {third}");
    }

    cluster.kill(leader)?;
    let survivors: Vec<u64> = all.iter().copied().filter(|id| *id != leader).collect();
    let (new_leader, new_term) = cluster.wait_for_leader(&survivors, STEP).await?;
    assert_ne!(new_leader, leader);
    assert!(new_term > term, "a new leader needs a new term ({new_term} after {term})");

    let client = cluster.client()?;
    for i in 0..150 {
        client.put(&format!("after/{i}"), &format!("w{i}")).await?;
    }

    cluster.start_node(leader)?;
    let hash = cluster
        .wait_for_same_state(&all, STEP)
        .await
        .map_err(|e| anyhow::anyhow!("{e}\nrestarted node log:\n{}", cluster.log_tail(leader, 40)))?;
    assert_eq!(hash.len(), 64);
    // The leader purged the entries the restarted node missed, so it caught up by snapshot.
    let log = std::fs::read_to_string(&cluster.nodes[&leader].log_path)?;
    assert!(
        log.contains("installed a snapshot"),
        "the restarted node should have installed a snapshot:\n{}",
        cluster.log_tail(leader, 40)
    );
    let restarted = cluster.client_of(leader)?;
    for (prefix, count, value) in [("before", 20, "v"), ("after", 150, "w")] {
        for i in 0..count {
            let read = restarted.get(&format!("{prefix}/{i}"), true).await?;
            assert_eq!(read.map(|(v, _)| v), Some(format!("{value}{i}")), "{prefix}/{i} on the restarted node");
        }
    }
    // The restarted node rejoined the same cluster and took part in it, not a new one.
    let status = cluster.status(leader).await?;
    assert_eq!(status.members.len(), 3);
    assert!(!status.cluster_id.is_empty());
    assert_eq!(status.cluster_id, cluster.status(new_leader).await?.cluster_id);
    Ok(())
}
