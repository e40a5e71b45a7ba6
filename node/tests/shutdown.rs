//! Stopping is prompt: a node given SIGTERM exits within `system.shutdown_grace` (plus a little
//! slack for the process to be reaped), even while clients hold idle gRPC connections and an open
//! Watch stream to it, which an unbounded graceful HTTP/2 shutdown waits on for ever.

use std::path::Path;
use std::time::Duration;

use maos_client::proto::v1::cluster_service_client::ClusterServiceClient;
use maos_client::proto::v1::kv_service_client::KvServiceClient;
use maos_client::proto::v1::{StatusRequest, WatchKeysRequest};
use maos_testkit::local_cluster::{LocalCluster, LocalClusterOptions};
use tonic::transport::Endpoint;

const STEP: Duration = Duration::from_secs(30);
/// The grace the nodes are given (`MAOS_SYSTEM_SHUTDOWN_GRACE`, seconds).
const GRACE: Duration = Duration::from_secs(2);
/// Time beyond the grace for forcing the stop and the process's exit.
const SLACK: Duration = Duration::from_millis(1_500);
/// Idle client connections held open to the node that is stopped.
const IDLE_CONNECTIONS: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_a_node_within_the_grace_despite_idle_connections_and_a_watch() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let options = LocalClusterOptions {
        env: vec![("MAOS_SYSTEM_SHUTDOWN_GRACE".into(), GRACE.as_secs().to_string())],
        ..Default::default()
    };
    let mut cluster = LocalCluster::new(Path::new(env!("CARGO_BIN_EXE_maos")), root.path(), options)?;
    cluster.start_all()?;
    let all: Vec<u64> = cluster.nodes.keys().copied().collect();
    let (leader, _) = cluster
        .wait_for_leader(&all, STEP)
        .await
        .map_err(|e| anyhow::anyhow!("{e}\nnode 1 log:\n{}", cluster.log_tail(1, 30)))?;
    // The leader: its stop also has the others elect a successor, checked at the end.
    let stopped = leader;
    let addr = format!("http://{}", cluster.nodes[&stopped].api_addr);

    // Idle connections: each made one call and then holds its HTTP/2 connection open, with
    // keep-alive pings, as a pooled client or a load balancer does.
    let mut idle = Vec::new();
    for _ in 0..IDLE_CONNECTIONS {
        let channel = Endpoint::from_shared(addr.clone())?
            .http2_keep_alive_interval(Duration::from_secs(1))
            .keep_alive_while_idle(true)
            .connect()
            .await?;
        ClusterServiceClient::new(channel.clone()).status(StatusRequest { with_state_hash: false }).await?;
        idle.push(channel);
    }
    // An open Watch stream that nothing will ever write to.
    let watch_channel = Endpoint::from_shared(addr)?.connect().await?;
    let mut watch = KvServiceClient::new(watch_channel)
        .watch(WatchKeysRequest { prefix: "shutdown-test/never/".into() })
        .await?
        .into_inner();
    let watching = tokio::spawn(async move {
        // Drains until the node ends the stream or the connection drops.
        while let Ok(Some(_)) = watch.message().await {}
    });

    // A health watch, as a load balancer or `grpc_health_probe -watch` holds: the health service
    // never ends it by itself.
    let health_channel =
        Endpoint::from_shared(format!("http://{}", cluster.nodes[&stopped].api_addr))?.connect().await?;
    let mut health = tonic_health::pb::health_client::HealthClient::new(health_channel)
        .watch(tonic_health::pb::HealthCheckRequest { service: String::new() })
        .await?
        .into_inner();
    let health_watching = tokio::spawn(async move { while let Ok(Some(_)) = health.message().await {} });
    // A connection that never says anything, not even the HTTP/2 preface.
    let silent = tokio::net::TcpStream::connect(&cluster.nodes[&stopped].api_addr).await?;

    let signalled = tokio::time::Instant::now();
    cluster.signal(stopped, libc::SIGTERM)?;
    let deadline = signalled + GRACE + SLACK;
    let status = loop {
        if let Some(status) = cluster.exit_status(stopped)? {
            break status;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "node {stopped} still runs {:?} after SIGTERM (grace {GRACE:?}); its log:\n{}",
            signalled.elapsed(),
            cluster.log_tail(stopped, 30)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let took = signalled.elapsed();
    println!("node {stopped} exited {took:?} after SIGTERM ({status}) with {IDLE_CONNECTIONS} idle connections, a key watch, a health watch and a silent connection open");
    anyhow::ensure!(
        status.success(),
        "node {stopped} exited with {status}; its log:\n{}",
        cluster.log_tail(stopped, 30)
    );
    let log = std::fs::read_to_string(&cluster.nodes[&stopped].log_path)?;
    anyhow::ensure!(log.contains("stopping"), "the node did not log its stop:\n{}", cluster.log_tail(stopped, 30));
    // The watch ends with the node, one way or another.
    tokio::time::timeout(STEP, watching).await??;
    tokio::time::timeout(STEP, health_watching).await??;
    drop((idle, silent));

    // The rest of the cluster carries on.
    let survivors: Vec<u64> = all.iter().copied().filter(|id| *id != stopped).collect();
    cluster.wait_for_leader(&survivors, STEP).await?;
    Ok(())
}
