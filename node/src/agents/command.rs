//! The `command` backend: one subprocess per attempt.
//!
//! Protocol: the [`Envelope`] goes in on stdin as one JSON document, then stdin closes. The
//! agent answers on stdout with one JSON value: `{"result": ...}`, `{"error": "...",
//! "retryable": bool}`, or for a planning attempt `{"subtasks": [...]}`; any other JSON value is
//! the result. On stderr, a line `@maos {"progress": 40, "message": "..."}` reports progress and
//! `@maos {"checkpoint": "..."}` saves a checkpoint; other lines are the agent's log (its tail is
//! kept for the failure cause).
//!
//! Supervision: the agent runs in its own process group with a clean environment (PATH, HOME,
//! LANG and the type's `env`), dies with the node (`PR_SET_PDEATHSIG`), and is killed with its
//! whole group on timeout, on cancel or lease loss (dropping the future), when its resident
//! memory passes `max_memory`, and after it exits (no orphan survives). An address-space limit
//! (`setrlimit`, a multiple of `max_memory`) stops a sudden huge allocation that sampling would
//! miss. Output is captured up to a bound.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio::sync::mpsc;

use super::envelope::{AgentEvent, Envelope, Outcome, OutcomeKind};
use super::keeper::Keeper;

/// Upper bound on captured stdout.
pub const STDOUT_BYTES_MAX: usize = 64 * 1024;
/// Upper bound on one stderr line (a checkpoint line carries up to 64 KiB of data).
const STDERR_LINE_BYTES_MAX: usize = 80 * 1024;
/// Stderr kept for the failure cause.
const STDERR_TAIL_BYTES: usize = 2 * 1024;
/// How often resident memory is sampled.
const MEMORY_SAMPLE_INTERVAL: Duration = Duration::from_millis(25);
/// The address-space backstop is this many times `max_memory` (and at least 1 GiB more).
const ADDRESS_SPACE_FACTOR: u64 = 4;
/// After the agent exits, how long its output may take to drain.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// The protocol prefix of a stderr line.
const PROTOCOL_PREFIX: &str = "@maos ";

/// One agent type's command settings.
#[derive(Debug, Clone)]
pub struct CommandBackend {
    pub program: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub max_memory_bytes: u64,
    pub timeout: Duration,
    /// Kills the agent's group if this node stalls past its lease (see `keeper.rs`).
    pub keeper: Option<Arc<Keeper>>,
}

/// Tells the keeper the attempt's group is gone when the attempt ends, however it ends.
struct Kept<'a>(&'a Keeper, u64);

impl Drop for Kept<'_> {
    fn drop(&mut self) {
        self.0.release(self.1);
    }
}

/// Kills the agent's process group when dropped before the attempt ended normally: on cancel,
/// lease loss or shutdown. Disarmed once the group was killed and the agent reaped, so a later
/// group that reuses the id is never signalled.
struct GroupKill(Option<i32>);

impl Drop for GroupKill {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            kill_group(pgid);
        }
    }
}

fn kill_group(pgid: i32) {
    if pgid > 1 {
        // SAFETY: kill(2) with a negative pid signals the process group; no memory is touched.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
    }
}

/// Resident memory of every process in group `pgid`, in bytes (Linux `/proc`).
pub fn group_rss_bytes(pgid: i32) -> u64 {
    let Ok(entries) = std::fs::read_dir("/proc") else { return 0 };
    // SAFETY: sysconf has no memory effects.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    let mut pages = 0u64;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().filter(|n| n.bytes().all(|b| b.is_ascii_digit())) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // Fields after the command name (which may hold spaces): state ppid pgrp ... rss is the 24th field.
        let Some((_, rest)) = stat.rsplit_once(')') else { continue };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.get(2).and_then(|g| g.parse::<i32>().ok()) == Some(pgid) {
            pages += fields.get(21).and_then(|r| r.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    pages * page
}

/// Read all of `reader`, keeping at most `limit` bytes; says whether more came.
async fn read_capped(mut reader: impl AsyncRead + Unpin, limit: usize) -> (Vec<u8>, bool) {
    let mut kept = Vec::new();
    let mut overflowed = false;
    let mut buffer = [0u8; 8192];
    loop {
        match reader.read(&mut buffer).await {
            Ok(0) | Err(_) => return (kept, overflowed),
            Ok(n) => {
                let room = limit.saturating_sub(kept.len());
                kept.extend_from_slice(&buffer[..n.min(room)]);
                overflowed |= n > room;
            }
        }
    }
}

/// Read stderr line by line: protocol lines become events, the rest is log whose tail is kept.
async fn read_stderr(mut reader: impl AsyncRead + Unpin, events: mpsc::Sender<AgentEvent>, task_id: String) -> String {
    let mut tail = String::new();
    let mut line: Vec<u8> = Vec::new();
    let mut line_overflowed = false;
    let mut buffer = [0u8; 8192];
    let handle_line = |line: &[u8], overflowed: bool, tail: &mut String| -> Option<AgentEvent> {
        let text = String::from_utf8_lossy(line);
        let text = text.trim_end_matches('\r');
        if let Some(json) = text.strip_prefix(PROTOCOL_PREFIX) {
            if overflowed {
                tracing::warn!(task_id = %task_id, "an agent protocol line over {STDERR_LINE_BYTES_MAX} bytes was dropped");
                return None;
            }
            match parse_protocol_line(json) {
                Ok(event) => return Some(event),
                Err(e) => tracing::warn!(task_id = %task_id, error = %e, "ignored a malformed agent protocol line"),
            }
            return None;
        }
        tracing::debug!(task_id = %task_id, line = %text, "agent stderr");
        tail.push_str(text);
        tail.push('\n');
        if tail.len() > STDERR_TAIL_BYTES {
            let cut = tail.len() - STDERR_TAIL_BYTES;
            let cut = (cut..tail.len()).find(|i| tail.is_char_boundary(*i)).unwrap_or(tail.len());
            tail.drain(..cut);
        }
        None
    };
    loop {
        let n = match reader.read(&mut buffer).await {
            Ok(0) | Err(_) => 0,
            Ok(n) => n,
        };
        if n == 0 {
            if !line.is_empty() {
                if let Some(event) = handle_line(&line, line_overflowed, &mut tail) {
                    let _ = events.send(event).await;
                }
            }
            return tail;
        }
        for &byte in &buffer[..n] {
            if byte == b'\n' {
                let event = handle_line(&line, line_overflowed, &mut tail);
                line.clear();
                line_overflowed = false;
                if let Some(event) = event {
                    // Waiting here is backpressure: a full queue stops reading the agent's stderr.
                    let _ = events.send(event).await;
                }
            } else if line.len() < STDERR_LINE_BYTES_MAX {
                line.push(byte);
            } else {
                line_overflowed = true;
            }
        }
    }
}

fn parse_protocol_line(json: &str) -> Result<AgentEvent, String> {
    let value: serde_json::Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
    if let Some(data) = value.get("checkpoint") {
        let data = match data {
            serde_json::Value::String(text) => text.clone(),
            other => other.to_string(),
        };
        return Ok(AgentEvent::Checkpoint { data });
    }
    if let Some(percent) = value.get("progress").and_then(|p| p.as_u64()) {
        let message = value.get("message").and_then(|m| m.as_str()).unwrap_or_default().to_string();
        return Ok(AgentEvent::Progress { percent: percent.min(100) as u8, message });
    }
    Err("expected {\"progress\": <0..100>, \"message\": ...} or {\"checkpoint\": ...}".into())
}

/// Read the agent's stdout answer.
fn parse_answer(stdout: &[u8]) -> OutcomeKind {
    let text = String::from_utf8_lossy(stdout);
    let value: serde_json::Value = match serde_json::from_str(text.trim()) {
        Ok(value) => value,
        Err(e) => {
            let shown: String = text.chars().take(200).collect();
            return OutcomeKind::Failed {
                error: format!("the agent's stdout is not one JSON value ({e}); it must print {{\"result\": ...}}. It printed: {shown:?}"),
                retryable: false,
            };
        }
    };
    if let Some(error) = value.get("error") {
        let error = error.as_str().map(String::from).unwrap_or_else(|| error.to_string());
        let retryable = value.get("retryable").and_then(|r| r.as_bool()).unwrap_or(true);
        return OutcomeKind::Failed { error, retryable };
    }
    match value.get("result") {
        Some(serde_json::Value::String(result)) => OutcomeKind::Completed(result.clone()),
        Some(result) => OutcomeKind::Completed(result.to_string()),
        None => OutcomeKind::Completed(value.to_string()),
    }
}

impl CommandBackend {
    /// Run one attempt to its end. Dropping the future kills the agent's whole process group.
    pub async fn run(&self, envelope: &Envelope, events: mpsc::Sender<AgentEvent>) -> Outcome {
        let Some((program, args)) = self.program.split_first() else {
            return Outcome {
                spawn_failed: true,
                ..Outcome::failed("no program configured for this command agent", false)
            };
        };
        let mut command = Command::new(program);
        command
            .args(args)
            .env_clear()
            .envs(["PATH", "HOME", "LANG"].iter().filter_map(|k| std::env::var(k).ok().map(|v| (*k, v))))
            .envs(&self.env)
            .env("MAOS_TASK_ID", &envelope.task_id)
            .env("MAOS_ATTEMPT", envelope.attempt.to_string())
            // The attempt's span (W3C trace context), for the agent's own spans; empty untraced.
            .envs(
                Some(crate::telemetry::traces::current_traceparent())
                    .filter(|t| !t.is_empty())
                    .map(|t| ("TRACEPARENT", t)),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let address_space = self
            .max_memory_bytes
            .saturating_mul(ADDRESS_SPACE_FACTOR)
            .max(self.max_memory_bytes.saturating_add(1 << 30));
        // SAFETY: the closure runs in the child between fork and exec and only makes
        // async-signal-safe system calls (setrlimit, prctl).
        unsafe {
            command.pre_exec(move || {
                let limit =
                    libc::rlimit { rlim_cur: address_space as libc::rlim_t, rlim_max: address_space as libc::rlim_t };
                if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(e) => {
                return Outcome {
                    spawn_failed: true,
                    ..Outcome::failed(format!("could not start the agent program {program:?}: {e}"), true)
                }
            }
        };
        let Some(pgid) = child.id().map(|pid| pid as i32) else {
            return Outcome {
                spawn_failed: true,
                ..Outcome::failed("the agent exited before it could be supervised", true)
            };
        };
        let mut group = GroupKill(Some(pgid));
        let _kept = self.keeper.as_deref().map(|keeper| {
            keeper.attach(envelope.fencing_token, pgid);
            Kept(keeper, envelope.fencing_token)
        });
        let task_id = envelope.task_id.clone();
        tracing::debug!(task_id = %task_id, attempt = envelope.attempt, pid = pgid, "agent process started");

        let (Some(mut stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Outcome::failed("the agent's standard streams could not be opened", true);
        };
        let envelope_json = match serde_json::to_vec(envelope) {
            Ok(json) => json,
            Err(e) => return Outcome::failed(format!("the envelope could not be encoded: {e}"), false),
        };
        // Written from its own task: an agent that does not read stdin must not stall supervision.
        let writer = tokio::spawn(async move {
            let _ = stdin.write_all(&envelope_json).await;
            let _ = stdin.shutdown().await;
        });
        let stdout_reader = tokio::spawn(read_capped(stdout, STDOUT_BYTES_MAX));
        let stderr_reader = tokio::spawn(read_stderr(stderr, events, task_id.clone()));

        let memory_limit = self.max_memory_bytes;
        let timeout = self.timeout.min(Duration::from_millis(envelope.timeout_ms));
        let over_memory = async move {
            let mut ticker = tokio::time::interval(MEMORY_SAMPLE_INTERVAL);
            loop {
                ticker.tick().await;
                // Reading /proc blocks; keep it off the async workers.
                let resident = tokio::task::spawn_blocking(move || group_rss_bytes(pgid)).await.unwrap_or(0);
                if resident > memory_limit {
                    return resident;
                }
            }
        };
        enum End {
            Exited(std::io::Result<std::process::ExitStatus>),
            TimedOut,
            OverMemory(u64),
        }
        let end = tokio::select! {
            status = child.wait() => End::Exited(status),
            _ = tokio::time::sleep(timeout) => End::TimedOut,
            resident = over_memory => End::OverMemory(resident),
        };
        // Whatever happened, nothing of the agent's group outlives the attempt.
        kill_group(pgid);
        let _ = child.wait().await;
        group.0 = None;
        writer.abort();
        // A process that left the group (setsid) may still hold the pipes: stop waiting for it,
        // and drop the readers (and with them the event sender) so the outcome is not held up.
        let (mut stdout_reader, mut stderr_reader) = (stdout_reader, stderr_reader);
        let (stdout, stdout_overflowed) = match tokio::time::timeout(DRAIN_TIMEOUT, &mut stdout_reader).await {
            Ok(Ok(read)) => read,
            _ => {
                stdout_reader.abort();
                Default::default()
            }
        };
        let stderr_tail = match tokio::time::timeout(DRAIN_TIMEOUT, &mut stderr_reader).await {
            Ok(Ok(tail)) => tail,
            _ => {
                stderr_reader.abort();
                String::new()
            }
        };
        let tail = stderr_tail.trim();
        let with_tail = |message: String| if tail.is_empty() { message } else { format!("{message}; stderr: {tail}") };
        let kind = match end {
            End::TimedOut => OutcomeKind::Failed {
                error: format!("killed at its timeout: still running after {} s", timeout.as_secs_f64()),
                retryable: true,
            },
            End::OverMemory(resident) => OutcomeKind::Failed {
                error: format!(
                    "killed at its memory limit: resident memory reached {} MiB, over max_memory {} MiB",
                    resident >> 20,
                    memory_limit >> 20
                ),
                retryable: true,
            },
            End::Exited(Err(e)) => {
                OutcomeKind::Failed { error: format!("waiting for the agent failed: {e}"), retryable: true }
            }
            End::Exited(Ok(status)) if !status.success() => {
                use std::os::unix::process::ExitStatusExt;
                let how = match (status.code(), status.signal()) {
                    (Some(code), _) => format!("exited with status {code}"),
                    (None, Some(signal)) => format!("was killed by signal {signal}"),
                    _ => "ended abnormally".to_string(),
                };
                OutcomeKind::Failed { error: with_tail(format!("the agent {how}")), retryable: true }
            }
            End::Exited(Ok(_)) if stdout_overflowed => OutcomeKind::Failed {
                error: format!(
                    "the agent printed more than {STDOUT_BYTES_MAX} bytes on stdout; put large output elsewhere"
                ),
                retryable: false,
            },
            End::Exited(Ok(_)) => parse_answer(&stdout),
        };
        Outcome { kind, usage: Default::default(), spawn_failed: false }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_and_protocol_lines_parse() {
        assert_eq!(parse_answer(br#"{"result": "done"}"#), OutcomeKind::Completed("done".into()));
        assert_eq!(parse_answer(br#"{"result": {"n": 1}}"#), OutcomeKind::Completed(r#"{"n":1}"#.into()));
        assert_eq!(
            parse_answer(br#"{"error": "no", "retryable": false}"#),
            OutcomeKind::Failed { error: "no".into(), retryable: false }
        );
        assert!(matches!(parse_answer(b"plain text"), OutcomeKind::Failed { retryable: false, .. }));
        assert_eq!(parse_protocol_line(r#"{"checkpoint": "s1"}"#), Ok(AgentEvent::Checkpoint { data: "s1".into() }));
        assert_eq!(
            parse_protocol_line(r#"{"progress": 250, "message": "m"}"#),
            Ok(AgentEvent::Progress { percent: 100, message: "m".into() })
        );
        assert!(parse_protocol_line("{}").is_err());
    }
}
