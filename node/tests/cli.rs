//! The `maos` command line against a real cluster: task and agent commands, tables and JSON,
//! leadership transfer, health, completions, and the exit codes scripts rely on.

#[path = "support/tasks.rs"]
mod common;

use std::path::Path;
use std::process::Command;

use common::{options, STEP};
use maos_testkit::local_cluster::LocalCluster;

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn maos(endpoints: &str, args: &[&str]) -> anyhow::Result<Run> {
    let output = Command::new(env!("CARGO_BIN_EXE_maos")).args(args).env("MAOS_ENDPOINTS", endpoints).output()?;
    Ok(Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into(),
        stderr: String::from_utf8_lossy(&output.stderr).into(),
    })
}

fn ok(run: Run) -> anyhow::Result<String> {
    anyhow::ensure!(run.code == 0, "exit {}: {}{}", run.code, run.stdout, run.stderr);
    Ok(run.stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_drives_tasks_and_agents_with_reliable_exit_codes() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let mut cluster = LocalCluster::new(Path::new(env!("CARGO_BIN_EXE_maos")), root.path(), options())?;
    cluster.start_all()?;
    let (leader, _) = cluster.wait_for_leader(&[1, 2, 3], STEP).await?;
    cluster.wait_ready(&[1, 2, 3], STEP).await?;
    let endpoints = cluster.client()?.endpoints().join(",");
    let e = endpoints.as_str();
    // Agents register shortly after the leader is known.
    let deadline = tokio::time::Instant::now() + STEP;
    while cluster.client()?.agents(0).await?.total < 6 {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "agents never registered");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    let out = ok(maos(e, &["task", "submit", "--type", "coder", "-d", "say hello", "--input", "hello", "--wait"])?)?;
    let task_id = out.lines().next().unwrap_or_default().to_string();
    assert!(out.contains("echo: hello"), "{out}");
    let shown: serde_json::Value = serde_json::from_str(&ok(maos(e, &["task", "show", &task_id, "--json"])?)?)?;
    assert_eq!((shown["state"].as_str(), shown["attempt"].as_u64()), (Some("COMPLETED"), Some(1)));
    let listed: serde_json::Value =
        serde_json::from_str(&ok(maos(e, &["task", "list", "--state", "completed", "--json"])?)?)?;
    assert!(listed.as_array().is_some_and(|l| l.iter().any(|t| t["task_id"] == task_id.as_str())), "{listed}");
    let table = ok(maos(e, &["task", "list"])?)?;
    assert!(table.starts_with("TASK") && table.contains(&task_id), "{table}");

    // Exit codes: refused input 3, unknown id 4, a failed task 7, an unreachable cluster 5.
    let refused = maos(e, &["task", "submit", "--type", "poet", "-d", "x"])?;
    assert_eq!(refused.code, 3, "{}", refused.stderr);
    assert!(refused.stderr.contains("task_type"), "{}", refused.stderr);
    let bad_priority = maos(e, &["task", "submit", "--type", "coder", "-d", "x", "--priority", "urgent"])?;
    assert!(bad_priority.code != 0 && bad_priority.stderr.contains("--priority"), "{}", bad_priority.stderr);
    assert_eq!(maos(e, &["task", "show", "no-such-task"])?.code, 4);
    let failed = maos(
        e,
        &["task", "submit", "--type", "coder", "-d", "doomed", "--input", "fail", "--max-retries", "0", "--wait"],
    )?;
    assert_eq!(failed.code, 7, "{}{}", failed.stdout, failed.stderr);
    let doomed = failed.stdout.lines().next().unwrap_or_default().to_string();
    assert_eq!(maos(e, &["task", "retry", &doomed])?.code, 0);
    let nowhere = maos("127.0.0.1:1", &["task", "list"])?;
    assert_eq!(nowhere.code, 5, "{}", nowhere.stderr);
    assert_eq!(maos("127.0.0.1:1", &["health"])?.code, 5);

    // Agents.
    let agents: serde_json::Value = serde_json::from_str(&ok(maos(e, &["agent", "list", "--json"])?)?)?;
    assert_eq!(agents.as_array().map(Vec::len), Some(6), "{agents}");
    let paused = ok(maos(e, &["agent", "pause", "n1/coder/0"])?)?;
    assert!(paused.contains("DRAINING"), "{paused}");
    ok(maos(e, &["agent", "resume", "n1/coder/0"])?)?;

    // Health, leadership, completions.
    let health = ok(maos(e, &["health", "--all-components"])?)?;
    assert!(health.contains("ready ok") && health.contains("agents:"), "{health}");
    let to = [1, 2, 3].into_iter().find(|id| *id != leader).expect("a follower");
    let moved = ok(maos(e, &["cluster", "transfer-leader", "--to", &to.to_string()])?)?;
    assert!(moved.contains(&format!("node {to} leads")), "{moved}");
    assert_eq!(cluster.wait_for_leader(&[1, 2, 3], STEP).await?.0, to);
    let completions = ok(maos(e, &["completions", "bash"])?)?;
    assert!(completions.contains("maos") && completions.contains("transfer-leader"), "completions");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_manual_bootstrap_the_cluster_forms_on_cluster_init() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let mut options = options();
    options.env.push(("MAOS_CLUSTER_BOOTSTRAP".into(), "manual".into()));
    let mut cluster = LocalCluster::new(Path::new(env!("CARGO_BIN_EXE_maos")), root.path(), options)?;
    let endpoint = cluster.nodes[&2].api_addr.clone();

    // One node down: init names it and forms nothing.
    cluster.start_node(1)?;
    cluster.start_node(2)?;
    let deadline = tokio::time::Instant::now() + STEP;
    let refused = loop {
        let run = maos(&endpoint, &["cluster", "init"])?;
        if run.code == 3 || tokio::time::Instant::now() > deadline {
            break run;
        }
        // Node 2 is still starting.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(refused.code, 3, "{}{}", refused.stdout, refused.stderr);
    assert!(refused.stderr.contains("peer 3") && refused.stderr.contains("does not answer"), "{}", refused.stderr);

    // All up: nothing forms by itself, then init forms it through any node.
    cluster.start_node(3)?;
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert_eq!(cluster.status(2).await?.leader_id, None, "a manual cluster waited for init");
    let out = ok(maos(&endpoint, &["cluster", "init"])?)?;
    assert!(out.contains("formed: leader node"), "{out}");
    cluster.wait_for_leader(&[1, 2, 3], STEP).await?;
    cluster.wait_ready(&[1, 2, 3], STEP).await?;
    let again: serde_json::Value = serde_json::from_str(&ok(maos(&endpoint, &["cluster", "init", "--json"])?)?)?;
    assert_eq!(again["already_initialized"], true, "{again}");
    assert_eq!(again["members"].as_array().map(Vec::len), Some(3), "{again}");
    cluster.stop();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn db_status_and_migrate_report_and_apply_the_schema() -> anyhow::Result<()> {
    let postgres = maos_testkit::local_services::Postgres::start()?;
    let url = postgres.url();
    let db = |args: &[&str]| {
        let mut all = vec!["db"];
        all.extend_from_slice(args);
        maos("", &all)
    };

    // A fresh database: every migration pending, exit 3, and the command to run named.
    let status = db(&["status", "--database-url", &url])?;
    assert_eq!(status.code, 3, "{}{}", status.stdout, status.stderr);
    assert!(status.stdout.contains("pending: run `maos db migrate`"), "{}", status.stdout);
    let pending = status.stdout.lines().filter(|l| l.trim_end().ends_with("pending")).count();
    assert_eq!(pending, 3, "{}", status.stdout);

    // Migrate applies them all; a second run has nothing to do.
    for _ in 0..2 {
        let migrated = ok(db(&["migrate", "--database-url", &url])?)?;
        assert!(migrated.contains("the schema is current"), "{migrated}");
    }
    let json: serde_json::Value = serde_json::from_str(&ok(db(&["status", "--json", "--database-url", &url])?)?)?;
    assert_eq!(json["pending"], 0, "{json}");
    let applied: Vec<i64> = json["migrations"]
        .as_array()
        .map(|m| m.iter().filter(|m| m["installed_on"].is_string()).filter_map(|m| m["version"].as_i64()).collect())
        .unwrap_or_default();
    assert_eq!(applied, [1, 2, 3], "{json}");
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' AND tablename NOT LIKE '\\_sqlx%' ORDER BY 1",
    )
    .fetch_all(&postgres.connect().await?)
    .await?;
    assert_eq!(
        tables,
        ["audit_log", "shared_state", "task_checkpoints", "task_events", "task_inputs", "task_results", "tasks"]
    );

    // No database there: exit 5 naming it. No URL at all: the key to set is named.
    let nowhere = db(&["status", "--database-url", "postgresql://maos@127.0.0.1:1/maos"])?;
    assert_eq!(nowhere.code, 5, "{}", nowhere.stderr);
    assert!(nowhere.stderr.contains("PostgreSQL at 127.0.0.1:1"), "{}", nowhere.stderr);
    let unset = db(&["status"])?;
    assert!(unset.code != 0 && unset.stderr.contains("database.primary_url"), "{}", unset.stderr);
    Ok(())
}
