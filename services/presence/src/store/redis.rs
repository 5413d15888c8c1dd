//! The Redis engine.
//!
//! Keys: `sb:presence:{u:<id>}:sessions` (hash: session id → encoded session) and
//! `…:meta` (hash: version, last_seen, role) share the user's hash tag, so a user's
//! change is one script on one Redis Cluster slot. Two indexes live in slots of their own:
//! `sb:presence:expiry`, a sorted set of `<user>|<session>` by expiry (the sweep reads it),
//! and `sb:presence:online:<role>` sets of users with live sessions (role watches read
//! them). They are written in separate steps, ordered so that a crash between two steps
//! leaves only what is repaired:
//! - a session is indexed for expiry *before* it is stored, and unindexed after it is
//!   dropped, so every stored session is swept in time (an index entry without a session
//!   is dropped by the sweep as a no-op);
//! - a user joins the role set before the session is stored and leaves it after the last
//!   one is dropped. A drop racing a new session elsewhere can take the user out while it
//!   is online; every refresh of a live session (each [`touch`](PresenceStore::touch))
//!   adds it back, and a read of the set leaves out (and removes) users without sessions.

use switchboard_common::redis_conn::{Batch, RedisConn};
use switchboard_proto::presence::v1 as pb;

use super::{Live, PresenceStore, StoreError, StoreResult, role_channel, user_channel};
use crate::model::{Change, Session, aggregate};

const EXPIRY: &str = "sb:presence:expiry";

/// Adds or updates a session (the user's keys only). KEYS: sessions, meta.
/// ARGV: session id, encoded session, role.
const PUT: &str = r#"
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], 'role', ARGV[3])
local v = redis.call('HINCRBY', KEYS[2], 'version', 1)
return {v, redis.call('HGET', KEYS[2], 'last_seen') or '', redis.call('HVALS', KEYS[1]), ARGV[3]}
"#;

/// Removes a session if present (the user's keys only); the last one sets last seen.
/// KEYS: sessions, meta. ARGV: session id, now.
const DROP: &str = r#"
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return {0, '', {}, '0'} end
local v = redis.call('HINCRBY', KEYS[2], 'version', 1)
if redis.call('HLEN', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[2], 'last_seen', ARGV[2])
end
return {v, redis.call('HGET', KEYS[2], 'last_seen') or '', redis.call('HVALS', KEYS[1]),
  redis.call('HGET', KEYS[2], 'role') or '0'}
"#;

fn online_key(role: i32) -> String {
    format!("sb:presence:online:{role}")
}

/// Presence in Redis.
#[derive(Clone)]
pub struct RedisStore {
    conn: RedisConn,
    put: redis::Script,
    drop: redis::Script,
}

impl RedisStore {
    /// A store on `conn`.
    pub fn new(conn: RedisConn) -> Self {
        Self {
            conn,
            put: redis::Script::new(PUT),
            drop: redis::Script::new(DROP),
        }
    }

    async fn publish(
        &self,
        user_id: &str,
        version: u64,
        presence: &pb::UserPresence,
    ) -> StoreResult<()> {
        let change = prost::Message::encode_to_vec(&Change {
            version,
            presence: Some(presence.clone()),
        });
        let mut batch = Batch::new();
        for channel in [user_channel(user_id), role_channel(presence.role)] {
            let mut publish = redis::cmd(self.conn.publish_command());
            publish.arg(&channel).arg(&change);
            batch.add(&channel, publish);
        }
        batch.run(&self.conn).await?;
        Ok(())
    }
}

fn sessions_key(user: &str) -> String {
    format!("sb:presence:{{u:{user}}}:sessions")
}
fn meta_key(user: &str) -> String {
    format!("sb:presence:{{u:{user}}}:meta")
}
fn member(user: &str, session: &str) -> String {
    format!("{user}|{session}")
}

fn decode_sessions(raw: Vec<Vec<u8>>) -> StoreResult<Vec<Session>> {
    raw.iter()
        .map(|b| {
            prost::Message::decode(b.as_slice()).map_err(|e| StoreError::Corrupt(e.to_string()))
        })
        .collect()
}

/// The scripts' reply: version, last seen ('' if never), encoded sessions, role.
type Reply = (u64, String, Vec<Vec<u8>>, i32);

fn presence_of(user_id: &str, reply: Reply, now_ms: u64) -> StoreResult<(u64, pb::UserPresence)> {
    let (version, last_seen, raw, role) = reply;
    let sessions = decode_sessions(raw)?;
    Ok((
        version,
        aggregate(user_id, &sessions, last_seen.parse().ok(), role, now_ms),
    ))
}

impl PresenceStore for RedisStore {
    async fn put_session(
        &self,
        user_id: &str,
        session: &Session,
        expires_at_ms: u64,
        now_ms: u64,
    ) -> StoreResult<pb::UserPresence> {
        // The indexes first (see the module docs), in one round trip.
        let mut batch = Batch::new();
        let mut expiry = redis::cmd("ZADD");
        expiry
            .arg(EXPIRY)
            .arg(expires_at_ms)
            .arg(member(user_id, &session.session_id));
        batch.add(EXPIRY, expiry);
        let online = online_key(session.role);
        let mut join = redis::cmd("SADD");
        join.arg(&online).arg(user_id);
        batch.add(&online, join);
        batch.run(&self.conn).await?;
        let mut conn = self.conn.clone();
        let reply: Reply = self
            .put
            .key(sessions_key(user_id))
            .key(meta_key(user_id))
            .arg(&session.session_id)
            .arg(prost::Message::encode_to_vec(session))
            .arg(session.role)
            .invoke_async(&mut conn)
            .await?;
        let (version, presence) = presence_of(user_id, reply, now_ms)?;
        self.publish(user_id, version, &presence).await?;
        Ok(presence)
    }

    /// Also puts each user back in its role set, which repairs a racing drop's removal.
    async fn touch(&self, sessions: &[Live], expires_at_ms: u64) -> StoreResult<()> {
        let mut batch = Batch::new();
        for live in sessions {
            // XX: never resurrect a session another instance already swept.
            let mut expiry = redis::cmd("ZADD");
            expiry
                .arg(EXPIRY)
                .arg("XX")
                .arg(expires_at_ms)
                .arg(member(&live.user_id, &live.session_id));
            batch.add(EXPIRY, expiry);
            let online = online_key(live.role);
            let mut join = redis::cmd("SADD");
            join.arg(&online).arg(&live.user_id);
            batch.add(&online, join);
        }
        batch.run(&self.conn).await?;
        Ok(())
    }

    async fn drop_session(
        &self,
        user_id: &str,
        session_id: &str,
        now_ms: u64,
    ) -> StoreResult<Option<pb::UserPresence>> {
        let mut conn = self.conn.clone();
        let reply: Reply = self
            .drop
            .key(sessions_key(user_id))
            .key(meta_key(user_id))
            .arg(session_id)
            .arg(now_ms)
            .invoke_async(&mut conn)
            .await?;
        // Then the indexes (see the module docs).
        let mut batch = Batch::new();
        let mut unexpire = redis::cmd("ZREM");
        unexpire.arg(EXPIRY).arg(member(user_id, session_id));
        batch.add(EXPIRY, unexpire);
        if reply.0 != 0 && reply.2.is_empty() {
            let online = online_key(reply.3);
            let mut leave = redis::cmd("SREM");
            leave.arg(&online).arg(user_id);
            batch.add(&online, leave);
        }
        batch.run(&self.conn).await?;
        if reply.0 == 0 {
            return Ok(None);
        }
        let (version, presence) = presence_of(user_id, reply, now_ms)?;
        self.publish(user_id, version, &presence).await?;
        Ok(Some(presence))
    }

    async fn get(
        &self,
        user_ids: &[String],
        now_ms: u64,
    ) -> StoreResult<Vec<(u64, pb::UserPresence)>> {
        if user_ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut batch = Batch::new();
        for id in user_ids {
            let sessions = sessions_key(id);
            let mut all = redis::cmd("HVALS");
            all.arg(&sessions);
            batch.add(&sessions, all);
            let meta = meta_key(id);
            let mut fields = redis::cmd("HMGET");
            fields
                .arg(&meta)
                .arg("version")
                .arg("last_seen")
                .arg("role");
            batch.add(&meta, fields);
        }
        let rows: Vec<redis::Value> = batch.run(&self.conn).await?;
        let mut out = Vec::with_capacity(user_ids.len());
        for (id, pair) in user_ids.iter().zip(rows.chunks(2)) {
            let raw: Vec<Vec<u8>> = redis::from_redis_value(pair[0].clone())
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let (version, last_seen, role): (Option<u64>, Option<u64>, Option<i32>) =
                redis::from_redis_value(pair[1].clone())
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            out.push((
                version.unwrap_or(0),
                aggregate(
                    id,
                    &decode_sessions(raw)?,
                    last_seen,
                    role.unwrap_or(0),
                    now_ms,
                ),
            ));
        }
        Ok(out)
    }

    async fn sweep(&self, now_ms: u64, limit: usize) -> StoreResult<usize> {
        let mut conn = self.conn.clone();
        let expired: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(EXPIRY)
            .arg("-inf")
            .arg(format!("({now_ms}"))
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut conn)
            .await?;
        let mut removed = 0;
        for m in expired {
            let Some((user, session)) = m.split_once('|') else {
                continue;
            };
            if self.drop_session(user, session, now_ms).await?.is_some() {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// The role set, less (and without, from now on) users who have no session left.
    async fn online(&self, role: i32) -> StoreResult<Vec<String>> {
        let mut conn = self.conn.clone();
        let online = online_key(role);
        let listed: Vec<String> = redis::cmd("SMEMBERS")
            .arg(&online)
            .query_async(&mut conn)
            .await?;
        let mut batch = Batch::new();
        for id in &listed {
            let sessions = sessions_key(id);
            let mut count = redis::cmd("HLEN");
            count.arg(&sessions);
            batch.add(&sessions, count);
        }
        let counts: Vec<u64> = batch.run_as(&self.conn).await?;
        let mut ids = Vec::with_capacity(listed.len());
        let mut stale = Vec::new();
        for (id, sessions) in listed.into_iter().zip(counts) {
            if sessions > 0 {
                ids.push(id);
            } else {
                stale.push(id);
            }
        }
        if !stale.is_empty() {
            let _: i64 = redis::cmd("SREM")
                .arg(&online)
                .arg(&stale)
                .query_async(&mut conn)
                .await?;
        }
        ids.sort();
        Ok(ids)
    }
}
