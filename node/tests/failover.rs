//! Three real `maos serve` processes on loopback: writes through a follower, `kill -9` of the
//! leader, the killed node's restart from its RocksDB data, and how soon a killed leader is
//! replaced.

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
    // The restarted node rejoined the same cluster and took part in it, not a new one. The
    // identity is recorded by the leader's housekeeping (every 500 ms), and this test can kill
    // the first leader before its first round: wait for it rather than race it.
    let deadline = tokio::time::Instant::now() + STEP;
    let status = loop {
        let status = cluster.status(leader).await?;
        if !status.cluster_id.is_empty() || tokio::time::Instant::now() > deadline {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.members.len(), 3);
    assert!(!status.cluster_id.is_empty(), "no cluster identity within {STEP:?}");
    assert_eq!(status.cluster_id, cluster.status(new_leader).await?.cluster_id);
    Ok(())
}

/// A killed leader's process refuses connections, and the survivors act on it (`raft::leader_watch`):
/// the one with the longest log stands as soon as the voters' lease on the dead leader has run out
/// (`election_timeout_max` after they last heard it), in one term. openraft's own timer would
/// stand only a random `election_timeout` (2 to 3 s here) after the lease: at least 4.9 s after
/// the kill, where the watch takes about 3.1 s. The timeouts are long so the two are far apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_is_replaced_as_soon_as_its_lease_runs_out() -> anyhow::Result<()> {
    const LEASE: Duration = Duration::from_millis(3_000);
    let root = tempfile::tempdir()?;
    let env = [
        ("MAOS_RAFT_HEARTBEAT_INTERVAL_MS", "100"),
        ("MAOS_RAFT_ELECTION_TIMEOUT_MIN_MS", "2000"),
        ("MAOS_RAFT_ELECTION_TIMEOUT_MAX_MS", "3000"),
        ("MAOS_RAFT_REQUEST_TIMEOUT_MS", "20000"),
    ];
    let options = LocalClusterOptions {
        env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ..Default::default()
    };
    let mut cluster = LocalCluster::new(Path::new(env!("CARGO_BIN_EXE_maos")), root.path(), options)?;
    cluster.start_all()?;
    let all: Vec<u64> = cluster.nodes.keys().copied().collect();
    let (leader, term) = cluster.wait_for_leader(&all, STEP).await?;
    cluster.wait_ready(&all, STEP).await?;
    let client = cluster.client()?;
    for i in 0..10 {
        client.put(&format!("before/{i}"), "v").await?;
    }

    let killed_at = tokio::time::Instant::now();
    cluster.kill(leader)?;
    let survivors: Vec<u64> = all.iter().copied().filter(|id| *id != leader).collect();
    let (new_leader, new_term) = cluster.wait_for_leader(&survivors, STEP).await?;
    let took = killed_at.elapsed();
    assert!(
        took < LEASE + Duration::from_millis(1_200),
        "node {new_leader} took {took:?} to replace node {leader}; the lease is {LEASE:?}"
    );
    let log = std::fs::read_to_string(&cluster.nodes[&new_leader].log_path)?;
    assert!(
        log.contains("standing for election: the lost leader's lease has run out"),
        "node {new_leader} should have stood because the leader's port refused:\n{}",
        cluster.log_tail(new_leader, 40)
    );
    assert_eq!(new_term, term + 1, "one term for the election");
    assert!(took >= LEASE - Duration::from_millis(200), "no vote before the lease ran out (took {took:?})");
    client.put("after", "w").await?;
    Ok(())
}

/// Break 1 of issue 16, through the client API: a write resent after an ambiguous failure, on
/// another node, applies once when it carries its client session (`maos-session`), as the SDK
/// sends it. Without sessions the resent compare-and-set would find its own value and answer
/// "compare failed", and the resent put would take a second revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_resent_on_its_client_session_through_another_node_applies_once() -> anyhow::Result<()> {
    use maos_client::proto::v1::cluster_service_client::ClusterServiceClient;
    use maos_client::proto::v1::kv_service_client::KvServiceClient;
    use maos_client::proto::v1::{CompareAndSetRequest, OpenSessionRequest, PutRequest};
    use maos_client::SESSION_HEADER;

    let root = tempfile::tempdir()?;
    let mut cluster = LocalCluster::new(Path::new(env!("CARGO_BIN_EXE_maos")), root.path(), Default::default())?;
    cluster.start_all()?;
    let all: Vec<u64> = cluster.nodes.keys().copied().collect();
    cluster.wait_for_leader(&all, STEP).await?;
    cluster.wait_ready(&all, STEP).await?;
    let kv_of = |id: u64| -> anyhow::Result<_> {
        let client = cluster.client_of(id)?;
        let channel = client.channel(0).ok_or_else(|| anyhow::anyhow!("no channel"))?;
        Ok(KvServiceClient::with_interceptor(channel, client.authorization()))
    };
    fn on_session<T>(message: T, header: &str) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.metadata_mut().insert(SESSION_HEADER, header.parse().expect("an ASCII header"));
        request
    }
    let opener = cluster.client_of(1)?;
    let channel = opener.channel(0).ok_or_else(|| anyhow::anyhow!("no channel"))?;
    let mut sessions = ClusterServiceClient::with_interceptor(channel, opener.authorization());
    let session = sessions.open_session(OpenSessionRequest { ttl_ms: 60_000 }).await?.into_inner();
    assert!(session.session_id > 0 && session.ttl_ms == 60_000, "{session:?}");
    let id = session.session_id;

    // The same compare-and-set, sequence 1, through node 2 and then (a resend) through node 3.
    let cas = CompareAndSetRequest { key: "once".into(), expected: None, value: "first".into(), ttl_ms: 0 };
    let first = kv_of(2)?.compare_and_set(on_session(cas.clone(), &format!("{id}/1/0"))).await?.into_inner();
    let resent = kv_of(3)?.compare_and_set(on_session(cas.clone(), &format!("{id}/1/0"))).await?.into_inner();
    assert!(first.succeeded, "{first:?}");
    assert_eq!(resent, first, "the resend must get the first answer, not a second apply");
    // The same put, sequence 2, twice: one revision, and the key holds it.
    let put = PutRequest { key: "once".into(), value: "second".into(), ttl_ms: 0 };
    let put_first = kv_of(3)?.put(on_session(put.clone(), &format!("{id}/2/1"))).await?.into_inner();
    let put_again = kv_of(1)?.put(on_session(put.clone(), &format!("{id}/2/1"))).await?.into_inner();
    assert_eq!(put_first.revision, put_again.revision, "a resent put takes no second revision");
    let read = cluster.client()?.get("once", false).await?;
    assert_eq!(read, Some(("second".to_string(), put_first.revision)));
    // Without a session the same compare-and-set is a new command, and fails on the value.
    let unsessioned = kv_of(2)?.compare_and_set(tonic::Request::new(cas.clone())).await?.into_inner();
    assert!(!unsessioned.succeeded);

    // Sequence 1 was acknowledged by sequence 2: it cannot be sent again.
    let stale = kv_of(2)?.compare_and_set(on_session(cas.clone(), &format!("{id}/1/0"))).await;
    assert_eq!(stale.map(|_| ()).map_err(|s| s.code()), Err(tonic::Code::FailedPrecondition));
    // An unknown session: ABORTED with reason SESSION_EXPIRED, which the SDK reads as such.
    let unknown = kv_of(2)?.put(on_session(put.clone(), "12345/1/0")).await.expect_err("an unknown session");
    assert_eq!(unknown.code(), tonic::Code::Aborted, "{unknown:?}");
    assert!(matches!(maos_client::ClientError::from_status(unknown), maos_client::ClientError::SessionExpired(_)));
    // A malformed header names itself and is refused before anything applies.
    let malformed = kv_of(2)?.put(on_session(put, "1/0/0")).await.expect_err("a malformed header");
    assert_eq!(malformed.code(), tonic::Code::InvalidArgument);
    assert!(malformed.message().contains("maos-session"), "{}", malformed.message());

    // The SDK's own writes go on a session: a client's writes open exactly one.
    let client = cluster.client()?;
    let sessions_before = cluster_sessions(&cluster).await?;
    for i in 0..5 {
        client.put(&format!("sdk/{i}"), "v").await?;
    }
    assert_eq!(client.compare_and_set("sdk/0", Some("v"), "w").await?.map(|_| ()), Ok(()));
    assert_eq!(cluster_sessions(&cluster).await?, sessions_before + 1, "one session for the SDK client's writes");
    Ok(())
}

/// The open client sessions, from `/metrics` of node 1 once it applied every acknowledged write
/// (a linearizable read through it first).
async fn cluster_sessions(cluster: &LocalCluster) -> anyhow::Result<u64> {
    cluster.client_of(1)?.get("once", false).await?;
    let (http, scheme) = cluster.http()?;
    let text = http.get(format!("{scheme}://{}/metrics", cluster.nodes[&1].api_addr)).send().await?.text().await?;
    text.lines()
        .find_map(|line| line.strip_prefix("maos_client_sessions ").and_then(|v| v.trim().parse::<f64>().ok()))
        .map(|v| v as u64)
        .ok_or_else(|| anyhow::anyhow!("no maos_client_sessions in /metrics:\n{text}"))
}
