use openraft::{CommittedLeaderId, EntryPayload, LogId, Membership};

use super::*;

fn entry(index: u64, stamped_at_ms: u64, command: Command) -> Entry {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(Request::new(stamped_at_ms, vec![command])),
    }
}

fn put(key: &str, value: &str) -> Command {
    Command::KvPut { key: key.into(), value: value.into(), ttl_ms: None }
}

fn cas(key: &str, expected: Option<&str>, value: &str) -> Command {
    Command::KvCompareAndSet { key: key.into(), expected: expected.map(Into::into), value: value.into(), ttl_ms: None }
}

/// A coder task with no idempotency key.
fn task_spec(id: &str) -> crate::tasks::TaskSpec {
    crate::tasks::TaskSpec {
        id: id.into(),
        task_type: "coder".into(),
        priority: crate::tasks::Priority::Normal,
        description: "d".into(),
        input: String::new(),
        depends_on: vec![],
        parent: None,
        max_retries: 0,
        timeout_ms: 60_000,
        idempotency_key: None,
        submitter: "s".into(),
        labels: Default::default(),
        capabilities: Default::default(),
        planner_type: None,
        max_agents: None,
        input_stored: false,
        trace_parent: String::new(),
    }
}

fn too_large(field: &str, actual: usize, limit: usize) -> Response {
    Response::Rejected(Rejection::TooLarge { field: field.into(), actual, limit })
}

fn invalid(field: &str, message: &str) -> Response {
    Response::Rejected(Rejection::InvalidField { field: field.into(), message: message.into() })
}

/// Each case: commands applied in order to a fresh state, and the expected result of each.
#[test]
fn every_command_and_refusal_gives_its_typed_result() {
    let long_key = "k".repeat(KEY_BYTES_MAX + 1);
    let long_value = "v".repeat(VALUE_BYTES_MAX + 1);
    let cases: Vec<(&str, Vec<(Command, Response)>)> = vec![
        ("put takes the next revision", vec![(put("a", "1"), Response::KvWritten { revision: 1 })]),
        (
            "put overwrites",
            vec![
                (put("a", "1"), Response::KvWritten { revision: 1 }),
                (put("a", "2"), Response::KvWritten { revision: 2 }),
            ],
        ),
        ("empty key is refused", vec![(put("", "1"), invalid("key", "must not be empty"))]),
        ("long key is refused", vec![(put(&long_key, "1"), too_large("key", KEY_BYTES_MAX + 1, KEY_BYTES_MAX))]),
        (
            "long value is refused",
            vec![(put("a", &long_value), too_large("value", VALUE_BYTES_MAX + 1, VALUE_BYTES_MAX))],
        ),
        (
            "cas on absent key with expected None writes",
            vec![(cas("a", None, "1"), Response::KvWritten { revision: 1 })],
        ),
        (
            "cas with a wrong expectation reports the current value",
            vec![
                (put("a", "1"), Response::KvWritten { revision: 1 }),
                (cas("a", Some("0"), "2"), Response::KvCompareFailed { current: Some("1".into()) }),
                (cas("a", None, "2"), Response::KvCompareFailed { current: Some("1".into()) }),
                (cas("a", Some("1"), "2"), Response::KvWritten { revision: 2 }),
            ],
        ),
        (
            "delete reports whether the key existed",
            vec![
                (Command::KvDelete { key: "a".into() }, Response::KvDeleted { existed: false }),
                (put("a", "1"), Response::KvWritten { revision: 1 }),
                (Command::KvDelete { key: "a".into() }, Response::KvDeleted { existed: true }),
            ],
        ),
        (
            "cluster identity is set once; the same again is accepted, another refused",
            vec![
                (Command::InitCluster { cluster_id: "c1".into(), cluster_name: "maos".into() }, Response::Applied),
                (Command::InitCluster { cluster_id: "c1".into(), cluster_name: "maos".into() }, Response::Applied),
                (
                    Command::InitCluster { cluster_id: "c2".into(), cluster_name: "maos".into() },
                    Response::Rejected(Rejection::ClusterIdentityConflict {
                        existing_id: "c1".into(),
                        proposed_id: "c2".into(),
                    }),
                ),
            ],
        ),
        (
            "node registration needs an id and both addresses",
            vec![
                (
                    Command::RegisterNode { node_id: 0, raft_addr: "a:1".into(), api_addr: "a:2".into() },
                    invalid("node_id", "must be at least 1"),
                ),
                (
                    Command::RegisterNode { node_id: 1, raft_addr: "".into(), api_addr: "a:2".into() },
                    invalid("raft_addr", "must not be empty"),
                ),
                (
                    Command::RegisterNode { node_id: 1, raft_addr: "a:1".into(), api_addr: "a:2".into() },
                    Response::Applied,
                ),
            ],
        ),
    ];
    for (name, steps) in cases {
        let mut state = StateMachineData::default();
        for (i, (command, expected)) in steps.into_iter().enumerate() {
            let before = state.app.clone();
            let mut responses = state.apply(&entry(i as u64 + 1, 1_000, command)).expect("current format");
            assert_eq!(responses.len(), 1, "case {name:?}, step {i}: one response per command");
            let response = responses.remove(0);
            assert_eq!(response, expected, "case {name:?}, step {i}");
            state.validate().unwrap_or_else(|e| panic!("case {name:?}, step {i}: {e}"));
            if matches!(response, Response::Rejected(_) | Response::KvCompareFailed { .. }) {
                // A refusal changes nothing but the replicated clock.
                assert_eq!(state.app.kv, before.kv, "case {name:?}, step {i}: refusal changed the keys");
                assert_eq!(state.app.nodes, before.nodes, "case {name:?}, step {i}: refusal changed the nodes");
                assert_eq!(state.app.cluster, before.cluster, "case {name:?}, step {i}");
            }
        }
    }
}

#[test]
fn a_newer_request_format_stops_apply_without_change() {
    let mut state = StateMachineData::default();
    let mut request = Request::new(5, vec![put("a", "1")]);
    request.format_version = REQUEST_FORMAT_VERSION + 1;
    let entry = Entry { log_id: LogId::new(CommittedLeaderId::new(1, 1), 1), payload: EntryPayload::Normal(request) };
    let before = state.clone();
    assert_eq!(state.apply(&entry), Err(UnsupportedFormat { index: 1, found: REQUEST_FORMAT_VERSION + 1 }));
    assert_eq!(state, before, "a refused entry must not move the applied position");
}

#[test]
fn a_batch_applies_in_order_with_one_response_each() {
    let mut state = StateMachineData::default();
    let batch = Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), 1),
        payload: EntryPayload::Normal(Request::new(
            7,
            vec![put("a", "1"), cas("a", Some("1"), "2"), put("", "x"), Command::KvDelete { key: "a".into() }],
        )),
    };
    let responses = state.apply(&batch).expect("current format");
    assert_eq!(
        responses,
        vec![
            Response::KvWritten { revision: 1 },
            Response::KvWritten { revision: 2 },
            invalid("key", "must not be empty"),
            Response::KvDeleted { existed: true },
        ]
    );
    state.validate().expect("valid");

    let oversized = Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), 2),
        payload: EntryPayload::Normal(Request::new(8, vec![put("b", "1"); BATCH_COMMANDS_MAX + 1])),
    };
    let responses = state.apply(&oversized).expect("current format");
    assert_eq!(responses.len(), BATCH_COMMANDS_MAX + 1);
    assert!(responses.iter().all(|r| matches!(r, Response::Rejected(Rejection::BatchTooLarge { .. }))));
    assert!(!state.app.kv.contains_key("b"), "a refused batch changes nothing");
}

#[test]
fn replicated_time_never_goes_backwards() {
    let mut state = StateMachineData::default();
    state.apply(&entry(1, 2_000, put("a", "1"))).expect("current format");
    state.apply(&entry(2, 1_500, put("b", "1"))).expect("current format");
    assert_eq!(state.app.clock_ms, 2_000);
    assert_eq!(state.app.kv["b"].updated_at_ms, 2_000);
    state.validate().expect("valid");
}

#[test]
fn membership_and_blank_entries_move_the_applied_position() {
    let mut state = StateMachineData::default();
    let log_id = LogId::new(CommittedLeaderId::new(1, 1), 1);
    state.apply(&Entry { log_id, payload: EntryPayload::Blank }).expect("current format");
    let membership = Membership::new(vec![[1u64, 2, 3].into_iter().collect()], ());
    let log_id2 = LogId::new(CommittedLeaderId::new(1, 1), 2);
    state
        .apply(&Entry { log_id: log_id2, payload: EntryPayload::Membership(membership.clone()) })
        .expect("current format");
    assert_eq!(state.last_applied, Some(log_id2));
    assert_eq!(state.last_membership.membership(), &membership);
    state.validate().expect("valid");
}

#[test]
fn validate_catches_a_broken_state() {
    let mut state = StateMachineData::default();
    state.apply(&entry(1, 10, put("a", "1"))).expect("current format");
    state.app.kv.get_mut("a").expect("a").revision = 99;
    assert!(state.validate().is_err());
    state.app.kv.get_mut("a").expect("a").revision = 0;
    assert!(state.validate().is_err());
}

#[test]
fn the_same_entries_give_the_same_hash_and_different_ones_do_not() {
    let entries =
        [entry(1, 1, put("a", "1")), entry(2, 2, put("b", "2")), entry(3, 3, Command::KvDelete { key: "a".into() })];
    let mut first = StateMachineData::default();
    let mut second = StateMachineData::default();
    for e in &entries {
        first.apply(e).expect("current format");
        second.apply(e).expect("current format");
    }
    assert_eq!(first.state_hash(), second.state_hash());
    second.apply(&entry(4, 4, put("c", "3"))).expect("current format");
    assert_ne!(first.state_hash(), second.state_hash());
}

#[test]
fn keys_with_a_ttl_expire_for_reads_and_compare_and_set_and_tick_removes_them() {
    let mut state = StateMachineData::default();
    let shared = Command::KvPut { key: "workflows/w1/notes".into(), value: "v1".into(), ttl_ms: Some(100) };
    state.apply(&entry(1, 1_000, shared)).expect("current format");
    state.validate().expect("valid");
    assert!(state.app.kv_get("workflows/w1/notes", 1_099).is_some());
    assert!(state.app.kv_get("workflows/w1/notes", 1_100).is_none(), "expired at its TTL");
    assert!(!state.app.kv_expiry_due(1_099) && state.app.kv_expiry_due(1_100));
    // An expired key counts as absent for compare-and-set.
    let claim =
        Command::KvCompareAndSet { key: "workflows/w1/notes".into(), expected: None, value: "v2".into(), ttl_ms: None };
    let responses = state.apply(&entry(2, 1_200, claim)).expect("current format");
    assert_eq!(responses, vec![Response::KvWritten { revision: 2 }]);
    state.validate().expect("the expiry index follows the rewrite");
    assert!(state.app.kv_expiries.is_empty());
    let short = Command::KvPut { key: "k".into(), value: "x".into(), ttl_ms: Some(10) };
    state.apply(&entry(3, 1_300, short)).expect("current format");
    state.apply(&entry(4, 1_400, Command::Task(TaskCommand::Tick))).expect("current format");
    state.validate().expect("valid after purge");
    assert!(!state.app.kv.contains_key("k") && state.app.kv.contains_key("workflows/w1/notes"));
    let zero = Command::KvPut { key: "k".into(), value: "x".into(), ttl_ms: Some(0) };
    let refused = state.apply(&entry(5, 1_500, zero)).expect("current format");
    assert!(matches!(&refused[0], Response::Rejected(Rejection::InvalidField { field, .. }) if field == "ttl_ms"));
}

#[test]
fn a_fenced_write_applies_only_while_its_lease_is_current() {
    use crate::tasks::Slot;
    let mut state = StateMachineData::default();
    let slot = Slot { node_id: 1, agent_type: "coder".into(), ..Slot::default() };
    let register = TaskCommand::RegisterSlots { node_id: 1, slots: [("n1/coder/0".to_string(), slot)].into() };
    state.apply(&entry(1, 1, Command::Task(register))).expect("current format");
    let spec = task_spec("t");
    state.apply(&entry(2, 2, Command::Task(TaskCommand::Submit { spec: Box::new(spec) }))).expect("format");
    let assign = TaskCommand::Assign { task_id: "t".into(), slot: "n1/coder/0".into(), node_id: 1, lease_ms: 10_000 };
    state.apply(&entry(3, 3, Command::Task(assign))).expect("format");
    let token = fencing_token(3, 0);
    let fenced = |token| Command::Fenced {
        task_id: "t".into(),
        token,
        command: Box::new(Command::KvPut { key: "workflows/t/k".into(), value: "v".into(), ttl_ms: None }),
    };
    assert_eq!(state.apply(&entry(4, 4, fenced(token))).expect("format"), vec![Response::KvWritten { revision: 1 }]);
    let stale = state.apply(&entry(5, 5, fenced(token + 1))).expect("format");
    assert!(matches!(&stale[0], Response::Rejected(Rejection::Task(TaskRejection::StaleToken { .. }))), "{stale:?}");
    let nested = Command::Fenced { task_id: "t".into(), token, command: Box::new(Command::Task(TaskCommand::Tick)) };
    let refused = state.apply(&entry(6, 6, nested)).expect("format");
    assert!(matches!(&refused[0], Response::Rejected(Rejection::InvalidField { field, .. }) if field == "command"));
    state.validate().expect("valid");
}

fn on_session(client: u64, sequence: u64, acknowledged: u64, command: Command) -> Command {
    Command::Session { client, sequence, acknowledged, owner: String::new(), command: Box::new(command) }
}

fn open_session(state: &mut StateMachineData, index: u64, at_ms: u64) -> u64 {
    open_session_of(state, index, at_ms, "")
}

fn open_session_of(state: &mut StateMachineData, index: u64, at_ms: u64, owner: &str) -> u64 {
    let open = Command::OpenSession { ttl_ms: 60_000, owner: owner.into() };
    match state.apply(&entry(index, at_ms, open)).expect("format").as_slice() {
        [Response::SessionOpened { client }] => *client,
        other => panic!("no session opened: {other:?}"),
    }
}

/// Issue 16, break 1: a forwarded write whose answer was lost after it committed is sent again;
/// without sessions a compare-and-set that succeeded was then reported as failed and a submit
/// without an idempotency key made a second task. On a session the repeat applies nothing and
/// gets the first answer.
#[test]
fn a_command_sent_twice_on_a_session_applies_once_and_the_repeat_gets_the_first_answer() {
    let mut state = StateMachineData::default();
    let client = open_session(&mut state, 1, 1);
    state.apply(&entry(2, 2, put("counter", "0"))).expect("format");
    let set = on_session(client, 1, 0, cas("counter", Some("0"), "1"));
    let first = state.apply(&entry(3, 3, set.clone())).expect("format");
    assert_eq!(first, vec![Response::KvWritten { revision: 2 }]);
    let again = state.apply(&entry(4, 4, set)).expect("format");
    assert_eq!(again, first, "the repeat is answered from memory, not reported as a failed compare");
    assert_eq!(state.app.kv_revision, 2, "applied once");

    // No idempotency key: only the session can tell the resend from a new submit.
    let submit =
        |id: &str| on_session(client, 2, 1, Command::Task(TaskCommand::Submit { spec: Box::new(task_spec(id)) }));
    let first = state.apply(&entry(5, 5, submit("t1"))).expect("format");
    // The resend carries a new id (a node picks ids before proposing) but the same sequence.
    let again = state.apply(&entry(6, 6, submit("t1-resent"))).expect("format");
    assert_eq!(again, first);
    assert_eq!(state.app.tasks.tasks.len(), 1, "one task, not two: {:?}", state.app.tasks.tasks.keys());
    state.validate().expect("invariants");
}

#[test]
fn a_command_on_an_unknown_or_expired_session_is_refused_and_not_applied() {
    let mut state = StateMachineData::default();
    let unknown = state.apply(&entry(1, 1, on_session(77, 1, 0, put("k", "v")))).expect("format");
    assert_eq!(unknown, vec![Response::Rejected(Rejection::SessionExpired { client: 77 })]);
    let client = open_session(&mut state, 2, 1_000);
    assert_eq!(state.apply(&entry(3, 2_000, on_session(client, 1, 0, put("k", "v")))).expect("format").len(), 1);
    // A minute without a command: the session is gone, and a resend is refused, not applied.
    let late = state.apply(&entry(4, 2_000 + 60_001, on_session(client, 2, 1, put("k", "w")))).expect("format");
    assert_eq!(late, vec![Response::Rejected(Rejection::SessionExpired { client })]);
    assert_eq!(state.app.kv["k"].value, "v");
    assert!(state.app.sessions.is_empty() && state.app.session_expiries.is_empty());
    state.validate().expect("invariants");
}

#[test]
fn a_session_forgets_acknowledged_answers_and_refuses_them_again() {
    let mut state = StateMachineData::default();
    let client = open_session(&mut state, 1, 1);
    for sequence in 1..=3 {
        state.apply(&entry(1 + sequence, 2, on_session(client, sequence, 0, put("k", "v")))).expect("format");
    }
    assert_eq!(state.app.sessions[&client].answers.len(), 3);
    // The client has the answers up to 2: they are forgotten, and 2 cannot be sent again.
    state.apply(&entry(5, 3, on_session(client, 4, 2, put("k", "v")))).expect("format");
    assert_eq!(state.app.sessions[&client].answers.keys().copied().collect::<Vec<_>>(), vec![3, 4]);
    let stale = state.apply(&entry(6, 4, on_session(client, 2, 0, put("k", "x")))).expect("format");
    assert_eq!(stale, vec![Response::Rejected(Rejection::SessionSequenceAcknowledged { client, sequence: 2 })]);
    assert_eq!(state.app.kv["k"].value, "v");
    state.validate().expect("invariants");
}

/// Issue 16: a session id is a log position, not a secret, so a caller who learns another's
/// could send on it (and get that client's remembered answers, or make it refuse that client's
/// next write as acknowledged). A session takes only its owner's commands.
#[test]
fn a_session_takes_only_the_commands_of_the_principal_that_opened_it() {
    let mut state = StateMachineData::default();
    let client = open_session_of(&mut state, 1, 1, "key:alice");
    let as_ = |sender: &str, sequence: u64, value: &str| Command::Session {
        client,
        sequence,
        acknowledged: 0,
        owner: sender.into(),
        command: Box::new(put("k", value)),
    };
    assert_eq!(
        state.apply(&entry(2, 2, as_("key:alice", 1, "alice's"))).expect("format"),
        vec![Response::KvWritten { revision: 1 }]
    );
    // Another principal, or a node's own write (no owner), on alice's session: refused, nothing
    // applied, nothing remembered, not even alice's answer handed out.
    for (index, sender) in [(3, "key:mallory"), (4, "")] {
        let refused = state.apply(&entry(index, 3, as_(sender, 1, "mallory's"))).expect("format");
        assert_eq!(
            refused,
            vec![Response::Rejected(Rejection::SessionNotYours { client, sender: sender.into() })],
            "{sender:?}"
        );
    }
    assert_eq!(state.app.kv["k"].value, "alice's");
    assert_eq!(state.app.sessions[&client].answers.len(), 1);
    // Alice's resend still gets her answer.
    let again = state.apply(&entry(5, 4, as_("key:alice", 1, "alice's"))).expect("format");
    assert_eq!(again, vec![Response::KvWritten { revision: 1 }]);
    let long = Command::OpenSession { ttl_ms: 60_000, owner: "k".repeat(257) };
    let refused = state.apply(&entry(6, 5, long)).expect("format");
    assert!(matches!(&refused[0], Response::Rejected(Rejection::InvalidField { field, .. }) if field == "owner"));
    state.validate().expect("invariants");
}

#[test]
fn only_what_a_member_sends_for_clients_and_agents_may_be_forwarded() {
    use crate::tasks::TaskCommand as T;
    let leaders_own = [
        Command::InitCluster { cluster_id: "c".into(), cluster_name: "maos".into() },
        Command::Task(T::Tick),
        Command::Task(T::ExtendLeases { by_ms: 1 }),
        Command::Task(T::Evict { tasks: vec![("t".into(), 1)] }),
        Command::Task(T::Assign { task_id: "t".into(), slot: "n1/coder/0".into(), node_id: 1, lease_ms: 1 }),
        on_session(1, 1, 0, Command::Task(T::Tick)),
    ];
    for command in &leaders_own {
        assert!(command.leader_only().is_some(), "{command:?} is the leader's own");
    }
    let forwardable = [
        put("k", "v"),
        Command::KvDelete { key: "k".into() },
        Command::OpenSession { ttl_ms: 1_000, owner: String::new() },
        Command::Task(T::Submit { spec: Box::new(task_spec("t")) }),
        Command::Task(T::Cancel { task_id: "t".into(), reason: "r".into() }),
        on_session(1, 1, 0, put("k", "v")),
        Command::Fenced { task_id: "t".into(), token: 1, command: Box::new(put("k", "v")) },
        Command::RegisterNode { node_id: 2, raft_addr: "a:7000".into(), api_addr: "a:8000".into() },
    ];
    for command in &forwardable {
        assert_eq!(command.leader_only(), None, "{command:?} is sent on a client's or an agent's behalf");
    }
    let refusal = Command::not_forwardable("Task::Tick").to_string();
    assert!(refusal.contains("Task::Tick") && refusal.contains("never forwarded"), "{refusal}");
}
