//! Loading a configuration in one place: the YAML file, then `MAOS_*` environment variables
//! (the key path upper-cased, nesting joined by `_`; values read as YAML), then `maos serve`'s
//! flags ([`Flags`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_yaml::Value;

use super::schema::{parse_peer_list, Config};
use super::validate::{problem, ConfigError};

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

/// The flags of `maos serve` that override configuration keys; applied after the file and the
/// environment.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Flags {
    /// Overrides node.id.
    #[arg(long)]
    pub node_id: Option<u64>,
    /// Overrides node.data_dir.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Overrides network.listen_addr (client API).
    #[arg(long)]
    pub listen: Option<String>,
    /// Overrides network.raft_listen_addr.
    #[arg(long)]
    pub raft_listen: Option<String>,
    /// Overrides network.advertise_addr.
    #[arg(long)]
    pub advertise: Option<String>,
    /// Overrides network.raft_advertise_addr.
    #[arg(long)]
    pub raft_advertise: Option<String>,
    /// Overrides cluster.peers: ID=RAFT_ADDR/API_ADDR, comma-separated.
    #[arg(long)]
    pub peers: Option<String>,
    /// Overrides cluster.name.
    #[arg(long)]
    pub cluster_name: Option<String>,
}

impl Config {
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

    /// Apply `maos serve`'s flags over the file and the environment; a malformed `--peers` is
    /// named with how to write it.
    pub fn apply_flags(&mut self, flags: &Flags) -> Result<(), String> {
        if let Some(id) = flags.node_id {
            self.node.id = id;
        }
        if let Some(dir) = &flags.data_dir {
            self.node.data_dir = dir.clone();
        }
        if let Some(addr) = &flags.listen {
            self.network.listen_addr = addr.clone();
        }
        if let Some(addr) = &flags.raft_listen {
            self.network.raft_listen_addr = addr.clone();
        }
        if let Some(addr) = &flags.advertise {
            self.network.advertise_addr = Some(addr.clone());
        }
        if let Some(addr) = &flags.raft_advertise {
            self.network.raft_advertise_addr = Some(addr.clone());
        }
        if let Some(peers) = &flags.peers {
            self.cluster.peers = parse_peer_list(peers).map_err(|e| format!("--peers: {e}"))?;
        }
        if let Some(name) = &flags.cluster_name {
            self.cluster.name = name.clone();
        }
        Ok(())
    }
}
