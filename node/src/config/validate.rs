//! Checking a configuration: every bad key and value is named with its fix, all at once, so an
//! operator fixes them in one pass.

use std::fmt;

use super::schema::{
    parse_bytes, BackendKind, Config, IDEMPOTENCY_WINDOW_SECONDS_MAX, PEERS_MAX, RETAINED_MAX_MAX,
    RETENTION_SECONDS_MAX,
};

/// The longest `system.shutdown_grace`, in seconds: past this an orchestrator kills the node anyway.
const SHUTDOWN_GRACE_MAX: u64 = 300;
/// `raft.clock_skew_max_ms` bounds: tighter than a round trip cannot be measured, looser than a
/// minute is no bound on lease and TTL expiry.
const CLOCK_SKEW_MAX_MS_MIN: u64 = 10;
const CLOCK_SKEW_MAX_MS_MAX: u64 = 60_000;

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

pub(super) fn problem(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError(vec![ConfigProblem { key: key.into(), message: message.into() }])
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

impl Config {
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
        if system.shutdown_grace == 0 || system.shutdown_grace > SHUTDOWN_GRACE_MAX {
            bad(
                "system.shutdown_grace",
                format!("{} must be in 1..={SHUTDOWN_GRACE_MAX} (seconds a stop may take)", system.shutdown_grace),
            );
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

    /// Check the `tracing` section.
    fn validate_tracing(&self, bad: &mut impl FnMut(&str, String)) {
        let tracing = &self.tracing;
        if tracing.jaeger.is_some() {
            bad(
                "tracing.jaeger",
                "MAOS exports OTLP/gRPC, not Jaeger's agent protocol: remove tracing.jaeger and set tracing.otlp_endpoint to the collector (Jaeger takes OTLP on port 4317: http://jaeger:4317), tracing.service_name for service_name, tracing.sample_ratio (0.0..=1.0) for the sampler's param".into(),
            );
        }
        if !(0.0..=1.0).contains(&tracing.sample_ratio) {
            bad(
                "tracing.sample_ratio",
                format!("{} must be in 0.0..=1.0 (1.0 records every trace)", tracing.sample_ratio),
            );
        }
        let name = &tracing.service_name;
        if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
            bad("tracing.service_name", format!("{name:?} must be 1..=128 printable characters"));
        }
        let endpoint = &tracing.otlp_endpoint;
        let address = endpoint.strip_prefix("http://").or_else(|| endpoint.strip_prefix("https://"));
        match address.map(|a| a.trim_end_matches('/')) {
            Some(address) if !address.contains('/') => {
                if let Err(e) = check_address(address) {
                    bad("tracing.otlp_endpoint", format!("{e} (write http://host:4317)"));
                }
            }
            _ => bad(
                "tracing.otlp_endpoint",
                format!("{endpoint:?} must be http://host:port or https://host:port (an OTLP/gRPC collector, e.g. http://127.0.0.1:4317)"),
            ),
        }
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
            ("dashboard.listen", self.dashboard.enabled.then_some(&self.dashboard.listen)),
        ] {
            if let Some(Err(e)) = addr.map(|a| check_address(a)) {
                bad(key, e);
            }
        }
        let network = &self.network;
        if !(1..=1_000_000).contains(&network.max_concurrent_requests) {
            bad("network.max_concurrent_requests", format!("{} must be 1..=1000000", network.max_concurrent_requests));
        }
        if !(1..=65_536).contains(&network.max_streams_per_connection) {
            bad(
                "network.max_streams_per_connection",
                format!("{} must be 1..=65536", network.max_streams_per_connection),
            );
        }
        if !(1_000..=3_600_000).contains(&network.request_timeout_ms) {
            bad(
                "network.request_timeout_ms",
                format!("{} must be 1000..=3600000 (1 s to 1 h)", network.request_timeout_ms),
            );
        }
        let rate = &self.security.rate_limit;
        if !rate.requests_per_second.is_finite() || !(0.0..=1_000_000.0).contains(&rate.requests_per_second) {
            bad(
                "security.rate_limit.requests_per_second",
                format!("{} must be 0 (no limit) to 1000000 calls per second", rate.requests_per_second),
            );
        }
        if rate.burst > 1_000_000 {
            bad("security.rate_limit.burst", format!("{} must be at most 1000000 calls", rate.burst));
        }
        let issuers = &self.security.jwt.issuers;
        if issuers.len() > super::JWT_ISSUERS_MAX {
            bad(
                "security.jwt.issuers",
                format!("{} issuers, over the limit of {}", issuers.len(), super::JWT_ISSUERS_MAX),
            );
        }
        for (i, issuer) in issuers.iter().enumerate() {
            let key = |field: &str| format!("security.jwt.issuers[{i}].{field}");
            if issuer.issuer.trim().is_empty() {
                bad(&key("issuer"), "must name the `iss` the tokens carry".into());
            }
            if issuer.audience.trim().is_empty() {
                bad(&key("audience"), "must name the `aud` the tokens carry (for example maos)".into());
            }
            if issuer.roles_claim.trim().is_empty() {
                bad(&key("roles_claim"), "must name the claim that lists the token's roles".into());
            }
            match (&issuer.jwks_file, &issuer.jwks_url) {
                (Some(_), Some(_)) | (None, None) => {
                    bad(&key("jwks_file"), "set exactly one of jwks_file and jwks_url".into())
                }
                (None, Some(url)) => {
                    let loopback = url
                        .strip_prefix("http://")
                        .and_then(|rest| rest.split('/').next())
                        .is_some_and(crate::config::is_loopback);
                    if !url.starts_with("https://") && !loopback {
                        bad(&key("jwks_url"), format!("{url} must be https:// (http:// only on loopback)"));
                    }
                }
                (Some(_), None) => {}
            }
            if !(10..=86_400).contains(&issuer.jwks_refresh_s) {
                bad(&key("jwks_refresh_s"), format!("{} must be 10..=86400 seconds", issuer.jwks_refresh_s));
            }
            if issuer.leeway_s > 300 {
                bad(&key("leeway_s"), format!("{} must be at most 300 seconds", issuer.leeway_s));
            }
        }
        if let Err(e) = self.cluster_secret() {
            bad("security.cluster_secret_file", e);
        }
        let tls = &self.security.tls;
        match (&tls.cert_file, &tls.key_file) {
            (Some(_), None) => bad("security.tls.key_file", "must be set with security.tls.cert_file".into()),
            (None, Some(_)) => bad("security.tls.cert_file", "must be set with security.tls.key_file".into()),
            _ => {}
        }
        if tls.ca_file.is_some() && tls.cert_file.is_none() {
            bad(
                "security.tls.ca_file",
                "needs security.tls.cert_file and key_file: it names the CA of the port's certificate".into(),
            );
        }
        if tls.client_ca_file.is_some() && tls.cert_file.is_none() {
            bad(
                "security.tls.client_ca_file",
                "needs security.tls.cert_file and key_file: client certificates are checked only over TLS".into(),
            );
        }
        if tls.crl_file.is_some() && tls.client_ca_file.is_none() {
            bad(
                "security.tls.crl_file",
                "needs security.tls.client_ca_file: it revokes client certificates those CAs signed".into(),
            );
        }
        if !tls.client_principals.is_empty() && tls.client_ca_file.is_none() {
            bad(
                "security.tls.client_principals",
                "needs security.tls.client_ca_file: only certificates one of those CAs signed are checked".into(),
            );
        }
        if tls.client_principals.len() > super::security::CERT_PRINCIPALS_MAX {
            bad(
                "security.tls.client_principals",
                format!("{} entries; at most {}", tls.client_principals.len(), super::security::CERT_PRINCIPALS_MAX),
            );
        }
        for (i, entry) in tls.client_principals.iter().enumerate() {
            if tokio_rustls::rustls::pki_types::DnsName::try_from(entry.name.as_str()).is_err() {
                bad(
                    &format!("security.tls.client_principals[{i}].name"),
                    format!(
                        "{:?} is not a DNS name (a certificate's subject alternative name, e.g. ops-bot.example.com)",
                        entry.name
                    ),
                );
            }
        }
        let peer_tls = &self.security.peer_tls;
        if peer_tls.crl_file.is_some() && peer_tls.ca_file.is_none() {
            bad(
                "security.peer_tls.crl_file",
                "needs security.peer_tls (cert_file, key_file, ca_file): it revokes members' certificates".into(),
            );
        }
        let peer_files =
            [("cert_file", &peer_tls.cert_file), ("key_file", &peer_tls.key_file), ("ca_file", &peer_tls.ca_file)];
        if peer_files.iter().any(|(_, file)| file.is_some()) {
            for (name, _) in peer_files.iter().filter(|(_, file)| file.is_none()) {
                bad(
                    &format!("security.peer_tls.{name}"),
                    "must be set with the others: mutual TLS needs the node's certificate, its key and the members' CA (cert_file, key_file, ca_file)".into(),
                );
            }
        }
        if !self.security.auth.enabled && !self.security.allow_insecure {
            for (key, addr) in [
                ("network.listen_addr", Some(&self.network.listen_addr)),
                ("dashboard.listen", self.dashboard.enabled.then_some(&self.dashboard.listen)),
            ] {
                if let Some(addr) = addr.filter(|a| !super::schema::is_loopback(a)) {
                    bad(key, format!("{addr} is not a loopback address, and security.auth.enabled is false: anyone who reaches it could do anything; turn auth on, listen on 127.0.0.1, or set security.allow_insecure: true"));
                }
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
        let (ttl_min, ttl_max) =
            (maos_raft_store::command::SESSION_TTL_MS_MIN, maos_raft_store::command::SESSION_TTL_MS_MAX);
        if !(ttl_min..=ttl_max).contains(&raft.session_ttl_ms) {
            bad("raft.session_ttl_ms", format!("must be in {ttl_min}..={ttl_max} (1 s to 24 h)"));
        }
        if raft.clock_skew_max_ms != 0
            && !(CLOCK_SKEW_MAX_MS_MIN..=CLOCK_SKEW_MAX_MS_MAX).contains(&raft.clock_skew_max_ms)
        {
            bad(
                "raft.clock_skew_max_ms",
                format!("must be 0 (off) or in {CLOCK_SKEW_MAX_MS_MIN}..={CLOCK_SKEW_MAX_MS_MAX} (10 ms to 60 s)"),
            );
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
        let tasks = &self.tasks;
        if !(1..=RETENTION_SECONDS_MAX).contains(&tasks.retention) {
            bad("tasks.retention", format!("must be in 1..={RETENTION_SECONDS_MAX} seconds (30 days)"));
        }
        if !(1..=RETAINED_MAX_MAX).contains(&tasks.retained_max) {
            bad("tasks.retained_max", format!("must be in 1..={RETAINED_MAX_MAX}"));
        }
        if tasks.idempotency_window < tasks.retention {
            bad(
                "tasks.idempotency_window",
                format!(
                    "{} s is shorter than tasks.retention ({} s); set it to at least tasks.retention",
                    tasks.idempotency_window, tasks.retention
                ),
            );
        }
        if tasks.idempotency_window > IDEMPOTENCY_WINDOW_SECONDS_MAX {
            bad(
                "tasks.idempotency_window",
                format!("must be at most {IDEMPOTENCY_WINDOW_SECONDS_MAX} seconds (90 days)"),
            );
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
        if !["text", "json"].contains(&self.system.log_format.to_lowercase().as_str()) {
            bad("system.log_format", format!("{:?} is not one of text, json", self.system.log_format));
        }
        self.validate_tracing(&mut bad);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError(problems))
        }
    }
}
