//! Checks that need no state: a spec, a plan, a text's size, a task's state and fencing token.

use std::collections::{BTreeMap, BTreeSet};

use super::types::{
    PlannedTask, Task, TaskRejection, TaskSpec, TaskState, DEPENDENCIES_MAX, LABELS_MAX, PLAN_KEY_BYTES_MAX,
    PLAN_SUBTASKS_MAX, RETRIES_MAX, TASK_TEXT_BYTES_MAX, TRACE_PARENT_BYTES_MAX,
};

pub(super) fn invalid(field: &str, message: impl Into<String>) -> TaskRejection {
    TaskRejection::InvalidSpec { field: field.into(), message: message.into() }
}

pub(super) fn check_text(field: &str, value: &str, limit: usize) -> Result<(), TaskRejection> {
    if value.len() > limit {
        return Err(invalid(field, format!("{} bytes, over the limit of {limit}", value.len())));
    }
    Ok(())
}

/// Check a spec on its own (no state needed); also used by nodes before proposing.
pub fn check_spec(spec: &TaskSpec) -> Result<(), TaskRejection> {
    if spec.id.is_empty() || spec.id.len() > 64 {
        return Err(invalid("id", "must be 1..=64 bytes"));
    }
    if spec.task_type.is_empty() || spec.task_type.len() > 64 {
        return Err(invalid("task_type", "must be 1..=64 bytes"));
    }
    if spec.description.trim().is_empty() {
        return Err(invalid("description", "must not be empty"));
    }
    check_text("description", &spec.description, TASK_TEXT_BYTES_MAX)?;
    check_text("input", &spec.input, TASK_TEXT_BYTES_MAX)?;
    if spec.depends_on.len() > DEPENDENCIES_MAX {
        return Err(invalid(
            "depends_on",
            format!("{} dependencies, over the limit of {DEPENDENCIES_MAX}", spec.depends_on.len()),
        ));
    }
    if spec.depends_on.contains(&spec.id) {
        return Err(invalid("depends_on", "a task cannot depend on itself"));
    }
    if spec.depends_on.iter().collect::<BTreeSet<_>>().len() != spec.depends_on.len() {
        return Err(invalid("depends_on", "lists a task twice"));
    }
    if spec.parent.as_ref() == Some(&spec.id) {
        return Err(invalid("parent", "a task cannot be its own parent"));
    }
    if spec.trace_parent.len() > TRACE_PARENT_BYTES_MAX {
        return Err(invalid(
            "trace_parent",
            format!("must be at most {TRACE_PARENT_BYTES_MAX} bytes (a W3C traceparent)"),
        ));
    }
    if spec.max_retries > RETRIES_MAX {
        return Err(invalid("max_retries", format!("must be at most {RETRIES_MAX}")));
    }
    if spec.timeout_ms == 0 {
        return Err(invalid("timeout_ms", "must be at least 1"));
    }
    if spec.labels.len() > LABELS_MAX {
        return Err(invalid("labels", format!("at most {LABELS_MAX} labels")));
    }
    if let Some(key) = &spec.idempotency_key {
        if key.is_empty() || key.len() > 128 {
            return Err(invalid("idempotency_key", "must be 1..=128 bytes"));
        }
    }
    if spec.max_agents == Some(0) {
        return Err(invalid("max_agents", "must be at least 1 (or unset for the cluster's limit)"));
    }
    if spec.planner_type.as_ref().is_some_and(|t| t.is_empty() || t.len() > 64) {
        return Err(invalid("planner_type", "must be 1..=64 bytes"));
    }
    Ok(())
}

/// Check a plan on its own: size, keys, dependencies inside the plan, no cycle, and no level
/// wider than `branches_max`. Returns the subtasks' indexes in dependency order.
pub fn check_plan(subtasks: &[PlannedTask], branches_max: usize) -> Result<Vec<usize>, TaskRejection> {
    if subtasks.is_empty() || subtasks.len() > PLAN_SUBTASKS_MAX {
        return Err(invalid(
            "plan.subtasks",
            format!("{} subtasks; a plan has 1..={PLAN_SUBTASKS_MAX}", subtasks.len()),
        ));
    }
    if let Some(planned) = subtasks.iter().find(|p| p.depends_on.len() > PLAN_SUBTASKS_MAX) {
        return Err(invalid(
            &format!("plan.subtasks[{}].depends_on", planned.key),
            format!("{} dependencies; a plan has at most {PLAN_SUBTASKS_MAX} subtasks", planned.depends_on.len()),
        ));
    }
    let mut index: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, planned) in subtasks.iter().enumerate() {
        let key = planned.key.as_str();
        if key.is_empty()
            || key.len() > PLAN_KEY_BYTES_MAX
            || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(invalid(
                "plan.subtasks.key",
                format!("{key:?} must be 1..={PLAN_KEY_BYTES_MAX} characters of A-Z a-z 0-9 - _"),
            ));
        }
        if index.insert(key, i).is_some() {
            return Err(invalid("plan.subtasks.key", format!("{key:?} is used twice")));
        }
    }
    for planned in subtasks {
        if let Some(missing) = planned.depends_on.iter().find(|d| !index.contains_key(d.as_str())) {
            return Err(invalid(
                &format!("plan.subtasks[{}].depends_on", planned.key),
                format!("{missing:?} is not a key of this plan"),
            ));
        }
    }
    // Kahn's algorithm, level by level: a level is what can run at once.
    let mut remaining: Vec<usize> = subtasks.iter().map(|p| p.depends_on.len()).collect();
    let mut level: Vec<usize> = (0..subtasks.len()).filter(|&i| remaining[i] == 0).collect();
    let mut order = Vec::with_capacity(subtasks.len());
    while !level.is_empty() {
        if level.len() > branches_max {
            return Err(invalid(
                "plan.subtasks",
                format!(
                    "{} subtasks could run at once, over task_planner.max_parallel_branches ({branches_max})",
                    level.len()
                ),
            ));
        }
        order.extend(&level);
        let mut next = Vec::new();
        for (i, planned) in subtasks.iter().enumerate() {
            if remaining[i] == 0 {
                continue;
            }
            let done = planned.depends_on.iter().filter(|d| level.iter().any(|&l| subtasks[l].key == **d)).count();
            remaining[i] -= done;
            if remaining[i] == 0 {
                next.push(i);
            }
        }
        level = next;
    }
    if order.len() != subtasks.len() {
        return Err(invalid("plan.subtasks.depends_on", "the plan has a dependency cycle"));
    }
    Ok(order)
}

pub(super) fn expect_state(task: &Task, expected: TaskState) -> Result<(), TaskRejection> {
    if task.state != expected {
        return Err(TaskRejection::WrongState { task_id: task.spec.id.clone(), state: task.state, expected });
    }
    Ok(())
}

pub(super) fn check_token(task: &Task, presented: u64) -> Result<(), TaskRejection> {
    match &task.lease {
        Some(lease) if lease.token == presented => Ok(()),
        _ if task.state.is_terminal() => Err(TaskRejection::WrongState {
            task_id: task.spec.id.clone(),
            state: task.state,
            expected: TaskState::Running,
        }),
        lease => Err(TaskRejection::StaleToken {
            task_id: task.spec.id.clone(),
            presented,
            current: lease.as_ref().map(|l| l.token),
        }),
    }
}
