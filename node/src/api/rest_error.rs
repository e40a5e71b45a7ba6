//! The REST API's shared parts: errors and their HTTP statuses, the extractors' refusals, the
//! answer type and the integer fields that take `5.0`. Used by `rest.rs` (the router) and the
//! route files `rest_tasks.rs` and `rest_cluster.rs`, and by `openapi.rs` for the error body.

use std::sync::Arc;

use axum::extract::rejection::{BytesRejection, JsonRejection, PathRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use tonic::Code;
use utoipa::ToSchema;

use crate::api::agents::AgentApi;
use crate::api::cluster::ClusterApi;
use crate::api::tasks::TaskApi;

/// Upper bound on a request body.
pub const BODY_BYTES_MAX: usize = 1024 * 1024;

/// The largest integer the document allows where the gRPC field is a `uint64`: 2^53 - 1, the
/// largest a JSON number carries exactly in every client.
pub const JSON_INTEGER_MAX: u64 = (1 << 53) - 1;

/// JSON Schema counts `5.0` as an integer; serde does not. Integer fields of bodies take either.
pub(crate) mod integer {
    use serde::de::Error;
    use serde::{Deserialize, Deserializer};

    fn whole<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let number = serde_json::Number::deserialize(d)?;
        if let Some(n) = number.as_u64() {
            return Ok(n);
        }
        match number.as_f64() {
            Some(f) if f >= 0.0 && f.fract() == 0.0 && f <= super::JSON_INTEGER_MAX as f64 => Ok(f as u64),
            _ => Err(D::Error::custom(format!("{number} is not a whole number >= 0"))),
        }
    }

    pub fn u64<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        whole(d)
    }

    pub fn u32<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        let n = whole(d)?;
        u32::try_from(n).map_err(|_| D::Error::custom(format!("{n} is over {}", u32::MAX)))
    }
}

#[derive(Clone)]
pub struct Services {
    pub tasks: Arc<TaskApi>,
    pub agents: Arc<AgentApi>,
    pub cluster: Arc<ClusterApi>,
}

/// A JSON error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

/// The body of every error answer.
#[derive(Serialize, ToSchema)]
#[schema(as = Error)]
pub struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// The gRPC status code's name: `INVALID_ARGUMENT`, `NOT_FOUND`, `FAILED_PRECONDITION`, ...
    code: &'static str,
    /// What is wrong and how to fix it; starts with the field when one is at fault.
    message: String,
    /// The field at fault (`description`, `page_size`), when there is one.
    field: Option<String>,
}

impl ApiError {
    pub(crate) fn bad_request(message: String) -> Self {
        Self { status: StatusCode::BAD_REQUEST, code: "INVALID_ARGUMENT", message }
    }

    /// `field` over [`JSON_INTEGER_MAX`] is refused, as the document says.
    pub(crate) fn check_integer(field: &str, value: u64) -> Result<u64, Self> {
        if value > JSON_INTEGER_MAX {
            return Err(Self::bad_request(format!("{field}: at most {JSON_INTEGER_MAX}")));
        }
        Ok(value)
    }
}

impl From<tonic::Status> for ApiError {
    fn from(status: tonic::Status) -> Self {
        let (http, code) = match status.code() {
            Code::InvalidArgument | Code::OutOfRange => (StatusCode::BAD_REQUEST, "INVALID_ARGUMENT"),
            Code::NotFound => (StatusCode::NOT_FOUND, "NOT_FOUND"),
            Code::AlreadyExists => (StatusCode::CONFLICT, "ALREADY_EXISTS"),
            Code::FailedPrecondition => (StatusCode::CONFLICT, "FAILED_PRECONDITION"),
            // An expired client session: the write may not have applied; read, then retry.
            Code::Aborted => (StatusCode::CONFLICT, "ABORTED"),
            Code::ResourceExhausted => (StatusCode::TOO_MANY_REQUESTS, "RESOURCE_EXHAUSTED"),
            Code::PermissionDenied => (StatusCode::FORBIDDEN, "PERMISSION_DENIED"),
            Code::Unauthenticated => (StatusCode::UNAUTHORIZED, "UNAUTHENTICATED"),
            Code::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE"),
            Code::DeadlineExceeded => (StatusCode::GATEWAY_TIMEOUT, "DEADLINE_EXCEEDED"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL"),
        };
        Self { status: http, code, message: status.message().to_string() }
    }
}

/// 413 for a body over the limit, 400 for anything else a body extractor refuses.
fn body_refused(status: StatusCode, text: String) -> ApiError {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError {
            status,
            code: "RESOURCE_EXHAUSTED",
            message: format!("body: over {BODY_BYTES_MAX} bytes; send less, or pass a reference"),
        };
    }
    ApiError::bad_request(format!("body: {text}"))
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        body_refused(rejection.status(), rejection.body_text())
    }
}

impl From<BytesRejection> for ApiError {
    fn from(rejection: BytesRejection) -> Self {
        body_refused(rejection.status(), rejection.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        Self::bad_request(format!("query: {}", rejection.body_text()))
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        Self::bad_request(format!("path: {}", rejection.body_text()))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // Messages name the field first: "description: must not be empty".
        let field = self
            .message
            .split_once(':')
            .map(|(head, _)| head.trim())
            .filter(|head| !head.is_empty() && !head.contains(' '))
            .map(String::from);
        let body = ErrorBody { error: ErrorDetail { code: self.code, message: self.message, field } };
        (self.status, Json(body)).into_response()
    }
}

pub(crate) type Answer = Result<Response, ApiError>;

pub(crate) fn ok<T: Serialize>(value: T) -> Answer {
    Ok(Json(value).into_response())
}

/// The answer to a path under `/api/v1` that no route serves.
pub(crate) async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        code: "NOT_FOUND",
        message: "path: no such endpoint; see /api/v1/openapi.json".into(),
    }
}
