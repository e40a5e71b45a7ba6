//! The page shell every dashboard page shares, and the small renderings pages have in common.
//!
//! maud escapes every `(expression)` it interpolates; nothing here builds HTML from strings.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use maos_raft_store::tasks::{Priority, TaskState};
use maud::{html, Markup, DOCTYPE};

use super::assets::{HTMX, HTMX_SSE, STYLESHEET};
use super::Dashboard;

/// The notice on every page.
pub const READ_ONLY_NOTICE: &str = "Read-only: this dashboard changes nothing. Use the CLI for actions \
     (maos agent pause|resume|terminate, maos task cancel|retry).";

/// htmx settings: no indicator styles injected (the CSP allows no inline style), no eval.
const HTMX_CONFIG: &str = r#"{"includeIndicatorStyles":false,"allowEval":false,"allowScriptTags":false}"#;

/// Which navigation entry a page belongs to.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    Overview,
    Tasks,
    Agents,
}

/// A whole page: the shell around `body`. `live` is the page's SSE address, if it updates live.
pub fn page(dash: &Dashboard, title: &str, nav: Nav, live: Option<&str>, body: Markup) -> Markup {
    let (role, applied) = {
        let metrics = dash.core.raft.metrics();
        let m = metrics.borrow();
        (crate::raft::core::role_name(m.state), m.last_applied.map(|id| id.index).unwrap_or(0))
    };
    let entry = |target: Nav, href: &str, label: &str| {
        html! { a href=(href) class=@if nav == target { "active" } { (label) } }
    };
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(dash, title, true))
            body {
                header {
                    span.brand { "MAOS" }
                    span.cluster { "cluster " (dash.core.cluster_name) }
                    nav {
                        (entry(Nav::Overview, "/", "Overview"))
                        (entry(Nav::Tasks, "/tasks", "Tasks"))
                        (entry(Nav::Agents, "/agents", "Agents"))
                    }
                    span.served #served-by { "served by node " (dash.core.id) " (" (role) "), applied index " (applied) }
                    @if dash.gate.is_some() { a.signout href="/logout" { "Sign out" } }
                }
                p.notice #read-only role="note" { (READ_ONLY_NOTICE) }
                @if let Some(live) = live {
                    main hx-ext="sse" sse-connect=(live) { h1 { (title) } (body) }
                } @else {
                    main { h1 { (title) } (body) }
                }
            }
        }
    }
}

/// A page's `<head>`: its title, the stylesheet and, with `scripts`, htmx and its SSE extension.
pub fn head(dash: &Dashboard, title: &str, scripts: bool) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            @if scripts { meta name="htmx-config" content=(HTMX_CONFIG); }
            title { (title) " · MAOS " (dash.core.cluster_name) }
            link rel="stylesheet" href={ "/assets/" (STYLESHEET) };
            @if scripts {
                script src={ "/assets/" (HTMX) } defer {}
                script src={ "/assets/" (HTMX_SSE) } defer {}
            }
        }
    }
}

/// A page saying what was not found, with status 404.
pub fn not_found(dash: &Dashboard, what: &str) -> Response {
    let body = html! { p.error { (what) } p { a href="/" { "Back to the overview" } } };
    (StatusCode::NOT_FOUND, page(dash, "Not found", Nav::Overview, None, body)).into_response()
}

/// A page naming the bad query field and its fix, with status 400.
pub fn bad_request(dash: &Dashboard, nav: Nav, problem: &str) -> Response {
    let body = html! { p.error #problem { (problem) } };
    (StatusCode::BAD_REQUEST, page(dash, "Bad request", nav, None, body)).into_response()
}

pub async fn not_found_page(State(dash): State<Arc<Dashboard>>) -> Response {
    not_found(&dash, "There is no dashboard page at this address.")
}

pub fn state_name(state: TaskState) -> &'static str {
    match state {
        TaskState::Pending => "PENDING",
        TaskState::Queued => "QUEUED",
        TaskState::Running => "RUNNING",
        TaskState::Completed => "COMPLETED",
        TaskState::Failed => "FAILED",
        TaskState::Cancelled => "CANCELLED",
    }
}

/// The query name of a state (`?state=running`), and back.
pub fn parse_state(text: &str) -> Option<TaskState> {
    [
        TaskState::Pending,
        TaskState::Queued,
        TaskState::Running,
        TaskState::Completed,
        TaskState::Failed,
        TaskState::Cancelled,
    ]
    .into_iter()
    .find(|s| state_name(*s).eq_ignore_ascii_case(text))
}

pub fn priority_name(priority: Priority) -> &'static str {
    match priority {
        Priority::Low => "low",
        Priority::Normal => "normal",
        Priority::High => "high",
        Priority::Critical => "critical",
    }
}

pub fn parse_priority(text: &str) -> Option<Priority> {
    [Priority::Low, Priority::Normal, Priority::High, Priority::Critical]
        .into_iter()
        .find(|p| priority_name(*p).eq_ignore_ascii_case(text))
}

/// The fill colour of a state, for badges and the workflow's DAG.
pub fn state_colour(state: TaskState) -> &'static str {
    match state {
        TaskState::Pending => "#9aa5b1",
        TaskState::Queued => "#f0b429",
        TaskState::Running => "#2680c2",
        TaskState::Completed => "#3f9142",
        TaskState::Failed => "#d64545",
        TaskState::Cancelled => "#7b8794",
    }
}

pub fn state_badge(state: TaskState) -> Markup {
    let name = state_name(state);
    html! { span class={ "badge state-" (name.to_ascii_lowercase()) } data-state=(name) { (name) } }
}

/// `text`, escaped, cut to at most `max_bytes` (at a character boundary) with a note of its
/// whole size when cut.
pub fn clipped(text: &str, max_bytes: usize) -> Markup {
    if text.len() <= max_bytes {
        return html! { (text) };
    }
    let mut end = max_bytes;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    html! { (&text[..end]) span.clip { " … (cut: " (text.len()) " bytes in all)" } }
}

/// Milliseconds since the epoch as `YYYY-MM-DD HH:MM:SS` UTC ("-" for 0).
pub fn time_of(ms: u64) -> String {
    if ms == 0 {
        return "-".into();
    }
    let secs = ms / 1000;
    let (days, day_secs) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days, for days since 1970-01-01.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}", day_secs / 3_600, day_secs % 3_600 / 60, day_secs % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_utc_dates() {
        assert_eq!(time_of(0), "-");
        assert_eq!(time_of(1_000), "1970-01-01 00:00:01");
        assert_eq!(time_of(1_709_251_199_000), "2024-02-29 23:59:59");
        assert_eq!(time_of(1_798_761_600_000), "2027-01-01 00:00:00");
    }

    #[test]
    fn clipped_text_is_escaped_and_cut_at_a_character() {
        assert_eq!(clipped("<b>", 10).into_string(), "&lt;b&gt;");
        let cut = clipped("ééé", 3).into_string();
        assert!(cut.starts_with("é<span class=\"clip\"> …"), "{cut}");
        assert!(cut.contains("6 bytes in all"), "{cut}");
    }
}
