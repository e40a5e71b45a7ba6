//! Batching proposals on the leader.
//!
//! openraft 0.9 writes each log entry (and waits for its flush) before it takes the next client
//! write, so one entry per command would cap a cluster at one fsync per command. The proposer
//! queues commands and puts every command that arrived while earlier entries were in flight into
//! one entry: throughput grows with concurrency instead of being capped by disk latency.

use std::sync::Arc;

use maos_raft_store::command::{BATCH_BYTES_MAX, BATCH_COMMANDS_MAX};
use maos_raft_store::{Command, Raft, Request, Response};
use openraft::error::{ClientWriteError, RaftError};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::core::{Clock, ProposeOutcome};

/// Upper bound on commands waiting for a batch; a full queue makes proposers wait (backpressure).
pub const QUEUE_CAPACITY: usize = 16_384;
/// Entries proposed and not yet applied at once. More overlap replication with the next log
/// write; each one still waits its turn in openraft's log writer.
pub const IN_FLIGHT_MAX: usize = 4;

struct Pending {
    command: Command,
    reply: oneshot::Sender<ProposeOutcome>,
}

/// A handle to the batching task. Cheap to clone.
#[derive(Clone)]
pub struct Proposer {
    queue: mpsc::Sender<Pending>,
}

impl Proposer {
    /// Start the batching task for `raft`, stamping each entry with `clock`.
    pub fn start(raft: Raft, clock: Clock) -> Self {
        let (queue, pending) = mpsc::channel(QUEUE_CAPACITY);
        tokio::spawn(run(raft, clock, pending));
        Self { queue }
    }

    /// Propose `command` in the next batch and wait for its result.
    pub async fn propose(&self, command: Command) -> ProposeOutcome {
        let (reply, result) = oneshot::channel();
        if self.queue.send(Pending { command, reply }).await.is_err() {
            return ProposeOutcome::Failed("the proposer has stopped".into());
        }
        result.await.unwrap_or_else(|_| ProposeOutcome::Failed("the proposer has stopped".into()))
    }
}

async fn run(raft: Raft, clock: Clock, mut pending: mpsc::Receiver<Pending>) {
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
        let mut bytes = first.command.payload_bytes();
        let mut batch = vec![first];
        while batch.len() < BATCH_COMMANDS_MAX {
            match pending.try_recv() {
                Ok(next) if bytes + next.command.payload_bytes() > BATCH_BYTES_MAX => {
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
        let raft = raft.clone();
        let stamped_at_ms = clock();
        tokio::spawn(async move {
            let _permit = permit;
            let (commands, replies): (Vec<Command>, Vec<oneshot::Sender<ProposeOutcome>>) =
                batch.into_iter().map(|p| (p.command, p.reply)).unzip();
            let count = commands.len();
            match raft.client_write(Request::new(stamped_at_ms, commands)).await {
                Ok(written) if written.data.len() == count => {
                    for (reply, response) in replies.into_iter().zip(written.data) {
                        let _ = reply.send(ProposeOutcome::Applied(response));
                    }
                }
                Ok(written) => {
                    let message = format!("{} results for {count} commands", written.data.len());
                    tracing::error!(%message, "the state machine answered a batch with the wrong number of results");
                    for reply in replies {
                        let _ = reply.send(ProposeOutcome::Applied(Response::Rejected(
                            maos_raft_store::Rejection::InvalidField {
                                field: "batch".into(),
                                message: message.clone(),
                            },
                        )));
                    }
                }
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward))) => {
                    for reply in replies {
                        let _ = reply.send(ProposeOutcome::NotLeader { leader_id: forward.leader_id });
                    }
                }
                Err(other) => {
                    let message = other.to_string();
                    for reply in replies {
                        let _ = reply.send(ProposeOutcome::Failed(message.clone()));
                    }
                }
            }
        });
    }
}
