//! The fence keeper: self-fencing that does not depend on the node's own process running.
//!
//! The runtime stops an attempt a margin before its lease could expire (see `runtime.rs`), but
//! only while the node's process runs. A node stalled whole (`SIGSTOP`, a debugger, a runtime
//! whose threads are all blocked) stops nothing, while its command agents, processes of their
//! own, go on working past the lease and the cluster runs the task elsewhere: two live owners.
//!
//! So each node with `command` agents starts one keeper, `maos agent-keeper`, a small child
//! process that reads lines on its stdin:
//! - `live <pgid> <ms>`: agent process group `pgid` is proven live for `ms` more milliseconds;
//! - `gone <pgid>`: it ended; forget it.
//!
//! The keeper kills (`SIGKILL` to the group) every group whose time runs out, by its own
//! monotonic clock, and every group it knows when its stdin closes (the node died). The node
//! sends the time left rather than an instant, measured just before writing, so the pipe's delay
//! only makes the keeper's deadline later by that delay, which the self-fencing slack covers;
//! the keeper's deadline is never later than the runtime's own plus that delay.
//!
//! A pause of the whole host (a VM stopped and resumed) stops the keeper too: on resume an agent
//! may act for an instant before it is killed. Fencing tokens refuse its reports; side effects
//! outside MAOS need the token checked where they land (docs/AGENTS.md, "Self-fencing").

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::{BackendKind, Config};

/// The hidden `maos` subcommand that runs the keeper.
pub const SUBCOMMAND: &str = "agent-keeper";

#[derive(Default)]
struct Entry {
    pgid: Option<i32>,
    until: Option<Instant>,
}

struct Inner {
    child: Child,
    stdin: Option<ChildStdin>,
    /// By fencing token: one attempt's process group and how long it is proven live.
    attempts: BTreeMap<u64, Entry>,
}

/// The node's side of its keeper.
pub struct Keeper {
    inner: Mutex<Inner>,
}

impl Keeper {
    /// The keeper of a node with `command` agent types, run by this process's own binary. `None`
    /// without command types, and for a node embedded in another program (a test): the keeper
    /// is a subcommand of `maos`.
    pub fn for_config(config: &Config) -> Option<Arc<Self>> {
        if !config.agents.types.values().any(|t| t.backend == BackendKind::Command) {
            return None;
        }
        let binary = std::env::current_exe().ok().filter(|b| b.file_name().is_some_and(|n| n == "maos"))?;
        match Self::spawn(&binary) {
            Ok(keeper) => Some(Arc::new(keeper)),
            Err(error) => {
                tracing::error!(%error, "cannot start the fence keeper; command agents are fenced by this process alone");
                None
            }
        }
    }

    /// Start the keeper: `binary agent-keeper` (this node's own `maos`).
    pub fn spawn(binary: &std::path::Path) -> std::io::Result<Self> {
        let mut command = Command::new(binary);
        command.arg(SUBCOMMAND).stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::inherit());
        let mut child = command.spawn()?;
        let stdin = child.stdin.take();
        Ok(Self { inner: Mutex::new(Inner { child, stdin, attempts: BTreeMap::new() }) })
    }

    fn update(&self, token: u64, change: impl FnOnce(&mut Entry)) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let entry = inner.attempts.entry(token).or_default();
        change(entry);
        if let (Some(pgid), Some(until)) = (entry.pgid, entry.until) {
            let left = until.saturating_duration_since(Instant::now()).as_millis();
            inner.send(&format!("live {pgid} {left}\n"));
        }
    }

    /// The attempt under `token` runs as process group `pgid`.
    pub fn attach(&self, token: u64, pgid: i32) {
        self.update(token, |entry| entry.pgid = Some(pgid));
    }

    /// The attempt under `token` is proven live until `until` (by this node's monotonic clock).
    pub fn prove(&self, token: u64, until: Instant) {
        self.update(token, |entry| entry.until = Some(until));
    }

    /// The attempt under `token` ended (or left this node): the keeper forgets its group.
    pub fn release(&self, token: u64) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(Entry { pgid: Some(pgid), .. }) = inner.attempts.remove(&token) {
            inner.send(&format!("gone {pgid}\n"));
        }
    }
}

impl Inner {
    fn send(&mut self, line: &str) {
        let Some(stdin) = self.stdin.as_mut() else { return };
        if let Err(error) = stdin.write_all(line.as_bytes()).and_then(|()| stdin.flush()) {
            // The runtime's own fencing goes on; only a stalled node is no longer covered.
            tracing::error!(%error, "the fence keeper is gone; agents are fenced by this process alone");
            self.stdin = None;
        }
    }
}

impl std::fmt::Debug for Keeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f.debug_struct("Keeper").field("pid", &inner.child.id()).field("attempts", &inner.attempts.len()).finish()
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        let inner = self.inner.get_mut().unwrap_or_else(|p| p.into_inner());
        // Closing its stdin makes the keeper kill what it holds and exit.
        inner.stdin = None;
        let _ = inner.child.wait();
    }
}

/// A line of the keeper's input.
#[derive(Debug, PartialEq, Eq)]
enum Order {
    Live { pgid: i32, left: Duration },
    Gone { pgid: i32 },
}

fn parse(line: &str) -> Option<Order> {
    let mut words = line.split_whitespace();
    let order = match (words.next()?, words.next()?.parse::<i32>().ok().filter(|p| *p > 1)?) {
        ("live", pgid) => Order::Live { pgid, left: Duration::from_millis(words.next()?.parse().ok()?) },
        ("gone", pgid) => Order::Gone { pgid },
        _ => return None,
    };
    words.next().is_none().then_some(order)
}

fn kill_group(pgid: i32) {
    // SAFETY: kill(2) with a negative pid signals the process group; no memory is touched.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
}

/// The keeper's process: read orders from stdin until it closes, kill each group whose time ran
/// out. Returns when stdin closes, after killing every group still held.
pub fn serve() {
    let (orders, incoming) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if orders.send(line).is_err() {
                break;
            }
        }
    });
    let mut deadlines: BTreeMap<i32, Instant> = BTreeMap::new();
    loop {
        let now = Instant::now();
        for (pgid, _) in deadlines.iter().filter(|(_, until)| **until <= now) {
            kill_group(*pgid);
            eprintln!(
                "maos agent-keeper: killed agent process group {pgid}: its node did not prove its lease live in time"
            );
        }
        deadlines.retain(|_, until| *until > now);
        let wait =
            deadlines.values().min().map_or(Duration::from_secs(1), |until| until.saturating_duration_since(now));
        match incoming.recv_timeout(wait) {
            Ok(line) => match parse(&line) {
                Some(Order::Live { pgid, left }) => {
                    deadlines.insert(pgid, Instant::now() + left);
                }
                Some(Order::Gone { pgid }) => {
                    deadlines.remove(&pgid);
                }
                None => eprintln!("maos agent-keeper: ignoring {line:?}: expected `live <pgid> <ms>` or `gone <pgid>`"),
            },
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                deadlines.keys().for_each(|pgid| kill_group(*pgid));
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_parse_and_bad_lines_do_not() {
        assert_eq!(parse("live 4242 1500"), Some(Order::Live { pgid: 4242, left: Duration::from_millis(1500) }));
        assert_eq!(parse("gone 4242"), Some(Order::Gone { pgid: 4242 }));
        for bad in ["", "live", "live 4242", "live 1 100", "live -5 100", "gone 4242 1", "stop 4242", "live x 1"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }
}
