//! Auth's durable state behind one small trait, with a Redis engine ([`redis`]) and an
//! in-memory engine ([`memory`]). Both pass the same contract suite
//! (`tests/tests/e2e/auth_store_contract.rs`).
//!
//! Everything that must be atomic (refresh rotation with re-use detection, failure
//! counting) is one store call, so instances never race each other.

use std::future::Future;
use std::time::Duration;

use switchboard_common::token::{PublicKey, Role};

use crate::account::UserRecord;
use crate::error::StoreError;

pub mod memory;
pub mod redis;

/// Result of store calls.
pub type StoreResult<T> = Result<T, StoreError>;

/// A new session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSession {
    /// Session id (UUIDv7).
    pub id: String,
    /// Owner.
    pub user_id: String,
    /// Hash of the first refresh token.
    pub refresh_hash: String,
    /// Lifetime without refresh.
    pub ttl: Duration,
}

/// What presenting a refresh token did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rotation {
    /// The token was current: it is now spent and `next` is current. Carries the user id.
    Rotated(String),
    /// The token was already spent: the session is now revoked.
    Reused,
    /// The session was already revoked.
    Revoked,
    /// No such token or session (or it expired).
    Unknown,
}

/// What [`AuthStore::upgrade_guest`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upgrade {
    /// The guest is now the account given, under the same id.
    Done,
    /// The new username belongs to someone else; nothing changed.
    NameTaken,
    /// The id is not (or no longer) a guest's; nothing changed.
    NotAGuest,
}

/// Auth's storage contract.
pub trait AuthStore: Send + Sync + 'static {
    /// Creates `user`; `false` if the username is taken.
    fn create_user(&self, user: &UserRecord) -> impl Future<Output = StoreResult<bool>> + Send;
    /// The user with this (folded) username.
    fn user_by_name(
        &self,
        username: &str,
    ) -> impl Future<Output = StoreResult<Option<UserRecord>>> + Send;
    /// Users by (folded) username, in the order asked (`None` for unknown ones).
    fn users_by_name(
        &self,
        usernames: &[String],
    ) -> impl Future<Output = StoreResult<Vec<Option<UserRecord>>>> + Send;
    /// Users by id, in the order asked (`None` for unknown ids).
    fn users_by_id(
        &self,
        ids: &[String],
    ) -> impl Future<Output = StoreResult<Vec<Option<UserRecord>>>> + Send;
    /// Changes a user's role; the updated user, or `None` if unknown.
    fn set_role(
        &self,
        id: &str,
        role: Role,
    ) -> impl Future<Output = StoreResult<Option<UserRecord>>> + Send;
    /// Turns the guest `account.id` (known as `guest_name`) into `account` (its new
    /// username, display name, password hash and role), keeping its id and so everything
    /// it took part in. The new name is claimed first, as in `create_user`.
    fn upgrade_guest(
        &self,
        account: &UserRecord,
        guest_name: &str,
    ) -> impl Future<Output = StoreResult<Upgrade>> + Send;
    /// Records a new session with its first refresh token.
    fn create_session(&self, session: &NewSession) -> impl Future<Output = StoreResult<()>> + Send;
    /// Atomically spends refresh token `presented` of `session_id` and makes `next`
    /// current, extending the session by `ttl`; detects re-use of a spent token.
    fn rotate_refresh(
        &self,
        session_id: &str,
        presented: &str,
        next: &str,
        ttl: Duration,
    ) -> impl Future<Output = StoreResult<Rotation>> + Send;
    /// Marks a session revoked so its refresh tokens stop working.
    fn revoke_session(&self, session_id: &str) -> impl Future<Output = StoreResult<()>> + Send;
    /// Counts one attempt against each key (counters live for `window` from their first
    /// attempt); returns each count and the milliseconds until it resets.
    fn hit(
        &self,
        keys: &[String],
        window: Duration,
    ) -> impl Future<Output = StoreResult<Vec<(u64, u64)>>> + Send;
    /// Takes one attempt back from `key` (a login that succeeded).
    fn release(&self, key: &str) -> impl Future<Output = StoreResult<()>> + Send;
    /// Resets `key`.
    fn forget(&self, key: &str) -> impl Future<Output = StoreResult<()>> + Send;
    /// Publishes a public signing key valid until `until` (Unix seconds).
    fn put_key(&self, key: &PublicKey, until: u64) -> impl Future<Output = StoreResult<()>> + Send;
    /// Public keys still valid at `now`.
    fn keys(&self, now: u64) -> impl Future<Output = StoreResult<Vec<PublicKey>>> + Send;
}
