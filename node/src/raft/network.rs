//! Raft traffic between nodes over tonic: the client side ([`RaftNetworkFactory`]) and the
//! payload encoding shared with the server side ([`crate::raft::service`]).
//!
//! openraft's request and response types travel as JSON inside a versioned `RaftPayload`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use maos_raft_store::{MaosNode, NodeId, TypeConfig};
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::{Channel, ClientTlsConfig};

use crate::proto::raft_service_client::RaftServiceClient;
use crate::proto::RaftPayload;
use crate::telemetry::peers::PeerWarnings;
use crate::transport::{SharedTransport, MESSAGE_BYTES_MAX};

/// The newest `RaftPayload` format this build writes.
pub const PAYLOAD_FORMAT_VERSION: u32 = 1;

/// Why a payload could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    #[error(
        "payload format {found} is newer than this node understands ({PAYLOAD_FORMAT_VERSION}); upgrade this node"
    )]
    NewerFormat { found: u32 },
    #[error("payload is not valid: {0}")]
    Malformed(#[from] serde_json::Error),
}

pub fn encode<T: Serialize>(value: &T) -> Result<RaftPayload, serde_json::Error> {
    Ok(RaftPayload { format_version: PAYLOAD_FORMAT_VERSION, json: serde_json::to_vec(value)? })
}

pub fn decode<T: DeserializeOwned>(payload: &RaftPayload) -> Result<T, PayloadError> {
    if payload.format_version > PAYLOAD_FORMAT_VERSION {
        return Err(PayloadError::NewerFormat { found: payload.format_version });
    }
    Ok(serde_json::from_slice(&payload.json)?)
}

/// The header that carries the cluster secret on every call to the Raft port.
pub const CLUSTER_SECRET_HEADER: &str = "x-maos-cluster-secret";

/// Adds the cluster secret to each call (nothing without one).
#[derive(Clone, Default)]
pub struct PeerSecret(Option<tonic::metadata::AsciiMetadataValue>);

impl tonic::service::Interceptor for PeerSecret {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(secret) = &self.0 {
            request.metadata_mut().insert(CLUSTER_SECRET_HEADER, secret.clone());
        }
        Ok(request)
    }
}

/// The server side: refuses a call without the cluster secret (when one is configured).
#[derive(Clone, Default)]
pub struct PeerCheck(Option<Arc<[u8]>>);

impl PeerCheck {
    pub fn new(secret: Option<&str>) -> Self {
        Self(secret.map(|s| Arc::from(s.as_bytes())))
    }
}

impl tonic::service::Interceptor for PeerCheck {
    fn call(&mut self, request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let Some(secret) = &self.0 else { return Ok(request) };
        let presented = request.metadata().get(CLUSTER_SECRET_HEADER).map(|v| v.as_bytes()).unwrap_or_default();
        // Constant time in the secret's length: compare digests.
        use sha2::Digest;
        let (want, have) = (sha2::Sha256::digest(secret), sha2::Sha256::digest(presented));
        if want.iter().zip(have.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0 {
            return Ok(request);
        }
        tracing::warn!(
            peer = ?crate::transport::PeerAddr::of(request.extensions()),
            "refused a Raft-port call without the cluster secret (security.cluster_secret_file)"
        );
        Err(tonic::Status::unauthenticated(
            "the Raft port is for cluster members: this call lacks the cluster secret (security.cluster_secret_file must be the same on every node)",
        ))
    }
}

type RaftClient = RaftServiceClient<tonic::service::interceptor::InterceptedService<Channel, PeerSecret>>;

/// Caches one lazily connecting channel per peer address.
#[derive(Clone)]
pub struct Channels {
    transport: SharedTransport,
    by_addr: Arc<Mutex<BTreeMap<String, Channel>>>,
    /// Rate-limited warnings about peers that do not answer.
    pub warnings: Arc<PeerWarnings>,
    secret: PeerSecret,
    /// Mutual TLS to peers (`security.peer_tls`): new channels use the one set last.
    tls: Arc<Mutex<Option<ClientTlsConfig>>>,
}

impl Channels {
    pub fn new(transport: SharedTransport) -> Self {
        Self {
            transport,
            by_addr: Arc::new(Mutex::new(BTreeMap::new())),
            warnings: Arc::default(),
            secret: PeerSecret::default(),
            tls: Arc::default(),
        }
    }

    /// Call peers over mutual TLS with `tls` (every clone of these channels does).
    pub fn with_tls(self, tls: Option<ClientTlsConfig>) -> Self {
        *self.tls.lock().unwrap_or_else(|p| p.into_inner()) = tls;
        self
    }

    /// Use `tls` from the next call on (certificates read again): the channels made with the
    /// old files are dropped, so each peer is dialled again; calls under way finish on theirs.
    pub fn replace_tls(&self, tls: ClientTlsConfig) {
        let mut by_addr = self.by_addr.lock().unwrap_or_else(|p| p.into_inner());
        *self.tls.lock().unwrap_or_else(|p| p.into_inner()) = Some(tls);
        by_addr.clear();
    }

    /// Send `secret` (the cluster secret) with every call.
    pub fn with_secret(mut self, secret: Option<&str>) -> Result<Self, String> {
        self.secret = PeerSecret(
            secret
                .map(|s| s.parse().map_err(|_| "the cluster secret must be printable ASCII".to_string()))
                .transpose()?,
        );
        Ok(self)
    }

    /// The channel to `addr`, made on first use.
    pub fn get(&self, addr: &str) -> Result<Channel, tonic::transport::Error> {
        let mut by_addr = self.by_addr.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(channel) = by_addr.get(addr) {
            return Ok(channel.clone());
        }
        let tls = self.tls.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let channel = self.transport.channel(addr, tls)?;
        by_addr.insert(addr.to_string(), channel.clone());
        Ok(channel)
    }

    /// A Raft-port client for `addr`.
    pub fn raft_client(&self, addr: &str) -> Result<RaftClient, tonic::transport::Error> {
        Ok(RaftServiceClient::with_interceptor(self.get(addr)?, self.secret.clone())
            .max_decoding_message_size(MESSAGE_BYTES_MAX)
            .max_encoding_message_size(MESSAGE_BYTES_MAX))
    }
}

/// Makes a [`PeerClient`] per target for openraft.
#[derive(Clone)]
pub struct NetworkFactory {
    pub channels: Channels,
    /// How long replication to an unreachable peer waits between attempts (the heartbeat
    /// interval): openraft's default of 500 ms let a restarted node go unheard for so long that
    /// its election timer ran out and its vote deposed the leader.
    pub backoff: std::time::Duration,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &MaosNode) -> Self::Network {
        PeerClient { target, addr: node.raft_addr.clone(), channels: self.channels.clone(), backoff: self.backoff }
    }
}

/// Raft RPCs to one peer.
pub struct PeerClient {
    target: NodeId,
    addr: String,
    channels: Channels,
    backoff: std::time::Duration,
}

type RpcResult<T, E> = Result<T, RPCError<NodeId, MaosNode, RaftError<NodeId, E>>>;

impl PeerClient {
    async fn call<Req, Resp, E>(&self, rpc: &'static str, request: &Req, option: &RPCOption) -> RpcResult<Resp, E>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let payload = encode(request).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let warnings = &self.channels.warnings;
        let mut client = self.channels.raft_client(&self.addr).map_err(|e| {
            warnings.failed(self.target, &self.addr, rpc, &e);
            RPCError::Unreachable(Unreachable::new(&e))
        })?;
        let mut grpc_request = tonic::Request::new(payload);
        grpc_request.set_timeout(option.hard_ttl());
        // The grpc-timeout header only tells the server; the deadline is enforced here.
        let response = tokio::time::timeout(option.hard_ttl(), async {
            match rpc {
                "append_entries" => client.append_entries(grpc_request).await,
                "vote" => client.vote(grpc_request).await,
                _ => client.install_snapshot(grpc_request).await,
            }
        })
        .await;
        let reply = match response {
            Err(elapsed) => {
                warnings.failed(self.target, &self.addr, rpc, &elapsed);
                return Err(RPCError::Network(NetworkError::new(&elapsed)));
            }
            Ok(Ok(reply)) => {
                warnings.answered(self.target);
                reply.into_inner()
            }
            Ok(Err(status)) if status.code() == tonic::Code::Unavailable => {
                warnings.failed(self.target, &self.addr, rpc, &status);
                return Err(RPCError::Unreachable(Unreachable::new(&status)));
            }
            Ok(Err(status)) => return Err(RPCError::Network(NetworkError::new(&status))),
        };
        let result: Result<Resp, RaftError<NodeId, E>> =
            decode(&reply).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>, openraft::error::Infallible> {
        self.call("append_entries", &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        self.call("install_snapshot", &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>, openraft::error::Infallible> {
        self.call("vote", &rpc, &option).await
    }

    fn backoff(&self) -> openraft::network::Backoff {
        openraft::network::Backoff::new(std::iter::repeat(self.backoff))
    }
}
