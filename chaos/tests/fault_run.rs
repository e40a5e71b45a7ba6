//! A short run of the fault runner in the test command (issue 16, "Real processes too"): real
//! `maos serve` processes on hosts of their own, `kill -9`, pauses and partitions one at a time,
//! then the linearizability, exactly-once and double-run checks. The 30-minute run is
//! `maos-chaos faults --seconds 1800` (docs/RELIABILITY.md).

use std::time::Duration;

use maos_chaos::fault_run::{run, FaultRunOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_processes_under_kills_pauses_and_partitions_lose_nothing_and_never_run_twice() -> anyhow::Result<()> {
    // target/debug/deps/<this test> -> target/debug/maos
    let binary = std::env::current_exe()?
        .parent()
        .and_then(|deps| deps.parent())
        .map(|debug| debug.join("maos"))
        .ok_or_else(|| anyhow::anyhow!("no target directory above this test"))?;
    anyhow::ensure!(binary.exists(), "no maos binary at {}: cargo build --bin maos first", binary.display());
    let seed = std::env::var("MAOS_FAULT_RUN_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(7);
    let report = run(&FaultRunOptions { binary, duration: Duration::from_secs(50), seed }).await?;
    println!("{report}");
    assert!(report.passed(), "{report}");
    assert!(report.faults.len() >= 3, "too few faults injected: {report}");
    assert!(report.submits_acknowledged > 20 && report.writes_acknowledged > 50, "too little work: {report}");
    assert!(report.executions > 0, "no agent recorded an execution: {report}");
    Ok(())
}
