//! Presence's errors and their one mapping to a [`Refusal`] (and so to a gRPC status).

use switchboard_common::status::{Invalid, Reason, Refusal};
use switchboard_common::token::TokenError;

use crate::store::StoreError;

/// Everything a presence operation can refuse or fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is wrong; it names the field.
    #[error(transparent)]
    InvalidArgument(#[from] Invalid),
    /// The caller may not do this (a service opening a device session).
    #[error("{0}")]
    PermissionDenied(String),
    /// No verified caller, or the session was revoked.
    #[error("{0}")]
    Token(#[from] TokenError),
    /// The caller has too many device streams open on this instance.
    #[error(
        "you have {0} device streams open on this instance, the most allowed (PRESENCE_MAX_STREAMS_PER_USER); close one"
    )]
    TooManyStreams(usize),
    /// Storage is unreachable (the cause is logged, never sent).
    #[error("storage unavailable")]
    Unavailable(#[from] StoreError),
    /// The pub/sub bus could not subscribe (the cause is logged, never sent).
    #[error("storage unavailable")]
    Bus(String),
    /// The instance is draining.
    #[error("server is shutting down")]
    ShuttingDown,
    /// No live Session stream of the caller has this id.
    #[error(
        "you have no live Session stream with session_id {0} (it ended, or it was opened by Connect, whose stream sets its own state)"
    )]
    NoSuchSession(String),
}

/// Result of presence operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// INVALID_ARGUMENT naming `field`.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::InvalidArgument(Invalid::new(field, message))
    }

    /// The one mapping to a refusal; internal causes are logged here.
    pub fn refusal(&self) -> Refusal {
        match self {
            Error::InvalidArgument(invalid) => invalid.into(),
            Error::PermissionDenied(m) => Refusal::new(Reason::PermissionDenied, m),
            Error::Token(e) => e.refusal(),
            Error::TooManyStreams(_) => Refusal::new(Reason::TooManyStreams, self.to_string()),
            Error::Unavailable(cause) => {
                if matches!(cause, StoreError::Redis(_)) {
                    switchboard_common::metrics::redis_error();
                }
                tracing::warn!(error = %cause, "storage unavailable");
                Refusal::new(
                    Reason::StorageUnavailable,
                    "storage is unavailable; retry shortly",
                )
            }
            Error::Bus(cause) => {
                tracing::warn!(error = %cause, "pub/sub unavailable");
                Refusal::new(
                    Reason::StorageUnavailable,
                    "storage is unavailable; retry shortly",
                )
            }
            Error::ShuttingDown => Refusal::shutting_down(),
            Error::NoSuchSession(_) => Refusal::new(Reason::SessionNotFound, self.to_string()),
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        e.refusal().to_status()
    }
}
