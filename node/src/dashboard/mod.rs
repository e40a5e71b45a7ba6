//! The dashboard on port 3001 (`dashboard.listen`): server-rendered HTML pages of this node's
//! applied view, kept live over server-sent events. Every node serves it, so it works behind the
//! load balancer; `dashboard.enabled: false` turns it off.
//!
//! - `assets.rs`: htmx 2.0 and its SSE extension, vendored in `assets/` and embedded in the
//!   binary, and the stylesheet: nothing is fetched from elsewhere, nothing is built by npm.
//! - `layout.rs`: the page shell (navigation, the read-only notice on every page) and the small
//!   renderings every page shares (state badges, size-limited text).
//! - `recorder.rs`: what this node observes over time (throughput and queue samples, cluster
//!   events, every member's status, each task's state changes and attempts), bounded.
//! - `sse.rs`: one stream per open page that re-renders the page's live fragments and sends
//!   those that changed.
//! - `overview.rs`, `tasks.rs`, `task.rs`, `workflow.rs`, `agents.rs`: the pages.
//! - `login.rs`: with auth on, the sign-in every page and stream needs (a viewer's, operator's
//!   or admin's API key, kept in an `HttpOnly` cookie and checked on every request).
//!
//! With `security.tls` the port speaks TLS with the API port's certificate.
//!
//! **Invariant:** every string that came from a user or an agent (descriptions, inputs, results,
//! causes, names) reaches the page through maud's escaping; no script is built from data (the
//! pages carry no inline script at all, and the Content-Security-Policy allows only this
//! origin's scripts).
//! **Invariant:** the dashboard only reads, and says so on every page; with auth on, only a
//! principal that may read every task sees it.
//! It reads the node's applied state in process (as the API's stale reads do) and the other
//! members' status over the client API; it never calls itself.

use std::sync::Arc;

use axum::extract::Request;
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use tokio::sync::{watch, Semaphore};

use crate::raft::core::NodeCore;
use crate::storage::Storage;

mod agents;
mod assets;
mod layout;
pub mod login;
mod overview;
pub(crate) mod recorder;
mod sse;
mod task;
mod tasks;
mod workflow;

/// Open live-update streams per node, at most; one more is refused with 503 and the page
/// still works without live updates.
pub const SSE_STREAMS_MAX: usize = 64;

/// The policy every response carries: scripts and styles from this origin only, no framing,
/// no plugins, live updates only from this origin.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// What every page handler reads.
pub struct Dashboard {
    pub core: Arc<NodeCore>,
    pub storage: Arc<Storage>,
    pub recorder: Arc<recorder::Recorder>,
    /// Bounds the open live-update streams (`SSE_STREAMS_MAX`).
    pub streams: Arc<Semaphore>,
    /// Ends the live-update streams when the node stops, so a stop need not wait for browsers.
    pub stopped: watch::Receiver<bool>,
    /// With auth on: who may see the pages (`login.rs`).
    pub gate: Option<login::Gate>,
}

/// The dashboard's routes.
pub fn router(dashboard: Arc<Dashboard>) -> Router {
    Router::new()
        .route("/", get(overview::page))
        .route("/sse/overview", get(overview::live))
        .route("/tasks", get(tasks::page))
        .route("/sse/tasks", get(tasks::live))
        .route("/tasks/{id}", get(task::page))
        .route("/sse/tasks/{id}", get(task::live))
        .route("/workflows/{id}", get(workflow::page))
        .route("/sse/workflows/{id}", get(workflow::live))
        .route("/agents", get(agents::page))
        .route("/sse/agents", get(agents::live))
        .route("/assets/{name}", get(assets::serve))
        .route("/login", get(login::page).post(login::submit))
        .route("/logout", get(login::logout))
        .fallback(layout::not_found_page)
        .layer(axum::middleware::from_fn_with_state(dashboard.clone(), login::require))
        .layer(axum::middleware::from_fn(security_headers))
        .with_state(dashboard)
}

/// The Content-Security-Policy and its companions, on every response.
async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}
