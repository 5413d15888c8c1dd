//! Auth's errors and their one mapping to gRPC status codes.

use std::time::Duration;

/// Everything an auth operation can refuse or fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is wrong; the message names it.
    #[error("{0}")]
    InvalidArgument(String),
    /// The username is taken.
    #[error("username '{0}' is already taken")]
    UsernameTaken(String),
    /// Unknown user or wrong password (deliberately indistinguishable).
    #[error("invalid username or password")]
    BadCredentials,
    /// The refresh token is unknown, expired or its session is revoked.
    #[error("refresh token is invalid or expired; log in again")]
    BadRefreshToken,
    /// A spent refresh token was presented again; the session is now revoked.
    #[error(
        "refresh token was already used; the session has been revoked for safety, log in again"
    )]
    RefreshReused,
    /// The caller's role does not allow this.
    #[error("{0}")]
    PermissionDenied(String),
    /// No such user.
    #[error("no user with id '{0}'")]
    UserNotFound(String),
    /// Valid request in the wrong state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Too many attempts; retry after the duration.
    #[error("{message}")]
    RateLimited {
        /// What was limited.
        message: String,
        /// When a retry may succeed.
        retry_after: Duration,
    },
    /// Storage is unreachable.
    #[error("storage unavailable")]
    Unavailable(#[source] StoreError),
    /// A bug or an impossible state; details are logged, not sent.
    #[error("internal error")]
    Internal(String),
}

/// Storage failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis could not be reached or answered with an error.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// Stored data could not be read back.
    #[error("corrupt record: {0}")]
    Corrupt(String),
    /// The shared revocation store could not be reached.
    #[error("{0}")]
    Revocations(#[from] switchboard_common::revocation::StoreUnavailable),
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        Error::Unavailable(e)
    }
}

/// Result of auth operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        use tonic::Status;
        match &e {
            Error::InvalidArgument(m) => Status::invalid_argument(m.clone()),
            Error::UsernameTaken(_) => Status::already_exists(e.to_string()),
            Error::BadCredentials | Error::BadRefreshToken | Error::RefreshReused => {
                Status::unauthenticated(e.to_string())
            }
            Error::PermissionDenied(m) => Status::permission_denied(m.clone()),
            Error::UserNotFound(_) => Status::not_found(e.to_string()),
            Error::FailedPrecondition(m) => Status::failed_precondition(m.clone()),
            Error::RateLimited {
                message,
                retry_after,
            } => {
                let mut status = Status::resource_exhausted(message.clone());
                if let Ok(v) = retry_after.as_millis().to_string().parse() {
                    status.metadata_mut().insert("retry-after-ms", v);
                }
                status
            }
            Error::Unavailable(cause) => {
                if matches!(cause, StoreError::Redis(_)) {
                    switchboard_common::metrics::redis_error();
                }
                tracing::warn!(error = %cause, "storage unavailable");
                Status::unavailable("storage is unavailable; retry shortly")
            }
            Error::Internal(cause) => {
                tracing::error!(error = %cause, "internal error");
                Status::internal("internal error")
            }
        }
    }
}
