//! Housekeeping: the cluster's identity recorded once by a leader, and this node's addresses
//! registered in the replicated state.

use std::sync::Arc;
use std::time::Duration;

use maos_raft_store::runtime::MaosRuntime;
use maos_raft_store::{Command, MaosNode};
use openraft::AsyncRuntime;
use tokio::sync::watch;

use crate::raft::core::NodeCore;

/// How often housekeeping checks the cluster identity and this node's registration.
pub(crate) const HOUSEKEEPING_INTERVAL: Duration = Duration::from_millis(500);
/// Keep the cluster identity recorded and this node's addresses registered.
pub(crate) async fn housekeeping(core: Arc<NodeCore>, me: MaosNode, mut stopped: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(HOUSEKEEPING_INTERVAL) => {}
            _ = stopped.wait_for(|stop| *stop) => return,
        }
        if core.leader().is_none() {
            continue;
        }
        let (has_identity, registered) = {
            let state = core.state.read();
            let registered =
                state.app.nodes.get(&core.id).is_some_and(|r| r.raft_addr == me.raft_addr && r.api_addr == me.api_addr);
            (state.app.cluster.is_some(), registered)
        };
        if !has_identity && core.is_leader() {
            // Drawn from openraft's runtime random source: seeded in simulations, so runs replay.
            let bytes: [u8; 16] = rand::Rng::gen(&mut <MaosRuntime as AsyncRuntime>::thread_rng());
            let cluster_id = uuid::Builder::from_random_bytes(bytes).into_uuid().to_string();
            let command = Command::InitCluster { cluster_id, cluster_name: core.cluster_name.clone() };
            if let Err(error) = core.write(command).await {
                tracing::debug!(node_id = core.id, %error, "recording the cluster identity failed; will retry");
            }
        }
        if !registered && core.members().contains_key(&core.id) {
            let command = Command::RegisterNode {
                node_id: core.id,
                raft_addr: me.raft_addr.clone(),
                api_addr: me.api_addr.clone(),
            };
            if let Err(error) = core.write(command).await {
                tracing::debug!(node_id = core.id, %error, "registering this node failed; will retry");
            }
        }
    }
}
