//! The desk in Redis.
//!
//! A consultation is the hash `sb:msg:{c:<id>}:consultation` next to its conversation's
//! keys. Desk-wide on one Redis: `sb:support:queue`, a sorted set of queued consultation
//! ids by opening time, and `sb:support:load`, a hash of agent id → assigned
//! consultations. Each state change is one Lua script over the consultation, the queue,
//! the loads and the members. On a Redis Cluster those keys are in different slots, and
//! the steps are the ones of `cluster_desk.rs` (which says what stays atomic there); the
//! reads here serve both.

use std::collections::HashMap;

use super::desk::{ConsultationRecord, ConsultationState, DeskStore, Found, Routed, Step};
use switchboard_common::redis_conn::Batch;

use super::redis::{RedisStore, key, send_outcome, user_index, write_conversation};
use super::{Outgoing, Sent};
use crate::conversation::ConversationRecord;
use crate::error::{Error, Result};

use std::sync::LazyLock;

static ROUTE_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(ROUTE));
static ACCEPT_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(ACCEPT));
static TRANSFER_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(TRANSFER));
static CLOSE_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(CLOSE));

const QUEUE: &str = "sb:support:queue";
const LOAD: &str = "sb:support:load";

/// Assigns one queued consultation to the least-loaded candidate with room.
/// KEYS: queue, load, consultation, members, then each candidate's conversation index.
/// ARGV: id, now, capacity (0: none), then the candidate ids.
const ROUTE: &str = r#"
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return {'gone'} end
local cap = tonumber(ARGV[3])
local best, best_load, best_i = nil, nil, nil
for i = 4, #ARGV do
  local load = tonumber(redis.call('HGET', KEYS[2], ARGV[i]) or '0')
  if (cap == 0 or load < cap) and (best == nil or load < best_load) then
    best, best_load, best_i = ARGV[i], load, i
  end
end
if best == nil then return {'full'} end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[3], 'agent_id', best, 'state', 'assigned', 'assigned_at_ms', ARGV[2])
redis.call('HINCRBY', KEYS[2], best, 1)
redis.call('HSETNX', KEYS[4], best, ARGV[2])
redis.call('ZADD', KEYS[best_i + 1], ARGV[2], ARGV[1])
return {'ok', best}
"#;

/// Takes a queued consultation for an agent.
/// KEYS: queue, load, consultation, members, the agent's index. ARGV: id, now, agent.
const ACCEPT: &str = r#"
local state = redis.call('HGET', KEYS[3], 'state')
if not state then return {'nf'} end
if state ~= 'queued' or redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return {'state', state} end
redis.call('HSET', KEYS[3], 'agent_id', ARGV[3], 'state', 'assigned', 'assigned_at_ms', ARGV[2])
redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
redis.call('HSETNX', KEYS[4], ARGV[3], ARGV[2])
redis.call('ZADD', KEYS[5], ARGV[2], ARGV[1])
return {'ok', ARGV[3]}
"#;

/// Moves an assigned consultation between agents.
/// KEYS: load, consultation, members, new agent's index, old agent's index.
/// ARGV: id, now, from, to, note.
const TRANSFER: &str = r#"
local state = redis.call('HGET', KEYS[2], 'state')
if not state then return {'nf'} end
if state ~= 'assigned' then return {'state', state} end
local holder = redis.call('HGET', KEYS[2], 'agent_id')
if holder ~= ARGV[3] then return {'moved', holder} end
redis.call('HINCRBY', KEYS[1], ARGV[3], -1)
redis.call('HINCRBY', KEYS[1], ARGV[4], 1)
redis.call('HSET', KEYS[2], 'agent_id', ARGV[4], 'assigned_at_ms', ARGV[2], 'transfer_note', ARGV[5])
redis.call('HDEL', KEYS[3], ARGV[3])
redis.call('HSETNX', KEYS[3], ARGV[4], ARGV[2])
redis.call('ZREM', KEYS[5], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[2], ARGV[1])
return {'ok', ARGV[4]}
"#;

/// Closes a consultation. KEYS: queue, load, consultation, meta. ARGV: id, now, resolution.
const CLOSE: &str = r#"
local state = redis.call('HGET', KEYS[3], 'state')
if not state then return {'nf'} end
if state == 'closed' then return {'state', state} end
local agent = redis.call('HGET', KEYS[3], 'agent_id') or ''
if state == 'assigned' and agent ~= '' then
  if redis.call('HINCRBY', KEYS[2], agent, -1) <= 0 then redis.call('HDEL', KEYS[2], agent) end
end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[3], 'state', 'closed', 'closed_at_ms', ARGV[2], 'resolution', ARGV[3])
redis.call('HSET', KEYS[4], 'read_only', '1')
return {'ok', agent}
"#;

fn parse_consultation(
    id: &str,
    mut h: HashMap<String, String>,
) -> Result<Option<ConsultationRecord>> {
    if h.is_empty() {
        return Ok(None);
    }
    let corrupt = |f: &str| Error::Internal(format!("consultation {id}: bad or missing {f}"));
    let mut take = |f: &str| h.remove(f).unwrap_or_default();
    let ms = |v: String| v.parse::<u64>().unwrap_or(0);
    let state = ConsultationState::parse(&take("state")).ok_or_else(|| corrupt("state"))?;
    Ok(Some(ConsultationRecord {
        id: id.to_owned(),
        customer_id: take("customer_id"),
        agent_id: take("agent_id"),
        topic: take("topic"),
        state,
        opened_at_ms: ms(take("opened_at_ms")),
        assigned_at_ms: ms(take("assigned_at_ms")),
        closed_at_ms: ms(take("closed_at_ms")),
        resolution: take("resolution"),
        transfer_note: take("transfer_note"),
    }))
}

/// A script's reply as a [`Step`].
pub(super) fn step(reply: Vec<String>) -> Result<Step> {
    let arg = || reply.get(1).cloned().unwrap_or_default();
    match reply.first().map(String::as_str) {
        Some("ok") => Ok(Step::Done(arg())),
        Some("nf") => Ok(Step::NotFound),
        Some("moved") => Ok(Step::Moved(arg())),
        Some("state") => ConsultationState::parse(&arg())
            .map(Step::WrongState)
            .ok_or_else(|| Error::Internal(format!("desk script answered {reply:?}"))),
        _ => Err(Error::Internal(format!("desk script answered {reply:?}"))),
    }
}

/// The consultation's record, as one command of `pipe`.
pub(super) fn write_consultation(pipe: &mut redis::Pipeline, r: &ConsultationRecord) {
    pipe.hset_multiple(
        key(&r.id, "consultation"),
        &[
            ("customer_id", r.customer_id.clone()),
            ("agent_id", r.agent_id.clone()),
            ("topic", r.topic.clone()),
            ("state", r.state.as_str().to_owned()),
            ("opened_at_ms", r.opened_at_ms.to_string()),
        ],
    )
    .ignore();
}

impl RedisStore {
    /// One transaction on the conversation's slot: the records, the queue entry (`queue`,
    /// on one Redis; a cluster queues first) and the send step (by its source, so a Redis
    /// that lost its script cache still runs it) apply together or not at all. With
    /// REDIS_ACK_REPLICAS, `WAIT` follows on the same node; a consultation the replicas
    /// did not confirm answers UNAVAILABLE naming it, so the customer looks for it
    /// before opening another (an open has no idempotency key).
    pub(super) async fn open_transaction(
        &self,
        c: &ConversationRecord,
        r: &ConsultationRecord,
        first: &Outgoing,
        queue: Option<&str>,
    ) -> Result<Sent> {
        let mut pipe = redis::pipe();
        pipe.cmd("MULTI").ignore();
        write_conversation(&mut pipe, c);
        write_consultation(&mut pipe, r);
        if let Some(queue) = queue {
            pipe.zadd(queue, &r.id, r.opened_at_ms).ignore();
        }
        self.send_eval(&mut pipe, first);
        pipe.ignore();
        pipe.cmd("EXEC");
        self.add_wait(&mut pipe);
        let mut replies: Vec<redis::Value> = pipe.query_async(&mut self.conn.clone()).await?;
        let confirmed = match self.ack {
            Some(_) => replies.pop(),
            None => None,
        };
        let applied: Vec<redis::Value> = replies
            .pop()
            .map(redis::from_redis_value)
            .transpose()
            .map_err(redis::RedisError::from)?
            .ok_or_else(|| Error::storage("the consultation's transaction did not apply"))?;
        let reply: Vec<String> = applied
            .into_iter()
            .next_back()
            .map(redis::from_redis_value)
            .transpose()
            .map_err(redis::RedisError::from)?
            .ok_or_else(|| Error::storage("the consultation's transaction answered nothing"))?;
        let (sent, members) = send_outcome(reply)?;
        self.raise(&c.id, &members, first.sent_at_ms).await?;
        if let Some((replicas, timeout)) = self.ack {
            let got: i64 = confirmed
                .map(redis::from_redis_value)
                .transpose()
                .map_err(redis::RedisError::from)?
                .unwrap_or(0);
            if got < i64::from(replicas) {
                return Err(Error::storage(format!(
                    "consultation '{}' was stored, but only {got} of {replicas} Redis replicas confirmed it within {} ms (REDIS_ACK_REPLICAS); look for it (GetConversation) before opening another",
                    r.id,
                    timeout.as_millis()
                )));
            }
        }
        Ok(sent)
    }

    /// The queue's key: desk-wide on one Redis, in the desk's slot on a cluster.
    fn queue_key(&self) -> &'static str {
        if self.conn.is_cluster() {
            super::cluster_desk::QUEUE
        } else {
            QUEUE
        }
    }
}

impl DeskStore for RedisStore {
    async fn open(
        &self,
        c: &ConversationRecord,
        r: &ConsultationRecord,
        first: &Outgoing,
    ) -> Result<Sent> {
        if self.conn.is_cluster() {
            return self.open_sharded(c, r, first).await;
        }
        self.list_for_members(c).await?;
        self.open_transaction(c, r, first, Some(QUEUE)).await
    }

    async fn consultation(&self, id: &str) -> Result<Option<ConsultationRecord>> {
        let mut conn = self.conn.clone();
        let h: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(key(id, "consultation"))
            .query_async(&mut conn)
            .await?;
        parse_consultation(id, h)
    }

    /// One round trip (per slot, all at once, on a cluster): the record and the queue
    /// rank of each.
    async fn consultations(&self, ids: &[String]) -> Result<Vec<Option<Found>>> {
        let queue = self.queue_key();
        let mut batch = Batch::new();
        for id in ids {
            let record = key(id, "consultation");
            let mut get = redis::cmd("HGETALL");
            get.arg(&record);
            batch.add(&record, get);
            let mut rank = redis::cmd("ZRANK");
            rank.arg(queue).arg(id);
            batch.add(queue, rank);
        }
        let mut replies = batch.run(&self.conn).await?.into_iter();
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let (Some(h), Some(rank)) = (replies.next(), replies.next()) else {
                return Err(Error::storage("redis answered fewer replies than lookups"));
            };
            let h: HashMap<String, String> =
                redis::from_redis_value(h).map_err(redis::RedisError::from)?;
            let rank: Option<u32> =
                redis::from_redis_value(rank).map_err(redis::RedisError::from)?;
            out.push(parse_consultation(id, h)?.map(|r| {
                let position = rank
                    .filter(|_| r.state == ConsultationState::Queued)
                    .map(|rank| rank + 1);
                (r, position)
            }));
        }
        Ok(out)
    }

    async fn queue_position(&self, id: &str) -> Result<Option<u32>> {
        let mut conn = self.conn.clone();
        let rank: Option<u32> = redis::cmd("ZRANK")
            .arg(self.queue_key())
            .arg(id)
            .query_async(&mut conn)
            .await?;
        Ok(rank.map(|r| r + 1))
    }

    /// The queue's first `limit` ids, then their records in one more round trip; entries
    /// whose consultation is not queued (a cluster's step cut short) are left out.
    async fn queue(&self, limit: usize) -> Result<Vec<ConsultationRecord>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut conn = self.conn.clone();
        let ids: Vec<String> = redis::cmd("ZRANGE")
            .arg(self.queue_key())
            .arg(0)
            .arg(limit - 1)
            .query_async(&mut conn)
            .await?;
        let mut batch = Batch::new();
        for id in &ids {
            let record = key(id, "consultation");
            let mut get = redis::cmd("HGETALL");
            get.arg(&record);
            batch.add(&record, get);
        }
        let rows: Vec<HashMap<String, String>> = batch.run_as(&self.conn).await?;
        let mut out = Vec::with_capacity(ids.len());
        for (id, h) in ids.iter().zip(rows) {
            if let Some(r) = parse_consultation(id, h)?
                && r.state == ConsultationState::Queued
            {
                out.push(r);
            }
        }
        Ok(out)
    }

    async fn route_next(
        &self,
        candidates: &[String],
        capacity: u32,
        now_ms: u64,
    ) -> Result<Routed> {
        if self.conn.is_cluster() {
            return self.route_sharded(candidates, capacity, now_ms).await;
        }
        let mut conn = self.conn.clone();
        // Another instance may take the head between the read and the script; the script
        // then says 'gone' and the next head is tried (a bounded number of times).
        for _ in 0..16 {
            let head: Vec<String> = redis::cmd("ZRANGE")
                .arg(QUEUE)
                .arg(0)
                .arg(0)
                .query_async(&mut conn)
                .await?;
            let Some(id) = head.into_iter().next() else {
                return Ok(Routed::Empty);
            };
            if candidates.is_empty() {
                return Ok(Routed::NoAgent);
            }
            let mut call = ROUTE_SCRIPT.prepare_invoke();
            call.key(QUEUE)
                .key(LOAD)
                .key(key(&id, "consultation"))
                .key(key(&id, "members"));
            for c in candidates {
                call.key(user_index(c));
            }
            call.arg(&id).arg(now_ms).arg(capacity);
            for c in candidates {
                call.arg(c);
            }
            let reply: Vec<String> = call.invoke_async(&mut conn).await?;
            match reply.first().map(String::as_str) {
                Some("ok") => {
                    return Ok(Routed::Assigned {
                        id,
                        agent_id: reply.get(1).cloned().unwrap_or_default(),
                    });
                }
                Some("full") => return Ok(Routed::NoAgent),
                Some("gone") => continue,
                _ => return Err(Error::Internal(format!("route script answered {reply:?}"))),
            }
        }
        Err(Error::storage(
            "the queue changed too often while routing; routing again later",
        ))
    }

    async fn accept(&self, id: &str, agent: &str, now_ms: u64) -> Result<Step> {
        if self.conn.is_cluster() {
            return self.accept_sharded(id, agent, now_ms).await;
        }
        let mut conn = self.conn.clone();
        let reply: Vec<String> = ACCEPT_SCRIPT
            .key(QUEUE)
            .key(LOAD)
            .key(key(id, "consultation"))
            .key(key(id, "members"))
            .key(user_index(agent))
            .arg(id)
            .arg(now_ms)
            .arg(agent)
            .invoke_async(&mut conn)
            .await?;
        step(reply)
    }

    async fn transfer(
        &self,
        id: &str,
        from: &str,
        to: &str,
        note: &str,
        now_ms: u64,
    ) -> Result<Step> {
        if self.conn.is_cluster() {
            return self.transfer_sharded(id, from, to, note, now_ms).await;
        }
        let mut conn = self.conn.clone();
        let reply: Vec<String> = TRANSFER_SCRIPT
            .key(LOAD)
            .key(key(id, "consultation"))
            .key(key(id, "members"))
            .key(user_index(to))
            .key(user_index(from))
            .arg(id)
            .arg(now_ms)
            .arg(from)
            .arg(to)
            .arg(note)
            .invoke_async(&mut conn)
            .await?;
        step(reply)
    }

    async fn close(&self, id: &str, resolution: &str, now_ms: u64) -> Result<Step> {
        if self.conn.is_cluster() {
            return self.close_sharded(id, resolution, now_ms).await;
        }
        let mut conn = self.conn.clone();
        let reply: Vec<String> = CLOSE_SCRIPT
            .key(QUEUE)
            .key(LOAD)
            .key(key(id, "consultation"))
            .key(key(id, "meta"))
            .arg(id)
            .arg(now_ms)
            .arg(resolution)
            .invoke_async(&mut conn)
            .await?;
        step(reply)
    }

    async fn loads(&self, agents: &[String]) -> Result<Vec<u32>> {
        if agents.is_empty() {
            return Ok(Vec::new());
        }
        if self.conn.is_cluster() {
            return self.loads_sharded(agents).await;
        }
        let mut conn = self.conn.clone();
        let loads: Vec<Option<u32>> = redis::cmd("HMGET")
            .arg(LOAD)
            .arg(agents)
            .query_async(&mut conn)
            .await?;
        Ok(loads.into_iter().map(|l| l.unwrap_or(0)).collect())
    }

    /// On one Redis every step is one script, and there is nothing to repair.
    async fn repair(&self, now_ms: u64) -> Result<usize> {
        if self.conn.is_cluster() {
            return self.repair_desk(now_ms).await;
        }
        Ok(0)
    }
}
