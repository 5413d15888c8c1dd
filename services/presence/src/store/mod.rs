//! Presence state behind one trait, with a Redis engine ([`redis`]) and an in-memory
//! engine ([`memory`]); one contract suite runs against both
//! (`tests/tests/e2e/presence_store_contract.rs`).
//!
//! Every change bumps the user's version and is published as a
//! [`Change`](crate::model::Change) on the user's channel and on the channel of the user's
//! role, so a `Watch` on any instance sees changes made on any other.

use std::future::Future;

use switchboard_proto::presence::v1 as pb;

use crate::model::Session;

pub mod memory;
pub mod redis;

/// Result of store calls.
pub type StoreResult<T> = Result<T, StoreError>;

/// Storage failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis unreachable or failing.
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    /// Stored data unreadable.
    #[error("corrupt presence data: {0}")]
    Corrupt(String),
}

/// Pub/sub channel of a user's presence changes.
pub fn user_channel(user_id: &str) -> String {
    format!("sb:presence:{{u:{user_id}}}")
}

/// Pub/sub channel of one Session stream's commands (SetSessionState, EndSession). It
/// names the user: a caller can reach only its own sessions.
pub fn session_channel(user_id: &str, session_id: &str) -> String {
    format!("sb:presence:{{u:{user_id}}}:session:{session_id}")
}

/// Pub/sub channel of every change of users with a role (wire value), for role watches
/// such as the support desk's watch of agents.
pub fn role_channel(role: i32) -> String {
    format!("sb:presence:role:{role}")
}

/// A live session, as a refresh names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Live {
    /// Its user.
    pub user_id: String,
    /// The session.
    pub session_id: String,
    /// The user's role (wire value).
    pub role: i32,
}

/// Presence's storage contract.
pub trait PresenceStore: Send + Sync + 'static {
    /// Adds or updates a session that lives until `expires_at_ms`; publishes and returns
    /// the user's presence after the change.
    fn put_session(
        &self,
        user_id: &str,
        session: &Session,
        expires_at_ms: u64,
        now_ms: u64,
    ) -> impl Future<Output = StoreResult<pb::UserPresence>> + Send;
    /// Pushes the expiry of live sessions forward (no change is published).
    fn touch(
        &self,
        sessions: &[Live],
        expires_at_ms: u64,
    ) -> impl Future<Output = StoreResult<()>> + Send;
    /// Removes a session; publishes and returns the presence after, or `None` if the
    /// session was already gone (another instance swept it).
    fn drop_session(
        &self,
        user_id: &str,
        session_id: &str,
        now_ms: u64,
    ) -> impl Future<Output = StoreResult<Option<pb::UserPresence>>> + Send;
    /// Presence of each user, in the order asked, with its version.
    fn get(
        &self,
        user_ids: &[String],
        now_ms: u64,
    ) -> impl Future<Output = StoreResult<Vec<(u64, pb::UserPresence)>>> + Send;
    /// Removes sessions that expired before `now_ms` (at most `limit`); safe to run on
    /// every instance at once. Returns how many this call removed.
    fn sweep(&self, now_ms: u64, limit: usize) -> impl Future<Output = StoreResult<usize>> + Send;
    /// Ids of users with a role value that have at least one live session.
    fn online(&self, role: i32) -> impl Future<Output = StoreResult<Vec<String>>> + Send;
}
