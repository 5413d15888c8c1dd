//! Presence's errors and their one mapping to gRPC status codes.

use crate::store::StoreError;

/// Everything a presence operation can refuse or fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A field is wrong; the message names it.
    #[error("{0}")]
    InvalidArgument(String),
    /// Storage is unreachable.
    #[error("storage unavailable")]
    Unavailable(#[from] StoreError),
}

/// Result of presence operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        match &e {
            Error::InvalidArgument(m) => tonic::Status::invalid_argument(m.clone()),
            Error::Unavailable(cause) => {
                if matches!(cause, StoreError::Redis(_)) {
                    switchboard_common::metrics::redis_error();
                }
                tracing::warn!(error = %cause, "storage unavailable");
                tonic::Status::unavailable("storage is unavailable; retry shortly")
            }
        }
    }
}
