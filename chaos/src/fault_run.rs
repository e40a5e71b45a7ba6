//! The fault runner: real `maos serve` processes, each on a host of its own ([`crate::netns`]),
//! under a mixed workload while faults hit them one at a time: `kill -9` (the leader or another
//! node) and a restart from its data, a pause of the node's process (`SIGSTOP` for 2–10 s; its
//! agents run on, so only its fence keeper can stop them in time), and a real partition (the node's link down for 2–10 s). Then everything is
//! healed and the history is checked as the simulation checks its own:
//! - the shared keys' history is linearizable ([`crate::invariants::linearizable`]);
//! - every acknowledged submit made exactly its task, an unanswered one at most one
//!   ([`crate::invariants::submits_exist_once`]), and every task completed;
//! - no attempt ran twice and no two executions of one task overlapped, from the agents' own
//!   start and tick records, written on the one clock every process here shares
//!   ([`double_runs`]);
//! - the agent of a partitioned or paused node stopped before the task's next attempt began;
//! - after healing, a write commits and every replica holds the same state.
//!
//! The agents are `command` agents (a Python script, [`TICKER`]) that record each execution in a
//! file of its own: `<task>.<attempt>.<node>.<pid>`, a `start` line, a `tick` line every 50 ms,
//! an `end` line. Needs root (network namespaces) and `python3`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use maos_client::proto::v1::{ListTasksRequest, SubmitTaskRequest, TaskState};
use maos_client::Client;
use maos_testkit::local_cluster::{LocalCluster, LocalClusterOptions};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::invariants;
use crate::linearizability::{Operation, Output};
use crate::netns::Hosts;
use crate::workload::shared_operation;

const NODES: u64 = 3;
const LEASE_MS: u64 = 3_000;
const SHARED_CLIENTS: u64 = 3;
/// Shared keys move to fresh names every epoch, so each key's history stays small enough for
/// the linearizability search however long the run.
const KEY_EPOCH: Duration = Duration::from_secs(15);
const KEYS_PER_EPOCH: u64 = 2;
const STEP: Duration = Duration::from_secs(60);
/// After the faults end, the drain waits while tasks keep finishing: it gives up when none has
/// finished for this long (a long run ends with a backlog its few agent slots take minutes to
/// work off, so a fixed window failed a 30-minute run that was still draining)...
const DRAIN_STALL: Duration = Duration::from_secs(180);
/// ...or after this long in all.
const DRAIN_MAX: Duration = Duration::from_secs(1_800);

/// The agent program: records its execution, works for `ms:<n>` of its input, answers.
pub const TICKER: &str = r#"
import json, os, sys, time
directory, node = sys.argv[1], sys.argv[2]
envelope = json.load(sys.stdin)
text = envelope.get("input", "")
ms = int(text[3:]) if text.startswith("ms:") else 1000
path = os.path.join(directory, "%s.%d.%s.%d" % (envelope["task_id"], envelope["attempt"], node, os.getpid()))
def note(kind):
    with open(path, "a") as f:
        f.write("%s %d\n" % (kind, int(time.time() * 1000)))
note("start")
end = time.time() + ms / 1000.0
while time.time() < end:
    time.sleep(0.05)
    note("tick")
note("end")
print(json.dumps({"result": "worked %d ms" % ms}))
"#;

/// What to run.
#[derive(Debug, Clone)]
pub struct FaultRunOptions {
    /// The `maos` binary.
    pub binary: PathBuf,
    /// How long faults are injected; the drain and checks come after.
    pub duration: Duration,
    /// Picks the faults, their targets and timings, and the workload's choices.
    pub seed: u64,
}

/// One injected fault, in wall-clock milliseconds.
#[derive(Debug, Clone)]
pub struct Fault {
    pub kind: &'static str,
    pub node: u64,
    pub was_leader: bool,
    pub from_ms: u64,
    pub to_ms: u64,
}

/// One execution of an attempt, as its agent recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Execution {
    pub task_id: String,
    pub attempt: u32,
    pub node: u64,
    pub pid: u32,
    pub first_ms: u64,
    pub last_ms: u64,
    pub ended: bool,
}

/// What a run did and found.
#[derive(Debug, Default)]
pub struct FaultRunReport {
    pub seed: u64,
    pub faults: Vec<Fault>,
    pub shared_operations: usize,
    pub shared_unanswered: usize,
    pub writes_acknowledged: usize,
    pub submits: usize,
    pub submits_acknowledged: usize,
    pub tasks_completed: usize,
    /// Tasks still open when the drain gave up (0 when every task finished).
    pub tasks_open: usize,
    /// From healing until every task had finished (or the drain gave up).
    pub drain_seconds: f64,
    pub lost: usize,
    pub duplicated: usize,
    pub executions: usize,
    pub double_runs: Vec<String>,
    /// For each partition or pause that caught an agent at work: when it stopped and when the
    /// next attempt began, in ms after the fault began.
    pub cut_off_agents: Vec<String>,
    pub failures: Vec<String>,
    pub seconds: f64,
}

impl FaultRunReport {
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    /// Faults by kind.
    pub fn fault_counts(&self) -> BTreeMap<&'static str, usize> {
        let mut counts = BTreeMap::new();
        for fault in &self.faults {
            *counts.entry(fault.kind).or_default() += 1;
        }
        counts
    }
}

impl std::fmt::Display for FaultRunReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "fault run, seed {}: {:.0} s", self.seed, self.seconds)?;
        writeln!(f, "  faults injected: {} {:?}", self.faults.len(), self.fault_counts())?;
        writeln!(
            f,
            "  shared-key operations: {} ({} unanswered), writes acknowledged: {}",
            self.shared_operations, self.shared_unanswered, self.writes_acknowledged
        )?;
        writeln!(
            f,
            "  submits: {} ({} acknowledged), tasks completed: {}, still open: {} (drain {:.0} s), lost: {}, duplicated: {}",
            self.submits,
            self.submits_acknowledged,
            self.tasks_completed,
            self.tasks_open,
            self.drain_seconds,
            self.lost,
            self.duplicated
        )?;
        for fault in &self.faults {
            writeln!(
                f,
                "    {}: {} of node {}{} for {} ms",
                fault.from_ms,
                fault.kind,
                fault.node,
                if fault.was_leader { " (the leader)" } else { "" },
                fault.to_ms.saturating_sub(fault.from_ms)
            )?;
        }
        writeln!(f, "  executions recorded: {}, double runs: {}", self.executions, self.double_runs.len())?;
        for line in &self.double_runs {
            writeln!(f, "    double run: {line}")?;
        }
        for line in &self.cut_off_agents {
            writeln!(f, "  cut off: {line}")?;
        }
        if self.failures.is_empty() {
            writeln!(f, "  passed")
        } else {
            for failure in &self.failures {
                writeln!(f, "  FAILED: {failure}")?;
            }
            Ok(())
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[derive(Default)]
struct Observed {
    history: Vec<Operation>,
    acknowledged_writes: usize,
    submits: Vec<invariants::Submit>,
}

type Shared = Arc<Mutex<Observed>>;

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, Observed> {
    shared.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Run the faults for `options.duration`, then heal, drain and check. `Err` only when the run
/// could not be set up or driven (no namespaces, a node that never starts); what the checks find
/// is in the report's `failures`.
pub async fn run(options: &FaultRunOptions) -> anyhow::Result<FaultRunReport> {
    let started = Instant::now();
    let root = tempfile::tempdir()?;
    // MAOS_FAULT_RUN_KEEP=1 keeps the nodes' logs and the agents' records for a look afterwards.
    let kept = std::env::var("MAOS_FAULT_RUN_KEEP").is_ok_and(|v| v == "1");
    let hosts = Hosts::create(&(1..=NODES).collect::<Vec<_>>())?;
    let script = root.path().join("ticker.py");
    std::fs::write(&script, TICKER)?;
    let records = root.path().join("executions");
    std::fs::create_dir_all(&records)?;

    let env = [
        ("MAOS_SCHEDULER_LEASE_MS", LEASE_MS.to_string()),
        ("MAOS_SCHEDULER_LEASE_RENEW_INTERVAL_MS", "500".to_string()),
        ("MAOS_DASHBOARD_ENABLED", "false".to_string()),
    ];
    let cluster_options = LocalClusterOptions {
        env: env.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
        // The nodes listen beyond loopback, which needs auth on.
        auth: true,
        ..Default::default()
    };
    let mut cluster = LocalCluster::new(&options.binary, root.path(), cluster_options)?;
    for id in 1..=NODES {
        let address = hosts.address(id);
        let node = cluster.nodes.get_mut(&id).context("planned node")?;
        for addr in [&mut node.api_addr, &mut node.raft_addr] {
            let port = addr.rsplit(':').next().unwrap_or_default().to_string();
            *addr = format!("{address}:{port}");
        }
        let types = format!(
            "{{ticker: {{backend: command, command: [python3, {}, {}, '{id}'], slots: 2}}}}",
            script.display(),
            records.display()
        );
        cluster.set_node_env(id, "MAOS_AGENTS_TYPES", &types);
        cluster.set_launcher(id, hosts.launcher(id));
    }
    let all: Vec<u64> = (1..=NODES).collect();
    cluster.start_all()?;
    cluster.wait_for_leader(&all, STEP).await?;
    cluster.wait_ready(&all, STEP).await?;
    let token = cluster.wait_for_bootstrap_token(STEP).await?;
    let endpoints: Vec<String> = cluster.nodes.values().map(|n| n.api_addr.clone()).collect();
    let client_from = |first: usize| -> anyhow::Result<Client> {
        let mut rotated = endpoints.clone();
        rotated.rotate_left(first % endpoints.len());
        Ok(Client::new(rotated)?
            .with_deadline(Duration::from_secs(4))
            .with_attempt_timeout(Duration::from_secs(1))
            .with_credentials(&token)?)
    };
    let admin = client_from(0)?;
    let deadline = Instant::now() + STEP;
    while admin.agents(0).await.map(|a| a.total).unwrap_or(0) < NODES * 2 {
        anyhow::ensure!(Instant::now() < deadline, "the ticker agents never registered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let shared: Shared = Arc::default();
    let until = Instant::now() + options.duration;
    let epoch = Instant::now();
    let mut workers = Vec::new();
    for id in 0..SHARED_CLIENTS {
        let client = client_from(id as usize)?;
        workers.push(tokio::spawn(shared_client(id, options.seed, client, epoch, until, shared.clone())));
    }
    workers.push(tokio::spawn(task_client(options.seed, client_from(1)?, until, shared.clone())));

    let mut report = FaultRunReport { seed: options.seed, ..Default::default() };
    let mut rng = StdRng::seed_from_u64(options.seed);
    while Instant::now() + Duration::from_secs(12) < until {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(1_000..4_000))).await;
        // One fault at a time, on a whole cluster: wait for every node to agree on a leader first.
        let leader = match cluster.wait_for_leader(&all, Duration::from_secs(20)).await {
            Ok((leader, _)) => leader,
            Err(e) => {
                report.failures.push(format!("no agreed leader 20 s after the fault {:?}: {e}", report.faults.last()));
                break;
            }
        };
        let node = if rng.gen_bool(0.5) { leader } else { rng.gen_range(1..=NODES) };
        let from_ms = now_ms();
        let kind = match rng.gen_range(0..3) {
            0 => {
                cluster.kill(node)?;
                tokio::time::sleep(Duration::from_millis(rng.gen_range(500..3_000))).await;
                cluster.start_node(node)?;
                "kill -9 and restart"
            }
            1 => {
                // The node alone: its agents (and its fence keeper) run on.
                cluster.signal(node, libc::SIGSTOP)?;
                tokio::time::sleep(Duration::from_millis(rng.gen_range(2_000..10_000))).await;
                cluster.signal(node, libc::SIGCONT)?;
                "pause (SIGSTOP of the node)"
            }
            _ => {
                hosts.cut(node)?;
                tokio::time::sleep(Duration::from_millis(rng.gen_range(2_000..10_000))).await;
                hosts.heal(node)?;
                "partition (link down)"
            }
        };
        report.faults.push(Fault { kind, node, was_leader: node == leader, from_ms, to_ms: now_ms() });
    }
    for worker in workers {
        worker.await.context("a workload client panicked")?;
    }

    // Heal phase: every node back, a write commits, every task finishes, replicas converge.
    match cluster.wait_for_leader(&all, STEP).await {
        Ok(_) => {}
        Err(e) => report.failures.push(format!("no leader after healing: {e}")),
    }
    if admin.put("fault-run/after-heal", "1").await.is_err() {
        report.failures.push("a write did not commit after healing".into());
    }
    let tasks = drain(&admin).await;
    let observed = std::mem::take(&mut *lock(&shared));
    report.shared_operations = observed.history.len();
    report.shared_unanswered = observed.history.iter().filter(|o| o.output == Output::Unknown).count();
    report.writes_acknowledged = observed.acknowledged_writes;
    report.submits = observed.submits.len();
    report.submits_acknowledged = observed.submits.iter().filter(|s| s.acknowledged.is_some()).count();
    if let Err(e) = invariants::linearizable(&observed.history) {
        report.failures.push(e);
    }
    match tasks {
        Ok(Drained { tasks, seconds, open }) => {
            report.drain_seconds = seconds;
            report.tasks_open = open;
            if open > 0 {
                report.failures.push(format!("{open} tasks still open {seconds:.0} s after healing"));
            }
            // Lost and duplicated are counted from the last listing whether or not it drained.
            let mut by_description: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for (id, (description, state)) in &tasks {
                by_description.entry(description.clone()).or_default().push(id.clone());
                match state {
                    TaskState::Completed => report.tasks_completed += 1,
                    TaskState::Failed | TaskState::Cancelled => {
                        report.failures.push(format!("task {id} ({description}) ended {state:?}"))
                    }
                    _ => {}
                }
            }
            report.duplicated = by_description.values().map(|ids| ids.len().saturating_sub(1)).sum();
            report.lost = observed
                .submits
                .iter()
                .filter(|s| s.acknowledged.as_ref().is_some_and(|id| !tasks.contains_key(id)))
                .count();
            if let Err(e) = invariants::submits_exist_once(&observed.submits, &by_description) {
                report.failures.push(e);
            }
        }
        Err(e) => report.failures.push(e),
    }
    if let Err(e) = cluster.wait_for_same_state(&all, STEP).await {
        report.failures.push(format!("replicas did not converge: {e}"));
    }

    let executions = read_executions(&records)?;
    report.executions = executions.len();
    report.double_runs = double_runs(&executions);
    if !report.double_runs.is_empty() {
        report.failures.push(format!("{} double runs", report.double_runs.len()));
    }
    let (evidence, late) = cut_off_agents(&report.faults, &executions);
    report.cut_off_agents = evidence;
    report.failures.extend(late);
    cluster.stop();
    if kept {
        println!("the run's files are kept in {}", root.keep().display());
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// A shared-key client: puts of unique values, compare-and-sets from the value it last saw, and
/// linearizable reads, on the keys of the current epoch, until `until`.
async fn shared_client(id: u64, seed: u64, client: Client, epoch: Instant, until: Instant, shared: Shared) {
    let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(id));
    let mut seen: BTreeMap<String, Option<String>> = BTreeMap::new();
    let mut i = 0u64;
    while Instant::now() < until {
        i += 1;
        let round = epoch.elapsed().as_secs() / KEY_EPOCH.as_secs();
        let key = format!("fault-run/{round}/{}", rng.gen_range(0..KEYS_PER_EPOCH));
        let value = format!("c{id}-{i}");
        let call_us = epoch.elapsed().as_micros() as u64;
        let (input, output) = shared_operation(&client, rng.gen_range(0..3), &key, &value, &mut seen).await;
        let return_us = (output != Output::Unknown).then(|| epoch.elapsed().as_micros() as u64);
        {
            let mut observed = lock(&shared);
            observed.acknowledged_writes += usize::from(matches!(output, Output::Written | Output::Swapped));
            observed.history.push(Operation { client: id, key, input, output, call_us, return_us });
        }
        tokio::time::sleep(Duration::from_millis(rng.gen_range(20..150))).await;
    }
}

/// The task client: ticker tasks of 1–4 s and some of 6–15 s, half with an idempotency key, every one through the
/// SDK (so on its client session), until `until`.
async fn task_client(seed: u64, client: Client, until: Instant, shared: Shared) {
    let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(0xD1B5_4A32_D192_ED03));
    let run = format!("{seed}-{}", now_ms());
    let mut i = 0u64;
    while Instant::now() < until {
        i += 1;
        let keyed = i.is_multiple_of(2);
        let description = format!("fault run {run} task {i}");
        let request = SubmitTaskRequest {
            task_type: "ticker".into(),
            description: description.clone(),
            // Most short; some longer than a lease and the time to lease the task again, so a
            // stalled or cut-off owner's agent would still be at work when the next attempt began.
            input: format!(
                "ms:{}",
                if rng.gen_bool(0.3) { rng.gen_range(6_000..15_000) } else { rng.gen_range(1_000..4_000) }
            ),
            max_retries: 50,
            timeout_ms: 60_000,
            idempotency_key: if keyed { format!("fault-run-{run}-{i}") } else { String::new() },
            ..Default::default()
        };
        let acknowledged = client.submit(request).await.ok().map(|answer| answer.task_id);
        lock(&shared).submits.push(invariants::Submit { description, keyed, acknowledged });
        tokio::time::sleep(Duration::from_millis(rng.gen_range(500..1_500))).await;
    }
}

/// Every ticker task's description and state by id, when the drain ended.
struct Drained {
    tasks: BTreeMap<String, (String, TaskState)>,
    seconds: f64,
    /// Tasks not finished when the drain gave up.
    open: usize,
}

/// Wait until no ticker task is open, as long as tasks keep finishing ([`DRAIN_STALL`],
/// [`DRAIN_MAX`]).
async fn drain(client: &Client) -> Result<Drained, String> {
    let started = Instant::now();
    let (mut fewest_open, mut fell_at) = (usize::MAX, started);
    loop {
        let mut tasks = BTreeMap::new();
        let mut page_token = String::new();
        loop {
            let request = ListTasksRequest {
                task_type: "ticker".into(),
                page_size: 1_000,
                page_token: page_token.clone(),
                ..Default::default()
            };
            let page = match client.list_tasks(request).await {
                Ok(page) => page,
                Err(e) => return Err(format!("listing the tasks after healing: {e}")),
            };
            for view in page.tasks {
                let state = TaskState::try_from(view.state).unwrap_or(TaskState::Unspecified);
                tasks.insert(view.task_id, (view.description, state));
            }
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
        let open = tasks
            .values()
            .filter(|(_, s)| !matches!(s, TaskState::Completed | TaskState::Failed | TaskState::Cancelled))
            .count();
        if open < fewest_open {
            (fewest_open, fell_at) = (open, Instant::now());
        }
        if open == 0 || fell_at.elapsed() > DRAIN_STALL || started.elapsed() > DRAIN_MAX {
            return Ok(Drained { tasks, seconds: started.elapsed().as_secs_f64(), open });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Every execution the agents recorded under `dir`.
pub fn read_executions(dir: &Path) -> anyhow::Result<Vec<Execution>> {
    let mut executions = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let mut parts = name.rsplitn(4, '.');
        let (Some(pid), Some(node), Some(attempt), Some(task_id)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let text = std::fs::read_to_string(entry.path())?;
        let stamps: Vec<(&str, u64)> = text
            .lines()
            .filter_map(|l| l.split_once(' ').and_then(|(kind, ms)| Some((kind, ms.trim().parse().ok()?))))
            .collect();
        let (Some(first), Some(last)) = (stamps.first(), stamps.last()) else { continue };
        executions.push(Execution {
            task_id: task_id.to_string(),
            attempt: attempt.parse().context("attempt")?,
            node: node.parse().context("node")?,
            pid: pid.parse().context("pid")?,
            first_ms: first.1,
            last_ms: last.1,
            ended: last.0 == "end",
        });
    }
    executions.sort_by_key(|e| (e.task_id.clone(), e.first_ms));
    Ok(executions)
}

/// An attempt run twice (two executions of one attempt), and two executions of one task that
/// overlapped: one recorded a start while the other went on recording (the records are on one
/// clock, so any overlap of the recorded spans is two live owners at once).
pub fn double_runs(executions: &[Execution]) -> Vec<String> {
    let mut found = Vec::new();
    for (i, a) in executions.iter().enumerate() {
        for b in executions[i + 1..].iter().take_while(|b| b.task_id == a.task_id) {
            if a.attempt == b.attempt {
                found.push(format!(
                    "task {} attempt {} ran twice: on node {} (pid {}) and on node {} (pid {})",
                    a.task_id, a.attempt, a.node, a.pid, b.node, b.pid
                ));
            } else if b.first_ms <= a.last_ms {
                found.push(format!(
                    "task {}: attempt {} on node {} began at {} while attempt {} on node {} went on until {} ({} ms together)",
                    a.task_id,
                    b.attempt,
                    b.node,
                    b.first_ms,
                    a.attempt,
                    a.node,
                    a.last_ms,
                    a.last_ms - b.first_ms
                ));
            }
        }
    }
    found
}

/// For each partition or pause that caught an agent at work on its node: when the agent stopped
/// and when the task's next attempt began, in ms after the fault began; and, as failures, every
/// such agent still at work when the next attempt began.
pub fn cut_off_agents(faults: &[Fault], executions: &[Execution]) -> (Vec<String>, Vec<String>) {
    let (mut evidence, mut late) = (Vec::new(), Vec::new());
    for fault in faults.iter().filter(|f| !f.kind.starts_with("kill")) {
        let caught = executions.iter().filter(|e| {
            e.node == fault.node && e.first_ms < fault.from_ms && e.last_ms + 100 >= fault.from_ms && !e.ended
        });
        for execution in caught {
            let next = executions
                .iter()
                .filter(|e| e.task_id == execution.task_id && e.attempt > execution.attempt)
                .min_by_key(|e| e.first_ms);
            let stopped = execution.last_ms as i64 - fault.from_ms as i64;
            let line = match next {
                Some(next) => format!(
                    "{} of node {} at {}: task {} attempt {} stopped {stopped} ms after it began; attempt {} began on node {} {} ms after it",
                    fault.kind,
                    fault.node,
                    fault.from_ms,
                    execution.task_id,
                    execution.attempt,
                    next.attempt,
                    next.node,
                    next.first_ms as i64 - fault.from_ms as i64
                ),
                None => format!(
                    "{} of node {} at {}: task {} attempt {} stopped {stopped} ms after it began",
                    fault.kind, fault.node, fault.from_ms, execution.task_id, execution.attempt
                ),
            };
            if next.is_some_and(|next| next.first_ms <= execution.last_ms) {
                late.push(format!("an agent cut off from its cluster was still at work: {line}"));
            }
            evidence.push(line);
        }
    }
    (evidence, late)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn execution(task: &str, attempt: u32, node: u64, first_ms: u64, last_ms: u64) -> Execution {
        Execution {
            task_id: task.into(),
            attempt,
            node,
            pid: attempt * 100 + node as u32,
            first_ms,
            last_ms,
            ended: true,
        }
    }

    #[test]
    fn double_runs_are_overlaps_of_one_task_and_attempts_run_twice() {
        let clean = [execution("a", 1, 1, 0, 100), execution("a", 2, 2, 101, 200), execution("b", 1, 1, 50, 150)];
        assert!(double_runs(&clean).is_empty());
        let overlap = [execution("a", 1, 1, 0, 100), execution("a", 2, 2, 90, 200)];
        assert_eq!(double_runs(&overlap).len(), 1, "{:?}", double_runs(&overlap));
        let twice = [execution("a", 1, 1, 0, 100), execution("a", 1, 1, 500, 600)];
        assert!(double_runs(&twice)[0].contains("ran twice"));
    }

    #[test]
    fn a_partitioned_agent_at_work_when_the_next_attempt_began_is_a_failure() {
        let cut = Fault { kind: "partition (link down)", node: 1, was_leader: false, from_ms: 1_000, to_ms: 9_000 };
        let mut stopped = execution("a", 1, 1, 0, 3_500);
        stopped.ended = false;
        let next = execution("a", 2, 2, 4_200, 6_000);
        let (evidence, late) = cut_off_agents(std::slice::from_ref(&cut), &[stopped.clone(), next.clone()]);
        assert_eq!(evidence.len(), 1);
        assert!(late.is_empty(), "{late:?}");
        let mut still = stopped;
        still.last_ms = 4_500;
        let (_, late) = cut_off_agents(&[cut], &[still, next]);
        assert_eq!(late.len(), 1);
    }
}
