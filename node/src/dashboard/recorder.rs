//! What the dashboard shows over time, observed by this node: throughput and queue samples,
//! cluster events (elections, membership changes, nodes going down and coming back), the status
//! of every member, and each task's state changes and attempts.
//!
//! The replicated state holds each task's present, not its past; so the history a task page
//! shows is what this node saw apply since it started (changes between two samples, 500 ms
//! apart, show as one). Every collection here is bounded.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use maos_raft_store::tasks::TaskState;
use tokio::sync::watch;

use crate::raft::core::NodeCore;

/// Time between two samples.
pub const SAMPLE_INTERVAL: Duration = Duration::from_millis(500);
/// Samples kept: two minutes.
pub const SAMPLES_MAX: usize = 240;
/// Cluster events kept.
pub const EVENTS_MAX: usize = 200;
/// Tasks whose history is kept (the most recently changed), and entries kept per task.
pub const HISTORY_TASKS_MAX: usize = 20_000;
pub const TRANSITIONS_MAX: usize = 64;
pub const ATTEMPTS_MAX: usize = 32;
/// How long a member's status call may take before it counts as unreachable.
const PEER_TIMEOUT: Duration = Duration::from_millis(400);

/// One sample of the task table.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    pub at_ms: u64,
    pub completed: u64,
    pub failed: u64,
    pub queued: u64,
    pub running: u64,
}

#[derive(Debug, Clone)]
pub struct ClusterEvent {
    pub at_ms: u64,
    /// `election`, `membership`, `node-down`, `node-up`.
    pub kind: &'static str,
    pub text: String,
}

/// A member as the dashboard last saw it.
#[derive(Debug, Clone, Default)]
pub struct MemberView {
    pub id: u64,
    pub api_addr: String,
    pub voter: bool,
    pub reachable: bool,
    pub role: String,
    pub term: u64,
    pub applied_index: u64,
    pub leader_id: Option<u64>,
    /// Why the last status call failed.
    pub error: String,
}

#[derive(Debug, Clone)]
pub struct Transition {
    /// The replicated time of the change (`updated_at_ms`).
    pub at_ms: u64,
    pub state: TaskState,
    pub attempt: u32,
    pub node_id: u64,
    pub cause: Option<String>,
}

#[derive(Debug, Clone)]
pub struct AttemptRecord {
    pub attempt: u32,
    pub node_id: u64,
    pub agent: String,
    pub token: u64,
    pub started_ms: u64,
    pub ended_ms: Option<u64>,
    /// The state the attempt ended in, and why.
    pub outcome: Option<(TaskState, Option<String>)>,
}

#[derive(Debug, Clone, Default)]
pub struct TaskHistory {
    pub transitions: VecDeque<Transition>,
    pub attempts: VecDeque<AttemptRecord>,
    /// When this history last changed, in `Recorded::changes` order.
    changed: u64,
}

/// What identifies a task's observable change: state, attempt, lease token.
type Seen = (TaskState, u32, u64);

#[derive(Default)]
struct Recorded {
    samples: VecDeque<Sample>,
    events: VecDeque<ClusterEvent>,
    members: BTreeMap<u64, MemberView>,
    seen: HashMap<String, Seen>,
    history: HashMap<String, TaskHistory>,
    /// Task ids with the change count when their history changed, oldest first, for eviction
    /// past `HISTORY_TASKS_MAX` (an entry older than its history's last change is skipped).
    history_order: VecDeque<(String, u64)>,
    changes: u64,
    last_leader: Option<(u64, Option<u64>)>,
    last_voters: Option<Vec<u64>>,
}

pub struct Recorder {
    recorded: Mutex<Recorded>,
}

pub fn wall_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Recorder {
    pub fn new() -> Self {
        Self { recorded: Mutex::new(Recorded::default()) }
    }

    fn lock(&self) -> MutexGuard<'_, Recorded> {
        // A panic while recording is a bug; the dashboard has nothing half-written to protect.
        self.recorded.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn samples(&self) -> Vec<Sample> {
        self.lock().samples.iter().copied().collect()
    }

    /// The most recent events first.
    pub fn events(&self, count: usize) -> Vec<ClusterEvent> {
        self.lock().events.iter().rev().take(count).cloned().collect()
    }

    pub fn members(&self) -> Vec<MemberView> {
        self.lock().members.values().cloned().collect()
    }

    pub fn history(&self, task_id: &str) -> Option<TaskHistory> {
        self.lock().history.get(task_id).cloned()
    }

    fn event(recorded: &mut Recorded, kind: &'static str, text: String) {
        if recorded.events.len() == EVENTS_MAX {
            recorded.events.pop_front();
        }
        recorded.events.push_back(ClusterEvent { at_ms: wall_ms(), kind, text });
    }

    /// One sample: the task table's counts and changes, and Raft's leader and membership.
    fn sample(&self, core: &NodeCore) {
        let (term, leader, voters) = {
            let metrics = core.raft.metrics();
            let m = metrics.borrow();
            let mut voters: Vec<u64> = m.membership_config.membership().voter_ids().collect();
            voters.sort_unstable();
            (m.current_term, m.current_leader, voters)
        };
        let mut changes = Vec::new();
        let mut sample = Sample { at_ms: wall_ms(), ..Default::default() };
        let mut recorded = self.lock();
        {
            let state = core.state.read();
            let table = &state.app.tasks;
            for (id, task) in &table.tasks {
                match task.state {
                    TaskState::Completed => sample.completed += 1,
                    TaskState::Failed => sample.failed += 1,
                    TaskState::Queued => sample.queued += 1,
                    TaskState::Running => sample.running += 1,
                    TaskState::Pending | TaskState::Cancelled => {}
                }
                let lease = task.lease.as_ref();
                let now: Seen = (task.state, task.attempt, lease.map(|l| l.token).unwrap_or(0));
                let before = recorded.seen.get(id.as_str()).copied();
                if before == Some(now) {
                    continue;
                }
                recorded.seen.insert(id.clone(), now);
                changes.push((
                    id.clone(),
                    before,
                    Transition {
                        at_ms: task.updated_at_ms,
                        state: task.state,
                        attempt: task.attempt,
                        node_id: lease.map(|l| l.node_id).unwrap_or(0),
                        cause: task.cause.clone(),
                    },
                    lease.map(|l| (l.slot.clone(), l.token)),
                ));
            }
            if recorded.seen.len() > table.tasks.len() {
                recorded.seen.retain(|id, _| table.tasks.contains_key(id));
            }
        }
        for (id, before, transition, lease) in changes {
            record_change(&mut recorded, id, before, transition, lease);
        }
        if recorded.samples.len() == SAMPLES_MAX {
            recorded.samples.pop_front();
        }
        recorded.samples.push_back(sample);
        if recorded.last_leader.map(|(_, l)| l) != Some(leader) {
            let text = match leader {
                Some(leader) => format!("node {leader} leads (term {term})"),
                None => format!("no leader known (term {term}): election under way"),
            };
            Self::event(&mut recorded, "election", text);
        }
        recorded.last_leader = Some((term, leader));
        // A node that has not joined yet has no membership: nothing to report until it does.
        if recorded.last_voters.as_ref() != Some(&voters) && !(voters.is_empty() && recorded.last_voters.is_none()) {
            Self::event(&mut recorded, "membership", format!("voters now {voters:?}"));
            recorded.last_voters = Some(voters);
        }
    }

    /// Ask every member for its status (this node from its own metrics), and note who went
    /// down or came back.
    async fn poll_members(&self, core: &NodeCore) {
        let members = core.members();
        let calls = members.iter().map(|(id, (node, voter))| async move {
            let mut view = MemberView { id: *id, api_addr: node.api_addr.clone(), voter: *voter, ..Default::default() };
            if *id == core.id {
                let metrics = core.raft.metrics();
                let m = metrics.borrow();
                view.reachable = true;
                view.role = crate::raft::core::role_name(m.state).into();
                view.term = m.current_term;
                view.applied_index = m.last_applied.map(|l| l.index).unwrap_or(0);
                view.leader_id = m.current_leader;
                return view;
            }
            // Over the Raft port, as a member: the API port would want a credential.
            match crate::raft::formation::peer_view(core, &node.raft_addr, PEER_TIMEOUT).await {
                Ok(peer) => {
                    view.reachable = true;
                    view.role = peer.role;
                    view.term = peer.term;
                    view.applied_index = peer.applied_index;
                    view.leader_id = peer.leader_id;
                }
                Err(error) if error == "no answer" => {
                    view.error = format!("no answer within {} ms", PEER_TIMEOUT.as_millis())
                }
                Err(error) => view.error = error,
            }
            view
        });
        let views = futures::future::join_all(calls).await;
        let mut recorded = self.lock();
        for view in &views {
            let was = recorded.members.get(&view.id).map(|m| m.reachable);
            match (was, view.reachable) {
                (Some(true), false) => {
                    Self::event(&mut recorded, "node-down", format!("node {} is unreachable: {}", view.id, view.error))
                }
                (Some(false), true) => Self::event(&mut recorded, "node-up", format!("node {} answers again", view.id)),
                _ => {}
            }
        }
        recorded.members = views.into_iter().map(|v| (v.id, v)).collect();
    }

    /// Sample until the node stops.
    pub async fn run(self: Arc<Self>, core: Arc<NodeCore>, mut stopped: watch::Receiver<bool>) {
        loop {
            self.sample(&core);
            self.poll_members(&core).await;
            tokio::select! {
                _ = tokio::time::sleep(SAMPLE_INTERVAL) => {}
                _ = stopped.wait_for(|stop| *stop) => return,
            }
        }
    }
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

/// Note one task's change: a transition, and the start or end of an attempt.
fn record_change(
    recorded: &mut Recorded,
    id: String,
    before: Option<Seen>,
    transition: Transition,
    lease: Option<(String, u64)>,
) {
    let history = recorded.history.entry(id.clone()).or_default();
    let token_before = before.map(|(_, _, token)| token).unwrap_or(0);
    if let Some(open) = history.attempts.back_mut().filter(|a| a.ended_ms.is_none()) {
        if lease.as_ref().map(|(_, token)| *token) != Some(open.token) {
            open.ended_ms = Some(transition.at_ms);
            open.outcome = Some((transition.state, transition.cause.clone()));
        }
    }
    if let Some((agent, token)) = lease.filter(|(_, token)| *token != token_before) {
        if history.attempts.len() == ATTEMPTS_MAX {
            history.attempts.pop_front();
        }
        history.attempts.push_back(AttemptRecord {
            attempt: transition.attempt,
            node_id: transition.node_id,
            agent,
            token,
            started_ms: transition.at_ms,
            ended_ms: None,
            outcome: None,
        });
    }
    // An attempt that started and ended between two samples: its lease was never seen, so its
    // node and agent are unknown, but its end and outcome are not.
    let ran_unseen = transition.attempt > 0
        && transition.state != TaskState::Running
        && before.is_none_or(|(_, attempt, _)| attempt < transition.attempt)
        && !history.attempts.iter().any(|a| a.attempt == transition.attempt);
    if ran_unseen {
        if history.attempts.len() == ATTEMPTS_MAX {
            history.attempts.pop_front();
        }
        history.attempts.push_back(AttemptRecord {
            attempt: transition.attempt,
            node_id: 0,
            agent: String::new(),
            token: 0,
            started_ms: 0,
            ended_ms: Some(transition.at_ms),
            outcome: Some((transition.state, transition.cause.clone())),
        });
    }
    if history.transitions.len() == TRANSITIONS_MAX {
        history.transitions.pop_front();
    }
    history.transitions.push_back(transition);
    recorded.changes += 1;
    history.changed = recorded.changes;
    recorded.history_order.push_back((id, recorded.changes));
    // Evict the least recently changed histories; the queue repeats ids, so an id goes only
    // when its latest entry leaves the queue.
    while recorded.history.len() > HISTORY_TASKS_MAX || recorded.history_order.len() > 4 * HISTORY_TASKS_MAX {
        let Some((oldest, at)) = recorded.history_order.pop_front() else { break };
        if recorded.history.get(&oldest).is_some_and(|h| h.changed == at) {
            recorded.history.remove(&oldest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(state: TaskState, attempt: u32, at_ms: u64, node_id: u64) -> Transition {
        Transition { at_ms, state, attempt, node_id, cause: None }
    }

    #[test]
    fn an_attempt_opens_with_its_lease_and_closes_with_its_outcome() {
        let mut recorded = Recorded::default();
        let id = "t".to_string();
        record_change(&mut recorded, id.clone(), None, change(TaskState::Queued, 0, 10, 0), None);
        let running = change(TaskState::Running, 1, 20, 2);
        record_change(
            &mut recorded,
            id.clone(),
            Some((TaskState::Queued, 0, 0)),
            running,
            Some(("n2/coder/0".into(), 7)),
        );
        let retry = change(TaskState::Queued, 1, 30, 0);
        record_change(&mut recorded, id.clone(), Some((TaskState::Running, 1, 7)), retry, None);
        let done = change(TaskState::Completed, 2, 50, 0);
        record_change(&mut recorded, id.clone(), Some((TaskState::Queued, 1, 0)), done, None);
        let history = &recorded.history[&id];
        assert_eq!(history.transitions.len(), 4);
        let attempts: Vec<_> = history
            .attempts
            .iter()
            .map(|a| (a.attempt, a.node_id, a.started_ms, a.ended_ms, a.outcome.clone().map(|o| o.0)))
            .collect();
        assert_eq!(
            attempts,
            vec![
                (1, 2, 20, Some(30), Some(TaskState::Queued)),
                // Attempt 2 ran between two samples: no node, no start, but its end and outcome.
                (2, 0, 0, Some(50), Some(TaskState::Completed)),
            ]
        );
    }

    #[test]
    fn histories_are_bounded_and_the_least_recently_changed_go_first() {
        let mut recorded = Recorded::default();
        for i in 0..HISTORY_TASKS_MAX + 10 {
            record_change(&mut recorded, format!("t{i}"), None, change(TaskState::Queued, 0, 1, 0), None);
        }
        assert_eq!(recorded.history.len(), HISTORY_TASKS_MAX);
        assert!(!recorded.history.contains_key("t0") && recorded.history.contains_key("t10"));
        for _ in 0..TRANSITIONS_MAX + 5 {
            let key = format!("t{}", HISTORY_TASKS_MAX + 9);
            record_change(&mut recorded, key, None, change(TaskState::Queued, 0, 1, 0), None);
        }
        assert_eq!(recorded.history[&format!("t{}", HISTORY_TASKS_MAX + 9)].transitions.len(), TRANSITIONS_MAX);
    }
}
