//! Live updates: one server-sent event stream per open page. Every `LIVE_INTERVAL` the page's
//! live fragments are rendered again from this node's applied state, and each one that changed
//! is sent as an event named for its fragment; htmx's SSE extension swaps it in
//! (`sse-swap="name"`). A new stream sends every fragment once.

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use tokio::sync::OwnedSemaphorePermit;

use super::Dashboard;

/// Time between two renderings of a page's live fragments.
pub const LIVE_INTERVAL: Duration = Duration::from_millis(500);

/// A page's live fragments: (event name, HTML).
pub type Fragments = Vec<(&'static str, String)>;
pub type Render = Arc<dyn Fn(Arc<Dashboard>) -> Pin<Box<dyn Future<Output = Fragments> + Send>> + Send + Sync>;

struct Live {
    dash: Arc<Dashboard>,
    render: Render,
    sent: BTreeMap<&'static str, String>,
    pending: VecDeque<Event>,
    first: bool,
    _permit: OwnedSemaphorePermit,
}

/// The event stream of a page whose fragments `render` draws; 503 past `SSE_STREAMS_MAX`.
pub fn live(dash: Arc<Dashboard>, render: Render) -> Response {
    let Ok(permit) = dash.streams.clone().try_acquire_owned() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("at most {} live dashboard pages per node; close one and reload", super::SSE_STREAMS_MAX),
        )
            .into_response();
    };
    let live = Live { dash, render, sent: BTreeMap::new(), pending: VecDeque::new(), first: true, _permit: permit };
    Sse::new(events(live)).keep_alive(KeepAlive::default()).into_response()
}

fn events(live: Live) -> impl Stream<Item = Result<Event, Infallible>> {
    futures::stream::unfold(live, |mut live| async move {
        loop {
            if let Some(event) = live.pending.pop_front() {
                return Some((Ok(event), live));
            }
            if !live.first {
                let mut stopped = live.dash.stopped.clone();
                tokio::select! {
                    _ = tokio::time::sleep(LIVE_INTERVAL) => {}
                    _ = stopped.wait_for(|stop| *stop) => return None,
                }
            }
            live.first = false;
            for (name, html) in (live.render)(live.dash.clone()).await {
                if live.sent.get(name) != Some(&html) {
                    live.pending.push_back(Event::default().event(name).data(&html));
                    live.sent.insert(name, html);
                }
            }
        }
    })
}
