//! The running node: its Raft instance, its read handle on applied state, and the write and read
//! paths every API shares.
//!
//! Writes: any node accepts one. The leader stamps it with its clock and proposes it; a follower
//! forwards it to the leader's Raft port (`Propose`). Reads: linearizable by ReadIndex (the
//! leader confirms it still leads and names an index; the reader waits until it has applied that
//! index), or stale from local state when the caller asks.
//!
//! Exactly once: every write whose repeat could change something goes on this node's client
//! session (opened through the log on the first such write) as `(client, sequence)`, and a write that is sent again, because a forward or a
//! local proposal failed without an answer, keeps its sequence, so the state machine applies it
//! once and answers the resend from memory. A session that expired is reopened only for a write
//! that was never sent ambiguously; otherwise the caller gets `SessionExpired` (it may have
//! applied), never a second apply.
//!
//! A caller with its own session (an SDK client, `maos-session` metadata: [`CallerSession`])
//! gets the same guarantee across nodes: the API's session layer sets [`CALLER_SESSION`] around
//! the request, and the request's first write whose repeat could change something goes on the
//! caller's session instead of this node's, so a resend through any node applies once.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use maos_raft_store::state::check_command;
use maos_raft_store::{Command, MaosNode, NodeId, Raft, Rejection, Response, StateMachineHandle};
use openraft::ServerState;
use tracing::Instrument;

use crate::proto::ReadIndexRequest;
use crate::raft::clock::ClockBound;
use crate::raft::network::Channels;
use crate::raft::proposer::{Batcher, Clock, ProposalHold, ProposeOutcome};
use crate::telemetry::traces;

/// Pause between attempts while a leader is unknown or changing.
const LEADER_RETRY_PAUSE: Duration = Duration::from_millis(25);

/// A Raft role's name, as the API, the dashboard and the Raft port's Hello say it.
pub fn role_name(state: ServerState) -> &'static str {
    match state {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}

/// Whether a second apply of `command` could change anything: a node's own registrations,
/// renewals, the leader's `Tick`, lease extension and limits do not (applied again they leave
/// the same state, or extend what was just extended), so they skip the session. That keeps a
/// new node's first writes (its identity, its agent pool) from waiting for a session to open,
/// and the most frequent background write (the renewal) free of session bookkeeping.
fn needs_session(command: &Command) -> bool {
    use maos_raft_store::tasks::TaskCommand as T;
    !matches!(
        command,
        Command::InitCluster { .. }
            | Command::RegisterNode { .. }
            | Command::OpenSession { .. }
            | Command::Session { .. }
            | Command::Task(
                T::RegisterSlots { .. } | T::Renew { .. } | T::Tick | T::ExtendLeases { .. } | T::Configure { .. }
            )
    )
}

/// The caller's session for one of its writes: `maos-session: <client>/<sequence>/<acknowledged>`,
/// and the principal that sends it (the session must be that principal's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallerSession {
    pub client: u64,
    pub sequence: u64,
    pub acknowledged: u64,
    pub owner: String,
}

impl CallerSession {
    /// The metadata (and HTTP header) that carries it.
    pub const HEADER: &'static str = "maos-session";

    /// Parse the header's value into (client, sequence, acknowledged); the error names the
    /// header and the expected form.
    pub fn parse(text: &str) -> Result<(u64, u64, u64), String> {
        let numbers: Vec<Option<u64>> = text.trim().split('/').map(|part| part.parse().ok()).collect();
        match numbers.as_slice() {
            [Some(client), Some(sequence), Some(acknowledged)] if *sequence > 0 && acknowledged < sequence => {
                Ok((*client, *sequence, *acknowledged))
            }
            _ => Err(format!(
                "{}: {text:?} is not <session id>/<sequence>/<acknowledged> with 0 <= acknowledged < sequence (open a session with ClusterService.OpenSession)",
                Self::HEADER
            )),
        }
    }
}

tokio::task_local! {
    /// The session of the caller whose request is being served, if it sent one; taken by the
    /// request's first write that needs a session (later writes of the same request go on this
    /// node's session, since they would share the caller's sequence).
    pub static CALLER_SESSION: std::cell::Cell<Option<CallerSession>>;
}

/// A sequence in flight; ends it when dropped, whether the write finished or was abandoned.
struct Outstanding<'a> {
    session: &'a Mutex<ClientSession>,
    sequence: u64,
}

impl Drop for Outstanding<'_> {
    fn drop(&mut self) {
        lock(self.session).end(self.sequence);
    }
}

/// Plain counters, consistent after any panic: a poisoned lock holds usable data.
fn lock(session: &Mutex<ClientSession>) -> std::sync::MutexGuard<'_, ClientSession> {
    session.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// This node's client session and its sequence numbers.
#[derive(Debug, Default)]
pub struct ClientSession {
    client: Option<u64>,
    /// The last sequence handed out; one counter across sessions, so a reopened session never
    /// reuses a number.
    last_sequence: u64,
    /// Sequences sent and not yet answered.
    outstanding: BTreeSet<u64>,
}

impl ClientSession {
    /// The next sequence, and the highest sequence below which every answer is in.
    fn begin(&mut self) -> (u64, u64) {
        self.last_sequence += 1;
        self.outstanding.insert(self.last_sequence);
        let acknowledged = self.outstanding.first().map_or(self.last_sequence, |first| first - 1);
        (self.last_sequence, acknowledged)
    }

    fn end(&mut self, sequence: u64) {
        self.outstanding.remove(&sequence);
    }
}

/// Why a write or read did not happen.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("{0}")]
    Rejected(#[from] Rejection),
    #[error("no leader could take the request within {timeout_ms} ms ({last}); retry, or check that a majority of nodes is up")]
    Unavailable { timeout_ms: u64, last: String },
    #[error("this node has stopped: {0}")]
    Stopped(String),
    /// This node is no longer a member: calls go to another node.
    #[error("{0}; send requests to another node")]
    Removed(String),
}

/// Everything the APIs and the Raft service share.
pub struct NodeCore {
    pub id: NodeId,
    pub cluster_name: String,
    pub raft: Raft,
    pub state: StateMachineHandle,
    pub channels: Channels,
    /// Cluster time: this node's wall clock moved into the interval a quorum's clocks agree on
    /// (see [`crate::raft::clock`]). Everything that stamps or reads replicated times uses it.
    pub clock: Clock,
    /// This node's own wall clock, uncorrected: what the `Clock` call answers peers with.
    pub wall_clock: Clock,
    /// What this node knows of its clock against a quorum's.
    pub clock_bound: Arc<ClockBound>,
    /// Batches this node's proposals into log entries while it leads.
    pub proposer: Batcher,
    /// Held by a leadership transfer from this node, so its log does not outrun the target's.
    pub proposal_hold: Arc<ProposalHold>,
    /// Batches this node's forwarded writes to the leader while it follows.
    pub forwarder: Batcher,
    pub request_timeout: Duration,
    /// The static peer list as `id=raft_addr,...` (sorted); see `Hello.peers_digest`.
    pub peers_digest: String,
    /// This node's client session (see the module doc).
    pub session: Mutex<ClientSession>,
    /// How long the session lives without a write (`raft.session_ttl_ms`).
    pub session_ttl: Duration,
    /// Held while a session is being opened, so concurrent first writes open one.
    pub session_opening: tokio::sync::Mutex<()>,
    /// When this node last heard from a leader (see [`crate::raft::leader_watch`]).
    pub leader_contact: LeaderContact,
}

impl NodeCore {
    /// The leader as this node sees it, with its addresses.
    pub fn leader(&self) -> Option<(NodeId, MaosNode)> {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        let leader = metrics.current_leader?;
        let node = metrics.membership_config.membership().get_node(&leader).cloned()?;
        Some((leader, node))
    }

    /// Why this node no longer belongs to the cluster, if it was removed: it applied a membership
    /// that leaves it out. Only a member (or a learner) receives memberships, so that is a
    /// removal; a node waiting to join has none yet. Checked on the slow paths only (no leader
    /// known), not per write.
    pub fn removal(&self) -> Option<String> {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        let membership = metrics.membership_config.membership();
        if membership.get_node(&self.id).is_some() {
            return None;
        }
        let index = metrics.membership_config.log_id().as_ref()?.index;
        if Some(index) > metrics.last_applied.map(|id| id.index) {
            return None;
        }
        let members: Vec<NodeId> = membership.nodes().map(|(id, _)| *id).collect();
        Some(format!(
            "node {} was removed from the cluster by the membership change at log index {index} (members now {members:?}); it serves nothing until it is added again (maos cluster add-node)",
            self.id
        ))
    }

    pub fn is_leader(&self) -> bool {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        metrics.state == ServerState::Leader && metrics.current_leader == Some(self.id)
    }

    /// The members of the current membership: id -> (node, is voter).
    pub fn members(&self) -> BTreeMap<NodeId, (MaosNode, bool)> {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        let membership = metrics.membership_config.membership();
        let voters: std::collections::BTreeSet<NodeId> = membership.voter_ids().collect();
        membership.nodes().map(|(id, node)| (*id, (node.clone(), voters.contains(id)))).collect()
    }

    /// The voters of the current membership: id -> node.
    pub fn voters(&self) -> BTreeMap<NodeId, MaosNode> {
        self.members().into_iter().filter(|(_, (_, voter))| *voter).map(|(id, (node, _))| (id, node)).collect()
    }

    /// Propose `command` on this node, which must be the leader, in the next batch.
    /// A submit whose trace is recorded is proposed in a `propose` span of that trace, so the
    /// trace shows the leader's part, whichever node the caller reached.
    pub async fn propose_local(&self, command: Command) -> ProposeOutcome {
        let trace_parent = command.trace_parent();
        if trace_parent.is_empty() || !traces::enabled() {
            return self.proposer.submit("", command).await;
        }
        let span = tracing::info_span!(target: traces::TARGET, "propose", node_id = self.id);
        traces::follow(&span, trace_parent);
        self.proposer.submit("", command).instrument(span).await
    }

    /// Replicate `command` through the leader, wherever it is, and return its result.
    pub async fn write(&self, command: Command) -> Result<Response, CoreError> {
        self.write_within(command, self.request_timeout).await
    }

    /// [`Self::write`] with its own deadline instead of `request_timeout`: for callers that must
    /// learn of a failure sooner and try again (through a leader that may have changed meanwhile).
    pub async fn write_within(&self, command: Command, timeout: Duration) -> Result<Response, CoreError> {
        check_command(&command)?;
        let deadline = tokio::time::Instant::now() + timeout;
        if !needs_session(&command) {
            return self.send(command, deadline, timeout).await.map_err(|(error, _)| error);
        }
        if let Some(caller) = CALLER_SESSION.try_with(std::cell::Cell::take).ok().flatten() {
            // The caller resends on its own after an ambiguous failure, with the same sequence.
            let CallerSession { client, sequence, acknowledged, owner } = caller;
            let tagged = Command::Session { client, sequence, acknowledged, owner, command: Box::new(command) };
            return self.send(tagged, deadline, timeout).await.map_err(|(error, ambiguous)| match error {
                // An earlier attempt here may have applied: the caller must not take this as
                // "nothing applied" and reopen; a resend of it then gets SessionExpired as such.
                CoreError::Rejected(Rejection::SessionExpired { .. }) if ambiguous => CoreError::Unavailable {
                    timeout_ms: timeout.as_millis() as u64,
                    last: format!("client session {client} ended while its write {sequence} was being resent"),
                },
                error => error,
            });
        }
        // At most one reopen: a session can expire once while a write waits for it.
        for _ in 0..2 {
            let client = self.session_client(deadline, timeout).await?;
            let (sequence, acknowledged) = self.lock_session().begin();
            // Ended on drop too: a caller that gives up mid-write (a cancelled request) must not
            // hold the acknowledged sequence back, or the session's answers would pile up.
            let _outstanding = Outstanding { session: &self.session, sequence };
            // This node's own session: no owner.
            let owner = String::new();
            let tagged = Command::Session { client, sequence, acknowledged, owner, command: Box::new(command.clone()) };
            let sent = self.send(tagged, deadline, timeout).await;
            drop(_outstanding);
            match sent {
                Err((CoreError::Rejected(Rejection::SessionExpired { .. }), false)) => self.forget_session(client),
                other => return other.map_err(|(error, _)| error),
            }
        }
        Err(CoreError::Unavailable {
            timeout_ms: timeout.as_millis() as u64,
            last: "this node's client session expired twice in one write".into(),
        })
    }

    fn lock_session(&self) -> std::sync::MutexGuard<'_, ClientSession> {
        lock(&self.session)
    }

    fn forget_session(&self, client: u64) {
        let mut session = self.lock_session();
        if session.client == Some(client) {
            session.client = None;
        }
    }

    /// This node's session, opened through the log if it has none yet.
    async fn session_client(&self, deadline: tokio::time::Instant, timeout: Duration) -> Result<u64, CoreError> {
        if let Some(client) = self.lock_session().client {
            return Ok(client);
        }
        let _opening = self.session_opening.lock().await;
        if let Some(client) = self.lock_session().client {
            return Ok(client);
        }
        let open = Command::OpenSession { ttl_ms: self.session_ttl.as_millis() as u64, owner: String::new() };
        match self.send(open, deadline, timeout).await.map_err(|(error, _)| error)? {
            Response::SessionOpened { client } => {
                self.lock_session().client = Some(client);
                Ok(client)
            }
            other => Err(CoreError::Unavailable {
                timeout_ms: timeout.as_millis() as u64,
                last: format!("opening a client session answered {other:?}"),
            }),
        }
    }

    /// Send `command` until it is answered or `deadline`; the flag says whether an attempt failed
    /// without an answer (so the command may have applied).
    async fn send(
        &self,
        command: Command,
        deadline: tokio::time::Instant,
        timeout: Duration,
    ) -> Result<Response, (CoreError, bool)> {
        let mut ambiguous = false;
        loop {
            let outcome = match self.leader() {
                // A leader cut off from its majority keeps its role until it learns of a newer
                // term, so a local proposal needs the deadline too.
                Some((leader, _)) if leader == self.id => {
                    match tokio::time::timeout_at(deadline, self.propose_local(command.clone())).await {
                        Ok(outcome) => outcome,
                        Err(_) => ProposeOutcome::Failed("not committed before the deadline".into()),
                    }
                }
                Some((leader, node)) => {
                    // Another node leads now: what only a leader proposes is not sent on.
                    if let Some(name) = command.leader_only() {
                        return Err((Command::not_forwardable(name).into(), ambiguous));
                    }
                    let forwarded = self.forwarder.submit(&node.raft_addr, command.clone());
                    match tokio::time::timeout_at(deadline, forwarded).await {
                        Ok(outcome) => outcome,
                        Err(_) => ProposeOutcome::Failed(format!("leader {leader} did not answer before the deadline")),
                    }
                }
                None => match self.removal() {
                    Some(why) => return Err((CoreError::Removed(why), ambiguous)),
                    None => ProposeOutcome::NotLeader { leader_id: None },
                },
            };
            let last = match outcome {
                ProposeOutcome::Applied(Response::Rejected(rejection)) => return Err((rejection.into(), ambiguous)),
                ProposeOutcome::Applied(response) => return Ok(response),
                ProposeOutcome::NotLeader { leader_id } => format!("leader changing (hint: {leader_id:?})"),
                ProposeOutcome::Failed(message) => {
                    ambiguous = true;
                    message
                }
            };
            if tokio::time::Instant::now() + LEADER_RETRY_PAUSE >= deadline {
                return Err((CoreError::Unavailable { timeout_ms: timeout.as_millis() as u64, last }, ambiguous));
            }
            tokio::time::sleep(LEADER_RETRY_PAUSE).await;
        }
    }

    /// Wait until this node's applied state reflects every write acknowledged before the call.
    pub async fn read_barrier(&self) -> Result<u64, CoreError> {
        let deadline = tokio::time::Instant::now() + self.request_timeout;
        loop {
            let read_index = match self.leader() {
                Some((leader, _)) if leader == self.id => {
                    match tokio::time::timeout_at(deadline, self.raft.get_read_log_id()).await {
                        Ok(Ok((read_log_id, _applied))) => Ok(read_log_id.map(|id| id.index).unwrap_or(0)),
                        Ok(Err(error)) => Err(error.to_string()),
                        Err(_) => Err("leadership not confirmed before the deadline".into()),
                    }
                }
                Some((leader, node)) => self
                    .forward_read_index(&node.raft_addr, deadline)
                    .await
                    .map_err(|e| format!("leader {leader} at {}: {e}", node.raft_addr)),
                None => match self.removal() {
                    Some(why) => return Err(CoreError::Removed(why)),
                    None => Err("no leader known".to_string()),
                },
            };
            let last = match read_index {
                Ok(index) => {
                    let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
                    self.raft.wait(Some(remaining)).applied_index_at_least(Some(index), "read barrier").await.map_err(
                        |e| CoreError::Unavailable {
                            timeout_ms: self.request_timeout.as_millis() as u64,
                            last: format!("waiting to apply index {index}: {e}"),
                        },
                    )?;
                    return Ok(index);
                }
                Err(message) => message,
            };
            if tokio::time::Instant::now() + LEADER_RETRY_PAUSE >= deadline {
                return Err(CoreError::Unavailable { timeout_ms: self.request_timeout.as_millis() as u64, last });
            }
            tokio::time::sleep(LEADER_RETRY_PAUSE).await;
        }
    }

    async fn forward_read_index(&self, raft_addr: &str, deadline: tokio::time::Instant) -> Result<u64, String> {
        let mut client = self.channels.raft_client(raft_addr).map_err(|e| e.to_string())?;
        let mut request = tonic::Request::new(ReadIndexRequest {});
        request.set_timeout(deadline.saturating_duration_since(tokio::time::Instant::now()));
        let reply = tokio::time::timeout_at(deadline, client.read_index(request))
            .await
            .map_err(|_| "no answer before the deadline".to_string())?
            .map_err(|status| status.message().to_string())?;
        Ok(reply.into_inner().read_index)
    }
}

/// When this node last heard from a leader (an append-entries call it did not refuse), for
/// [`crate::raft::leader_watch`].
#[derive(Debug, Default)]
pub struct LeaderContact(Mutex<Option<tokio::time::Instant>>);

impl LeaderContact {
    pub fn heard(&self) {
        *self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(tokio::time::Instant::now());
    }

    pub fn last(&self) -> Option<tokio::time::Instant> {
        *self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use futures::FutureExt;

    use super::*;

    #[test]
    fn an_abandoned_write_does_not_hold_the_acknowledged_sequence_back() {
        let session = Mutex::new(ClientSession::default());
        let (first, _) = lock(&session).begin();
        // A write that is cancelled while it waits (its caller went away): polled once, dropped.
        let abandoned = async {
            let _outstanding = Outstanding { session: &session, sequence: first };
            std::future::pending::<()>().await
        };
        assert!(abandoned.now_or_never().is_none());
        let (second, acknowledged) = lock(&session).begin();
        assert_eq!((second, acknowledged), (2, 1), "the abandoned sequence counts as answered");
    }

    #[test]
    fn a_caller_session_header_is_three_numbers_with_the_acknowledged_below_the_sequence() {
        assert_eq!(CallerSession::parse("4096/7/6"), Ok((4096, 7, 6)));
        for bad in ["", "1/2", "1/2/3/4", "a/1/0", "1/0/0", "1/3/3", "1/-1/0"] {
            let error = CallerSession::parse(bad).expect_err(bad);
            assert!(error.starts_with("maos-session: "), "{error}");
        }
    }
}
