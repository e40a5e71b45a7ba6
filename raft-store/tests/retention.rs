//! Retention of finished tasks, table-driven through the replicated apply with `validate()` after
//! every entry: what leaves the state and when, what an open task keeps, the bound on finished
//! tasks, the idempotency window, and that every replica evicts the same tasks.

use std::collections::{BTreeMap, BTreeSet};

use maos_raft_store::state::fencing_token;
use maos_raft_store::tasks::{
    Priority, Slot, TaskCommand, TaskLimits, TaskRejection, TaskResponse, TaskSpec, TaskState, EVICT_BATCH_MAX,
};
use maos_raft_store::{Command, Entry, Rejection, Request, Response, StateMachineData};
use openraft::{CommittedLeaderId, EntryPayload, LogId};

const RETENTION_MS: u64 = 1_000;
const WINDOW_MS: u64 = 5_000;

/// A state machine driven one command per entry, validated after each; the log it applied is
/// kept so another replica can apply it too.
struct Replica {
    state: StateMachineData,
    log: Vec<Entry>,
}

impl Replica {
    fn new(retained_max: usize) -> Self {
        let mut replica = Self { state: StateMachineData::default(), log: Vec::new() };
        let slots = (0..8)
            .map(|i| (format!("n1/coder/{i}"), Slot { node_id: 1, agent_type: "coder".into(), ..Slot::default() }))
            .collect();
        replica.apply(0, TaskCommand::RegisterSlots { node_id: 1, slots }).expect("slots");
        let limits = TaskLimits {
            retention_ms: RETENTION_MS,
            retained_max,
            idempotency_window_ms: WINDOW_MS,
            ..TaskLimits::default()
        };
        replica.apply(0, TaskCommand::Configure { limits }).expect("limits");
        replica
    }

    fn apply(&mut self, now_ms: u64, command: TaskCommand) -> Result<TaskResponse, TaskRejection> {
        let index = self.log.len() as u64 + 1;
        let entry = Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Request::new(now_ms, vec![Command::Task(command)])),
        };
        let mut responses = self.state.apply(&entry).expect("current format");
        self.state.validate().unwrap_or_else(|e| panic!("after entry {index}: {e}"));
        self.log.push(entry);
        match responses.remove(0) {
            Response::Task(response) => Ok(response),
            Response::Rejected(Rejection::Task(rejection)) => Err(rejection),
            other => panic!("unexpected response {other:?}"),
        }
    }

    fn submit(&mut self, now_ms: u64, spec: TaskSpec) {
        self.apply(now_ms, TaskCommand::Submit { spec: Box::new(spec) }).expect("submit");
    }

    /// Assign `id` to a free slot and complete it at `now_ms`.
    fn run(&mut self, now_ms: u64, id: &str) {
        let table = &self.state.app.tasks;
        let slot = (0..8).map(|i| format!("n1/coder/{i}")).find(|s| !table.slot_holder.contains_key(s)).expect("slot");
        self.apply(now_ms, TaskCommand::Assign { task_id: id.into(), slot, node_id: 1, lease_ms: 60_000 })
            .expect("assign");
        let token = fencing_token(self.log.len() as u64, 0);
        self.apply(now_ms, TaskCommand::Complete { task_id: id.into(), token, result: "ok".into(), stored: false })
            .expect("complete");
    }

    /// What the leader's housekeeping does at `now_ms`: choose the candidates, propose them.
    fn evict(&mut self, now_ms: u64) -> TaskResponse {
        let tasks = self.state.app.tasks.eviction_candidates(now_ms, EVICT_BATCH_MAX, 50_000);
        self.apply(now_ms, TaskCommand::Evict { tasks }).expect("evict is never refused")
    }

    fn held(&self, id: &str) -> bool {
        self.state.app.tasks.tasks.contains_key(id)
    }
}

fn spec(id: &str) -> TaskSpec {
    TaskSpec {
        id: id.into(),
        task_type: "coder".into(),
        priority: Priority::Normal,
        description: format!("task {id}"),
        input: String::new(),
        depends_on: Vec::new(),
        parent: None,
        max_retries: 0,
        timeout_ms: 60_000,
        idempotency_key: None,
        submitter: "alice".into(),
        labels: BTreeMap::new(),
        capabilities: BTreeSet::new(),
        planner_type: None,
        max_agents: None,
        input_stored: false,
        trace_parent: String::new(),
    }
}

fn child_of(id: &str, parent: &str) -> TaskSpec {
    TaskSpec { parent: Some(parent.into()), ..spec(id) }
}

fn depending(id: &str, on: &[&str]) -> TaskSpec {
    TaskSpec { depends_on: on.iter().map(|d| d.to_string()).collect(), ..spec(id) }
}

/// One case: a history, then evictions at the given times; what is held after each.
struct Case {
    name: &'static str,
    retained_max: usize,
    history: fn(&mut Replica),
    /// (time of an eviction round, tasks gone after it, tasks still held after it)
    rounds: &'static [(u64, &'static [&'static str], &'static [&'static str])],
}

#[test]
fn finished_tasks_leave_after_their_retention_and_only_when_nothing_open_needs_them() {
    let cases = [
        Case {
            name: "a finished task stays for its retention, then leaves; an open one stays",
            retained_max: 100,
            history: |r| {
                r.submit(0, spec("done"));
                r.run(10, "done");
                r.submit(10, spec("open"));
            },
            rounds: &[(10 + RETENTION_MS - 1, &[], &["done", "open"]), (10 + RETENTION_MS, &["done"], &["open"])],
        },
        Case {
            name: "failed and cancelled tasks leave like completed ones",
            retained_max: 100,
            history: |r| {
                r.submit(0, spec("cancelled"));
                r.apply(5, TaskCommand::Cancel { task_id: "cancelled".into(), reason: "test".into() }).expect("cancel");
                r.submit(0, depending("failed", &["cancelled"]));
            },
            rounds: &[(5 + RETENTION_MS, &["cancelled", "failed"], &[])],
        },
        Case {
            name: "a parent stays while a child is open, and a child while its parent is held",
            retained_max: 100,
            history: |r| {
                r.submit(0, spec("parent"));
                r.submit(0, child_of("parent.open", "parent"));
                r.submit(0, child_of("parent.done", "parent"));
                r.run(10, "parent.done");
                r.run(20, "parent");
            },
            rounds: &[(5_000, &[], &["parent", "parent.open", "parent.done"])],
        },
        Case {
            name: "a finished parent leaves first, its finished children in the next round",
            retained_max: 100,
            history: |r| {
                r.submit(0, spec("p"));
                r.submit(0, child_of("p.a", "p"));
                r.run(10, "p.a");
                r.run(20, "p");
            },
            // p.a finished first, so the first round passes it over (p still held) and takes p.
            rounds: &[(20 + RETENTION_MS, &["p"], &["p.a"]), (20 + RETENTION_MS, &["p.a"], &[])],
        },
        Case {
            name: "a dependency stays while a dependent waits for its result",
            retained_max: 100,
            history: |r| {
                r.submit(0, spec("dep"));
                r.submit(0, spec("other"));
                r.submit(0, depending("waiting", &["dep", "other"]));
                r.run(10, "dep");
            },
            rounds: &[(10 + RETENTION_MS, &[], &["dep", "waiting", "other"])],
        },
        Case {
            name: "a dependency leaves once its dependents finished; their records keep naming it",
            retained_max: 100,
            history: |r| {
                r.submit(0, spec("dep"));
                r.submit(0, depending("dependent", &["dep"]));
                r.run(10, "dep");
                r.run(2_000, "dependent");
            },
            rounds: &[(10 + RETENTION_MS, &["dep"], &["dependent"]), (2_000 + RETENTION_MS, &["dependent"], &[])],
        },
        Case {
            name: "past retained_max the oldest finished tasks leave before their retention",
            retained_max: 2,
            history: |r| {
                for (i, id) in ["t1", "t2", "t3", "t4"].iter().enumerate() {
                    r.submit(0, spec(id));
                    r.run(10 * (i as u64 + 1), id);
                }
            },
            rounds: &[(100, &["t1", "t2"], &["t3", "t4"]), (100, &[], &["t3", "t4"])],
        },
    ];
    for case in cases {
        let mut replica = Replica::new(case.retained_max);
        (case.history)(&mut replica);
        for (round, (at, gone, kept)) in case.rounds.iter().enumerate() {
            replica.evict(*at);
            for id in *gone {
                assert!(!replica.held(id), "{}, round {round}: {id} should be gone", case.name);
            }
            for id in *kept {
                assert!(replica.held(id), "{}, round {round}: {id} should be held", case.name);
            }
        }
        assert!(replica.state.app.tasks.finished.len() <= replica.state.app.tasks.tasks.len(), "{}", case.name);
    }
}

#[test]
fn apply_rechecks_what_the_leader_named() {
    let mut r = Replica::new(100);
    r.submit(0, spec("a"));
    r.submit(0, spec("b"));
    r.submit(0, spec("open"));
    r.run(10, "a");
    r.run(10, "b");
    // Named too early, under a stale finish time, an open task and an unknown one: all skipped.
    let named = |ids: &[(&str, u64)]| ids.iter().map(|(id, at)| (id.to_string(), *at)).collect::<Vec<_>>();
    let response = r.apply(500, TaskCommand::Evict { tasks: named(&[("a", 10)]) });
    assert_eq!(response, Ok(TaskResponse::Evicted { evicted: 0, skipped: 1, keys_expired: 0 }));
    let response =
        r.apply(5_000, TaskCommand::Evict { tasks: named(&[("a", 9), ("open", 0), ("nobody", 10), ("b", 10)]) });
    assert_eq!(response, Ok(TaskResponse::Evicted { evicted: 1, skipped: 3, keys_expired: 0 }));
    assert!(r.held("a") && !r.held("b") && r.held("open"));
    // A task retried (and finished again) after it was chosen is kept: its finish time moved.
    r.apply(5_000, TaskCommand::Cancel { task_id: "open".into(), reason: "x".into() }).expect("cancel");
    let chosen = r.state.app.tasks.eviction_candidates(10_000, EVICT_BATCH_MAX, 100);
    assert!(chosen.iter().any(|(id, _)| id == "open"));
    r.apply(6_000, TaskCommand::Retry { task_id: "open".into() }).expect("retry");
    r.apply(6_001, TaskCommand::Cancel { task_id: "open".into(), reason: "again".into() }).expect("cancel");
    r.apply(10_000, TaskCommand::Evict { tasks: chosen }).expect("evict");
    assert!(r.held("open"), "the task retried since it was chosen is kept");
    assert!(!r.held("a"));
    // A batch over the bound is refused before apply.
    let too_many = (0..=EVICT_BATCH_MAX).map(|i| (format!("x{i}"), 0)).collect();
    let mut state = r.state.clone();
    let entry = Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), 10_000),
        payload: EntryPayload::Normal(Request::new(0, vec![Command::Task(TaskCommand::Evict { tasks: too_many })])),
    };
    let responses = state.apply(&entry).expect("current format");
    assert!(matches!(responses[0], Response::Rejected(Rejection::InvalidField { .. })), "{responses:?}");
}

#[test]
fn idempotency_keys_outlive_their_task_for_the_window_then_a_resubmit_creates_a_new_task() {
    let mut r = Replica::new(100);
    let keyed = |id: &str| TaskSpec { idempotency_key: Some("order-7".into()), ..spec(id) };
    r.submit(0, keyed("first"));
    r.run(100, "first");
    r.evict(100 + RETENTION_MS);
    assert!(!r.held("first"), "evicted after its retention");
    assert_eq!(r.state.app.tasks.retired_keys.len(), 1);
    // Within the window the key still answers with the evicted task.
    let again = r.apply(100 + WINDOW_MS - 1, TaskCommand::Submit { spec: Box::new(keyed("second")) });
    assert_eq!(again, Ok(TaskResponse::Submitted { task_id: "first".into(), duplicate: true }));
    assert!(!r.held("second"));
    // The window ends: the next eviction round forgets the key, and a resubmit is a new task.
    assert!(r.state.app.tasks.eviction_due(100 + WINDOW_MS));
    let response = r.evict(100 + WINDOW_MS);
    assert_eq!(response, TaskResponse::Evicted { evicted: 0, skipped: 0, keys_expired: 1 });
    let fresh = r.apply(100 + WINDOW_MS, TaskCommand::Submit { spec: Box::new(keyed("second")) });
    assert_eq!(fresh, Ok(TaskResponse::Submitted { task_id: "second".into(), duplicate: false }));
    // A window shorter than the retention is refused.
    let limits = TaskLimits { retention_ms: 10, idempotency_window_ms: 5, ..TaskLimits::default() };
    assert!(matches!(r.apply(0, TaskCommand::Configure { limits }), Err(TaskRejection::InvalidSpec { .. })));
}

#[test]
fn evicted_tasks_cannot_be_retried_through_and_are_told_apart_from_never_submitted_ones() {
    let mut r = Replica::new(100);
    r.submit(0, spec("0001-dep"));
    r.submit(0, depending("0002-after", &["0001-dep"]));
    r.apply(5, TaskCommand::Cancel { task_id: "0001-dep".into(), reason: "x".into() }).expect("cancel");
    assert_eq!(r.state.app.tasks.tasks["0002-after"].state, TaskState::Failed);
    r.evict(5 + RETENTION_MS);
    assert!(!r.held("0001-dep") && !r.held("0002-after"), "both finished, nothing open needs them");
    let table = &r.state.app.tasks;
    assert!(table.may_have_evicted("0001-dep") && table.may_have_evicted("0002-after"));
    assert!(!table.may_have_evicted("9999-never"), "ids above every evicted one never existed");
    assert_eq!(table.evicted, 2);
    assert_eq!(
        r.apply(10_000, TaskCommand::Retry { task_id: "0001-dep".into() }).err().map(|e| e.to_string()),
        Some("task 0001-dep does not exist".into())
    );
}

#[test]
fn counts_by_state_follow_every_transition_and_survive_a_snapshot() {
    let mut r = Replica::new(100);
    r.submit(0, spec("a"));
    r.submit(0, spec("b"));
    r.submit(0, depending("c", &["a"]));
    r.run(10, "a");
    let counts = r.state.app.tasks.counts;
    assert_eq!((counts.pending, counts.queued, counts.running, counts.completed), (0, 2, 0, 1));
    // A snapshot carries the records only; reading it back rebuilds the same indexes.
    let bytes = serde_json::to_vec(&r.state).expect("serialise");
    let mut back: StateMachineData = serde_json::from_slice(&bytes).expect("deserialise");
    assert_ne!(back, r.state, "the derived indexes are not serialised");
    back.app.tasks.rebuild_indexes();
    assert_eq!(back, r.state);
    back.validate().expect("valid after the rebuild");
}

#[test]
fn two_replicas_applying_the_same_log_evict_the_same_tasks() {
    let mut leader = Replica::new(3);
    for i in 0..12u64 {
        let id = format!("t{i:02}");
        let previous = format!("t{:02}", i.saturating_sub(1));
        let spec = if i % 3 == 2 && leader.held(&previous) { depending(&id, &[&previous]) } else { spec(&id) };
        leader.submit(i * 100, spec);
        if i % 4 != 3 && leader.state.app.tasks.tasks[&id].state == TaskState::Queued {
            leader.run(i * 100 + 50, &id);
        }
        leader.evict(i * 100 + 60);
    }
    leader.evict(100_000);
    let mut follower = StateMachineData::default();
    for entry in &leader.log {
        follower.apply(entry).expect("current format");
        follower.validate().expect("valid on the follower");
    }
    assert_eq!(follower.state_hash(), leader.state.state_hash());
    assert_eq!(follower, leader.state);
    assert!(leader.state.app.tasks.evicted > 0, "the history evicted tasks");
}
