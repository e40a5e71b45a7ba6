//! Builtin agents: in-process, for demos, tests and benchmarks.
//!
//! Input decides what one does: `sleep:<ms>` sleeps then answers, `fail` fails every attempt,
//! `fail:<n>` fails the first n attempts, anything else is echoed. The answer is JSON naming the
//! agent, the echoed input, when the attempt started (`started_at_us`, for dispatch latency) and
//! the dependency results it combined. A planning attempt returns the demo plan.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;

use super::envelope::{Envelope, Outcome};

/// The longest a builtin `sleep:` sleeps.
const SLEEP_MS_MAX: u64 = 3_600_000;
/// Upper bound on a demo plan's branches.
const DEMO_BRANCHES_MAX: u64 = 16;

pub async fn run(envelope: &Envelope) -> Outcome {
    let started_at_us = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0);
    if envelope.planning {
        return demo_plan(&envelope.input);
    }
    let input = envelope.input.as_str();
    if input == "fail" {
        return Outcome::failed("builtin agent asked to fail", true);
    }
    if let Some(times) = input.strip_prefix("fail:").and_then(|n| n.parse::<u32>().ok()) {
        if envelope.attempt <= times {
            return Outcome::failed(
                format!("builtin agent fails attempt {} of the first {times}", envelope.attempt),
                true,
            );
        }
    }
    if let Some(ms) = input.strip_prefix("sleep:").and_then(|ms| ms.parse::<u64>().ok()) {
        tokio::time::sleep(Duration::from_millis(ms.min(SLEEP_MS_MAX))).await;
    }
    let mut answer = json!({
        "agent": envelope.agent_id,
        "output": format!("echo: {input}"),
        "started_at_us": started_at_us,
    });
    if !envelope.dependency_results.is_empty() {
        answer["combined"] = json!(envelope.dependency_results);
    }
    Outcome::completed(answer.to_string())
}

/// The demo planner. Input (JSON, every field optional):
/// `{"branches": 3, "branch_type": "researcher", "branch_input": "sleep:500", "aggregate_type": "analyst"}`:
/// that many parallel branches, then one aggregating step that depends on all of them.
fn demo_plan(input: &str) -> Outcome {
    let settings: serde_json::Value = match input.trim() {
        "" => json!({}),
        text => match serde_json::from_str(text) {
            Ok(value) => value,
            Err(e) => {
                return Outcome::failed(
                    format!("the demo planner reads JSON input ({e}); e.g. {{\"branches\": 3}}"),
                    false,
                )
            }
        },
    };
    let branches = settings["branches"].as_u64().unwrap_or(3).clamp(1, DEMO_BRANCHES_MAX);
    let branch_type = settings["branch_type"].as_str().unwrap_or("researcher");
    let branch_input = settings["branch_input"].as_str().unwrap_or("sleep:500");
    let aggregate_type = settings["aggregate_type"].as_str().unwrap_or("analyst");
    let mut subtasks: Vec<serde_json::Value> = (1..=branches)
        .map(|i| {
            json!({
                "key": format!("branch-{i}"),
                "task_type": branch_type,
                "description": format!("branch {i} of {branches}"),
                "input": branch_input,
            })
        })
        .collect();
    let all: Vec<String> = (1..=branches).map(|i| format!("branch-{i}")).collect();
    subtasks.push(json!({
        "key": "aggregate",
        "task_type": aggregate_type,
        "description": "combine the branches' results",
        "input": "aggregate",
        "depends_on": all,
    }));
    Outcome::completed(json!({ "subtasks": subtasks }).to_string())
}

#[cfg(test)]
mod tests {
    use super::super::envelope::{parse_plan, ApiAccess, OutcomeKind};
    use super::*;

    fn envelope(input: &str, attempt: u32, planning: bool) -> Envelope {
        Envelope {
            format: 1,
            task_id: "t".into(),
            attempt,
            agent_id: "n1/coder/0".into(),
            task_type: "coder".into(),
            description: "d".into(),
            input: input.into(),
            planning,
            dependency_results: Default::default(),
            checkpoint: None,
            fencing_token: 1,
            timeout_ms: 1_000,
            checkpoint_interval_ms: 1_000,
            api: ApiAccess::default(),
            trace_parent: String::new(),
        }
    }

    #[tokio::test]
    async fn builtin_agents_echo_fail_n_times_and_plan() {
        let OutcomeKind::Completed(output) = run(&envelope("hello", 1, false)).await.kind else { panic!("echo") };
        let value: serde_json::Value = serde_json::from_str(&output).expect("json");
        assert_eq!((value["output"].as_str(), value["agent"].as_str()), (Some("echo: hello"), Some("n1/coder/0")));
        assert!(matches!(run(&envelope("fail:2", 2, false)).await.kind, OutcomeKind::Failed { .. }));
        assert!(matches!(run(&envelope("fail:2", 3, false)).await.kind, OutcomeKind::Completed(_)));
        let OutcomeKind::Completed(plan) = run(&envelope("{\"branches\": 2}", 1, true)).await.kind else {
            panic!("plan")
        };
        let plan = parse_plan(&plan).expect("a plan");
        assert_eq!(plan.len(), 3);
        assert_eq!(plan[2].depends_on, vec!["branch-1".to_string(), "branch-2".to_string()]);
    }
}
