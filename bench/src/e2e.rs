//! `maos-bench e2e`: no-op tasks end to end, MAOS and (with `--peer celery`) Celery in one run.
//!
//! MAOS: a local 3-node cluster whose nodes run `builtin` agents for the tasks' type. Clients
//! spread over every node (as behind a load balancer) submit `tasks` tasks, one `Submit` each and
//! then in `BatchSubmit`s, each on a fresh cluster; then readers fetch every result back. The
//! builtin agent reports the wall time it started, so submit-to-start is measured on one clock.
//!
//! Celery: `redis-server` on loopback as broker and result backend, a prefork worker with as many
//! processes as the machine has cores, and the driver `bench/celery/noop.py` doing the same
//! (submit from threads, read every result back).
//!
//! Reported for each: submits per second (all submitted), end-to-end tasks per second (first
//! submit to the last result read back), and submit-to-start latency. Every loop is bounded.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use hdrhistogram::Histogram;
use maos_client::proto::v1::task_service_client::TaskServiceClient;
use maos_client::proto::v1::{BatchSubmitRequest, GetTaskRequest, SubmitTaskRequest, TaskState};
use maos_testkit::local_cluster::{LocalCluster, LocalClusterOptions};
use maos_testkit::local_services::Redis;
use tonic::transport::Channel;

/// The Celery app and driver, written into the run's temporary directory.
const CELERY_DRIVER: &str = include_str!("../celery/noop.py");
/// Upper bound on one system's run, submit to the last result.
const RUN_LIMIT: Duration = Duration::from_secs(600);
/// Tasks in one `BatchSubmit` (the API takes up to 1,000).
const BATCH: usize = 100;
/// Concurrent `BatchSubmit` callers.
const BATCH_SUBMITTERS: usize = 8;
/// Builtin agent slots per node: enough that slots are never what a run waits for.
const SLOTS_PER_NODE: usize = 64;

pub struct Settings {
    pub maos: PathBuf,
    pub tasks: usize,
    pub submitters: usize,
    /// The venv Python with Celery (`bench/celery/setup.sh` makes it); `None`: no peer.
    pub celery_python: Option<PathBuf>,
}

struct Outcome {
    name: String,
    tasks: usize,
    submit: Duration,
    e2e: Duration,
    start_p50_ms: f64,
    start_p99_ms: f64,
    start_max_ms: f64,
}

impl Outcome {
    fn row(&self) -> String {
        format!(
            "| {} | {} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} |",
            self.name,
            self.tasks,
            self.tasks as f64 / self.submit.as_secs_f64(),
            self.tasks as f64 / self.e2e.as_secs_f64(),
            self.start_p50_ms,
            self.start_p99_ms,
            self.start_max_ms
        )
    }
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

fn request(i: usize) -> SubmitTaskRequest {
    SubmitTaskRequest { task_type: "noop".into(), description: format!("no-op {i}"), ..Default::default() }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Submits {
    Single,
    Batch,
}

/// One MAOS run on a fresh cluster: submit every task, then read every result back.
async fn maos_run(settings: &Settings, submits: Submits) -> anyhow::Result<Outcome> {
    let tasks = settings.tasks;
    let root = tempfile::Builder::new().prefix("maos-bench-e2e-").tempdir()?;
    let env = vec![
        ("MAOS_AGENTS_TYPES".to_string(), format!("{{noop: {{slots: {SLOTS_PER_NODE}}}}}")),
        ("MAOS_SYSTEM_MAX_AGENTS".to_string(), SLOTS_PER_NODE.to_string()),
        ("MAOS_SYSTEM_TASK_QUEUE_SIZE".to_string(), (tasks + 1_000).to_string()),
    ];
    let options = LocalClusterOptions { log_level: "WARN".into(), env, ..Default::default() };
    let mut cluster = LocalCluster::new(&settings.maos, root.path(), options)?;
    cluster.start_all()?;
    let all: Vec<u64> = cluster.nodes.keys().copied().collect();
    cluster.wait_for_leader(&all, Duration::from_secs(30)).await?;
    cluster.wait_ready(&all, Duration::from_secs(30)).await?;
    // Slot registration settles.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let channels = all
        .iter()
        .map(|id| Ok(maos_client::endpoint(&cluster.nodes[id].api_addr)?.connect_lazy()))
        .collect::<anyhow::Result<Vec<Channel>>>()?;

    let began = Instant::now();
    let submitted_at = Arc::new((0..tasks).map(|_| std::sync::atomic::AtomicU64::new(0)).collect::<Vec<_>>());
    let ids = Arc::new(std::sync::Mutex::new(vec![String::new(); tasks]));
    let callers = match submits {
        Submits::Single => settings.submitters,
        Submits::Batch => BATCH_SUBMITTERS,
    };
    let mut handles = Vec::new();
    for caller in 0..callers {
        let mut client = TaskServiceClient::new(channels[caller % channels.len()].clone());
        let (submitted_at, ids) = (submitted_at.clone(), ids.clone());
        handles.push(tokio::spawn(async move {
            match submits {
                Submits::Single => {
                    for i in (caller..tasks).step_by(callers) {
                        submitted_at[i].store(now_us(), std::sync::atomic::Ordering::Relaxed);
                        let id = client.submit(request(i)).await.with_context(|| format!("submit {i}"))?;
                        lock(&ids)[i] = id.into_inner().task_id;
                    }
                }
                Submits::Batch => {
                    for first in (caller * BATCH..tasks).step_by(callers * BATCH) {
                        let range = first..(first + BATCH).min(tasks);
                        let at = now_us();
                        for i in range.clone() {
                            submitted_at[i].store(at, std::sync::atomic::Ordering::Relaxed);
                        }
                        let batch = BatchSubmitRequest { tasks: range.clone().map(request).collect() };
                        let answer = client.batch_submit(batch).await.with_context(|| format!("batch at {first}"))?;
                        let items = answer.into_inner().results;
                        anyhow::ensure!(items.len() == range.len(), "batch at {first}: {} answers", items.len());
                        for (i, item) in range.zip(items) {
                            anyhow::ensure!(item.code == 0, "task {i} refused: {}", item.error);
                            lock(&ids)[i] = item.task_id;
                        }
                    }
                }
            }
            anyhow::Ok(())
        }));
    }
    for handle in handles {
        handle.await??;
    }
    let submit = began.elapsed();

    // Read every result back, from every node, waiting for the ones not finished yet.
    let ids: Arc<Vec<String>> = Arc::new(std::mem::take(&mut *lock(&ids)));
    let readers = settings.submitters;
    let mut handles = Vec::new();
    for reader in 0..readers {
        let mut client = TaskServiceClient::new(channels[reader % channels.len()].clone());
        let (ids, submitted_at) = (ids.clone(), submitted_at.clone());
        handles.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            for i in (reader..ids.len()).step_by(readers) {
                let view = loop {
                    let get = GetTaskRequest { task_id: ids[i].clone(), stale: true };
                    let view = client.get(get).await.with_context(|| format!("get {}", ids[i]))?.into_inner();
                    if view.state == TaskState::Completed as i32 {
                        break view;
                    }
                    anyhow::ensure!(began.elapsed() < RUN_LIMIT, "task {} not completed: {view:?}", ids[i]);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                };
                let result: serde_json::Value = serde_json::from_str(&view.result)?;
                let started_us = result["started_at_us"]
                    .as_u64()
                    .ok_or_else(|| anyhow::anyhow!("no start time in {}", view.result))?;
                let at = submitted_at[i].load(std::sync::atomic::Ordering::Relaxed);
                latencies.push(started_us.saturating_sub(at).max(1));
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut starts = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    for handle in handles {
        for latency in handle.await?? {
            starts.record(latency)?;
        }
    }
    let e2e = began.elapsed();
    cluster.stop();
    let ms = |q: f64| starts.value_at_quantile(q) as f64 / 1000.0;
    let name = match submits {
        Submits::Single => format!("maos, Submit ({} callers)", settings.submitters),
        Submits::Batch => format!("maos, BatchSubmit of {BATCH} ({BATCH_SUBMITTERS} callers)"),
    };
    Ok(Outcome {
        name,
        tasks,
        submit,
        e2e,
        start_p50_ms: ms(0.5),
        start_p99_ms: ms(0.99),
        start_max_ms: starts.max() as f64 / 1000.0,
    })
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Kills the Celery worker's process group when dropped, however the run ends.
struct Worker(Child);

impl Drop for Worker {
    fn drop(&mut self) {
        // SAFETY: signalling the process group this run started (the worker and its children).
        unsafe { libc::kill(-(self.0.id() as i32), libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

async fn celery_run(python: &Path, tasks: usize, submitters: usize) -> anyhow::Result<Outcome> {
    let redis = Redis::start()?;
    let dir = tempfile::Builder::new().prefix("maos-bench-celery-").tempdir()?;
    std::fs::write(dir.path().join("noop.py"), CELERY_DRIVER)?;
    let broker = format!("redis://127.0.0.1:{}/0", redis.port);
    let backend = format!("redis://127.0.0.1:{}/1", redis.port);
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let envs = [("CELERY_BROKER", broker.as_str()), ("CELERY_BACKEND", backend.as_str())];
    let log = std::fs::File::create(dir.path().join("worker.log"))?;
    let worker = {
        use std::os::unix::process::CommandExt;
        Command::new(python)
            .args(["-m", "celery", "-A", "noop", "worker", "--pool", "prefork", "--loglevel", "WARNING"])
            .args(["--concurrency", &cores.to_string(), "--without-gossip", "--without-mingle", "--without-heartbeat"])
            .current_dir(dir.path())
            .envs(envs)
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting the Celery worker with {}", python.display()))?
    };
    let _worker = Worker(worker);
    let driver = tokio::process::Command::new(python)
        .arg("noop.py")
        .args(["--tasks", &tasks.to_string(), "--submitters", &submitters.to_string()])
        .current_dir(dir.path())
        .envs(envs)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(RUN_LIMIT, driver).await.context("the Celery driver ran over its limit")??;
    let log = std::fs::read_to_string(dir.path().join("worker.log")).unwrap_or_default();
    anyhow::ensure!(
        output.status.success(),
        "the Celery driver failed ({}): {}\nworker log:\n{log}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let line = String::from_utf8_lossy(&output.stdout);
    let report: serde_json::Value =
        serde_json::from_str(line.trim()).with_context(|| format!("the Celery driver printed {line:?}"))?;
    let number = |key: &str| report[key].as_f64().ok_or_else(|| anyhow::anyhow!("no {key} in {report}"));
    Ok(Outcome {
        name: format!(
            "celery {} (Redis broker, prefork x{cores}, {submitters} submit threads)",
            celery_version(python)?
        ),
        tasks,
        submit: Duration::from_secs_f64(number("submit_s")?),
        e2e: Duration::from_secs_f64(number("e2e_s")?),
        start_p50_ms: number("start_p50_ms")?,
        start_p99_ms: number("start_p99_ms")?,
        start_max_ms: number("start_max_ms")?,
    })
}

fn celery_version(python: &Path) -> anyhow::Result<String> {
    let out = Command::new(python).args(["-c", "import celery; print(celery.__version__)"]).output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let celery_submitters = settings.submitters.min(16);
    if let Some(python) = &settings.celery_python {
        // Fail before the MAOS runs, not after them.
        celery_version(python).ok().filter(|v| !v.is_empty()).ok_or_else(|| {
            anyhow::anyhow!("{} has no Celery: run bench/celery/setup.sh, or pass --celery-python", python.display())
        })?;
    }
    println!(
        "{} no-op tasks; MAOS fsyncs every commit on a majority of 3 nodes, Celery's Redis broker does not fsync",
        settings.tasks
    );
    println!();
    println!("| system | tasks | submits/s | end to end tasks/s | submit to start p50 ms | p99 ms | max ms |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let single = maos_run(&settings, Submits::Single).await?;
    println!("{}", single.row());
    let batch = maos_run(&settings, Submits::Batch).await?;
    println!("{}", batch.row());
    if let Some(python) = &settings.celery_python {
        let celery = celery_run(python, settings.tasks, celery_submitters).await?;
        println!("{}", celery.row());
        let rate = |o: &Outcome| o.tasks as f64 / o.e2e.as_secs_f64();
        println!();
        println!(
            "end to end, MAOS / Celery: {:.1}x with Submit, {:.1}x with BatchSubmit",
            rate(&single) / rate(&celery),
            rate(&batch) / rate(&celery)
        );
    }
    Ok(())
}
