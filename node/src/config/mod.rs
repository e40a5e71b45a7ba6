//! Configuration: YAML, overridden by `MAOS_*` environment variables, overridden by flags.
//!
//! An environment variable names a key path upper-cased with nesting joined by `_`
//! (`MAOS_NODE_ID`, `MAOS_CLUSTER_PEERS`, `MAOS_SYSTEM_LOG_LEVEL`). Its value is read as YAML,
//! so numbers and booleans need no quoting. [`Config::validate`] names every bad key and value.
//!
//! - `schema.rs`: the sections, keys and defaults, and helpers that read them; `security.rs`:
//!   the `security` section.
//! - `load.rs`: file, environment and flags, in that order, in one place.
//! - `validate.rs`: every problem named with its key.

mod load;
mod schema;
mod security;
mod validate;

pub use load::{Flags, Loaded};
pub use schema::*;
pub use security::*;
pub use validate::{check_address, ConfigError, ConfigProblem};

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;

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
            ("session ttl", |c| c.raft.session_ttl_ms = 10, "raft.session_ttl_ms"),
            ("clock skew bound", |c| c.raft.clock_skew_max_ms = 5, "raft.clock_skew_max_ms"),
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
            (
                "peer TLS without its CA",
                |c| {
                    c.security.peer_tls.cert_file = Some("node.pem".into());
                    c.security.peer_tls.key_file = Some("node.key".into());
                },
                "security.peer_tls.ca_file",
            ),
            ("no retention", |c| c.tasks.retention = 0, "tasks.retention"),
            ("no retained tasks", |c| c.tasks.retained_max = 0, "tasks.retained_max"),
            (
                "idempotency window shorter than the retention",
                |c| {
                    c.tasks.retention = 3_600;
                    c.tasks.idempotency_window = 60;
                },
                "tasks.idempotency_window",
            ),
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
    fn tls_keys_come_in_pairs_and_a_client_ca_needs_tls() {
        let problems = |pairs: &[(&str, &str)]| -> String {
            let loaded = Config::load(None, &env(pairs)).expect("loads");
            loaded.config.validate().err().map(|e| e.to_string()).unwrap_or_default()
        };
        let only_cert = problems(&[("MAOS_SECURITY_TLS_CERT_FILE", "/etc/maos/node.pem")]);
        assert!(only_cert.contains("security.tls.key_file"), "{only_cert}");
        let only_key = problems(&[("MAOS_SECURITY_TLS_KEY_FILE", "/etc/maos/node.key")]);
        assert!(only_key.contains("security.tls.cert_file"), "{only_key}");
        let ca_alone = problems(&[("MAOS_SECURITY_TLS_CLIENT_CA_FILE", "/etc/maos/clients.pem")]);
        assert!(ca_alone.contains("security.tls.client_ca_file"), "{ca_alone}");
        let agents_ca_alone = problems(&[("MAOS_SECURITY_TLS_CA_FILE", "/etc/maos/ca.pem")]);
        assert!(agents_ca_alone.contains("security.tls.ca_file: needs security.tls.cert_file"), "{agents_ca_alone}");
        let crl_alone = problems(&[("MAOS_SECURITY_TLS_CRL_FILE", "/etc/maos/revoked.pem")]);
        assert!(crl_alone.contains("security.tls.crl_file: needs security.tls.client_ca_file"), "{crl_alone}");
        let peer_crl_alone = problems(&[("MAOS_SECURITY_PEER_TLS_CRL_FILE", "/etc/maos/revoked.pem")]);
        assert!(peer_crl_alone.contains("security.peer_tls.crl_file: needs security.peer_tls"), "{peer_crl_alone}");
        let both = problems(&[
            ("MAOS_SECURITY_TLS_CERT_FILE", "/etc/maos/node.pem"),
            ("MAOS_SECURITY_TLS_KEY_FILE", "/etc/maos/node.key"),
        ]);
        assert!(!both.contains("security.tls"), "{both}");
    }

    #[test]
    fn tracing_takes_an_otlp_collector_and_refuses_the_guides_jaeger_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("maos.yml");
        let jaeger = "tracing:\n  enabled: true\n  jaeger:\n    agent_host: jaeger\n    agent_port: 6831\n";
        std::fs::write(&path, jaeger).expect("write");
        let loaded = Config::load(Some(&path), &env(&[])).expect("loads");
        let said = loaded.config.validate().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(said.contains("tracing.jaeger") && said.contains("tracing.otlp_endpoint"), "{said}");
        let problems = |pairs: &[(&str, &str)]| -> String {
            let loaded = Config::load(None, &env(pairs)).expect("loads");
            loaded.config.validate().err().map(|e| e.to_string()).unwrap_or_default()
        };
        let fine = problems(&[
            ("MAOS_TRACING_ENABLED", "true"),
            ("MAOS_TRACING_OTLP_ENDPOINT", "https://otel-collector:4317"),
            ("MAOS_TRACING_SAMPLE_RATIO", "0.25"),
        ]);
        assert!(fine.is_empty(), "{fine}");
        let long_name = "m".repeat(200);
        for (key, value, named) in [
            ("MAOS_TRACING_SAMPLE_RATIO", "1.5", "tracing.sample_ratio"),
            ("MAOS_TRACING_OTLP_ENDPOINT", "otel-collector:4317", "tracing.otlp_endpoint"),
            ("MAOS_TRACING_OTLP_ENDPOINT", "http://otel-collector:4317/v1/traces", "tracing.otlp_endpoint"),
            ("MAOS_TRACING_SERVICE_NAME", long_name.as_str(), "tracing.service_name"),
        ] {
            let said = problems(&[(key, value)]);
            assert!(said.contains(named), "{key}={value}: {said}");
        }
        assert!(!Config::default().tracing.enabled, "tracing is off unless configured");
    }

    #[test]
    fn metrics_are_on_unless_turned_off() {
        assert!(Config::default().metrics.enabled);
        let loaded = Config::load(None, &env(&[("MAOS_METRICS_ENABLED", "false")])).expect("loads");
        assert!(!loaded.config.metrics.enabled);
        assert!(loaded.config.validate().is_ok());
        let typo = Config::load(None, &env(&[("MAOS_METRICS_ENABLE", "false")])).expect("loads");
        assert!(typo.unknown_env.iter().any(|name| name == "MAOS_METRICS_ENABLE"), "{:?}", typo.unknown_env);
    }

    #[test]
    fn limits_on_the_api_port_are_bounded_and_named_when_wrong() {
        let problems = |pairs: &[(&str, &str)]| -> String {
            let loaded = Config::load(None, &env(pairs)).expect("loads");
            loaded.config.validate().err().map(|e| e.to_string()).unwrap_or_default()
        };
        let fine = problems(&[
            ("MAOS_SECURITY_RATE_LIMIT_REQUESTS_PER_SECOND", "2.5"),
            ("MAOS_SECURITY_RATE_LIMIT_BURST", "10"),
            ("MAOS_NETWORK_MAX_CONCURRENT_REQUESTS", "64"),
        ]);
        assert!(fine.is_empty(), "{fine}");
        for (key, value, named) in [
            ("MAOS_SECURITY_RATE_LIMIT_REQUESTS_PER_SECOND", "-1", "security.rate_limit.requests_per_second"),
            ("MAOS_SECURITY_RATE_LIMIT_BURST", "2000000", "security.rate_limit.burst"),
            ("MAOS_NETWORK_MAX_CONCURRENT_REQUESTS", "0", "network.max_concurrent_requests"),
            ("MAOS_NETWORK_MAX_STREAMS_PER_CONNECTION", "0", "network.max_streams_per_connection"),
            ("MAOS_NETWORK_REQUEST_TIMEOUT_MS", "10", "network.request_timeout_ms"),
        ] {
            let said = problems(&[(key, value)]);
            assert!(said.contains(named), "{key}={value}: {said}");
        }
        let defaults = Config::default();
        assert!(!defaults.security.rate_limit.enabled(), "no rate limit unless configured");
        assert_eq!(defaults.network.max_concurrent_requests, 4_096);
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
