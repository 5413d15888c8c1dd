//! The in-memory engine: one process's conversations, for `make run` and unit tests.
//! Publishing goes to the process's [`MemoryBus`], under the same lock as the seq, so
//! messages are published in seq order exactly as the Redis script does.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use switchboard_common::bus::MemoryBus;
use switchboard_proto::messaging::v1 as pb;

use super::desk::ConsultationRecord;
use super::{
    History, Membership, MessagingStore, Outgoing, Range, Ranked, Sent, conversation_channel,
};
use crate::conversation::{ConversationRecord, Member};
use crate::error::{Error, Result};
use crate::message::message_header;

/// Stored (seq, encoded message) pairs.
type Rows = Vec<(u64, Vec<u8>)>;

/// How long idempotency keys are remembered.
const IDEMPOTENCY_TTL: Duration = Duration::from_secs(24 * 3600);

#[derive(Default)]
pub(super) struct State {
    conversations: HashMap<String, Conversation>,
    direct: HashMap<String, String>,
    by_user: HashMap<String, Vec<String>>,
    /// The support desk's part, which `memory_desk` works on (this file does not).
    pub(super) desk: DeskState,
}

/// Consultations, the queue and the loads.
#[derive(Default)]
pub(super) struct DeskState {
    pub(super) consultations: HashMap<String, ConsultationRecord>,
    /// (opened at, id) of queued consultations.
    pub(super) queue: BTreeSet<(u64, String)>,
    pub(super) load: HashMap<String, u32>,
}

pub(super) struct Conversation {
    pub(super) record: ConversationRecord,
    /// Each member's join time (Unix ms), for checks in constant time (the record's list
    /// is ordered).
    members: HashMap<String, u64>,
    last_seq: u64,
    /// Unix ms of the newest message, or of the creation; never moves back.
    activity_ms: u64,
    log: BTreeMap<u64, Vec<u8>>,
    reads: HashMap<String, u64>,
    /// (sender, client_msg_id) → (seq, id, sent_at_ms, expires).
    idempotency: HashMap<(String, String), (u64, String, u64, Instant)>,
}

/// Conversations in this process.
pub struct MemoryStore {
    state: Mutex<State>,
    bus: MemoryBus,
    retention: usize,
}

impl MemoryStore {
    /// A store publishing on `bus`, keeping the newest `retention` messages per conversation.
    pub fn new(bus: MemoryBus, retention: usize) -> Self {
        Self {
            state: Mutex::default(),
            bus,
            retention: retention.max(1),
        }
    }

    /// The send step on `s`, under the lock the caller holds: idempotency, membership,
    /// the next seq, history, publish.
    pub(super) fn send_in(&self, s: &mut State, o: &Outgoing) -> Sent {
        let Some(c) = s.conversations.get_mut(&o.conversation_id) else {
            return Sent::NotFound;
        };
        let now = Instant::now();
        c.idempotency.retain(|_, v| v.3 > now);
        let key = (o.sender_id.clone(), o.client_msg_id.clone());
        if let Some((seq, message_id, sent_at_ms, _)) = c.idempotency.get(&key) {
            return Sent::Duplicate {
                seq: *seq,
                message_id: message_id.clone(),
                sent_at_ms: *sent_at_ms,
            };
        }
        if !c.is_member(&o.sender_id) {
            return Sent::NotMember;
        }
        if c.record.read_only {
            return Sent::ReadOnly;
        }
        c.last_seq += 1;
        let seq = c.last_seq;
        c.log.insert(seq, o.message.clone());
        // Writing means having read up to there.
        c.reads.insert(o.sender_id.clone(), seq);
        c.activity_ms = c.activity_ms.max(o.sent_at_ms);
        while c.log.len() > self.retention {
            c.log.pop_first();
        }
        c.idempotency.insert(
            key,
            (
                seq,
                o.message_id.clone(),
                o.sent_at_ms,
                now + IDEMPOTENCY_TTL,
            ),
        );
        let mut payload = message_header(seq);
        payload.extend_from_slice(&o.envelope);
        // Published under the lock: subscribers see seqs in order, as with Redis.
        self.bus
            .publish_now(&conversation_channel(&o.conversation_id), payload);
        Sent::Stored(seq)
    }

    pub(super) fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        // Each operation is a handful of map updates that cannot panic half-way, so a
        // poisoned lock still guards consistent data.
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut state)
    }
}

pub(super) fn index(state: &mut State, record: &ConversationRecord) {
    for m in &record.members {
        let list = state.by_user.entry(m.user_id.clone()).or_default();
        if !list.contains(&record.id) {
            list.push(record.id.clone());
        }
    }
}

impl Conversation {
    /// Whether `user` is a member (constant time).
    pub(super) fn is_member(&self, user: &str) -> bool {
        self.members.contains_key(user)
    }

    /// Adds `user` (joined at `now_ms`) unless a member already.
    pub(super) fn join(&mut self, user: &str, now_ms: u64) {
        if !self.members.contains_key(user) {
            self.members.insert(user.to_owned(), now_ms);
            self.record.members.push(Member {
                user_id: user.to_owned(),
                joined_at_ms: now_ms,
            });
        }
    }

    /// Removes `user`.
    pub(super) fn leave(&mut self, user: &str) {
        if self.members.remove(user).is_some() {
            self.record.members.retain(|m| m.user_id != user);
        }
    }
}

pub(super) fn insert(state: &mut State, record: &ConversationRecord) {
    index(state, record);
    state.conversations.insert(
        record.id.clone(),
        Conversation {
            record: record.clone(),
            members: record
                .members
                .iter()
                .map(|m| (m.user_id.clone(), m.joined_at_ms))
                .collect(),
            last_seq: 0,
            activity_ms: record.created_at_ms,
            log: BTreeMap::new(),
            reads: HashMap::new(),
            idempotency: HashMap::new(),
        },
    );
}

fn decode(seq: u64, bytes: &[u8]) -> Result<pb::Message> {
    let mut m: pb::Message = prost::Message::decode(bytes)
        .map_err(|e| Error::Internal(format!("stored message {seq}: {e}")))?;
    m.seq = seq;
    Ok(m)
}

impl State {
    /// A conversation's stored state.
    pub(super) fn conversation_mut(&mut self, id: &str) -> Option<&mut Conversation> {
        self.conversations.get_mut(id)
    }

    /// Drops `id` from `user`'s conversations.
    pub(super) fn unindex(&mut self, user: &str, id: &str) {
        if let Some(list) = self.by_user.get_mut(user) {
            list.retain(|c| c != id);
        }
    }
}

impl MessagingStore for MemoryStore {
    async fn create(&self, conversation: &ConversationRecord) -> Result<()> {
        self.with(|s| insert(s, conversation));
        Ok(())
    }

    async fn create_direct(
        &self,
        pair_key: &str,
        candidate: &ConversationRecord,
    ) -> Result<(ConversationRecord, bool)> {
        Ok(self.with(|s| {
            if let Some(existing) = s
                .direct
                .get(pair_key)
                .and_then(|id| s.conversations.get(id))
            {
                return (existing.record.clone(), false);
            }
            s.direct.insert(pair_key.to_owned(), candidate.id.clone());
            insert(s, candidate);
            (candidate.clone(), true)
        }))
    }

    async fn conversation(&self, id: &str) -> Result<Option<ConversationRecord>> {
        Ok(self.with(|s| s.conversations.get(id).map(|c| c.record.clone())))
    }

    async fn membership(&self, id: &str, user: &str) -> Result<Option<Membership>> {
        Ok(self.with(|s| {
            s.conversations.get(id).map(|c| Membership {
                member: c.is_member(user),
                epoch: c.record.epoch.clone(),
            })
        }))
    }

    async fn add_members(
        &self,
        id: &str,
        users: &[String],
        now_ms: u64,
    ) -> Result<Option<ConversationRecord>> {
        Ok(self.with(|s| {
            let record = {
                let c = s.conversations.get_mut(id)?;
                for u in users {
                    c.join(u, now_ms);
                }
                c.record.clone()
            };
            index(s, &record);
            Some(record)
        }))
    }

    async fn remove_member(
        &self,
        id: &str,
        user: &str,
        new_owner: Option<&str>,
    ) -> Result<Option<ConversationRecord>> {
        Ok(self.with(|s| {
            let record = {
                let c = s.conversations.get_mut(id)?;
                c.leave(user);
                if let Some(owner) = new_owner {
                    c.record.owner_id = owner.to_owned();
                }
                c.record.clone()
            };
            if let Some(list) = s.by_user.get_mut(user) {
                list.retain(|c| c != id);
            }
            Some(record)
        }))
    }

    async fn user_conversations(&self, user: &str) -> Result<Vec<String>> {
        Ok(self.with(|s| s.by_user.get(user).cloned().unwrap_or_default()))
    }

    async fn send(&self, o: &Outgoing) -> Result<Sent> {
        Ok(self.with(|s| self.send_in(s, o)))
    }

    async fn history(&self, id: &str, range: Range, limit: usize) -> Result<History> {
        let rows: Option<(Rows, u64, u64)> = self.with(|s| {
            let c = s.conversations.get(id)?;
            let oldest = c.log.keys().next().copied().unwrap_or(0);
            let rows: Vec<(u64, Vec<u8>)> = match range {
                Range::After(after) => c
                    .log
                    .range(after.saturating_add(1)..)
                    .take(limit)
                    .map(|(k, v)| (*k, v.clone()))
                    .collect(),
                Range::Before(before) => {
                    let mut r: Vec<_> = c
                        .log
                        .range(..before)
                        .rev()
                        .take(limit)
                        .map(|(k, v)| (*k, v.clone()))
                        .collect();
                    r.reverse();
                    r
                }
                Range::Latest => {
                    let mut r: Vec<_> = c
                        .log
                        .iter()
                        .rev()
                        .take(limit)
                        .map(|(k, v)| (*k, v.clone()))
                        .collect();
                    r.reverse();
                    r
                }
            };
            Some((rows, oldest, c.last_seq))
        });
        let Some((rows, oldest_seq, last_seq)) = rows else {
            return Ok(History::default());
        };
        let messages = rows
            .iter()
            .map(|(seq, bytes)| decode(*seq, bytes))
            .collect::<Result<Vec<_>>>()?;
        Ok(History {
            messages,
            oldest_seq,
            last_seq,
        })
    }

    async fn last_seqs(&self, ids: &[String]) -> Result<Vec<u64>> {
        Ok(self.with(|s| {
            ids.iter()
                .map(|id| s.conversations.get(id).map(|c| c.last_seq).unwrap_or(0))
                .collect()
        }))
    }

    async fn read_position(&self, id: &str, user: &str) -> Result<u64> {
        Ok(self.with(|s| {
            s.conversations
                .get(id)
                .and_then(|c| c.reads.get(user).copied())
                .unwrap_or(0)
        }))
    }

    /// Ranks all of the user's conversations for each page: this engine serves one
    /// process (`make run`, tests), where that is a sort of a short list in memory.
    async fn ranked(
        &self,
        user: &str,
        after: Option<&Ranked>,
        limit: usize,
    ) -> Result<(Vec<Ranked>, bool)> {
        Ok(self.with(|s| {
            let all: Vec<Ranked> = s
                .by_user
                .get(user)
                .into_iter()
                .flatten()
                .filter_map(|id| {
                    let c = s.conversations.get(id)?;
                    let joined = c.members.get(user)?;
                    Some((c.activity_ms.max(*joined), id.clone()))
                })
                .collect();
            super::page_of(all, after, limit)
        }))
    }

    async fn mark_read(&self, id: &str, user: &str, seq: u64) -> Result<u64> {
        Ok(self.with(|s| {
            let Some(c) = s.conversations.get_mut(id) else {
                return 0;
            };
            let pos = c.reads.entry(user.to_owned()).or_insert(0);
            *pos = (*pos).max(seq.min(c.last_seq));
            *pos
        }))
    }

    async fn read_positions(&self, id: &str) -> Result<HashMap<String, u64>> {
        Ok(self.with(|s| {
            s.conversations
                .get(id)
                .map(|c| c.reads.clone())
                .unwrap_or_default()
        }))
    }

    async fn publish(&self, channel: &str, payload: Vec<u8>) -> Result<()> {
        self.bus.publish_now(channel, payload);
        Ok(())
    }
}
