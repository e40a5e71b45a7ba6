//! The configuration's schema: every section and key with its default, and helpers that read
//! it (`task_limits`, advertised addresses, peer lists, sizes). Loading is `load.rs`, checking is
//! `validate.rs`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize};

use super::security::{read_cluster_secret, SecuritySection};

/// Upper bound on the number of static peers.
pub const PEERS_MAX: usize = 64;

/// The whole configuration of a node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub node: NodeSection,
    pub cluster: ClusterSection,
    pub network: NetworkSection,
    pub raft: RaftSection,
    pub scheduler: SchedulerSection,
    pub agents: AgentsSection,
    pub task_planner: TaskPlannerSection,
    pub tasks: TasksSection,
    pub system: SystemSection,
    pub database: DatabaseSection,
    pub redis: RedisSection,
    pub dashboard: DashboardSection,
    pub security: SecuritySection,
    pub tracing: TracingSection,
    pub metrics: MetricsSection,
}

impl Config {
    /// The cluster secret from `security.cluster_secret_file`, if one is configured.
    pub fn cluster_secret(&self) -> Result<Option<String>, String> {
        self.security.cluster_secret_file.as_deref().map(read_cluster_secret).transpose()
    }
}

/// Whether `addr` (host:port) can be reached only from this machine.
pub fn is_loopback(addr: &str) -> bool {
    let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The dashboard: read-only HTML pages with live updates, served by every node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DashboardSection {
    /// Serve the dashboard (`false` turns it off; the port is then not opened).
    pub enabled: bool,
    /// The dashboard's listen address (the operators' guide routes port 3001 to it).
    pub listen: String,
}

impl Default for DashboardSection {
    fn default() -> Self {
        Self { enabled: true, listen: "0.0.0.0:3001".into() }
    }
}

/// Prometheus metrics on `/metrics` (`docs/METRICS.md`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSection {
    /// Record metrics and serve them on `/metrics` (on by default). `false` installs no
    /// recorder, so nothing is counted, and `/metrics` answers 404 naming this key.
    pub enabled: bool,
}

impl Default for MetricsSection {
    fn default() -> Self {
        Self { enabled: true }
    }
}

/// Distributed tracing: OpenTelemetry spans exported over OTLP/gRPC (`docs/OPERATIONS.md`,
/// "Tracing").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TracingSection {
    /// Export spans (off by default: nothing is recorded or sent).
    pub enabled: bool,
    /// The collector's OTLP/gRPC endpoint, `http://host:4317` (`https://` for TLS, checked
    /// against `security.tls.ca_file` when set, else the web roots).
    pub otlp_endpoint: String,
    /// Share of new traces recorded, 0.0..=1.0; a caller's trace is followed as it was sampled.
    pub sample_ratio: f64,
    /// `service.name` of this node's spans (`service.instance.id` is the node id).
    pub service_name: String,
    /// The operators' guide's Jaeger agent keys: refused, naming their OTLP replacements.
    #[serde(default, skip_serializing)]
    pub jaeger: Option<serde_yaml::Value>,
}

impl Default for TracingSection {
    fn default() -> Self {
        Self {
            enabled: false,
            otlp_endpoint: "http://127.0.0.1:4317".into(),
            sample_ratio: 1.0,
            service_name: "maos".into(),
            jaeger: None,
        }
    }
}

/// Where task data (inputs, results, checkpoints, the event history, the audit log) lives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseSection {
    /// `postgresql://user:password@host:5432/maos`. Unset: the embedded default (task data in the
    /// replicated state, size-limited; no outside service).
    pub primary_url: Option<String>,
    /// Connections this node keeps open at most.
    pub pool_size: u32,
    /// Seconds a request waits for a connection before it fails with UNAVAILABLE. Short, so
    /// submits fail fast while the database is down.
    pub pool_timeout: u64,
    /// Seconds a connection lives before it is replaced.
    pub pool_recycle: u64,
    /// Apply pending migrations when the node starts (else run `maos db migrate`).
    pub auto_migrate: bool,
    /// The largest input, result or checkpoint stored, in bytes.
    pub payload_bytes_max: usize,
    /// Seconds after which a staged input no committed task refers to is removed.
    pub orphan_after: u64,
}

impl Default for DatabaseSection {
    fn default() -> Self {
        Self {
            primary_url: None,
            pool_size: 10,
            pool_timeout: 2,
            pool_recycle: 3_600,
            auto_migrate: true,
            payload_bytes_max: 1024 * 1024,
            orphan_after: 600,
        }
    }
}

/// The optional Redis cache in front of the task-data store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisSection {
    /// `redis://[:password@]host:6379/0`. Unset: no cache; reads go to the store.
    pub url: Option<String>,
    /// Multiplexed connections this node keeps, used in turn.
    pub pool_size: usize,
    /// Seconds a cached payload lives.
    pub cache_ttl: u64,
    /// Milliseconds a Redis command (or connect) may take before the read goes to the store.
    pub response_timeout_ms: u64,
}

impl Default for RedisSection {
    fn default() -> Self {
        Self { url: None, pool_size: 4, cache_ttl: 300, response_timeout_ms: 250 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TaskPlannerSection {
    /// Children of one parent running at once, at most.
    pub max_parallel_branches: usize,
    /// Seconds a task may wait on its dependencies before it fails.
    pub dependency_timeout: u64,
    /// A plan with fewer subtasks than this is not parallelised: its subtasks run one after another.
    pub parallelization_threshold: usize,
    /// The agent type that plans tasks submitted for planning.
    pub planner_type: String,
}

impl Default for TaskPlannerSection {
    fn default() -> Self {
        Self {
            max_parallel_branches: 10,
            dependency_timeout: 3_600,
            parallelization_threshold: 2,
            planner_type: "coordinator".into(),
        }
    }
}

/// How long finished tasks stay in the replicated state (with PostgreSQL their record, history
/// and result stay there after), and how long an idempotency key outlives its task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TasksSection {
    /// Seconds a finished (COMPLETED, FAILED, CANCELLED) task stays in the replicated state.
    pub retention: u64,
    /// Finished tasks the replicated state holds at most; past it the oldest leave early.
    pub retained_max: usize,
    /// Seconds after a task finished that its idempotency key still answers a resubmit with
    /// that task (at least `retention`); a resubmit after it creates a new task.
    pub idempotency_window: u64,
}

/// Bounds of the `tasks` section's keys.
pub const RETENTION_SECONDS_MAX: u64 = 30 * 24 * 3_600;
pub const RETAINED_MAX_MAX: usize = 10_000_000;
pub const IDEMPOTENCY_WINDOW_SECONDS_MAX: u64 = 90 * 24 * 3_600;

impl Default for TasksSection {
    fn default() -> Self {
        Self { retention: 86_400, retained_max: 100_000, idempotency_window: 86_400 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerSection {
    /// How long a lease lasts without a renewal.
    pub lease_ms: u64,
    /// How often a node renews all its leases in one command.
    pub lease_renew_interval_ms: u64,
    /// How often the leader plans assignments and expires leases.
    pub interval_ms: u64,
    /// Assignments proposed per round, at most.
    pub assignments_max: usize,
    /// Accept tasks of a type no agent serves yet (workers that connect later); by default such
    /// a submit is refused, naming the types that are served.
    pub accept_unserved_types: bool,
}

impl Default for SchedulerSection {
    fn default() -> Self {
        Self {
            lease_ms: 10_000,
            lease_renew_interval_ms: 2_000,
            interval_ms: 100,
            assignments_max: 1_000,
            accept_unserved_types: false,
        }
    }
}

/// This node's agent pool: its agent types, their backends and limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentsSection {
    pub defaults: AgentDefaults,
    /// Agent types this node runs, by name.
    pub types: BTreeMap<String, AgentTypeConfig>,
    pub claude: ClaudeSection,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentDefaults {
    /// Memory one agent process may use (`512MB`, `4GB`, or bytes).
    pub max_memory: String,
    /// Seconds one attempt may run.
    pub timeout: u64,
    /// Assignments an external worker's stream delivers ahead of the worker reading them.
    pub batch_size: usize,
}

/// Which runtime runs an agent type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    /// In-process: echo, sleep, fail-N-times and the demo planner.
    Builtin,
    /// A subprocess per attempt: envelope on stdin, result on stdout.
    Command,
    /// The Anthropic Messages API.
    Claude,
}

impl BackendKind {
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Builtin => "builtin",
            BackendKind::Command => "command",
            BackendKind::Claude => "claude",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentTypeConfig {
    pub backend: BackendKind,
    /// Agents of this type on this node (each runs one attempt at a time).
    pub slots: u32,
    pub capabilities: Vec<String>,
    /// Overrides `agents.defaults.max_memory`.
    pub max_memory: Option<String>,
    /// Overrides `agents.defaults.timeout` (seconds).
    pub timeout: Option<u64>,
    /// Environment of a `command` agent (it inherits only PATH, HOME and LANG besides).
    pub env: BTreeMap<String, String>,
    /// `command` backend: the program and its arguments.
    pub command: Vec<String>,
    /// `claude` backend: the system prompt.
    pub system_prompt: Option<String>,
}

impl Default for AgentTypeConfig {
    fn default() -> Self {
        Self {
            backend: BackendKind::Builtin,
            slots: 2,
            capabilities: Vec::new(),
            max_memory: None,
            timeout: None,
            env: BTreeMap::new(),
            command: Vec::new(),
            system_prompt: None,
        }
    }
}

/// The `claude` backend's settings. The key comes from `CLAUDE_API_KEY` (or `ANTHROPIC_API_KEY`),
/// or from `api_key_file`; it is never logged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClaudeSection {
    pub base_url: String,
    pub model: String,
    pub max_tokens: u32,
    pub api_key_file: Option<PathBuf>,
    /// Seconds one HTTP request may take.
    pub request_timeout: u64,
    /// Retries of one attempt's request after 429, 5xx or a timeout.
    pub max_retries: u32,
}

impl Default for ClaudeSection {
    fn default() -> Self {
        Self {
            base_url: "https://api.anthropic.com".into(),
            model: "claude-sonnet-4-5".into(),
            max_tokens: 4_096,
            api_key_file: None,
            request_timeout: 120,
            max_retries: 4,
        }
    }
}

impl Default for AgentDefaults {
    fn default() -> Self {
        Self { max_memory: "4GB".into(), timeout: 7_200, batch_size: 10 }
    }
}

impl Default for AgentsSection {
    fn default() -> Self {
        let types = ["researcher", "coder", "analyst", "tester", "coordinator"]
            .into_iter()
            .map(|name| (name.to_string(), AgentTypeConfig::default()))
            .collect();
        Self { defaults: AgentDefaults::default(), types, claude: ClaudeSection::default() }
    }
}

/// Parse a size: a number of bytes, or a number with KB, MB, GB (powers of 1024; `KiB` etc. too).
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let split = trimmed.find(|c: char| !c.is_ascii_digit()).unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let number: u64 = number.parse().map_err(|_| format!("{text:?} is not a size such as 512MB or 4GB"))?;
    let multiplier: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        other => return Err(format!("{text:?} has unit {other:?}; use B, KB, MB or GB")),
    };
    number.checked_mul(multiplier).ok_or_else(|| format!("{text:?} is too large"))
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeSection {
    /// This node's id in the Raft group: unique, at least 1, never reused for another node.
    pub id: u64,
    /// Where the Raft log, snapshots and the node identity file live.
    pub data_dir: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterSection {
    /// A name every member shares; a data directory or peer of another name is refused.
    pub name: String,
    /// The static members that form the cluster on first start. The lowest id initialises the
    /// group once every listed peer answers and none is initialised already.
    #[serde(deserialize_with = "deserialize_peers")]
    pub peers: Vec<PeerConfig>,
    /// `auto`: the lowest-id peer forms the cluster by itself; `manual`: nodes wait for
    /// `maos cluster init`.
    pub bootstrap: Bootstrap,
}

/// How a new cluster forms.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Bootstrap {
    #[default]
    Auto,
    Manual,
}

/// One static member: `{id, raft_addr, api_addr}` in YAML, `ID=RAFT_ADDR/API_ADDR` in a flag or
/// environment variable (several joined by `,`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub id: u64,
    pub raft_addr: String,
    pub api_addr: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkSection {
    /// Client API (gRPC) listen address.
    pub listen_addr: String,
    /// Raft traffic listen address.
    pub raft_listen_addr: String,
    /// The API address other nodes and clients use for this node; defaults to `listen_addr`.
    pub advertise_addr: Option<String>,
    /// The Raft address other nodes use for this node; defaults to `raft_listen_addr`.
    pub raft_advertise_addr: Option<String>,
    /// Calls the API port serves at once, over all connections; one more is answered
    /// `RESOURCE_EXHAUSTED` (503 over REST) at once instead of queueing. Open streams (watches,
    /// worker streams) are bounded apart, 4,096 a node.
    pub max_concurrent_requests: usize,
    /// HTTP/2 streams one connection may have open at once (the SETTINGS the port announces).
    pub max_streams_per_connection: u32,
    /// The longest the API port works on one call before its answer starts (request body
    /// included); a client's shorter `grpc-timeout` wins. A watch's stream is not cut by it.
    pub request_timeout_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RaftSection {
    pub heartbeat_interval_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot after this many entries since the last one.
    pub snapshot_after_logs: u64,
    /// Entries kept in the log behind a snapshot, so a slightly lagging follower catches up from
    /// the log instead of a snapshot.
    pub logs_kept_after_snapshot: u64,
    /// Entries per append-entries message.
    pub max_payload_entries: u64,
    /// Deadline of a forwarded write or read, leader elections included.
    pub request_timeout_ms: u64,
    /// How long this node's client session lives without a write on it; an idle node's next
    /// write opens a new one, and a write resent after its session expired is refused, never
    /// applied twice.
    pub session_ttl_ms: u64,
    /// How far this node's wall clock may be from a quorum's before, as leader, it stops
    /// stamping expiries: it then stamps the quorum's time, expires nothing, reports the skew
    /// and hands leadership to a node whose clock agrees. 0 (the default for now): off, every
    /// node stamps and reads by its own clock.
    pub clock_skew_max_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SystemSection {
    /// ERROR, WARN, INFO, DEBUG or TRACE (any case). `RUST_LOG`, when set, wins.
    pub log_level: String,
    /// `text` (one human-readable line per event) or `json` (one JSON object per line, with the
    /// event's fields and its span's `node_id`, `term`, `task_id`, `agent_id` where they apply).
    pub log_format: String,
    /// Open (not finished) tasks the cluster holds at most; more submits are refused, retryably.
    pub task_queue_size: usize,
    /// Agents this node runs at most (configured slots plus spawned ones).
    pub max_agents: usize,
    /// Agent processes (and model sessions) started per second, at most.
    pub agent_spawn_rate: u32,
    /// Seconds between checkpoints an agent is asked for (passed in its envelope).
    pub checkpoint_interval: u64,
    /// Seconds a stop (SIGTERM, SIGINT) may take: the servers and Raft stop gracefully within it,
    /// then the rest is dropped, open client connections and streams included, and the node exits.
    pub shutdown_grace: u64,
}

impl Default for NodeSection {
    fn default() -> Self {
        Self { id: 1, data_dir: PathBuf::from("/var/lib/maos") }
    }
}

impl Default for ClusterSection {
    fn default() -> Self {
        Self { name: "maos".into(), peers: Vec::new(), bootstrap: Bootstrap::Auto }
    }
}

impl Default for NetworkSection {
    fn default() -> Self {
        Self {
            listen_addr: "0.0.0.0:8000".into(),
            raft_listen_addr: "0.0.0.0:7000".into(),
            advertise_addr: None,
            raft_advertise_addr: None,
            max_concurrent_requests: 4_096,
            max_streams_per_connection: 1_024,
            request_timeout_ms: 60_000,
        }
    }
}

impl Default for RaftSection {
    fn default() -> Self {
        Self {
            heartbeat_interval_ms: 50,
            election_timeout_min_ms: 150,
            election_timeout_max_ms: 300,
            snapshot_after_logs: 10_000,
            logs_kept_after_snapshot: 1_000,
            max_payload_entries: 512,
            request_timeout_ms: 10_000,
            session_ttl_ms: 600_000,
            clock_skew_max_ms: 0,
        }
    }
}

impl SystemSection {
    /// The longest a stop may take.
    pub fn shutdown_grace(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.shutdown_grace)
    }
}

impl Default for SystemSection {
    fn default() -> Self {
        Self {
            log_level: "INFO".into(),
            log_format: "text".into(),
            task_queue_size: 100_000,
            max_agents: 20,
            agent_spawn_rate: 10,
            checkpoint_interval: 300,
            shutdown_grace: 5,
        }
    }
}

/// Parse `ID=RAFT_ADDR/API_ADDR[,ID=RAFT_ADDR/API_ADDR...]`.
pub fn parse_peer_list(text: &str) -> Result<Vec<PeerConfig>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
        .map(|part| {
            let (id, addrs) = part.split_once('=').ok_or_else(|| {
                format!("peer {part:?} is not ID=RAFT_ADDR/API_ADDR (e.g. 1=10.0.0.1:7000/10.0.0.1:8000)")
            })?;
            let id: u64 = id
                .trim()
                .parse()
                .map_err(|_| format!("peer {part:?} has id {id:?}, which is not a positive integer"))?;
            let (raft_addr, api_addr) = addrs.split_once('/').ok_or_else(|| {
                format!("peer {part:?} is not ID=RAFT_ADDR/API_ADDR (e.g. 1=10.0.0.1:7000/10.0.0.1:8000)")
            })?;
            Ok(PeerConfig { id, raft_addr: raft_addr.trim().into(), api_addr: api_addr.trim().into() })
        })
        .collect()
}

fn deserialize_peers<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<PeerConfig>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Peers {
        List(Vec<PeerConfig>),
        Text(String),
    }
    match Peers::deserialize(deserializer)? {
        Peers::List(list) => Ok(list),
        Peers::Text(text) => parse_peer_list(&text).map_err(serde::de::Error::custom),
    }
}

/// `url` with the password of its `user:password@` part (if any) replaced by `***`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let Some((auth, host)) = rest.rsplit_once('@') else { return url.to_string() };
    match auth.split_once(':') {
        Some((user, password)) if !password.is_empty() => format!("{scheme}://{user}:***@{host}"),
        _ => url.to_string(),
    }
}

impl Config {
    /// The task limits this configuration asks the cluster to apply (the leader's win).
    pub fn task_limits(&self) -> maos_raft_store::tasks::TaskLimits {
        maos_raft_store::tasks::TaskLimits {
            queue_size: self.system.task_queue_size,
            dependency_timeout_ms: self.task_planner.dependency_timeout.saturating_mul(1_000),
            max_parallel_branches: self.task_planner.max_parallel_branches,
            parallelization_threshold: self.task_planner.parallelization_threshold,
            retention_ms: self.tasks.retention.saturating_mul(1_000),
            retained_max: self.tasks.retained_max,
            idempotency_window_ms: self.tasks.idempotency_window.saturating_mul(1_000),
            ..Default::default()
        }
    }

    /// The API address others use for this node.
    pub fn advertised_api_addr(&self) -> String {
        self.network.advertise_addr.clone().unwrap_or_else(|| self.network.listen_addr.clone())
    }

    /// The Raft address others use for this node.
    pub fn advertised_raft_addr(&self) -> String {
        self.network.raft_advertise_addr.clone().unwrap_or_else(|| self.network.raft_listen_addr.clone())
    }
}
