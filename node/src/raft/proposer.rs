//! Batching proposals: on the leader into one log entry, on a follower into one forwarded call.
//!
//! openraft 0.9 writes each log entry (and waits for its flush) before it takes the next client
//! write, so one entry per command would cap a cluster at one fsync per command. A [`Batcher`]
//! queues commands and hands every command that arrived while earlier batches were in flight to
//! one execution: throughput grows with concurrency instead of being capped by disk latency.
//! - [`leader_proposer`]: a batch becomes one log entry, stamped with the leader's clock.
//! - [`forwarder`]: a follower sends a batch to the leader in one `Propose` call, where it joins
//!   the leader's own batches.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use maos_raft_store::command::{BATCH_BYTES_MAX, BATCH_COMMANDS_MAX};
use maos_raft_store::{Command, NodeId, Raft, Request, Response, StateMachineHandle};
use openraft::error::{ClientWriteError, RaftError};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::raft::clock::{ClockBound, FIRST_MEASUREMENT_WAIT};
use crate::raft::network::{decode, encode, Channels};

/// Milliseconds since the Unix epoch. Real nodes read the system clock; simulations supply theirs.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// `wall` moved into the interval a quorum's clocks agree on (see [`crate::raft::clock`]).
pub fn cluster_clock(wall: Clock, bound: Arc<ClockBound>) -> Clock {
    Arc::new(move || bound.cluster_time(wall()))
}

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
    })
}

/// What `Propose` returns to a forwarding node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ProposeOutcome {
    Applied(Response),
    /// The receiver is not the leader; the forwarder retries with its own view of the leader.
    NotLeader {
        leader_id: Option<NodeId>,
    },
    Failed(String),
}

/// Upper bound on commands waiting for a batch; a full queue makes submitters wait (backpressure).
pub const QUEUE_CAPACITY: usize = 16_384;
/// Batches executing at once. More overlap replication with the next log write; each entry still
/// waits its turn in openraft's log writer.
pub const IN_FLIGHT_MAX: usize = 4;

struct Pending {
    /// Where the batch goes: commands for different targets never share a batch.
    target: String,
    command: Command,
    reply: oneshot::Sender<ProposeOutcome>,
}

/// A handle to a batching task. Cheap to clone.
#[derive(Clone)]
pub struct Batcher {
    queue: mpsc::Sender<Pending>,
}

impl Batcher {
    /// Start a batching task that runs `execute(target, commands)` per batch. `execute` returns
    /// one outcome per command, in order.
    pub fn start<F, Fut>(execute: F) -> Self
    where
        F: Fn(String, Vec<Command>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<ProposeOutcome>> + Send + 'static,
    {
        let (queue, pending) = mpsc::channel(QUEUE_CAPACITY);
        tokio::spawn(run(Arc::new(execute), pending));
        Self { queue }
    }

    /// Submit `command` for `target` and wait for its outcome.
    pub async fn submit(&self, target: &str, command: Command) -> ProposeOutcome {
        let (reply, result) = oneshot::channel();
        let pending = Pending { target: target.to_string(), command, reply };
        if self.queue.send(pending).await.is_err() {
            return ProposeOutcome::Failed("the batcher has stopped".into());
        }
        result.await.unwrap_or_else(|_| ProposeOutcome::Failed("the batcher has stopped".into()))
    }
}

async fn run<F, Fut>(execute: Arc<F>, mut pending: mpsc::Receiver<Pending>)
where
    F: Fn(String, Vec<Command>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Vec<ProposeOutcome>> + Send + 'static,
{
    let in_flight = Arc::new(Semaphore::new(IN_FLIGHT_MAX));
    let mut carried: Option<Pending> = None;
    loop {
        let Ok(permit) = in_flight.clone().acquire_owned().await else { return };
        let first = match carried.take() {
            Some(first) => first,
            None => match pending.recv().await {
                Some(first) => first,
                None => return,
            },
        };
        let target = first.target.clone();
        let mut bytes = first.command.payload_bytes();
        let mut batch = vec![first];
        while batch.len() < BATCH_COMMANDS_MAX {
            match pending.try_recv() {
                Ok(next) if next.target != target || bytes + next.command.payload_bytes() > BATCH_BYTES_MAX => {
                    carried = Some(next);
                    break;
                }
                Ok(next) => {
                    bytes += next.command.payload_bytes();
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        let execute = execute.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let (commands, replies): (Vec<Command>, Vec<oneshot::Sender<ProposeOutcome>>) =
                batch.into_iter().map(|p| (p.command, p.reply)).unzip();
            let count = commands.len();
            let outcomes = execute(target, commands).await;
            if outcomes.len() != count {
                let message = format!("{} outcomes for a batch of {count} commands", outcomes.len());
                tracing::error!(%message, "a batch was answered with the wrong number of outcomes");
                for reply in replies {
                    let _ = reply.send(ProposeOutcome::Failed(message.clone()));
                }
                return;
            }
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                let _ = reply.send(outcome);
            }
        });
    }
}

/// The longest a leadership transfer holds this leader's proposals: about an election.
pub const TRANSFER_HOLD_MAX: Duration = Duration::from_secs(3);

/// Proposals held on the leader while it hands leadership over, as etcd's leader stops
/// accepting proposals during a transfer: otherwise, under steady writes (agents renew leases
/// every interval), the leader's log outruns the target's while it stands, and a voter may not
/// vote for a shorter log. A held batch waits, then goes on: to this node's log if it still
/// leads, else it is answered "not the leader" and forwarded to the new one.
///
/// A batch counts itself as writing *before* it looks at the hold, and [`ProposalHold::hold`]
/// sets the hold *before* it waits for the writing count to reach zero (both sequentially
/// consistent), so once `hold` returns no batch is between the check and the log.
#[derive(Debug)]
pub struct ProposalHold {
    held: AtomicBool,
    released: tokio::sync::Notify,
    writing: AtomicUsize,
}

/// Holds proposals while it lives.
pub struct HoldGuard<'a>(&'a ProposalHold);

impl Drop for HoldGuard<'_> {
    fn drop(&mut self) {
        self.0.held.store(false, Ordering::SeqCst);
        self.0.released.notify_waiters();
    }
}

/// One batch on its way to the log.
struct Writing<'a>(&'a ProposalHold);

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        self.0.writing.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Default for ProposalHold {
    fn default() -> Self {
        Self { held: AtomicBool::new(false), released: tokio::sync::Notify::new(), writing: AtomicUsize::new(0) }
    }
}

impl ProposalHold {
    /// Hold new proposals until the guard drops, once the batches already on their way to the
    /// log are in it (waiting at most [`TRANSFER_HOLD_MAX`] for them).
    pub async fn hold(&self) -> HoldGuard<'_> {
        self.held.store(true, Ordering::SeqCst);
        let guard = HoldGuard(self);
        let deadline = tokio::time::Instant::now() + TRANSFER_HOLD_MAX;
        while self.writing.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        guard
    }

    /// Wait while proposals are held (at most [`TRANSFER_HOLD_MAX`]), counted as writing from
    /// then until the guard drops.
    async fn enter(&self) -> Writing<'_> {
        let deadline = tokio::time::Instant::now() + TRANSFER_HOLD_MAX;
        loop {
            self.writing.fetch_add(1, Ordering::SeqCst);
            let writing = Writing(self);
            if !self.held.load(Ordering::SeqCst) || tokio::time::Instant::now() >= deadline {
                return writing;
            }
            drop(writing);
            let released = self.released.notified();
            if self.held.load(Ordering::SeqCst) {
                let _ = tokio::time::timeout_at(deadline, released).await;
            }
        }
    }
}

/// On the leader: each batch becomes one log entry stamped with `clock` (cluster time), once no
/// leadership transfer holds proposals (`hold`). In a new
/// cluster (the replicated clock still 0) the first stamps wait until `bound` has measured a
/// quorum's clocks (or [`FIRST_MEASUREMENT_WAIT`] has passed), so a first leader whose clock is
/// off cannot push the replicated clock ahead before anyone measured it.
pub fn leader_proposer(
    raft: Raft,
    clock: Clock,
    bound: Arc<ClockBound>,
    state: StateMachineHandle,
    hold: Arc<ProposalHold>,
) -> Batcher {
    Batcher::start(move |_target, commands| {
        let (raft, clock, bound, state, hold) =
            (raft.clone(), clock.clone(), bound.clone(), state.clone(), hold.clone());
        async move {
            let _writing = hold.enter().await;
            if !bound.measured() && state.read().app.clock_ms == 0 {
                bound.first_measured(FIRST_MEASUREMENT_WAIT).await;
            }
            let stamped_at_ms = clock();
            let count = commands.len();
            metrics::histogram!("maos_raft_proposer_batch_commands", "path" => "leader").record(count as f64);
            let started = std::time::Instant::now();
            match raft.client_write(Request::new(stamped_at_ms, commands)).await {
                Ok(written) => {
                    metrics::histogram!("maos_raft_commit_duration_seconds").record(started.elapsed().as_secs_f64());
                    written.data.into_iter().map(ProposeOutcome::Applied).collect()
                }
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward))) => {
                    vec![ProposeOutcome::NotLeader { leader_id: forward.leader_id }; count]
                }
                Err(other) => vec![ProposeOutcome::Failed(other.to_string()); count],
            }
        }
    })
}

/// On a follower: each batch goes to the leader at the target Raft address in one `Propose`.
pub fn forwarder(channels: Channels, rpc_timeout: Duration) -> Batcher {
    Batcher::start(move |target, commands| {
        let channels = channels.clone();
        async move {
            let count = commands.len();
            metrics::histogram!("maos_raft_proposer_batch_commands", "path" => "forward").record(count as f64);
            match forward(&channels, &target, &commands, rpc_timeout).await {
                Ok(outcomes) => outcomes,
                Err(error) => vec![ProposeOutcome::Failed(format!("leader at {target}: {error}")); count],
            }
        }
    })
}

async fn forward(
    channels: &Channels,
    target: &str,
    commands: &[Command],
    timeout: Duration,
) -> Result<Vec<ProposeOutcome>, String> {
    let mut client = channels.raft_client(target).map_err(|e| e.to_string())?;
    let mut request = tonic::Request::new(encode(&commands).map_err(|e| e.to_string())?);
    request.set_timeout(timeout);
    let reply = tokio::time::timeout(timeout, client.propose(request))
        .await
        .map_err(|_| "no answer before the deadline".to_string())?
        .map_err(|status| status.message().to_string())?;
    decode(&reply.into_inner()).map_err(|e| e.to_string())
}
