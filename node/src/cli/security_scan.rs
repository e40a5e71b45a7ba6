//! `maos security-scan`: the operators' guide's post-deployment check. It inspects the local
//! configuration (and the files it names) and the running cluster, and prints each finding with
//! its severity and fix. The exit code is 8 when a finding is high.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use maos_client::proto::v1::auth_service_client::AuthServiceClient;
use maos_client::proto::v1::{ListKeysRequest, WhoAmIRequest};
use maos_node::config::{is_loopback, Config};
use maos_node::server::{probe_raft_port, RaftPortProbe};

use super::args::Target;
use super::output::{print_table, table};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Info,
    Low,
    Medium,
    High,
}

impl Severity {
    fn name(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::High => "high",
        }
    }
}

/// One finding: what, where, and the fix.
#[derive(Debug, Clone)]
pub struct Finding {
    pub severity: Severity,
    pub check: &'static str,
    pub subject: String,
    pub fix: String,
}

fn finding(severity: Severity, check: &'static str, subject: impl Into<String>, fix: impl Into<String>) -> Finding {
    Finding { severity, check, subject: subject.into(), fix: fix.into() }
}

/// A file that holds a secret must be readable by its owner only.
fn check_mode(findings: &mut Vec<Finding>, check: &'static str, path: &Path, allowed: u32) {
    let Ok(metadata) = std::fs::metadata(path) else { return };
    let mode = metadata.permissions().mode() & 0o777;
    if mode & !allowed != 0 {
        findings.push(finding(
            Severity::High,
            check,
            format!("{} has mode {mode:o}", path.display()),
            format!("chmod {allowed:o} {}", path.display()),
        ));
    }
}

/// How far ahead a certificate's expiry is reported.
const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 24 * 3600);

/// Each certificate in the PEM file at `path` (`key` names the setting): one that has expired or
/// is not valid yet is high, one that expires within 30 days of `now` (Unix seconds) medium, a
/// file that cannot be read or holds no certificate high.
fn check_certificates(findings: &mut Vec<Finding>, key: &str, path: &Path, now: i64) {
    let shown = path.display();
    let text = match std::fs::read(path) {
        Ok(text) => text,
        Err(e) => {
            let fix = format!("make {shown} readable by the node, or correct {key}");
            return findings.push(finding(Severity::High, "certificates", format!("{key}: {shown}: {e}"), fix));
        }
    };
    let mut seen = 0;
    for pem in x509_parser::pem::Pem::iter_from_buffer(&text) {
        let Ok(pem) = pem else { break };
        if pem.label != "CERTIFICATE" {
            continue;
        }
        seen += 1;
        let Ok(cert) = pem.parse_x509() else {
            let fix = format!("replace certificate {seen} in {shown} with a valid X.509 certificate");
            findings.push(finding(
                Severity::High,
                "certificates",
                format!("{key}: certificate {seen} in {shown} cannot be parsed"),
                fix,
            ));
            continue;
        };
        let validity = cert.validity();
        let (not_before, not_after) = (validity.not_before.timestamp(), validity.not_after.timestamp());
        let subject = format!("{key}: {shown} ({})", cert.subject());
        let fix = format!("renew it and write the new file over {shown} (read again within 2 s, no restart)");
        if not_after <= now {
            findings.push(finding(
                Severity::High,
                "certificates",
                format!("{subject} expired at {}", validity.not_after),
                fix,
            ));
        } else if not_before > now {
            findings.push(finding(
                Severity::High,
                "certificates",
                format!("{subject} is not valid until {}", validity.not_before),
                fix,
            ));
        } else if not_after - now < EXPIRY_WARNING.as_secs() as i64 {
            let days = (not_after - now) / 86_400;
            findings.push(finding(
                Severity::Medium,
                "certificates",
                format!("{subject} expires in {days} days ({})", validity.not_after),
                fix,
            ));
        }
    }
    if seen == 0 {
        let fix = format!("put the PEM certificate(s) in {shown}");
        findings.push(finding(Severity::High, "certificates", format!("{key}: {shown} holds no certificate"), fix));
    }
}

/// The findings about a node's configuration (the file's raw text too, for keys pasted into it).
pub fn scan_config(config: &Config, raw: Option<&str>) -> Vec<Finding> {
    let mut findings = Vec::new();
    let security = &config.security;
    if !security.auth.enabled {
        let severity = if is_loopback(&config.network.listen_addr) { Severity::Medium } else { Severity::High };
        findings.push(finding(
            severity,
            "auth",
            "security.auth.enabled is false: every caller is an admin",
            "set security.auth.enabled: true (docs/SECURITY.md, Bootstrap)",
        ));
    }
    if security.allow_insecure {
        findings.push(finding(Severity::High, "auth", "security.allow_insecure is true", "remove it and turn auth on"));
    }
    let peer_tls = &security.peer_tls;
    match &security.cluster_secret_file {
        None if !peer_tls.enabled() && !is_loopback(&config.network.raft_listen_addr) => findings.push(finding(
            Severity::High,
            "raft-port",
            format!("the Raft port {} is open to whoever reaches it", config.network.raft_listen_addr),
            "set security.peer_tls (mutual TLS) or security.cluster_secret_file on every node (openssl rand -hex 32 > FILE; chmod 600 FILE)",
        )),
        None => {}
        Some(path) => check_mode(&mut findings, "file-modes", path, 0o600),
    }
    let tls = &security.tls;
    match (&tls.cert_file, &tls.key_file) {
        (Some(_), Some(key)) => check_mode(&mut findings, "file-modes", key, 0o600),
        _ => {
            let severity = if is_loopback(&config.network.listen_addr) { Severity::Medium } else { Severity::High };
            findings.push(finding(
                severity,
                "tls",
                format!("port 8000 ({}) serves plaintext", config.network.listen_addr),
                "set security.tls.cert_file and security.tls.key_file (docs/SECURITY.md, TLS)",
            ));
        }
    }
    match &peer_tls.key_file {
        Some(key) if peer_tls.enabled() => check_mode(&mut findings, "file-modes", key, 0o600),
        _ => findings.push(finding(
            Severity::Medium,
            "tls",
            format!("the Raft port ({}) serves plaintext", config.network.raft_listen_addr),
            "set security.peer_tls.cert_file, key_file and ca_file on every node (docs/SECURITY.md, Mutual TLS between members)",
        )),
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    let certificates = [
        ("security.tls.cert_file", &tls.cert_file),
        ("security.tls.ca_file", &tls.ca_file),
        ("security.tls.client_ca_file", &tls.client_ca_file),
        ("security.peer_tls.cert_file", &peer_tls.cert_file),
        ("security.peer_tls.ca_file", &peer_tls.ca_file),
    ];
    for (key, path) in certificates {
        if let Some(path) = path {
            check_certificates(&mut findings, key, path, now);
        }
    }
    if !config.security.rate_limit.enabled() {
        findings.push(finding(
            Severity::Low,
            "limits",
            "security.rate_limit.requests_per_second is 0: a caller may make any number of calls",
            "set security.rate_limit.requests_per_second (and redis.url, so the limit is cluster-wide)",
        ));
    }
    let data_dir = &config.node.data_dir;
    check_mode(&mut findings, "file-modes", data_dir, 0o750);
    let token = data_dir.join("bootstrap-token");
    check_mode(&mut findings, "file-modes", &token, 0o600);
    check_mode(&mut findings, "file-modes", &data_dir.join("audit.jsonl"), 0o640);
    if let Some(path) = &config.agents.claude.api_key_file {
        check_mode(&mut findings, "file-modes", path, 0o600);
    }
    if raw.is_some_and(|text| text.contains("sk-ant-")) {
        findings.push(finding(
            Severity::High,
            "secrets",
            "the configuration file holds a Claude API key (sk-ant-…)",
            "move it to CLAUDE_API_KEY or agents.claude.api_key_file (mode 600) and rotate the key",
        ));
    }
    if let Some(url) = &config.database.primary_url {
        let tls = ["sslmode=require", "sslmode=verify-ca", "sslmode=verify-full"].iter().any(|m| url.contains(m));
        if !tls {
            findings.push(finding(
                Severity::Medium,
                "postgres",
                "database.primary_url does not require TLS",
                "add ?sslmode=verify-full (or require) to database.primary_url",
            ));
        }
    }
    if let Some(url) = &config.redis.url {
        let rest = url.split_once("://").map_or(url.as_str(), |(_, rest)| rest);
        if !rest.contains('@') {
            findings.push(finding(
                Severity::Medium,
                "redis",
                "redis.url has no password",
                "set requirepass on Redis and redis://:PASSWORD@host:6379/0 in redis.url",
            ));
        }
        if url.starts_with("redis://") {
            findings.push(finding(Severity::Low, "redis", "redis.url is plaintext", "use rediss:// (TLS)"));
        }
    }
    findings
}

/// The findings about a running cluster, through `target`.
pub async fn scan_cluster(target: &Target, comprehensive: bool) -> anyhow::Result<Vec<Finding>> {
    let mut findings = Vec::new();
    let client = super::client(target)?.with_deadline(Duration::from_secs(5));
    let channel = client.channel(0).ok_or_else(|| anyhow::anyhow!("no endpoint"))?;
    let endpoint = target.endpoints.first().cloned().unwrap_or_default();
    let anonymous = maos_client::Client::new_with_tls([endpoint.clone()], super::tls(target)?.as_ref())?;
    let mut stranger = AuthServiceClient::with_interceptor(channel.clone(), anonymous.authorization());
    match stranger.who_am_i(WhoAmIRequest {}).await {
        Ok(answer) if !answer.get_ref().auth_enabled => findings.push(finding(
            Severity::High,
            "auth",
            format!("{endpoint} answers callers without a token (auth is off)"),
            "set security.auth.enabled: true on every node",
        )),
        Ok(_) => {}
        Err(status) if status.code() == tonic::Code::Unauthenticated => {}
        Err(status) => findings.push(finding(
            Severity::Info,
            "auth",
            format!("{endpoint}: {}", status.message()),
            "check the endpoint (is it a MAOS node?)",
        )),
    }
    let (http, scheme) = super::http_of(target)?;
    let base = super::base_url(&endpoint, scheme);
    if base.starts_with("http://") {
        let host = base.trim_start_matches("http://");
        findings.push(finding(
            if is_loopback(host.split('/').next().unwrap_or_default()) { Severity::Medium } else { Severity::High },
            "tls",
            format!("{endpoint} is reached without TLS: tokens and task data cross the network in plain text"),
            "set security.tls.cert_file and key_file on every node, then pass --ca-file (or an https:// endpoint)",
        ));
        if http.get(format!("{base}/metrics")).send().await.is_ok_and(|r| r.status().is_success()) {
            findings.push(finding(
                Severity::Low,
                "metrics",
                format!("{base}/metrics is reachable without TLS"),
                "scrape over TLS (security.tls.*), or over a private network",
            ));
        }
    }
    let mut auth = AuthServiceClient::with_interceptor(channel.clone(), client.authorization());
    match auth.list_keys(ListKeysRequest {}).await {
        Ok(keys) => {
            let keys = keys.into_inner().keys;
            if keys.iter().any(|k| k.name == "bootstrap") {
                findings.push(finding(
                    Severity::Medium,
                    "bootstrap",
                    "the bootstrap admin key is still valid",
                    "create an admin key of your own (maos auth key create --role admin), then maos auth key revoke <bootstrap id>",
                ));
            }
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as u64;
            let soon = now + 30 * 86_400_000;
            for key in keys.iter().filter(|k| k.expires_at_ms > 0 && k.expires_at_ms < soon) {
                findings.push(finding(
                    Severity::Low,
                    "keys",
                    format!("API key {} ({}) expires within 30 days", key.id, key.name),
                    "create its replacement and deploy it before then",
                ));
            }
        }
        Err(status) if status.code() == tonic::Code::PermissionDenied => findings.push(finding(
            Severity::Info,
            "keys",
            "the token is not an admin's: keys were not inspected",
            "run the scan with an admin token for the key checks",
        )),
        Err(status) => findings.push(finding(Severity::Info, "keys", status.message().to_string(), "")),
    }
    if comprehensive {
        let status = client.status_of(0, false).await?;
        for member in &status.members {
            match probe_raft_port(&member.raft_addr).await {
                RaftPortProbe::Open => findings.push(finding(
                    Severity::High,
                    "raft-port",
                    format!("node {}'s Raft port {} answers strangers", member.id, member.raft_addr),
                    "set security.cluster_secret_file on every node",
                )),
                RaftPortProbe::Protected => {}
                RaftPortProbe::NotPlaintext(why) => findings.push(finding(
                    Severity::Info,
                    "raft-port",
                    format!(
                        "node {}'s Raft port {} takes connections but not plaintext gRPC (mutual TLS): {why}",
                        member.id, member.raft_addr
                    ),
                    "",
                )),
                RaftPortProbe::Unreachable(why) => findings.push(finding(
                    Severity::Info,
                    "raft-port",
                    format!("node {}'s Raft port {} is not reachable from here: {why}", member.id, member.raft_addr),
                    "",
                )),
            }
        }
    }
    Ok(findings)
}

/// Print the findings; an error (exit code 8) when one is high.
pub fn report(mut findings: Vec<Finding>, json: bool) -> anyhow::Result<()> {
    findings.sort_by_key(|f| std::cmp::Reverse(f.severity));
    if json {
        let rows: Vec<serde_json::Value> = findings
            .iter()
            .map(|f| serde_json::json!({"severity": f.severity.name(), "check": f.check, "finding": f.subject, "fix": f.fix}))
            .collect();
        println!("{}", serde_json::Value::Array(rows));
    } else {
        let mut rows = table(&["SEVERITY", "CHECK", "FINDING", "FIX"], &[]);
        for f in &findings {
            rows.add_row(vec![f.severity.name().to_string(), f.check.to_string(), f.subject.clone(), f.fix.clone()]);
        }
        print_table(&rows);
    }
    let high = findings.iter().filter(|f| f.severity == Severity::High).count();
    if high > 0 {
        return Err(HighFindings(high).into());
    }
    Ok(())
}

/// The scan found high findings (exit code 8).
#[derive(Debug, thiserror::Error)]
#[error("{0} high finding(s)")]
pub struct HighFindings(pub usize);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_default_config_has_only_the_tls_and_raft_port_findings() {
        let mut config = Config::default();
        config.node.data_dir = std::env::temp_dir().join("maos-scan-test-none");
        let checks: Vec<&str> =
            scan_config(&config, None).iter().filter(|f| f.severity == Severity::High).map(|f| f.check).collect();
        assert_eq!(checks, vec!["raft-port", "tls"]);
    }

    #[test]
    fn with_peer_tls_the_raft_port_has_no_finding_but_its_key_mode() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("peer.key");
        std::fs::write(&key, "key").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut config = Config::default();
        config.node.data_dir = std::env::temp_dir().join("maos-scan-test-none");
        config.security.peer_tls.cert_file = Some(dir.path().join("peer.pem"));
        config.security.peer_tls.key_file = Some(key.clone());
        config.security.peer_tls.ca_file = Some(dir.path().join("ca.pem"));
        let findings = scan_config(&config, None);
        let raft_port = config.network.raft_listen_addr.clone();
        assert!(!findings.iter().any(|f| f.check == "raft-port"), "no secret is needed with mutual TLS");
        assert!(!findings.iter().any(|f| f.subject.contains(&format!("({raft_port}) serves plaintext"))));
        assert!(findings.iter().any(|f| f.check == "file-modes" && f.subject.contains("peer.key")));
    }

    #[test]
    fn insecure_settings_and_pasted_keys_are_high() {
        let mut config = Config::default();
        config.node.data_dir = std::env::temp_dir().join("maos-scan-test-none");
        config.security.auth.enabled = false;
        config.security.allow_insecure = true;
        config.database.primary_url = Some("postgresql://maos:pw@db:5432/maos".into());
        config.redis.url = Some("redis://cache:6379/0".into());
        let findings = scan_config(&config, Some("agents:\n  claude: # sk-ant-api03-xyz\n"));
        let has = |check: &str, severity: Severity| findings.iter().any(|f| f.check == check && f.severity == severity);
        assert!(has("auth", Severity::High) && has("secrets", Severity::High));
        assert!(has("postgres", Severity::Medium) && has("redis", Severity::Medium) && has("redis", Severity::Low));
        assert!(has("limits", Severity::Low), "no rate limit is reported");
        config.security.rate_limit.requests_per_second = 100.0;
        assert!(!scan_config(&config, None).iter().any(|f| f.check == "limits"));
    }

    #[test]
    fn certificates_that_expire_within_30_days_or_are_not_valid_now_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["node.example".to_string()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2030, 1, 1);
        params.not_after = rcgen::date_time_ymd(2031, 1, 1);
        let pem = params.self_signed(&key).unwrap().pem();
        // A key in the same file is skipped; every certificate of a chain is checked.
        let chain = dir.path().join("chain.pem");
        std::fs::write(&chain, format!("{}{pem}{pem}", key.serialize_pem())).unwrap();
        let at = |now: i64| {
            let mut findings = Vec::new();
            check_certificates(&mut findings, "security.tls.cert_file", &chain, now);
            findings.iter().map(|f| (f.severity, f.subject.clone())).collect::<Vec<_>>()
        };
        assert_eq!(at(1_906_502_400), vec![], "2030-06-01: valid for months");
        let soon = at(1_923_955_200); // 2030-12-20
        assert_eq!(soon.len(), 2, "{soon:?}");
        assert!(soon.iter().all(|(s, f)| *s == Severity::Medium && f.contains("expires in 12 days")), "{soon:?}");
        let expired = at(1_927_670_400); // 2031-02-01
        assert!(expired.iter().all(|(s, f)| *s == Severity::High && f.contains("expired at")), "{expired:?}");
        let early = at(1_874_966_400); // 2029-06-01
        assert!(early.iter().all(|(s, f)| *s == Severity::High && f.contains("not valid until")), "{early:?}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, key.serialize_pem()).unwrap();
        let mut findings = Vec::new();
        check_certificates(&mut findings, "security.tls.client_ca_file", &empty, 0);
        check_certificates(&mut findings, "security.peer_tls.ca_file", &dir.path().join("missing.pem"), 0);
        assert!(findings[0].subject.contains("holds no certificate"), "{findings:?}");
        assert!(findings[1].subject.starts_with("security.peer_tls.ca_file:"), "{findings:?}");
        assert!(findings.iter().all(|f| f.severity == Severity::High));
    }

    #[test]
    fn a_token_file_readable_by_others_is_high() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("bootstrap-token");
        std::fs::write(&token, "maos_x").unwrap();
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let mut config = Config::default();
        config.node.data_dir = dir.path().to_path_buf();
        let findings = scan_config(&config, None);
        assert!(findings.iter().any(|f| f.check == "file-modes" && f.subject.contains("bootstrap-token")));
    }
}
