//! Every error to a gRPC status, in one place: refusals of the state machine, the write path's
//! errors and the task-data store's. REST maps these statuses to HTTP in `rest.rs`.

use maos_raft_store::{Rejection, Response as Applied};
use tonic::Status;
use tonic_types::{ErrorDetails, StatusExt};

use crate::raft::core::CoreError;
use crate::storage::StorageError;

/// The `google.rpc.ErrorInfo` reason of a write on an unknown or expired client session: the
/// write did not apply now, but an earlier copy may have.
pub const SESSION_EXPIRED: &str = "SESSION_EXPIRED";

pub fn status_from(error: CoreError) -> Status {
    match error {
        CoreError::Rejected(rejection) => status_of_rejection(rejection),
        CoreError::Unavailable { .. } | CoreError::Stopped(_) | CoreError::Removed(_) => {
            Status::unavailable(error.to_string())
        }
    }
}

/// INVALID_ARGUMENT naming `field`, with a `google.rpc.BadRequest` detail a program can read.
pub fn invalid_field(field: &str, message: &str) -> Status {
    let details = ErrorDetails::with_bad_request_violation(field, message);
    Status::with_error_details(tonic::Code::InvalidArgument, format!("{field}: {message}"), details)
}

/// INVALID_ARGUMENT from a message that starts with the field (`"description: must not be
/// empty"`); the field also goes into a `google.rpc.BadRequest` detail.
pub fn invalid(message: impl Into<String>) -> Status {
    let message = message.into();
    match message.split_once(": ") {
        Some((field, rest)) if !field.is_empty() && !field.contains(' ') => invalid_field(field, rest),
        _ => Status::invalid_argument(message),
    }
}

/// The gRPC code of a refusal: the caller's fix differs by case.
pub fn status_of_rejection(rejection: Rejection) -> Status {
    use maos_raft_store::auth::AuthRejection as A;
    use maos_raft_store::tasks::TaskRejection as T;
    let message = rejection.to_string();
    match rejection {
        Rejection::InvalidField { field, message } | Rejection::Task(T::InvalidSpec { field, message }) => {
            invalid_field(&field, &message)
        }
        Rejection::TooLarge { .. }
        | Rejection::KeySpaceFull { .. }
        | Rejection::SessionsFull { .. }
        | Rejection::SessionWindowFull { .. }
        | Rejection::Task(T::QueueFull { .. } | T::AgentLimit { .. }) => Status::resource_exhausted(message),
        // The write may or may not have applied: the caller decides at a higher level.
        Rejection::SessionExpired { .. } => {
            let details = ErrorDetails::with_error_info(SESSION_EXPIRED, "maos", std::collections::HashMap::new());
            Status::with_error_details(tonic::Code::Aborted, message, details)
        }
        Rejection::SessionSequenceAcknowledged { .. } => Status::failed_precondition(message),
        Rejection::SessionNotYours { .. } => Status::permission_denied(message),
        Rejection::Task(T::UnknownTask { .. } | T::UnknownAgent { .. }) => Status::not_found(message),
        Rejection::Task(
            T::StaleToken { .. }
            | T::WrongState { .. }
            | T::AgentState { .. }
            | T::NotYet { .. }
            | T::SlotUnavailable { .. },
        ) => Status::failed_precondition(message),
        Rejection::Auth(auth) => match auth {
            A::AlreadyBootstrapped => Status::failed_precondition(message),
            A::NotBootstrapped => Status::unavailable(message),
            A::DuplicateKey { .. } => Status::already_exists(message),
            A::UnknownKey { .. } => Status::not_found(message),
            A::TooManyKeys { .. } => Status::resource_exhausted(message),
            A::Invalid { .. } => invalid(message),
        },
        _ => invalid(message),
    }
}

/// The gRPC status of a task-data store error: the field for a refused payload, UNAVAILABLE
/// while the store is down, FAILED_PRECONDITION for a stale token.
pub fn storage_status(error: &StorageError) -> Status {
    match error {
        StorageError::Unavailable { .. } => Status::unavailable(error.to_string()),
        StorageError::Stale { .. } => Status::failed_precondition(error.to_string()),
        StorageError::TooLarge { field, .. } | StorageError::NulCharacter { field, .. } => {
            let message = error.to_string();
            let rest = message.split_once(": ").map(|(_, rest)| rest).unwrap_or(&message);
            invalid_field(field, rest)
        }
        StorageError::InvalidToken { .. } => invalid(error.to_string()),
        StorageError::Corrupt { .. } => Status::internal(error.to_string()),
    }
}

pub(crate) fn unexpected(response: Applied) -> Status {
    Status::internal(format!("unexpected result from the state machine: {response:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::storage::Storage;

    #[test]
    fn a_payload_with_a_nul_is_refused_naming_the_field_and_where() {
        let storage = Storage::from_config(&Config::default()).expect("the embedded default");
        for field in ["input", "result", "checkpoint"] {
            assert!(storage.check_payload(field, "plain text, ünïcode too").is_ok());
            let error = storage.check_payload(field, "ab\0c").expect_err("a NUL is refused");
            assert!(error.is_refused_payload());
            assert_eq!(storage_status(&error).code(), tonic::Code::InvalidArgument);
            assert!(error.to_string().starts_with(&format!("{field}: a NUL character (U+0000) at byte 2")), "{error}");
        }
        // Too large is checked first and names the limit.
        let big = "x".repeat(maos_raft_store::tasks::TASK_TEXT_BYTES_MAX + 1);
        assert!(matches!(storage.check_payload("input", &big), Err(StorageError::TooLarge { field: "input", .. })));
    }
}
