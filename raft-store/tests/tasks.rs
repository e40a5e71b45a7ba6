//! Table-driven tests of every task transition and refusal, through the replicated apply, with
//! `validate()` after every entry; and a randomized property test of the invariants.

use std::collections::{BTreeMap, BTreeSet};

use maos_raft_store::state::fencing_token;
use maos_raft_store::tasks::{
    AgentState, PlannedTask, Priority, Slot, TaskCommand, TaskLimits, TaskRejection, TaskResponse, TaskSpec, TaskState,
    TokenUsage,
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
                let slot = Slot { node_id: 1, agent_type: "coder".into(), ..Slot::default() };
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
        planner_type: None,
        max_agents: None,
        input_stored: false,
        trace_parent: String::new(),
    }
}

fn submit(spec: TaskSpec) -> TaskCommand {
    TaskCommand::Submit { spec: Box::new(spec) }
}

fn assign(id: &str) -> TaskCommand {
    TaskCommand::Assign { task_id: id.into(), slot: format!("n1/coder/{id}"), node_id: 1, lease_ms: 10_000 }
}

fn complete(id: &str, token: u64) -> TaskCommand {
    TaskCommand::Complete { task_id: id.into(), token, result: "done".into(), stored: false }
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
            let command = match rng.gen_range(0..13) {
                0 | 1 => {
                    let mut s = spec(&id);
                    if rng.gen_bool(0.2) {
                        s.planner_type = Some("coder".into());
                    }
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
                8 => {
                    let (task, token) =
                        tokens.get(rng.gen_range(0..tokens.len().max(1))).cloned().unwrap_or((id.clone(), 0));
                    let width = rng.gen_range(1..4);
                    let subtasks = (0..width)
                        .map(|k| PlannedTask {
                            depends_on: if k > 0 && rng.gen_bool(0.5) { vec![format!("k{}", k - 1)] } else { vec![] },
                            ..planned(&format!("k{k}"), &[])
                        })
                        .collect();
                    TaskCommand::Expand { task_id: task, token, subtasks }
                }
                9 => {
                    let (task, token) =
                        tokens.get(rng.gen_range(0..tokens.len().max(1))).cloned().unwrap_or((id.clone(), 0));
                    TaskCommand::SaveCheckpoint { task_id: task, token, data: format!("step {step}"), stored: false }
                }
                11 => TaskCommand::Retry { task_id: id.clone() },
                10 => {
                    let state = [AgentState::Active, AgentState::Draining, AgentState::Terminated][rng.gen_range(0..3)];
                    let state =
                        if state == AgentState::Terminated && rng.gen_bool(0.8) { AgentState::Active } else { state };
                    TaskCommand::SetAgentState { agent_id: format!("n1/coder/{id}"), state }
                }
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

fn planned(key: &str, depends_on: &[&str]) -> PlannedTask {
    PlannedTask {
        key: key.into(),
        task_type: "coder".into(),
        description: format!("subtask {key}"),
        input: String::new(),
        depends_on: depends_on.iter().map(|d| d.to_string()).collect(),
        capabilities: BTreeSet::new(),
    }
}

/// Submit `id` for planning and lease it; returns the planning attempt's token.
fn planning_task(r: &mut Replica, id: &str) -> u64 {
    let mut s = spec(id);
    s.planner_type = Some("coder".into());
    s.task_type = "mixed".into();
    r.apply(0, submit(s)).expect("submit for planning");
    match r.apply(0, assign(id)) {
        Ok(TaskResponse::Assigned { token, .. }) => token,
        other => panic!("a planning task goes to an agent of the planner's type: {other:?}"),
    }
}

fn assign_to(r: &mut Replica, id: &str, slot: &str) -> u64 {
    let command =
        TaskCommand::Assign { task_id: id.into(), slot: format!("n1/coder/{slot}"), node_id: 1, lease_ms: 10_000 };
    match r.apply(0, command) {
        Ok(TaskResponse::Assigned { token, .. }) => token,
        other => panic!("assign {id}: {other:?}"),
    }
}

#[test]
fn a_plan_expands_into_children_and_the_parent_aggregates_their_results() {
    let mut r = Replica::new();
    let token = planning_task(&mut r, "parent");
    let plan = vec![planned("left", &[]), planned("right", &[]), planned("merge", &["left", "right"])];
    let expanded = r.apply(10, TaskCommand::Expand { task_id: "parent".into(), token, subtasks: plan });
    let Ok(TaskResponse::Expanded { children, chained: false }) = expanded else { panic!("{expanded:?}") };
    assert_eq!(children.len(), 3);
    let parent = &r.state.app.tasks.tasks["parent"];
    assert_eq!((parent.state, parent.expanded, parent.lease.is_none()), (TaskState::Pending, true, true));
    assert_eq!(r.state_of("parent.left"), TaskState::Queued);
    assert_eq!(r.state_of("parent.merge"), TaskState::Pending);
    // The parent's old token is spent: a second plan or a completion is refused.
    assert!(matches!(r.apply(10, complete("parent", token)), Err(TaskRejection::StaleToken { .. })));
    let left = assign_to(&mut r, "parent.left", "a");
    let right = assign_to(&mut r, "parent.right", "b");
    r.apply(
        20,
        TaskCommand::Complete {
            task_id: "parent.left".into(),
            token: left,
            result: r#"{"n":1}"#.into(),
            stored: false,
        },
    )
    .expect("left");
    r.apply(
        20,
        TaskCommand::Complete { task_id: "parent.right".into(), token: right, result: "plain".into(), stored: false },
    )
    .expect("right");
    assert_eq!(r.state_of("parent.merge"), TaskState::Queued);
    assert_eq!(r.state_of("parent"), TaskState::Pending);
    let merge = assign_to(&mut r, "parent.merge", "c");
    r.apply(30, complete("parent.merge", merge)).expect("merge");
    let parent = &r.state.app.tasks.tasks["parent"];
    assert_eq!(parent.state, TaskState::Completed);
    let result: serde_json::Value = serde_json::from_str(parent.result.as_deref().unwrap_or_default()).expect("json");
    assert_eq!(result, serde_json::json!({"left": {"n": 1}, "right": "plain", "merge": "done"}));
    assert_eq!(r.state.app.tasks.open_tasks(), 0);
}

#[test]
fn a_stored_result_is_a_reference_and_its_parent_is_aggregated_by_the_reader() {
    let mut r = Replica::new();
    let token = planning_task(&mut r, "parent");
    let plan = vec![planned("left", &[]), planned("right", &[])];
    r.apply(10, TaskCommand::Expand { task_id: "parent".into(), token, subtasks: plan }).expect("expand");
    let left = assign_to(&mut r, "parent.left", "a");
    let right = assign_to(&mut r, "parent.right", "b");
    // A result kept in the task-data store: the state holds the token it was written under.
    let stored =
        TaskCommand::Complete { task_id: "parent.left".into(), token: left, result: String::new(), stored: true };
    r.apply(20, stored).expect("left");
    let child = &r.state.app.tasks.tasks["parent.left"];
    assert_eq!((child.state, child.result.as_deref(), child.result_token), (TaskState::Completed, None, Some(left)));
    r.apply(20, complete("parent.right", right)).expect("right");
    // The parent completes; with a stored child its aggregate is assembled on read, not here.
    let parent = &r.state.app.tasks.tasks["parent"];
    assert_eq!((parent.state, parent.result.as_deref(), parent.result_token), (TaskState::Completed, None, None));
    // A stored checkpoint is a reference too.
    r.apply(30, submit(spec("c"))).expect("submit");
    let c = assign_to(&mut r, "c", "a");
    let save = TaskCommand::SaveCheckpoint { task_id: "c".into(), token: c, data: String::new(), stored: true };
    r.apply(31, save).expect("checkpoint");
    let checkpoint = r.state.app.tasks.tasks["c"].checkpoint.as_deref().cloned().expect("saved");
    assert!(checkpoint.stored && checkpoint.data.is_empty());
}

#[test]
fn a_failed_child_fails_the_parent_and_cancels_its_siblings() {
    let mut r = Replica::new();
    let token = planning_task(&mut r, "parent");
    let plan = vec![planned("left", &[]), planned("right", &[])];
    r.apply(0, TaskCommand::Expand { task_id: "parent".into(), token, subtasks: plan }).expect("expand");
    let left = assign_to(&mut r, "parent.left", "a");
    assign_to(&mut r, "parent.right", "b");
    r.apply(5, fail("parent.left", left, false)).expect("left fails for good");
    let parent = &r.state.app.tasks.tasks["parent"];
    assert_eq!(parent.state, TaskState::Failed);
    assert!(parent.cause.as_deref().unwrap_or_default().contains("subtask left"), "{:?}", parent.cause);
    assert_eq!(r.state_of("parent.right"), TaskState::Cancelled);
    assert!(r.state.app.tasks.slot_holder.is_empty(), "the sibling's lease was revoked");
}

#[test]
fn bad_plans_are_refused_whole() {
    let mut r = Replica::new();
    r.apply(0, TaskCommand::Configure { limits: TaskLimits { max_parallel_branches: 2, ..TaskLimits::default() } })
        .expect("configure");
    let token = planning_task(&mut r, "parent");
    type Case = (&'static str, Vec<PlannedTask>, &'static str);
    let cases: Vec<Case> = vec![
        ("empty", vec![], "plan.subtasks"),
        ("cycle", vec![planned("x", &["y"]), planned("y", &["x"])], "plan.subtasks.depends_on"),
        ("unknown key", vec![planned("x", &["nope"])], "plan.subtasks[x].depends_on"),
        ("duplicate key", vec![planned("x", &[]), planned("x", &[])], "plan.subtasks.key"),
        ("bad key", vec![planned("has space", &[])], "plan.subtasks.key"),
        ("too wide", vec![planned("x", &[]), planned("y", &[]), planned("z", &[])], "plan.subtasks"),
        (
            "empty description",
            vec![PlannedTask { description: String::new(), ..planned("x", &[]) }],
            "plan.subtasks[x].description",
        ),
    ];
    for (name, subtasks, field) in cases {
        let refused = r.apply(0, TaskCommand::Expand { task_id: "parent".into(), token, subtasks });
        match refused {
            Err(TaskRejection::InvalidSpec { field: named, .. }) => assert_eq!(named, field, "{name}"),
            other => panic!("{name}: {other:?}"),
        }
    }
    // A task that was not submitted for planning cannot be expanded.
    r.apply(0, submit(spec("a"))).expect("submit");
    let plain = assign_to(&mut r, "a", "a");
    let refused =
        r.apply(0, TaskCommand::Expand { task_id: "a".into(), token: plain, subtasks: vec![planned("x", &[])] });
    assert!(matches!(refused, Err(TaskRejection::InvalidSpec { field, .. }) if field == "plan"));
    // Two levels of two fit within two branches.
    let fits = vec![planned("w", &[]), planned("x", &[]), planned("y", &["w"]), planned("z", &["x"])];
    r.apply(0, TaskCommand::Expand { task_id: "parent".into(), token, subtasks: fits })
        .expect("a plan within the limits");
}

#[test]
fn a_plan_below_the_parallelization_threshold_runs_as_a_chain() {
    let mut r = Replica::new();
    let limits = TaskLimits { parallelization_threshold: 3, ..TaskLimits::default() };
    r.apply(0, TaskCommand::Configure { limits }).expect("configure");
    let token = planning_task(&mut r, "parent");
    let plan = vec![planned("x", &[]), planned("y", &[])];
    let expanded = r.apply(0, TaskCommand::Expand { task_id: "parent".into(), token, subtasks: plan });
    assert!(matches!(expanded, Ok(TaskResponse::Expanded { chained: true, .. })), "{expanded:?}");
    assert_eq!(r.state_of("parent.x"), TaskState::Queued);
    assert_eq!(r.state_of("parent.y"), TaskState::Pending, "the second waits for the first");
}

#[test]
fn checkpoints_progress_and_usage_need_the_current_token_and_survive_a_retry() {
    let mut r = Replica::new();
    r.apply(0, submit(spec("a"))).expect("submit");
    let token = assign_to(&mut r, "a", "a");
    let save = |token, data: &str| TaskCommand::SaveCheckpoint {
        task_id: "a".into(),
        token,
        data: data.into(),
        stored: false,
    };
    assert_eq!(r.apply(1, save(token, "step 1")), Ok(TaskResponse::CheckpointSaved));
    assert!(matches!(r.apply(1, save(token + 1, "forged")), Err(TaskRejection::StaleToken { .. })));
    let too_big = "x".repeat(64 * 1024 + 1);
    assert!(
        matches!(r.apply(1, save(token, &too_big)), Err(TaskRejection::InvalidSpec { field, .. }) if field == "checkpoint")
    );
    let progress = TaskCommand::ReportProgress { task_id: "a".into(), token, percent: 40, message: "reading".into() };
    assert_eq!(r.apply(2, progress), Ok(TaskResponse::ProgressReported));
    let bad = TaskCommand::ReportProgress { task_id: "a".into(), token, percent: 101, message: String::new() };
    assert!(r.apply(2, bad).is_err());
    let usage = TokenUsage { input_tokens: 10, output_tokens: 5 };
    assert_eq!(
        r.apply(2, TaskCommand::RecordUsage { task_id: "a".into(), token, usage }),
        Ok(TaskResponse::UsageRecorded)
    );
    // The attempt crashes; the retry keeps the checkpoint (and the usage so far).
    r.apply(3, fail("a", token, true)).expect("fail");
    let retry = TaskCommand::Assign { task_id: "a".into(), slot: "n1/coder/b".into(), node_id: 1, lease_ms: 10_000 };
    let Ok(TaskResponse::Assigned { token: second, .. }) = r.apply(5_000, retry) else { panic!("retry") };
    let task = &r.state.app.tasks.tasks["a"];
    assert_eq!(task.attempt, 2);
    assert_eq!(task.checkpoint.as_ref().map(|c| (c.data.as_str(), c.attempt)), Some(("step 1", 1)));
    assert!(task.progress.is_none(), "progress is per attempt");
    assert_eq!(task.usage.output_tokens, 5);
    assert!(matches!(r.apply(5_001, save(token, "stale")), Err(TaskRejection::StaleToken { .. })));
    r.apply(5_001, save(second, "step 2")).expect("the new attempt saves");
}

#[test]
fn paused_agents_take_no_work_terminated_ones_give_theirs_back() {
    let mut r = Replica::new();
    let set = |agent: &str, state| TaskCommand::SetAgentState { agent_id: format!("n1/coder/{agent}"), state };
    r.apply(0, submit(spec("a"))).expect("submit");
    assert_eq!(
        r.apply(0, set("a", AgentState::Draining)),
        Ok(TaskResponse::AgentStateSet { previous: AgentState::Active })
    );
    assert!(matches!(r.apply(0, assign("a")), Err(TaskRejection::SlotUnavailable { .. })));
    let plan = maos_raft_store::scheduler::plan_assignments(&r.state.app.tasks, 0, 10, 10_000);
    assert!(plan.iter().all(|c| !matches!(c, TaskCommand::Assign { slot, .. } if slot == "n1/coder/a")));
    r.apply(0, set("a", AgentState::Active)).expect("resume");
    let token = assign_to(&mut r, "a", "a");
    // Draining keeps the running attempt.
    r.apply(1, set("a", AgentState::Draining)).expect("pause");
    assert_eq!(r.state_of("a"), TaskState::Running);
    // Terminating gives it back: the attempt fails (retryable) and the slot is freed.
    r.apply(2, set("a", AgentState::Terminated)).expect("terminate");
    let task = &r.state.app.tasks.tasks["a"];
    assert_eq!((task.state, task.cause.as_deref()), (TaskState::Queued, Some("agent n1/coder/a was terminated")));
    assert!(matches!(r.apply(3, complete("a", token)), Err(TaskRejection::StaleToken { .. })));
    assert!(matches!(r.apply(3, set("a", AgentState::Active)), Err(TaskRejection::AgentState { .. })));
    assert!(matches!(r.apply(3, set("nope", AgentState::Active)), Err(TaskRejection::UnknownAgent { .. })));
    // A node re-registering its pool does not undo an operator's choice.
    let slots = r
        .state
        .app
        .tasks
        .slots
        .iter()
        .map(|(id, s)| (id.clone(), Slot { state: AgentState::Active, ..s.clone() }))
        .collect();
    r.apply(4, TaskCommand::RegisterSlots { node_id: 1, slots }).expect("re-register");
    assert_eq!(r.state.app.tasks.slots["n1/coder/a"].state, AgentState::Terminated);
}

#[test]
fn spawned_agents_copy_their_type_and_respect_the_node_limit() {
    let mut r = Replica::new();
    let live = r.state.app.tasks.slots.len();
    let add = |agents_max| TaskCommand::AddAgent { node_id: 1, agent_type: "coder".into(), agents_max };
    let Ok(TaskResponse::AgentAdded { agent_id }) = r.apply(0, add(live + 1)) else { panic!("add") };
    assert!(agent_id.starts_with("n1/coder/"), "{agent_id}");
    assert_eq!(r.state.app.tasks.slots[&agent_id].agent_type, "coder");
    assert!(matches!(r.apply(0, add(live + 1)), Err(TaskRejection::AgentLimit { limit, .. }) if limit == live + 1));
    let unknown = TaskCommand::AddAgent { node_id: 1, agent_type: "poet".into(), agents_max: 1_000 };
    assert!(matches!(r.apply(0, unknown), Err(TaskRejection::InvalidSpec { field, .. }) if field == "agent_type"));
}

#[test]
fn a_failed_or_cancelled_task_can_be_retried_from_its_first_attempt() {
    let mut r = Replica::new();
    r.apply(0, submit(spec("a"))).expect("submit");
    let token = assign_to(&mut r, "a", "a");
    r.apply(1, TaskCommand::SaveCheckpoint { task_id: "a".into(), token, data: "half".into(), stored: false })
        .expect("checkpoint");
    r.apply(2, fail("a", token, false)).expect("fails for good");
    assert_eq!(r.state_of("a"), TaskState::Failed);
    let open = r.state.app.tasks.open_tasks();
    assert_eq!(
        r.apply(3, TaskCommand::Retry { task_id: "a".into() }),
        Ok(TaskResponse::Retried { state: TaskState::Queued })
    );
    let task = &r.state.app.tasks.tasks["a"];
    assert_eq!((task.attempt, task.cause.as_deref(), task.checkpoint.is_some()), (0, None, true));
    assert_eq!(r.state.app.tasks.open_tasks(), open + 1);
    assert!(matches!(r.apply(3, TaskCommand::Retry { task_id: "a".into() }), Err(TaskRejection::WrongState { .. })));
    assert!(matches!(
        r.apply(3, TaskCommand::Retry { task_id: "nope".into() }),
        Err(TaskRejection::UnknownTask { .. })
    ));
    // A dependent of a failed task waits for its dependency's retry.
    r.apply(3, submit(spec("b"))).expect("submit b");
    let b = assign_to(&mut r, "b", "b");
    r.apply(4, fail("b", b, false)).expect("b fails");
    let mut c = spec("c");
    c.depends_on = vec!["b".into()];
    r.apply(5, submit(c)).expect("c is failed at once");
    assert_eq!(r.state_of("c"), TaskState::Failed);
    let refused = r.apply(6, TaskCommand::Retry { task_id: "c".into() });
    assert!(matches!(&refused, Err(TaskRejection::InvalidSpec { field, .. }) if field == "depends_on"), "{refused:?}");
    r.apply(6, TaskCommand::Retry { task_id: "b".into() }).expect("retry b");
    assert_eq!(
        r.apply(6, TaskCommand::Retry { task_id: "c".into() }),
        Ok(TaskResponse::Retried { state: TaskState::Pending })
    );
}

#[test]
fn plans_name_served_types_and_a_planning_attempt_cannot_complete_with_a_result() {
    let mut r = Replica::new();
    let token = planning_task(&mut r, "parent");
    let unserved = vec![PlannedTask { task_type: "poet".into(), ..planned("verse", &[]) }];
    let refused = r.apply(0, TaskCommand::Expand { task_id: "parent".into(), token, subtasks: unserved });
    assert!(
        matches!(&refused, Err(TaskRejection::InvalidSpec { field, .. }) if field == "plan.subtasks[verse].task_type"),
        "{refused:?}"
    );
    let completed = r.apply(0, complete("parent", token));
    assert!(matches!(&completed, Err(TaskRejection::InvalidSpec { field, .. }) if field == "result"), "{completed:?}");
    assert_eq!(r.state_of("parent"), TaskState::Running);
}

#[test]
fn planned_steps_wait_on_their_siblings_beyond_the_dependency_timeout() {
    let mut r = Replica::new();
    let limits = TaskLimits { dependency_timeout_ms: 1_000, ..TaskLimits::default() };
    r.apply(0, TaskCommand::Configure { limits }).expect("configure");
    let token = planning_task(&mut r, "parent");
    let plan = vec![planned("slow", &[]), planned("after", &["slow"])];
    r.apply(0, TaskCommand::Expand { task_id: "parent".into(), token, subtasks: plan }).expect("expand");
    let slow = assign_to(&mut r, "parent.slow", "a");
    r.apply(60_000, TaskCommand::Renew { node_id: 1, leases: vec![("parent.slow".into(), slow)], lease_ms: 120_000 })
        .expect("renew");
    r.apply(60_000, TaskCommand::Tick).expect("tick");
    assert_eq!(r.state_of("parent.after"), TaskState::Pending, "a planned step is not timed out by its plan's age");
}

#[test]
fn external_workers_silent_for_an_hour_are_forgotten_with_their_agents() {
    use maos_raft_store::tasks::{WORKER_FORGET_MS, WORKER_ID_MIN};
    let mut r = Replica::new();
    let worker = WORKER_ID_MIN + 7;
    let slot = Slot { node_id: worker, agent_type: "scraper".into(), backend: "external".into(), ..Slot::default() };
    r.apply(0, TaskCommand::RegisterSlots { node_id: worker, slots: [("w:gone/scraper/0".to_string(), slot)].into() })
        .expect("register");
    r.apply(WORKER_FORGET_MS - 1, TaskCommand::Tick).expect("tick");
    assert!(r.state.app.tasks.slots.contains_key("w:gone/scraper/0"));
    assert!(r.state.app.tasks.tick_due(WORKER_FORGET_MS));
    r.apply(WORKER_FORGET_MS, TaskCommand::Tick).expect("tick");
    assert!(!r.state.app.tasks.slots.contains_key("w:gone/scraper/0"));
    assert!(!r.state.app.tasks.node_seen_ms.contains_key(&worker));
    assert!(r.state.app.tasks.slots.contains_key("n1/coder/a"), "nodes' agents stay");
}
