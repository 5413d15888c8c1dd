//! Messaging's errors and their one mapping to a [`Refusal`] (and so to a gRPC status).

use std::time::Duration;

use switchboard_common::id::quote;
use switchboard_common::status::{Invalid, Reason, Refusal};
use switchboard_common::token::TokenError;

/// A service messaging depends on, named in "unavailable" answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dependency {
    /// Redis (or the embedded engine).
    Storage,
    /// The auth service (user lookups).
    Auth,
    /// The presence service (the desk's routing).
    Presence,
}

/// Everything a messaging operation can refuse or fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is wrong; it names the field.
    #[error(transparent)]
    InvalidArgument(#[from] Invalid),
    /// Body over 16 KiB.
    #[error("body is {0} bytes; at most 16384 bytes (16 KiB) of UTF-8")]
    BodyTooLarge(usize),
    /// No such conversation.
    #[error("conversation {} does not exist", quote(.0))]
    ConversationNotFound(String),
    /// No such consultation.
    #[error("consultation {} does not exist", quote(.0))]
    ConsultationNotFound(String),
    /// A user id that belongs to nobody.
    #[error("{field} names no user: {}", quote(.id))]
    UserNotFound {
        /// The request field holding it.
        field: String,
        /// The id.
        id: String,
    },
    /// The caller is not a member of the conversation.
    #[error("you are not a member of conversation {}", quote(.0))]
    NotAMember(String),
    /// The caller's role or ownership does not allow this.
    #[error("{0}")]
    PermissionDenied(String),
    /// The conversation is read-only.
    #[error("conversation {} is closed and read-only", quote(.0))]
    ConversationClosed(String),
    /// The range asked for is no longer retained.
    #[error("{0}")]
    HistoryTrimmed(String),
    /// Valid request in the wrong state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A rate limit; retry after the duration.
    #[error("{message}")]
    RateLimited {
        /// What was limited.
        message: String,
        /// When a retry may succeed.
        retry_after: Duration,
    },
    /// A stream fell behind its queue and was ended.
    #[error(
        "stream fell behind: more than {0} undelivered frames; reconnect and resume from your last seq"
    )]
    SlowConsumer(usize),
    /// The caller has too many streams open on this instance.
    #[error(
        "you have {0} streams open on this instance, the most allowed (MESSAGING_MAX_STREAMS_PER_USER); close one"
    )]
    TooManyStreams(usize),
    /// The access token of a stream or a RefreshToken frame was refused.
    #[error("{0}")]
    Token(#[from] TokenError),
    /// A dependency is down; retriable. The cause is logged, never sent.
    #[error("{dependency:?} unavailable: {cause}")]
    Unavailable {
        /// Which one.
        dependency: Dependency,
        /// What failed, for the log.
        cause: String,
    },
    /// The instance is draining.
    #[error("server is shutting down")]
    ShuttingDown,
    /// A stream cannot go on without a gap; the client reconnects and resumes.
    #[error("{0}")]
    Reconnect(String),
    /// A bug or an impossible state; details are logged, not sent.
    #[error("internal error")]
    Internal(String),
}

/// Result of messaging operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<redis::RedisError> for Error {
    fn from(e: redis::RedisError) -> Self {
        switchboard_common::metrics::redis_error();
        Error::storage(format!("redis: {e}"))
    }
}

impl Error {
    /// INVALID_ARGUMENT naming `field`.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::InvalidArgument(Invalid::new(field, message))
    }

    /// Storage failed (`cause` is logged).
    pub fn storage(cause: impl Into<String>) -> Self {
        Error::Unavailable {
            dependency: Dependency::Storage,
            cause: cause.into(),
        }
    }

    /// The one mapping to a refusal, used for RPC results, stream ends and refused frames.
    /// Internal causes are logged here and never sent.
    pub fn refusal(&self) -> Refusal {
        let message = self.to_string();
        match self {
            Error::InvalidArgument(invalid) => invalid.into(),
            Error::BodyTooLarge(_) => Refusal::invalid("body", message),
            Error::ConversationNotFound(_) => Refusal::new(Reason::ConversationNotFound, message),
            Error::ConsultationNotFound(_) => Refusal::new(Reason::ConsultationNotFound, message),
            Error::UserNotFound { field, .. } => Refusal {
                field: Some(field.clone()),
                ..Refusal::new(Reason::UserNotFound, message)
            },
            Error::NotAMember(_) => Refusal::new(Reason::NotAMember, message),
            Error::PermissionDenied(_) => Refusal::new(Reason::PermissionDenied, message),
            Error::ConversationClosed(_) => Refusal::new(Reason::ConversationClosed, message),
            Error::HistoryTrimmed(_) => Refusal::new(Reason::HistoryTrimmed, message),
            Error::FailedPrecondition(_) => Refusal::new(Reason::FailedPrecondition, message),
            Error::RateLimited { retry_after, .. } => Refusal::new(Reason::RateLimited, message)
                .retry_after((*retry_after).max(Duration::from_millis(1))),
            Error::SlowConsumer(_) => Refusal::new(Reason::SlowConsumer, message),
            Error::TooManyStreams(_) => Refusal::new(Reason::TooManyStreams, message),
            Error::Token(e) => e.refusal(),
            Error::Unavailable { dependency, cause } => {
                tracing::warn!(error = %cause, ?dependency, "unavailable");
                match dependency {
                    Dependency::Storage => Refusal::new(
                        Reason::StorageUnavailable,
                        "storage is unavailable; retry shortly",
                    ),
                    Dependency::Auth => Refusal::new(
                        Reason::AuthUnavailable,
                        "auth unavailable: cannot look up users; retry shortly",
                    ),
                    Dependency::Presence => Refusal::new(
                        Reason::PresenceUnavailable,
                        "presence unavailable: cannot find online agents; retry shortly",
                    ),
                }
            }
            Error::ShuttingDown => Refusal::shutting_down(),
            Error::Reconnect(_) => Refusal::new(Reason::Reconnect, message),
            Error::Internal(cause) => {
                tracing::error!(error = %cause, "internal error");
                Refusal::new(Reason::Internal, "internal error")
            }
        }
    }

    /// The gRPC status (see [`Error::refusal`]).
    pub fn to_status(&self) -> tonic::Status {
        self.refusal().to_status()
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        e.to_status()
    }
}
