//! Messaging's durable state and publishing, behind one trait with a Redis engine
//! ([`redis`]) and an in-memory engine ([`memory`]); one contract suite runs against both
//! (`tests/tests/e2e/messaging_store_contract.rs`).
//!
//! The heart is [`MessagingStore::send`]: one atomic step that checks the idempotency key,
//! membership and state, assigns the next seq, appends to the history and publishes the
//! message. Ordering, durability and fan-out therefore cannot disagree, and a message is
//! acknowledged only after that step returns.

use std::collections::HashMap;
use std::future::Future;

use switchboard_proto::messaging::v1 as pb;

use crate::conversation::ConversationRecord;
use crate::error::Result;

pub mod cluster_desk;
pub mod desk;
pub mod memory;
mod memory_desk;
pub mod redis;
mod redis_desk;

pub use desk::DeskStore;

/// Pub/sub channel of a conversation (messages, receipts, typing).
pub fn conversation_channel(conversation_id: &str) -> String {
    format!("sb:msg:{{c:{conversation_id}}}")
}

/// Pub/sub channel of a user (conversation events reach every stream of the user).
pub fn user_channel(user_id: &str) -> String {
    format!("sb:msg:user:{{u:{user_id}}}")
}

/// A send, ready for the store: everything but the seq.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// Conversation.
    pub conversation_id: String,
    /// Sender (must be a member).
    pub sender_id: String,
    /// Idempotency key.
    pub client_msg_id: String,
    /// The message without its seq, protobuf-encoded (stored in history).
    pub message: Vec<u8>,
    /// The published envelope (message + trace context), protobuf-encoded.
    pub envelope: Vec<u8>,
    /// Message id, as in `message`.
    pub message_id: String,
    /// Sent at (Unix ms), as in `message`.
    pub sent_at_ms: u64,
}

/// What a send did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sent {
    /// Stored and published with this seq.
    Stored(u64),
    /// The key was used before: the first message's seq, id and time.
    Duplicate {
        /// Its seq.
        seq: u64,
        /// Its id.
        message_id: String,
        /// Its time, Unix ms.
        sent_at_ms: u64,
    },
    /// No such conversation.
    NotFound,
    /// The sender is not a member.
    NotMember,
    /// The conversation is read-only.
    ReadOnly,
}

/// A user's standing in a conversation, as [`MessagingStore::membership`] finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    /// Whether the user is a member.
    pub member: bool,
    /// The conversation's epoch (changes if its history was lost).
    pub epoch: String,
}

/// A slice of history.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct History {
    /// Messages, ascending by seq, with their seq set.
    pub messages: Vec<pb::Message>,
    /// Oldest seq still retained (0 when empty).
    pub oldest_seq: u64,
    /// Newest seq (0 when none).
    pub last_seq: u64,
}

/// What a list shows of one conversation for one member.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// The conversation.
    pub record: ConversationRecord,
    /// Its newest message, if any.
    pub last_message: Option<pb::Message>,
    /// Its newest seq (0 when none).
    pub last_seq: u64,
    /// The member's read position.
    pub read_seq: u64,
}

/// A conversation's place in one member's list: (rank, conversation id), listed in
/// descending order, so ties go by id. The rank is the later of the conversation's newest
/// message's time and the time the member joined (Unix ms): a conversation one is added
/// to comes first, as does one just written in.
pub type Ranked = (u64, String);

/// The page of `candidates` (in any order, repeats allowed) after `after` in list order,
/// at most `limit` long, and whether more follow: what every engine's
/// [`MessagingStore::ranked`] returns once it has its candidates.
pub fn page_of(
    mut candidates: Vec<Ranked>,
    after: Option<&Ranked>,
    limit: usize,
) -> (Vec<Ranked>, bool) {
    if let Some(cursor) = after {
        candidates.retain(|entry| entry < cursor);
    }
    candidates.sort_unstable_by(|a, b| b.cmp(a));
    candidates.dedup();
    let more = candidates.len() > limit;
    candidates.truncate(limit);
    (candidates, more)
}

/// Which part of history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Range {
    /// Seqs above `after`, oldest first, at most `limit`.
    After(u64),
    /// Seqs below `before`, the newest `limit` of them.
    Before(u64),
    /// The newest `limit`.
    Latest,
}

/// Messaging's storage contract.
pub trait MessagingStore: Send + Sync + 'static {
    /// Stores a new conversation and indexes it for its members.
    fn create(&self, conversation: &ConversationRecord) -> impl Future<Output = Result<()>> + Send;
    /// The direct conversation of a pair, creating `candidate` if there is none; returns
    /// the conversation and whether it was created now.
    fn create_direct(
        &self,
        pair_key: &str,
        candidate: &ConversationRecord,
    ) -> impl Future<Output = Result<(ConversationRecord, bool)>> + Send;
    /// A conversation with its members.
    fn conversation(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Option<ConversationRecord>>> + Send;
    /// Adds members (existing ones keep their join time); the conversation after.
    fn add_members(
        &self,
        id: &str,
        users: &[String],
        now_ms: u64,
    ) -> impl Future<Output = Result<Option<ConversationRecord>>> + Send;
    /// Removes a member (and sets a new owner if given); the conversation after.
    fn remove_member(
        &self,
        id: &str,
        user: &str,
        new_owner: Option<&str>,
    ) -> impl Future<Output = Result<Option<ConversationRecord>>> + Send;
    /// Ids of the user's conversations.
    fn user_conversations(&self, user: &str) -> impl Future<Output = Result<Vec<String>>> + Send;
    /// The atomic send step (see the module docs).
    fn send(&self, outgoing: &Outgoing) -> impl Future<Output = Result<Sent>> + Send;
    /// [`send`](Self::send) for each of `batch`, stored in that order (so one stream's
    /// sends keep their order); one result per send, in order. Engines that can do it in
    /// one round trip do.
    fn send_batch(&self, batch: &[Outgoing]) -> impl Future<Output = Vec<Result<Sent>>> + Send {
        async move {
            let mut results = Vec::with_capacity(batch.len());
            for o in batch {
                results.push(self.send(o).await);
            }
            results
        }
    }
    /// History of a conversation.
    fn history(
        &self,
        id: &str,
        range: Range,
        limit: usize,
    ) -> impl Future<Output = Result<History>> + Send;
    /// Whether `user` is a member of conversation `id`, with the conversation's epoch;
    /// `None` if there is no such conversation. Constant work whatever the group's size
    /// (the checks of every stream frame use it, not [`conversation`](Self::conversation)).
    fn membership(
        &self,
        id: &str,
        user: &str,
    ) -> impl Future<Output = Result<Option<Membership>>> + Send;
    /// Newest seq of each conversation (0 if none or unknown), in the order asked.
    fn last_seqs(&self, ids: &[String]) -> impl Future<Output = Result<Vec<u64>>> + Send;
    /// `user`'s conversations in list order, the `limit` after `after` (from the first when
    /// `None`), and whether more follow. The work is the page's, not the user's count of
    /// conversations (see each engine for what it reads).
    fn ranked(
        &self,
        user: &str,
        after: Option<&Ranked>,
        limit: usize,
    ) -> impl Future<Output = Result<(Vec<Ranked>, bool)>> + Send;
    /// Moves `user`'s read position up to `seq` (never down); the position after.
    fn mark_read(&self, id: &str, user: &str, seq: u64)
    -> impl Future<Output = Result<u64>> + Send;
    /// Every member's read position.
    fn read_positions(&self, id: &str)
    -> impl Future<Output = Result<HashMap<String, u64>>> + Send;
    /// One member's read position (0 if none): O(1) whatever the group's size.
    fn read_position(&self, id: &str, user: &str) -> impl Future<Output = Result<u64>> + Send;
    /// [`Summary`] of each conversation for `user`, in the order asked (`None` for what
    /// does not exist). Engines that can answer a page in one round trip override this.
    fn summaries(
        &self,
        ids: &[String],
        user: &str,
    ) -> impl Future<Output = Result<Vec<Option<Summary>>>> + Send {
        async move {
            let mut out = Vec::with_capacity(ids.len());
            for id in ids {
                let Some(record) = self.conversation(id).await? else {
                    out.push(None);
                    continue;
                };
                let latest = self.history(id, Range::Latest, 1).await?;
                let read_seq = self.read_position(id, user).await?;
                out.push(Some(Summary {
                    record,
                    last_message: latest.messages.into_iter().next_back(),
                    last_seq: latest.last_seq,
                    read_seq,
                }));
            }
            Ok(out)
        }
    }
    /// Publishes an ephemeral payload on `channel` (receipts, typing, events).
    fn publish(&self, channel: &str, payload: Vec<u8>) -> impl Future<Output = Result<()>> + Send;
    /// Publishes the same payload on each of `channels`; engines that can pipeline do.
    fn publish_many(
        &self,
        channels: &[String],
        payload: Vec<u8>,
    ) -> impl Future<Output = Result<()>> + Send {
        async move {
            for channel in channels {
                self.publish(channel, payload.clone()).await?;
            }
            Ok(())
        }
    }
}
