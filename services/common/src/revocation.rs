//! Session revocations: how a logout reaches every instance of every service.
//!
//! Auth records a revoked session id with the time until which its access tokens could
//! still be presented (their expiry), in durable storage (a Redis sorted set scored by
//! that time), and publishes it on [`CHANNEL`]. Every process keeps a [`RevocationList`]
//! fed by [`follow`]: it subscribes, then loads the durable set, and loads it again after
//! every [`BusEvent::Gap`] (a Redis reconnect), so a revocation published while an
//! instance was disconnected is not missed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::bus::{BoxFuture, Bus, BusEvent, MemoryBus};

/// Pub/sub channel of revocations; payload is `<session id> <until>`.
pub const CHANNEL: &str = "sb:auth:revocations";
/// The channel on a Redis Cluster: hash-tagged by [`KEY`]'s whole name, so it is in the
/// key's slot and the durable write and the (sharded) publish stay one transaction.
pub const CLUSTER_CHANNEL: &str = "{sb:auth:revoked}:events";
/// Sorted set of revoked session ids scored by the time their tokens stop mattering.
pub const KEY: &str = "sb:auth:revoked";

/// The channel revocations go on, over a bus that is sharded (a cluster) or not.
pub fn channel(sharded: bool) -> &'static str {
    if sharded { CLUSTER_CHANNEL } else { CHANNEL }
}

/// Storage failures.
#[derive(Debug, thiserror::Error)]
#[error("revocation store unavailable: {0}")]
pub struct StoreUnavailable(pub String);

/// Durable revocations.
pub trait RevocationStore: Send + Sync + 'static {
    /// Records that `session_id` is revoked until `until` (Unix seconds) and tells every instance.
    fn revoke<'a>(
        &'a self,
        session_id: &'a str,
        until: u64,
    ) -> BoxFuture<'a, Result<(), StoreUnavailable>>;
    /// Every revocation still in force at `now`.
    fn active(&self, now: u64) -> BoxFuture<'_, Result<Vec<(String, u64)>, StoreUnavailable>>;
}

/// Revocations in Redis.
#[derive(Clone)]
pub struct RedisRevocations {
    conn: crate::redis_conn::RedisConn,
}

impl RedisRevocations {
    /// Revocations stored through `conn`.
    pub fn new(conn: crate::redis_conn::RedisConn) -> Self {
        Self { conn }
    }
}

fn unavailable(e: redis::RedisError) -> StoreUnavailable {
    crate::metrics::redis_error();
    StoreUnavailable(e.to_string())
}

impl RevocationStore for RedisRevocations {
    fn revoke<'a>(
        &'a self,
        session_id: &'a str,
        until: u64,
    ) -> BoxFuture<'a, Result<(), StoreUnavailable>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            // Durable first, then published: an instance that misses the publish finds it
            // in the set when it reloads.
            redis::pipe()
                .atomic()
                .zadd(KEY, session_id, until)
                .ignore()
                .cmd("ZREMRANGEBYSCORE")
                .arg(KEY)
                .arg("-inf")
                .arg(format!("({}", crate::clock::now_secs()))
                .ignore()
                .cmd(self.conn.publish_command())
                .arg(channel(self.conn.is_cluster()))
                .arg(format!("{session_id} {until}"))
                .ignore()
                .query_async::<()>(&mut conn)
                .await
                .map_err(unavailable)
        })
    }

    fn active(&self, now: u64) -> BoxFuture<'_, Result<Vec<(String, u64)>, StoreUnavailable>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let rows: Vec<(String, f64)> = redis::cmd("ZRANGEBYSCORE")
                .arg(KEY)
                .arg(now)
                .arg("+inf")
                .arg("WITHSCORES")
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            Ok(rows
                .into_iter()
                .map(|(sid, until)| (sid, until as u64))
                .collect())
        })
    }
}

/// Revocations of the embedded engine (one process).
#[derive(Clone)]
pub struct MemoryRevocations {
    entries: Arc<Mutex<HashMap<String, u64>>>,
    bus: MemoryBus,
}

impl MemoryRevocations {
    /// Revocations announced on `bus`.
    pub fn new(bus: MemoryBus) -> Self {
        Self {
            entries: Arc::default(),
            bus,
        }
    }
}

impl RevocationStore for MemoryRevocations {
    fn revoke<'a>(
        &'a self,
        session_id: &'a str,
        until: u64,
    ) -> BoxFuture<'a, Result<(), StoreUnavailable>> {
        Box::pin(async move {
            {
                let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
                let now = crate::clock::now_secs();
                entries.retain(|_, u| *u >= now);
                entries.insert(session_id.to_owned(), until);
            }
            let _ = self
                .bus
                .publish(CHANNEL, format!("{session_id} {until}").into_bytes())
                .await;
            Ok(())
        })
    }

    fn active(&self, now: u64) -> BoxFuture<'_, Result<Vec<(String, u64)>, StoreUnavailable>> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let rows = entries
            .iter()
            .filter(|(_, u)| **u >= now)
            .map(|(s, u)| (s.clone(), *u))
            .collect();
        Box::pin(async move { Ok(rows) })
    }
}

/// The revoked sessions this process knows of, with a feed for ending live streams.
pub struct RevocationList {
    entries: RwLock<HashMap<String, u64>>,
    feed: broadcast::Sender<String>,
}

impl Default for RevocationList {
    fn default() -> Self {
        Self {
            entries: RwLock::default(),
            feed: broadcast::channel(1024).0,
        }
    }
}

impl RevocationList {
    /// Whether `session_id` is revoked at `now`.
    pub fn is_revoked(&self, session_id: &str, now: u64) -> bool {
        self.entries
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(session_id)
            .is_some_and(|u| *u >= now)
    }

    /// Adds a revocation (and forgets the expired ones).
    pub fn insert(&self, session_id: &str, until: u64) {
        let now = crate::clock::now_secs();
        let fresh = {
            let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
            if entries.len() > 1024 {
                entries.retain(|_, u| *u >= now);
            }
            entries.insert(session_id.to_owned(), until).is_none()
        };
        if fresh {
            let _ = self.feed.send(session_id.to_owned());
        }
    }

    /// Session ids as they are revoked, for ending streams of logged-out sessions.
    pub fn watch(&self) -> broadcast::Receiver<String> {
        self.feed.subscribe()
    }

    /// Number of revocations held.
    pub fn len(&self) -> usize {
        self.entries.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// True when none are held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Keeps `list` up to date from `bus` and `store` until `shutdown`.
///
/// Returns once the first snapshot is loaded (so a freshly started instance never accepts
/// an already revoked session) and continues in the background.
pub async fn follow(
    list: Arc<RevocationList>,
    bus: Arc<dyn Bus>,
    store: Arc<dyn RevocationStore>,
    shutdown: CancellationToken,
) {
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
    crate::shutdown::spawn(async move {
        let mut ready = Some(ready_tx);
        let mut backoff = Duration::from_millis(100);
        while !shutdown.is_cancelled() {
            let mut sub = match bus.subscribe(channel(bus.sharded())).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot subscribe to revocations; retrying");
                    tokio::select! { _ = shutdown.cancelled() => return, _ = tokio::time::sleep(backoff) => {} }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            let mut need_snapshot = true;
            loop {
                if need_snapshot {
                    match store.active(crate::clock::now_secs()).await {
                        Ok(rows) => {
                            for (sid, until) in rows {
                                list.insert(&sid, until);
                            }
                            need_snapshot = false;
                            backoff = Duration::from_millis(100);
                            if let Some(tx) = ready.take() {
                                let _ = tx.send(());
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot load revocations; retrying");
                            tokio::select! { _ = shutdown.cancelled() => return, _ = tokio::time::sleep(backoff) => {} }
                            backoff = (backoff * 2).min(Duration::from_secs(2));
                            continue;
                        }
                    }
                }
                let event = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    e = sub.recv() => e,
                };
                match event {
                    Some(BusEvent::Message(payload)) => match parse(&payload) {
                        Some((sid, until)) => list.insert(sid, until),
                        None => tracing::warn!("ignoring malformed revocation message"),
                    },
                    Some(BusEvent::Gap) => need_snapshot = true,
                    None => break,
                }
            }
        }
    });
    // If the store never answers we still start; the background task keeps trying.
    let _ = tokio::time::timeout(Duration::from_secs(5), ready_rx).await;
}

fn parse(payload: &[u8]) -> Option<(&str, u64)> {
    let text = std::str::from_utf8(payload).ok()?;
    let (sid, until) = text.split_once(' ')?;
    Some((sid, until.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_revocations_reach_a_follower() {
        let bus = MemoryBus::new();
        let store = MemoryRevocations::new(bus.clone());
        store
            .revoke("before", crate::clock::now_secs() + 60)
            .await
            .expect("revoke");
        let list = Arc::new(RevocationList::default());
        let shutdown = CancellationToken::new();
        follow(
            list.clone(),
            Arc::new(bus),
            Arc::new(store.clone()),
            shutdown.clone(),
        )
        .await;
        assert!(
            list.is_revoked("before", crate::clock::now_secs()),
            "snapshot loaded"
        );
        let mut feed = list.watch();
        store
            .revoke("after", crate::clock::now_secs() + 60)
            .await
            .expect("revoke");
        assert_eq!(feed.recv().await.expect("feed"), "after");
        assert!(list.is_revoked("after", crate::clock::now_secs()));
        assert!(!list.is_revoked("other", crate::clock::now_secs()));
        shutdown.cancel();
    }
}
