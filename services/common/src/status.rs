//! One error model for every service: each refusal has a stable [`Reason`] (which fixes
//! its gRPC code), a message for a person, and the `google.rpc` details a generated
//! client reads instead of parsing text.
//!
//! Every status a Switchboard service sends is built by [`Refusal::to_status`], so every
//! one carries:
//! - `ErrorInfo` with `reason` (the [`Reason`] name, e.g. `SLOW_CONSUMER`) and `domain`
//!   [`DOMAIN`]: clients branch on the reason, never on the message;
//! - `BadRequest` with the offending field, for INVALID_ARGUMENT;
//! - `RetryInfo` when a retry may succeed after a delay (rate limits, overload, outages),
//!   and the same delay in the `retry-after-ms` metadata (kept for clients written before
//!   the details existed; to be removed in a later release).
//!
//! Services map their own error enum to a [`Refusal`] in one place (their `error.rs`).

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// `ErrorInfo.domain` of every Switchboard refusal.
pub const DOMAIN: &str = "switchboard";

/// Metadata key with the retry delay in milliseconds (superseded by `RetryInfo`).
pub const RETRY_AFTER_MS: &str = "retry-after-ms";

macro_rules! reasons {
    ($($(#[$doc:meta])* $variant:ident = $name:literal => $code:ident,)*) => {
        /// Why a call was refused: a stable name clients can branch on, and the gRPC code
        /// it always comes with. Each is a value of `switchboard.errors.v1.ErrorReason`
        /// (`proto/switchboard/errors/v1/errors.proto`), so generated clients have them
        /// as constants.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Reason {
            $($(#[$doc])* $variant,)*
        }

        impl Reason {
            /// Every reason, for documentation checks.
            pub const ALL: &'static [Reason] = &[$(Reason::$variant,)*];

            /// The stable name sent in `ErrorInfo.reason`.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Reason::$variant => $name,)*
                }
            }

            /// The gRPC code this reason is always sent with.
            pub fn code(self) -> Code {
                match self {
                    $(Reason::$variant => Code::$code,)*
                }
            }
        }
    };
}

reasons! {
    /// A field is missing, malformed or out of range; `BadRequest` names it.
    InvalidArgument = "INVALID_ARGUMENT" => InvalidArgument,
    /// The request bytes are not a valid protobuf message of the method's type.
    MalformedRequest = "MALFORMED_REQUEST" => InvalidArgument,
    /// No such conversation.
    ConversationNotFound = "CONVERSATION_NOT_FOUND" => NotFound,
    /// No such consultation.
    ConsultationNotFound = "CONSULTATION_NOT_FOUND" => NotFound,
    /// No such user.
    UserNotFound = "USER_NOT_FOUND" => NotFound,
    /// The username is taken.
    UsernameTaken = "USERNAME_TAKEN" => AlreadyExists,
    /// No usable access token (missing, malformed, forged, unknown key) or too many
    /// `authorization` headers.
    Unauthenticated = "UNAUTHENTICATED" => Unauthenticated,
    /// The access token has expired: refresh it.
    TokenExpired = "TOKEN_EXPIRED" => Unauthenticated,
    /// The session was logged out or revoked: log in again.
    SessionRevoked = "SESSION_REVOKED" => Unauthenticated,
    /// Wrong username or password.
    BadCredentials = "BAD_CREDENTIALS" => Unauthenticated,
    /// The refresh token is unknown, expired or revoked.
    RefreshTokenInvalid = "REFRESH_TOKEN_INVALID" => Unauthenticated,
    /// A spent refresh token was presented again; its session is now revoked.
    RefreshTokenReused = "REFRESH_TOKEN_REUSED" => Unauthenticated,
    /// The caller is not a member of the conversation.
    NotAMember = "NOT_A_MEMBER" => PermissionDenied,
    /// The caller's role or ownership does not allow this.
    PermissionDenied = "PERMISSION_DENIED" => PermissionDenied,
    /// The conversation is closed and read-only.
    ConversationClosed = "CONVERSATION_CLOSED" => FailedPrecondition,
    /// The messages asked for are no longer retained.
    HistoryTrimmed = "HISTORY_TRIMMED" => FailedPrecondition,
    /// Valid request in the wrong state (the message says which).
    FailedPrecondition = "FAILED_PRECONDITION" => FailedPrecondition,
    /// A per-user or per-address rate limit; `RetryInfo` says when to retry.
    RateLimited = "RATE_LIMITED" => ResourceExhausted,
    /// The stream fell behind and was ended; resume from the last seq.
    SlowConsumer = "SLOW_CONSUMER" => ResourceExhausted,
    /// The request message is over the size limit.
    RequestTooLarge = "REQUEST_TOO_LARGE" => ResourceExhausted,
    /// The instance is at its concurrency limit and shed the call; retry.
    Overloaded = "OVERLOADED" => ResourceExhausted,
    /// The caller has too many streams open on this instance.
    TooManyStreams = "TOO_MANY_STREAMS" => ResourceExhausted,
    /// The call ran past the server's time limit for unary calls.
    Timeout = "TIMEOUT" => DeadlineExceeded,
    /// Storage (Redis) is unreachable; retry.
    StorageUnavailable = "STORAGE_UNAVAILABLE" => Unavailable,
    /// The auth service (token keys, user lookups) is unreachable; retry.
    AuthUnavailable = "AUTH_UNAVAILABLE" => Unavailable,
    /// The presence service is unreachable; retry.
    PresenceUnavailable = "PRESENCE_UNAVAILABLE" => Unavailable,
    /// The instance is draining; reconnect (to another instance) and resume.
    ShuttingDown = "SHUTTING_DOWN" => Unavailable,
    /// A stream could not be continued without a gap; reconnect and resume.
    Reconnect = "RECONNECT" => Unavailable,
    /// A bug; details are in the server's log, never in the answer.
    Internal = "INTERNAL" => Internal,
    /// No live presence session of the caller's with that id.
    SessionNotFound = "SESSION_NOT_FOUND" => NotFound,
}

/// A request field that is wrong: which one, and what is wrong with it, for a person.
/// Every service's INVALID_ARGUMENT carries one (it becomes the `BadRequest` detail).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Invalid {
    /// The request field, e.g. `title` or `member_ids[3]`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl Invalid {
    /// `field` is wrong as `message` says.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl From<&Invalid> for Refusal {
    fn from(i: &Invalid) -> Self {
        Refusal::invalid(&i.field, &i.message)
    }
}

/// Delay suggested for retries after an outage of a dependency.
pub const OUTAGE_RETRY: Duration = Duration::from_secs(1);

/// A refusal on its way to becoming a [`Status`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Why.
    pub reason: Reason,
    /// For a person: what is wrong and what to do.
    pub message: String,
    /// The request field at fault (INVALID_ARGUMENT).
    pub field: Option<String>,
    /// When a retry may succeed.
    pub retry_after: Option<Duration>,
}

impl Refusal {
    /// A refusal for `reason` with `message`; outages suggest [`OUTAGE_RETRY`].
    pub fn new(reason: Reason, message: impl Into<String>) -> Self {
        let retry_after = matches!(
            reason,
            Reason::StorageUnavailable | Reason::AuthUnavailable | Reason::PresenceUnavailable
        )
        .then_some(OUTAGE_RETRY);
        Self {
            reason,
            message: message.into(),
            field: None,
            retry_after,
        }
    }

    /// INVALID_ARGUMENT naming `field`.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: Some(field.into()),
            ..Self::new(Reason::InvalidArgument, message)
        }
    }

    /// Sets the retry delay.
    pub fn retry_after(mut self, delay: Duration) -> Self {
        self.retry_after = Some(delay);
        self
    }

    /// The gRPC code.
    pub fn code(&self) -> Code {
        self.reason.code()
    }

    /// The retry delay in whole milliseconds (0: none).
    pub fn retry_after_ms(&self) -> u64 {
        self.retry_after
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1))
            .unwrap_or(0)
    }

    /// The status with its details (see the module docs).
    pub fn to_status(&self) -> Status {
        let mut details = ErrorDetails::new();
        details.set_error_info(
            self.reason.as_str(),
            DOMAIN,
            std::collections::HashMap::new(),
        );
        if let Some(field) = &self.field {
            details.add_bad_request_violation(field.clone(), self.message.clone());
        }
        if let Some(delay) = self.retry_after {
            details.set_retry_info(Some(delay));
        }
        let mut status = Status::with_error_details(self.code(), self.message.clone(), details);
        let retry = self.retry_after_ms();
        if retry > 0
            && let Ok(v) = retry.to_string().parse()
        {
            status.metadata_mut().insert(RETRY_AFTER_MS, v);
        }
        status
    }

    /// Draining: reconnect elsewhere and resume.
    pub fn shutting_down() -> Self {
        Self::new(
            Reason::ShuttingDown,
            "server is shutting down; reconnect (another instance will answer) and resume",
        )
    }

    /// The caller's session was logged out or revoked.
    pub fn session_revoked() -> Self {
        Self::new(
            Reason::SessionRevoked,
            "session has been revoked (logged out); log in again",
        )
    }
}

impl From<Refusal> for Status {
    fn from(r: Refusal) -> Self {
        r.to_status()
    }
}

/// The reason a status carries in its `ErrorInfo`, if any (for clients and tests).
pub fn reason_of(status: &Status) -> Option<String> {
    status
        .get_details_error_info()
        .map(|info| info.reason.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn details_travel_with_the_status() {
        let s = Refusal::invalid("title", "title must be 1 to 128 characters, got 0").to_status();
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(reason_of(&s).as_deref(), Some("INVALID_ARGUMENT"));
        let bad = s.get_details_bad_request().expect("bad request");
        assert_eq!(bad.field_violations[0].field, "title");
        assert!(s.get_details_retry_info().is_none());

        let s = Refusal::new(Reason::RateLimited, "sending too fast")
            .retry_after(Duration::from_millis(250))
            .to_status();
        assert_eq!(s.code(), Code::ResourceExhausted);
        let retry = s.get_details_retry_info().expect("retry info");
        assert_eq!(retry.retry_delay, Some(Duration::from_millis(250)));
        assert_eq!(
            s.metadata()
                .get(RETRY_AFTER_MS)
                .and_then(|v| v.to_str().ok()),
            Some("250")
        );
        assert_eq!(
            Refusal::new(Reason::StorageUnavailable, "x").retry_after,
            Some(OUTAGE_RETRY)
        );
    }

    #[test]
    fn every_reason_is_a_value_of_the_proto_enum_and_back() {
        use switchboard_proto::errors::v1::ErrorReason;
        for r in Reason::ALL {
            let name = format!("ERROR_REASON_{}", r.as_str());
            assert!(
                ErrorReason::from_str_name(&name).is_some(),
                "{name} is missing from errors.proto"
            );
        }
        // And the proto has no reason the services never send.
        let in_proto = (1..100)
            .filter_map(|n| ErrorReason::try_from(n).ok())
            .count();
        assert_eq!(in_proto, Reason::ALL.len());
    }

    #[test]
    fn reason_names_are_unique_upper_snake_case() {
        let mut seen = std::collections::HashSet::new();
        for r in Reason::ALL {
            let name = r.as_str();
            assert!(seen.insert(name), "{name} twice");
            assert!(
                name.chars().all(|c| c.is_ascii_uppercase() || c == '_'),
                "{name}"
            );
        }
    }
}
