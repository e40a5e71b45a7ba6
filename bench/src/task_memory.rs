//! `maos-task-memory`: the state machine's own memory per queued task, measured exactly.
//!
//! Applies `--tasks` submits (typical fields, idempotency keys) to a `StateMachineData` in this
//! process and counts the heap bytes live before and after with a counting allocator, so the
//! figure is the state machine's alone: no Raft log, no allocator slack, no runtime.

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
    Ok(())
}
