//! The deployment files in `deploy/` stay true to the code: they parse, the configuration each
//! node gets from them validates, and the alert rules use metrics that nodes export. (The
//! container image and the orchestrators themselves are not run here: this machine has no
//! container engine.)

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use maos_node::config::Config;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn documents(path: &Path) -> anyhow::Result<Vec<serde_yaml::Value>> {
    let text = std::fs::read_to_string(path)?;
    let mut out = Vec::new();
    for document in serde_yaml::Deserializer::from_str(&text) {
        out.push(serde::Deserialize::deserialize(document).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?);
    }
    Ok(out)
}

#[test]
fn every_node_of_the_compose_file_gets_a_valid_configuration() -> anyhow::Result<()> {
    let compose = &documents(&deploy().join("compose/docker-compose.yml"))?[0];
    let services = compose["services"].as_mapping().ok_or_else(|| anyhow::anyhow!("no services"))?;
    let mut nodes = 0;
    for (name, service) in services {
        let name = name.as_str().unwrap_or_default();
        if !name.starts_with("maos-") {
            continue;
        }
        let env: BTreeMap<String, String> = service["environment"]
            .as_mapping()
            .map(|m| m.iter().filter_map(|(k, v)| Some((k.as_str()?.to_string(), v.as_str()?.to_string()))).collect())
            .unwrap_or_default();
        let loaded = Config::load(Some(&deploy().join("config/maos.yml")), &env)?;
        loaded.config.validate().map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        assert!(loaded.unknown_env.is_empty(), "{name}: unknown variables {:?}", loaded.unknown_env);
        nodes += 1;
    }
    assert_eq!(nodes, 3);
    Ok(())
}

#[test]
fn the_postgresql_compose_override_gives_every_node_a_valid_configuration() -> anyhow::Result<()> {
    let base = &documents(&deploy().join("compose/docker-compose.yml"))?[0];
    let over = &documents(&deploy().join("compose/docker-compose.postgres.yml"))?[0];
    let env_of = |service: &serde_yaml::Value| -> BTreeMap<String, String> {
        service["environment"]
            .as_mapping()
            .map(|m| m.iter().filter_map(|(k, v)| Some((k.as_str()?.to_string(), v.as_str()?.to_string()))).collect())
            .unwrap_or_default()
    };
    for name in ["maos-0", "maos-1", "maos-2"] {
        let mut env = env_of(&base["services"][name]);
        env.extend(env_of(&over["services"][name]));
        assert!(env.contains_key("MAOS_DATABASE_PRIMARY_URL") && env.contains_key("MAOS_REDIS_URL"), "{name}");
        let loaded = Config::load(Some(&deploy().join("config/maos.yml")), &env)?;
        loaded.config.validate().map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        assert!(loaded.unknown_env.is_empty(), "{name}: unknown variables {:?}", loaded.unknown_env);
    }
    assert!(over["services"]["postgres"]["image"].as_str().is_some_and(|i| i.starts_with("postgres:15")));
    assert!(over["services"]["redis"]["image"].as_str().is_some_and(|i| i.starts_with("redis:7")));
    Ok(())
}

#[test]
fn every_pod_of_the_kubernetes_statefulset_gets_a_valid_configuration() -> anyhow::Result<()> {
    let docs = documents(&deploy().join("kubernetes/maos.yaml"))?;
    let config_map = docs.iter().find(|d| d["kind"] == "ConfigMap").ok_or_else(|| anyhow::anyhow!("no ConfigMap"))?;
    let text = config_map["data"]["maos.yml"].as_str().ok_or_else(|| anyhow::anyhow!("no maos.yml"))?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("maos.yml");
    std::fs::write(&file, text)?;
    let set = docs.iter().find(|d| d["kind"] == "StatefulSet").ok_or_else(|| anyhow::anyhow!("no StatefulSet"))?;
    let replicas = set["spec"]["replicas"].as_u64().unwrap_or(0);
    assert_eq!(replicas, 3);
    for ordinal in 0..replicas {
        // What the pod's command does: the node id from its ordinal, the advertised addresses
        // from its stable name.
        let env = BTreeMap::from([("MAOS_NODE_ID".to_string(), (ordinal + 1).to_string())]);
        let mut config = Config::load(Some(&file), &env)?.config;
        config.network.advertise_addr = Some(format!("maos-{ordinal}.maos:8000"));
        config.network.raft_advertise_addr = Some(format!("maos-{ordinal}.maos:7000"));
        config.validate().map_err(|e| anyhow::anyhow!("pod maos-{ordinal}: {e}"))?;
    }
    let probes = &set["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(probes["livenessProbe"]["httpGet"]["path"], "/health");
    assert_eq!(probes["readinessProbe"]["httpGet"]["path"], "/ready");
    Ok(())
}

#[test]
fn alert_rules_use_metrics_the_nodes_export() -> anyhow::Result<()> {
    let prometheus = &documents(&deploy().join("prometheus/prometheus.yml"))?[0];
    let rule_file = prometheus["rule_files"][0].as_str().unwrap_or_default();
    let rules = &documents(&deploy().join("prometheus").join(rule_file))?[0];
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let exported = std::fs::read_to_string(source.join("telemetry/metrics.rs"))?;
    let mut checked = 0;
    for group in rules["groups"].as_sequence().into_iter().flatten() {
        for rule in group["rules"].as_sequence().into_iter().flatten() {
            let expr = rule["expr"].as_str().unwrap_or_default();
            for name in
                expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|w| w.starts_with("maos_"))
            {
                // A histogram's series are its family's name with a suffix.
                let family = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
                let quoted = format!("\"{family}\"");
                assert!(exported.contains(&quoted), "alert {:?} uses {name}, which no node exports", rule["alert"]);
                checked += 1;
            }
        }
    }
    assert!(checked >= 6, "the rules name the metrics they watch");
    Ok(())
}
