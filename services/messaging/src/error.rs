//! Messaging's errors and their one mapping to gRPC status codes.

use std::time::Duration;

/// Everything a messaging operation can refuse or fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A field is wrong; the message names it.
    #[error("{0}")]
    InvalidArgument(String),
    /// Body over 16 KiB.
    #[error("body is {0} bytes; at most 16384 bytes (16 KiB) of UTF-8")]
    BodyTooLarge(usize),
    /// No such conversation.
    #[error("conversation '{0}' does not exist")]
    ConversationNotFound(String),
    /// Something else that does not exist (a consultation); the message names it.
    #[error("{0}")]
    NotFound(String),
    /// The caller is not a member (or lacks the role).
    #[error("{0}")]
    PermissionDenied(String),
    /// Valid request in the wrong state (read-only conversation, history trimmed).
    #[error("{0}")]
    FailedPrecondition(String),
    /// Rate limit or slow consumer; retry after the duration if given.
    #[error("{message}")]
    ResourceExhausted {
        /// What was limited.
        message: String,
        /// When a retry may succeed.
        retry_after: Option<Duration>,
    },
    /// Redis (or a peer service) is down; retriable.
    #[error("{0}")]
    Unavailable(String),
    /// A bug or an impossible state; details are logged, not sent.
    #[error("internal error")]
    Internal(String),
}

/// Result of messaging operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<redis::RedisError> for Error {
    fn from(e: redis::RedisError) -> Self {
        switchboard_common::metrics::redis_error();
        Error::Unavailable(format!("redis: {e}"))
    }
}

impl Error {
    /// Milliseconds before a retry makes sense (0: none).
    pub fn retry_after_ms(&self) -> u64 {
        match self {
            Error::ResourceExhausted {
                retry_after: Some(d),
                ..
            } => d.as_millis() as u64,
            Error::Unavailable(_) => 1000,
            _ => 0,
        }
    }

    /// The one mapping to a gRPC status, used for RPC results and refused stream frames.
    /// Internal causes are logged here and never sent.
    pub fn to_status(&self) -> tonic::Status {
        use tonic::Status;
        let mut status = match self {
            Error::InvalidArgument(_) | Error::BodyTooLarge(_) => {
                Status::invalid_argument(self.to_string())
            }
            Error::ConversationNotFound(_) | Error::NotFound(_) => {
                Status::not_found(self.to_string())
            }
            Error::PermissionDenied(_) => Status::permission_denied(self.to_string()),
            Error::FailedPrecondition(_) => Status::failed_precondition(self.to_string()),
            Error::ResourceExhausted { .. } => Status::resource_exhausted(self.to_string()),
            Error::Unavailable(cause) => {
                tracing::warn!(error = %cause, "unavailable");
                Status::unavailable("storage is unavailable; retry shortly")
            }
            Error::Internal(cause) => {
                tracing::error!(error = %cause, "internal error");
                Status::internal("internal error")
            }
        };
        let retry = self.retry_after_ms();
        if retry > 0
            && let Ok(v) = retry.to_string().parse()
        {
            status.metadata_mut().insert("retry-after-ms", v);
        }
        status
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        e.to_status()
    }
}
