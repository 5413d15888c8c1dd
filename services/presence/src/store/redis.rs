//! The Redis engine.
//!
//! Keys: `sb:presence:{u:<id>}:sessions` (hash: session id → encoded session) and
//! `…:meta` (hash: version, last_seen, role) share the user's hash tag; `sb:presence:expiry`
//! is a sorted set of `<user>|<session>` by expiry (the sweep reads it); and
//! `sb:presence:online:<role>` sets hold users with live sessions.

use switchboard_common::redis_conn::RedisConn;
use switchboard_proto::presence::v1 as pb;

use super::{PresenceStore, StoreError, StoreResult, role_channel, user_channel};
use crate::model::{Change, Session, aggregate};

const EXPIRY: &str = "sb:presence:expiry";

/// Adds or updates a session. KEYS: sessions, meta, expiry, online.
/// ARGV: session id, encoded session, expires at, expiry member, user id, role.
const PUT: &str = r#"
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4])
redis.call('SADD', KEYS[4], ARGV[5])
redis.call('HSET', KEYS[2], 'role', ARGV[6])
local v = redis.call('HINCRBY', KEYS[2], 'version', 1)
return {v, redis.call('HGET', KEYS[2], 'last_seen') or '', redis.call('HVALS', KEYS[1]), ARGV[6]}
"#;

/// Removes a session if present. KEYS: sessions, meta, expiry.
/// ARGV: session id, expiry member, user id, now.
const DROP: &str = r#"
redis.call('ZREM', KEYS[3], ARGV[2])
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return {0, '', {}, '0'} end
local v = redis.call('HINCRBY', KEYS[2], 'version', 1)
if redis.call('HLEN', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[2], 'last_seen', ARGV[4])
  local role = redis.call('HGET', KEYS[2], 'role')
  if role then redis.call('SREM', 'sb:presence:online:' .. role, ARGV[3]) end
end
return {v, redis.call('HGET', KEYS[2], 'last_seen') or '', redis.call('HVALS', KEYS[1]),
  redis.call('HGET', KEYS[2], 'role') or '0'}
"#;

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
        let mut conn = self.conn.clone();
        let change = prost::Message::encode_to_vec(&Change {
            version,
            presence: Some(presence.clone()),
        });
        let publish = self.conn.publish_command();
        redis::pipe()
            .cmd(publish)
            .arg(user_channel(user_id))
            .arg(&change)
            .ignore()
            .cmd(publish)
            .arg(role_channel(presence.role))
            .arg(&change)
            .ignore()
            .query_async::<()>(&mut conn)
            .await?;
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
        let mut conn = self.conn.clone();
        let reply: Reply = self
            .put
            .key(sessions_key(user_id))
            .key(meta_key(user_id))
            .key(EXPIRY)
            .key(format!("sb:presence:online:{}", session.role))
            .arg(&session.session_id)
            .arg(prost::Message::encode_to_vec(session))
            .arg(expires_at_ms)
            .arg(member(user_id, &session.session_id))
            .arg(user_id)
            .arg(session.role)
            .invoke_async(&mut conn)
            .await?;
        let (version, presence) = presence_of(user_id, reply, now_ms)?;
        self.publish(user_id, version, &presence).await?;
        Ok(presence)
    }

    async fn touch(&self, sessions: &[(String, String)], expires_at_ms: u64) -> StoreResult<()> {
        if sessions.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        for (user, session) in sessions {
            // XX: never resurrect a session another instance already swept.
            pipe.cmd("ZADD")
                .arg(EXPIRY)
                .arg("XX")
                .arg(expires_at_ms)
                .arg(member(user, session))
                .ignore();
        }
        pipe.query_async::<()>(&mut conn).await?;
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
            .key(EXPIRY)
            .arg(session_id)
            .arg(member(user_id, session_id))
            .arg(user_id)
            .arg(now_ms)
            .invoke_async(&mut conn)
            .await?;
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
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        for id in user_ids {
            pipe.hvals(sessions_key(id));
            pipe.cmd("HMGET")
                .arg(meta_key(id))
                .arg("version")
                .arg("last_seen")
                .arg("role");
        }
        let rows: Vec<redis::Value> = pipe.query_async(&mut conn).await?;
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

    async fn online(&self, role: i32) -> StoreResult<Vec<String>> {
        let mut conn = self.conn.clone();
        let mut ids: Vec<String> = redis::cmd("SMEMBERS")
            .arg(format!("sb:presence:online:{role}"))
            .query_async(&mut conn)
            .await?;
        ids.sort();
        Ok(ids)
    }
}
