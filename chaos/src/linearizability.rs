//! A linearizability checker for key-value histories, in the manner of Porcupine (Athalye,
//! 2017): Wing and Gong's search (1993) with Lowe's memoisation of (linearized set, state)
//! pairs (2017), run per key, since linearizability is local (Herlihy and Wing, 1990, §3.3):
//! a history is linearizable if and only if its restriction to each key is.
//!
//! An operation is an interval from its call to its return, in simulated time. An operation
//! that failed without an answer (a timeout, a dropped connection) may or may not have taken
//! effect: it is kept with no return (it may take effect at any point after its call, or
//! never observably) and an unknown output, which the model accepts whatever the state.
//! Failed reads are dropped: they change nothing.

use std::collections::{BTreeMap, HashSet};

/// What a client asked of one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    Put { value: String },
    CompareAndSet { expected: Option<String>, value: String },
    Get,
}

/// What the client was answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// A put was acknowledged.
    Written,
    /// A compare-and-set found the expected value and wrote.
    Swapped,
    /// A compare-and-set found `current` instead and changed nothing.
    CompareFailed { current: Option<String> },
    /// A read found this value.
    Read { value: Option<String> },
    /// No answer: the operation may or may not have taken effect.
    Unknown,
}

/// One operation of a history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operation {
    pub client: u64,
    pub key: String,
    pub input: Input,
    pub output: Output,
    /// When the client sent it (simulated microseconds).
    pub call_us: u64,
    /// When the client had its answer; `None` for [`Output::Unknown`].
    pub return_us: Option<u64>,
}

/// Upper bound on search steps for one key, so a pathological history cannot hang a test; a
/// history that needs more is reported, not passed.
pub const STEPS_MAX: u64 = 5_000_000;

/// The sequential specification of one key: its value, absent as `None`. Returns whether
/// `input` answered with `output` is possible from `state`, and the state after it.
fn step(state: &Option<String>, input: &Input, output: &Output) -> Option<Option<String>> {
    match (input, output) {
        (Input::Put { value }, Output::Written | Output::Unknown) => Some(Some(value.clone())),
        (Input::CompareAndSet { expected, value }, Output::Swapped) => (state == expected).then(|| Some(value.clone())),
        (Input::CompareAndSet { expected, .. }, Output::CompareFailed { current }) => {
            (state != expected && state == current).then(|| state.clone())
        }
        (Input::CompareAndSet { expected, value }, Output::Unknown) => {
            Some(if state == expected { Some(value.clone()) } else { state.clone() })
        }
        (Input::Get, Output::Read { value }) => (state == value).then(|| state.clone()),
        (Input::Get, Output::Unknown) => Some(state.clone()),
        _ => None,
    }
}

/// Check a whole history: `Err` names the first key whose operations have no linearization
/// (with those operations, in call order) or whose search ran over [`STEPS_MAX`].
pub fn check(history: &[Operation]) -> Result<(), String> {
    let mut by_key: BTreeMap<&str, Vec<&Operation>> = BTreeMap::new();
    for operation in history {
        if matches!((&operation.input, &operation.output), (Input::Get, Output::Unknown)) {
            continue;
        }
        by_key.entry(operation.key.as_str()).or_default().push(operation);
    }
    for (key, operations) in by_key {
        match check_key(&operations) {
            Verdict::Linearizable => {}
            Verdict::NotLinearizable => {
                let mut listed = operations.clone();
                listed.sort_by_key(|o| o.call_us);
                let lines: Vec<String> = listed
                    .iter()
                    .map(|o| {
                        let returned = o.return_us.map_or("never".to_string(), |r| format!("{r}"));
                        format!("  c{} [{} .. {returned}] {:?} -> {:?}", o.client, o.call_us, o.input, o.output)
                    })
                    .collect();
                return Err(format!(
                    "key {key:?}: no linearization of its {} operations:\n{}",
                    listed.len(),
                    lines.join("\n")
                ));
            }
            Verdict::TooLong => {
                return Err(format!(
                    "key {key:?}: the search for a linearization of {} operations passed {STEPS_MAX} steps",
                    operations.len()
                ))
            }
        }
    }
    Ok(())
}

#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Linearizable,
    NotLinearizable,
    TooLong,
}

/// One event of the timeline: an operation's call or its return.
#[derive(Debug, Clone, Copy)]
struct Event {
    operation: usize,
    is_call: bool,
    /// The index of the matching return event (calls only; `usize::MAX` for none).
    matching: usize,
}

/// Wing and Gong's search over the events of one key, as a doubly linked list that operations
/// are lifted out of when linearized and put back when the search backtracks.
fn check_key(operations: &[&Operation]) -> Verdict {
    // Events sorted by time; at equal times calls come first, so touching intervals overlap
    // (the permissive reading, as Porcupine's).
    let mut timeline: Vec<(u64, u8, usize)> = Vec::with_capacity(operations.len() * 2);
    for (i, operation) in operations.iter().enumerate() {
        timeline.push((operation.call_us, 0, i));
        timeline.push((operation.return_us.unwrap_or(u64::MAX), 1, i));
    }
    timeline.sort();
    let mut events: Vec<Event> = timeline
        .iter()
        .map(|&(_, kind, operation)| Event { operation, is_call: kind == 0, matching: usize::MAX })
        .collect();
    let mut return_of = vec![usize::MAX; operations.len()];
    for (index, event) in events.iter().enumerate() {
        if !event.is_call {
            return_of[event.operation] = index;
        }
    }
    for event in events.iter_mut().filter(|e| e.is_call) {
        event.matching = return_of[event.operation];
    }
    // The list: node 0 is the head sentinel, event i is node i + 1.
    let count = events.len();
    let mut next: Vec<usize> = (1..=count + 1).collect();
    let mut prev: Vec<usize> = (0..=count).map(|i| i.saturating_sub(1)).collect();
    next[count] = usize::MAX;
    let lift = |next: &mut Vec<usize>, prev: &mut Vec<usize>, node: usize| {
        let (p, n) = (prev[node], next[node]);
        next[p] = n;
        if n != usize::MAX {
            prev[n] = p;
        }
    };
    let unlift = |next: &mut Vec<usize>, prev: &mut Vec<usize>, node: usize| {
        let (p, n) = (prev[node], next[node]);
        next[p] = node;
        if n != usize::MAX {
            prev[n] = node;
        }
    };

    let words = operations.len().div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut state: Option<String> = None;
    let mut cache: HashSet<(Vec<u64>, Option<String>)> = HashSet::new();
    // (call node, state before it) for each operation linearized so far.
    let mut stack: Vec<(usize, Option<String>)> = Vec::new();
    let mut cursor = next[0];
    let mut steps = 0u64;
    while next[0] != usize::MAX {
        steps += 1;
        if steps > STEPS_MAX {
            return Verdict::TooLong;
        }
        let event = events[cursor - 1];
        if event.is_call {
            let operation = operations[event.operation];
            if let Some(after) = step(&state, &operation.input, &operation.output) {
                let mut with = linearized.clone();
                with[event.operation / 64] |= 1 << (event.operation % 64);
                if cache.insert((with.clone(), after.clone())) {
                    stack.push((cursor, std::mem::replace(&mut state, after)));
                    linearized = with;
                    lift(&mut next, &mut prev, cursor);
                    lift(&mut next, &mut prev, event.matching + 1);
                    cursor = next[0];
                    continue;
                }
            }
            cursor = next[cursor];
        } else {
            // A return reached before its operation was linearized: undo the last choice.
            let Some((call, before)) = stack.pop() else { return Verdict::NotLinearizable };
            let undone = events[call - 1];
            state = before;
            linearized[undone.operation / 64] &= !(1 << (undone.operation % 64));
            unlift(&mut next, &mut prev, undone.matching + 1);
            unlift(&mut next, &mut prev, call);
            cursor = next[call];
        }
        if cursor == usize::MAX {
            // Only operations with no return are left and none of them fits: that cannot
            // happen (an unknown output fits any state), but never loop on it.
            return Verdict::NotLinearizable;
        }
    }
    Verdict::Linearizable
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(client: u64, input: Input, output: Output, call_us: u64, return_us: u64) -> Operation {
        let return_us = (output != Output::Unknown).then_some(return_us);
        Operation { client, key: "k".into(), input, output, call_us, return_us }
    }
    fn put(v: &str) -> Input {
        Input::Put { value: v.into() }
    }
    fn cas(expected: Option<&str>, v: &str) -> Input {
        Input::CompareAndSet { expected: expected.map(str::to_string), value: v.into() }
    }
    fn read(v: Option<&str>) -> Output {
        Output::Read { value: v.map(str::to_string) }
    }

    #[test]
    fn sequential_and_overlapping_histories_that_have_a_linearization_pass() {
        let history = vec![
            op(1, put("a"), Output::Written, 0, 10),
            op(2, Input::Get, read(Some("a")), 20, 30),
            op(1, cas(Some("a"), "b"), Output::Swapped, 40, 50),
            op(2, Input::Get, read(Some("b")), 60, 70),
        ];
        assert_eq!(check(&history), Ok(()));
        // Two overlapping puts: a read after both may see either, and two reads agree on the last.
        let overlapping = vec![
            op(1, put("a"), Output::Written, 0, 100),
            op(2, put("b"), Output::Written, 10, 90),
            op(3, Input::Get, read(Some("a")), 110, 120),
            op(3, Input::Get, read(Some("a")), 130, 140),
        ];
        assert_eq!(check(&overlapping), Ok(()));
        // A read concurrent with a put may see the old or the new value.
        let concurrent = vec![
            op(1, put("a"), Output::Written, 0, 10),
            op(2, put("b"), Output::Written, 20, 60),
            op(3, Input::Get, read(Some("a")), 30, 40),
            op(3, Input::Get, read(Some("b")), 45, 50),
        ];
        assert_eq!(check(&concurrent), Ok(()));
    }

    #[test]
    fn an_unanswered_write_may_or_may_not_have_taken_effect() {
        let took_effect = vec![op(1, put("a"), Output::Unknown, 0, 0), op(2, Input::Get, read(Some("a")), 50, 60)];
        assert_eq!(check(&took_effect), Ok(()));
        let did_not = vec![op(1, put("a"), Output::Unknown, 0, 0), op(2, Input::Get, read(None), 50, 60)];
        assert_eq!(check(&did_not), Ok(()));
        // But not before it was sent.
        let before_its_call = vec![op(2, Input::Get, read(Some("a")), 0, 10), op(1, put("a"), Output::Unknown, 20, 0)];
        assert!(check(&before_its_call).is_err());
    }

    #[test]
    fn known_non_linearizable_histories_are_refused() {
        // A stale read: the write was acknowledged before the read began.
        let stale = vec![op(1, put("a"), Output::Written, 0, 10), op(2, Input::Get, read(None), 20, 30)];
        assert!(check(&stale).is_err());
        // A lost write: the later write's value is gone.
        let lost = vec![
            op(1, put("a"), Output::Written, 0, 10),
            op(1, put("b"), Output::Written, 20, 30),
            op(2, Input::Get, read(Some("a")), 40, 50),
        ];
        assert!(check(&lost).is_err());
        // Reads that go back in time: b is seen, then a again with nothing writing a.
        let back = vec![
            op(1, put("a"), Output::Written, 0, 10),
            op(1, put("b"), Output::Written, 20, 100),
            op(2, Input::Get, read(Some("b")), 30, 40),
            op(3, Input::Get, read(Some("a")), 50, 60),
        ];
        assert!(check(&back).is_err());
        // A compare-and-set applied twice: the first copy wrote b (a reader saw it), the resend
        // found b and reported a failure; no single point explains both.
        let twice = vec![
            op(1, put("a"), Output::Written, 0, 10),
            op(1, cas(Some("a"), "b"), Output::CompareFailed { current: Some("b".into()) }, 20, 100),
            op(2, Input::Get, read(Some("b")), 30, 40),
        ];
        // Linearizable only if something else wrote b: nothing did.
        assert!(check(&twice).is_err());
        // A put applied twice (a client's blind resend), overwriting a later write.
        let replayed = vec![
            op(1, put("a"), Output::Written, 0, 100),
            op(2, Input::Get, read(Some("a")), 10, 20),
            op(3, put("b"), Output::Written, 30, 40),
            op(2, Input::Get, read(Some("b")), 50, 60),
            op(2, Input::Get, read(Some("a")), 110, 120),
        ];
        assert!(check(&replayed).is_err());
        // A failed compare-and-set must report the value it found.
        let wrong_current = vec![
            op(1, put("a"), Output::Written, 0, 10),
            op(2, cas(Some("x"), "y"), Output::CompareFailed { current: Some("z".into()) }, 20, 30),
        ];
        assert!(check(&wrong_current).is_err());
    }

    #[test]
    fn keys_are_checked_independently_and_the_report_names_the_key() {
        let mut history = vec![op(1, put("a"), Output::Written, 0, 10)];
        let mut other = op(2, Input::Get, read(None), 20, 30);
        other.key = "other".into();
        history.push(other);
        assert_eq!(check(&history), Ok(()));
        history.push(op(2, Input::Get, read(None), 20, 30));
        let error = check(&history).expect_err("a stale read of k");
        assert!(error.contains("key \"k\""), "{error}");
    }

    #[test]
    fn many_concurrent_operations_are_checked_within_the_step_bound() {
        // 4 clients, 60 operations each on one key, every one overlapping its neighbours.
        let mut history = Vec::new();
        let mut last = None::<String>;
        for i in 0..240u64 {
            let client = i % 4;
            let value = format!("v{i}");
            let (input, output) = match i % 3 {
                0 => (put(&value), Output::Written),
                1 => (Input::Get, read(last.as_deref())),
                _ => (cas(last.as_deref(), &value), Output::Swapped),
            };
            if !matches!(input, Input::Get) {
                last = Some(value);
            }
            history.push(op(client, input, output, i * 10, i * 10 + 15));
        }
        assert_eq!(check(&history), Ok(()));
    }
}
