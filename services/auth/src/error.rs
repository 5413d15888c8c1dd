//! Auth's errors and their one mapping to a [`Refusal`] (and so to a gRPC status).

use std::time::Duration;

use switchboard_common::id::quote;
use switchboard_common::status::{Invalid, Reason, Refusal};
use switchboard_common::token::TokenError;

/// Everything an auth operation can refuse or fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is wrong; it names the field.
    #[error(transparent)]
    InvalidArgument(#[from] Invalid),
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
    /// No verified caller on a call that needs one.
    #[error("{0}")]
    Token(#[from] TokenError),
    /// The caller's role does not allow this.
    #[error("{0}")]
    PermissionDenied(String),
    /// No such user.
    #[error("no user with id {}", quote(.0))]
    UserNotFound(String),
    /// Valid request in the wrong state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The configured first admin's name belongs to an account that is not an admin and
    /// whose password is not the configured one: auth refuses to start rather than hand
    /// admin to whoever registered that name.
    #[error(
        "AUTH_ADMIN_USERNAME '{0}' names an existing account that is not an admin and whose password is not AUTH_ADMIN_PASSWORD; refusing to make it an admin. Choose another AUTH_ADMIN_USERNAME (or set AUTH_ADMIN_PASSWORD to that account's password if it is yours)"
    )]
    AdminNameTaken(String),
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

impl Error {
    /// INVALID_ARGUMENT naming `field`.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::InvalidArgument(Invalid::new(field, message))
    }

    /// The one mapping to a refusal; internal causes are logged here and never sent.
    pub fn refusal(&self) -> Refusal {
        let message = self.to_string();
        match self {
            Error::InvalidArgument(invalid) => invalid.into(),
            Error::UsernameTaken(_) => Refusal::new(Reason::UsernameTaken, message),
            Error::BadCredentials => Refusal::new(Reason::BadCredentials, message),
            Error::BadRefreshToken => Refusal::new(Reason::RefreshTokenInvalid, message),
            Error::RefreshReused => Refusal::new(Reason::RefreshTokenReused, message),
            Error::Token(e) => e.refusal(),
            Error::PermissionDenied(_) => Refusal::new(Reason::PermissionDenied, message),
            Error::UserNotFound(_) => Refusal::new(Reason::UserNotFound, message),
            Error::FailedPrecondition(_) | Error::AdminNameTaken(_) => {
                Refusal::new(Reason::FailedPrecondition, message)
            }
            Error::RateLimited { retry_after, .. } => {
                Refusal::new(Reason::RateLimited, message).retry_after(*retry_after)
            }
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
            Error::Internal(cause) => {
                tracing::error!(error = %cause, "internal error");
                Refusal::new(Reason::Internal, "internal error")
            }
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        e.refusal().to_status()
    }
}
