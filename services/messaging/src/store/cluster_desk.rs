//! The desk on a Redis Cluster, where a consultation's keys and the desk-wide keys live in
//! different slots, so no one script can hold them all (on one Redis, `redis_desk.rs` does
//! each step in one script).
//!
//! What is atomic, and why the rest is safe:
//! - **A consultation's state** (queued → assigned → closed, who holds it, the
//!   conversation's members and read-only flag) changes in one script on the
//!   conversation's slot. The record is the authority: a consultation is assigned at most
//!   once and closed once, however many instances route at the same moment.
//! - **Choosing an agent** is one script on the desk's slot over the candidates'
//!   reservations (`sb:support:{desk}:agent:<id>`, a sorted set of consultation ids; an
//!   agent's load is its size): it picks the least loaded with room and reserves that room
//!   at once, so two instances never fill one agent past capacity.
//! - **The queue** (`sb:support:{desk}:queue`) and the reservations follow the record:
//!   an entry is written before the record needs it and removed after the record stops
//!   needing it, and the step that changed the record writes its reservation again after
//!   the change (a racing loser removes only the reservation it wrote itself). A crash
//!   between leaves one entry too many, never one too few: a stale queue entry is skipped
//!   by routing and listing, a stale reservation keeps an agent below capacity (never
//!   above it), and the repair pass ([`DeskStore::repair`](super::DeskStore::repair))
//!   drops both once they are older than [`GRACE_MS`].
//! - **The agent's conversation list** gets the consultation before the agent becomes a
//!   member, as for every conversation (pages list a conversation only to its members).

use std::collections::HashMap;
use std::sync::LazyLock;

use switchboard_common::redis_conn::Batch;

use super::desk::{ConsultationRecord, ConsultationState, Routed, Step};
use super::redis::{RedisStore, key, user_index};
use super::redis_desk::step;
use super::{Outgoing, Sent};
use crate::conversation::ConversationRecord;
use crate::error::{Error, Result};

/// Queued consultation ids by opening time.
pub(super) const QUEUE: &str = "sb:support:{desk}:queue";
/// Agents that have (or had) reservations, for the repair pass.
const AGENTS: &str = "sb:support:{desk}:agents";

/// How old a queue entry without its consultation, or a reservation its consultation does
/// not back, must be before the repair pass drops it: far longer than one step takes, so
/// an opening or an assignment in flight is never mistaken for a crashed one.
pub const GRACE_MS: u64 = 120_000;

/// Most entries of each kind one repair pass looks at.
const REPAIR_LIMIT: isize = 1000;

/// Queue entries one routing attempt looks at.
const HEAD: isize = 8;

fn reservations(agent: &str) -> String {
    format!("sb:support:{{desk}}:agent:{agent}")
}

/// A reservation's score: its time in ms times 1,000 plus a random part, so two attempts
/// in the same millisecond tell their reservations apart (an integer below 2^53, exact as
/// a Redis score).
fn reservation_score(now_ms: u64) -> u64 {
    use rand_core::RngCore;
    now_ms.saturating_mul(1000) + u64::from(rand_core::OsRng.next_u32() % 1000)
}

static RESERVE_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(RESERVE));
static UNRESERVE_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(UNRESERVE));
static ASSIGN_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(ASSIGN));
static TRANSFER_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(TRANSFER));
static CLOSE_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(CLOSE));
static FORGET_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(FORGET));

/// Reserves room for a consultation with the least-loaded candidate below capacity (0:
/// none); ties go to the earlier candidate. A reservation already there stays as it is.
/// KEYS: agents, then each candidate's reservations. ARGV: id, score, capacity, then the
/// candidates. Returns {'ok', agent} or {'full'}.
const RESERVE: &str = r#"
local cap = tonumber(ARGV[3])
local best, best_load, best_i = nil, nil, nil
for i = 4, #ARGV do
  local load = redis.call('ZCARD', KEYS[i - 2])
  if (cap == 0 or load < cap) and (best == nil or load < best_load) then
    best, best_load, best_i = ARGV[i], load, i
  end
end
if best == nil then return {'full'} end
redis.call('ZADD', KEYS[best_i - 2], 'NX', ARGV[2], ARGV[1])
redis.call('SADD', KEYS[1], best)
return {'ok', best}
"#;

/// Drops a reservation only if it is the one this attempt wrote (same score).
/// KEYS: reservations. ARGV: id, score.
const UNRESERVE: &str = r#"
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) == tonumber(ARGV[2]) then redis.call('ZREM', KEYS[1], ARGV[1]) end
return 0
"#;

/// A queued consultation goes to an agent. KEYS: consultation, members. ARGV: now, agent.
const ASSIGN: &str = r#"
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {'nf'} end
if state ~= 'queued' then return {'state', state} end
redis.call('HSET', KEYS[1], 'agent_id', ARGV[2], 'state', 'assigned', 'assigned_at_ms', ARGV[1])
redis.call('HSETNX', KEYS[2], ARGV[2], ARGV[1])
return {'ok', ARGV[2]}
"#;

/// An assigned consultation moves between agents. KEYS: consultation, members.
/// ARGV: now, from, to, note.
const TRANSFER: &str = r#"
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {'nf'} end
if state ~= 'assigned' then return {'state', state} end
local holder = redis.call('HGET', KEYS[1], 'agent_id')
if holder ~= ARGV[2] then return {'moved', holder} end
redis.call('HSET', KEYS[1], 'agent_id', ARGV[3], 'assigned_at_ms', ARGV[1], 'transfer_note', ARGV[4])
redis.call('HDEL', KEYS[2], ARGV[2])
redis.call('HSETNX', KEYS[2], ARGV[3], ARGV[1])
return {'ok', ARGV[3]}
"#;

/// Closes a consultation. KEYS: consultation, meta. ARGV: now, resolution.
const CLOSE: &str = r#"
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {'nf'} end
if state == 'closed' then return {'state', state} end
local agent = redis.call('HGET', KEYS[1], 'agent_id') or ''
redis.call('HSET', KEYS[1], 'state', 'closed', 'closed_at_ms', ARGV[1], 'resolution', ARGV[2])
redis.call('HSET', KEYS[2], 'read_only', '1')
return {'ok', agent}
"#;

/// Forgets an agent without reservations. KEYS: agents, reservations. ARGV: agent.
const FORGET: &str = r#"
if redis.call('ZCARD', KEYS[2]) == 0 then redis.call('SREM', KEYS[1], ARGV[1]) end
return 0
"#;

/// What the record said when a state change did not apply.
fn refused(reply: &[String]) -> bool {
    reply.first().map(String::as_str) != Some("ok")
}

impl RedisStore {
    /// Reserves room for `id` with one of `candidates` (see [`RESERVE`]); the agent and the
    /// reservation's score, or `None` when nobody has room.
    async fn reserve(
        &self,
        id: &str,
        candidates: &[String],
        capacity: u32,
        now_ms: u64,
    ) -> Result<Option<(String, u64)>> {
        let score = reservation_score(now_ms);
        let mut call = RESERVE_SCRIPT.prepare_invoke();
        call.key(AGENTS);
        for c in candidates {
            call.key(reservations(c));
        }
        call.arg(id).arg(score).arg(capacity);
        for c in candidates {
            call.arg(c);
        }
        let reply: Vec<String> = call.invoke_async(&mut self.conn.clone()).await?;
        match (reply.first().map(String::as_str), reply.get(1)) {
            (Some("ok"), Some(agent)) => Ok(Some((agent.clone(), score))),
            (Some("full"), _) => Ok(None),
            _ => Err(Error::Internal(format!(
                "reserve script answered {reply:?}"
            ))),
        }
    }

    /// Drops the reservation this attempt wrote, if it is still that one.
    async fn unreserve(&self, id: &str, agent: &str, score: u64) -> Result<()> {
        let _: i64 = UNRESERVE_SCRIPT
            .key(reservations(agent))
            .arg(id)
            .arg(score)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    /// After `agent` got `id`: their reservation written again with this attempt's score
    /// (whatever a racing loser removed), and `id` off the queue.
    async fn confirm(&self, id: &str, agent: &str, score: u64) -> Result<()> {
        let () = redis::pipe()
            .zadd(reservations(agent), id, score)
            .ignore()
            .zrem(QUEUE, id)
            .ignore()
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    /// Lists `id` in `agent`'s conversations (before they become a member).
    async fn list_for(&self, id: &str, agent: &str, now_ms: u64) -> Result<()> {
        let () = redis::cmd("ZADD")
            .arg(user_index(agent))
            .arg(now_ms)
            .arg(id)
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    /// Reserved room, listing, then the record: the assignment of `id` to `agent` (whose
    /// room `score` holds). On a refusal the reservation goes again, and a queue entry
    /// the record no longer backs leaves the queue.
    async fn assign_reserved(
        &self,
        id: &str,
        agent: &str,
        score: u64,
        now_ms: u64,
    ) -> Result<Step> {
        self.list_for(id, agent, now_ms).await?;
        let reply: Vec<String> = ASSIGN_SCRIPT
            .key(key(id, "consultation"))
            .key(key(id, "members"))
            .arg(now_ms)
            .arg(agent)
            .invoke_async(&mut self.conn.clone())
            .await?;
        if refused(&reply) {
            self.unreserve(id, agent, score).await?;
            if reply.first().map(String::as_str) == Some("state") {
                let () = redis::cmd("ZREM")
                    .arg(QUEUE)
                    .arg(id)
                    .query_async(&mut self.conn.clone())
                    .await?;
            }
        } else {
            self.confirm(id, agent, score).await?;
        }
        step(reply)
    }

    /// The queue entry first, then the records and the first message in one transaction
    /// on the conversation's slot: a crash between leaves an entry without a consultation,
    /// which routing and listing skip and the repair pass drops.
    pub(super) async fn open_sharded(
        &self,
        c: &ConversationRecord,
        r: &ConsultationRecord,
        first: &Outgoing,
    ) -> Result<Sent> {
        self.list_for_members(c).await?;
        let mut conn = self.conn.clone();
        let () = redis::cmd("ZADD")
            .arg(QUEUE)
            .arg("NX")
            .arg(r.opened_at_ms)
            .arg(&r.id)
            .query_async(&mut conn)
            .await?;
        self.open_transaction(c, r, first, None).await
    }

    /// Routing on a cluster: the first queue entries' states in one round trip (dropping
    /// the ones their records no longer back), then reserve, list and assign the oldest
    /// queued one; a lost race moves on to the next.
    pub(super) async fn route_sharded(
        &self,
        candidates: &[String],
        capacity: u32,
        now_ms: u64,
    ) -> Result<Routed> {
        let mut conn = self.conn.clone();
        for _ in 0..16 {
            let head: Vec<(String, u64)> = redis::cmd("ZRANGE")
                .arg(QUEUE)
                .arg(0)
                .arg(HEAD - 1)
                .arg("WITHSCORES")
                .query_async(&mut conn)
                .await?;
            if head.is_empty() {
                return Ok(Routed::Empty);
            }
            if candidates.is_empty() {
                return Ok(Routed::NoAgent);
            }
            let mut states = Batch::new();
            for (id, _) in &head {
                let record = key(id, "consultation");
                let mut get = redis::cmd("HGET");
                get.arg(&record).arg("state");
                states.add(&record, get);
            }
            let states: Vec<Option<String>> = states.run_as(&self.conn).await?;
            let mut stale = Vec::new();
            let mut queued = Vec::new();
            for ((id, opened), state) in head.into_iter().zip(states) {
                match state.as_deref() {
                    Some("queued") => queued.push(id),
                    Some(_) => stale.push(id),
                    // Being opened, or its opener crashed long ago.
                    None if opened.saturating_add(GRACE_MS) < now_ms => stale.push(id),
                    None => {}
                }
            }
            if !stale.is_empty() {
                let () = redis::cmd("ZREM")
                    .arg(QUEUE)
                    .arg(&stale)
                    .query_async(&mut conn)
                    .await?;
            }
            for id in &queued {
                let Some((agent, score)) = self.reserve(id, candidates, capacity, now_ms).await?
                else {
                    return Ok(Routed::NoAgent);
                };
                if let Step::Done(agent_id) =
                    self.assign_reserved(id, &agent, score, now_ms).await?
                {
                    return Ok(Routed::Assigned {
                        id: id.clone(),
                        agent_id,
                    });
                }
            }
            if stale.is_empty() && queued.is_empty() {
                // Only consultations still being opened: their openers route them.
                return Ok(Routed::Empty);
            }
        }
        Err(Error::storage(
            "the queue changed too often while routing; routing again later",
        ))
    }

    /// Accept on a cluster: room reserved for `agent` whatever their load, then assigned.
    pub(super) async fn accept_sharded(&self, id: &str, agent: &str, now_ms: u64) -> Result<Step> {
        let score = self.reserve_for(id, agent, now_ms).await?;
        self.assign_reserved(id, agent, score, now_ms).await
    }

    /// Room for `id` with `agent` whatever their load (accept, transfer): the score.
    async fn reserve_for(&self, id: &str, agent: &str, now_ms: u64) -> Result<u64> {
        match self.reserve(id, &[agent.to_owned()], 0, now_ms).await? {
            Some((_, score)) => Ok(score),
            None => Err(Error::Internal(
                "a reservation without capacity was full".into(),
            )),
        }
    }

    /// Transfer on a cluster: `to`'s room and list first, the record, then `from`'s
    /// reservation and list entry go.
    pub(super) async fn transfer_sharded(
        &self,
        id: &str,
        from: &str,
        to: &str,
        note: &str,
        now_ms: u64,
    ) -> Result<Step> {
        let score = self.reserve_for(id, to, now_ms).await?;
        self.list_for(id, to, now_ms).await?;
        let reply: Vec<String> = TRANSFER_SCRIPT
            .key(key(id, "consultation"))
            .key(key(id, "members"))
            .arg(now_ms)
            .arg(from)
            .arg(to)
            .arg(note)
            .invoke_async(&mut self.conn.clone())
            .await?;
        if refused(&reply) {
            self.unreserve(id, to, score).await?;
            return step(reply);
        }
        let () = redis::pipe()
            .zadd(reservations(to), id, score)
            .ignore()
            .zrem(reservations(from), id)
            .ignore()
            .query_async(&mut self.conn.clone())
            .await?;
        let () = redis::cmd("ZREM")
            .arg(user_index(from))
            .arg(id)
            .query_async(&mut self.conn.clone())
            .await?;
        step(reply)
    }

    /// Close on a cluster: the record, then its queue entry and its agent's reservation.
    pub(super) async fn close_sharded(
        &self,
        id: &str,
        resolution: &str,
        now_ms: u64,
    ) -> Result<Step> {
        let reply: Vec<String> = CLOSE_SCRIPT
            .key(key(id, "consultation"))
            .key(key(id, "meta"))
            .arg(now_ms)
            .arg(resolution)
            .invoke_async(&mut self.conn.clone())
            .await?;
        if !refused(&reply) {
            let mut pipe = redis::pipe();
            pipe.zrem(QUEUE, id).ignore();
            if let Some(agent) = reply.get(1).filter(|a| !a.is_empty()) {
                pipe.zrem(reservations(agent), id).ignore();
            }
            let () = pipe.query_async(&mut self.conn.clone()).await?;
        }
        step(reply)
    }

    /// Assigned consultations per agent on a cluster: their reservations.
    pub(super) async fn loads_sharded(&self, agents: &[String]) -> Result<Vec<u32>> {
        let mut pipe = redis::pipe();
        for a in agents {
            pipe.zcard(reservations(a));
        }
        Ok(pipe.query_async(&mut self.conn.clone()).await?)
    }

    /// The repair pass on a cluster: drops queue entries their consultations no longer
    /// back (closed, assigned, or never stored and older than [`GRACE_MS`]) and
    /// reservations older than that which their consultations do not back (not assigned
    /// to that agent), at most [`REPAIR_LIMIT`] of each per queue and agent. Returns how
    /// many entries it dropped.
    pub(super) async fn repair_desk(&self, now_ms: u64) -> Result<usize> {
        let mut conn = self.conn.clone();
        let old = now_ms.saturating_sub(GRACE_MS);
        let queue: Vec<(String, u64)> = redis::cmd("ZRANGE")
            .arg(QUEUE)
            .arg(0)
            .arg(REPAIR_LIMIT - 1)
            .arg("WITHSCORES")
            .query_async(&mut conn)
            .await?;
        let agents: Vec<String> = redis::cmd("SMEMBERS")
            .arg(AGENTS)
            .query_async(&mut conn)
            .await?;
        let mut held = redis::pipe();
        for a in &agents {
            held.cmd("ZRANGE")
                .arg(reservations(a))
                .arg(0)
                .arg(REPAIR_LIMIT - 1)
                .arg("WITHSCORES");
        }
        let held: Vec<Vec<(String, u64)>> = if agents.is_empty() {
            Vec::new()
        } else {
            held.query_async(&mut conn).await?
        };

        // Every consultation named, once: its state and holder.
        let mut names: Vec<&str> = queue.iter().map(|(id, _)| id.as_str()).collect();
        names.extend(held.iter().flatten().map(|(id, _)| id.as_str()));
        names.sort_unstable();
        names.dedup();
        let mut lookups = Batch::new();
        for id in &names {
            let record = key(id, "consultation");
            let mut get = redis::cmd("HMGET");
            get.arg(&record).arg("state").arg("agent_id");
            lookups.add(&record, get);
        }
        let rows: Vec<(Option<String>, Option<String>)> = lookups.run_as(&self.conn).await?;
        let records: HashMap<&str, (Option<String>, Option<String>)> =
            names.into_iter().zip(rows).collect();
        let state = |id: &str| records.get(id).and_then(|(s, _)| s.as_deref());
        let holder = |id: &str| records.get(id).and_then(|(_, a)| a.as_deref());

        let mut fix = redis::pipe();
        let mut dropped = 0;
        for (id, opened) in &queue {
            let backed = match state(id) {
                Some(s) => s == ConsultationState::Queued.as_str(),
                None => *opened >= old,
            };
            if !backed {
                fix.zrem(QUEUE, id).ignore();
                dropped += 1;
            }
        }
        for (agent, reserved) in agents.iter().zip(&held) {
            for (id, score) in reserved {
                let backed = state(id) == Some(ConsultationState::Assigned.as_str())
                    && holder(id) == Some(agent.as_str());
                if !backed && score / 1000 < old {
                    fix.zrem(reservations(agent), id).ignore();
                    dropped += 1;
                }
            }
        }
        if dropped > 0 {
            let () = fix.query_async(&mut conn).await?;
        }
        for agent in agents.iter().zip(&held).filter(|(_, r)| r.is_empty()) {
            let _: i64 = FORGET_SCRIPT
                .key(AGENTS)
                .key(reservations(agent.0))
                .arg(agent.0)
                .invoke_async(&mut conn)
                .await?;
        }
        Ok(dropped)
    }
}
