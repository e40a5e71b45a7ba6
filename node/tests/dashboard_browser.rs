//! The dashboard in a real browser: a real 3-node cluster, 10,000 tasks submitted in batches,
//! then `node --test node/tests/browser/dashboard.test.mjs` drives Debian's chromium through
//! playwright-core against every node's dashboard (overview with three nodes and the leader, a
//! planned workflow's DAG reaching COMPLETED live, a `<script>` description shown as text, the
//! list page's load time with 10,000 tasks, the agents page, a leader kill seen live).
//!
//! playwright-core (pinned in `node/tests/browser/package-lock.json`) is installed by
//! `scripts/setup.sh`'s `setup_browser_tests` into `$CARGO_TARGET_DIR/browser-tests`, or found
//! through `MAOS_BROWSER_MODULES`. The runner's output is printed as it runs; its screenshots
//! are kept in the directory printed at the start (`MAOS_SCREENSHOTS` to choose it).

#[path = "support/tasks.rs"]
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::{tasks_client, STEP};
use maos_client::proto::v1::{BatchSubmitRequest, Priority, SubmitTaskRequest};
use maos_testkit::local_cluster::{LocalCluster, LocalClusterOptions};

/// Tasks in the list whose load time is measured.
const BULK_TASKS: usize = 10_000;
/// Tasks per batch submit (the API's most).
const BATCH: usize = 1_000;
/// The whole browser run, at most.
const RUN_TIMEOUT: Duration = Duration::from_secs(300);
/// Builtin agents of the default pool: five types, two slots each, on each of three nodes.
const BUILTIN_AGENTS: u64 = 30;

/// The target directory (…/<target>/debug/deps/<test> → …/<target>).
fn target_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    Ok(exe
        .ancestors()
        .nth(3)
        .ok_or_else(|| anyhow::anyhow!("no target directory above {}", exe.display()))?
        .to_path_buf())
}

fn browser_modules() -> anyhow::Result<PathBuf> {
    let dir = match std::env::var_os("MAOS_BROWSER_MODULES") {
        Some(dir) => PathBuf::from(dir),
        None => target_dir()?.join("browser-tests"),
    };
    anyhow::ensure!(
        dir.join("node_modules/playwright-core/package.json").exists(),
        "{} has no node_modules/playwright-core: run `. scripts/setup.sh && setup_browser_tests` (it installs the pinned playwright-core and Debian's chromium) or set MAOS_BROWSER_MODULES",
        dir.display()
    );
    anyhow::ensure!(
        Path::new("/usr/bin/chromium").exists(),
        "/usr/bin/chromium is missing: `apt-get install chromium` (scripts/setup.sh does)"
    );
    Ok(dir)
}

/// Short leases so the killed leader's work moves within seconds; unserved types accepted, so
/// the bulk tasks stay queued (nothing serves them) and the list holds all of them.
fn options() -> LocalClusterOptions {
    let env = [
        ("MAOS_SCHEDULER_LEASE_MS", "3000"),
        ("MAOS_SCHEDULER_LEASE_RENEW_INTERVAL_MS", "500"),
        ("MAOS_SCHEDULER_ACCEPT_UNSERVED_TYPES", "true"),
    ];
    LocalClusterOptions { env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(), ..Default::default() }
}

fn json_of(map: BTreeMap<String, String>) -> String {
    serde_json::to_string(&map).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_passes_its_browser_tests_against_a_real_cluster() -> anyhow::Result<()> {
    let modules = browser_modules()?;
    let root = tempfile::tempdir()?;
    let screenshots = match std::env::var_os("MAOS_SCREENSHOTS") {
        Some(dir) => PathBuf::from(dir),
        None => target_dir()?.join("dashboard-screenshots"),
    };
    std::fs::create_dir_all(&screenshots)?;
    println!("dashboard browser test: screenshots in {}", screenshots.display());
    let mut cluster = LocalCluster::new(Path::new(env!("CARGO_BIN_EXE_maos")), root.path(), options())?;
    cluster.start_all()?;
    cluster.wait_for_leader(&[1, 2, 3], STEP).await?;
    cluster.wait_ready(&[1, 2, 3], STEP).await?;
    let client = cluster.client()?;
    let deadline = tokio::time::Instant::now() + STEP;
    while client.agents(0).await?.total < BUILTIN_AGENTS {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "the builtin agents never registered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let started = std::time::Instant::now();
    let mut tasks = tasks_client(&cluster, 1)?;
    for batch in 0..BULK_TASKS / BATCH {
        let items = (0..BATCH)
            .map(|i| SubmitTaskRequest {
                task_type: "bulk".into(),
                description: format!("bulk task {} of {BULK_TASKS}", batch * BATCH + i + 1),
                input: "{}".into(),
                priority: Priority::Low as i32,
                submitter: "bulk-loader".into(),
                ..Default::default()
            })
            .collect();
        let answer = tasks.batch_submit(BatchSubmitRequest { tasks: items }).await?.into_inner();
        let refused: Vec<&str> = answer.results.iter().filter(|r| r.code != 0).map(|r| r.error.as_str()).collect();
        anyhow::ensure!(refused.is_empty(), "bulk submits refused: {refused:?}");
    }
    println!("dashboard browser test: {BULK_TASKS} tasks submitted in {} ms", started.elapsed().as_millis());

    let mut dashboards = BTreeMap::new();
    let mut apis = BTreeMap::new();
    let mut pids = BTreeMap::new();
    for (id, node) in &cluster.nodes {
        dashboards.insert(id.to_string(), format!("http://{}", node.dashboard_addr));
        apis.insert(id.to_string(), format!("http://{}", node.api_addr));
        pids.insert(
            id.to_string(),
            cluster.pid(*id).ok_or_else(|| anyhow::anyhow!("node {id} is not running"))?.to_string(),
        );
    }
    let pids_json =
        format!("{{{}}}", pids.iter().map(|(id, pid)| format!("\"{id}\": {pid}")).collect::<Vec<_>>().join(", "));
    let tests = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/dashboard.test.mjs");
    // The runner's output goes straight to this process's stdout and stderr, so its summary is
    // in the test command's log whether the test passes or fails.
    let mut runner = tokio::process::Command::new("node")
        .arg("--test")
        .arg("--test-reporter=spec")
        .arg(&tests)
        .env("MAOS_DASHBOARDS", json_of(dashboards))
        .env("MAOS_APIS", json_of(apis))
        .env("MAOS_PIDS", pids_json)
        .env("MAOS_BROWSER_MODULES", &modules)
        .env("MAOS_SCREENSHOTS", &screenshots)
        .env("MAOS_BULK_TASKS", BULK_TASKS.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            anyhow::anyhow!("cannot run `node --test` (is Node.js installed? scripts/setup.sh installs it): {e}")
        })?;
    let status = tokio::time::timeout(RUN_TIMEOUT, runner.wait())
        .await
        .map_err(|_| anyhow::anyhow!("the browser tests did not finish within {} s", RUN_TIMEOUT.as_secs()))??;
    if !status.success() {
        for id in [1, 2, 3] {
            eprintln!("--- node {id} log tail ---\n{}", cluster.log_tail(id, 30));
        }
        anyhow::bail!(
            "the browser tests failed ({status}); their output is above, screenshots in {}",
            screenshots.display()
        );
    }
    Ok(())
}
