//! The scheduler's decisions, table-driven: priority, first-come first-served, fairness across
//! submitters, type and capability matching, `max_parallel_branches`, retry backoff; and every
//! planned assignment is accepted by apply.

use std::collections::{BTreeMap, BTreeSet};

use maos_raft_store::scheduler::plan_assignments;
use maos_raft_store::tasks::{Priority, Slot, TaskCommand, TaskLimits, TaskSpec, TaskTable};

fn slot(node_id: u64, agent_type: &str, capabilities: &[&str]) -> Slot {
    Slot {
        node_id,
        agent_type: agent_type.into(),
        capabilities: capabilities.iter().map(|c| c.to_string()).collect(),
        ..Slot::default()
    }
}

fn spec(id: &str, submitter: &str, priority: Priority) -> TaskSpec {
    TaskSpec {
        id: id.into(),
        task_type: "coder".into(),
        priority,
        description: format!("task {id}"),
        input: String::new(),
        depends_on: Vec::new(),
        parent: None,
        max_retries: 0,
        timeout_ms: 60_000,
        idempotency_key: None,
        submitter: submitter.into(),
        labels: BTreeMap::new(),
        capabilities: BTreeSet::new(),
        planner_type: None,
        max_agents: None,
        input_stored: false,
        trace_parent: String::new(),
    }
}

fn table_with(slots: Vec<(&str, Slot)>, specs: Vec<TaskSpec>) -> TaskTable {
    let mut table = TaskTable::default();
    let slots: BTreeMap<String, Slot> = slots.into_iter().map(|(id, s)| (id.to_string(), s)).collect();
    let nodes: BTreeSet<u64> = slots.values().map(|s| s.node_id).collect();
    for node_id in nodes {
        let mine = slots.iter().filter(|(_, s)| s.node_id == node_id).map(|(k, v)| (k.clone(), v.clone())).collect();
        table.apply(0, 1, &TaskCommand::RegisterSlots { node_id, slots: mine }).expect("register");
    }
    for (i, spec) in specs.into_iter().enumerate() {
        // Creation time follows submission order.
        table.apply(i as u64, 2 + i as u64, &TaskCommand::Submit { spec: Box::new(spec) }).expect("submit");
    }
    table
}

fn planned(plan: &[TaskCommand]) -> Vec<(String, String)> {
    plan.iter()
        .map(|c| match c {
            TaskCommand::Assign { task_id, slot, .. } => (task_id.clone(), slot.clone()),
            other => panic!("the scheduler only assigns: {other:?}"),
        })
        .collect()
}

fn coders(count: usize) -> Vec<(&'static str, Slot)> {
    ["s0", "s1", "s2", "s3", "s4", "s5"].into_iter().take(count).map(|id| (id, slot(1, "coder", &[]))).collect()
}

#[test]
fn priority_first_then_fair_turns_then_first_come() {
    let table = table_with(
        coders(5),
        vec![
            spec("a1", "alice", Priority::Normal),
            spec("a2", "alice", Priority::Normal),
            spec("a3", "alice", Priority::Normal),
            spec("b1", "bob", Priority::Normal),
            spec("low", "carol", Priority::Low),
            spec("crit", "carol", Priority::Critical),
        ],
    );
    let order: Vec<String> = planned(&plan_assignments(&table, 100, 100, 5_000)).into_iter().map(|(t, _)| t).collect();
    assert_eq!(order, ["crit", "a1", "b1", "a2", "a3"]);
}

#[test]
fn types_and_capabilities_decide_the_slot() {
    let mut gpu = spec("gpu-task", "alice", Priority::Normal);
    gpu.capabilities = ["gpu".to_string()].into();
    let mut tester = spec("test-task", "alice", Priority::Normal);
    tester.task_type = "tester".into();
    let mut rust = spec("rust-task", "alice", Priority::Normal);
    rust.capabilities = ["rust".to_string()].into();
    let table = table_with(
        vec![
            ("plain", slot(1, "coder", &[])),
            ("cuda", slot(2, "coder", &["gpu", "rust"])),
            ("t", slot(1, "tester", &[])),
        ],
        vec![gpu, tester, rust],
    );
    let plan = planned(&plan_assignments(&table, 100, 100, 5_000));
    assert_eq!(
        plan,
        [("gpu-task".to_string(), "cuda".to_string()), ("test-task".to_string(), "t".to_string())],
        "rust-task needs the only slot with rust, which the gpu task took"
    );
}

#[test]
fn a_parent_runs_at_most_max_parallel_branches_children() {
    let mut table = table_with(coders(6), vec![spec("parent", "alice", Priority::Normal)]);
    table
        .apply(0, 1, &TaskCommand::Configure { limits: TaskLimits { max_parallel_branches: 2, ..Default::default() } })
        .expect("configure");
    for i in 0..4 {
        let mut child = spec(&format!("child{i}"), "alice", Priority::High);
        child.parent = Some("parent".into());
        table.apply(1, 10 + i, &TaskCommand::Submit { spec: Box::new(child) }).expect("child");
    }
    let plan = plan_assignments(&table, 100, 100, 5_000);
    let order: Vec<String> = planned(&plan).into_iter().map(|(t, _)| t).collect();
    assert_eq!(order, ["child0", "child1", "parent"], "two children at once, then the rest waits");
    for (i, command) in plan.iter().enumerate() {
        table.apply(100, 100 + i as u64, command).expect("a planned assignment is accepted");
    }
    table.validate().expect("valid");
    assert!(plan_assignments(&table, 101, 100, 5_000).is_empty(), "no free branch and no other work");
}

#[test]
fn retried_tasks_wait_for_their_backoff_and_busy_slots_are_skipped() {
    let mut table =
        table_with(coders(2), vec![spec("a", "alice", Priority::Normal), spec("b", "alice", Priority::Normal)]);
    let plan = plan_assignments(&table, 0, 100, 5_000);
    assert_eq!(plan.len(), 2);
    for (i, command) in plan.iter().enumerate() {
        table.apply(0, 100 + i as u64, command).expect("assign");
    }
    assert!(plan_assignments(&table, 0, 100, 5_000).is_empty(), "both slots are busy");
    let token = table.tasks["a"].lease.as_ref().expect("lease").token;
    let mut retrying = spec("x", "alice", Priority::Normal);
    retrying.max_retries = 1;
    table.apply(0, 200, &TaskCommand::Submit { spec: Box::new(retrying) }).expect("x");
    table
        .apply(10, 201, &TaskCommand::Fail { task_id: "a".into(), token, error: "boom".into(), retryable: false })
        .expect("fail a");
    // A slot is free again; x is first come. (a failed for good.)
    assert_eq!(planned(&plan_assignments(&table, 10, 100, 5_000))[0].0, "x");
    let plan = plan_assignments(&table, 10, 100, 5_000);
    table.apply(10, 300, &plan[0]).expect("assign x");
    let token = table.tasks["x"].lease.as_ref().expect("lease").token;
    table
        .apply(20, 301, &TaskCommand::Fail { task_id: "x".into(), token, error: "boom".into(), retryable: true })
        .expect("fail x");
    assert!(plan_assignments(&table, 500, 100, 5_000).is_empty(), "x waits for its backoff");
    assert_eq!(planned(&plan_assignments(&table, 1_020, 100, 5_000))[0].0, "x");
}

#[test]
fn plans_are_bounded_and_every_assignment_is_accepted() {
    let specs: Vec<TaskSpec> =
        (0..200).map(|i| spec(&format!("t{i:03}"), ["a", "b", "c"][i % 3], Priority::Normal)).collect();
    let slots: Vec<(String, Slot)> =
        (0..50).map(|i| (format!("n{}/coder/{i}", i % 3 + 1), slot(i % 3 + 1, "coder", &[]))).collect();
    let mut table = TaskTable::default();
    for node_id in 1..=3u64 {
        let mine = slots.iter().filter(|(_, s)| s.node_id == node_id).cloned().collect();
        table.apply(0, 1, &TaskCommand::RegisterSlots { node_id, slots: mine }).expect("register");
    }
    for (i, spec) in specs.into_iter().enumerate() {
        table.apply(i as u64, 10 + i as u64, &TaskCommand::Submit { spec: Box::new(spec) }).expect("submit");
    }
    assert_eq!(plan_assignments(&table, 1_000, 20, 5_000).len(), 20, "bounded by assignments_max");
    let plan = plan_assignments(&table, 1_000, 1_000, 5_000);
    assert_eq!(plan.len(), 50, "bounded by free slots");
    for (i, command) in plan.iter().enumerate() {
        table.apply(1_000, 1_000 + i as u64, command).expect("every planned assignment is accepted");
    }
    table.validate().expect("valid");
}

#[test]
fn slots_of_a_node_not_seen_within_a_lease_get_no_work() {
    let mut table = table_with(
        vec![("quiet", slot(1, "coder", &[])), ("chatty", slot(2, "coder", &[]))],
        vec![spec("a", "alice", Priority::Normal), spec("b", "alice", Priority::Normal)],
    );
    // Node 2 renews at 9,000; node 1 was last seen registering at 0.
    table.apply(9_000, 50, &TaskCommand::Renew { node_id: 2, leases: vec![], lease_ms: 5_000 }).expect("renew");
    let plan = planned(&plan_assignments(&table, 9_000, 100, 5_000));
    assert_eq!(plan, [("a".to_string(), "chatty".to_string())], "node 1 is presumed dead");
}

#[test]
fn a_parent_s_own_max_agents_narrows_the_cluster_limit() {
    let mut table = TaskTable::default();
    let slots = (0..6).map(|i| (format!("n1/coder/{i}"), slot(1, "coder", &[]))).collect();
    table.apply(0, 1, &TaskCommand::RegisterSlots { node_id: 1, slots }).expect("slots");
    let mut parent = spec("parent", "alice", Priority::Normal);
    parent.max_agents = Some(2);
    parent.task_type = "poet".into();
    table.apply(0, 2, &TaskCommand::Submit { spec: Box::new(parent) }).expect("parent");
    for i in 0..5u64 {
        let mut child = spec(&format!("c{i}"), "alice", Priority::Normal);
        child.parent = Some("parent".into());
        table.apply(1, 10 + i, &TaskCommand::Submit { spec: Box::new(child) }).expect("child");
    }
    let plan = plan_assignments(&table, 10, 100, 10_000);
    assert_eq!(plan.len(), 2, "two of five children at once: {plan:?}");
}

/// Two coder slots on each of `nodes` nodes, named `n<node>-<slot>`.
fn spread_slots(nodes: u64) -> Vec<(String, Slot)> {
    (1..=nodes).flat_map(|node| (0..2).map(move |i| (format!("n{node}-{i}"), slot(node, "coder", &[])))).collect()
}

fn node_of_plan(table: &TaskTable, plan: &[TaskCommand]) -> Vec<u64> {
    plan.iter()
        .map(|c| match c {
            TaskCommand::Assign { slot, .. } => table.slots[slot].node_id,
            other => panic!("the scheduler only assigns: {other:?}"),
        })
        .collect()
}

/// Issue 17: 720 short tasks on three nodes ran 627 on node 1, because a lone ready task always
/// took the first free slot in id order. Tasks planned one at a time over equal nodes spread.
#[test]
fn one_task_at_a_time_over_equal_nodes_spreads_evenly() {
    let mut per_node: BTreeMap<u64, usize> = BTreeMap::new();
    for i in 0..300 {
        let slots = spread_slots(3);
        let slots: Vec<(&str, Slot)> = slots.iter().map(|(id, s)| (id.as_str(), s.clone())).collect();
        let table =
            table_with(slots, vec![spec(&format!("01936f0e-{i:04}-7000-8000-00000000{i:04}"), "a", Priority::Normal)]);
        let plan = plan_assignments(&table, 10, 100, 10_000);
        assert_eq!(plan.len(), 1);
        *per_node.entry(node_of_plan(&table, &plan)[0]).or_default() += 1;
    }
    for node in 1..=3 {
        let count = per_node.get(&node).copied().unwrap_or(0);
        assert!((70..=130).contains(&count), "node {node} got {count} of 300 tasks: {per_node:?}");
    }
}

/// The least-loaded eligible node goes first: most free slots, then fewest running attempts.
#[test]
fn the_node_with_the_most_free_slots_goes_first() {
    let slots = spread_slots(2);
    let slots: Vec<(&str, Slot)> = slots.iter().map(|(id, s)| (id.as_str(), s.clone())).collect();
    let mut table = table_with(slots, vec![spec("busy", "a", Priority::Normal)]);
    // Node 1 runs one attempt: one free slot against node 2's two.
    let assign = TaskCommand::Assign { task_id: "busy".into(), slot: "n1-0".into(), node_id: 1, lease_ms: 10_000 };
    table.apply(5, 100, &assign).expect("assign");
    for (i, id) in ["t1", "t2", "t3"].into_iter().enumerate() {
        table
            .apply(
                6 + i as u64,
                101 + i as u64,
                &TaskCommand::Submit { spec: Box::new(spec(id, "a", Priority::Normal)) },
            )
            .expect("submit");
    }
    let plan = plan_assignments(&table, 10, 100, 10_000);
    // Node 2 (two free) first; then both nodes have one free slot and one attempt.
    let nodes = node_of_plan(&table, &plan);
    assert_eq!(nodes.len(), 3, "{plan:?}");
    assert_eq!(nodes[0], 2, "the node with two free slots takes the first task: {nodes:?}");
    let on = |node| nodes.iter().filter(|n| **n == node).count();
    assert_eq!((on(1), on(2)), (1, 2), "every free slot is used: {nodes:?}");
}
