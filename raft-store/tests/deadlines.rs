//! The lease deadline index `Tick` reads, table-driven through the replicated apply with
//! `validate()` (which recomputes the index from the leases) after every entry: assign, renew,
//! extend, complete, fail, expire, attempt timeouts and terminated agents each keep it exact, a
//! tick fails exactly the due attempts, and a table read back from its serialised form (as from
//! a snapshot) rebuilds the same index.

use std::collections::{BTreeMap, BTreeSet};

use maos_raft_store::state::fencing_token;
use maos_raft_store::tasks::{
    AgentState, Priority, Slot, TaskCommand, TaskRejection, TaskResponse, TaskSpec, TaskTable,
};
use maos_raft_store::{Command, Entry, Rejection, Request, Response, StateMachineData};
use openraft::{CommittedLeaderId, EntryPayload, LogId};

const LEASE_MS: u64 = 1_000;

struct Replica {
    state: StateMachineData,
    entries: u64,
}

impl Replica {
    fn new() -> Self {
        let mut replica = Self { state: StateMachineData::default(), entries: 0 };
        let slots = (0..4)
            .map(|i| (format!("n1/coder/{i}"), Slot { node_id: 1, agent_type: "coder".into(), ..Slot::default() }))
            .collect();
        replica.apply(0, TaskCommand::RegisterSlots { node_id: 1, slots }).expect("slots");
        replica
    }

    fn apply(&mut self, now_ms: u64, command: TaskCommand) -> Result<TaskResponse, TaskRejection> {
        self.entries += 1;
        let entry = Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), self.entries),
            payload: EntryPayload::Normal(Request::new(now_ms, vec![Command::Task(command)])),
        };
        let mut responses = self.state.apply(&entry).expect("current format");
        self.state.validate().unwrap_or_else(|e| panic!("after entry {}: {e}", self.entries));
        match responses.remove(0) {
            Response::Task(response) => Ok(response),
            Response::Rejected(Rejection::Task(rejection)) => Err(rejection),
            other => panic!("unexpected response {other:?}"),
        }
    }

    /// Submit `id` (attempts time out after `timeout_ms`) and lease it on slot `slot`; returns its token.
    fn start(&mut self, now_ms: u64, id: &str, slot: u32, timeout_ms: u64) -> u64 {
        let spec = TaskSpec { timeout_ms, ..spec(id) };
        self.apply(now_ms, TaskCommand::Submit { spec: Box::new(spec) }).expect("submit");
        let slot = format!("n1/coder/{slot}");
        self.apply(now_ms, TaskCommand::Assign { task_id: id.into(), slot, node_id: 1, lease_ms: LEASE_MS })
            .expect("assign");
        fencing_token(self.entries, 0)
    }

    fn tick(&mut self, now_ms: u64) -> Vec<String> {
        match self.apply(now_ms, TaskCommand::Tick).expect("tick") {
            TaskResponse::Ticked { failed_attempts, .. } => failed_attempts,
            other => panic!("unexpected {other:?}"),
        }
    }

    fn deadlines(&self) -> Vec<(u64, String)> {
        self.state.app.tasks.lease_deadlines.iter().cloned().collect()
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

/// The index as (deadline, task).
type Deadlines = &'static [(u64, &'static str)];

struct Case {
    name: &'static str,
    history: fn(&mut Replica),
    /// The index after the history, as (deadline, task).
    deadlines: Deadlines,
    /// (time of a tick, attempts it fails, index after it)
    ticks: &'static [(u64, &'static [&'static str], Deadlines)],
}

const CASES: &[Case] = &[
    Case {
        name: "a lease is indexed at its expiry; a tick before it fails nothing, at it fails the attempt",
        history: |r| {
            r.start(0, "a", 0, 60_000);
        },
        deadlines: &[(1_000, "a")],
        ticks: &[(999, &[], &[(1_000, "a")]), (1_000, &["a"], &[])],
    },
    Case {
        name: "an attempt deadline before the lease's expiry is the entry",
        history: |r| {
            r.start(0, "a", 0, 300);
        },
        deadlines: &[(300, "a")],
        ticks: &[(299, &[], &[(300, "a")]), (300, &["a"], &[])],
    },
    Case {
        name: "a renewal moves the entry, up to the attempt deadline",
        history: |r| {
            let a = r.start(0, "a", 0, 60_000);
            let b = r.start(0, "b", 1, 1_500);
            r.apply(
                800,
                TaskCommand::Renew { node_id: 1, leases: vec![("a".into(), a), ("b".into(), b)], lease_ms: LEASE_MS },
            )
            .expect("renew");
        },
        deadlines: &[(1_500, "b"), (1_800, "a")],
        ticks: &[(1_000, &[], &[(1_500, "b"), (1_800, "a")]), (1_800, &["a", "b"], &[])],
    },
    Case {
        name: "a renewal with a stale token leaves the entry",
        history: |r| {
            let a = r.start(0, "a", 0, 60_000);
            r.apply(500, TaskCommand::Renew { node_id: 1, leases: vec![("a".into(), a + 1)], lease_ms: LEASE_MS })
                .expect("renew");
        },
        deadlines: &[(1_000, "a")],
        ticks: &[(1_000, &["a"], &[])],
    },
    Case {
        name: "ExtendLeases moves every entry",
        history: |r| {
            r.start(0, "a", 0, 60_000);
            r.start(100, "b", 1, 60_000);
            r.apply(500, TaskCommand::ExtendLeases { by_ms: 2_000 }).expect("extend");
        },
        deadlines: &[(3_000, "a"), (3_100, "b")],
        ticks: &[(2_999, &[], &[(3_000, "a"), (3_100, "b")]), (5_000, &["a", "b"], &[])],
    },
    Case {
        name: "completing, failing and cancelling remove the entry",
        history: |r| {
            let a = r.start(0, "a", 0, 60_000);
            let b = r.start(0, "b", 1, 60_000);
            r.start(0, "c", 2, 60_000);
            r.start(0, "d", 3, 60_000);
            r.apply(10, TaskCommand::Complete { task_id: "a".into(), token: a, result: "ok".into(), stored: false })
                .expect("complete");
            r.apply(10, TaskCommand::Fail { task_id: "b".into(), token: b, error: "no".into(), retryable: false })
                .expect("fail");
            r.apply(10, TaskCommand::Cancel { task_id: "c".into(), reason: "stop".into() }).expect("cancel");
        },
        deadlines: &[(1_000, "d")],
        ticks: &[(1_000, &["d"], &[])],
    },
    Case {
        name: "a retried attempt is indexed again when reassigned, and a terminated agent frees its entry",
        history: |r| {
            r.start(0, "a", 0, 60_000);
            assert_eq!(r.tick(1_000), vec!["a".to_string()]);
            // Backoff (1 s) over: the second attempt.
            r.apply(
                2_000,
                TaskCommand::Assign { task_id: "a".into(), slot: "n1/coder/1".into(), node_id: 1, lease_ms: LEASE_MS },
            )
            .expect("second attempt");
            r.start(2_000, "b", 2, 60_000);
            r.apply(2_100, TaskCommand::SetAgentState { agent_id: "n1/coder/2".into(), state: AgentState::Terminated })
                .expect("terminate");
        },
        deadlines: &[(3_000, "a")],
        ticks: &[(3_000, &["a"], &[])],
    },
];

#[test]
fn the_deadline_index_follows_every_lease_and_tick_reads_only_due_entries() {
    for case in CASES {
        let mut replica = Replica::new();
        (case.history)(&mut replica);
        let owned =
            |expected: &[(u64, &str)]| expected.iter().map(|(at, id)| (*at, id.to_string())).collect::<Vec<_>>();
        assert_eq!(replica.deadlines(), owned(case.deadlines), "{}: after the history", case.name);
        for (at, failed, after) in case.ticks {
            let failed: Vec<String> = failed.iter().map(|id| id.to_string()).collect();
            assert_eq!(replica.tick_due(*at), !failed.is_empty(), "{}: tick_due at {at}", case.name);
            assert_eq!(replica.tick(*at), failed, "{}: tick at {at}", case.name);
            assert_eq!(replica.deadlines(), owned(after), "{}: after the tick at {at}", case.name);
        }
    }
}

#[test]
fn a_table_read_back_rebuilds_the_deadline_index() {
    let mut replica = Replica::new();
    replica.start(0, "a", 0, 60_000);
    replica.start(0, "b", 1, 400);
    let live = &replica.state.app.tasks;
    let text = serde_json::to_string(live).expect("serialise");
    let mut read: TaskTable = serde_json::from_str(&text).expect("read back");
    assert!(read.lease_deadlines.is_empty(), "the index is derived, not serialised");
    read.rebuild_indexes();
    assert_eq!(read.lease_deadlines, live.lease_deadlines);
    read.validate().expect("valid after the rebuild");
}

impl Replica {
    fn tick_due(&self, now_ms: u64) -> bool {
        self.state.app.tasks.tick_due(now_ms)
    }
}
