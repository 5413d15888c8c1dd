//! Messaging's rules in plain Rust: who may create, read, send and change what; building
//! what a caller sees; rate limits. Knows nothing of gRPC.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use switchboard_common::id::quote;
use switchboard_common::token::Caller;
use switchboard_proto::messaging::v1 as pb;
use tracing::Instrument;

use crate::conversation::{ConversationRecord, Kind, Member, NewConversation, direct_key, unique};
use crate::directory::{self, Credential, UserDirectory};
use crate::error::{Error, Result};
use crate::message::{Draft, Envelope, encode_event};
use crate::store::{
    MessagingStore, Outgoing, Range, Sent, Summary, conversation_channel, user_channel,
};

/// Views built at once: a page of ListConversations, or an event's per-recipient views
/// (SUPPORT conversations' events differ by viewer).
const ANNOUNCE_CONCURRENCY: usize = 16;

/// Largest page of history.
pub const MAX_PAGE: usize = 200;
/// Where a page of ListConversations starts: after the conversation with this
/// [`Ranked`](crate::store::Ranked) in the listing's order; `None` for the first page. A
/// token is `"<rank ms>:<conversation id>"`, as the previous page's `next_page_token` said.
pub fn page_cursor(page_token: &str) -> Result<Option<crate::store::Ranked>> {
    if page_token.is_empty() {
        return Ok(None);
    }
    let refused = || {
        Error::invalid(
            "page_token",
            format!(
                "page_token {} is not one this server issued; pass next_page_token back unchanged",
                quote(page_token)
            ),
        )
    };
    let (at, id) = page_token.split_once(':').ok_or_else(refused)?;
    let at: u64 = at.parse().map_err(|_| refused())?;
    if switchboard_common::id::check("page_token", id).is_err() {
        return Err(refused());
    }
    Ok(Some((at, id.to_owned())))
}

/// Send-rate limits.
#[derive(Debug, Clone, Copy)]
pub struct SendLimit {
    /// Sustained messages per second per user (per instance).
    pub per_second: f64,
    /// Burst size.
    pub burst: f64,
}

/// A token bucket per key; idle buckets are forgotten.
struct Buckets {
    limit: SendLimit,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl Buckets {
    fn new(limit: SendLimit) -> Self {
        Self {
            limit,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token for `key`, or says how long until one is available.
    fn take(&self, key: &str) -> std::result::Result<(), Duration> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() > 100_000 {
            let full = self.limit.burst / self.limit.per_second;
            buckets.retain(|_, (_, at)| now.duration_since(*at).as_secs_f64() < full);
        }
        let (tokens, at) = buckets
            .entry(key.to_owned())
            .or_insert((self.limit.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.limit.per_second)
            .min(self.limit.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - *tokens) / self.limit.per_second,
            ))
        }
    }
}

/// Messaging's rules over a store.
pub struct Messaging<S> {
    store: Arc<S>,
    users: Arc<dyn UserDirectory>,
    max_group_members: usize,
    sends: Buckets,
    typing: Buckets,
    support: Option<Arc<dyn SupportViews>>,
}

/// Messaging's one hook for the support desk: what a SUPPORT conversation's view carries
/// (its consultation, as the viewer may see it). Messaging knows nothing else of the desk;
/// without the hook a SUPPORT conversation's view has no consultation.
pub trait SupportViews: Send + Sync + 'static {
    /// The consultation of SUPPORT conversation `record`, as `user` sees it, if any.
    fn consultation<'a>(
        &'a self,
        record: &'a ConversationRecord,
        user: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<Option<pb::Consultation>>>;
    /// The consultations of SUPPORT conversations `ids`, as `user` sees them, in the order
    /// asked, read together (a page's worth in one round trip).
    fn consultations<'a>(
        &'a self,
        ids: &'a [String],
        user: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<Vec<Option<pb::Consultation>>>>;
}

pub use crate::clock::{now_ms, timestamp};

impl<S: MessagingStore> Messaging<S> {
    /// Rules over `store` with the given send limit and group size; member ids are checked
    /// against `users`.
    pub fn new(
        store: Arc<S>,
        limit: SendLimit,
        max_group_members: usize,
        users: Arc<dyn UserDirectory>,
    ) -> Self {
        // Typing notices: one every two seconds per user and conversation is plenty.
        let typing = Buckets::new(SendLimit {
            per_second: 0.5,
            burst: 1.0,
        });
        Self {
            store,
            users,
            max_group_members,
            sends: Buckets::new(limit),
            typing,
            support: None,
        }
    }

    /// With the desk's [`SupportViews`] hook.
    pub fn with_support(mut self, views: Arc<dyn SupportViews>) -> Self {
        self.support = Some(views);
        self
    }

    /// The store.
    pub fn store(&self) -> &Arc<S> {
        &self.store
    }

    /// Ids of the conversations `caller` is a member of (what a stream subscribed to all
    /// of them follows).
    pub async fn conversation_ids(&self, caller: &Caller) -> Result<Vec<String>> {
        self.store.user_conversations(&caller.user_id).await
    }

    /// `caller`'s read position in a conversation (0 if none or unreadable).
    pub async fn read_position(&self, caller: &Caller, conversation_id: &str) -> u64 {
        self.store
            .read_position(conversation_id, &caller.user_id)
            .await
            .unwrap_or(0)
    }

    /// Up to `limit` stored messages after `after`, for a stream replaying history to a
    /// member it has already admitted (see [`authorize`](Self::authorize)).
    pub async fn replay(
        &self,
        conversation_id: &str,
        after: u64,
        limit: usize,
    ) -> Result<crate::store::History> {
        self.store
            .history(conversation_id, Range::After(after), limit)
            .await
    }

    /// The conversation if it exists and `caller` is a member.
    pub async fn authorize(
        &self,
        caller: &Caller,
        conversation_id: &str,
    ) -> Result<ConversationRecord> {
        switchboard_common::id::check("conversation_id", conversation_id)?;
        let record = self
            .store
            .conversation(conversation_id)
            .await?
            .ok_or_else(|| Error::ConversationNotFound(conversation_id.to_owned()))?;
        if !record.is_member(&caller.user_id) {
            return Err(Error::NotAMember(conversation_id.to_owned()));
        }
        Ok(record)
    }

    /// NOT_FOUND naming the first of `ids` (from request field `field`) that belongs to no
    /// user; one directory call per [`directory::BATCH`] ids.
    async fn all_exist(&self, field: &str, ids: &[String], credential: &Credential) -> Result<()> {
        match directory::first_unfit(self.users.as_ref(), ids, credential).await? {
            None => Ok(()),
            Some((i, id, directory::Unfit::Missing)) => Err(Error::UserNotFound {
                field: format!("{field}[{i}]"),
                id,
            }),
            Some((i, id, directory::Unfit::Guest)) => Err(Error::invalid(
                format!("{field}[{i}]"),
                format!("user {id} is a guest; guests take part only in their own consultations"),
            )),
        }
    }

    /// The epoch of the conversation if `caller` is a member: one check in constant time
    /// whatever the group's size, for what happens often and needs no member list
    /// (history, reads, typing, subscribing).
    pub async fn check_member(&self, caller: &Caller, conversation_id: &str) -> Result<String> {
        switchboard_common::id::check("conversation_id", conversation_id)?;
        match self
            .store
            .membership(conversation_id, &caller.user_id)
            .await?
        {
            None => Err(Error::ConversationNotFound(conversation_id.to_owned())),
            Some(m) if !m.member => Err(Error::NotAMember(conversation_id.to_owned())),
            Some(m) => Ok(m.epoch),
        }
    }

    /// Creates a direct or group conversation; every member must be a user.
    pub async fn create(
        &self,
        caller: &Caller,
        credential: &Credential,
        kind: i32,
        title: &str,
        member_ids: &[String],
    ) -> Result<(pb::Conversation, bool)> {
        if caller.role == switchboard_common::token::Role::Guest {
            return Err(Error::PermissionDenied(
                "guests only open consultations (SupportService.OpenConsultation) and talk in their own; register for direct conversations and groups".into(),
            ));
        }
        let new = NewConversation::parse(
            &caller.user_id,
            kind,
            title,
            member_ids,
            self.max_group_members,
        )?;
        // The creator is the verified caller; the others are asked about in their order.
        self.all_exist("member_ids", member_ids, credential).await?;
        let now = now_ms();
        let record = ConversationRecord {
            id: uuid::Uuid::now_v7().to_string(),
            kind: new.kind,
            title: new.title,
            owner_id: if new.kind == Kind::Group {
                caller.user_id.clone()
            } else {
                String::new()
            },
            created_at_ms: now,
            epoch: uuid::Uuid::now_v7().simple().to_string(),
            read_only: false,
            members: new
                .members
                .iter()
                .map(|u| Member {
                    user_id: u.clone(),
                    joined_at_ms: now,
                })
                .collect(),
        };
        let (record, created) = match new.kind {
            Kind::Direct => {
                self.store
                    .create_direct(&direct_key(&new.members[0], &new.members[1]), &record)
                    .await?
            }
            _ => {
                self.store.create(&record).await?;
                (record, true)
            }
        };
        if created {
            let members: Vec<String> = record.members.iter().map(|m| m.user_id.clone()).collect();
            self.announce(
                &record,
                pb::ConversationEventKind::Created,
                &caller.user_id,
                &members,
                &members,
            )
            .await;
        }
        Ok((self.view(&record, &caller.user_id).await?, created))
    }

    /// A conversation as `caller` sees it.
    pub async fn get(&self, caller: &Caller, conversation_id: &str) -> Result<pb::Conversation> {
        let record = self.authorize(caller, conversation_id).await?;
        self.view(&record, &caller.user_id).await
    }

    /// The caller's conversations by rank ([`Ranked`](crate::store::Ranked)), a page after
    /// `page_token`'s cursor.
    pub async fn list(
        &self,
        caller: &Caller,
        page_size: u32,
        page_token: &str,
    ) -> Result<(Vec<pb::Conversation>, String)> {
        let size = match page_size {
            0 => 50,
            n if n <= 100 => n as usize,
            n => {
                return Err(Error::invalid(
                    "page_size",
                    format!("page_size must be at most 100, got {n}"),
                ));
            }
        };
        let after = page_cursor(page_token)?;
        let (page, more) = self
            .store
            .ranked(&caller.user_id, after.as_ref(), size)
            .await?;
        let next = match page.last() {
            Some((at, id)) if more => format!("{at}:{id}"),
            _ => String::new(),
        };
        // The page's summaries in one round trip, then the consultations of its SUPPORT
        // conversations in one more.
        let ids: Vec<String> = page.into_iter().map(|(_, id)| id).collect();
        let user = caller.user_id.as_str();
        let summaries: Vec<Summary> = self
            .store
            .summaries(&ids, user)
            .await?
            .into_iter()
            .flatten()
            // An index entry may outlive a membership by a crash between two steps; a
            // conversation is listed only to its members.
            .filter(|s| s.record.is_member(user))
            .collect();
        let support = |s: &Summary| self.support.is_some() && s.record.kind == Kind::Support;
        let support_ids: Vec<String> = summaries
            .iter()
            .filter(|s| support(s))
            .map(|s| s.record.id.clone())
            .collect();
        let mut consultations = match &self.support {
            Some(views) if !support_ids.is_empty() => {
                views.consultations(&support_ids, user).await?
            }
            _ => Vec::new(),
        }
        .into_iter();
        let views = summaries
            .into_iter()
            .map(|s| {
                let consultation = if support(&s) {
                    consultations.next().flatten()
                } else {
                    None
                };
                conversation_view(s, consultation)
            })
            .collect();
        Ok((views, next))
    }

    /// Owner adds members to a group; every one must be a user.
    pub async fn add_members(
        &self,
        caller: &Caller,
        credential: &Credential,
        conversation_id: &str,
        users: &[String],
    ) -> Result<pb::Conversation> {
        // Sizes and shapes before anything is looked up.
        let most = self.max_group_members;
        if users.len() > most {
            return Err(Error::invalid(
                "user_ids",
                format!(
                    "user_ids holds {} ids; a group has at most {most} members (MESSAGING_MAX_GROUP_MEMBERS)",
                    users.len()
                ),
            ));
        }
        switchboard_common::id::check_all("user_ids", users)?;
        let record = self.owned_group(caller, conversation_id).await?;
        let current: HashSet<&str> = record.members.iter().map(|m| m.user_id.as_str()).collect();
        let new: Vec<String> = unique(&caller.user_id, users)
            .into_iter()
            .filter(|u| !current.contains(u.as_str()))
            .collect();
        if record.members.len() + new.len() > most {
            return Err(Error::FailedPrecondition(format!(
                "a group has at most {most} members (MESSAGING_MAX_GROUP_MEMBERS); it has {} and {} would join",
                record.members.len(),
                new.len()
            )));
        }
        self.all_exist("user_ids", users, credential).await?;
        let after = self
            .store
            .add_members(conversation_id, &new, now_ms())
            .await?
            .ok_or_else(|| Error::ConversationNotFound(conversation_id.to_owned()))?;
        if !new.is_empty() {
            let all: Vec<String> = after.members.iter().map(|m| m.user_id.clone()).collect();
            self.announce(
                &after,
                pb::ConversationEventKind::MembersJoined,
                &caller.user_id,
                &new,
                &all,
            )
            .await;
        }
        self.view(&after, &caller.user_id).await
    }

    /// Owner removes a member from a group.
    pub async fn remove_member(
        &self,
        caller: &Caller,
        conversation_id: &str,
        user: &str,
    ) -> Result<pb::Conversation> {
        switchboard_common::id::check("user_id", user)?;
        let record = self.owned_group(caller, conversation_id).await?;
        if user == caller.user_id {
            return Err(Error::FailedPrecondition(
                "the owner leaves with Leave, not RemoveMember".into(),
            ));
        }
        if !record.is_member(user) {
            return Err(Error::invalid(
                "user_id",
                format!("user {} is not a member", quote(user)),
            ));
        }
        let after = self.depart(&record, user, &caller.user_id, None).await?;
        self.view(&after, &caller.user_id).await
    }

    /// The caller leaves a group; the longest-standing member inherits ownership.
    pub async fn leave(&self, caller: &Caller, conversation_id: &str) -> Result<()> {
        let record = self.authorize(caller, conversation_id).await?;
        if record.kind != Kind::Group {
            return Err(Error::FailedPrecondition(
                "only GROUP conversations can be left".into(),
            ));
        }
        let heir = (record.owner_id == caller.user_id)
            .then(|| {
                record
                    .members
                    .iter()
                    .find(|m| m.user_id != caller.user_id)
                    .map(|m| m.user_id.clone())
            })
            .flatten();
        self.depart(&record, &caller.user_id, &caller.user_id, heir.as_deref())
            .await?;
        Ok(())
    }

    async fn depart(
        &self,
        record: &ConversationRecord,
        user: &str,
        actor: &str,
        heir: Option<&str>,
    ) -> Result<ConversationRecord> {
        let after = self
            .store
            .remove_member(&record.id, user, heir)
            .await?
            .ok_or_else(|| Error::ConversationNotFound(record.id.clone()))?;
        let mut notify: Vec<String> = after.members.iter().map(|m| m.user_id.clone()).collect();
        notify.push(user.to_owned());
        self.announce(
            &after,
            pb::ConversationEventKind::MemberLeft,
            actor,
            &[user.to_owned()],
            &notify,
        )
        .await;
        Ok(after)
    }

    async fn owned_group(
        &self,
        caller: &Caller,
        conversation_id: &str,
    ) -> Result<ConversationRecord> {
        let record = self.authorize(caller, conversation_id).await?;
        if record.kind != Kind::Group {
            return Err(Error::FailedPrecondition(
                "members can only be changed in GROUP conversations".into(),
            ));
        }
        if record.owner_id != caller.user_id {
            return Err(Error::PermissionDenied(
                "only the group's owner may change its members".into(),
            ));
        }
        Ok(record)
    }

    /// Stores and publishes a message (or returns the first result of a retry), in a
    /// `publish` span whose trace context travels with the message to every instance.
    pub async fn send(&self, caller: &Caller, draft: Draft) -> Result<(pb::Message, bool)> {
        self.send_batch(caller, vec![draft])
            .await
            .pop()
            .unwrap_or_else(|| Err(Error::Internal("a send had no result".into())))
    }

    /// Takes one send from the caller's rate limit now, for a send that follows a step
    /// that must not happen unless the send may (the desk's open: the draft then goes to the
    /// store prepared with it, in one step).
    pub fn admit(&self, caller: &Caller) -> Result<()> {
        self.sends
            .take(&caller.user_id)
            .map_err(|wait| Error::RateLimited {
                message: "sending too fast; slow down".into(),
                retry_after: wait,
            })
    }

    /// [`send`](Self::send) for several drafts of one caller, stored in the order given (in
    /// one round trip where the store can); one result per draft, in order. Each draft is
    /// rate-limited and refused on its own.
    pub async fn send_batch(
        &self,
        caller: &Caller,
        drafts: Vec<Draft>,
    ) -> Vec<Result<(pb::Message, bool)>> {
        let mut outgoing = Vec::with_capacity(drafts.len());
        let prepared: Vec<Result<Prepared>> = drafts
            .into_iter()
            .map(|d| {
                let (p, o) = self.prepare(caller, d)?;
                outgoing.push(o);
                Ok(p)
            })
            .collect();
        let span = prepared
            .iter()
            .find_map(|p| p.as_ref().ok().map(|p| p.span.clone()))
            .unwrap_or_else(tracing::Span::none);
        let mut stored = if outgoing.is_empty() {
            Vec::new()
        } else {
            self.store.send_batch(&outgoing).instrument(span).await
        }
        .into_iter();
        let mut results: Vec<Result<(pb::Message, bool)>> = prepared
            .into_iter()
            .map(|p| {
                let p = p?;
                let sent = stored
                    .next()
                    .unwrap_or_else(|| Err(Error::Internal("the store skipped a send".into())))?;
                p.finish(sent)
            })
            .collect();
        // A retry is answered with what was stored the first time, not with the retry's
        // own body (rare: one read per retried send).
        for result in &mut results {
            if let Ok((message, true)) = result
                && let Some(first) = self.stored(&message.conversation_id, message.seq).await
            {
                *message = first;
            }
        }
        results
    }

    /// Message `seq` of a conversation as stored, if history still has it.
    async fn stored(&self, conversation_id: &str, seq: u64) -> Option<pb::Message> {
        let page = self
            .store
            .history(conversation_id, Range::After(seq.saturating_sub(1)), 1)
            .await
            .ok()?;
        page.messages.into_iter().next().filter(|m| m.seq == seq)
    }

    /// A draft made ready for the store, or refused by the rate limit.
    fn prepare(&self, caller: &Caller, draft: Draft) -> Result<(Prepared, Outgoing)> {
        self.admit(caller)?;
        Ok(self.prepared(caller, draft))
    }

    /// A draft made ready for the store (the rate limit already passed, see
    /// [`admit`](Self::admit)): what the store writes, and how to answer the caller after.
    pub(crate) fn prepared(&self, caller: &Caller, draft: Draft) -> (Prepared, Outgoing) {
        let sent_at_ms = now_ms();
        let message = pb::Message {
            id: uuid::Uuid::now_v7().to_string(),
            conversation_id: draft.conversation_id.clone(),
            seq: 0,
            sender_id: caller.user_id.clone(),
            body: draft.body,
            metadata: draft.metadata,
            sent_at: Some(timestamp(sent_at_ms)),
            client_msg_id: draft.client_msg_id.clone(),
        };
        let span = tracing::info_span!(
            "publish",
            otel.kind = "producer",
            messaging.system = "redis",
            messaging.operation.type = "send",
            messaging.destination.name = "conversation",
            switchboard.conversation_id = %draft.conversation_id,
            switchboard.seq = tracing::field::Empty,
        );
        let stored = prost::Message::encode_to_vec(&message);
        let envelope = prost::Message::encode_to_vec(&Envelope {
            trace: span.in_scope(switchboard_common::rpc::trace_map),
            message: Some(message.clone()),
            ..Default::default()
        });
        let outgoing = Outgoing {
            conversation_id: draft.conversation_id.clone(),
            sender_id: caller.user_id.clone(),
            client_msg_id: draft.client_msg_id,
            message: stored,
            envelope,
            message_id: message.id.clone(),
            sent_at_ms,
        };
        (
            Prepared {
                message,
                conversation_id: draft.conversation_id,
                span,
            },
            outgoing,
        )
    }

    /// History by seq, ascending.
    pub async fn history(
        &self,
        caller: &Caller,
        conversation_id: &str,
        before_seq: Option<u64>,
        after_seq: Option<u64>,
        limit: u32,
    ) -> Result<(Vec<pb::Message>, bool, u64)> {
        self.check_member(caller, conversation_id).await?;
        let limit = match limit {
            0 => 50,
            n if n as usize <= MAX_PAGE => n as usize,
            n => {
                return Err(Error::invalid(
                    "limit",
                    format!("limit must be at most {MAX_PAGE}, got {n}"),
                ));
            }
        };
        let range = match (before_seq, after_seq) {
            (None, None) => Range::Latest,
            (None, Some(a)) => Range::After(a),
            (Some(b), None) => Range::Before(b),
            _ => {
                return Err(Error::invalid(
                    "before_seq",
                    "give at most one of before_seq and after_seq",
                ));
            }
        };
        // One extra tells whether there is more in that direction.
        let page = self
            .store
            .history(conversation_id, range, limit + 1)
            .await?;
        // Any u64 is a valid position (far ahead of the last seq there is nothing yet).
        if let Range::After(a) = range
            && page.oldest_seq > a.saturating_add(1)
        {
            return Err(Error::HistoryTrimmed(format!(
                "messages after seq {a} are no longer retained; the oldest retained is seq {}",
                page.oldest_seq
            )));
        }
        let mut messages = page.messages;
        let has_more = messages.len() > limit;
        if has_more {
            match range {
                Range::After(_) => {
                    messages.truncate(limit);
                }
                _ => {
                    messages.remove(0);
                }
            }
        }
        Ok((messages, has_more, page.oldest_seq))
    }

    /// Moves the caller's read position and tells the members.
    pub async fn mark_read(&self, caller: &Caller, conversation_id: &str, seq: u64) -> Result<u64> {
        self.check_member(caller, conversation_id).await?;
        let position = self
            .store
            .mark_read(conversation_id, &caller.user_id, seq)
            .await?;
        let receipt = pb::Receipt {
            conversation_id: conversation_id.to_owned(),
            user_id: caller.user_id.clone(),
            read_seq: position,
            read_at: Some(timestamp(now_ms())),
        };
        let payload = encode_event(Envelope {
            receipt: Some(receipt),
            ..Default::default()
        });
        self.store
            .publish(&conversation_channel(conversation_id), payload)
            .await?;
        Ok(position)
    }

    /// Tells the members that the caller is typing (ephemeral; at most every two seconds).
    pub async fn typing(&self, caller: &Caller, conversation_id: &str) -> Result<()> {
        self.check_member(caller, conversation_id).await?;
        if let Err(wait) = self
            .typing
            .take(&format!("{}|{conversation_id}", caller.user_id))
        {
            return Err(Error::RateLimited {
                message: "typing notices are limited to one every 2 s per conversation".into(),
                retry_after: wait,
            });
        }
        let typing = pb::TypingEvent {
            conversation_id: conversation_id.to_owned(),
            user_id: caller.user_id.clone(),
        };
        let payload = encode_event(Envelope {
            typing: Some(typing),
            ..Default::default()
        });
        self.store
            .publish(&conversation_channel(conversation_id), payload)
            .await
    }

    /// What `user` sees of `record`: members, newest message, read position, unread count.
    pub async fn view(&self, record: &ConversationRecord, user: &str) -> Result<pb::Conversation> {
        // Independent reads, in flight together: one round trip, not three.
        let (latest, read_seq, consultation) = futures::try_join!(
            self.store.history(&record.id, Range::Latest, 1),
            self.store.read_position(&record.id, user),
            self.consultation_of(record, user),
        )?;
        let summary = Summary {
            record: record.clone(),
            last_message: latest.messages.into_iter().next_back(),
            last_seq: latest.last_seq,
            read_seq,
        };
        Ok(conversation_view(summary, consultation))
    }

    /// The consultation of a SUPPORT conversation, as `user` sees it.
    async fn consultation_of(
        &self,
        record: &ConversationRecord,
        user: &str,
    ) -> Result<Option<pb::Consultation>> {
        match (&self.support, record.kind) {
            (Some(views), Kind::Support) => views.consultation(record, user).await,
            _ => Ok(None),
        }
    }

    /// Publishes a conversation event to the user channels of `notify`. Each recipient
    /// gets the conversation as they see it (their read position; for consultations, what
    /// the customer may not see is left out). Groups and direct chats look the same to
    /// everyone, so their event is built once and published in pipelined batches; past
    /// [`EVENT_MEMBER_IDS`] members it leaves the member list out, so the work of a
    /// membership change grows with the group, not with its square.
    pub(crate) async fn announce(
        &self,
        record: &ConversationRecord,
        kind: pb::ConversationEventKind,
        actor: &str,
        about: &[String],
        notify: &[String],
    ) {
        let event = |mut conversation: pb::Conversation| {
            if conversation.member_ids.len() > EVENT_MEMBER_IDS {
                conversation.member_ids = Vec::new();
            }
            encode_event(Envelope {
                event: Some(pb::ConversationEvent {
                    kind: kind as i32,
                    conversation: Some(conversation),
                    actor_id: actor.to_owned(),
                    user_ids: about.to_vec(),
                }),
                ..Default::default()
            })
        };
        // Events are best effort (the change itself is stored); a client that missed one
        // sees the change in ListConversations.
        if record.kind != Kind::Support {
            let payload = match self.view(record, "").await {
                Ok(c) => event(c),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot build a conversation event");
                    return;
                }
            };
            let channels: Vec<String> = notify.iter().map(|u| user_channel(u)).collect();
            if let Err(e) = self.store.publish_many(&channels, payload).await {
                tracing::warn!(error = %e, "cannot publish a conversation event");
            }
            return;
        }
        // Each recipient's view is their own; they are built (and published) side by
        // side, a few at a time, not one round trip after another.
        use futures::StreamExt;
        futures::stream::iter(notify)
            .for_each_concurrent(ANNOUNCE_CONCURRENCY, |user| {
                let event = &event;
                async move {
                    let payload = match self.view(record, user).await {
                        Ok(c) => event(c),
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot build a conversation event");
                            return;
                        }
                    };
                    if let Err(e) = self.store.publish(&user_channel(user), payload).await {
                        tracing::warn!(error = %e, "cannot publish a conversation event");
                    }
                }
            })
            .await;
    }
}

/// Most member ids a conversation event carries; larger conversations' events leave the
/// list out (`member_count` still says how many).
pub const EVENT_MEMBER_IDS: usize = 100;

/// A message ready for the store's send step, with its `publish` span.
/// A conversation as its member sees it, from its [`Summary`] and (SUPPORT ones) its
/// consultation.
fn conversation_view(s: Summary, consultation: Option<pb::Consultation>) -> pb::Conversation {
    let Summary {
        record,
        last_message,
        last_seq,
        read_seq,
    } = s;
    pb::Conversation {
        kind: record.kind.to_proto(),
        member_ids: record.members.iter().map(|m| m.user_id.clone()).collect(),
        member_count: u32::try_from(record.members.len()).unwrap_or(u32::MAX),
        created_at: Some(timestamp(record.created_at_ms)),
        last_message,
        last_seq,
        read_seq,
        unread_count: last_seq.saturating_sub(read_seq),
        consultation,
        read_only: record.read_only,
        id: record.id,
        title: record.title,
        owner_id: record.owner_id,
    }
}

pub(crate) struct Prepared {
    message: pb::Message,
    conversation_id: String,
    pub(crate) span: tracing::Span,
}

impl Prepared {
    /// The caller's answer, from what the store did.
    pub(crate) fn finish(self, sent: Sent) -> Result<(pb::Message, bool)> {
        let Prepared {
            message,
            conversation_id,
            span: publish,
        } = self;
        match sent {
            Sent::Stored(seq) => {
                publish.record("switchboard.seq", seq);
                metrics::counter!(switchboard_common::metrics::MESSAGES_PUBLISHED).increment(1);
                Ok((pb::Message { seq, ..message }, false))
            }
            Sent::Duplicate {
                seq,
                message_id,
                sent_at_ms,
            } => Ok((
                pb::Message {
                    seq,
                    id: message_id,
                    sent_at: Some(timestamp(sent_at_ms)),
                    ..message
                },
                true,
            )),
            Sent::NotFound => Err(Error::ConversationNotFound(conversation_id)),
            Sent::NotMember => Err(Error::NotAMember(conversation_id)),
            Sent::ReadOnly => Err(Error::ConversationClosed(conversation_id)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_common::status::Invalid;

    #[test]
    fn page_tokens_are_cursors_this_server_issued() {
        let id = "0190d6a2-8c5e-7d3a-9f41-6b2e8a1c0d57";
        assert_eq!(page_cursor("").ok(), Some(None));
        assert_eq!(
            page_cursor(&format!("1700000000000:{id}")).ok(),
            Some(Some((1_700_000_000_000, id.to_owned())))
        );
        for bad in [
            "1001".to_owned(),
            "x:y".to_owned(),
            format!("-1:{id}"),
            format!("99999999999999999999999:{id}"),
            "5:".to_owned(),
            format!("5:{id}\n"),
        ] {
            assert!(
                matches!(page_cursor(&bad), Err(Error::InvalidArgument(Invalid { ref field, .. })) if field == "page_token"),
                "{bad:?}"
            );
        }
    }

    #[tokio::test]
    async fn conversations_are_listed_by_last_activity_in_pages_with_nothing_lost_or_twice() {
        use crate::store::MessagingStore;
        use crate::store::memory::MemoryStore;
        let store = Arc::new(MemoryStore::new(
            switchboard_common::bus::MemoryBus::new(),
            100,
        ));
        let m = Messaging::new(
            store.clone(),
            SendLimit {
                per_second: 1000.0,
                burst: 1000.0,
            },
            100,
            Arc::new(crate::directory::testing::Everyone),
        );
        let me = Caller {
            user_id: "0190d6a2-0000-7000-8000-000000000001".into(),
            role: switchboard_common::token::Role::Customer,
            session_id: "s".into(),
            expires_at: u64::MAX,
        };
        // Seven groups created at 1..7 s; two of them get a message (now, much later).
        let mut ids = Vec::new();
        for k in 1..=7u64 {
            let id = format!("0190d6a2-0000-7000-8000-00000000010{k}");
            store
                .create(&ConversationRecord {
                    id: id.clone(),
                    kind: Kind::Group,
                    title: format!("g{k}"),
                    owner_id: me.user_id.clone(),
                    created_at_ms: k * 1000,
                    epoch: "e".into(),
                    read_only: false,
                    members: vec![Member {
                        user_id: me.user_id.clone(),
                        joined_at_ms: k * 1000,
                    }],
                })
                .await
                .expect("create");
            ids.push(id);
        }
        for (n, k) in [(1, 2usize), (2, 5)] {
            let draft = Draft::parse(
                ids[k - 1].clone(),
                format!("m{n}"),
                "hi".into(),
                Default::default(),
            )
            .expect("draft");
            m.send(&me, draft).await.expect("send");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // Newest activity first: g5 (sent last), g2, then by creation g7, g6, g4, g3, g1.
        let mut seen = Vec::new();
        let mut token = String::new();
        let mut pages = 0;
        loop {
            let (page, next) = m.list(&me, 3, &token).await.expect("page");
            assert!(page.len() <= 3);
            seen.extend(page.into_iter().map(|c| c.title));
            pages += 1;
            if next.is_empty() {
                break;
            }
            assert!(pages < 10, "paging does not end");
            token = next;
        }
        assert_eq!(seen, ["g5", "g2", "g7", "g6", "g4", "g3", "g1"]);
        assert_eq!(pages, 3);
        // A page size beyond the bound is refused, naming the field.
        assert!(matches!(
            m.list(&me, 101, "").await,
            Err(Error::InvalidArgument(Invalid { ref field, .. })) if field == "page_size"
        ));
    }

    #[test]
    fn buckets_allow_a_burst_then_ask_to_wait() {
        let b = Buckets::new(SendLimit {
            per_second: 10.0,
            burst: 3.0,
        });
        for _ in 0..3 {
            assert!(b.take("u").is_ok());
        }
        let wait = b.take("u").expect_err("over the burst");
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(100),
            "{wait:?}"
        );
        assert!(b.take("other").is_ok(), "buckets are per key");
    }

    proptest::proptest! {
        /// Any page token: a cursor or INVALID_ARGUMENT naming it; never a panic.
        #[test]
        fn any_page_token_is_a_cursor_or_refused(token in ".{0,60}", n in proptest::prelude::any::<u64>()) {
            for t in [token, n.to_string(), format!("{n}:x")] {
                match page_cursor(&t) {
                    Ok(_) => {}
                    Err(Error::InvalidArgument(Invalid { field, .. })) => proptest::prop_assert_eq!(field, "page_token"),
                    Err(e) => proptest::prop_assert!(false, "{e:?}"),
                }
            }
        }
    }

    fn caller(n: u32) -> Caller {
        Caller {
            user_id: format!("0190d6a2-0000-7000-8000-{n:012}"),
            role: switchboard_common::token::Role::Customer,
            session_id: format!("s{n}"),
            expires_at: u64::MAX,
        }
    }

    fn rules(burst: f64) -> Messaging<crate::store::memory::MemoryStore> {
        Messaging::new(
            Arc::new(crate::store::memory::MemoryStore::new(
                switchboard_common::bus::MemoryBus::new(),
                100,
            )),
            SendLimit {
                per_second: 0.001,
                burst,
            },
            3,
            Arc::new(crate::directory::testing::Everyone),
        )
    }

    async fn direct(
        m: &Messaging<crate::store::memory::MemoryStore>,
        a: &Caller,
        b: &Caller,
    ) -> pb::Conversation {
        m.create(
            a,
            &Credential::default(),
            pb::ConversationKind::Direct as i32,
            "",
            std::slice::from_ref(&b.user_id),
        )
        .await
        .expect("direct")
        .0
    }

    fn draft(conversation: &str, key: &str, body: &str) -> Draft {
        Draft::parse(
            conversation.into(),
            key.into(),
            body.into(),
            Default::default(),
        )
        .expect("draft")
    }

    #[tokio::test]
    async fn sends_number_gaplessly_a_retry_is_answered_with_the_first_and_outsiders_are_refused() {
        let m = rules(100.0);
        let (a, b, outsider) = (caller(1), caller(2), caller(3));
        let (group, created) = m
            .create(
                &a,
                &Credential::default(),
                pb::ConversationKind::Group as i32,
                "g",
                std::slice::from_ref(&b.user_id),
            )
            .await
            .expect("create");
        assert!(created);
        let (first, retried) = m
            .send(&a, draft(&group.id, "k1", "one"))
            .await
            .expect("send");
        assert_eq!((first.seq, retried), (1, false));
        let (second, _) = m
            .send(&b, draft(&group.id, "k1", "two"))
            .await
            .expect("send");
        assert_eq!(second.seq, 2, "keys are per sender");
        // The same key again: the first message, body and all, and no new seq.
        let (again, retried) = m
            .send(&a, draft(&group.id, "k1", "different body"))
            .await
            .expect("retry");
        assert!(retried);
        assert_eq!((again.seq, again.body.as_str()), (1, "one"));
        assert!(matches!(
            m.send(&outsider, draft(&group.id, "k9", "let me in")).await,
            Err(Error::NotAMember(_))
        ));
        assert!(matches!(
            m.history(&outsider, &group.id, None, None, 10).await,
            Err(Error::NotAMember(_))
        ));
        let (page, _, _) = m
            .history(&b, &group.id, None, None, 10)
            .await
            .expect("history");
        assert_eq!(
            page.iter().map(|m| m.seq).collect::<Vec<_>>(),
            [1, 2],
            "gapless, in order, the retry stored nothing"
        );
        // Groups are bounded (3 here, owner included).
        let too_many: Vec<String> = (10..13).map(|n| caller(n).user_id).collect();
        assert!(matches!(
            m.create(
                &a,
                &Credential::default(),
                pb::ConversationKind::Group as i32,
                "big",
                &too_many
            )
            .await,
            Err(Error::InvalidArgument(_))
        ));
    }

    #[tokio::test]
    async fn reading_moves_forward_only_and_unread_counts_follow() {
        let m = rules(100.0);
        let (a, b) = (caller(1), caller(2));
        let direct = direct(&m, &a, &b).await;
        for k in 0..3 {
            m.send(&a, draft(&direct.id, &format!("k{k}"), "hi"))
                .await
                .expect("send");
        }
        assert_eq!(m.get(&b, &direct.id).await.expect("get").unread_count, 3);
        assert_eq!(
            m.get(&a, &direct.id).await.expect("get").unread_count,
            0,
            "one's own messages are read"
        );
        assert_eq!(m.mark_read(&b, &direct.id, 2).await.expect("read"), 2);
        assert_eq!(m.mark_read(&b, &direct.id, 1).await.expect("back"), 2);
        assert_eq!(
            m.mark_read(&b, &direct.id, u64::MAX).await.expect("past"),
            3
        );
        assert_eq!(m.get(&b, &direct.id).await.expect("get").unread_count, 0);
        // The same pair has one direct conversation.
        let (again, created) = m
            .create(
                &b,
                &Credential::default(),
                pb::ConversationKind::Direct as i32,
                "",
                std::slice::from_ref(&a.user_id),
            )
            .await
            .expect("direct again");
        assert_eq!((again.id.as_str(), created), (direct.id.as_str(), false));
    }

    #[tokio::test]
    async fn the_send_limit_refuses_with_a_wait_and_typing_is_rate_limited() {
        let m = rules(2.0);
        let (a, b) = (caller(1), caller(2));
        let direct = direct(&m, &a, &b).await;
        for k in 0..2 {
            m.send(&a, draft(&direct.id, &format!("k{k}"), "x"))
                .await
                .expect("within the burst");
        }
        match m.send(&a, draft(&direct.id, "k2", "x")).await {
            Err(Error::RateLimited { retry_after, .. }) => assert!(retry_after > Duration::ZERO),
            other => panic!("{other:?}"),
        }
        assert!(
            m.send(&b, draft(&direct.id, "k0", "x")).await.is_ok(),
            "per user"
        );
        m.typing(&a, &direct.id).await.expect("typing");
        assert!(matches!(
            m.typing(&a, &direct.id).await,
            Err(Error::RateLimited { .. })
        ));
    }
}
