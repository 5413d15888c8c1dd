//! The in-memory engine: one process's state, for `make run` without Redis and unit tests.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use switchboard_common::token::{PublicKey, Role};

use super::{AuthStore, NewSession, Rotation, StoreResult, Upgrade};
use crate::account::UserRecord;

#[derive(Default)]
struct State {
    users: HashMap<String, UserRecord>,
    by_name: HashMap<String, String>,
    sessions: HashMap<String, Session>,
    counters: HashMap<String, (u64, Instant)>,
    keys: HashMap<String, (PublicKey, u64)>,
}

struct Session {
    revoked: bool,
    expires: Instant,
    user_id: String,
    /// Refresh token hash → spent?
    tokens: HashMap<String, bool>,
}

/// Auth state in this process.
#[derive(Default)]
pub struct MemoryStore {
    state: Mutex<State>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        // Every mutation is a few map operations that cannot panic half-way, so a
        // poisoned lock still guards consistent data.
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut state)
    }
}

impl AuthStore for MemoryStore {
    async fn create_user(&self, user: &UserRecord) -> StoreResult<bool> {
        Ok(self.with(|s| {
            if s.by_name.contains_key(&user.username) {
                return false;
            }
            s.by_name.insert(user.username.clone(), user.id.clone());
            s.users.insert(user.id.clone(), user.clone());
            true
        }))
    }

    async fn user_by_name(&self, username: &str) -> StoreResult<Option<UserRecord>> {
        Ok(self.with(|s| {
            s.by_name
                .get(username)
                .and_then(|id| s.users.get(id))
                .cloned()
        }))
    }

    async fn users_by_name(&self, usernames: &[String]) -> StoreResult<Vec<Option<UserRecord>>> {
        Ok(self.with(|s| {
            usernames
                .iter()
                .map(|n| s.by_name.get(n).and_then(|id| s.users.get(id)).cloned())
                .collect()
        }))
    }

    async fn users_by_id(&self, ids: &[String]) -> StoreResult<Vec<Option<UserRecord>>> {
        Ok(self.with(|s| ids.iter().map(|id| s.users.get(id).cloned()).collect()))
    }

    async fn set_role(&self, id: &str, role: Role) -> StoreResult<Option<UserRecord>> {
        Ok(self.with(|s| {
            s.users.get_mut(id).map(|u| {
                u.role = role;
                u.clone()
            })
        }))
    }

    async fn upgrade_guest(&self, account: &UserRecord, guest_name: &str) -> StoreResult<Upgrade> {
        Ok(self.with(|s| {
            if s.by_name.contains_key(&account.username) {
                return Upgrade::NameTaken;
            }
            match s.users.get_mut(&account.id) {
                Some(u) if u.role == Role::Guest => {
                    let created_at_ms = u.created_at_ms;
                    *u = UserRecord {
                        created_at_ms,
                        ..account.clone()
                    };
                }
                _ => return Upgrade::NotAGuest,
            }
            s.by_name
                .insert(account.username.clone(), account.id.clone());
            if s.by_name.get(guest_name) == Some(&account.id) {
                s.by_name.remove(guest_name);
            }
            Upgrade::Done
        }))
    }

    async fn create_session(&self, session: &NewSession) -> StoreResult<()> {
        self.with(|s| {
            let now = Instant::now();
            s.sessions.retain(|_, v| v.expires > now);
            s.sessions.insert(
                session.id.clone(),
                Session {
                    revoked: false,
                    expires: now + session.ttl,
                    user_id: session.user_id.clone(),
                    tokens: HashMap::from([(session.refresh_hash.clone(), false)]),
                },
            );
        });
        Ok(())
    }

    async fn rotate_refresh(
        &self,
        session_id: &str,
        presented: &str,
        next: &str,
        ttl: Duration,
    ) -> StoreResult<Rotation> {
        Ok(self.with(|s| {
            let Some(session) = s
                .sessions
                .get_mut(session_id)
                .filter(|v| v.expires > Instant::now())
            else {
                return Rotation::Unknown;
            };
            let Some(spent) = session.tokens.get(presented).copied() else {
                return Rotation::Unknown;
            };
            if session.revoked {
                return Rotation::Revoked;
            }
            if spent {
                session.revoked = true;
                return Rotation::Reused;
            }
            session.tokens.insert(presented.to_owned(), true);
            session.tokens.insert(next.to_owned(), false);
            session.expires = Instant::now() + ttl;
            Rotation::Rotated(session.user_id.clone())
        }))
    }

    async fn revoke_session(&self, session_id: &str) -> StoreResult<()> {
        self.with(|s| {
            if let Some(session) = s.sessions.get_mut(session_id) {
                session.revoked = true;
            }
        });
        Ok(())
    }

    async fn hit(&self, keys: &[String], window: Duration) -> StoreResult<Vec<(u64, u64)>> {
        Ok(self.with(|s| {
            let now = Instant::now();
            s.counters.retain(|_, (_, until)| *until > now);
            keys.iter()
                .map(|k| {
                    let entry = s.counters.entry(k.clone()).or_insert((0, now + window));
                    entry.0 += 1;
                    (
                        entry.0,
                        entry.1.saturating_duration_since(now).as_millis() as u64,
                    )
                })
                .collect()
        }))
    }

    async fn release(&self, key: &str) -> StoreResult<()> {
        self.with(|s| {
            if let Some(entry) = s.counters.get_mut(key) {
                entry.0 = entry.0.saturating_sub(1);
            }
        });
        Ok(())
    }

    async fn forget(&self, key: &str) -> StoreResult<()> {
        self.with(|s| s.counters.remove(key));
        Ok(())
    }

    async fn put_key(&self, key: &PublicKey, until: u64) -> StoreResult<()> {
        self.with(|s| s.keys.insert(key.kid.clone(), (key.clone(), until)));
        Ok(())
    }

    async fn keys(&self, now: u64) -> StoreResult<Vec<PublicKey>> {
        Ok(self.with(|s| {
            s.keys.retain(|_, (_, until)| *until >= now);
            s.keys.values().map(|(k, _)| k.clone()).collect()
        }))
    }
}
