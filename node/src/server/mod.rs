//! Starting a node: the composition root, and the only module that wires every layer together.
//!
//! [`start`] builds Raft over any log store, state machine and transport, the task-data store,
//! the agent runtime, the leader's loops and both servers (API on 8000, Raft on 7000).
//! [`serve`] runs it on RocksDB for `maos serve`; `data_dir.rs` checks the data directory first.

use std::sync::Arc;
use std::time::Duration;

use maos_raft_store::sm_store::SnapshotPersistence;
use maos_raft_store::{MaosNode, Raft, StateMachineStore, TypeConfig};
use openraft::storage::RaftLogStorage;
use openraft::SnapshotPolicy;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::agents::credential::Credentials;
use crate::agents::keeper::Keeper;
/// The fence keeper a node starts beside its command agents, as `maos agent-keeper`.
pub use crate::agents::keeper::{serve as serve_fence_keeper, SUBCOMMAND as FENCE_KEEPER_SUBCOMMAND};
use crate::agents::{backends, AgentMetrics, AgentRuntime};
use crate::api::agents::AgentApi;
use crate::api::auth::{authorize, Authorizer};
use crate::api::auth_service::AuthApi;
use crate::api::cluster::ClusterApi;
use crate::api::kv::KvApi;
use crate::api::tasks::TaskApi;
use crate::api::workers::WorkerApi;
use crate::config::{Bootstrap, Config};
use crate::proto::raft_service_server::RaftServiceServer;
use crate::raft::clock::ClockBound;
use crate::raft::core::NodeCore;
use crate::raft::formation::{form_cluster, formation_peers, peers_digest};
use crate::raft::housekeeping::{evict_finished, housekeeping, MirrorProgress, HOUSEKEEPING_INTERVAL};
use crate::raft::network::{Channels, NetworkFactory};
use crate::raft::proposer::{cluster_clock, forwarder, leader_proposer, ProposalHold};
use crate::raft::service::RaftServer;
use crate::scheduling::leader_loop;
use crate::storage::Storage;
use crate::transport::{SharedTransport, MESSAGE_BYTES_MAX};
use maos_client::proto::v1::agent_service_server::AgentServiceServer;
use maos_client::proto::v1::auth_service_server::AuthServiceServer;
use maos_client::proto::v1::cluster_service_server::ClusterServiceServer;
use maos_client::proto::v1::kv_service_server::KvServiceServer;
use maos_client::proto::v1::task_service_server::TaskServiceServer;
use maos_client::proto::v1::worker_service_server::WorkerServiceServer;

mod data_dir;
mod observe;
mod serve;
pub mod tls;

pub use crate::raft::proposer::{system_clock, Clock};
pub use crate::raft::{probe_raft_port, RaftPortProbe};
pub use data_dir::{preflight, DataDir};
pub use serve::serve;

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid Raft settings: {0}")]
    RaftConfig(#[from] openraft::ConfigError),
    #[error("Raft could not start: {0}")]
    Raft(String),
    #[error("agent pool: {0}")]
    Agents(#[from] crate::agents::RuntimeError),
    #[error("task-data store: {0}")]
    Storage(#[from] crate::storage::StorageError),
    #[error("{0}")]
    Security(String),
    #[error("cannot listen on {addr} ({what}): {error}; is another process using the port?")]
    Listen { addr: String, what: &'static str, error: std::io::Error },
}

/// A started node. Dropping it does not stop it; call [`RunningNode::shutdown`].
pub struct RunningNode {
    pub core: Arc<NodeCore>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl RunningNode {
    /// Stop Raft, the servers and the node's loops, within `grace` (`system.shutdown_grace`).
    ///
    /// Graceful first: every loop and server is told to stop, Raft shuts down and the servers
    /// drain. A graceful HTTP/2 stop waits for clients to close their connections and streams,
    /// which a client that holds a connection open (a health watch, a connection that never sent
    /// its preface, a frozen peer) never does; so when `grace` runs out whatever still runs is
    /// aborted, which drops the servers with their connections, and the stop returns.
    pub async fn shutdown(mut self, grace: Duration) {
        let started = tokio::time::Instant::now();
        let node_id = self.core.id;
        let _ = self.stop.send(true);
        let core = self.core.clone();
        let tasks = &mut self.tasks;
        let graceful = async move {
            if let Err(error) = core.raft.shutdown().await {
                tracing::warn!(node_id, %error, "Raft did not stop cleanly");
            }
            while tasks.join_next().await.is_some() {}
        };
        if tokio::time::timeout(grace, graceful).await.is_ok() {
            tracing::info!(node_id, elapsed_ms = started.elapsed().as_millis() as u64, "stopped gracefully");
            return;
        }
        tracing::warn!(
            node_id,
            grace_ms = grace.as_millis() as u64,
            still_running = self.tasks.len(),
            "the graceful stop did not finish within system.shutdown_grace; dropping the servers, their connections and the node's loops"
        );
        self.tasks.abort_all();
        // Aborted tasks end at their next poll; a task stuck outside the runtime's reach is left
        // to the process's exit.
        let aborted = tokio::time::timeout(ABORT_WAIT, async { while self.tasks.join_next().await.is_some() {} });
        if aborted.await.is_err() {
            tracing::warn!(
                node_id,
                still_running = self.tasks.len(),
                "some tasks did not end when aborted; exiting anyway"
            );
        }
        tracing::info!(node_id, elapsed_ms = started.elapsed().as_millis() as u64, "stopped by force");
    }
}

/// How long a forced stop waits for aborted tasks to end.
const ABORT_WAIT: Duration = Duration::from_millis(500);

/// openraft settings from the node configuration.
#[allow(clippy::result_large_err)] // openraft's own error type, returned once at start
pub fn raft_config(config: &Config) -> Result<openraft::Config, openraft::ConfigError> {
    let raft = &config.raft;
    openraft::Config {
        cluster_name: config.cluster.name.clone(),
        heartbeat_interval: raft.heartbeat_interval_ms,
        election_timeout_min: raft.election_timeout_min_ms,
        election_timeout_max: raft.election_timeout_max_ms,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(raft.snapshot_after_logs),
        max_in_snapshot_log_to_keep: raft.logs_kept_after_snapshot,
        max_payload_entries: raft.max_payload_entries,
        install_snapshot_timeout: raft.request_timeout_ms,
        ..Default::default()
    }
    .validate()
}

/// Start a node over `log` and `state_machine`, serving on `transport`.
fn spawn_in(
    tasks: &mut JoinSet<()>,
    span: &tracing::Span,
    work: impl std::future::Future<Output = ()> + Send + 'static,
) {
    tasks.spawn(tracing::Instrument::instrument(work, span.clone()));
}

/// The node's channels to its peers, and the cluster secret they send with every call: over
/// mutual TLS when `security.peer_tls` is set. The error names the key at fault.
pub(crate) fn peer_channels(config: &Config, transport: SharedTransport) -> Result<(Channels, Option<String>), String> {
    let secret = config.cluster_secret().map_err(|e| format!("security.cluster_secret_file: {e}"))?;
    let tls = match config.security.peer_tls.enabled() {
        true => Some(tls::peer_client(&config.security.peer_tls)?),
        false => None,
    };
    Ok((Channels::new(transport).with_secret(secret.as_deref())?.with_tls(tls), secret))
}

pub async fn start<LS, P>(
    config: &Config,
    log: LS,
    state_machine: StateMachineStore<P>,
    transport: SharedTransport,
    clock: Clock,
) -> Result<RunningNode, StartError>
where
    LS: RaftLogStorage<TypeConfig>,
    P: SnapshotPersistence,
{
    // The process's metrics recorder, before anything records (a second node in this process
    // shares it: see `telemetry::metrics`). With `metrics.enabled: false` none: every record is
    // a no-op and `/metrics` says so.
    if config.metrics.enabled {
        crate::telemetry::metrics::install();
    }
    let raft_settings = Arc::new(raft_config(config)?);
    let keeper = Keeper::for_config(config);
    let agent_backends = backends(config, keeper.clone())?;
    let storage = Arc::new(Storage::from_config(config)?);
    let peers = formation_peers(config);
    let (channels, secret) = peer_channels(config, transport.clone()).map_err(StartError::Security)?;
    let peer_tls = config.security.peer_tls.enabled();
    if secret.is_none() && !peer_tls && !crate::config::is_loopback(&config.network.raft_listen_addr) {
        tracing::warn!(
            raft = %config.network.raft_listen_addr,
            "the Raft port listens beyond loopback without security.cluster_secret_file: anyone who reaches it can send Raft traffic; set a cluster secret (docs/SECURITY.md)"
        );
    }
    // Where the log ended as this run opened it: the agent runtime tells its earlier run's leases
    // by it (an index, not a time, so a clock that is off cannot mislead it).
    let mut log = log;
    let log_end_at_start = log
        .get_log_state()
        .await
        .map_err(|e| StartError::Raft(format!("reading the log's state: {e}")))?
        .last_log_id
        .map_or(0, |id| id.index + 1);
    let state = state_machine.handle();
    let backoff = Duration::from_millis(config.raft.heartbeat_interval_ms);
    let network = NetworkFactory { channels: channels.clone(), backoff };
    let raft = Raft::new(config.node.id, raft_settings, network, log, observe::TimedStateMachine(state_machine))
        .await
        .map_err(|e| StartError::Raft(e.to_string()))?;
    // Cluster time: the wall clock moved into what a quorum's clocks agree on (raft::clock).
    let clock_bound = Arc::new(match config.raft.clock_skew_max_ms {
        0 => ClockBound::off(),
        max => ClockBound::new(max),
    });
    let wall_clock = clock;
    let clock = cluster_clock(wall_clock.clone(), clock_bound.clone());
    let proposal_hold = Arc::new(ProposalHold::default());
    let proposer =
        leader_proposer(raft.clone(), clock.clone(), clock_bound.clone(), state.clone(), proposal_hold.clone());
    let forwarder = forwarder(channels.clone(), Duration::from_millis(config.raft.request_timeout_ms));
    let core = Arc::new(NodeCore {
        id: config.node.id,
        cluster_name: config.cluster.name.clone(),
        raft,
        state,
        channels,
        clock,
        wall_clock: wall_clock.clone(),
        clock_bound,
        proposer,
        proposal_hold,
        forwarder,
        request_timeout: Duration::from_millis(config.raft.request_timeout_ms),
        peers_digest: peers_digest(&peers),
        session: Default::default(),
        session_ttl: Duration::from_millis(config.raft.session_ttl_ms),
        session_opening: Default::default(),
        leader_contact: Default::default(),
    });
    let (stop, stopped) = watch::channel(false);
    let mut tasks = JoinSet::new();
    // Every task of this node runs in its span, so each log line carries `node_id`.
    let node_span = tracing::info_span!("node", node_id = config.node.id);
    spawn_in(&mut tasks, &node_span, observe::count_leader_changes(core.raft.metrics(), stopped.clone()));
    let leader_watch = crate::raft::leader_watch::run(core.clone(), transport.clone(), stopped.clone());
    spawn_in(&mut tasks, &node_span, leader_watch);

    let raft_incoming = transport
        .listen(&config.network.raft_listen_addr)
        .await
        .map_err(|error| StartError::Listen { addr: config.network.raft_listen_addr.clone(), what: "Raft", error })?;
    let api_incoming = transport.listen(&config.network.listen_addr).await.map_err(|error| StartError::Listen {
        addr: config.network.listen_addr.clone(),
        what: "client API",
        error,
    })?;
    // TLS on the API port (and the dashboard's) when configured: every connection's handshake
    // before tonic sees it.
    let api_tls = match config.security.tls.enabled() {
        false => None,
        true => {
            let tls = Arc::new(tls::ServerTls::load(&config.security.tls).map_err(StartError::Security)?);
            spawn_in(&mut tasks, &node_span, tls::watch_files(tls.clone(), || Ok(()), stopped.clone()));
            Some(tls)
        }
    };
    let api_incoming = match &api_tls {
        None => api_incoming,
        Some(tls) => tls.clone().wrap(api_incoming),
    };
    // Mutual TLS on the Raft port: a peer without a certificate from the members' CA gets no
    // further than the handshake. A reload renews the client side too.
    let raft_incoming = match peer_tls {
        false => raft_incoming,
        true => {
            let tls = Arc::new(tls::ServerTls::for_peers(&config.security.peer_tls).map_err(StartError::Security)?);
            let (files, peer_channels) = (config.security.peer_tls.clone(), core.channels.clone());
            let renew_client = move || tls::peer_client(&files).map(|client| peer_channels.replace_tls(client));
            spawn_in(&mut tasks, &node_span, tls::watch_files(tls.clone(), renew_client, stopped.clone()));
            tls.wrap(raft_incoming)
        }
    };

    let membership = Arc::new(crate::raft::membership::Membership::new(core.clone()));
    spawn_in(&mut tasks, &node_span, membership.clone().track_leadership(stopped.clone()));
    if config.raft.clock_skew_max_ms > 0 {
        let formation = peers.iter().map(|(id, node)| (*id, node.raft_addr.clone())).collect();
        let measure = crate::raft::clock_watch::measure(core.clone(), wall_clock, formation, stopped.clone());
        spawn_in(&mut tasks, &node_span, measure);
        spawn_in(&mut tasks, &node_span, membership.clone().hand_off_when_skewed(stopped.clone()));
    }
    let raft_service = RaftServiceServer::new(RaftServer { core: core.clone(), membership: membership.clone() })
        .max_decoding_message_size(MESSAGE_BYTES_MAX)
        .max_encoding_message_size(MESSAGE_BYTES_MAX);
    // Members only: every call carries the cluster secret when one is configured.
    let raft_service = tonic::service::interceptor::InterceptedService::new(
        raft_service,
        crate::raft::network::PeerCheck::new(secret.as_deref()),
    );
    let mut until_stopped = stopped.clone();
    spawn_in(&mut tasks, &node_span, async move {
        let result = tonic::transport::Server::builder()
            .add_service(raft_service)
            .serve_with_incoming_shutdown(raft_incoming, async move {
                let _ = until_stopped.wait_for(|stop| *stop).await;
            })
            .await;
        if let Err(error) = result {
            tracing::error!(%error, "the Raft server stopped");
        }
    });

    let mut until_stopped = stopped.clone();
    let credentials = Arc::new(Credentials::for_cluster(core.state.clone()));
    let agent_metrics = Arc::new(AgentMetrics::default());
    let streams = Arc::new(tokio::sync::Semaphore::new(crate::api::streams::STREAMS_MAX));
    let kv = KvServiceServer::new(KvApi {
        core: core.clone(),
        storage: storage.clone(),
        credentials: credentials.clone(),
        streams: streams.clone(),
    });
    let cluster_api =
        Arc::new(ClusterApi { core: core.clone(), formation_peers: peers.clone(), membership: membership.clone() });
    let cluster = ClusterServiceServer::from_arc(cluster_api.clone());
    let planner_type = config.task_planner.planner_type.clone();
    let task_api = Arc::new(TaskApi {
        core: core.clone(),
        storage: storage.clone(),
        planner_type,
        accept_unserved_types: config.scheduler.accept_unserved_types,
        streams: streams.clone(),
    });
    let tasks_service = TaskServiceServer::from_arc(task_api.clone());
    let agent_api = Arc::new(AgentApi { core: core.clone(), config: config.clone() });
    let agents_service = AgentServiceServer::from_arc(agent_api.clone());
    let rest = crate::api::rest::router(crate::api::rest::Services {
        tasks: task_api,
        agents: agent_api,
        cluster: cluster_api,
    });
    let workers_service = WorkerServiceServer::new(WorkerApi {
        core: core.clone(),
        storage: storage.clone(),
        config: config.clone(),
        stopped: stopped.clone(),
        streams,
    });
    // The standard gRPC health service (SERVING while ready, as `/ready`) and server reflection.
    let (health, health_service) = tonic_health::server::health_reporter();
    spawn_in(
        &mut tasks,
        &node_span,
        report_health(core.clone(), agent_metrics.clone(), storage.clone(), health, stopped.clone()),
    );
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(maos_client::proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| StartError::Raft(format!("the reflection service could not be built: {e}")))?;
    // One port for gRPC and plain HTTP (`/health`, `/ready`, `/metrics`).
    let routes = tonic::service::Routes::from(
        crate::api::http::router(
            core.clone(),
            agent_metrics.clone(),
            storage.clone(),
            crate::api::http::insecure_warning(config),
        )
        .merge(rest)
        .layer(axum::middleware::from_fn(observe::record_http)),
    )
    .add_service(kv)
    .add_service(cluster)
    .add_service(tasks_service)
    .add_service(agents_service)
    .add_service(workers_service)
    .add_service(health_service)
    .add_service(reflection)
    .add_service(AuthServiceServer::new(AuthApi {
        core: core.clone(),
        storage: storage.clone(),
        enabled: config.security.auth.enabled,
    }));
    // One auth layer in front of every gRPC method and HTTP route (api/auth.rs).
    let jwt = crate::api::jwt::JwtIssuers::new(&config.security.jwt.issuers)
        .map_err(|(key, error)| StartError::Security(format!("{key}: {error}")))?;
    let jwt = Arc::new(jwt);
    spawn_in(&mut tasks, &node_span, jwt.clone().refresh(stopped.clone()));
    let authorizer = Arc::new(Authorizer {
        core: core.clone(),
        credentials: credentials.clone(),
        storage: storage.clone(),
        enabled: config.security.auth.enabled,
        rate: crate::api::limits::RateLimiter::new(&config.security.rate_limit),
        in_flight: crate::api::limits::InFlight::new(config.network.max_concurrent_requests),
        jwt,
        cert_principals: config.security.tls.client_principals.clone(),
    });
    // Inside the auth layer: a request is on its caller's session only once it is authorised.
    let routes = routes
        .into_axum_router()
        .layer(axum::middleware::from_fn(crate::api::sessions::caller_session))
        .layer(axum::middleware::from_fn_with_state(authorizer.clone(), authorize));
    // Outermost, so a refused call is in its trace too.
    let routes = match crate::telemetry::traces::enabled() {
        true => routes.layer(axum::middleware::from_fn(observe::trace_request)),
        false => routes,
    };
    let routes = tonic::service::Routes::from(routes);
    let api_limits = config.network.clone();
    spawn_in(&mut tasks, &node_span, async move {
        let result = tonic::transport::Server::builder()
            .accept_http1(true)
            .max_concurrent_streams(api_limits.max_streams_per_connection)
            .timeout(Duration::from_millis(api_limits.request_timeout_ms))
            .layer(observe::GrpcMetricsLayer)
            .add_routes(routes)
            .serve_with_incoming_shutdown(api_incoming, async move {
                let _ = until_stopped.wait_for(|stop| *stop).await;
            })
            .await;
        if let Err(error) = result {
            tracing::error!(%error, "the API server stopped");
        }
    });

    if config.dashboard.enabled {
        let dashboard_incoming = transport
            .listen(&config.dashboard.listen)
            .await
            .map_err(|error| StartError::Listen { addr: config.dashboard.listen.clone(), what: "dashboard", error })?;
        let dashboard_incoming = match &api_tls {
            None => dashboard_incoming,
            Some(tls) => tls.clone().wrap(dashboard_incoming),
        };
        let gate = config
            .security
            .auth
            .enabled
            .then(|| crate::dashboard::login::Gate { authorizer: authorizer.clone(), secure: api_tls.is_some() });
        let recorder = Arc::new(crate::dashboard::recorder::Recorder::new());
        tasks.spawn(recorder.clone().run(core.clone(), stopped.clone()));
        let dashboard = crate::dashboard::router(Arc::new(crate::dashboard::Dashboard {
            core: core.clone(),
            storage: storage.clone(),
            recorder,
            streams: Arc::new(tokio::sync::Semaphore::new(crate::dashboard::SSE_STREAMS_MAX)),
            stopped: stopped.clone(),
            gate,
        }));
        let mut until_stopped = stopped.clone();
        tasks.spawn(async move {
            let result = tonic::transport::Server::builder()
                .accept_http1(true)
                .add_routes(tonic::service::Routes::from(dashboard))
                .serve_with_incoming_shutdown(dashboard_incoming, async move {
                    let _ = until_stopped.wait_for(|stop| *stop).await;
                })
                .await;
            if let Err(error) = result {
                tracing::error!(%error, "the dashboard server stopped");
            }
        });
    }

    match config.cluster.bootstrap {
        Bootstrap::Auto => {
            spawn_in(&mut tasks, &node_span, form_cluster(core.clone(), peers, stopped.clone()));
        }
        Bootstrap::Manual => {
            tracing::info!(node_id = core.id, "cluster.bootstrap is manual: a new cluster forms on `maos cluster init`")
        }
    }
    spawn_in(&mut tasks, &node_span, leader_loop(core.clone(), config.clone(), stopped.clone()));
    if let (Some(store), true) = (storage.postgres(), config.database.auto_migrate) {
        spawn_in(&mut tasks, &node_span, migrate_until_done(store.name.clone(), storage.clone(), stopped.clone()));
    }
    // With PostgreSQL, finished tasks are evicted only once the mirror holds their final state.
    let mirror = storage.postgres().map(|_| Arc::new(MirrorProgress::default()));
    spawn_in(
        &mut tasks,
        &node_span,
        crate::storage::projector::run(
            core.clone(),
            storage.clone(),
            Duration::from_secs(config.database.orphan_after),
            mirror.clone(),
            stopped.clone(),
        ),
    );
    spawn_in(&mut tasks, &node_span, evict_finished(core.clone(), mirror, stopped.clone()));
    let runtime = AgentRuntime {
        core: core.clone(),
        storage,
        config: config.clone(),
        backends: agent_backends,
        credentials,
        metrics: agent_metrics,
        log_end_at_start,
        keeper,
    };
    spawn_in(&mut tasks, &node_span, runtime.run(stopped.clone()));
    spawn_in(
        &mut tasks,
        &node_span,
        housekeeping(
            core.clone(),
            MaosNode { raft_addr: config.advertised_raft_addr(), api_addr: config.advertised_api_addr() },
            config.security.auth.enabled.then(|| config.node.data_dir.clone()),
            stopped,
        ),
    );
    Ok(RunningNode { core, stop, tasks })
}

/// Apply pending migrations, retrying while PostgreSQL is down (submits fail with UNAVAILABLE,
/// naming the missing schema, until this is done).
async fn migrate_until_done(database: String, storage: Arc<Storage>, mut stopped: watch::Receiver<bool>) {
    let Some(store) = storage.postgres() else { return };
    let mut backoff = Duration::from_millis(200);
    loop {
        match store.migrate().await {
            Ok(()) => {
                tracing::info!(%database, "the task-data schema is current");
                return;
            }
            Err(error) => tracing::warn!(%database, %error, "migrating the task-data schema failed; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stopped.wait_for(|stop| *stop) => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// The gRPC services whose health is reported (with "" for the server as a whole).
const HEALTH_SERVICES: [&str; 6] = [
    "",
    "maos.v1.TaskService",
    "maos.v1.AgentService",
    "maos.v1.WorkerService",
    "maos.v1.ClusterService",
    "maos.v1.KvService",
];

/// Keep the gRPC health service in step with readiness (`api::http::readiness`, as `/ready`):
/// SERVING while ready, NOT_SERVING otherwise.
async fn report_health(
    core: Arc<NodeCore>,
    agents: Arc<AgentMetrics>,
    storage: Arc<Storage>,
    reporter: tonic_health::server::HealthReporter,
    mut stopped: watch::Receiver<bool>,
) {
    // Checked every housekeeping interval, not on every applied entry (a membership read per write).
    // The conditions of `/ready`.
    let mut reported = None;
    loop {
        let ready = crate::api::http::readiness(&core, &agents, &storage).await.is_ok();
        if reported != Some(ready) {
            let status =
                if ready { tonic_health::ServingStatus::Serving } else { tonic_health::ServingStatus::NotServing };
            for service in HEALTH_SERVICES {
                reporter.set_service_status(service, status).await;
            }
            reported = Some(ready);
        }
        tokio::select! {
            _ = tokio::time::sleep(HOUSEKEEPING_INTERVAL) => {}
            _ = stopped.wait_for(|stop| *stop) => return,
        }
    }
}
