//! The data directory's identity and the checks made before a node touches it.
//!
//! `node.json` records which cluster (name, and id once known) and which node id a data
//! directory belongs to. A node refuses to start, and writes nothing, when its configuration or
//! its peers disagree with it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::raft::formation::hello;
use crate::raft::network::Channels;

/// The newest `node.json` format this build writes.
pub const IDENTITY_FORMAT_VERSION: u32 = 1;
const IDENTITY_FILE: &str = "node.json";
const RAFT_DIR: &str = "raft";

/// What `node.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataDirIdentity {
    pub format_version: u32,
    pub cluster_name: String,
    /// Empty until this node has applied the cluster's identity.
    #[serde(default)]
    pub cluster_id: String,
    pub node_id: u64,
}

/// Why a node refused to start. Each message says what is wrong and what to do.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("data dir {dir} belongs to node {found}, but this node is configured as node {configured}; use that node's id or an empty data dir")]
    NodeIdMismatch { dir: String, found: u64, configured: u64 },
    #[error("data dir {dir} belongs to cluster {found:?}, but this node is configured for cluster {configured:?}; point node.data_dir at this cluster's data or at an empty directory")]
    ClusterNameMismatch { dir: String, found: String, configured: String },
    #[error("data dir {dir} belongs to cluster id {found}, but peer {peer} ({addr}) is in cluster id {peer_cluster}; this data is from another cluster: point node.data_dir at an empty directory (or this node's own data) and join with `maos cluster add-node`")]
    ClusterIdMismatch { dir: String, found: String, peer: u64, addr: String, peer_cluster: String },
    #[error("peer {addr} belongs to cluster {found:?}, but this node is configured for cluster {configured:?}; fix cluster.name or cluster.peers")]
    PeerClusterName { addr: String, found: String, configured: String },
    #[error("node id {id} is already a member of the cluster at {member_addr} (reported by {addr}), but this node advertises {ours}; choose an unused node.id, or remove the old member first with `maos cluster remove-node {id}`")]
    NodeIdCollision { id: u64, member_addr: String, addr: String, ours: String },
    #[error("peer at {addr} answers as node {answered}, the same id as this node; give each node a unique node.id")]
    PeerHasOurId { addr: String, answered: u64 },
    #[error(
        "data dir {dir} is not empty and has no {IDENTITY_FILE}: it was not written by maos; use an empty directory"
    )]
    Foreign { dir: String },
    #[error("{IDENTITY_FILE} in {dir} is unreadable ({message}); restore it from a backup or use an empty directory")]
    Unreadable { dir: String, message: String },
    #[error("{IDENTITY_FILE} in {dir} has format {found}, newer than this build ({IDENTITY_FORMAT_VERSION}); run a newer maos")]
    NewerFormat { dir: String, found: u32 },
    #[error("cannot prepare data dir {dir}: {source}")]
    Io { dir: String, source: std::io::Error },
}

/// A data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    pub fn new(root: &Path) -> Self {
        Self { root: root.to_path_buf() }
    }

    pub fn raft_path(&self) -> PathBuf {
        self.root.join(RAFT_DIR)
    }

    fn shown(&self) -> String {
        self.root.display().to_string()
    }

    /// Read `node.json`, if the directory has one.
    pub fn identity(&self) -> Result<Option<DataDirIdentity>, Refusal> {
        let path = self.root.join(IDENTITY_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let non_empty = std::fs::read_dir(&self.root).map(|mut d| d.next().is_some()).unwrap_or(false);
                return if non_empty { Err(Refusal::Foreign { dir: self.shown() }) } else { Ok(None) };
            }
            Err(e) => return Err(Refusal::Unreadable { dir: self.shown(), message: e.to_string() }),
        };
        let identity: DataDirIdentity = serde_json::from_str(&text)
            .map_err(|e| Refusal::Unreadable { dir: self.shown(), message: e.to_string() })?;
        if identity.format_version > IDENTITY_FORMAT_VERSION {
            return Err(Refusal::NewerFormat { dir: self.shown(), found: identity.format_version });
        }
        Ok(Some(identity))
    }

    /// Write `node.json` atomically (temporary file, sync, rename).
    pub fn write_identity(&self, identity: &DataDirIdentity) -> Result<(), Refusal> {
        let io = |source| Refusal::Io { dir: self.shown(), source };
        std::fs::create_dir_all(&self.root).map_err(io)?;
        let temporary = self.root.join(format!("{IDENTITY_FILE}.tmp"));
        let bytes = serde_json::to_vec_pretty(identity).map_err(|e| io(std::io::Error::other(e)))?;
        {
            use std::io::Write;
            let mut file = std::fs::File::create(&temporary).map_err(io)?;
            file.write_all(&bytes).map_err(io)?;
            file.sync_all().map_err(io)?;
        }
        std::fs::rename(&temporary, self.root.join(IDENTITY_FILE)).map_err(io)?;
        // Sync the directory so the rename itself survives a crash.
        std::fs::File::open(&self.root).and_then(|dir| dir.sync_all()).map_err(io)
    }
}

/// Check the data directory and the peers against the configuration, before anything is written.
/// Returns the identity to use (existing, or new for an empty directory).
pub async fn preflight(config: &Config, data_dir: &DataDir, channels: &Channels) -> Result<DataDirIdentity, Refusal> {
    let existing = data_dir.identity()?;
    if let Some(identity) = &existing {
        if identity.node_id != config.node.id {
            return Err(Refusal::NodeIdMismatch {
                dir: data_dir.shown(),
                found: identity.node_id,
                configured: config.node.id,
            });
        }
        if identity.cluster_name != config.cluster.name {
            return Err(Refusal::ClusterNameMismatch {
                dir: data_dir.shown(),
                found: identity.cluster_name.clone(),
                configured: config.cluster.name.clone(),
            });
        }
    }
    let ours = config.advertised_raft_addr();
    for peer in config.cluster.peers.iter().filter(|p| p.id != config.node.id) {
        // An unreachable peer proves nothing either way; formation waits for it later.
        let Ok(answer) = hello(channels, &peer.raft_addr, config.node.id, &config.cluster.name).await else {
            continue;
        };
        if answer.cluster_name != config.cluster.name {
            return Err(Refusal::PeerClusterName {
                addr: peer.raft_addr.clone(),
                found: answer.cluster_name,
                configured: config.cluster.name.clone(),
            });
        }
        if answer.node_id == config.node.id {
            return Err(Refusal::PeerHasOurId { addr: peer.raft_addr.clone(), answered: answer.node_id });
        }
        if let Some(identity) = &existing {
            if !identity.cluster_id.is_empty()
                && !answer.cluster_id.is_empty()
                && identity.cluster_id != answer.cluster_id
            {
                return Err(Refusal::ClusterIdMismatch {
                    dir: data_dir.shown(),
                    found: identity.cluster_id.clone(),
                    peer: answer.node_id,
                    addr: peer.raft_addr.clone(),
                    peer_cluster: answer.cluster_id,
                });
            }
        }
        if let Some(member) = answer.members.iter().find(|m| m.id == config.node.id) {
            if member.raft_addr != ours {
                return Err(Refusal::NodeIdCollision {
                    id: config.node.id,
                    member_addr: member.raft_addr.clone(),
                    addr: peer.raft_addr.clone(),
                    ours,
                });
            }
        }
    }
    Ok(existing.unwrap_or(DataDirIdentity {
        format_version: IDENTITY_FORMAT_VERSION,
        cluster_name: config.cluster.name.clone(),
        cluster_id: String::new(),
        node_id: config.node.id,
    }))
}
