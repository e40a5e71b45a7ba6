//! A client in another language works from the proto alone: Python stubs are generated from
//! `client/proto` with grpcio-tools, and `client/examples/python/submit_and_watch.py` submits a
//! task and watches it to completion against a real cluster.
//!
//! The Python environment (grpcio, grpcio-tools) is made by `scripts/setup.sh`; the test finds it
//! through `MAOS_TEST_PYTHON` or at `$CARGO_TARGET_DIR/python-grpc`.

#[path = "support/tasks.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{options, STEP};
use maos_testkit::local_cluster::LocalCluster;

fn python() -> anyhow::Result<PathBuf> {
    if let Ok(path) = std::env::var("MAOS_TEST_PYTHON") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe()?;
    // .../<target>/debug/deps/<test> → .../<target>/python-grpc/bin/python
    let target = exe.ancestors().nth(3).ok_or_else(|| anyhow::anyhow!("no target directory"))?;
    let python = target.join("python-grpc/bin/python");
    anyhow::ensure!(
        python.exists(),
        "{} is missing: run scripts/setup.sh (it makes a venv with grpcio and grpcio-tools) or set MAOS_TEST_PYTHON",
        python.display()
    );
    Ok(python)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_client_generated_from_the_proto_submits_and_watches_a_task() -> anyhow::Result<()> {
    let python = python()?;
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let generated = tempfile::tempdir()?;
    let protos: Vec<PathBuf> = std::fs::read_dir(repo.join("client/proto/maos/v1"))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|e| e == "proto"))
        .collect();
    let status = Command::new(&python)
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(repo.join("client/proto"))
        .arg(format!("--python_out={}", generated.path().display()))
        .arg(format!("--grpc_python_out={}", generated.path().display()))
        .args(&protos)
        .status()?;
    anyhow::ensure!(status.success(), "protoc for Python failed");

    let root = tempfile::tempdir()?;
    let mut cluster = LocalCluster::new(Path::new(env!("CARGO_BIN_EXE_maos")), root.path(), options())?;
    cluster.start_all()?;
    let (leader, _) = cluster.wait_for_leader(&[1, 2, 3], STEP).await?;
    cluster.wait_ready(&[1, 2, 3], STEP).await?;
    let deadline = tokio::time::Instant::now() + STEP;
    while cluster.client()?.agents(0).await?.total < 6 {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "agents never registered");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let follower = [1, 2, 3].into_iter().find(|id| *id != leader).expect("a follower");
    let endpoint = cluster.nodes[&follower].api_addr.clone();
    let output = Command::new(&python)
        .arg(repo.join("client/examples/python/submit_and_watch.py"))
        .args([endpoint.as_str(), "coder", "from python", "sleep:300"])
        .env("PYTHONPATH", generated.path())
        .output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    anyhow::ensure!(
        output.status.success(),
        "python exited {:?}:\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<serde_json::Value> = stdout.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
    let task_id = lines[0]["submitted"].as_str().unwrap_or_default().to_string();
    let events: Vec<&serde_json::Value> = lines.iter().filter(|l| l["task_id"] == task_id.as_str()).collect();
    assert!(events.iter().any(|e| e["state"] == "TASK_STATE_RUNNING"), "{stdout}");
    let last = events.last().ok_or_else(|| anyhow::anyhow!("no events:\n{stdout}"))?;
    assert_eq!((last["state"].as_str(), last["finished"].as_bool()), (Some("TASK_STATE_COMPLETED"), Some(true)));
    assert!(last["result"].as_str().unwrap_or_default().contains("sleep:300"), "{stdout}");
    assert!(lines.iter().any(|l| l["unknown_task_code"] == "NOT_FOUND"), "{stdout}");
    let view = cluster.client()?.task(&task_id).await?;
    assert_eq!(view.submitter, "anonymous");
    Ok(())
}
