//! A `Watch`: the presence of some users (or of everyone with a role), first as a snapshot,
//! then every change, each exactly once and never older than what was already shown.
//!
//! The rules, as plain Rust over the store and the bus:
//! - subscribe first, then read the snapshot, so no change can fall between the two;
//! - every change carries its user's version; one that is not newer than the last shown
//!   for that user (a duplicate, or a late one overtaken by a fresher read) is dropped;
//! - when the bus says changes may have been missed ([`BusEvent::Gap`]), the watched users
//!   are read again and whatever is newer is shown; a role watch also picks up users who
//!   came online meanwhile.
//!
//! The gRPC adapter ([`crate::grpc`]) only forwards what [`Watcher::next`] returns.

use std::collections::HashMap;
use std::sync::Arc;

use futures::StreamExt;
use futures::stream::{BoxStream, SelectAll};
use switchboard_common::bus::{Bus, BusEvent};
use switchboard_proto::presence::v1 as pb;

use crate::error::{Error, Result};
use crate::model::Change;
use crate::store::{PresenceStore, role_channel, user_channel};

/// What is watched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// These users (1 to `MAX_IDS`, distinct).
    Users(Vec<String>),
    /// Everyone online with this role (a wire value).
    Role(i32),
}

impl Target {
    fn channels(&self) -> Vec<String> {
        match self {
            Target::Users(ids) => ids.iter().map(|id| user_channel(id)).collect(),
            Target::Role(role) => vec![role_channel(*role)],
        }
    }
}

/// The last version shown per user: the de-duplication rule.
#[derive(Debug, Default)]
pub struct Versions(HashMap<String, u64>);

impl Versions {
    /// Whether `version` of `user` is newer than anything shown; if so it is the latest now.
    pub fn fresh(&mut self, user: &str, version: u64) -> bool {
        let known = self.0.entry(user.to_owned()).or_insert(0);
        if version <= *known {
            return false;
        }
        *known = version;
        true
    }

    fn users(&self) -> impl Iterator<Item = &String> {
        self.0.keys()
    }
}

/// A change published on a presence channel, if the payload is one.
pub fn decode_change(payload: &[u8]) -> Option<(u64, pb::UserPresence)> {
    match prost::Message::decode(payload) {
        Ok(Change {
            version,
            presence: Some(p),
        }) => Some((version, p)),
        _ => None,
    }
}

/// One watch's state between the snapshot and the end.
pub struct Watcher<S> {
    store: Arc<S>,
    target: Target,
    versions: Versions,
    changes: SelectAll<BoxStream<'static, BusEvent>>,
}

impl<S: PresenceStore> Watcher<S> {
    /// Subscribes to `target`'s channels, then reads the snapshot (at `now_ms`).
    pub async fn open(
        store: Arc<S>,
        bus: &dyn Bus,
        target: Target,
        now_ms: u64,
    ) -> Result<(Self, Vec<pb::UserPresence>)> {
        let mut subscriptions = Vec::new();
        for channel in target.channels() {
            let sub = bus
                .subscribe(&channel)
                .await
                .map_err(|e| Error::Bus(e.to_string()))?;
            subscriptions.push(
                futures::stream::unfold(sub, |mut s| async move { s.recv().await.map(|e| (e, s)) })
                    .boxed(),
            );
        }
        let ids = match &target {
            Target::Role(role) => store.online(*role).await?,
            Target::Users(ids) => ids.clone(),
        };
        let snapshot = store.get(&ids, now_ms).await?;
        let mut versions = Versions::default();
        for (version, p) in &snapshot {
            versions.fresh(&p.user_id, *version);
        }
        let watcher = Self {
            store,
            target,
            versions,
            changes: futures::stream::select_all(subscriptions),
        };
        Ok((watcher, snapshot.into_iter().map(|(_, p)| p).collect()))
    }

    /// The next changes to show (possibly none, after a duplicate or an unreadable
    /// payload); `None` when the bus has shut down. `now_ms` is the time of a re-read.
    pub async fn next(&mut self, now_ms: u64) -> Option<Vec<pb::UserPresence>> {
        let updates = match self.changes.next().await? {
            BusEvent::Message(payload) => decode_change(&payload).into_iter().collect(),
            BusEvent::Gap => {
                let role = match self.target {
                    Target::Role(role) => Some(role),
                    Target::Users(_) => None,
                };
                let known = self.versions.users().cloned().collect();
                reread(self.store.clone(), role, known, now_ms).await
            }
        };
        Some(
            updates
                .into_iter()
                .filter(|(version, p)| self.versions.fresh(&p.user_id, *version))
                .map(|(_, p)| p)
                .collect(),
        )
    }
}

/// After a gap: the users shown so far (`known`), and with a role everyone of it online
/// now, as stored now; nothing if the store cannot say (the next change or gap tries
/// again).
async fn reread<S: PresenceStore>(
    store: Arc<S>,
    role: Option<i32>,
    mut known: Vec<String>,
    now_ms: u64,
) -> Vec<(u64, pb::UserPresence)> {
    if let Some(role) = role {
        match store.online(role).await {
            Ok(online) => {
                let seen: std::collections::HashSet<String> = known.iter().cloned().collect();
                known.extend(online.into_iter().filter(|id| !seen.contains(id)));
            }
            Err(_) => return Vec::new(),
        }
    }
    store.get(&known, now_ms).await.unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::session::{DeviceSession, Ending};
    use crate::store::memory::MemoryStore;
    use switchboard_common::bus::MemoryBus;

    const TTL: Duration = Duration::from_secs(30);
    const U1: &str = "0190d6a2-0000-7000-8000-0000000000b1";
    const U2: &str = "0190d6a2-0000-7000-8000-0000000000b2";

    fn state(p: &pb::UserPresence) -> i32 {
        p.state
    }

    async fn next_changes(w: &mut Watcher<MemoryStore>) -> Vec<pb::UserPresence> {
        tokio::time::timeout(Duration::from_secs(5), w.next(2_000_000))
            .await
            .expect("a change within 5 s")
            .expect("the bus is up")
    }

    #[test]
    fn only_newer_versions_are_shown() {
        let mut v = Versions::default();
        assert!(v.fresh("u", 1));
        assert!(!v.fresh("u", 1), "a duplicate");
        assert!(v.fresh("u", 3));
        assert!(!v.fresh("u", 2), "overtaken");
        assert!(v.fresh("w", 1), "per user");
        assert!(decode_change(b"\xff\xff").is_none());
    }

    #[tokio::test]
    async fn a_watch_shows_the_snapshot_then_each_change_once() {
        let bus = MemoryBus::new();
        let store = Arc::new(MemoryStore::new(bus.clone()));
        let (_u2, _) = DeviceSession::open(store.clone(), U2, 1, TTL, Duration::ZERO, 1_000_000)
            .await
            .expect("u2 online");
        let (mut w, snapshot) = Watcher::open(
            store.clone(),
            &bus,
            Target::Users(vec![U1.into(), U2.into()]),
            1_000_001,
        )
        .await
        .expect("watch");
        let online: Vec<&str> = snapshot
            .iter()
            .filter(|p| p.state != pb::PresenceState::Offline as i32)
            .map(|p| p.user_id.as_str())
            .collect();
        assert_eq!(online, [U2]);
        let (u1, _) = DeviceSession::open(store.clone(), U1, 1, TTL, Duration::ZERO, 1_000_002)
            .await
            .expect("u1 online");
        let changes = next_changes(&mut w).await;
        assert_eq!(changes.len(), 1);
        assert_eq!(
            (changes[0].user_id.as_str(), state(&changes[0])),
            (U1, pb::PresenceState::Available as i32)
        );
        u1.end(Ending::Goodbye, 1_000_003).await.expect("bye");
        let changes = next_changes(&mut w).await;
        assert_eq!(state(&changes[0]), pb::PresenceState::Offline as i32);
    }

    #[tokio::test]
    async fn a_role_watch_catches_up_after_a_gap_with_who_came_meanwhile() {
        let bus = MemoryBus::new();
        let store = Arc::new(MemoryStore::new(bus.clone()));
        let agent = 2; // the wire value of AGENT
        let (mut w, snapshot) = Watcher::open(store.clone(), &bus, Target::Role(agent), 1_000_000)
            .await
            .expect("watch");
        assert!(snapshot.is_empty());
        // Flood the watch's queue without reading it: the bus then reports a gap, and the
        // agent's change below is lost to it, so only the re-read can show the agent.
        for k in 0..(2 * switchboard_common::bus::SUBSCRIBER_QUEUE) as u64 {
            bus.publish_now(&role_channel(agent), vec![k as u8; 3]);
        }
        let (_a, _) = DeviceSession::open(store.clone(), U1, agent, TTL, Duration::ZERO, 1_000_001)
            .await
            .expect("agent online");
        // Whatever came first (garbage is skipped), the agent shows up exactly once.
        let mut seen = Vec::new();
        for _ in 0..10_000 {
            if seen.iter().any(|p: &pb::UserPresence| p.user_id == U1) {
                break;
            }
            seen.extend(next_changes(&mut w).await);
        }
        let shown: Vec<_> = seen.iter().filter(|p| p.user_id == U1).collect();
        assert_eq!(shown.len(), 1, "{seen:?}");
        assert_eq!(state(shown[0]), pb::PresenceState::Available as i32);
    }
}
