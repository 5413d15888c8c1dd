//! The in-memory engine: one process's presence, for `make run` and unit tests.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use switchboard_common::bus::MemoryBus;
use switchboard_proto::presence::v1 as pb;

use super::{Live, PresenceStore, StoreResult, role_channel, user_channel};
use crate::model::{Change, Session, aggregate};

#[derive(Default)]
struct User {
    sessions: HashMap<String, Session>,
    version: u64,
    last_seen_ms: Option<u64>,
    role: i32,
}

#[derive(Default)]
struct State {
    users: HashMap<String, User>,
    /// (expires at, user, session).
    expiries: BTreeSet<(u64, String, String)>,
    expiry_of: HashMap<(String, String), u64>,
}

/// Presence of this process.
pub struct MemoryStore {
    state: Mutex<State>,
    bus: MemoryBus,
}

impl MemoryStore {
    /// A store publishing on `bus`.
    pub fn new(bus: MemoryBus) -> Self {
        Self {
            state: Mutex::default(),
            bus,
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        // Each operation is a few map updates that cannot panic half-way.
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut state)
    }

    fn publish(&self, user_id: &str, version: u64, presence: &pb::UserPresence) {
        let change = prost::Message::encode_to_vec(&Change {
            version,
            presence: Some(presence.clone()),
        });
        self.bus.publish_now(&user_channel(user_id), change.clone());
        self.bus.publish_now(&role_channel(presence.role), change);
    }
}

fn set_expiry(state: &mut State, user: &str, session: &str, at: u64) {
    let key = (user.to_owned(), session.to_owned());
    if let Some(old) = state.expiry_of.insert(key, at) {
        state
            .expiries
            .remove(&(old, user.to_owned(), session.to_owned()));
    }
    state
        .expiries
        .insert((at, user.to_owned(), session.to_owned()));
}

fn remove(
    state: &mut State,
    user_id: &str,
    session_id: &str,
    now_ms: u64,
) -> Option<(u64, pb::UserPresence)> {
    if let Some(at) = state
        .expiry_of
        .remove(&(user_id.to_owned(), session_id.to_owned()))
    {
        state
            .expiries
            .remove(&(at, user_id.to_owned(), session_id.to_owned()));
    }
    let user = state.users.get_mut(user_id)?;
    user.sessions.remove(session_id)?;
    user.version += 1;
    if user.sessions.is_empty() {
        user.last_seen_ms = Some(now_ms);
    }
    let sessions: Vec<Session> = user.sessions.values().cloned().collect();
    Some((
        user.version,
        aggregate(user_id, &sessions, user.last_seen_ms, user.role, now_ms),
    ))
}

impl PresenceStore for MemoryStore {
    async fn put_session(
        &self,
        user_id: &str,
        session: &Session,
        expires_at_ms: u64,
        now_ms: u64,
    ) -> StoreResult<pb::UserPresence> {
        let (version, presence) = self.with(|s| {
            set_expiry(s, user_id, &session.session_id, expires_at_ms);
            let user = s.users.entry(user_id.to_owned()).or_default();
            user.role = session.role;
            user.sessions
                .insert(session.session_id.clone(), session.clone());
            user.version += 1;
            let sessions: Vec<Session> = user.sessions.values().cloned().collect();
            (
                user.version,
                aggregate(user_id, &sessions, user.last_seen_ms, user.role, now_ms),
            )
        });
        self.publish(user_id, version, &presence);
        Ok(presence)
    }

    async fn touch(&self, sessions: &[Live], expires_at_ms: u64) -> StoreResult<()> {
        self.with(|s| {
            for live in sessions {
                let key = (live.user_id.clone(), live.session_id.clone());
                if s.expiry_of.contains_key(&key) {
                    set_expiry(s, &live.user_id, &live.session_id, expires_at_ms);
                }
            }
        });
        Ok(())
    }

    async fn drop_session(
        &self,
        user_id: &str,
        session_id: &str,
        now_ms: u64,
    ) -> StoreResult<Option<pb::UserPresence>> {
        let changed = self.with(|s| remove(s, user_id, session_id, now_ms));
        Ok(changed.map(|(version, presence)| {
            self.publish(user_id, version, &presence);
            presence
        }))
    }

    async fn get(
        &self,
        user_ids: &[String],
        now_ms: u64,
    ) -> StoreResult<Vec<(u64, pb::UserPresence)>> {
        Ok(self.with(|s| {
            user_ids
                .iter()
                .map(|id| match s.users.get(id) {
                    Some(u) => {
                        let sessions: Vec<Session> = u.sessions.values().cloned().collect();
                        (
                            u.version,
                            aggregate(id, &sessions, u.last_seen_ms, u.role, now_ms),
                        )
                    }
                    None => (0, aggregate(id, &[], None, 0, now_ms)),
                })
                .collect()
        }))
    }

    async fn sweep(&self, now_ms: u64, limit: usize) -> StoreResult<usize> {
        let expired: Vec<(u64, String, String)> = self.with(|s| {
            s.expiries
                .iter()
                .take_while(|(at, _, _)| *at < now_ms)
                .take(limit)
                .cloned()
                .collect()
        });
        let mut removed = 0;
        for (_, user, session) in expired {
            if self.drop_session(&user, &session, now_ms).await?.is_some() {
                removed += 1;
            }
        }
        Ok(removed)
    }

    async fn online(&self, role: i32) -> StoreResult<Vec<String>> {
        Ok(self.with(|s| {
            let mut ids: Vec<String> = s
                .users
                .iter()
                .filter(|(_, u)| {
                    !u.sessions.is_empty() && u.sessions.values().any(|x| x.role == role)
                })
                .map(|(id, _)| id.clone())
                .collect();
            ids.sort();
            ids
        }))
    }
}
