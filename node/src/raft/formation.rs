//! Forming the cluster with no coordinator, and `Hello`, the identity call behind it and behind
//! preflight.
//!
//! Among the static peers the lowest id initialises the group, and only once every listed peer
//! answers `Hello` and none is initialised already. A node whose Raft state is initialised (it
//! has a vote or a log) never initialises again, so restarts cannot fork the cluster.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use maos_raft_store::{MaosNode, NodeId};
use tokio::sync::watch;

use crate::config::Config;
use crate::proto::{HelloRequest, HelloResponse};
use crate::raft::core::NodeCore;
use crate::raft::network::Channels;

/// Pause between formation attempts while peers are not all reachable.
const FORMATION_RETRY: Duration = Duration::from_millis(300);
/// Deadline of one `Hello` call.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(1);

/// Ask the node at `raft_addr` who it is and what cluster it is in.
pub async fn hello(
    channels: &Channels,
    raft_addr: &str,
    from: NodeId,
    cluster_name: &str,
) -> Result<HelloResponse, String> {
    hello_within(channels, raft_addr, from, cluster_name, HELLO_TIMEOUT).await
}

/// [`hello`] with a deadline of `within`.
pub(crate) async fn hello_within(
    channels: &Channels,
    raft_addr: &str,
    from: NodeId,
    cluster_name: &str,
    within: Duration,
) -> Result<HelloResponse, String> {
    let mut client = channels.raft_client(raft_addr).map_err(|e| e.to_string())?;
    let mut request = tonic::Request::new(HelloRequest { from_node_id: from, cluster_name: cluster_name.to_string() });
    request.set_timeout(within);
    match tokio::time::timeout(within, client.hello(request)).await {
        Ok(Ok(reply)) => Ok(reply.into_inner()),
        Ok(Err(status)) => Err(status.message().to_string()),
        Err(_) => Err("no answer".into()),
    }
}

/// A member's Raft view as its `Hello` says it (the dashboard's member list).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerView {
    pub role: String,
    pub term: u64,
    pub applied_index: u64,
    pub leader_id: Option<NodeId>,
}

/// Ask the member at `raft_addr` for its Raft view, over the Raft port: only members may call
/// it (the cluster secret), so it needs no API credential.
pub async fn peer_view(core: &NodeCore, raft_addr: &str, within: Duration) -> Result<PeerView, String> {
    let hello = hello_within(&core.channels, raft_addr, core.id, &core.cluster_name, within).await?;
    Ok(PeerView {
        role: hello.role,
        term: hello.current_term,
        applied_index: hello.last_applied_index,
        leader_id: (hello.leader_id != 0).then_some(hello.leader_id),
    })
}

/// What a stranger gets from a Raft port (`maos security-scan`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RaftPortProbe {
    /// It answered `Hello` without the cluster secret.
    Open,
    /// It refused the call for want of the cluster secret.
    Protected,
    /// It takes TCP connections but not a plaintext gRPC call: mutual TLS (`security.peer_tls`),
    /// or something other than a MAOS node.
    NotPlaintext(String),
    Unreachable(String),
}

/// How long a probe waits for a TCP connection.
const PROBE_CONNECT: std::time::Duration = std::time::Duration::from_secs(2);

/// Call `Hello` on `raft_addr` as a stranger (no cluster secret, no certificate).
pub async fn probe_raft_port(raft_addr: &str) -> RaftPortProbe {
    let channels = Channels::new(std::sync::Arc::new(crate::transport::TcpTransport));
    match hello(&channels, raft_addr, 0, "").await {
        Ok(_) => RaftPortProbe::Open,
        Err(message) if message.contains("cluster secret") => RaftPortProbe::Protected,
        Err(message) => match tokio::time::timeout(PROBE_CONNECT, tokio::net::TcpStream::connect(raft_addr)).await {
            Ok(Ok(_)) => RaftPortProbe::NotPlaintext(message),
            _ => RaftPortProbe::Unreachable(message),
        },
    }
}

/// The members the cluster forms with: the static peers, or this node alone when none are listed.
pub(crate) fn formation_peers(config: &Config) -> BTreeMap<NodeId, MaosNode> {
    if config.cluster.peers.is_empty() {
        return BTreeMap::from([(
            config.node.id,
            MaosNode { raft_addr: config.advertised_raft_addr(), api_addr: config.advertised_api_addr() },
        )]);
    }
    config
        .cluster
        .peers
        .iter()
        .map(|p| (p.id, MaosNode { raft_addr: p.raft_addr.clone(), api_addr: p.api_addr.clone() }))
        .collect()
}

/// `id=raft_addr` for each peer in id order, joined by `,`.
pub(crate) fn peers_digest(peers: &BTreeMap<NodeId, MaosNode>) -> String {
    peers.iter().map(|(id, node)| format!("{id}={}", node.raft_addr)).collect::<Vec<_>>().join(",")
}

/// Whether a new group can be initialised with `peers` now.
pub enum Formation {
    /// Every peer answers, none is in a cluster, all list the same peers.
    Ready,
    /// This node or a peer (`peer`) is in a cluster already.
    Formed { peer: NodeId },
    /// Why not yet; `mismatch` when peers were started with different peer lists.
    NotReady { reason: String, mismatch: bool },
}

/// Ask every peer whether the group can form now.
pub async fn formation_check(core: &NodeCore, peers: &BTreeMap<NodeId, MaosNode>) -> Formation {
    if core.raft.is_initialized().await.unwrap_or(true) {
        return Formation::Formed { peer: core.id };
    }
    for (id, node) in peers.iter().filter(|(id, _)| **id != core.id) {
        match hello(&core.channels, &node.raft_addr, core.id, &core.cluster_name).await {
            Ok(answer) if answer.initialized => return Formation::Formed { peer: *id },
            Ok(answer) if answer.peers_digest != core.peers_digest => {
                let reason = format!(
                    "peer {id} ({}) was started with cluster.peers {}, this node with {}; give every node the same list",
                    node.raft_addr, answer.peers_digest, core.peers_digest
                );
                return Formation::NotReady { reason, mismatch: true };
            }
            Ok(_) => {}
            Err(error) => {
                let reason = format!(
                    "peer {id} at {} does not answer ({error}); start every node listed in cluster.peers",
                    node.raft_addr
                );
                return Formation::NotReady { reason, mismatch: false };
            }
        }
    }
    Formation::Ready
}

/// `cluster.bootstrap: auto`: initialise the group if this node is the lowest-id peer and
/// nobody else has.
pub(crate) async fn form_cluster(
    core: Arc<NodeCore>,
    peers: BTreeMap<NodeId, MaosNode>,
    mut stopped: watch::Receiver<bool>,
) {
    let bootstrapper = peers.keys().next().copied();
    if bootstrapper != Some(core.id) {
        tracing::info!(node_id = core.id, ?bootstrapper, "waiting to be brought into the cluster");
        return;
    }
    let mut mismatch_reported = false;
    loop {
        match formation_check(&core, &peers).await {
            Formation::Formed { peer } => {
                if peer != core.id {
                    tracing::info!(node_id = core.id, peer, "a peer is already in a cluster; not initialising");
                }
                return;
            }
            Formation::Ready => {
                match core.raft.initialize(peers.clone()).await {
                    Ok(()) => {
                        tracing::info!(node_id = core.id, members = ?peers.keys().collect::<Vec<_>>(), "initialised the cluster")
                    }
                    Err(error) => tracing::warn!(node_id = core.id, %error, "initialise failed"),
                }
                return;
            }
            Formation::NotReady { reason, mismatch: true } if !mismatch_reported => {
                tracing::error!(
                    node_id = core.id,
                    %reason,
                    "peers were started with different cluster.peers lists; not initialising until they agree"
                );
                mismatch_reported = true;
            }
            Formation::NotReady { reason, .. } => tracing::debug!(node_id = core.id, %reason, "not initialising yet"),
        }
        tokio::select! {
            _ = tokio::time::sleep(FORMATION_RETRY) => {}
            _ = stopped.wait_for(|stop| *stop) => return,
        }
    }
}
