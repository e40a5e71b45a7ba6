//! What an agent receives and returns, whatever its backend.
//!
//! The [`Envelope`] is the task as one attempt sees it; a `command` agent reads it as JSON on
//! stdin, an external worker as an `Assignment` message. An agent answers with an [`Outcome`] and
//! may send [`AgentEvent`]s (progress, checkpoints) while it runs.

use std::collections::BTreeMap;
use std::fmt;

use maos_raft_store::tasks::{PlannedTask, TokenUsage};
use serde::{Deserialize, Serialize};

/// The envelope format this build writes.
pub const ENVELOPE_FORMAT: u32 = 1;

/// One attempt's task, as its agent sees it.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Envelope {
    /// [`ENVELOPE_FORMAT`]: an agent can refuse a format it does not know.
    pub format: u32,
    pub task_id: String,
    pub attempt: u32,
    pub agent_id: String,
    pub task_type: String,
    pub description: String,
    pub input: String,
    /// Answer with a plan (`{"subtasks": [...]}`) rather than a result.
    pub planning: bool,
    /// Results of the tasks this one depends on, by task id.
    pub dependency_results: BTreeMap<String, String>,
    /// The latest checkpoint saved by an earlier attempt (or this one).
    pub checkpoint: Option<EnvelopeCheckpoint>,
    /// Present it with every report; a stale one is refused.
    pub fencing_token: u64,
    /// How long this attempt may run.
    pub timeout_ms: u64,
    /// How often the agent should save a checkpoint.
    pub checkpoint_interval_ms: u64,
    /// Where and how the agent may call the MAOS API.
    pub api: ApiAccess,
    /// The task's trace (`TaskSpec::trace_parent`), for the node's spans (external workers get
    /// it in their assignment); not sent to agents,
    /// which get their attempt's span as `TRACEPARENT` instead.
    #[serde(skip)]
    pub trace_parent: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EnvelopeCheckpoint {
    pub data: String,
    pub attempt: u32,
}

/// The MAOS API endpoint and a credential scoped to this attempt.
#[derive(Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApiAccess {
    /// `http://host:port`, or `https://host:port` when the API port speaks TLS.
    pub endpoint: String,
    /// `authorization: Bearer <credential>`; valid while this attempt's lease lives.
    pub credential: String,
    /// Over TLS, the CA bundle that signed the port's certificate (`security.tls.ca_file`); none:
    /// check it against the public web roots.
    #[serde(default)]
    pub ca_file: Option<String>,
}

impl fmt::Debug for Envelope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The credential stays out of logs.
        f.debug_struct("Envelope")
            .field("task_id", &self.task_id)
            .field("attempt", &self.attempt)
            .field("agent_id", &self.agent_id)
            .field("task_type", &self.task_type)
            .field("planning", &self.planning)
            .field("fencing_token", &self.fencing_token)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for ApiAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiAccess")
            .field("endpoint", &self.endpoint)
            .field("credential", &"[redacted]")
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

/// What an agent reports while it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEvent {
    Progress { percent: u8, message: String },
    Checkpoint { data: String },
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutcomeKind {
    /// The agent's output: the result, or for a planning attempt the plan.
    Completed(String),
    Failed {
        error: String,
        retryable: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub kind: OutcomeKind,
    pub usage: TokenUsage,
    /// The backend could not start the agent at all (counted in `maos_agent_spawn_failures_total`).
    pub spawn_failed: bool,
}

impl Outcome {
    pub fn completed(output: impl Into<String>) -> Self {
        Self { kind: OutcomeKind::Completed(output.into()), usage: TokenUsage::default(), spawn_failed: false }
    }

    pub fn failed(error: impl Into<String>, retryable: bool) -> Self {
        Self {
            kind: OutcomeKind::Failed { error: error.into(), retryable },
            usage: TokenUsage::default(),
            spawn_failed: false,
        }
    }
}

#[derive(Deserialize)]
struct PlanDocument {
    subtasks: Vec<PlannedTask>,
}

/// Read a planner's output: a JSON object `{"subtasks": [...]}`, possibly wrapped in prose or a
/// code fence (model output). The plan's own rules are checked when it is applied.
pub fn parse_plan(output: &str) -> Result<Vec<PlannedTask>, String> {
    let (Some(start), Some(end)) = (output.find('{'), output.rfind('}')) else {
        return Err("the planner's output holds no JSON object; expected {\"subtasks\": [...]}".into());
    };
    if end < start {
        return Err("the planner's output holds no JSON object; expected {\"subtasks\": [...]}".into());
    }
    serde_json::from_str::<PlanDocument>(&output[start..=end])
        .map(|plan| plan.subtasks)
        .map_err(|e| format!("the planner's output is not a plan ({{\"subtasks\": [{{key, task_type, description, input, depends_on}}]}}): {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_are_found_in_model_output_and_bad_ones_are_explained() {
        let output = "Here is the plan:\n```json\n{\"subtasks\": [{\"key\": \"a\", \"task_type\": \"coder\", \"description\": \"d\"}]}\n```";
        let plan = parse_plan(output).expect("plan");
        assert_eq!((plan[0].key.as_str(), plan[0].depends_on.len()), ("a", 0));
        assert!(parse_plan("no json here").expect_err("none").contains("no JSON object"));
        assert!(parse_plan("{\"steps\": []}").expect_err("wrong shape").contains("subtasks"));
    }
}
