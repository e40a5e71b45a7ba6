//! `maos-task-memory`: the state machine's own memory per queued task, measured exactly.
//!
//! Applies `--tasks` submits (typical fields, idempotency keys) to a `StateMachineData` in this
//! process and counts the heap bytes live before and after with a counting allocator, so the
//! figure is the state machine's alone: no Raft log, no allocator slack, no runtime. Then runs
//! every task to completion on one agent slot (an assignment and a completion each) and counts
//! again: the cost per retained finished task, which `tasks.retained_max` bounds.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};

use maos_raft_store::tasks::{Priority, TaskCommand, TaskSpec};
use maos_raft_store::{Command, Entry, Request, StateMachineData};
use openraft::{CommittedLeaderId, EntryPayload, LogId};

struct Counting;

static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn main() -> anyhow::Result<()> {
    let tasks: usize =
        std::env::args().skip_while(|a| a != "--tasks").nth(1).map(|n| n.parse()).transpose()?.unwrap_or(100_000);
    let mut state = StateMachineData::default();
    let before = LIVE_BYTES.load(Ordering::Relaxed);
    for (i, chunk) in (0..tasks).collect::<Vec<_>>().chunks(1_000).enumerate() {
        let commands = chunk
            .iter()
            .map(|n| {
                Command::Task(TaskCommand::Submit {
                    spec: Box::new(TaskSpec {
                        // A UUIDv7 is 36 characters.
                        id: format!("01936d2e-7c4a-7000-8000-{n:012}"),
                        task_type: "coder".into(),
                        priority: Priority::Normal,
                        description: format!("bench task {n}"),
                        input: String::new(),
                        depends_on: Vec::new(),
                        parent: None,
                        max_retries: 3,
                        timeout_ms: 3_600_000,
                        idempotency_key: Some(format!("bench-{n}")),
                        submitter: format!("submitter-{}", n % 8),
                        labels: BTreeMap::new(),
                        capabilities: BTreeSet::new(),
                        planner_type: None,
                        max_agents: None,
                        input_stored: false,
                        trace_parent: String::new(),
                    }),
                })
            })
            .collect();
        let entry = Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), i as u64 + 2),
            payload: EntryPayload::Normal(Request::new(1_000, commands)),
        };
        if i == 0 {
            let configure = Entry {
                log_id: LogId::new(CommittedLeaderId::new(1, 1), 1),
                payload: EntryPayload::Normal(Request::new(
                    1_000,
                    vec![Command::Task(TaskCommand::Configure {
                        limits: maos_raft_store::tasks::TaskLimits { queue_size: tasks + 1, ..Default::default() },
                    })],
                )),
            };
            state.apply(&configure)?;
        }
        drop(state.apply(&entry)?);
    }
    let after = LIVE_BYTES.load(Ordering::Relaxed);
    let queued = state.app.tasks.open_tasks();
    anyhow::ensure!(queued == tasks, "expected {tasks} open tasks, found {queued}");
    println!(
        "{tasks} queued tasks: {} bytes of live heap, {:.0} bytes per queued task (state machine only)",
        after - before,
        (after - before) as f64 / tasks as f64
    );
    let slot = maos_raft_store::tasks::Slot { node_id: 1, agent_type: "coder".into(), ..Default::default() };
    let slots = BTreeMap::from([("n1/coder/0".to_string(), slot)]);
    let mut index = (tasks / 1_000 + 2) as u64;
    let register = Command::Task(TaskCommand::RegisterSlots { node_id: 1, slots });
    state.apply(&Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(Request::new(1_000, vec![register])),
    })?;
    let ids: Vec<String> = state.app.tasks.tasks.keys().cloned().collect();
    let with_slot = LIVE_BYTES.load(Ordering::Relaxed);
    for chunk in ids.chunks(500) {
        index += 1;
        let commands = chunk
            .iter()
            .enumerate()
            .flat_map(|(i, id)| {
                let token = maos_raft_store::state::fencing_token(index, 2 * i);
                [
                    TaskCommand::Assign {
                        task_id: id.clone(),
                        slot: "n1/coder/0".into(),
                        node_id: 1,
                        lease_ms: 10_000,
                    },
                    TaskCommand::Complete { task_id: id.clone(), token, result: String::new(), stored: true },
                ]
            })
            .map(Command::Task)
            .collect();
        let entry = Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Request::new(2_000, commands)),
        };
        drop(state.apply(&entry)?);
    }
    let finished_heap = LIVE_BYTES.load(Ordering::Relaxed);
    let completed = state.app.tasks.counts.completed as usize;
    anyhow::ensure!(completed == tasks, "expected {tasks} completed tasks, found {completed}");
    let bytes = finished_heap.saturating_sub(with_slot) + (after - before);
    println!(
        "{tasks} retained finished tasks (results stored, as with PostgreSQL): {bytes} bytes of live heap, {:.0} bytes per retained finished task (state machine only)",
        bytes as f64 / tasks as f64
    );
    Ok(())
}
