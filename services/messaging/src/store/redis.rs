//! The Redis engine.
//!
//! Keys of a conversation share the hash tag `{c:<id>}` (one Redis Cluster slot), so the
//! send script touches one slot:
//! - `meta` hash (kind, title, owner_id, created_at_ms, epoch, read_only),
//! - `members` hash (user id → joined at, ms), `reads` hash (user id → read seq),
//! - `seq` counter, `log` stream whose entry ids are `<seq>-0` (so history by seq is an
//!   XRANGE), trimmed to the configured retention,
//! - `idem:<sender>:<client_msg_id>` → `<seq>|<message id>|<sent at>` for 24 hours.
//!
//! Outside the slot: `sb:msg:direct:<a>|<b>` → id (one direct conversation per pair), and
//! each user's list, in two parts that share the user's hash tag `{u:<id>}`:
//! - `sb:msg:user:{u:<id>}:convs`, a sorted set of the user's conversations of at most
//!   [`WIDE_MEMBERS`] members, scored by rank ([`Ranked`]): joining adds the conversation
//!   at the join time and each message raises every member's score to its time
//!   (`ZADD GT`), so a page is one range read;
//! - `sb:msg:user:{u:<id>}:wide`, a set of the user's *wide* conversations (more members;
//!   meta `wide` = 1). A send there touches no member's list (its work stays constant
//!   whatever the group's size); a page reads each wide conversation's `activity` instead
//!   and merges. A conversation turns wide once, when it grows past the limit, and stays so.
//!
//! What is atomic, and why the rest is safe (the same on one Redis and on a cluster, but
//! for the first point):
//! - a send (idempotency, membership, seq, history, read position, publish) is one script
//!   on the conversation's slot. On one Redis it also raises the members' ranks; on a
//!   cluster their lists are in other slots, so the script returns the members and the
//!   store raises them next (`ZADD GT`: repeatable, never backwards). A crash between
//!   leaves ranks behind until the next message;
//! - a conversation is created in its members' lists first, then stored (one transaction
//!   on its slot): a crash between leaves list entries without a conversation, which pages
//!   skip;
//! - members are added by one script per 1,000 on the conversation's slot, then listed; a
//!   crash between leaves new members unlisted until the next message (narrow) lists them;
//! - a member leaves their lists first, then the conversation: never a listed
//!   conversation one is not in (pages also list a conversation only to its members).
//!
//! The support desk's steps span the desk-wide keys and the conversation: one script on
//! one Redis (`redis_desk.rs`), a sequence of single-slot steps on a cluster
//! (`cluster_desk.rs`, which says why each order is safe).

use std::collections::HashMap;

use redis::AsyncCommands;
use switchboard_common::redis_conn::{Batch, RedisConn};
use switchboard_proto::messaging::v1 as pb;

use super::{
    History, Membership, MessagingStore, Outgoing, Range, Ranked, Sent, conversation_channel,
};
use crate::conversation::{ConversationRecord, Kind, Member};
use crate::error::{Error, Result};

/// Seconds an idempotency key is remembered.
const IDEMPOTENCY_TTL_SECS: u64 = 24 * 3600;

/// Conversations of more members than this are wide (see the module docs).
pub const WIDE_MEMBERS: usize = 16;

/// The one atomic send step; the sender has read up to what they wrote, and the
/// conversation was last active now: in a narrow conversation that raises it in every
/// member's list (`ZADD GT`, so a rank never moves back), in a wide one only its
/// `activity`, which then never moves back either. A conversation stored before `wide`
/// was kept counts as narrow if it is small. Seven Redis calls, plus two and one per member
/// when narrow. KEYS: meta, members, seq, log, idem, reads, activity. ARGV: sender, message
/// bytes, retention, "<id>|<sent at>", idem ttl, channel, envelope, sent at (ms),
/// conversation id, list key prefix, list key suffix, the wide limit, the publish command
/// (`SPUBLISH` on a cluster: the channel is in the conversation's slot; empty when sends
/// wait for replicas, which publish only what the replicas confirmed), and `1` to raise
/// the members' ranks here (one Redis) or `0` to return the members after the seq instead
/// (a cluster, where their lists are in other slots: the store raises them next).
const SEND: &str = r#"
local dup = redis.call('GET', KEYS[5])
if dup then return {'dup', dup} end
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'read_only', 'wide')
if not meta[1] then return {'nf'} end
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0 then return {'nm'} end
if meta[2] == '1' then return {'ro'} end
local seq = redis.call('INCR', KEYS[3])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[3], seq .. '-0', 'm', ARGV[2])
redis.call('SET', KEYS[5], seq .. '|' .. ARGV[4], 'EX', ARGV[5])
redis.call('HSET', KEYS[6], ARGV[1], seq)
local narrow = meta[3] == '0' or (not meta[3] and redis.call('HLEN', KEYS[2]) <= tonumber(ARGV[12]))
local reply = {'ok', tostring(seq)}
if narrow then
  redis.call('SET', KEYS[7], ARGV[8])
  for _, user in ipairs(redis.call('HKEYS', KEYS[2])) do
    if ARGV[14] == '1' then
      redis.call('ZADD', ARGV[10] .. user .. ARGV[11], 'GT', ARGV[8], ARGV[9])
    else
      reply[#reply + 1] = user
    end
  end
elseif tonumber(ARGV[8]) > tonumber(redis.call('GET', KEYS[7]) or '0') then
  redis.call('SET', KEYS[7], ARGV[8])
end
if ARGV[13] ~= '' then redis.call(ARGV[13], ARGV[6], '1M' .. seq .. '\n' .. ARGV[7]) end
return reply
"#;

/// Adds members (existing ones keep their join time) and turns the conversation wide
/// when it grows past the limit; the conversation's keys only (the members' lists are the
/// caller's next step). KEYS: meta, members. ARGV: now (ms), the wide limit, then the
/// users. Returns {0} if there is no such conversation, else {1} (narrow), {3} (wide),
/// or {2, every member} (it turned wide now), each with a list (empty but for 2).
const ADD_MEMBERS: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, {}} end
for i = 3, #ARGV do
  redis.call('HSETNX', KEYS[2], ARGV[i], ARGV[1])
end
if redis.call('HGET', KEYS[1], 'wide') == '1' then return {3, {}} end
if redis.call('HLEN', KEYS[2]) > tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'wide', '1')
  return {2, redis.call('HKEYS', KEYS[2])}
end
return {1, {}}
"#;

/// Moves one user list of the earlier, untagged name (`sb:msg:user:<id>:convs` or
/// `:wide`) to its tagged name, merged with what the new one already holds (a rank keeps
/// the later time), and drops the old key; nothing if it is gone (another instance moved
/// it). One Redis only: the two names are in different slots. KEYS: old, new. ARGV: `z`
/// (the sorted list) or `s` (the wide set).
const MIGRATE_LIST: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[1] == 'z' then
  redis.call('ZUNIONSTORE', KEYS[2], 2, KEYS[2], KEYS[1], 'AGGREGATE', 'MAX')
else
  redis.call('SUNIONSTORE', KEYS[2], KEYS[2], KEYS[1])
end
redis.call('DEL', KEYS[1])
return 1
"#;

/// Keys one `SCAN` step of the list migration asks for.
const MIGRATE_SCAN: usize = 1000;

/// Users one member-adding script takes, so Redis serves others between chunks.
const ADD_CHUNK: usize = 1000;

/// Moves a read position forward, never past the last seq. KEYS: reads, seq. ARGV: user, seq.
const MARK_READ: &str = r#"
local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
local last = tonumber(redis.call('GET', KEYS[2]) or '0')
local want = math.min(tonumber(ARGV[2]), last)
if want > cur then
  redis.call('HSET', KEYS[1], ARGV[1], want)
  return want
end
return cur
"#;

/// Conversations in Redis.
#[derive(Clone)]
pub struct RedisStore {
    pub(super) conn: RedisConn,
    retention: usize,
    send: redis::Script,
    mark_read: redis::Script,
    /// Replicas a send waits for (`WAIT`), and how long.
    pub(super) ack: Option<(u32, std::time::Duration)>,
}

impl RedisStore {
    /// A store on `conn`, keeping about `retention` messages per conversation.
    pub fn new(conn: RedisConn, retention: usize) -> Self {
        Self {
            conn,
            retention: retention.max(1),
            send: redis::Script::new(SEND),
            mark_read: redis::Script::new(MARK_READ),
            ack: None,
        }
    }

    /// Sends acknowledged only once `replicas` replicas have them, waiting at most
    /// `timeout` (`None`: once the master has them).
    pub fn with_ack(mut self, ack: Option<(u32, std::time::Duration)>) -> Self {
        self.ack = ack.filter(|(n, _)| *n > 0);
        self
    }

    /// Appends `WAIT` to a pipeline of sends on one slot (so it goes to the same master,
    /// after them, and covers them all), when sends wait for replicas.
    pub(super) fn add_wait(&self, pipe: &mut redis::Pipeline) {
        if let Some((replicas, timeout)) = self.ack {
            pipe.cmd("WAIT")
                .arg(replicas)
                .arg(timeout.as_millis() as u64);
        }
    }

    /// Publishes the messages of `sends` that replicas confirmed (`results`, in order):
    /// a stored one with its envelope, a duplicate as stored (its first attempt may have
    /// been refused unpublished), re-read from history. A message published twice is
    /// dropped by subscribers (they go by seq).
    async fn publish_confirmed<T>(
        &self,
        sends: &[Outgoing],
        results: &[Result<(Sent, T)>],
    ) -> Result<()> {
        let mut batch = Batch::new();
        for (o, r) in sends.iter().zip(results) {
            let channel = conversation_channel(&o.conversation_id);
            let payload = match r {
                Ok((Sent::Stored(seq), _)) => {
                    let mut payload = crate::message::message_header(*seq);
                    payload.extend_from_slice(&o.envelope);
                    payload
                }
                Ok((Sent::Duplicate { seq, .. }, _)) => {
                    let stored = self
                        .history(&o.conversation_id, Range::After(seq - 1), 1)
                        .await?;
                    let Some(message) = stored.messages.into_iter().find(|m| m.seq == *seq) else {
                        continue;
                    };
                    let envelope = crate::message::Envelope {
                        message: Some(message),
                        ..Default::default()
                    };
                    let mut payload = crate::message::message_header(*seq);
                    payload.extend_from_slice(&prost::Message::encode_to_vec(&envelope));
                    payload
                }
                _ => continue,
            };
            let mut publish = redis::cmd(self.conn.publish_command());
            publish.arg(&channel).arg(payload);
            batch.add(&channel, publish);
        }
        batch.run(&self.conn).await?;
        Ok(())
    }

    /// Turns stored (and duplicate) sends into UNAVAILABLE when fewer than the required
    /// replicas confirmed them (`confirmed` is WAIT's reply): stored, maybe lost by a
    /// failover, safe to retry.
    fn unconfirmed<T>(&self, results: &mut [Result<(Sent, T)>], confirmed: Option<i64>) {
        let Some((replicas, timeout)) = self.ack else {
            return;
        };
        let got = confirmed.unwrap_or(0);
        if got >= i64::from(replicas) {
            return;
        }
        for r in results.iter_mut() {
            // A duplicate too: its first copy may be the very write that is not replicated.
            if matches!(r, Ok((Sent::Stored(_) | Sent::Duplicate { .. }, _))) {
                *r = Err(Error::storage(format!(
                    "stored, but only {got} of {replicas} Redis replicas confirmed it within {} ms (REDIS_ACK_REPLICAS); retry with the same client_msg_id",
                    timeout.as_millis()
                )));
            }
        }
    }

    /// Moves every user list stored under the untagged names of builds before the cluster
    /// engine to the tagged ones (one script per list, merged); returns how many it moved. Safe
    /// to run on several instances at once and again; a page read meanwhile may miss a
    /// user's older conversations until their list is moved. One Redis only (a cluster
    /// never held the old names).
    pub async fn migrate_user_lists(&self) -> Result<usize> {
        if self.conn.is_cluster() {
            return Ok(0);
        }
        let script = redis::Script::new(MIGRATE_LIST);
        let mut conn = self.conn.clone();
        let mut cursor: u64 = 0;
        let mut moved = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg("sb:msg:user:*")
                .arg("COUNT")
                .arg(MIGRATE_SCAN)
                .query_async(&mut conn)
                .await?;
            for old in keys.iter().filter(|k| !k.starts_with(USER_PREFIX)) {
                let Some(rest) = old.strip_prefix("sb:msg:user:") else {
                    continue;
                };
                let (new, kind) = if let Some(user) = rest.strip_suffix(":convs") {
                    (user_index(user), "z")
                } else if let Some(user) = rest.strip_suffix(":wide") {
                    (user_wide(user), "s")
                } else {
                    continue;
                };
                let done: i64 = script
                    .key(old)
                    .key(&new)
                    .arg(kind)
                    .invoke_async(&mut conn)
                    .await?;
                moved += done as usize;
            }
            if next == 0 {
                return Ok(moved);
            }
            cursor = next;
        }
    }

    /// Lists a new conversation in its members' lists (in their slots), before it is
    /// stored: a crash between leaves list entries of a conversation that does not exist,
    /// which pages skip, never a conversation missing from its members' lists.
    pub(super) async fn list_for_members(&self, c: &ConversationRecord) -> Result<()> {
        let wide = c.members.len() > WIDE_MEMBERS;
        let mut batch = Batch::new();
        for m in &c.members {
            if wide {
                let list = user_wide(&m.user_id);
                let mut join = redis::cmd("SADD");
                join.arg(&list).arg(&c.id);
                batch.add(&list, join);
            } else {
                let list = user_index(&m.user_id);
                let mut join = redis::cmd("ZADD");
                join.arg(&list).arg(m.joined_at_ms).arg(&c.id);
                batch.add(&list, join);
            }
        }
        batch.run(&self.conn).await?;
        Ok(())
    }

    /// Raises conversation `id` to `at_ms` in each of `members`' lists (`ZADD GT`, so
    /// it never moves back and a repeat changes nothing): on a cluster, the send step's
    /// second half. A crash before it leaves the ranks behind until the next message.
    pub(super) async fn raise(&self, id: &str, members: &[String], at_ms: u64) -> Result<()> {
        let mut batch = Batch::new();
        for user in members {
            let list = user_index(user);
            let mut up = redis::cmd("ZADD");
            up.arg(&list).arg("GT").arg(at_ms).arg(id);
            batch.add(&list, up);
        }
        batch.run(&self.conn).await?;
        Ok(())
    }

    /// `batch` (on one slot) as one pipeline of the send script, in order; if Redis lost
    /// the script, the sends from the first refusal on go again with its source. With
    /// REDIS_ACK_REPLICAS, each pipeline ends with `WAIT`, and stored sends whose pipeline
    /// was not confirmed by enough replicas answer UNAVAILABLE.
    async fn send_in_order(&self, batch: &[Outgoing]) -> Vec<SendOutcome> {
        self.send_in_order_on(batch, None)
            .await
            .unwrap_or_else(|(results, e)| fail_rest(results, batch.len(), &e.to_string()))
    }

    /// [`send_in_order`](Self::send_in_order) for sends on one slot (`master: None`) or on
    /// any slots of the cluster master serving the slot of key `master` (one pipeline
    /// routed there: every send is safe to repeat, its idempotency key answers a repeat as
    /// a duplicate). A pipeline that fails as a whole answers the results so far and the
    /// error.
    async fn send_in_order_on(
        &self,
        batch: &[Outgoing],
        master: Option<&[u8]>,
    ) -> std::result::Result<Vec<SendOutcome>, SendsCut> {
        let mut conn = self.conn.clone();
        let mut results: Vec<SendOutcome> = Vec::with_capacity(batch.len());
        let no_script = |r: &redis::RedisResult<redis::Value>| {
            r.as_ref().is_err_and(|e| {
                e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
            })
        };
        for round in 0..2 {
            let rest = &batch[results.len()..];
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            for o in rest {
                if round == 0 {
                    pipe.invoke_script(&self.send_invocation(o));
                } else {
                    self.send_eval(&mut pipe, o);
                }
            }
            self.add_wait(&mut pipe);
            let count = rest.len() + usize::from(self.ack.is_some());
            let replies: redis::RedisResult<Vec<redis::RedisResult<redis::Value>>> = match master {
                None => pipe.query_async(&mut conn).await,
                Some(key) => self.conn.pipeline_on(pipe, count, key).await.map(|values| {
                    values
                        .into_iter()
                        .map(|v| match v {
                            redis::Value::ServerError(e) => Err(e.into()),
                            v => Ok(v),
                        })
                        .collect()
                }),
            };
            let mut replies = match replies {
                Ok(r) => r,
                Err(e) => return Err((results, e)),
            };
            let confirmed = match self.ack {
                Some(_) => replies
                    .pop()
                    .and_then(|r| r.ok())
                    .and_then(|v| redis::from_redis_value::<i64>(v).ok()),
                None => None,
            };
            let first = results.len();
            for reply in replies {
                if round == 0 && no_script(&reply) {
                    break;
                }
                results.push(reply.map_err(Error::from).and_then(|v| {
                    let reply: Vec<String> = redis::from_redis_value(v)
                        .map_err(|e| Error::Internal(format!("send script answered {e}")))?;
                    send_outcome(reply)
                }));
            }
            self.unconfirmed(&mut results[first..], confirmed);
            if self.ack.is_some()
                && let Err(e) = self
                    .publish_confirmed(&batch[first..results.len()], &results[first..])
                    .await
            {
                // Stored and replicated, but not announced: subscribers get them with the
                // conversation's next message (the gap rule), so the sends stand.
                tracing::warn!(error = %e, "publishing confirmed messages failed");
            }
            if results.len() == batch.len() {
                break;
            }
        }
        Ok(fail_rest(
            results,
            batch.len(),
            "redis answered fewer replies than sends",
        ))
    }

    /// Sends of any conversations one master serves (`master`: a key of its): one routed
    /// pipeline when they span conversations; if it fails as a whole (a slot moved since
    /// the masters were read), the masters are read again and each conversation's sends
    /// go as their own pipeline (a send the failed pipeline stored answers as a duplicate
    /// of itself, with its seq).
    async fn send_on_master(&self, sends: &[Outgoing], master: Option<&[u8]>) -> Vec<SendOutcome> {
        let one_conversation = sends
            .iter()
            .all(|o| Some(&o.conversation_id) == sends.first().map(|f| &f.conversation_id));
        if one_conversation {
            return self.send_in_order(sends).await;
        }
        match self.send_in_order_on(sends, master).await {
            Ok(results) => return results,
            Err((_, e)) => {
                tracing::debug!(error = %e, "a master's pipeline of sends failed; sending per conversation");
                self.conn.forget_masters();
            }
        }
        let mut by_conversation: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, o) in sends.iter().enumerate() {
            by_conversation
                .entry(o.conversation_id.as_str())
                .or_default()
                .push(i);
        }
        let parts: Vec<Vec<usize>> = by_conversation.into_values().collect();
        let outcomes = futures::future::join_all(parts.iter().map(|indices| {
            let part: Vec<Outgoing> = indices.iter().map(|&i| sends[i].clone()).collect();
            async move { self.send_in_order(&part).await }
        }))
        .await;
        gather(sends.len(), &parts, outcomes)
    }

    /// The send script's keys and arguments for `o`.
    fn send_parts(&self, o: &Outgoing) -> (Vec<String>, Vec<Vec<u8>>) {
        use redis::ToRedisArgs;
        let id = &o.conversation_id;
        let keys = vec![
            key(id, "meta"),
            key(id, "members"),
            key(id, "seq"),
            key(id, "log"),
            key(id, &format!("idem:{}:{}", o.sender_id, o.client_msg_id)),
            key(id, "reads"),
            key(id, "activity"),
        ];
        let mut args = Vec::new();
        args.extend(o.sender_id.to_redis_args());
        args.push(o.message.clone());
        args.extend(self.retention.to_redis_args());
        args.extend(format!("{}|{}", o.message_id, o.sent_at_ms).to_redis_args());
        args.extend(IDEMPOTENCY_TTL_SECS.to_redis_args());
        args.extend(conversation_channel(id).to_redis_args());
        args.push(o.envelope.clone());
        args.extend(o.sent_at_ms.to_redis_args());
        args.extend(id.to_redis_args());
        args.extend(USER_PREFIX.to_redis_args());
        args.extend(NARROW_SUFFIX.to_redis_args());
        args.extend(WIDE_MEMBERS.to_redis_args());
        // Waiting for replicas, a message is published once they have it (see `confirmed`):
        // never one that a failover could still take back.
        let publish = if self.ack.is_some() {
            ""
        } else {
            self.conn.publish_command()
        };
        args.extend(publish.to_redis_args());
        args.extend(if self.conn.is_cluster() { "0" } else { "1" }.to_redis_args());
        (keys, args)
    }

    fn send_invocation(&self, o: &Outgoing) -> redis::ScriptInvocation<'_> {
        let (keys, args) = self.send_parts(o);
        let mut invocation = self.send.prepare_invoke();
        for k in keys {
            invocation.key(k);
        }
        for a in args {
            invocation.arg(a);
        }
        invocation
    }

    /// The send step as one command of a transaction `pipe`: EVAL with the script's
    /// source, so it runs whether or not Redis has it cached; its reply is the pipeline's
    /// (read it with [`send_outcome`]).
    pub(super) fn send_eval(&self, pipe: &mut redis::Pipeline, o: &Outgoing) {
        let (keys, args) = self.send_parts(o);
        pipe.cmd("EVAL")
            .arg(SEND)
            .arg(keys.len())
            .arg(keys)
            .arg(args);
    }
}

/// A send's result, with the members whose ranks the caller must raise (on a cluster).
type SendOutcome = Result<(Sent, Vec<String>)>;

/// Each part's outcomes (`parts[n]` holds indices into `len` sends, `outcomes[n]` their
/// results in the same order) back in the sends' order; a send without one failed.
fn gather(len: usize, parts: &[Vec<usize>], outcomes: Vec<Vec<SendOutcome>>) -> Vec<SendOutcome> {
    let mut results: Vec<Option<SendOutcome>> = (0..len).map(|_| None).collect();
    for (indices, outcome) in parts.iter().zip(outcomes) {
        for (&i, r) in indices.iter().zip(outcome) {
            results[i] = Some(r);
        }
    }
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(Error::storage("a send got no result"))))
        .collect()
}

/// The sends' results so far, and why the pipeline failed as a whole.
type SendsCut = (Vec<SendOutcome>, redis::RedisError);

/// `results`, completed to `len` with storage errors saying `cause`.
fn fail_rest<T>(mut results: Vec<Result<T>>, len: usize, cause: &str) -> Vec<Result<T>> {
    results.resize_with(len, || Err(Error::storage(cause)));
    results
}

/// What the send script answered, with the members whose ranks the caller must raise (on
/// a cluster, for a narrow conversation).
pub(super) fn send_outcome(reply: Vec<String>) -> SendOutcome {
    let bad = || Error::Internal(format!("send script answered {reply:?}"));
    let sent = match reply.first().map(String::as_str) {
        Some("ok") => {
            let seq = reply.get(1).and_then(|s| s.parse().ok()).ok_or_else(bad)?;
            let members = reply.get(2..).unwrap_or_default().to_vec();
            return Ok((Sent::Stored(seq), members));
        }
        Some("dup") => {
            let raw = reply.get(1).ok_or_else(bad)?;
            let mut parts = raw.splitn(3, '|');
            let seq = parts.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
            let message_id = parts.next().ok_or_else(bad)?.to_owned();
            let sent_at_ms = parts.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
            Sent::Duplicate {
                seq,
                message_id,
                sent_at_ms,
            }
        }
        Some("nf") => Sent::NotFound,
        Some("nm") => Sent::NotMember,
        Some("ro") => Sent::ReadOnly,
        _ => return Err(bad()),
    };
    Ok((sent, Vec::new()))
}

/// Channels one pipeline publishes to.
const PUBLISH_BATCH: usize = 500;

pub(super) fn key(id: &str, part: &str) -> String {
    format!("sb:msg:{{c:{id}}}:{part}")
}

const USER_PREFIX: &str = "sb:msg:user:{u:";
const NARROW_SUFFIX: &str = "}:convs";
const WIDE_SUFFIX: &str = "}:wide";

/// The user's narrow conversations by rank.
pub(super) fn user_index(user: &str) -> String {
    format!("{USER_PREFIX}{user}{NARROW_SUFFIX}")
}

/// The user's wide conversations.
fn user_wide(user: &str) -> String {
    format!("{USER_PREFIX}{user}{WIDE_SUFFIX}")
}

fn direct_key(pair: &str) -> String {
    format!("sb:msg:direct:{pair}")
}

fn parse_record(
    id: &str,
    meta: HashMap<String, String>,
    members: HashMap<String, u64>,
) -> Result<Option<ConversationRecord>> {
    if meta.is_empty() {
        return Ok(None);
    }
    let corrupt = |f: &str| Error::Internal(format!("conversation {id}: bad or missing {f}"));
    let mut members: Vec<Member> = members
        .into_iter()
        .map(|(user_id, joined_at_ms)| Member {
            user_id,
            joined_at_ms,
        })
        .collect();
    members.sort_by(|a, b| {
        a.joined_at_ms
            .cmp(&b.joined_at_ms)
            .then_with(|| a.user_id.cmp(&b.user_id))
    });
    Ok(Some(ConversationRecord {
        id: id.to_owned(),
        kind: meta
            .get("kind")
            .and_then(|k| Kind::parse(k))
            .ok_or_else(|| corrupt("kind"))?,
        title: meta.get("title").cloned().unwrap_or_default(),
        owner_id: meta.get("owner_id").cloned().unwrap_or_default(),
        created_at_ms: meta
            .get("created_at_ms")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| corrupt("created_at_ms"))?,
        epoch: meta.get("epoch").cloned().ok_or_else(|| corrupt("epoch"))?,
        read_only: meta.get("read_only").is_some_and(|v| v == "1"),
        members,
    }))
}

/// Adds the writes that store `c` (its own keys, one slot) to `pipe`; the members' lists
/// are written first, by `RedisStore::list_for_members`.
pub(super) fn write_conversation(pipe: &mut redis::Pipeline, c: &ConversationRecord) {
    let wide = c.members.len() > WIDE_MEMBERS;
    pipe.hset_multiple(
        key(&c.id, "meta"),
        &[
            ("kind", c.kind.as_str().to_owned()),
            ("title", c.title.clone()),
            ("owner_id", c.owner_id.clone()),
            ("created_at_ms", c.created_at_ms.to_string()),
            ("epoch", c.epoch.clone()),
            ("read_only", if c.read_only { "1" } else { "0" }.to_owned()),
            ("wide", if wide { "1" } else { "0" }.to_owned()),
        ],
    )
    .ignore();
    let members: Vec<(String, u64)> = c
        .members
        .iter()
        .map(|m| (m.user_id.clone(), m.joined_at_ms))
        .collect();
    pipe.hset_multiple(key(&c.id, "members"), &members).ignore();
    // Never moves an existing conversation's activity back (a record rewritten later).
    pipe.cmd("SET")
        .arg(key(&c.id, "activity"))
        .arg(c.created_at_ms)
        .arg("NX")
        .ignore();
}

/// A sorted-set range read WITHSCORES: (member, score) pairs.
type Scored = Vec<(String, u64)>;

/// An XRANGE/XREVRANGE reply: `[[id, [field, value, …]], …]`.
type Entries = Vec<(String, Vec<Vec<u8>>)>;

fn decode_entries(entries: Entries) -> Result<Vec<pb::Message>> {
    entries
        .into_iter()
        .map(|(id, fields)| {
            let seq: u64 = id
                .split_once('-')
                .and_then(|(s, _)| s.parse().ok())
                .ok_or_else(|| Error::Internal(format!("history entry id {id}")))?;
            let bytes = fields
                .chunks(2)
                .find(|kv| kv.first().is_some_and(|k| k == b"m"))
                .and_then(|kv| kv.get(1))
                .ok_or_else(|| Error::Internal(format!("history entry {id} has no message")))?;
            let mut m: pb::Message = prost::Message::decode(bytes.as_slice())
                .map_err(|e| Error::Internal(format!("history entry {id}: {e}")))?;
            m.seq = seq;
            Ok(m)
        })
        .collect()
}

fn seq_of(id: &str) -> u64 {
    id.split_once('-')
        .and_then(|(s, _)| s.parse().ok())
        .unwrap_or(0)
}

impl MessagingStore for RedisStore {
    /// The members' lists first, then the conversation: a crash between leaves list
    /// entries of a conversation that does not exist, which pages skip.
    async fn create(&self, c: &ConversationRecord) -> Result<()> {
        self.list_for_members(c).await?;
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.atomic();
        write_conversation(&mut pipe, c);
        pipe.query_async::<()>(&mut conn).await?;
        Ok(())
    }

    async fn create_direct(
        &self,
        pair_key: &str,
        candidate: &ConversationRecord,
    ) -> Result<(ConversationRecord, bool)> {
        let mut conn = self.conn.clone();
        let claimed: Option<String> = redis::cmd("SET")
            .arg(direct_key(pair_key))
            .arg(&candidate.id)
            .arg("NX")
            .query_async(&mut conn)
            .await?;
        if claimed.is_some() {
            self.create(candidate).await?;
            return Ok((candidate.clone(), true));
        }
        let id: Option<String> = conn.get(direct_key(pair_key)).await?;
        let id = id.ok_or_else(|| Error::storage("direct conversation key vanished"))?;
        match self.conversation(&id).await? {
            Some(existing) => Ok((existing, false)),
            None => {
                // The creator died between claiming the pair and writing the record.
                let record = ConversationRecord {
                    id,
                    ..candidate.clone()
                };
                self.create(&record).await?;
                Ok((record, true))
            }
        }
    }

    async fn conversation(&self, id: &str) -> Result<Option<ConversationRecord>> {
        let mut conn = self.conn.clone();
        let (meta, members): (HashMap<String, String>, HashMap<String, u64>) = redis::pipe()
            .hgetall(key(id, "meta"))
            .hgetall(key(id, "members"))
            .query_async(&mut conn)
            .await?;
        parse_record(id, meta, members)
    }

    async fn membership(&self, id: &str, user: &str) -> Result<Option<Membership>> {
        let mut conn = self.conn.clone();
        let (epoch, member): (Option<String>, bool) = redis::pipe()
            .hget(key(id, "meta"), "epoch")
            .hexists(key(id, "members"), user)
            .query_async(&mut conn)
            .await?;
        Ok(epoch.map(|epoch| Membership { member, epoch }))
    }

    /// The member-adding script in chunks of 1,000 users (one pipeline on the
    /// conversation's slot, by its source, so a flushed script cache does not matter; each
    /// chunk atomic), then the members' lists (idempotent: a crash between the two leaves
    /// members missing from their lists until the next message puts them back, in a narrow
    /// conversation).
    async fn add_members(
        &self,
        id: &str,
        users: &[String],
        now_ms: u64,
    ) -> Result<Option<ConversationRecord>> {
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        for chunk in users.chunks(ADD_CHUNK) {
            pipe.cmd("EVAL")
                .arg(ADD_MEMBERS)
                .arg(2)
                .arg(key(id, "meta"))
                .arg(key(id, "members"))
                .arg(now_ms)
                .arg(WIDE_MEMBERS)
                .arg(chunk);
        }
        let replies: Vec<(u8, Vec<String>)> = pipe.query_async(&mut conn).await?;
        if replies.iter().any(|(found, _)| *found == 0) {
            return Ok(None);
        }
        let mut batch = Batch::new();
        match replies.into_iter().find(|(state, _)| *state != 1) {
            // Narrow still: the new members join their lists at the join time.
            None => {
                for user in users {
                    let list = user_index(user);
                    let mut join = redis::cmd("ZADD");
                    join.arg(&list).arg("NX").arg(now_ms).arg(id);
                    batch.add(&list, join);
                }
            }
            // Wide now: every member's entry moves to the wide set.
            Some((2, members)) => {
                for user in &members {
                    let (list, wide) = (user_index(user), user_wide(user));
                    let mut leave = redis::cmd("ZREM");
                    leave.arg(&list).arg(id);
                    batch.add(&list, leave);
                    let mut join = redis::cmd("SADD");
                    join.arg(&wide).arg(id);
                    batch.add(&wide, join);
                }
            }
            // Wide already.
            Some(_) => {
                for user in users {
                    let wide = user_wide(user);
                    let mut join = redis::cmd("SADD");
                    join.arg(&wide).arg(id);
                    batch.add(&wide, join);
                }
            }
        }
        batch.run(&self.conn).await?;
        self.conversation(id).await
    }

    /// Off the member's lists first, then out of the conversation: a crash between the
    /// two leaves a member who does not see the conversation listed until its next message,
    /// never a listed conversation one is not in.
    async fn remove_member(
        &self,
        id: &str,
        user: &str,
        new_owner: Option<&str>,
    ) -> Result<Option<ConversationRecord>> {
        let mut conn = self.conn.clone();
        let () = redis::pipe()
            .zrem(user_index(user), id)
            .ignore()
            .srem(user_wide(user), id)
            .ignore()
            .query_async(&mut conn)
            .await?;
        let mut pipe = redis::pipe();
        pipe.atomic().hdel(key(id, "members"), user).ignore();
        if let Some(owner) = new_owner {
            pipe.hset(key(id, "meta"), "owner_id", owner).ignore();
        }
        pipe.query_async::<()>(&mut conn).await?;
        self.conversation(id).await
    }

    async fn user_conversations(&self, user: &str) -> Result<Vec<String>> {
        let mut conn = self.conn.clone();
        let (mut narrow, wide): (Vec<String>, Vec<String>) = redis::pipe()
            .zrange(user_index(user), 0, -1)
            .smembers(user_wide(user))
            .query_async(&mut conn)
            .await?;
        narrow.extend(wide);
        Ok(narrow)
    }

    async fn send(&self, o: &Outgoing) -> Result<Sent> {
        let (sent, members) = self
            .send_in_order(std::slice::from_ref(o))
            .await
            .pop()
            .unwrap_or_else(|| Err(Error::storage("a send got no result")))?;
        self.raise(&o.conversation_id, &members, o.sent_at_ms)
            .await?;
        Ok(sent)
    }

    /// One round trip for the whole batch: a pipeline of the send script, run by Redis in
    /// order. If Redis has lost the script (a restart), it runs none of them from the
    /// first refusal on; those are sent again, in order, with the script's source. On a
    /// cluster, one such pipeline per conversation, all at once (each conversation's sends
    /// keep their order), then the narrow conversations' ranks in one more round trip.
    async fn send_batch(&self, batch: &[Outgoing]) -> Vec<Result<Sent>> {
        if !self.conn.is_cluster() {
            return self
                .send_in_order(batch)
                .await
                .into_iter()
                .map(|r| r.map(|(sent, _)| sent))
                .collect();
        }
        // One pipeline per master (the masters as last read), the sends in batch order, so
        // each conversation's keep theirs; per conversation while the masters are unknown.
        let metas: Vec<String> = batch
            .iter()
            .map(|o| key(&o.conversation_id, "meta"))
            .collect();
        let masters = self
            .conn
            .masters_of(&metas.iter().map(|k| k.as_bytes()).collect::<Vec<_>>())
            .await;
        let mut groups: HashMap<Result<usize, &str>, Vec<usize>> = HashMap::new();
        for (i, (o, master)) in batch.iter().zip(masters).enumerate() {
            let group = master.ok_or(o.conversation_id.as_str());
            groups.entry(group).or_default().push(i);
        }
        let groups: Vec<Vec<usize>> = groups.into_values().collect();
        let outcomes = futures::future::join_all(groups.iter().map(|indices| {
            let sends: Vec<Outgoing> = indices.iter().map(|&i| batch[i].clone()).collect();
            let master = indices.first().map(|&i| metas[i].as_bytes());
            async move { self.send_on_master(&sends, master).await }
        }))
        .await;
        let mut ranks = Batch::new();
        let results: Vec<Result<Sent>> = gather(batch.len(), &groups, outcomes)
            .into_iter()
            .zip(batch)
            .map(|(r, o)| {
                r.map(|(sent, members)| {
                    for user in &members {
                        let list = user_index(user);
                        let mut up = redis::cmd("ZADD");
                        up.arg(&list)
                            .arg("GT")
                            .arg(o.sent_at_ms)
                            .arg(&o.conversation_id);
                        ranks.add(&list, up);
                    }
                    sent
                })
            })
            .collect();
        if let Err(e) = ranks.run(&self.conn).await {
            // The messages are stored and published; only their ranks lag (until the next
            // message), so the sends still succeed.
            tracing::warn!(error = %e, "raising conversations in their members' lists failed");
        }
        results
    }

    async fn history(&self, id: &str, range: Range, limit: usize) -> Result<History> {
        let mut conn = self.conn.clone();
        let log = key(id, "log");
        let mut pipe = redis::pipe();
        match range {
            Range::After(after) => {
                pipe.cmd("XRANGE")
                    .arg(&log)
                    .arg(format!("{}-0", after.saturating_add(1)))
                    .arg("+")
                    .arg("COUNT")
                    .arg(limit);
            }
            Range::Before(before) if before <= 1 => {
                // Nothing is below seq 1; an empty XRANGE keeps the reply shape.
                pipe.cmd("XRANGE").arg(&log).arg("0-1").arg("0-1");
            }
            Range::Before(before) => {
                pipe.cmd("XREVRANGE")
                    .arg(&log)
                    .arg(format!("{}-0", before - 1))
                    .arg("-")
                    .arg("COUNT")
                    .arg(limit);
            }
            Range::Latest => {
                pipe.cmd("XREVRANGE")
                    .arg(&log)
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(limit);
            }
        }
        pipe.cmd("XRANGE")
            .arg(&log)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(1);
        pipe.get(key(id, "seq"));
        let (mut entries, first, last): (Entries, Entries, Option<u64>) =
            pipe.query_async(&mut conn).await?;
        if !matches!(range, Range::After(_)) {
            entries.reverse();
        }
        Ok(History {
            messages: decode_entries(entries)?,
            oldest_seq: first.first().map(|(id, _)| seq_of(id)).unwrap_or(0),
            last_seq: last.unwrap_or(0),
        })
    }

    async fn last_seqs(&self, ids: &[String]) -> Result<Vec<u64>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut batch = Batch::new();
        for id in ids {
            let seq = key(id, "seq");
            let mut get = redis::cmd("GET");
            get.arg(&seq);
            batch.add(&seq, get);
        }
        let seqs: Vec<Option<u64>> = batch.run_as(&self.conn).await?;
        Ok(seqs.into_iter().map(|s| s.unwrap_or(0)).collect())
    }

    /// One round trip for the whole page (one pipeline per slot on a cluster): five
    /// commands per conversation.
    async fn summaries(&self, ids: &[String], user: &str) -> Result<Vec<Option<super::Summary>>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut batch = Batch::new();
        for id in ids {
            // The five share the conversation's slot: one pipeline per slot on a cluster.
            let slot = key(id, "meta");
            let mut meta = redis::cmd("HGETALL");
            meta.arg(&slot);
            let mut members = redis::cmd("HGETALL");
            members.arg(key(id, "members"));
            let mut latest = redis::cmd("XREVRANGE");
            latest
                .arg(key(id, "log"))
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1);
            let mut seq = redis::cmd("GET");
            seq.arg(key(id, "seq"));
            let mut read = redis::cmd("HGET");
            read.arg(key(id, "reads")).arg(user);
            for cmd in [meta, members, latest, seq, read] {
                batch.add(&slot, cmd);
            }
        }
        let values: Vec<redis::Value> = batch.run(&self.conn).await?;
        let mut out = Vec::with_capacity(ids.len());
        let parse = |e: redis::ParsingError| Error::storage(format!("a summary reply: {e}"));
        for (id, v) in ids.iter().zip(values.chunks(5)) {
            let [meta, members, latest, seq, read] = v else {
                return Err(Error::storage("a summary reply of the wrong shape"));
            };
            let meta: HashMap<String, String> = redis::from_redis_value_ref(meta).map_err(parse)?;
            let members: HashMap<String, u64> =
                redis::from_redis_value_ref(members).map_err(parse)?;
            let Some(record) = parse_record(id, meta, members)? else {
                out.push(None);
                continue;
            };
            let latest: Entries = redis::from_redis_value_ref(latest).map_err(parse)?;
            let last_seq: Option<u64> = redis::from_redis_value_ref(seq).map_err(parse)?;
            let read_seq: Option<u64> = redis::from_redis_value_ref(read).map_err(parse)?;
            out.push(Some(super::Summary {
                record,
                last_message: decode_entries(latest)?.into_iter().next(),
                last_seq: last_seq.unwrap_or(0),
                read_seq: read_seq.unwrap_or(0),
            }));
        }
        Ok(out)
    }

    async fn read_position(&self, id: &str, user: &str) -> Result<u64> {
        let mut conn = self.conn.clone();
        let at: Option<u64> = conn.hget(key(id, "reads"), user).await?;
        Ok(at.unwrap_or(0))
    }

    /// One round trip for the narrow part (a range of the sorted set, `limit` + 1 long,
    /// plus the entries tied with the cursor) and the wide set; one more, only if the user
    /// is in wide conversations, for their activity and the user's join times.
    async fn ranked(
        &self,
        user: &str,
        after: Option<&Ranked>,
        limit: usize,
    ) -> Result<(Vec<Ranked>, bool)> {
        let mut conn = self.conn.clone();
        let index = user_index(user);
        let mut pipe = redis::pipe();
        let below = match after {
            None => "+inf".to_owned(),
            Some((at, _)) => format!("({at}"),
        };
        pipe.cmd("ZREVRANGEBYSCORE")
            .arg(&index)
            .arg(below)
            .arg("-inf")
            .arg("WITHSCORES")
            .arg("LIMIT")
            .arg(0)
            .arg(limit.saturating_add(1));
        // Those at the cursor's very rank (ties are rare: the same millisecond).
        let at = after.map_or(0, |(at, _)| *at);
        pipe.cmd("ZRANGEBYSCORE")
            .arg(&index)
            .arg(at)
            .arg(at)
            .arg("WITHSCORES");
        pipe.smembers(user_wide(user));
        let (narrow, ties, wide): (Scored, Scored, Vec<String>) =
            pipe.query_async(&mut conn).await?;
        let mut all: Vec<Ranked> = narrow.into_iter().map(|(id, at)| (at, id)).collect();
        if after.is_some() {
            all.extend(ties.into_iter().map(|(id, at)| (at, id)));
        }
        if !wide.is_empty() {
            let mut batch = Batch::new();
            for id in &wide {
                let (activity, members) = (key(id, "activity"), key(id, "members"));
                let mut active = redis::cmd("GET");
                active.arg(&activity);
                batch.add(&activity, active);
                let mut joined = redis::cmd("HGET");
                joined.arg(&members).arg(user);
                batch.add(&members, joined);
            }
            let values: Vec<Option<u64>> = batch.run_as(&self.conn).await?;
            let found: Vec<(Option<u64>, Option<u64>)> = values
                .chunks(2)
                .map(|p| (p[0], p.get(1).copied().flatten()))
                .collect();
            // A conversation the user has left since is not theirs.
            all.extend(
                wide.into_iter()
                    .zip(found)
                    .filter_map(|(id, (active, joined))| {
                        Some((active.unwrap_or(0).max(joined?), id))
                    }),
            );
        }
        Ok(super::page_of(all, after, limit))
    }

    async fn mark_read(&self, id: &str, user: &str, seq: u64) -> Result<u64> {
        let mut conn = self.conn.clone();
        Ok(self
            .mark_read
            .key(key(id, "reads"))
            .key(key(id, "seq"))
            .arg(user)
            .arg(seq)
            .invoke_async(&mut conn)
            .await?)
    }

    async fn read_positions(&self, id: &str) -> Result<HashMap<String, u64>> {
        let mut conn = self.conn.clone();
        Ok(conn.hgetall(key(id, "reads")).await?)
    }

    /// In pipelines of `PUBLISH_BATCH` (500): one round trip per batch, not per channel.
    async fn publish_many(&self, channels: &[String], payload: Vec<u8>) -> Result<()> {
        for chunk in channels.chunks(PUBLISH_BATCH) {
            let mut batch = Batch::new();
            for channel in chunk {
                let mut publish = redis::cmd(self.conn.publish_command());
                publish.arg(channel).arg(payload.as_slice());
                batch.add(channel, publish);
            }
            batch.run(&self.conn).await?;
        }
        Ok(())
    }

    async fn publish(&self, channel: &str, payload: Vec<u8>) -> Result<()> {
        let mut conn = self.conn.clone();
        let _: i64 = redis::cmd(self.conn.publish_command())
            .arg(channel)
            .arg(payload)
            .query_async(&mut conn)
            .await?;
        Ok(())
    }
}
