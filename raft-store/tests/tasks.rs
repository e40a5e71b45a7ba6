//! Table-driven tests of every task transition and refusal, through the replicated apply, with
//! `validate()` after every entry; and a randomized property test of the invariants.

use std::collections::{BTreeMap, BTreeSet};

use maos_raft_store::state::fencing_token;
use maos_raft_store::tasks::{
    Priority, Slot, TaskCommand, TaskLimits, TaskRejection, TaskResponse, TaskSpec, TaskState,
};
use maos_raft_store::{Command, Entry, Rejection, Request, Response, StateMachineData};
use openraft::{CommittedLeaderId, EntryPayload, LogId};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A state machine driven one command per entry, validated after each.
struct Replica {
    state: StateMachineData,
    index: u64,
}

impl Replica {
    /// A replica whose node 1 has one `coder` slot per task name the tests use, `n1/coder/<name>`.
    fn new() -> Self {
        let mut replica = Self { state: StateMachineData::default(), index: 0 };
        let names = ["a", "b", "c", "d", "short", "leased", "child", "parent", "after-child", "late"];
        let slots = names
            .iter()
            .map(|n| n.to_string())
            .chain((0..24).map(|i| format!("t{i}")))
            .map(|name| {
                let slot = Slot { node_id: 1, agent_type: "coder".into(), capabilities: BTreeSet::new() };
                (format!("n1/coder/{name}"), slot)
            })
            .collect();
        replica.apply(0, TaskCommand::RegisterSlots { node_id: 1, slots }).expect("register slots");
        replica
    }

    fn apply(&mut self, now_ms: u64, command: TaskCommand) -> Result<TaskResponse, TaskRejection> {
        self.index += 1;
        let entry = Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), self.index),
            payload: EntryPayload::Normal(Request::new(now_ms, vec![Command::Task(command)])),
        };
        let before = self.state.app.tasks.clone();
        let mut responses = self.state.apply(&entry).expect("current format");
        self.state.validate().unwrap_or_else(|e| panic!("after entry {}: {e}", self.index));
        match responses.remove(0) {
            Response::Task(response) => Ok(response),
            Response::Rejected(Rejection::Task(rejection)) => {
                assert_eq!(self.state.app.tasks, before, "a refusal changed the task table: {rejection}");
                Err(rejection)
            }
            other => panic!("unexpected response {other:?}"),
        }
    }

    fn token_of_last_entry(&self) -> u64 {
        fencing_token(self.index, 0)
    }

    fn state_of(&self, id: &str) -> TaskState {
        self.state.app.tasks.tasks[id].state
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
        max_retries: 1,
        timeout_ms: 60_000,
        idempotency_key: None,
        submitter: "alice".into(),
        labels: BTreeMap::new(),
        capabilities: BTreeSet::new(),
    }
}

fn submit(spec: TaskSpec) -> TaskCommand {
    TaskCommand::Submit { spec }
}

fn assign(id: &str) -> TaskCommand {
    TaskCommand::Assign { task_id: id.into(), slot: format!("n1/coder/{id}"), node_id: 1, lease_ms: 10_000 }
}

fn complete(id: &str, token: u64) -> TaskCommand {
    TaskCommand::Complete { task_id: id.into(), token, result: "done".into() }
}

fn fail(id: &str, token: u64, retryable: bool) -> TaskCommand {
    TaskCommand::Fail { task_id: id.into(), token, error: "boom".into(), retryable }
}

#[test]
fn a_task_runs_from_submit_to_completion() {
    let mut r = Replica::new();
    assert_eq!(r.apply(0, submit(spec("a"))), Ok(TaskResponse::Submitted { task_id: "a".into(), duplicate: false }));
    assert_eq!(r.state_of("a"), TaskState::Queued);
    let Ok(TaskResponse::Assigned { token, expires_at_ms }) = r.apply(100, assign("a")) else { panic!("assign") };
    assert_eq!((token, expires_at_ms), (r.token_of_last_entry(), 10_100));
    assert_eq!(r.state_of("a"), TaskState::Running);
    assert_eq!(r.apply(200, complete("a", token)), Ok(TaskResponse::Completed));
    let task = &r.state.app.tasks.tasks["a"];
    assert_eq!((task.state, task.result.as_deref(), task.lease.is_none()), (TaskState::Completed, Some("done"), true));
}

#[test]
fn every_refusal_is_typed_and_changes_nothing() {
    let mut r = Replica::new();
    r.apply(0, submit(spec("a"))).expect("submit a");
    let token = match r.apply(0, assign("a")) {
        Ok(TaskResponse::Assigned { token, .. }) => token,
        other => panic!("{other:?}"),
    };
    let mut empty = spec("x");
    empty.description = " ".into();
    let mut self_dep = spec("y");
    self_dep.depends_on = vec!["y".into()];
    let mut unknown_dep = spec("z");
    unknown_dep.depends_on = vec!["nope".into()];
    let mut too_many_retries = spec("w");
    too_many_retries.max_retries = 1_000;
    let mut big = spec("v");
    big.input = "x".repeat(16 * 1024 + 1);
    type Case = (&'static str, TaskCommand, fn(&TaskRejection) -> bool);
    let cases: Vec<Case> = vec![
        (
            "empty description",
            submit(empty),
            |e| matches!(e, TaskRejection::InvalidSpec { field, .. } if field == "description"),
        ),
        (
            "self dependency",
            submit(self_dep),
            |e| matches!(e, TaskRejection::InvalidSpec { field, .. } if field == "depends_on"),
        ),
        ("unknown dependency", submit(unknown_dep), |e| matches!(e, TaskRejection::UnknownDependency { .. })),
        (
            "too many retries",
            submit(too_many_retries),
            |e| matches!(e, TaskRejection::InvalidSpec { field, .. } if field == "max_retries"),
        ),
        ("oversized input", submit(big), |e| matches!(e, TaskRejection::InvalidSpec { field, .. } if field == "input")),
        ("duplicate id", submit(spec("a")), |e| matches!(e, TaskRejection::DuplicateId { .. })),
        ("unknown task", complete("nope", 1), |e| matches!(e, TaskRejection::UnknownTask { .. })),
        ("stale token", complete("a", token - 1), |e| matches!(e, TaskRejection::StaleToken { .. })),
        ("stale token on fail", fail("a", token + 1, true), |e| matches!(e, TaskRejection::StaleToken { .. })),
        ("assign a running task", assign("a"), |e| {
            matches!(e, TaskRejection::WrongState { state: TaskState::Running, .. })
        }),
    ];
    for (name, command, expected) in cases {
        match r.apply(1, command) {
            Err(rejection) => assert!(expected(&rejection), "{name}: unexpected {rejection:?}"),
            Ok(response) => panic!("{name}: accepted with {response:?}"),
        }
    }
}

#[test]
fn a_cancelled_task_cannot_be_completed_and_its_descendants_stop() {
    let mut r = Replica::new();
    r.apply(0, submit(spec("parent"))).expect("parent");
    let mut child = spec("child");
    child.parent = Some("parent".into());
    r.apply(0, submit(child)).expect("child");
    let Ok(TaskResponse::Assigned { token, .. }) = r.apply(0, assign("child")) else { panic!("assign") };
    let mut dependent = spec("after-child");
    dependent.depends_on = vec!["child".into()];
    r.apply(0, submit(dependent)).expect("dependent");
    let Ok(TaskResponse::Cancelled { tasks }) =
        r.apply(5, TaskCommand::Cancel { task_id: "parent".into(), reason: "user".into() })
    else {
        panic!("cancel")
    };
    assert_eq!(tasks.len(), 2, "{tasks:?}");
    assert_eq!(r.state_of("child"), TaskState::Cancelled);
    assert!(r.state.app.tasks.tasks["child"].lease.is_none(), "the lease is revoked");
    assert_eq!(r.state_of("after-child"), TaskState::Failed, "a dependent of a cancelled task fails");
    assert!(matches!(
        r.apply(6, complete("child", token)),
        Err(TaskRejection::WrongState { state: TaskState::Cancelled, .. })
    ));
    assert!(matches!(
        r.apply(7, TaskCommand::Cancel { task_id: "parent".into(), reason: "again".into() }),
        Err(TaskRejection::WrongState { .. })
    ));
}

#[test]
fn dependencies_gate_queueing_and_failures_propagate() {
    let mut r = Replica::new();
    r.apply(0, submit(spec("a"))).expect("a");
    r.apply(0, submit(spec("b"))).expect("b");
    let mut c = spec("c");
    c.depends_on = vec!["a".into(), "b".into()];
    r.apply(0, submit(c)).expect("c");
    let mut d = spec("d");
    d.depends_on = vec!["c".into()];
    r.apply(0, submit(d)).expect("d");
    assert_eq!(r.state_of("c"), TaskState::Pending);
    assert!(matches!(r.apply(0, assign("c")), Err(TaskRejection::WrongState { state: TaskState::Pending, .. })));
    let Ok(TaskResponse::Assigned { token, .. }) = r.apply(0, assign("a")) else { panic!() };
    r.apply(1, complete("a", token)).expect("complete a");
    assert_eq!(r.state_of("c"), TaskState::Pending, "b has not completed");
    let Ok(TaskResponse::Assigned { token, .. }) = r.apply(2, assign("b")) else { panic!() };
    r.apply(3, complete("b", token)).expect("complete b");
    assert_eq!(r.state_of("c"), TaskState::Queued);
    let Ok(TaskResponse::Assigned { token, .. }) = r.apply(4, assign("c")) else { panic!() };
    assert_eq!(r.apply(5, fail("c", token, false)), Ok(TaskResponse::AttemptFailed { will_retry: false, attempt: 1 }));
    assert_eq!(r.state_of("c"), TaskState::Failed);
    assert_eq!(r.state_of("d"), TaskState::Failed);
    assert_eq!(r.state.app.tasks.tasks["d"].cause.as_deref(), Some("dependency c failed"));
    let mut late = spec("late");
    late.depends_on = vec!["c".into()];
    r.apply(6, submit(late)).expect("a dependent of a failed task is accepted, failed");
    assert_eq!(r.state_of("late"), TaskState::Failed);
}

#[test]
fn retries_back_off_and_stop_after_max_retries() {
    let mut r = Replica::new();
    r.apply(0, submit(spec("a"))).expect("a"); // max_retries 1: two attempts
    let Ok(TaskResponse::Assigned { token, .. }) = r.apply(0, assign("a")) else { panic!() };
    assert_eq!(r.apply(10, fail("a", token, true)), Ok(TaskResponse::AttemptFailed { will_retry: true, attempt: 1 }));
    assert_eq!(r.state_of("a"), TaskState::Queued);
    assert_eq!(r.state.app.tasks.tasks["a"].not_before_ms, 1_010, "base backoff 1 s");
    assert!(matches!(r.apply(500, assign("a")), Err(TaskRejection::NotYet { not_before_ms: 1_010, .. })));
    let Ok(TaskResponse::Assigned { token: second, .. }) = r.apply(1_010, assign("a")) else { panic!() };
    assert!(second > token, "a later lease has a larger token");
    assert!(
        matches!(r.apply(1_020, complete("a", token)), Err(TaskRejection::StaleToken { .. })),
        "the first attempt's token is stale"
    );
    assert_eq!(
        r.apply(1_030, fail("a", second, true)),
        Ok(TaskResponse::AttemptFailed { will_retry: false, attempt: 2 })
    );
    assert_eq!(r.state_of("a"), TaskState::Failed);
}

#[test]
fn expired_leases_and_timed_out_attempts_count_as_failed_attempts() {
    let mut r = Replica::new();
    let mut short = spec("short");
    short.timeout_ms = 500;
    r.apply(0, submit(short)).expect("short");
    r.apply(0, submit(spec("leased"))).expect("leased");
    r.apply(0, assign("short")).expect("assign short");
    let Ok(TaskResponse::Assigned { token, .. }) = r.apply(0, assign("leased")) else { panic!() };
    let renewed = r.apply(
        5_000,
        TaskCommand::Renew {
            node_id: 1,
            leases: vec![("leased".into(), token), ("short".into(), 1)],
            lease_ms: 10_000,
        },
    );
    assert_eq!(renewed, Ok(TaskResponse::Renewed { renewed: vec!["leased".into()], lost: vec!["short".into()] }));
    let ticked = r.apply(600, TaskCommand::Tick);
    assert_eq!(ticked, Ok(TaskResponse::Ticked { failed_attempts: vec!["short".into()], failed_tasks: vec![] }));
    assert_eq!(r.state_of("short"), TaskState::Queued, "one retry left");
    assert_eq!(r.state.app.tasks.tasks["short"].cause.as_deref(), Some("attempt timed out after 500 ms"));
    // The renewal moved the lease to 15,000; a tick before that keeps it.
    r.apply(14_999, TaskCommand::Tick).expect("tick");
    assert_eq!(r.state_of("leased"), TaskState::Running);
    r.apply(15_000, TaskCommand::Tick).expect("tick");
    assert_eq!(r.state_of("leased"), TaskState::Queued);
    assert_eq!(r.state.app.tasks.tasks["leased"].cause.as_deref(), Some("lease expired"));
}

#[test]
fn a_new_leader_extends_live_leases_before_anything_expires() {
    let mut r = Replica::new();
    r.apply(0, submit(spec("a"))).expect("a");
    r.apply(0, assign("a")).expect("assign"); // lease until 10,000
    assert_eq!(r.apply(9_000, TaskCommand::ExtendLeases { by_ms: 3_000 }), Ok(TaskResponse::Extended { leases: 1 }));
    r.apply(11_000, TaskCommand::Tick).expect("tick");
    assert_eq!(r.state_of("a"), TaskState::Running, "the extension outlives the election");
    r.apply(13_000, TaskCommand::Tick).expect("tick");
    assert_eq!(r.state_of("a"), TaskState::Queued);
}

#[test]
fn idempotency_keys_return_the_original_task_and_the_queue_has_a_bound() {
    let mut r = Replica::new();
    r.apply(0, TaskCommand::Configure { limits: TaskLimits { queue_size: 2, ..Default::default() } })
        .expect("configure");
    let mut first = spec("a");
    first.idempotency_key = Some("k1".into());
    r.apply(0, submit(first)).expect("a");
    let mut again = spec("a-retry");
    again.idempotency_key = Some("k1".into());
    assert_eq!(r.apply(0, submit(again)), Ok(TaskResponse::Submitted { task_id: "a".into(), duplicate: true }));
    assert!(!r.state.app.tasks.tasks.contains_key("a-retry"));
    r.apply(0, submit(spec("b"))).expect("b");
    assert_eq!(r.apply(0, submit(spec("c"))), Err(TaskRejection::QueueFull { limit: 2 }));
    assert!(matches!(
        r.apply(0, TaskCommand::Configure { limits: TaskLimits { queue_size: 0, ..Default::default() } }),
        Err(TaskRejection::InvalidSpec { .. })
    ));
}

#[test]
fn dependency_timeout_fails_waiting_tasks() {
    let mut r = Replica::new();
    r.apply(0, TaskCommand::Configure { limits: TaskLimits { dependency_timeout_ms: 1_000, ..Default::default() } })
        .expect("configure");
    r.apply(0, submit(spec("a"))).expect("a");
    let mut b = spec("b");
    b.depends_on = vec!["a".into()];
    r.apply(0, submit(b)).expect("b");
    assert_eq!(
        r.apply(1_000, TaskCommand::Tick),
        Ok(TaskResponse::Ticked { failed_attempts: vec![], failed_tasks: vec!["b".into()] })
    );
    assert_eq!(r.state_of("b"), TaskState::Failed);
}

/// Random command sequences: the invariants hold after every entry (checked by `Replica`), and
/// two replicas given the same entries end in the same state.
#[test]
fn random_command_sequences_keep_the_invariants_on_every_replica() {
    for seed in 0..64u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let (mut first, mut second) = (Replica::new(), Replica::new());
        let mut now = 0u64;
        let mut tokens: Vec<(String, u64)> = Vec::new();
        for step in 0..300 {
            now += rng.gen_range(0..400);
            let id = format!("t{}", rng.gen_range(0..24));
            let other = format!("t{}", rng.gen_range(0..24));
            let command = match rng.gen_range(0..9) {
                0 | 1 => {
                    let mut s = spec(&id);
                    s.max_retries = rng.gen_range(0..3);
                    s.timeout_ms = rng.gen_range(200..3_000);
                    if rng.gen_bool(0.4) {
                        s.depends_on = vec![other.clone()];
                    }
                    if rng.gen_bool(0.2) {
                        s.parent = Some(other.clone());
                    }
                    submit(s)
                }
                2 | 3 => TaskCommand::Assign {
                    task_id: id.clone(),
                    slot: format!("n1/coder/{}", if rng.gen_bool(0.8) { id.clone() } else { other.clone() }),
                    node_id: 1,
                    lease_ms: rng.gen_range(100..2_000),
                },
                4 => {
                    let (task, token) =
                        tokens.get(rng.gen_range(0..tokens.len().max(1))).cloned().unwrap_or((id.clone(), 0));
                    complete(&task, token)
                }
                5 => {
                    let (task, token) =
                        tokens.get(rng.gen_range(0..tokens.len().max(1))).cloned().unwrap_or((id.clone(), 0));
                    fail(&task, token, rng.gen_bool(0.7))
                }
                6 => TaskCommand::Cancel { task_id: id.clone(), reason: "random".into() },
                7 => TaskCommand::Tick,
                _ => TaskCommand::ExtendLeases { by_ms: rng.gen_range(0..1_000) },
            };
            let a = first.apply(now, command.clone());
            let b = second.apply(now, command);
            assert_eq!(a, b, "seed {seed} step {step}: replicas answered differently");
            if let Ok(TaskResponse::Assigned { token, .. }) = a {
                tokens.push((id.clone(), token));
            }
            for task in first.state.app.tasks.tasks.values() {
                assert!(task.attempt <= task.spec.max_retries + 1, "seed {seed} step {step}: attempts over the limit");
                if task.state.is_terminal() {
                    assert!(task.lease.is_none(), "seed {seed} step {step}: a terminal task holds a lease");
                }
            }
        }
        assert_eq!(first.state.state_hash(), second.state.state_hash(), "seed {seed}: replicas diverged");
    }
}

/// Commands and results travel as JSON (the Raft log, snapshots, forwarded proposals): every
/// nesting of tagged enums must read back as itself.
#[test]
fn task_commands_and_results_survive_serialization() {
    let values = vec![
        Response::Rejected(Rejection::Task(TaskRejection::QueueFull { limit: 3 })),
        Response::Rejected(Rejection::Task(TaskRejection::StaleToken {
            task_id: "a".into(),
            presented: 1,
            current: Some(2),
        })),
        Response::Task(TaskResponse::Renewed { renewed: vec!["a".into()], lost: vec![] }),
        Response::KvWritten { revision: 1 },
    ];
    for value in values {
        let json = serde_json::to_string(&value).expect("serialize");
        let back: Response = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{json}: {e}"));
        assert_eq!(back, value);
    }
    let commands = vec![
        Command::Task(submit(spec("a"))),
        Command::Task(TaskCommand::Renew { node_id: 1, leases: vec![("a".into(), 7)], lease_ms: 10 }),
        Command::Task(TaskCommand::Tick),
        Command::Task(TaskCommand::Configure { limits: TaskLimits::default() }),
    ];
    for command in commands {
        let json = serde_json::to_string(&command).expect("serialize");
        let back: Command = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{json}: {e}"));
        assert_eq!(back, command);
    }
}
