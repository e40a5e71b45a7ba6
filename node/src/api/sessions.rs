//! Callers' client sessions on port 8000: the layer that reads `maos-session` from a request
//! (gRPC metadata or an HTTP header) and scopes the request in it, so the request's first write
//! that needs a session goes on the caller's (`raft::core::CALLER_SESSION`). Sessions are opened
//! by `ClusterService.OpenSession` (`cluster.rs`).

use std::cell::Cell;

use axum::body::Body;
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tonic::Status;

use crate::api::rest_error::ApiError;
use crate::raft::core::{CallerSession, CALLER_SESSION};

/// The session layer (`axum::middleware::from_fn`). A malformed header is refused before any
/// handler runs (INVALID_ARGUMENT, or 400), naming the header and its form.
pub async fn caller_session(request: Request, next: Next) -> Response {
    let Some(value) = request.headers().get(CallerSession::HEADER) else {
        return next.run(request).await;
    };
    let parsed = value
        .to_str()
        .map_err(|_| format!("{}: must be ASCII digits and slashes", CallerSession::HEADER))
        .and_then(CallerSession::parse);
    // The auth layer, outside this one, has put the caller's principal on the request.
    let owner = crate::api::principal::principal_in(request.extensions()).id;
    match parsed {
        Ok((client, sequence, acknowledged)) => {
            let caller = CallerSession { client, sequence, acknowledged, owner };
            CALLER_SESSION.scope(Cell::new(Some(caller)), next.run(request)).await
        }
        Err(message) => {
            let grpc = request
                .headers()
                .get(axum::http::header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
            let status = Status::invalid_argument(message);
            match grpc {
                true => status.into_http::<Body>(),
                false => ApiError::from(status).into_response(),
            }
        }
    }
}
