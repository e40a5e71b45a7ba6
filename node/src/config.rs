//! Configuration: YAML, overridden by `MAOS_*` environment variables, overridden by flags.
//!
//! An environment variable names a key path upper-cased with nesting joined by `_`
//! (`MAOS_NODE_ID`, `MAOS_CLUSTER_PEERS`, `MAOS_SYSTEM_LOG_LEVEL`). Its value is read as YAML,
//! so numbers and booleans need no quoting. [`Config::validate`] names every bad key and value.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};
use serde_yaml::Value;

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
    pub system: SystemSection,
    pub database: DatabaseSection,
    pub redis: RedisSection,
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
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SystemSection {
    /// ERROR, WARN, INFO, DEBUG or TRACE (any case). `RUST_LOG`, when set, wins.
    pub log_level: String,
    /// Open (not finished) tasks the cluster holds at most; more submits are refused, retryably.
    pub task_queue_size: usize,
    /// Agents this node runs at most (configured slots plus spawned ones).
    pub max_agents: usize,
    /// Agent processes (and model sessions) started per second, at most.
    pub agent_spawn_rate: u32,
    /// Seconds between checkpoints an agent is asked for (passed in its envelope).
    pub checkpoint_interval: u64,
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
        }
    }
}

impl Default for RaftSection {
    fn default() -> Self {
        Self {
            heartbeat_interval_ms: 100,
            election_timeout_min_ms: 500,
            election_timeout_max_ms: 1000,
            snapshot_after_logs: 10_000,
            logs_kept_after_snapshot: 1_000,
            max_payload_entries: 512,
            request_timeout_ms: 10_000,
        }
    }
}

impl Default for SystemSection {
    fn default() -> Self {
        Self {
            log_level: "INFO".into(),
            task_queue_size: 100_000,
            max_agents: 20,
            agent_spawn_rate: 10,
            checkpoint_interval: 300,
        }
    }
}

/// One problem with the configuration, naming the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Every problem found, so an operator fixes them in one pass.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError(pub Vec<ConfigProblem>);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid configuration ({} problem{}):", self.0.len(), if self.0.len() == 1 { "" } else { "s" })?;
        for problem in &self.0 {
            writeln!(f, "  - {problem}")?;
        }
        Ok(())
    }
}

fn problem(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError(vec![ConfigProblem { key: key.into(), message: message.into() }])
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

/// Check that `addr` is `host:port` with a non-empty host and a port in 1..=65535.
pub fn check_address(addr: &str) -> Result<(), String> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| format!("{addr:?} is not host:port (e.g. 10.0.0.1:7000 or maos-0:7000)"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c == '/' || c == '@') {
        return Err(format!("{addr:?} has no valid host (use host:port, e.g. 10.0.0.1:7000)"));
    }
    match port.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("{addr:?} has port {port:?}; a port is a number in 1..=65535")),
        Ok(_) => Ok(()),
    }
}

/// The key paths of the configuration (sections and leaves), for environment overrides.
fn leaf_paths(value: &Value, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    match value {
        Value::Mapping(map) => {
            // A whole section or map can be set too (`MAOS_AGENTS_TYPES='{coder: {slots: 2}}'`).
            if !prefix.is_empty() {
                out.push(prefix.clone());
            }
            for (key, child) in map {
                if let Some(key) = key.as_str() {
                    prefix.push(key.to_string());
                    leaf_paths(child, prefix, out);
                    prefix.pop();
                }
            }
        }
        _ => out.push(prefix.clone()),
    }
}

fn set_path(root: &mut Value, path: &[String], value: Value) {
    let mut current = root;
    for (depth, key) in path.iter().enumerate() {
        if !current.is_mapping() {
            *current = Value::Mapping(Default::default());
        }
        let Value::Mapping(map) = current else { return };
        let key = Value::String(key.clone());
        if depth + 1 == path.len() {
            map.insert(key, value);
            return;
        }
        current = map.entry(key).or_insert(Value::Mapping(Default::default()));
    }
}

/// Where a configuration came from, for `maos config show`.
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    pub config: Config,
    /// `MAOS_*` variables that name no key: probably a typo.
    pub unknown_env: Vec<String>,
}

impl Config {
    /// The task limits this configuration asks the cluster to apply (the leader's win).
    pub fn task_limits(&self) -> maos_raft_store::tasks::TaskLimits {
        maos_raft_store::tasks::TaskLimits {
            queue_size: self.system.task_queue_size,
            dependency_timeout_ms: self.task_planner.dependency_timeout.saturating_mul(1_000),
            max_parallel_branches: self.task_planner.max_parallel_branches,
            parallelization_threshold: self.task_planner.parallelization_threshold,
            ..Default::default()
        }
    }

    /// Load the YAML file (if any), then apply `MAOS_*` variables from `env`.
    pub fn load(file: Option<&Path>, env: &BTreeMap<String, String>) -> Result<Loaded, ConfigError> {
        let mut root = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| problem("--config", format!("cannot read {}: {e}", path.display())))?;
                let value: Value = serde_yaml::from_str(&text)
                    .map_err(|e| problem(path.display().to_string(), format!("is not valid YAML: {e}")))?;
                if value.is_null() {
                    Value::Mapping(Default::default())
                } else {
                    value
                }
            }
            None => Value::Mapping(Default::default()),
        };
        let defaults = serde_yaml::to_value(Config::default()).map_err(|e| problem("(defaults)", e.to_string()))?;
        let mut paths = Vec::new();
        leaf_paths(&defaults, &mut Vec::new(), &mut paths);
        let by_env_name: BTreeMap<String, Vec<String>> =
            paths.into_iter().map(|path| (format!("MAOS_{}", path.join("_").to_uppercase()), path)).collect();
        let mut unknown_env = Vec::new();
        for (name, raw) in env.iter().filter(|(name, _)| name.starts_with("MAOS_")) {
            match by_env_name.get(name) {
                Some(path) => {
                    let value = serde_yaml::from_str::<Value>(raw).unwrap_or_else(|_| Value::String(raw.clone()));
                    set_path(&mut root, path, value);
                }
                None => unknown_env.push(name.clone()),
            }
        }
        let config: Config = serde_yaml::from_value(root).map_err(|e| {
            let key = file.map(|p| p.display().to_string()).unwrap_or_else(|| "environment".into());
            problem(key, e.to_string())
        })?;
        Ok(Loaded { config, unknown_env })
    }

    /// Check the database and Redis settings.
    fn validate_storage(&self, bad: &mut impl FnMut(&str, String)) {
        let database = &self.database;
        if let Some(url) = &database.primary_url {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                bad("database.primary_url", "must be a PostgreSQL URL (postgresql://user:password@host:5432/maos); leave it unset for the embedded default".into());
            }
        }
        if database.pool_size == 0 || database.pool_size > 1_000 {
            bad("database.pool_size", format!("{} must be in 1..=1000", database.pool_size));
        }
        if database.pool_timeout == 0 || database.pool_timeout > 300 {
            bad("database.pool_timeout", format!("{} must be in 1..=300 (seconds)", database.pool_timeout));
        }
        if database.pool_recycle < 10 {
            bad("database.pool_recycle", format!("{} must be at least 10 (seconds)", database.pool_recycle));
        }
        if database.payload_bytes_max < maos_raft_store::tasks::TASK_TEXT_BYTES_MAX
            || database.payload_bytes_max > 64 << 20
        {
            bad(
                "database.payload_bytes_max",
                format!("{} must be in 16384..=67108864 (bytes)", database.payload_bytes_max),
            );
        }
        if database.orphan_after < 60 {
            bad(
                "database.orphan_after",
                format!("{} must be at least 60 (seconds): longer than any submit takes", database.orphan_after),
            );
        }
        let redis = &self.redis;
        if let Some(url) = &redis.url {
            if !(url.starts_with("redis://") || url.starts_with("rediss://") || url.starts_with("unix://")) {
                bad(
                    "redis.url",
                    "must be a Redis URL (redis://[:password@]host:6379/0); leave it unset for no cache".into(),
                );
            }
        }
        if redis.pool_size == 0 || redis.pool_size > 64 {
            bad("redis.pool_size", format!("{} must be in 1..=64", redis.pool_size));
        }
        if redis.cache_ttl == 0 {
            bad("redis.cache_ttl", "must be at least 1 (seconds)".into());
        }
        if redis.response_timeout_ms == 0 || redis.response_timeout_ms > 10_000 {
            bad("redis.response_timeout_ms", format!("{} must be in 1..=10000", redis.response_timeout_ms));
        }
    }

    /// Check the agent pool settings.
    fn validate_agents(&self, bad: &mut impl FnMut(&str, String)) {
        let system = &self.system;
        if system.max_agents == 0 || system.max_agents > maos_raft_store::tasks::SLOTS_PER_NODE_MAX {
            bad("system.max_agents", format!("must be in 1..={}", maos_raft_store::tasks::SLOTS_PER_NODE_MAX));
        }
        if system.agent_spawn_rate == 0 || system.agent_spawn_rate > 10_000 {
            bad("system.agent_spawn_rate", "must be in 1..=10000 (spawns per second)".into());
        }
        if system.checkpoint_interval == 0 {
            bad("system.checkpoint_interval", "must be at least 1 (seconds)".into());
        }
        let agents = &self.agents;
        if let Err(e) = parse_bytes(&agents.defaults.max_memory) {
            bad("agents.defaults.max_memory", e);
        }
        if agents.defaults.timeout == 0 {
            bad("agents.defaults.timeout", "must be at least 1 (seconds)".into());
        }
        if agents.defaults.batch_size == 0 || agents.defaults.batch_size > 10_000 {
            bad("agents.defaults.batch_size", "must be in 1..=10000".into());
        }
        let slots: u64 = agents.types.values().map(|t| u64::from(t.slots)).sum();
        if slots > system.max_agents as u64 {
            bad(
                "agents.types",
                format!(
                    "{slots} agent slots in all, over system.max_agents ({}); lower slots or raise the limit",
                    system.max_agents
                ),
            );
        }
        for (name, agent) in &agents.types {
            let key = |field: &str| format!("agents.types.{name}.{field}");
            if name.is_empty()
                || name.len() > 64
                || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                bad(&format!("agents.types.{name}"), "a type name is 1..=64 characters of A-Z a-z 0-9 - _".into());
            }
            if let Some(Err(e)) = agent.max_memory.as_deref().map(parse_bytes) {
                bad(&key("max_memory"), e);
            }
            if agent.timeout == Some(0) {
                bad(&key("timeout"), "must be at least 1 (seconds)".into());
            }
            match agent.backend {
                BackendKind::Command if agent.command.is_empty() => {
                    bad(&key("command"), "a command agent needs its program, e.g. [python3, agent.py]".into())
                }
                BackendKind::Builtin | BackendKind::Claude if !agent.command.is_empty() => bad(
                    &key("command"),
                    format!("only a command agent runs a program; this one is {}", agent.backend.name()),
                ),
                _ => {}
            }
        }
        let claude = &agents.claude;
        if !(claude.base_url.starts_with("https://") || claude.base_url.starts_with("http://")) {
            bad(
                "agents.claude.base_url",
                format!("{:?} must start with https:// (or http:// for a local server)", claude.base_url),
            );
        }
        if claude.model.is_empty() {
            bad("agents.claude.model", "must name a model".into());
        }
        if claude.max_tokens == 0 {
            bad("agents.claude.max_tokens", "must be at least 1".into());
        }
        if claude.request_timeout == 0 {
            bad("agents.claude.request_timeout", "must be at least 1 (seconds)".into());
        }
        if claude.max_retries > 20 {
            bad("agents.claude.max_retries", "must be at most 20".into());
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

    /// Check every value; report all problems at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        let mut bad = |key: &str, message: String| problems.push(ConfigProblem { key: key.into(), message });
        if self.node.id == 0 {
            bad("node.id", "must be at least 1; 0 is reserved".into());
        }
        if self.node.data_dir.as_os_str().is_empty() {
            bad("node.data_dir", "must name a directory".into());
        }
        let name = &self.cluster.name;
        if name.is_empty()
            || name.len() > maos_raft_store::command::CLUSTER_NAME_BYTES_MAX
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            bad("cluster.name", format!("{name:?} must be 1..=64 characters of A-Z a-z 0-9 - _"));
        }
        if self.cluster.peers.len() > PEERS_MAX {
            bad("cluster.peers", format!("{} peers exceed the limit of {PEERS_MAX}", self.cluster.peers.len()));
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, peer) in self.cluster.peers.iter().enumerate() {
            if peer.id == 0 {
                bad(&format!("cluster.peers[{i}].id"), "must be at least 1".into());
            }
            if !seen.insert(peer.id) {
                bad(&format!("cluster.peers[{i}].id"), format!("id {} is listed twice", peer.id));
            }
            if let Err(e) = check_address(&peer.raft_addr) {
                bad(&format!("cluster.peers[{i}].raft_addr"), e);
            }
            if let Err(e) = check_address(&peer.api_addr) {
                bad(&format!("cluster.peers[{i}].api_addr"), e);
            }
            if peer.id == self.node.id && peer.raft_addr != self.advertised_raft_addr() {
                bad(
                    &format!("cluster.peers[{i}].raft_addr"),
                    format!(
                        "lists this node (id {}) at {}, but it advertises {}; set network.raft_advertise_addr or fix the peer",
                        peer.id,
                        peer.raft_addr,
                        self.advertised_raft_addr()
                    ),
                );
            }
        }
        for (key, addr) in [
            ("network.listen_addr", Some(&self.network.listen_addr)),
            ("network.raft_listen_addr", Some(&self.network.raft_listen_addr)),
            ("network.advertise_addr", self.network.advertise_addr.as_ref()),
            ("network.raft_advertise_addr", self.network.raft_advertise_addr.as_ref()),
        ] {
            if let Some(Err(e)) = addr.map(|a| check_address(a)) {
                bad(key, e);
            }
        }
        let raft = &self.raft;
        if raft.heartbeat_interval_ms == 0 {
            bad("raft.heartbeat_interval_ms", "must be at least 1".into());
        }
        if raft.election_timeout_min_ms <= raft.heartbeat_interval_ms {
            bad("raft.election_timeout_min_ms", "must be greater than raft.heartbeat_interval_ms".into());
        }
        if raft.election_timeout_max_ms <= raft.election_timeout_min_ms {
            bad("raft.election_timeout_max_ms", "must be greater than raft.election_timeout_min_ms".into());
        }
        if raft.snapshot_after_logs == 0 {
            bad("raft.snapshot_after_logs", "must be at least 1".into());
        }
        if raft.max_payload_entries == 0 || raft.max_payload_entries > 65_536 {
            bad("raft.max_payload_entries", "must be in 1..=65536".into());
        }
        if raft.request_timeout_ms < raft.election_timeout_max_ms {
            bad("raft.request_timeout_ms", "must be at least raft.election_timeout_max_ms".into());
        }
        if self.system.task_queue_size == 0 || self.system.task_queue_size > 10_000_000 {
            bad("system.task_queue_size", "must be in 1..=10000000".into());
        }
        if self.task_planner.max_parallel_branches == 0 {
            bad("task_planner.max_parallel_branches", "must be at least 1".into());
        }
        if self.task_planner.dependency_timeout == 0 {
            bad("task_planner.dependency_timeout", "must be at least 1 (seconds)".into());
        }
        let scheduler = &self.scheduler;
        if scheduler.lease_ms < 2 * scheduler.lease_renew_interval_ms.max(1) {
            bad("scheduler.lease_ms", "must be at least twice scheduler.lease_renew_interval_ms".into());
        }
        if scheduler.lease_renew_interval_ms == 0 || scheduler.interval_ms == 0 {
            bad("scheduler.interval_ms", "intervals must be at least 1 ms".into());
        }
        if scheduler.assignments_max == 0 || scheduler.assignments_max > 100_000 {
            bad("scheduler.assignments_max", "must be in 1..=100000".into());
        }
        self.validate_agents(&mut bad);
        self.validate_storage(&mut bad);
        if self.task_planner.planner_type.is_empty() || self.task_planner.planner_type.len() > 64 {
            bad("task_planner.planner_type", "must be 1..=64 bytes".into());
        }
        if self.task_planner.parallelization_threshold == 0 {
            bad("task_planner.parallelization_threshold", "must be at least 1".into());
        }
        if !["ERROR", "WARN", "INFO", "DEBUG", "TRACE"].contains(&self.system.log_level.to_uppercase().as_str()) {
            bad(
                "system.log_level",
                format!("{:?} is not one of ERROR, WARN, INFO, DEBUG, TRACE", self.system.log_level),
            );
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError(problems))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn environment_overrides_the_file_and_names_unknown_variables() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("maos.yml");
        std::fs::write(&path, "node:\n  id: 2\nsystem:\n  log_level: INFO\n").expect("write");
        let loaded = Config::load(
            Some(&path),
            &env(&[
                ("MAOS_SYSTEM_LOG_LEVEL", "DEBUG"),
                ("MAOS_CLUSTER_PEERS", "1=127.0.0.1:7001/127.0.0.1:8001,2=127.0.0.1:7002/127.0.0.1:8002"),
                ("MAOS_RAFT_SNAPSHOT_AFTER_LOGS", "50"),
                ("MAOS_NO_SUCH_KEY", "1"),
                ("HOME", "/root"),
            ]),
        )
        .expect("loads");
        assert_eq!(loaded.config.node.id, 2);
        assert_eq!(loaded.config.system.log_level, "DEBUG");
        assert_eq!(loaded.config.raft.snapshot_after_logs, 50);
        assert_eq!(loaded.config.cluster.peers.len(), 2);
        assert_eq!(loaded.config.cluster.peers[1].api_addr, "127.0.0.1:8002");
        assert_eq!(loaded.unknown_env, vec!["MAOS_NO_SUCH_KEY".to_string()]);
    }

    #[test]
    fn passwords_in_urls_are_redacted() {
        assert_eq!(redact_url("postgresql://maos:s3cret@db:5432/maos"), "postgresql://maos:***@db:5432/maos");
        assert_eq!(redact_url("redis://:pw@cache:6379/0"), "redis://:***@cache:6379/0");
        assert_eq!(redact_url("postgresql://db/maos"), "postgresql://db/maos");
    }

    #[test]
    fn the_database_and_redis_urls_come_from_the_operators_variables() {
        let loaded = Config::load(
            None,
            &env(&[
                ("MAOS_DATABASE_PRIMARY_URL", "postgresql://maos:pw@db:5432/maos"),
                ("MAOS_DATABASE_POOL_SIZE", "50"),
                ("MAOS_REDIS_URL", "redis://:pw@cache:6379/0"),
            ]),
        )
        .expect("loads");
        assert_eq!(loaded.config.database.primary_url.as_deref(), Some("postgresql://maos:pw@db:5432/maos"));
        assert_eq!(loaded.config.database.pool_size, 50);
        assert_eq!(loaded.config.redis.url.as_deref(), Some("redis://:pw@cache:6379/0"));
        assert!(loaded.unknown_env.is_empty(), "{:?}", loaded.unknown_env);
        loaded.config.validate().expect("valid");
    }

    #[test]
    fn unknown_keys_in_the_file_are_refused_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("maos.yml");
        std::fs::write(&path, "raft:\n  heartbeat_ms: 5\n").expect("write");
        let error = Config::load(Some(&path), &BTreeMap::new()).expect_err("unknown key");
        assert!(error.to_string().contains("heartbeat_ms"), "{error}");
    }

    #[test]
    fn validation_names_each_bad_value() {
        type Case = (&'static str, fn(&mut Config), &'static str);
        let cases: &[Case] = &[
            ("zero id", |c| c.node.id = 0, "node.id"),
            ("bad port", |c| c.network.listen_addr = "127.0.0.1:99999".into(), "network.listen_addr"),
            ("no port", |c| c.network.raft_listen_addr = "localhost".into(), "network.raft_listen_addr"),
            (
                "malformed peer",
                |c| {
                    c.cluster.peers =
                        vec![PeerConfig { id: 2, raft_addr: "10.0.0.2".into(), api_addr: "10.0.0.2:8000".into() }]
                },
                "cluster.peers[0].raft_addr",
            ),
            (
                "duplicate peer",
                |c| {
                    let p = PeerConfig { id: 2, raft_addr: "a:7000".into(), api_addr: "a:8000".into() };
                    c.cluster.peers = vec![p.clone(), p];
                },
                "cluster.peers[1].id",
            ),
            ("bad name", |c| c.cluster.name = "my cluster".into(), "cluster.name"),
            ("timeouts", |c| c.raft.election_timeout_max_ms = 10, "raft.election_timeout_max_ms"),
            ("log level", |c| c.system.log_level = "LOUD".into(), "system.log_level"),
            ("too many agents", |c| c.system.max_agents = 4, "agents.types"),
            ("memory size", |c| c.agents.defaults.max_memory = "lots".into(), "agents.defaults.max_memory"),
            (
                "command without a program",
                |c| {
                    let agent = c.agents.types.get_mut("coder").expect("default type");
                    agent.backend = BackendKind::Command;
                },
                "agents.types.coder.command",
            ),
            ("planner type", |c| c.task_planner.planner_type = String::new(), "task_planner.planner_type"),
            ("database url", |c| c.database.primary_url = Some("mysql://db/maos".into()), "database.primary_url"),
            ("pool size", |c| c.database.pool_size = 0, "database.pool_size"),
            ("pool timeout", |c| c.database.pool_timeout = 0, "database.pool_timeout"),
            ("payload limit", |c| c.database.payload_bytes_max = 10, "database.payload_bytes_max"),
            ("orphan age", |c| c.database.orphan_after = 1, "database.orphan_after"),
            ("redis url", |c| c.redis.url = Some("http://cache:6379".into()), "redis.url"),
            ("redis pool", |c| c.redis.pool_size = 0, "redis.pool_size"),
        ];
        for (name, mutate, key) in cases {
            let mut config = Config::default();
            mutate(&mut config);
            let error = config.validate().expect_err(name);
            assert!(error.0.iter().any(|p| p.key == *key), "{name}: {error}");
        }
        Config::default().validate().expect("defaults are valid");
    }

    #[test]
    fn sizes_parse_with_units_and_whole_maps_come_from_the_environment() {
        assert_eq!(parse_bytes("4GB"), Ok(4 << 30));
        assert_eq!(parse_bytes("512 MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("1024"), Ok(1024));
        assert!(parse_bytes("4 parsecs").is_err());
        let loaded = Config::load(
            None,
            &env(&[
                ("MAOS_AGENTS_TYPES", "{coder: {slots: 3}, poet: {backend: command, command: [cat]}}"),
                ("MAOS_AGENTS_DEFAULTS_TIMEOUT", "60"),
            ]),
        )
        .expect("loads");
        let types = &loaded.config.agents.types;
        assert_eq!(types.keys().collect::<Vec<_>>(), ["coder", "poet"]);
        assert_eq!((types["coder"].slots, types["poet"].backend), (3, BackendKind::Command));
        assert_eq!(loaded.config.agents.defaults.timeout, 60);
        loaded.config.validate().expect("valid");
    }

    #[test]
    fn the_shipped_example_configuration_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/config/maos.yml");
        let loaded = Config::load(Some(&path), &BTreeMap::new()).expect("deploy/config/maos.yml loads");
        loaded.config.validate().expect("deploy/config/maos.yml is valid");
        assert_eq!(loaded.config.task_planner.max_parallel_branches, 8);
    }

    #[test]
    fn peer_lists_parse_and_malformed_ones_say_how_to_fix_them() {
        let peers = parse_peer_list("1=a:7000/a:8000, 2=b:7000/b:8000").expect("parses");
        assert_eq!(peers[1], PeerConfig { id: 2, raft_addr: "b:7000".into(), api_addr: "b:8000".into() });
        for bad in ["1=a:7000", "x=a:7000/a:8000", "a:7000/a:8000"] {
            let error = parse_peer_list(bad).expect_err(bad);
            assert!(error.contains("ID=RAFT_ADDR/API_ADDR") || error.contains("positive integer"), "{error}");
        }
    }
}
