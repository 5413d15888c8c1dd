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
//! each user's list, in two parts:
//! - `sb:msg:user:<id>:convs`, a sorted set of the user's conversations of at most
//!   [`WIDE_MEMBERS`] members, scored by rank ([`Ranked`]): joining adds
//!   the conversation at the join time and the send script raises every member's score to
//!   the message's time (`ZADD GT`), so a page is one range read;
//! - `sb:msg:user:<id>:wide`, a set of the user's *wide* conversations (more members;
//!   meta `wide` = 1). A send there touches no member's list (its work stays constant
//!   whatever the group's size); a page reads each wide conversation's `activity` instead
//!   and merges. A conversation turns wide once, when it grows past the limit, and stays so.
//!
//! The send script and the member-adding script write users' list keys they do not
//! declare: fine on one Redis, not in a Redis Cluster (a later change moves them out).

use std::collections::HashMap;

use redis::AsyncCommands;
use switchboard_common::redis_conn::RedisConn;
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
/// (`SPUBLISH` on a cluster: the channel is in the conversation's slot).
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
if narrow then
  redis.call('SET', KEYS[7], ARGV[8])
  for _, user in ipairs(redis.call('HKEYS', KEYS[2])) do
    redis.call('ZADD', ARGV[10] .. user .. ARGV[11], 'GT', ARGV[8], ARGV[9])
  end
elseif tonumber(ARGV[8]) > tonumber(redis.call('GET', KEYS[7]) or '0') then
  redis.call('SET', KEYS[7], ARGV[8])
end
redis.call(ARGV[13], ARGV[6], '1M' .. seq .. '\n' .. ARGV[7])
return {'ok', tostring(seq)}
"#;

/// Adds members (existing ones keep their join time) and lists the conversation for
/// them; turns the conversation wide when it grows past the limit. KEYS: meta, members.
/// ARGV: conversation id, now (ms), the wide limit, list key prefix, narrow suffix, wide
/// suffix, then the users. Returns 0 if there is no such conversation.
const ADD_MEMBERS: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local wide = redis.call('HGET', KEYS[1], 'wide') == '1'
for i = 7, #ARGV do
  redis.call('HSETNX', KEYS[2], ARGV[i], ARGV[2])
  if wide then
    redis.call('SADD', ARGV[4] .. ARGV[i] .. ARGV[6], ARGV[1])
  else
    redis.call('ZADD', ARGV[4] .. ARGV[i] .. ARGV[5], 'NX', ARGV[2], ARGV[1])
  end
end
if not wide and redis.call('HLEN', KEYS[2]) > tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], 'wide', '1')
  for _, user in ipairs(redis.call('HKEYS', KEYS[2])) do
    redis.call('ZREM', ARGV[4] .. user .. ARGV[5], ARGV[1])
    redis.call('SADD', ARGV[4] .. user .. ARGV[6], ARGV[1])
  end
end
return 1
"#;

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
}

impl RedisStore {
    /// A store on `conn`, keeping about `retention` messages per conversation.
    pub fn new(conn: RedisConn, retention: usize) -> Self {
        Self {
            conn,
            retention: retention.max(1),
            send: redis::Script::new(SEND),
            mark_read: redis::Script::new(MARK_READ),
        }
    }

    /// The send script's call for `o`.
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
        args.extend(self.conn.publish_command().to_redis_args());
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
    /// (read it with [`send_reply`]).
    pub(super) fn send_eval(&self, pipe: &mut redis::Pipeline, o: &Outgoing) {
        let (keys, args) = self.send_parts(o);
        pipe.cmd("EVAL")
            .arg(SEND)
            .arg(keys.len())
            .arg(keys)
            .arg(args);
    }
}

/// `results`, completed to `len` with storage errors saying `cause`.
fn fail_rest(mut results: Vec<Result<Sent>>, len: usize, cause: &str) -> Vec<Result<Sent>> {
    results.resize_with(len, || Err(Error::storage(cause)));
    results
}

/// What the send script answered.
pub(super) fn send_reply(reply: Vec<String>) -> Result<Sent> {
    let bad = || Error::Internal(format!("send script answered {reply:?}"));
    match reply.first().map(String::as_str) {
        Some("ok") => Ok(Sent::Stored(
            reply.get(1).and_then(|s| s.parse().ok()).ok_or_else(bad)?,
        )),
        Some("dup") => {
            let raw = reply.get(1).ok_or_else(bad)?;
            let mut parts = raw.splitn(3, '|');
            let seq = parts.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
            let message_id = parts.next().ok_or_else(bad)?.to_owned();
            let sent_at_ms = parts.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
            Ok(Sent::Duplicate {
                seq,
                message_id,
                sent_at_ms,
            })
        }
        Some("nf") => Ok(Sent::NotFound),
        Some("nm") => Ok(Sent::NotMember),
        Some("ro") => Ok(Sent::ReadOnly),
        _ => Err(bad()),
    }
}

/// Channels one pipeline publishes to.
const PUBLISH_BATCH: usize = 500;

pub(super) fn key(id: &str, part: &str) -> String {
    format!("sb:msg:{{c:{id}}}:{part}")
}

const USER_PREFIX: &str = "sb:msg:user:";
const NARROW_SUFFIX: &str = ":convs";
const WIDE_SUFFIX: &str = ":wide";

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

/// Adds the writes that store `c` and index it for its members to `pipe`.
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
    for m in &c.members {
        if wide {
            pipe.sadd(user_wide(&m.user_id), &c.id).ignore();
        } else {
            pipe.zadd(user_index(&m.user_id), &c.id, m.joined_at_ms)
                .ignore();
        }
    }
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
    async fn create(&self, c: &ConversationRecord) -> Result<()> {
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

    /// One pipeline of the member-adding script, 1,000 users each (by its source,
    /// so a flushed script cache does not matter); each chunk is atomic.
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
                .arg(id)
                .arg(now_ms)
                .arg(WIDE_MEMBERS)
                .arg(USER_PREFIX)
                .arg(NARROW_SUFFIX)
                .arg(WIDE_SUFFIX)
                .arg(chunk);
        }
        let found: Vec<u8> = pipe.query_async(&mut conn).await?;
        if found.contains(&0) {
            return Ok(None);
        }
        self.conversation(id).await
    }

    async fn remove_member(
        &self,
        id: &str,
        user: &str,
        new_owner: Option<&str>,
    ) -> Result<Option<ConversationRecord>> {
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.hdel(key(id, "members"), user)
            .ignore()
            .zrem(user_index(user), id)
            .ignore()
            .srem(user_wide(user), id)
            .ignore();
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
        let mut conn = self.conn.clone();
        let reply: Vec<String> = self.send_invocation(o).invoke_async(&mut conn).await?;
        send_reply(reply)
    }

    /// One round trip for the whole batch: a pipeline of the send script, run by Redis in
    /// order. If Redis has lost the script (a restart), it runs none of them from the
    /// first refusal on; those are sent again, in order, once the script is loaded.
    async fn send_batch(&self, batch: &[Outgoing]) -> Vec<Result<Sent>> {
        let mut conn = self.conn.clone();
        let invocations: Vec<_> = batch.iter().map(|o| self.send_invocation(o)).collect();
        let mut results: Vec<Result<Sent>> = Vec::with_capacity(batch.len());
        let no_script = |r: &redis::RedisResult<Vec<String>>| {
            r.as_ref().is_err_and(|e| {
                e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
            })
        };
        // The second round only after loading the script, and only for the sends from the
        // first refusal on.
        for round in 0..2 {
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            for invocation in &invocations[results.len()..] {
                pipe.invoke_script(invocation);
            }
            let replies: Vec<redis::RedisResult<Vec<String>>> =
                match pipe.query_async(&mut conn).await {
                    Ok(r) => r,
                    Err(e) => return fail_rest(results, batch.len(), &e.to_string()),
                };
            for reply in replies {
                if round == 0 && no_script(&reply) {
                    break;
                }
                results.push(reply.map_err(Error::from).and_then(send_reply));
            }
            if results.len() == batch.len() {
                break;
            }
            if let Err(e) = self.send.load_async(&mut conn).await {
                return fail_rest(results, batch.len(), &e.to_string());
            }
        }
        fail_rest(
            results,
            batch.len(),
            "redis answered fewer replies than sends",
        )
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
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.get(key(id, "seq"));
        }
        let seqs: Vec<Option<u64>> = pipe.query_async(&mut conn).await?;
        Ok(seqs.into_iter().map(|s| s.unwrap_or(0)).collect())
    }

    /// One pipeline for the whole page: five commands per conversation.
    async fn summaries(&self, ids: &[String], user: &str) -> Result<Vec<Option<super::Summary>>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.hgetall(key(id, "meta"))
                .hgetall(key(id, "members"))
                .cmd("XREVRANGE")
                .arg(key(id, "log"))
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1)
                .get(key(id, "seq"))
                .hget(key(id, "reads"), user);
        }
        let values: Vec<redis::Value> = pipe.query_async(&mut conn).await?;
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
            let mut pipe = redis::pipe();
            for id in &wide {
                pipe.get(key(id, "activity")).hget(key(id, "members"), user);
            }
            let found: Vec<(Option<u64>, Option<u64>)> = pipe.query_async(&mut conn).await?;
            // A conversation the user has left since is not theirs.
            all.extend(
                wide.into_iter()
                    .zip(found)
                    .filter_map(|(id, (active, joined))| {
                        Some((active.unwrap_or(0).max(joined?), id))
                    }),
            );
        }
        if let Some(cursor) = after {
            all.retain(|entry| entry < cursor);
        }
        all.sort_unstable_by(|a, b| b.cmp(a));
        all.dedup();
        let more = all.len() > limit;
        all.truncate(limit);
        Ok((all, more))
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
        let mut conn = self.conn.clone();
        for chunk in channels.chunks(PUBLISH_BATCH) {
            let mut pipe = redis::pipe();
            for channel in chunk {
                pipe.cmd(self.conn.publish_command())
                    .arg(channel)
                    .arg(payload.as_slice())
                    .ignore();
            }
            let () = pipe.query_async(&mut conn).await?;
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
