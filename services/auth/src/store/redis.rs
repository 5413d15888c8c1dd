//! The Redis engine.
//!
//! Keys (all under `sb:auth:`):
//! - `user:<id>` hash of the account; `username:<name>` → id.
//! - `{<sid>}:session` hash (`user_id`, `revoked`), `{<sid>}:rt:<hash>` → `c` (current) or
//!   `r` (spent). A session's keys share the hash tag `{<sid>}`, so the rotation script
//!   touches one Redis Cluster slot. All expire with the session.
//! - `fail:<key>` failed-login counters; `keys` hash of published public keys.

use std::time::Duration;

use redis::AsyncCommands;
use switchboard_common::redis_conn::{Batch, RedisConn};
use switchboard_common::token::{PublicKey, Role};

use super::{AuthStore, NewSession, Rotation, StoreResult, Upgrade};
use crate::account::UserRecord;
use crate::error::StoreError;

const PREFIX: &str = "sb:auth:";

/// Spends a refresh token and makes the next one current, or detects re-use.
/// KEYS: session, presented token, next token. ARGV: ttl seconds.
const ROTATE: &str = r#"
local revoked = redis.call('HGET', KEYS[1], 'revoked')
if not revoked then return {'unknown'} end
local state = redis.call('GET', KEYS[2])
if not state then return {'unknown'} end
if revoked ~= '0' then return {'revoked'} end
if state == 'r' then
  redis.call('HSET', KEYS[1], 'revoked', '1')
  return {'reused'}
end
local ttl = tonumber(ARGV[1])
redis.call('SET', KEYS[2], 'r', 'EX', ttl)
redis.call('SET', KEYS[3], 'c', 'EX', ttl)
redis.call('EXPIRE', KEYS[1], ttl)
return {'rotated', redis.call('HGET', KEYS[1], 'user_id')}
"#;

/// Counts one attempt against a counter, which expires `window` after its first attempt.
/// KEYS: the counter. ARGV: window seconds. Returns the count and the milliseconds left.
const HIT: &str = r#"
local n = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[1], 'NX')
return {n, redis.call('PTTL', KEYS[1])}
"#;

/// Auth state in Redis.
#[derive(Clone)]
pub struct RedisStore {
    conn: RedisConn,
    rotate: redis::Script,
}

impl RedisStore {
    /// A store using `conn`.
    pub fn new(conn: RedisConn) -> Self {
        Self {
            conn,
            rotate: redis::Script::new(ROTATE),
        }
    }
}

fn user_key(id: &str) -> String {
    format!("{PREFIX}user:{id}")
}
fn name_key(name: &str) -> String {
    format!("{PREFIX}username:{name}")
}
fn session_key(sid: &str) -> String {
    format!("{PREFIX}{{{sid}}}:session")
}
fn token_key(sid: &str, hash: &str) -> String {
    format!("{PREFIX}{{{sid}}}:rt:{hash}")
}
fn counter_key(key: &str) -> String {
    format!("{PREFIX}fail:{key}")
}
const KEYS_KEY: &str = "sb:auth:keys";

fn parse_user(
    id: &str,
    fields: std::collections::HashMap<String, String>,
) -> StoreResult<Option<UserRecord>> {
    if fields.is_empty() {
        return Ok(None);
    }
    let get = |f: &str| {
        fields
            .get(f)
            .cloned()
            .ok_or_else(|| StoreError::Corrupt(format!("user {id} lacks {f}")))
    };
    let role = get("role")?;
    Ok(Some(UserRecord {
        id: id.to_owned(),
        username: get("username")?,
        display_name: get("display_name")?,
        role: Role::parse(&role)
            .ok_or_else(|| StoreError::Corrupt(format!("user {id} has role {role}")))?,
        password_hash: get("password_hash")?,
        created_at_ms: get("created_at_ms")?
            .parse()
            .map_err(|_| StoreError::Corrupt(format!("user {id} created_at")))?,
    }))
}

impl AuthStore for RedisStore {
    async fn create_user(&self, user: &UserRecord) -> StoreResult<bool> {
        let mut conn = self.conn.clone();
        // The username is claimed first; a crash before the hash is written leaves a
        // claimed name with no user, which reads as "no such user" and is never reused.
        let claimed: bool = redis::cmd("SET")
            .arg(name_key(&user.username))
            .arg(&user.id)
            .arg("NX")
            .query_async::<Option<String>>(&mut conn)
            .await?
            .is_some();
        if !claimed {
            return Ok(false);
        }
        let _: () = conn
            .hset_multiple(
                user_key(&user.id),
                &[
                    ("username", user.username.as_str()),
                    ("display_name", user.display_name.as_str()),
                    ("role", user.role.as_str()),
                    ("password_hash", user.password_hash.as_str()),
                    ("created_at_ms", &user.created_at_ms.to_string()),
                ],
            )
            .await?;
        Ok(true)
    }

    async fn user_by_name(&self, username: &str) -> StoreResult<Option<UserRecord>> {
        let mut conn = self.conn.clone();
        let id: Option<String> = conn.get(name_key(username)).await?;
        match id {
            None => Ok(None),
            Some(id) => {
                let fields = conn.hgetall(user_key(&id)).await?;
                parse_user(&id, fields)
            }
        }
    }

    async fn users_by_name(&self, usernames: &[String]) -> StoreResult<Vec<Option<UserRecord>>> {
        if usernames.is_empty() {
            return Ok(Vec::new());
        }
        // Two round trips whatever the count: the ids, then their records (on a cluster,
        // each round one pipeline per slot, at once).
        let mut batch = Batch::new();
        for name in usernames {
            let key = name_key(name);
            let mut get = redis::cmd("GET");
            get.arg(&key);
            batch.add(&key, get);
        }
        let ids: Vec<Option<String>> = batch.run_as(&self.conn).await?;
        let known: Vec<String> = ids.iter().flatten().cloned().collect();
        let mut users = self.users_by_id(&known).await?.into_iter();
        Ok(ids
            .iter()
            .map(|id| id.as_ref().and_then(|_| users.next().flatten()))
            .collect())
    }

    async fn users_by_id(&self, ids: &[String]) -> StoreResult<Vec<Option<UserRecord>>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut batch = Batch::new();
        for id in ids {
            let key = user_key(id);
            let mut get = redis::cmd("HGETALL");
            get.arg(&key);
            batch.add(&key, get);
        }
        let rows: Vec<std::collections::HashMap<String, String>> = batch.run_as(&self.conn).await?;
        ids.iter()
            .zip(rows)
            .map(|(id, fields)| parse_user(id, fields))
            .collect()
    }

    async fn set_role(&self, id: &str, role: Role) -> StoreResult<Option<UserRecord>> {
        let mut conn = self.conn.clone();
        // HSET only if the user exists, so an unknown id does not create a stub record.
        let updated: i64 = redis::Script::new(
            "if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'role', ARGV[1]) return 1 end return 0",
        )
        .key(user_key(id))
        .arg(role.as_str())
        .invoke_async(&mut conn)
        .await?;
        if updated == 0 {
            return Ok(None);
        }
        let fields = conn.hgetall(user_key(id)).await?;
        parse_user(id, fields)
    }

    async fn upgrade_guest(&self, account: &UserRecord, guest_name: &str) -> StoreResult<Upgrade> {
        let mut conn = self.conn.clone();
        // The name first, as in create_user (a name and its user live in different slots
        // on a cluster); given back if the user turns out not to be a guest.
        let claimed = redis::cmd("SET")
            .arg(name_key(&account.username))
            .arg(&account.id)
            .arg("NX")
            .query_async::<Option<String>>(&mut conn)
            .await?
            .is_some();
        if !claimed {
            return Ok(Upgrade::NameTaken);
        }
        let upgraded: i64 = redis::Script::new(
            "if redis.call('HGET', KEYS[1], 'role') ~= 'guest' then return 0 end \
             redis.call('HSET', KEYS[1], 'username', ARGV[1], 'display_name', ARGV[2], 'role', ARGV[3], 'password_hash', ARGV[4]) \
             return 1",
        )
        .key(user_key(&account.id))
        .arg(&account.username)
        .arg(&account.display_name)
        .arg(account.role.as_str())
        .arg(&account.password_hash)
        .invoke_async(&mut conn)
        .await?;
        // Only a name that still points at this user is removed.
        let release = redis::Script::new(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
        );
        let (done, name) = if upgraded == 1 {
            (Upgrade::Done, guest_name)
        } else {
            (Upgrade::NotAGuest, account.username.as_str())
        };
        let _: i64 = release
            .key(name_key(name))
            .arg(&account.id)
            .invoke_async(&mut conn)
            .await?;
        Ok(done)
    }

    async fn create_session(&self, session: &NewSession) -> StoreResult<()> {
        let mut conn = self.conn.clone();
        let ttl = session.ttl.as_secs().max(1);
        let key = session_key(&session.id);
        redis::pipe()
            .atomic()
            .hset_multiple(
                &key,
                &[("user_id", session.user_id.as_str()), ("revoked", "0")],
            )
            .ignore()
            .expire(&key, ttl as i64)
            .ignore()
            .set_ex(token_key(&session.id, &session.refresh_hash), "c", ttl)
            .ignore()
            .query_async::<()>(&mut conn)
            .await?;
        Ok(())
    }

    async fn rotate_refresh(
        &self,
        session_id: &str,
        presented: &str,
        next: &str,
        ttl: Duration,
    ) -> StoreResult<Rotation> {
        let mut conn = self.conn.clone();
        let reply: Vec<String> = self
            .rotate
            .key(session_key(session_id))
            .key(token_key(session_id, presented))
            .key(token_key(session_id, next))
            .arg(ttl.as_secs().max(1))
            .invoke_async(&mut conn)
            .await?;
        Ok(match reply.as_slice() {
            [r, user] if r == "rotated" => Rotation::Rotated(user.clone()),
            [r] if r == "reused" => Rotation::Reused,
            [r] if r == "revoked" => Rotation::Revoked,
            [r] if r == "unknown" => Rotation::Unknown,
            other => {
                return Err(StoreError::Corrupt(format!(
                    "rotation script answered {other:?}"
                )));
            }
        })
    }

    async fn revoke_session(&self, session_id: &str) -> StoreResult<()> {
        let mut conn = self.conn.clone();
        let key = session_key(session_id);
        // Only an existing session is marked; HSET on a missing key would create one.
        let _: i64 = redis::Script::new(
            "if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'revoked', '1') return 1 end return 0",
        )
        .key(key)
        .invoke_async(&mut conn)
        .await?;
        Ok(())
    }

    async fn hit(&self, keys: &[String], window: Duration) -> StoreResult<Vec<(u64, u64)>> {
        // Each counter is its own atomic step (so it never lives without its expiry); the
        // counters need not move together.
        let mut batch = Batch::new();
        for k in keys {
            let key = counter_key(k);
            let mut hit = redis::cmd("EVAL");
            hit.arg(HIT).arg(1).arg(&key).arg(window.as_secs().max(1));
            batch.add(&key, hit);
        }
        let hits: Vec<(i64, i64)> = batch.run_as(&self.conn).await?;
        Ok(hits
            .into_iter()
            .map(|(count, ttl)| (count.max(0) as u64, ttl.max(0) as u64))
            .collect())
    }

    async fn release(&self, key: &str) -> StoreResult<()> {
        let mut conn = self.conn.clone();
        let key = counter_key(key);
        let _: i64 = redis::Script::new(
            "local v = tonumber(redis.call('GET', KEYS[1]) or '0') if v > 0 then return redis.call('DECR', KEYS[1]) end return 0",
        )
        .key(key)
        .invoke_async(&mut conn)
        .await?;
        Ok(())
    }

    async fn forget(&self, key: &str) -> StoreResult<()> {
        let mut conn = self.conn.clone();
        let _: i64 = conn.del(counter_key(key)).await?;
        Ok(())
    }

    async fn put_key(&self, key: &PublicKey, until: u64) -> StoreResult<()> {
        let mut conn = self.conn.clone();
        let _: i64 = conn
            .hset(KEYS_KEY, &key.kid, format!("{until} {}", key.x))
            .await?;
        Ok(())
    }

    async fn keys(&self, now: u64) -> StoreResult<Vec<PublicKey>> {
        let mut conn = self.conn.clone();
        let all: std::collections::HashMap<String, String> = conn.hgetall(KEYS_KEY).await?;
        let mut live = Vec::new();
        let mut expired = Vec::new();
        for (kid, value) in all {
            match value
                .split_once(' ')
                .and_then(|(u, x)| Some((u.parse::<u64>().ok()?, x)))
            {
                Some((until, x)) if until >= now => live.push(PublicKey {
                    kid,
                    x: x.to_owned(),
                }),
                _ => expired.push(kid),
            }
        }
        if !expired.is_empty() {
            let _: i64 = conn.hdel(KEYS_KEY, expired).await?;
        }
        Ok(live)
    }
}
