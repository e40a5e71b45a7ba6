//! The command backend with real subprocess agents (small Python scripts): memory limit,
//! timeout, cancel, the envelope and line protocol, output caps, and no orphan left behind.

use std::path::{Path, PathBuf};
use std::time::Duration;

use maos_node::agents::command::CommandBackend;
use maos_node::agents::envelope::{AgentEvent, ApiAccess, Envelope, EnvelopeCheckpoint, OutcomeKind};
use maos_node::agents::keeper::Keeper;
use tokio::sync::mpsc;

const PYTHON: &str = "/usr/bin/python3";

fn backend(script: &str, max_memory_bytes: u64, timeout: Duration) -> CommandBackend {
    CommandBackend {
        program: vec![PYTHON.into(), "-c".into(), script.into()],
        env: [("AGENT_MODE".to_string(), "test".to_string())].into(),
        max_memory_bytes,
        timeout,
        keeper: None,
    }
}

fn envelope() -> Envelope {
    Envelope {
        format: 1,
        task_id: "task-1".into(),
        attempt: 2,
        agent_id: "n1/coder/0".into(),
        task_type: "coder".into(),
        description: "write it".into(),
        input: "the input".into(),
        planning: false,
        dependency_results: Default::default(),
        checkpoint: Some(EnvelopeCheckpoint { data: "step 3".into(), attempt: 1 }),
        fencing_token: 99,
        timeout_ms: 60_000,
        checkpoint_interval_ms: 1_000,
        api: ApiAccess {
            endpoint: "http://127.0.0.1:8000".into(),
            credential: "maos1:99:ab:task-1".into(),
            ..Default::default()
        },
        trace_parent: String::new(),
    }
}

/// Whether `pid` is a live process (a zombie waiting to be reaped counts as gone).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()) != Some("Z"),
        Err(_) => false,
    }
}

/// The pids a script wrote to `path`, once it has written `count` of them.
async fn pids_in(path: &Path, count: usize) -> anyhow::Result<Vec<u32>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let pids: Vec<u32> = std::fs::read_to_string(path)
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        if pids.len() >= count {
            return Ok(pids);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the agent never wrote {count} pids to {}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_gone(pids: &[u32]) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|p| alive(*p)) {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "still running: {:?}",
            pids.iter().filter(|p| alive(**p)).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// A script that starts a `sleep` child in its group, writes both pids to `path`, then runs `rest`.
fn with_child(path: &Path, rest: &str) -> String {
    format!(
        "import os, subprocess, sys, time\n\
         child = subprocess.Popen(['sleep', '300'])\n\
         open({path:?}, 'w').write(f'{{os.getpid()}} {{child.pid}}')\n\
         {rest}\n",
        path = path.display().to_string()
    )
}

fn pid_file(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("pids")
}

#[tokio::test]
async fn an_agent_reads_its_envelope_reports_progress_and_checkpoints_and_answers() -> anyhow::Result<()> {
    let script = r#"
import json, os, sys
envelope = json.load(sys.stdin)
sys.stderr.write("starting\n")
sys.stderr.write('@maos {"progress": 50, "message": "half way"}\n')
sys.stderr.write('@maos {"checkpoint": "step 4"}\n')
sys.stderr.flush()
print(json.dumps({"result": {
    "input": envelope["input"], "attempt": envelope["attempt"], "token": envelope["fencing_token"],
    "resumed_from": envelope["checkpoint"]["data"], "credential": bool(envelope["api"]["credential"]),
    "mode": os.environ.get("AGENT_MODE"), "leaked": "CLAUDE_API_KEY" in os.environ,
}}))
"#;
    std::env::set_var("CLAUDE_API_KEY", "must-not-reach-agents");
    let (events, mut received) = mpsc::channel(16);
    let outcome = backend(script, 256 << 20, Duration::from_secs(30)).run(&envelope(), events).await;
    let OutcomeKind::Completed(result) = outcome.kind else { panic!("{outcome:?}") };
    let result: serde_json::Value = serde_json::from_str(&result)?;
    assert_eq!(
        result,
        serde_json::json!({"input": "the input", "attempt": 2, "token": 99, "resumed_from": "step 3",
            "credential": true, "mode": "test", "leaked": false})
    );
    let mut seen = Vec::new();
    while let Ok(event) = received.try_recv() {
        seen.push(event);
    }
    assert_eq!(
        seen,
        vec![
            AgentEvent::Progress { percent: 50, message: "half way".into() },
            AgentEvent::Checkpoint { data: "step 4".into() }
        ]
    );
    Ok(())
}

#[tokio::test]
async fn a_memory_hungry_agent_is_killed_at_its_limit() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = pid_file(&dir);
    // Grows by 8 MiB every 10 ms, touching every page, towards 2 GiB.
    let script = with_child(
        &path,
        "hog = []\nfor _ in range(256):\n    hog.append(bytearray(8 << 20))\n    time.sleep(0.01)\nprint('{\"result\": \"survived\"}')",
    );
    let (events, _received) = mpsc::channel(16);
    let outcome = backend(&script, 64 << 20, Duration::from_secs(60)).run(&envelope(), events).await;
    match &outcome.kind {
        OutcomeKind::Failed { error, .. } => {
            assert!(error.contains("killed at its memory limit") && error.contains("max_memory 64 MiB"), "{error}")
        }
        other => panic!("the agent was not stopped at its limit: {other:?}"),
    }
    wait_gone(&pids_in(&path, 2).await?).await
}

#[tokio::test]
async fn a_sudden_huge_allocation_hits_the_address_space_limit() -> anyhow::Result<()> {
    let script = "import sys\nx = bytearray(8 << 30)\nprint('{\"result\": \"allocated\"}')";
    let (events, _received) = mpsc::channel(16);
    let outcome = backend(script, 64 << 20, Duration::from_secs(30)).run(&envelope(), events).await;
    match &outcome.kind {
        OutcomeKind::Failed { error, .. } => assert!(error.contains("MemoryError"), "{error}"),
        other => panic!("{other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn a_hung_agent_is_killed_at_its_timeout_with_its_children() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = pid_file(&dir);
    let script = with_child(&path, "time.sleep(600)");
    let (events, _received) = mpsc::channel(16);
    let started = std::time::Instant::now();
    let outcome = backend(&script, 256 << 20, Duration::from_secs(1)).run(&envelope(), events).await;
    match &outcome.kind {
        OutcomeKind::Failed { error, retryable: true } => assert!(error.contains("killed at its timeout"), "{error}"),
        other => panic!("{other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    wait_gone(&pids_in(&path, 2).await?).await
}

#[tokio::test]
async fn cancelling_an_attempt_kills_its_whole_process_group() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = pid_file(&dir);
    let script = with_child(&path, "time.sleep(600)");
    let agent = backend(&script, 256 << 20, Duration::from_secs(600));
    let attempt = tokio::spawn(async move {
        let (events, _received) = mpsc::channel(16);
        agent.run(&envelope(), events).await
    });
    let pids = pids_in(&path, 2).await?;
    assert!(pids.iter().all(|p| alive(*p)), "both run before the cancel");
    // Cancel, lease loss and shutdown all drop the attempt.
    attempt.abort();
    let _ = attempt.await;
    wait_gone(&pids).await
}

#[tokio::test]
async fn an_agent_that_exits_leaves_no_orphan_and_failures_carry_stderr() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = pid_file(&dir);
    let script = with_child(&path, "sys.stderr.write('cannot parse the input\\n')\nsys.exit(3)");
    let (events, _received) = mpsc::channel(16);
    let outcome = backend(&script, 256 << 20, Duration::from_secs(30)).run(&envelope(), events).await;
    match &outcome.kind {
        OutcomeKind::Failed { error, retryable: true } => {
            assert!(error.contains("exited with status 3") && error.contains("cannot parse the input"), "{error}")
        }
        other => panic!("{other:?}"),
    }
    wait_gone(&pids_in(&path, 2).await?).await
}

#[tokio::test]
async fn protocol_breaches_fail_with_the_fix_named() -> anyhow::Result<()> {
    let (events, _received) = mpsc::channel(16);
    let plain = backend("print('just text')", 256 << 20, Duration::from_secs(30)).run(&envelope(), events).await;
    assert!(
        matches!(&plain.kind, OutcomeKind::Failed { error, retryable: false } if error.contains("{\"result\": ...}")),
        "{plain:?}"
    );
    let (events, _received) = mpsc::channel(16);
    let flood = backend("import sys\nsys.stdout.write('x' * (1 << 20))", 256 << 20, Duration::from_secs(30))
        .run(&envelope(), events)
        .await;
    assert!(
        matches!(&flood.kind, OutcomeKind::Failed { error, .. } if error.contains("more than 65536 bytes")),
        "{flood:?}"
    );
    let missing = CommandBackend {
        program: vec!["/nonexistent/agent".into()],
        env: Default::default(),
        max_memory_bytes: 1 << 30,
        timeout: Duration::from_secs(5),
        keeper: None,
    };
    let (events, _received) = mpsc::channel(16);
    let outcome = missing.run(&envelope(), events).await;
    assert!(outcome.spawn_failed, "{outcome:?}");
    assert!(
        matches!(&outcome.kind, OutcomeKind::Failed { error, .. } if error.contains("could not start the agent program"))
    );
    Ok(())
}

/// The fence keeper (`maos agent-keeper`, a process of its own) kills an agent whose time runs
/// out though nothing in this process stops it, and leaves alone one whose time is extended.
#[tokio::test]
async fn the_fence_keeper_kills_an_agent_whose_lease_is_not_proven_in_time() -> anyhow::Result<()> {
    let keeper = std::sync::Arc::new(Keeper::spawn(Path::new(env!("CARGO_BIN_EXE_maos")))?);
    let mut sleeper =
        backend("import time\ntime.sleep(30)\nprint('{\"result\": \"slept\"}')", 256 << 20, Duration::from_secs(60));
    sleeper.keeper = Some(keeper.clone());
    let token = envelope().fencing_token;
    let started = std::time::Instant::now();
    keeper.prove(token, started + Duration::from_millis(800));
    let (events, _received) = mpsc::channel(16);
    let outcome = tokio::time::timeout(Duration::from_secs(20), sleeper.run(&envelope(), events)).await?;
    let took = started.elapsed();
    assert!(matches!(outcome.kind, OutcomeKind::Failed { .. }), "{outcome:?}");
    assert!(took >= Duration::from_millis(700) && took < Duration::from_secs(5), "killed after {took:?}");

    // Proven again and again, it runs to its end.
    let mut quick =
        backend("import time\ntime.sleep(1.5)\nprint('{\"result\": \"slept\"}')", 256 << 20, Duration::from_secs(60));
    quick.keeper = Some(keeper.clone());
    let (events, _received) = mpsc::channel(16);
    let prover = {
        let keeper = keeper.clone();
        tokio::spawn(async move {
            for _ in 0..40 {
                keeper.prove(token, std::time::Instant::now() + Duration::from_millis(500));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let outcome = quick.run(&envelope(), events).await;
    prover.abort();
    assert_eq!(outcome.kind, OutcomeKind::Completed("slept".into()));
    Ok(())
}
