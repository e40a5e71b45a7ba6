//! `maos serve`: one node on RocksDB and real TCP, until SIGINT or SIGTERM.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use maos_raft_store::rocks::RocksDb;
use maos_raft_store::{StateMachineStore, VALIDATION_SERVED};

use super::data_dir::{preflight, DataDir};
use super::start;
use crate::config::Config;
use crate::raft::proposer::system_clock;
use crate::transport::TcpTransport;

/// How often the data directory's identity file is brought up to date with the cluster id.
const IDENTITY_SYNC_INTERVAL: Duration = Duration::from_millis(500);

/// Run a node until a termination signal.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    let transport = Arc::new(TcpTransport);
    let data_dir = DataDir::new(&config.node.data_dir);
    let (channels, _) = super::peer_channels(&config, transport.clone()).map_err(anyhow::Error::msg)?;
    let mut identity = preflight(&config, &data_dir, &channels).await?;
    // Read-only: a database this build cannot read is refused before anything is written.
    RocksDb::check_format(&data_dir.raft_path())?;
    data_dir.write_identity(&identity)?;

    let db = RocksDb::open(&data_dir.raft_path())?;
    let state_machine = StateMachineStore::open(db.snapshots(), VALIDATION_SERVED)
        .with_context(|| format!("cannot restore the state machine from {}", data_dir.raft_path().display()))?;
    let node = start(&config, db.log_store(), state_machine, transport, system_clock()).await?;
    tracing::info!(
        node_id = config.node.id,
        api = %config.network.listen_addr,
        raft = %config.network.raft_listen_addr,
        "maos node started"
    );

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut ticker = tokio::time::interval(IDENTITY_SYNC_INTERVAL);
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
            _ = ticker.tick() => {
                if identity.cluster_id.is_empty() {
                    let cluster_id = node.core.state.read().app.cluster.as_ref().map(|c| c.cluster_id.clone());
                    if let Some(cluster_id) = cluster_id {
                        identity.cluster_id = cluster_id;
                        data_dir.write_identity(&identity)?;
                        tracing::info!(cluster_id = %identity.cluster_id, "recorded the cluster id in the data dir");
                    }
                }
            }
        }
    }
    tracing::info!(node_id = config.node.id, "stopping");
    node.shutdown(config.system.shutdown_grace()).await;
    Ok(())
}
