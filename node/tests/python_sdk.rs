//! The Python SDK (`sdk/python`, package `maos`) against a real 3-node cluster with TLS and auth
//! on (as a production cluster runs: the SDK finds the CA and the token in `MAOS_CA_FILE` and
//! `MAOS_TOKEN`, as the CLI does): its pytest suite
//! (`sdk/python/tests`) submits and watches a planned workflow, runs Python workers (one is
//! `kill -9`ed mid-task and its successor resumes from the checkpoint), checks refusals name the
//! field, runs 200 concurrent async submits, fails over past a dead endpoint and uses the
//! key-value space; then a watch and a worker from Python outlive the node serving them (killed
//! here).
//!
//! The venv (pinned pytest, grpcio, …, and the SDK installed from `./sdk/python`) is made by
//! `scripts/setup.sh`'s `setup_python_sdk`; the test finds it through `MAOS_TEST_PYTHON_SDK` or at
//! `$CARGO_TARGET_DIR/python-sdk`.

#[path = "support/certs.rs"]
mod certs;
#[path = "support/tasks.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::STEP;
use maos_testkit::local_cluster::{LocalCluster, LocalClusterOptions, TlsFiles};

/// The whole pytest run, at most.
const PYTEST_TIMEOUT: Duration = Duration::from_secs(300);
/// Builtin agents of the default pool: five types, two slots each, on each of three nodes.
const BUILTIN_AGENTS: u64 = 30;

fn python() -> anyhow::Result<PathBuf> {
    if let Ok(path) = std::env::var("MAOS_TEST_PYTHON_SDK") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe()?;
    // .../<target>/debug/deps/<test> → .../<target>/python-sdk/bin/python
    let target = exe.ancestors().nth(3).ok_or_else(|| anyhow::anyhow!("no target directory"))?;
    let python = target.join("python-sdk/bin/python");
    anyhow::ensure!(
        python.exists(),
        "{} is missing: run `. scripts/setup.sh && setup_python_sdk` (it makes the venv and installs ./sdk/python) or set MAOS_TEST_PYTHON_SDK",
        python.display()
    );
    Ok(python)
}

/// Short leases so a killed worker's task moves within seconds; the default agent pool (with the
/// coordinator that plans `mixed` tasks); TLS on port 8000 with `tls`; auth on; tracing on at
/// sample ratio 0, so only calls that bring a sampled trace context are traced (`test_tracing.py`;
/// their spans go nowhere: nothing listens on the discard port).
fn options(tls: TlsFiles) -> LocalClusterOptions {
    let env = [
        ("MAOS_SCHEDULER_LEASE_MS", "3000"),
        ("MAOS_SCHEDULER_LEASE_RENEW_INTERVAL_MS", "500"),
        ("MAOS_TRACING_ENABLED", "true"),
        ("MAOS_TRACING_SAMPLE_RATIO", "0.0"),
        ("MAOS_TRACING_OTLP_ENDPOINT", "http://127.0.0.1:9"),
    ];
    LocalClusterOptions {
        env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        tls: Some(tls),
        auth: true,
        ..Default::default()
    }
}

/// What the SDK reads from the environment to reach `cluster`: the CA at `ca_file` and an
/// admin's token.
fn sdk_env(cluster: &LocalCluster, ca_file: &Path) -> anyhow::Result<Vec<(&'static str, String)>> {
    let token = cluster.bootstrap_token().ok_or_else(|| anyhow::anyhow!("no bootstrap token"))?;
    Ok(vec![("MAOS_CA_FILE", ca_file.display().to_string()), ("MAOS_TOKEN", token)])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdk_passes_its_tests_against_a_real_cluster() -> anyhow::Result<()> {
    let python = python()?;
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let root = tempfile::tempdir()?;
    let tls = certs::api_tls(root.path())?;
    let ca_file = tls.ca_file.clone();
    let mut cluster = LocalCluster::new(Path::new(env!("CARGO_BIN_EXE_maos")), root.path(), options(tls))?;
    cluster.start_all()?;
    cluster.wait_for_leader(&[1, 2, 3], STEP).await?;
    cluster.wait_ready(&[1, 2, 3], STEP).await?;
    let client = cluster.client()?;
    let deadline = tokio::time::Instant::now() + STEP;
    while client.agents(0).await?.total < BUILTIN_AGENTS {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "the builtin agents never registered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let endpoints = client.endpoints().join(",");
    let run = tokio::process::Command::new(&python)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "sdk/python/tests"])
        .current_dir(&repo)
        .env("MAOS_TEST_ENDPOINTS", &endpoints)
        .envs(sdk_env(&cluster, &ca_file)?)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(PYTEST_TIMEOUT, run)
        .await
        .map_err(|_| anyhow::anyhow!("pytest did not finish within {} s", PYTEST_TIMEOUT.as_secs()))??;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    if !output.status.success() {
        for id in [1, 2, 3] {
            eprintln!("--- node {id} log tail ---\n{}", cluster.log_tail(id, 20));
        }
    }
    anyhow::ensure!(output.status.success(), "pytest exited {:?}; its output is above", output.status);
    anyhow::ensure!(stdout.contains(" passed"), "pytest ran no test:\n{stdout}");

    // Last, since it kills a node: a watch outlives the node that serves it.
    watch_through_a_node_kill(&python, &repo, &mut cluster, &ca_file).await
}

/// `sdk/python/tests/watch_through_kill.py` watches a task, and runs a worker, through node 1;
/// node 1 is killed once the watch has its first event; the watch must reopen elsewhere and see
/// the task complete, and the worker must take a task submitted after the kill.
async fn watch_through_a_node_kill(
    python: &Path,
    repo: &Path,
    cluster: &mut LocalCluster,
    ca_file: &Path,
) -> anyhow::Result<()> {
    let endpoints: Vec<String> = cluster.nodes.values().map(|n| n.api_addr.clone()).collect();
    let mut child = tokio::process::Command::new(python)
        .arg("sdk/python/tests/watch_through_kill.py")
        .arg(endpoints.join(","))
        .envs(sdk_env(cluster, ca_file)?)
        .current_dir(repo)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let first = tokio::time::timeout(STEP, lines.next_line())
        .await
        .map_err(|_| anyhow::anyhow!("the watcher printed nothing within {} s", STEP.as_secs()))??
        .unwrap_or_default();
    let first: serde_json::Value = serde_json::from_str(&first)?;
    anyhow::ensure!(first["via"] == endpoints[0].as_str(), "the watcher did not start on node 1: {first}");
    cluster.kill(1)?;
    let last = tokio::time::timeout(PYTEST_TIMEOUT, lines.next_line())
        .await
        .map_err(|_| anyhow::anyhow!("the watch did not end within {} s of the kill", PYTEST_TIMEOUT.as_secs()))??
        .unwrap_or_default();
    let status = tokio::time::timeout(STEP, child.wait()).await??;
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        tokio::io::AsyncReadExt::read_to_string(&mut pipe, &mut stderr).await?;
    }
    anyhow::ensure!(status.success(), "the watcher exited {status:?} after node 1 was killed: {last}\n{stderr}");
    let last: serde_json::Value = serde_json::from_str(&last)?;
    assert_eq!((last["task_id"].as_str(), last["state"].as_str()), (first["watching"].as_str(), Some("COMPLETED")));
    assert_eq!(last["worker_task"], "COMPLETED", "a worker's stream moves off the killed node: {last}");
    assert_eq!(last["worker_result"], "served after the kill: ping");
    Ok(())
}
