//! Metrics, alerts and the Grafana dashboard, checked with Debian's real `promtool` (installed
//! next to the build by `scripts/setup.sh`'s `setup_promtool`): a live node's `/metrics` after a
//! workload passes `promtool check metrics` with no lint problem, counters of events never go
//! down (an operator's retry of a failed task does not lower `maos_tasks_failed_total`), the alert
//! rules pass `check rules` and their unit tests (`test rules`), and every dashboard expression is
//! valid PromQL over metrics the node exports.

#[path = "support/tasks.rs"]
mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{tasks_client, wait_all, STEP};
use maos_client::proto::v1::agent_service_client::AgentServiceClient;
use maos_client::proto::v1::{AgentRequest, ListAgentsRequest, RetryTaskRequest, SubmitTaskRequest, TaskState};
use maos_node::telemetry::metrics::CATALOGUE;
use maos_testkit::local_cluster::{LocalCluster, LocalClusterOptions};

/// promtool: `MAOS_PROMTOOL`, or where `setup_promtool` unpacks it, or on the PATH.
fn promtool() -> PathBuf {
    if let Some(path) = std::env::var_os("MAOS_PROMTOOL") {
        return PathBuf::from(path);
    }
    if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
        let unpacked = Path::new(&target).join("prometheus/usr/bin/promtool");
        if unpacked.exists() {
            return unpacked;
        }
    }
    let on_path = Command::new("promtool").arg("--version").output();
    assert!(
        on_path.is_ok_and(|o| o.status.success()),
        "promtool not found: run `. scripts/setup.sh; setup_promtool` (or set MAOS_PROMTOOL)"
    );
    PathBuf::from("promtool")
}

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Run promtool with `args` (and `stdin`), returning its output; fails the test on a non-zero exit.
fn run_promtool(args: &[&str], stdin: Option<&str>, dir: &Path) -> String {
    let mut child = Command::new(promtool())
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs");
    let mut input = child.stdin.take().expect("stdin");
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).expect("write to promtool");
    }
    drop(input);
    let out = child.wait_with_output().expect("promtool ends");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

/// The metric names an expression uses (`maos_*`, histogram series folded to their family).
fn metric_names(expr: &str) -> BTreeSet<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("maos_"))
        .map(|w| {
            let family = ["_bucket", "_sum", "_count"].iter().find_map(|s| w.strip_suffix(s));
            family.filter(|f| CATALOGUE.iter().any(|m| m.name == *f)).unwrap_or(w).to_string()
        })
        .collect()
}

fn assert_exported(names: &BTreeSet<String>, what: &str) {
    for name in names {
        assert!(
            CATALOGUE.iter().any(|m| m.name == name),
            "{what} uses {name}, which no node exports (docs/METRICS.md)"
        );
    }
}

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests() {
    let dir = deploy().join("prometheus");
    run_promtool(&["check", "rules", "maos_alerts.yml"], None, &dir);
    let tested = run_promtool(&["test", "rules", "maos_alerts_test.yml"], None, &dir);
    assert!(tested.contains("SUCCESS"), "{tested}");
    // Every alert has a unit test, and every metric an alert uses is exported.
    let rules: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(dir.join("maos_alerts.yml")).expect("rules")).expect("YAML");
    let tests = std::fs::read_to_string(dir.join("maos_alerts_test.yml")).expect("tests");
    let mut alerts = 0;
    for rule in rules["groups"][0]["rules"].as_sequence().expect("rules") {
        let name = rule["alert"].as_str().expect("alert name");
        assert!(tests.contains(&format!("alertname: {name}")), "alert {name} has no unit test");
        assert_exported(&metric_names(rule["expr"].as_str().expect("expr")), name);
        alerts += 1;
    }
    assert!(alerts >= 8, "{alerts} alerts");
}

#[test]
fn dashboard_panels_are_valid_promql_over_exported_metrics() {
    let dir = deploy().join("grafana");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("dashboards/maos-overview.json")).expect("dashboard"))
            .expect("JSON");
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(target["expr"].as_str().expect("expr").replace("$instance", ".*"));
        }
    }
    assert!(exprs.len() >= 20, "{} expressions", exprs.len());
    // Each expression becomes a recording rule, which promtool parses and checks.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, expr) in exprs.iter().enumerate() {
        rules.push_str(&format!(
            "      - record: dashboard:panel_{i}\n        expr: {}\n",
            serde_json::to_string(expr).expect("quoted")
        ));
        assert_exported(&metric_names(expr), &format!("dashboard expression {expr:?}"));
    }
    let scratch = tempfile::tempdir().expect("temp dir");
    std::fs::write(scratch.path().join("dashboard.yml"), rules).expect("write rules");
    run_promtool(&["check", "rules", "dashboard.yml"], None, scratch.path());
    for file in ["provisioning/datasources/prometheus.yml", "provisioning/dashboards/maos.yml"] {
        let text = std::fs::read_to_string(dir.join(file)).expect("provisioning");
        let parsed: serde_yaml::Value = serde_yaml::from_str(&text).expect("YAML");
        assert_eq!(parsed["apiVersion"].as_u64(), Some(1), "{file}");
    }
}

async fn fetch_metrics(addr: &str) -> anyhow::Result<String> {
    let response =
        reqwest::Client::new().get(format!("http://{addr}/metrics")).timeout(Duration::from_secs(5)).send().await?;
    anyhow::ensure!(response.status().is_success(), "/metrics answered {}", response.status());
    Ok(response.text().await?)
}

/// The sum of every sample of `name` (any labels) in a Prometheus text.
fn total(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| line.strip_prefix(name).is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{')))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_metrics_pass_promtool_and_counters_never_go_down() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let mut options = common::options();
    options.env.retain(|(k, _)| k != "MAOS_AGENTS_TYPES");
    options.env.push(("MAOS_AGENTS_TYPES".into(), "{coder: {slots: 2}, solo: {slots: 1}}".into()));
    let mut cluster = LocalCluster::new(Path::new(env!("CARGO_BIN_EXE_maos")), root.path(), options)?;
    cluster.start_all()?;
    let (leader, _) = cluster.wait_for_leader(&[1, 2, 3], STEP).await?;
    cluster.wait_ready(&[1, 2, 3], STEP).await?;
    let mut client = tasks_client(&cluster, leader)?;
    let submit = |task_type: &str, input: &str, max_retries: u32| SubmitTaskRequest {
        task_type: task_type.into(),
        description: format!("{task_type} {input}"),
        input: input.into(),
        max_retries,
        ..Default::default()
    };
    let mut done = Vec::new();
    for input in ["a", "b", "c", "fail:1"] {
        done.push(client.submit(submit("coder", input, 2)).await?.into_inner().task_id);
    }
    let failing = client.submit(submit("solo", "fail", 0)).await?.into_inner().task_id;
    wait_all(&mut client, &done, TaskState::Completed).await?;
    wait_all(&mut client, std::slice::from_ref(&failing), TaskState::Failed).await?;

    // Every node counts every applied event: each node's own series is complete.
    let addrs: Vec<String> = cluster.nodes.values().map(|n| n.api_addr.clone()).collect();
    let deadline = tokio::time::Instant::now() + STEP;
    let mut failed_seen = vec![0.0; addrs.len()];
    for (i, addr) in addrs.iter().enumerate() {
        loop {
            let text = fetch_metrics(addr).await?;
            let settled = total(&text, "maos_tasks_completed_total") == 4.0
                && total(&text, "maos_tasks_failed_total") == 1.0
                && text.contains("maos_tasks_failed_total{cause=\"retries_exhausted\"} 1")
                && total(&text, "maos_task_retries_total") >= 1.0
                && total(&text, "maos_task_attempts_total") >= 6.0;
            if settled {
                failed_seen[i] = total(&text, "maos_tasks_failed_total");
                break;
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "node at {addr} never counted the workload:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    // Hold the failed task QUEUED on retry (its type's agents paused): a counter of failures must
    // not go down although no task is FAILED any more.
    let channel = cluster.client_of(leader)?.channel(0).ok_or_else(|| anyhow::anyhow!("no channel"))?;
    let mut agents = AgentServiceClient::new(channel);
    for agent in agents.list(ListAgentsRequest { node_id: 0 }).await?.into_inner().agents {
        if agent.agent_type == "solo" {
            agents.pause(AgentRequest { agent_id: agent.agent_id }).await?;
        }
    }
    client.retry(RetryTaskRequest { task_id: failing.clone() }).await?;
    for (i, addr) in addrs.iter().enumerate() {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            let text = fetch_metrics(addr).await?;
            let failed = total(&text, "maos_tasks_failed_total");
            assert!(
                failed >= failed_seen[i],
                "maos_tasks_failed_total went down on {addr}: {} -> {failed}",
                failed_seen[i]
            );
            failed_seen[i] = failed;
            if text.contains("maos_tasks{state=\"queued\"} 1") {
                assert!(text.contains("maos_tasks{state=\"failed\"} 0"), "{text}");
                break;
            }
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "the retried task never showed QUEUED:\n{text}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // promtool's own lint on each node's exposition, after the workload.
    let scratch = tempfile::tempdir()?;
    for addr in &addrs {
        let text = fetch_metrics(addr).await?;
        let lint = run_promtool(&["check", "metrics"], Some(&text), scratch.path());
        assert!(lint.trim().is_empty(), "promtool check metrics on {addr}:\n{lint}");
        for family in
            ["maos_task_queue_wait_seconds", "maos_task_attempt_duration_seconds", "maos_raft_apply_duration_seconds"]
        {
            assert!(text.contains(&format!("# TYPE {family} histogram")), "{family} on {addr}:\n{text}");
        }
        // Every family exported is in the catalogue (so in docs/METRICS.md).
        for line in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
            let name = line.split(' ').next().unwrap_or_default();
            assert!(CATALOGUE.iter().any(|m| m.name == name), "{name} is exported but not in the catalogue");
        }
    }
    let leader_text = fetch_metrics(&cluster.nodes[&leader].api_addr).await?;
    assert!(leader_text.contains("maos_task_submit_duration_seconds_count{surface=\"grpc\"}"), "{leader_text}");
    assert!(leader_text.contains("maos_raft_committed_index"), "{leader_text}");
    let _ = LocalClusterOptions::default();
    Ok(())
}
