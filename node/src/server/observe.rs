//! What the composition root adds for observability around the parts it wires: apply timing
//! (a wrapper around the state machine, so raft-store stays free of clocks), the leader-change
//! counter, and request durations for HTTP (an axum middleware, where route templates are known)
//! and gRPC (a tower layer on the API server), and each request's trace span (with tracing on).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use maos_raft_store::{LogId, MaosNode, NodeId, TypeConfig};
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{Entry, SnapshotMeta, StorageError, StoredMembership};
use tokio::sync::watch;
use tracing::Instrument;

use crate::telemetry::metrics::BoundedLabel;
use crate::telemetry::traces;

/// The REST route of a submit, and the gRPC method.
const REST_SUBMIT_ROUTE: &str = "/api/v1/tasks";
const GRPC_SUBMIT_METHOD: &str = "/maos.v1.TaskService/Submit";

/// gRPC method names seen (paths are the client's choice until a service refuses them).
static GRPC_METHODS: BoundedLabel = BoundedLabel::new(128);

/// A state machine whose applies are timed and counted (`maos_raft_apply_*`).
pub struct TimedStateMachine<S>(pub S);

impl<S: RaftStateMachine<TypeConfig>> RaftStateMachine<TypeConfig> for TimedStateMachine<S> {
    type SnapshotBuilder = S::SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId>, StoredMembership<NodeId, MaosNode>), StorageError<NodeId>> {
        self.0.applied_state().await
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<maos_raft_store::Responses>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + openraft::OptionalSend,
        I::IntoIter: openraft::OptionalSend,
    {
        let started = Instant::now();
        let answered = self.0.apply(entries).await;
        if let Ok(responses) = &answered {
            metrics::histogram!("maos_raft_apply_batch_entries").record(responses.len() as f64);
            metrics::histogram!("maos_raft_apply_duration_seconds").record(started.elapsed().as_secs_f64());
        }
        answered
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.0.get_snapshot_builder().await
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<std::io::Cursor<Vec<u8>>>, StorageError<NodeId>> {
        self.0.begin_receiving_snapshot().await
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, MaosNode>,
        snapshot: Box<std::io::Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        self.0.install_snapshot(meta, snapshot).await
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        self.0.get_current_snapshot().await
    }
}

/// Count every change of the leader this node knows (`maos_raft_leader_changes_total`), until
/// `stopped`.
pub async fn count_leader_changes(
    mut raft_metrics: watch::Receiver<openraft::RaftMetrics<NodeId, MaosNode>>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut leader = raft_metrics.borrow_and_update().current_leader;
    metrics::counter!("maos_raft_leader_changes_total").increment(0);
    loop {
        tokio::select! {
            changed = raft_metrics.changed() => if changed.is_err() { return },
            _ = stopped.wait_for(|stop| *stop) => return,
        }
        let now = raft_metrics.borrow_and_update().current_leader;
        if now != leader {
            metrics::counter!("maos_raft_leader_changes_total").increment(1);
            tracing::info!(leader = now, previous = leader, "the leader changed");
            leader = now;
        }
    }
}

/// An axum middleware: `maos_http_request_duration_seconds` by method, route template and status.
pub async fn record_http(request: Request, next: Next) -> Response {
    let route = match request.extensions().get::<MatchedPath>() {
        Some(path) => path.as_str().to_string(),
        None => "unmatched".to_string(),
    };
    let method: &'static str = match request.method().as_str() {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "PATCH" => "PATCH",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        _ => "other",
    };
    let started = Instant::now();
    let response = next.run(request).await;
    let seconds = started.elapsed().as_secs_f64();
    let code = response.status().as_u16().to_string();
    if route == REST_SUBMIT_ROUTE && method == "POST" {
        metrics::histogram!("maos_task_submit_duration_seconds", "surface" => "rest").record(seconds);
    }
    metrics::histogram!("maos_http_request_duration_seconds", "method" => method, "route" => route, "code" => code)
        .record(seconds);
    response
}

/// An axum middleware in front of the whole API port (the auth layer included), with tracing
/// on: each request runs in a server span that continues the caller's `traceparent` (gRPC
/// metadata or an HTTP header), named by its gRPC method or HTTP method.
pub async fn trace_request(request: Request, next: Next) -> Response {
    let name = if is_grpc(request.headers()) {
        GRPC_METHODS.value(request.uri().path()).trim_start_matches('/').to_string()
    } else {
        format!("HTTP {}", request.method())
    };
    let span = tracing::info_span!(
        target: traces::TARGET,
        "request",
        otel.name = %name,
        otel.kind = "server",
        url.path = %request.uri().path(),
        http.response.status_code = tracing::field::Empty,
        rpc.grpc.status_code = tracing::field::Empty,
    );
    traces::follow_headers(&span, request.headers());
    let response = next.run(request).instrument(span.clone()).await;
    span.record("http.response.status_code", response.status().as_u16());
    if let Some(code) = response.headers().get("grpc-status").and_then(|c| c.to_str().ok()) {
        span.record("rpc.grpc.status_code", code);
    }
    response
}

fn is_grpc(headers: &axum::http::HeaderMap) -> bool {
    headers.get(axum::http::header::CONTENT_TYPE).is_some_and(|value| value.as_bytes().starts_with(b"application/grpc"))
}

/// A tower layer for the API server: `maos_grpc_request_duration_seconds` by method and status.
#[derive(Clone, Copy, Default)]
pub struct GrpcMetricsLayer;

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics { inner }
    }
}

#[derive(Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, B, RB> tower::Service<axum::http::Request<B>> for GrpcMetrics<S>
where
    S: tower::Service<axum::http::Request<B>, Response = axum::http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: axum::http::Request<B>) -> Self::Future {
        if !is_grpc(request.headers()) {
            // Plain HTTP is timed by `record_http`, which knows the route templates.
            return Box::pin(self.inner.call(request));
        }
        let method = GRPC_METHODS.value(request.uri().path());
        let started = Instant::now();
        let answer = self.inner.call(request);
        Box::pin(async move {
            let answer = answer.await;
            let seconds = started.elapsed().as_secs_f64();
            // A unary error is a trailers-only response (grpc-status in the headers); a status
            // sent in trailers after data (success, or a stream's end) is not seen here.
            let code = match &answer {
                Ok(response) => match response.headers().get("grpc-status") {
                    Some(status) => grpc_code_name(tonic::Code::from_bytes(status.as_bytes())),
                    None => "OK",
                },
                Err(_) => "transport_error",
            };
            if method == GRPC_SUBMIT_METHOD {
                metrics::histogram!("maos_task_submit_duration_seconds", "surface" => "grpc").record(seconds);
            }
            metrics::histogram!("maos_grpc_request_duration_seconds", "method" => method, "code" => code)
                .record(seconds);
            answer
        })
    }
}

/// The canonical name of a gRPC status code (as grpc-go prints it: `OK`, `NotFound`, ...).
fn grpc_code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "Canceled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}
