//! The desk's rules: customers open consultations (with their first message, or not at
//! all), agents and admins accept queued ones, the assigned agent (or an admin) transfers
//! to another online agent, the customer, the agent or an admin closes. Plain Rust over
//! [`DeskStore`] and an [`AgentDirectory`] (the presence service in production); routing
//! is [`super::routing`]'s, views [`super::views`]'s.

use std::sync::Arc;

use switchboard_common::metrics as m;
use switchboard_common::status::Invalid;
use switchboard_common::token::{Caller, Role};
use switchboard_proto::messaging::v1 as pb;
use tokio::sync::Notify;
use tracing::Instrument;

use super::agents::AgentDirectory;
use super::views::{consultation_of, consultation_view};
use crate::clock::now_ms;
use crate::conversation::{ConversationRecord, Kind, MAX_TITLE_CHARS, Member};
use crate::domain::Messaging;
use crate::error::{Error, Result};
use crate::message::Draft;
use crate::store::DeskStore;
use crate::store::desk::{ConsultationRecord, ConsultationState, Step};

/// Longest resolution or transfer note, in bytes.
pub const MAX_NOTE_BYTES: usize = 1024;
/// Largest ListQueue page.
pub const MAX_QUEUE_PAGE: u32 = 200;

/// The desk's rules and routing.
pub struct Desk<S> {
    pub(super) messaging: Arc<Messaging<S>>,
    pub(super) agents: Arc<dyn AgentDirectory>,
    pub(super) capacity: u32,
    /// Woken when room frees up (a close, a transfer): routing runs again.
    pub(super) wake: Notify,
    /// One routing pass at a time in this process.
    pub(super) routing: tokio::sync::Mutex<()>,
}

fn is_staff(caller: &Caller) -> bool {
    matches!(caller.role, Role::Agent | Role::Admin)
}

fn note(field: &str, text: &str) -> Result<String> {
    if text.len() > MAX_NOTE_BYTES {
        return Err(Error::invalid(
            field,
            format!(
                "{field} must be at most {MAX_NOTE_BYTES} bytes, got {}",
                text.len()
            ),
        ));
    }
    Ok(text.trim().to_owned())
}

fn required_id(field: &str, id: &str) -> Result<()> {
    Ok(switchboard_common::id::check(field, id)?)
}

fn not_found(id: &str) -> Error {
    Error::ConsultationNotFound(id.to_owned())
}

/// Turns what a store step found into the caller's error; `rule` says which states allow
/// the change.
fn checked(id: &str, step: Step, rule: &str) -> Result<()> {
    match step {
        Step::Done(_) => Ok(()),
        Step::NotFound => Err(not_found(id)),
        Step::WrongState(state) => Err(Error::FailedPrecondition(format!(
            "consultation '{id}' is {}; {rule}",
            state.as_str()
        ))),
        Step::Moved(agent) => Err(Error::FailedPrecondition(format!(
            "consultation '{id}' is now held by agent '{agent}'"
        ))),
    }
}

impl<S: DeskStore> Desk<S> {
    /// The desk over `messaging`, routing with `presence`, at most `capacity` consultations
    /// per agent (0: no limit).
    pub fn new(
        messaging: Arc<Messaging<S>>,
        agents: Arc<dyn AgentDirectory>,
        capacity: u32,
    ) -> Self {
        Self {
            messaging,
            agents,
            capacity,
            wake: Notify::new(),
            routing: tokio::sync::Mutex::new(()),
        }
    }

    pub(super) fn store(&self) -> &Arc<S> {
        self.messaging.store()
    }

    pub(super) async fn record(&self, id: &str) -> Result<ConsultationRecord> {
        required_id("consultation_id", id)?;
        self.store()
            .consultation(id)
            .await?
            .ok_or_else(|| not_found(id))
    }

    /// After a change of consultation `id`: tells those concerned, and returns it as
    /// `caller` sees it.
    async fn changed(
        &self,
        id: &str,
        kind: pb::ConversationEventKind,
        caller: &Caller,
        also: &[String],
    ) -> Result<pb::Consultation> {
        let after = self.record(id).await?;
        self.tell(&after, kind, &caller.user_id, also).await;
        consultation_of(self.store().as_ref(), &after, &caller.user_id).await
    }

    /// A customer opens a consultation with its first message; it is routed at once.
    pub async fn open(
        &self,
        caller: &Caller,
        topic: &str,
        first_message: String,
    ) -> Result<(pb::Consultation, pb::Conversation)> {
        if !matches!(caller.role, Role::Customer | Role::Guest) {
            return Err(Error::PermissionDenied(format!(
                "only customers and guests open consultations; you are {} (agents take them with AcceptConsultation or by routing)",
                caller.role.as_str()
            )));
        }
        let topic = topic.trim();
        let len = topic.chars().count();
        if len == 0 || len > MAX_TITLE_CHARS {
            return Err(Error::invalid(
                "topic",
                format!("topic must be 1 to {MAX_TITLE_CHARS} characters, got {len}"),
            ));
        }
        let id = uuid::Uuid::now_v7().to_string();
        // Checks the first message before anything is stored.
        let draft = Draft::parse(
            id.clone(),
            format!("consultation-{id}"),
            first_message,
            Default::default(),
        )
        .map_err(|e| match e {
            Error::InvalidArgument(Invalid { message, .. }) => {
                Error::invalid("first_message", message.replace("body", "first_message"))
            }
            Error::BodyTooLarge(n) => Error::invalid(
                "first_message",
                format!("first_message is {n} bytes; at most 16384 bytes (16 KiB) of UTF-8"),
            ),
            other => other,
        })?;
        let now = now_ms();
        let conversation = ConversationRecord {
            id: id.clone(),
            kind: Kind::Support,
            title: topic.to_owned(),
            owner_id: String::new(),
            created_at_ms: now,
            epoch: uuid::Uuid::now_v7().simple().to_string(),
            read_only: false,
            members: vec![Member {
                user_id: caller.user_id.clone(),
                joined_at_ms: now,
            }],
        };
        let consultation = ConsultationRecord {
            id: id.clone(),
            customer_id: caller.user_id.clone(),
            agent_id: String::new(),
            topic: topic.to_owned(),
            state: ConsultationState::Queued,
            opened_at_ms: now,
            assigned_at_ms: 0,
            closed_at_ms: 0,
            resolution: String::new(),
            transfer_note: String::new(),
        };
        // Opened with its first message or not at all: the send limit is checked before
        // anything is stored, and the records, the queue entry and the first message are
        // one atomic store step.
        self.messaging.admit(caller)?;
        let (prepared, first) = self.messaging.prepared(caller, draft);
        let span = prepared.span.clone();
        let sent = self
            .store()
            .open(&conversation, &consultation, &first)
            .instrument(span)
            .await?;
        prepared.finish(sent)?;
        metrics::counter!(m::CONSULTATIONS_QUEUED).increment(1);
        self.messaging
            .announce(
                &conversation,
                pb::ConversationEventKind::Created,
                &caller.user_id,
                std::slice::from_ref(&caller.user_id),
                std::slice::from_ref(&caller.user_id),
            )
            .await;
        // Routing problems (presence down) leave it queued; the watch or the safety pass
        // routes it later.
        if let Err(e) = self.route().await {
            tracing::warn!(error = %e, "routing a new consultation failed; it waits in the queue");
        }
        // The caller opened it: no membership check to repeat, just its view.
        let record = self
            .store()
            .conversation(&id)
            .await?
            .ok_or_else(|| Error::Internal(format!("consultation {id} has no conversation")))?;
        let conversation = self.messaging.view(&record, &caller.user_id).await?;
        let consultation = conversation
            .consultation
            .clone()
            .ok_or_else(|| Error::Internal(format!("consultation {id} has no record")))?;
        Ok((consultation, conversation))
    }

    /// Agents and admins: the waiting consultations, oldest first.
    pub async fn queue(&self, caller: &Caller, limit: u32) -> Result<Vec<pb::Consultation>> {
        if !is_staff(caller) {
            return Err(Error::PermissionDenied(
                "only agents and admins may list the support queue".into(),
            ));
        }
        let limit = match limit {
            0 => 50,
            n if n <= MAX_QUEUE_PAGE => n,
            n => {
                return Err(Error::invalid(
                    "limit",
                    format!("limit must be at most {MAX_QUEUE_PAGE}, got {n}"),
                ));
            }
        };
        let records = self.store().queue(limit as usize).await?;
        Ok(records
            .iter()
            .enumerate()
            .map(|(i, r)| consultation_view(r, Some(i as u32 + 1), &caller.user_id))
            .collect())
    }

    /// Agents and admins take a queued consultation for themselves.
    pub async fn accept(&self, caller: &Caller, id: &str) -> Result<pb::Consultation> {
        if !is_staff(caller) {
            return Err(Error::PermissionDenied(
                "only agents and admins may accept consultations".into(),
            ));
        }
        required_id("consultation_id", id)?;
        let step = self.store().accept(id, &caller.user_id, now_ms()).await?;
        checked(id, step, "only queued consultations can be accepted")?;
        metrics::counter!(m::CONSULTATIONS_ASSIGNED, "how" => "accepted").increment(1);
        let accepted = self
            .changed(
                id,
                pb::ConversationEventKind::ConsultationAssigned,
                caller,
                &[],
            )
            .await;
        self.queue_moved().await;
        accepted
    }

    /// The assigned agent (or an admin) hands a consultation to another online agent.
    pub async fn transfer(
        &self,
        caller: &Caller,
        id: &str,
        to: &str,
        text: &str,
    ) -> Result<pb::Consultation> {
        if !is_staff(caller) {
            return Err(Error::PermissionDenied(
                "only the assigned agent or an admin may transfer a consultation".into(),
            ));
        }
        required_id("to_agent_id", to)?;
        let transfer_note = note("note", text)?;
        let record = self.record(id).await?;
        if record.state != ConsultationState::Assigned {
            return Err(Error::FailedPrecondition(format!(
                "consultation '{id}' is {}; only assigned consultations can be transferred",
                record.state.as_str()
            )));
        }
        if record.agent_id != caller.user_id && caller.role != Role::Admin {
            return Err(Error::PermissionDenied(format!(
                "consultation '{id}' is assigned to another agent; only that agent or an admin may transfer it"
            )));
        }
        if to == record.agent_id {
            return Err(Error::invalid(
                "to_agent_id",
                format!("consultation '{id}' is already assigned to '{to}'"),
            ));
        }
        if !self.agents.is_online(to).await? {
            return Err(Error::FailedPrecondition(format!(
                "'{to}' is not an online agent; transfer to an agent who is online"
            )));
        }
        let previous = record.agent_id.clone();
        let step = self
            .store()
            .transfer(id, &previous, to, &transfer_note, now_ms())
            .await?;
        checked(id, step, "only assigned consultations can be transferred")?;
        metrics::counter!(m::CONSULTATIONS_ASSIGNED, "how" => "transferred").increment(1);
        // The previous agent has room again.
        self.wake.notify_one();
        self.changed(
            id,
            pb::ConversationEventKind::ConsultationTransferred,
            caller,
            &[previous],
        )
        .await
    }

    /// The customer, the assigned agent or an admin closes a consultation; its
    /// conversation becomes read-only.
    pub async fn close(&self, caller: &Caller, id: &str, text: &str) -> Result<pb::Consultation> {
        let resolution = note("resolution", text)?;
        let record = self.record(id).await?;
        let allowed = caller.user_id == record.customer_id
            || (caller.user_id == record.agent_id && !record.agent_id.is_empty())
            || caller.role == Role::Admin;
        if !allowed {
            return Err(Error::PermissionDenied(format!(
                "only the customer, the assigned agent or an admin may close consultation '{id}'"
            )));
        }
        let step = self.store().close(id, &resolution, now_ms()).await?;
        checked(id, step, "it cannot be closed again")?;
        self.wake.notify_one();
        let closed = self
            .changed(
                id,
                pb::ConversationEventKind::ConsultationClosed,
                caller,
                &[],
            )
            .await;
        if record.state == ConsultationState::Queued {
            self.queue_moved().await;
        }
        closed
    }

    /// Tells the customer and the agent (and `also`) about a change of `record`.
    pub(super) async fn tell(
        &self,
        record: &ConsultationRecord,
        kind: pb::ConversationEventKind,
        actor: &str,
        also: &[String],
    ) {
        let conversation = match self.store().conversation(&record.id).await {
            Ok(Some(c)) => c,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "cannot announce a consultation change");
                return;
            }
        };
        let mut notify = vec![record.customer_id.clone()];
        if !record.agent_id.is_empty() {
            notify.push(record.agent_id.clone());
        }
        notify.extend(also.iter().cloned());
        let about: Vec<String> = if record.agent_id.is_empty() {
            Vec::new()
        } else {
            vec![record.agent_id.clone()]
        };
        self.messaging
            .announce(&conversation, kind, actor, &about, &notify)
            .await;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};
    use std::sync::Mutex;

    use std::time::Duration;

    use futures::StreamExt;
    use futures::future::BoxFuture;
    use futures::stream::BoxStream;
    use switchboard_common::shutdown::CancellationToken;

    use super::*;
    use crate::domain::SendLimit;
    use crate::store::memory::MemoryStore;

    /// Agents as a test sets them; `watch` wakes on every change.
    struct FixedAgents {
        available: Mutex<Vec<String>>,
        online: Mutex<HashSet<String>>,
        wakes: tokio::sync::broadcast::Sender<()>,
    }

    impl FixedAgents {
        fn new() -> Arc<Self> {
            Arc::new(Self {
                available: Mutex::new(Vec::new()),
                online: Mutex::new(HashSet::new()),
                wakes: tokio::sync::broadcast::channel(16).0,
            })
        }

        /// `available` are online and AVAILABLE; `busy` only online.
        fn set(&self, available: &[&str], busy: &[&str]) {
            self.set_quietly(available, busy);
            let _ = self.wakes.send(());
        }

        /// [`set`](Self::set) without telling watchers (as when a presence event is lost).
        fn set_quietly(&self, available: &[&str], busy: &[&str]) {
            let own = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
            *self.available.lock().expect("lock") = own(available);
            *self.online.lock().expect("lock") =
                own(available).into_iter().chain(own(busy)).collect();
        }
    }

    impl AgentDirectory for FixedAgents {
        fn available(&self) -> BoxFuture<'_, Result<Vec<String>>> {
            let now = self.available.lock().expect("lock").clone();
            Box::pin(async move { Ok(now) })
        }

        fn is_online<'a>(&'a self, user: &'a str) -> BoxFuture<'a, Result<bool>> {
            let on = self.online.lock().expect("lock").contains(user);
            Box::pin(async move { Ok(on) })
        }

        fn watch(&self) -> BoxFuture<'_, Result<BoxStream<'static, ()>>> {
            let changes = tokio_stream::wrappers::BroadcastStream::new(self.wakes.subscribe())
                .filter_map(|r| futures::future::ready(r.ok()));
            Box::pin(async move { Ok(futures::stream::once(async {}).chain(changes).boxed()) })
        }
    }

    const A1: &str = "0190d6a2-0000-7000-8000-0000000000a1";
    const A2: &str = "0190d6a2-0000-7000-8000-0000000000a2";
    const A3: &str = "0190d6a2-0000-7000-8000-0000000000a3";

    fn person(id: &str, role: Role) -> Caller {
        Caller {
            user_id: id.into(),
            role,
            session_id: format!("s-{id}"),
            expires_at: u64::MAX,
        }
    }

    fn desk(capacity: u32, burst: f64) -> (Arc<Desk<MemoryStore>>, Arc<FixedAgents>) {
        let store = Arc::new(MemoryStore::new(
            switchboard_common::bus::MemoryBus::new(),
            100,
        ));
        let messaging = Arc::new(
            Messaging::new(
                store.clone(),
                SendLimit {
                    per_second: 0.001,
                    burst,
                },
                100,
                Arc::new(crate::directory::testing::Everyone),
            )
            .with_support(Arc::new(crate::support::views::Views(store))),
        );
        let agents = FixedAgents::new();
        (
            Arc::new(Desk::new(messaging, agents.clone(), capacity)),
            agents,
        )
    }

    async fn agent_of(desk: &Desk<MemoryStore>, id: &str) -> String {
        desk.record(id).await.expect("record").agent_id
    }

    #[tokio::test]
    async fn routing_balances_available_agents_within_their_capacity() {
        let (desk, agents) = desk(2, 10.0);
        agents.set(&[A1, A2], &[A3]);
        let mut ids = Vec::new();
        for k in 0..5 {
            let customer = person(&format!("c{k}"), Role::Customer);
            let (c, _) = desk
                .open(&customer, "help", "hi".into())
                .await
                .expect("open");
            ids.push(c.id);
        }
        let mut load: HashMap<String, usize> = HashMap::new();
        for id in &ids[..4] {
            *load.entry(agent_of(&desk, id).await).or_default() += 1;
        }
        // a3 is online but not AVAILABLE: nothing for it; a1 and a2 two each.
        assert_eq!(load.get(A1), Some(&2));
        assert_eq!(load.get(A2), Some(&2));
        assert_eq!(agent_of(&desk, &ids[4]).await, "", "over capacity: waits");
        let waiting = desk
            .queue(&person(A1, Role::Agent), 0)
            .await
            .expect("queue");
        assert_eq!(waiting.len(), 1);
        assert_eq!(waiting[0].queue_position, 1);
    }

    #[tokio::test]
    async fn a_list_carries_each_consultation_with_its_state_and_place_and_groups_none() {
        use crate::store::MessagingStore;
        let (desk, agents) = desk(1, 10.0);
        agents.set(&[A1], &[]);
        let customer = person("0190d6a2-0000-7000-8000-0000000000c1", Role::Customer);
        let (taken, _) = desk
            .open(&customer, "first", "hi".into())
            .await
            .expect("open");
        let (waiting, _) = desk
            .open(&customer, "second", "hi".into())
            .await
            .expect("open");
        desk.store()
            .create(&ConversationRecord {
                id: "0190d6a2-0000-7000-8000-0000000000f1".into(),
                kind: Kind::Group,
                title: "friends".into(),
                owner_id: customer.user_id.clone(),
                created_at_ms: 1,
                epoch: "e".into(),
                read_only: false,
                members: vec![Member {
                    user_id: customer.user_id.clone(),
                    joined_at_ms: 1,
                }],
            })
            .await
            .expect("group");
        let (listed, _) = desk.messaging.list(&customer, 10, "").await.expect("list");
        let seen: HashMap<String, Option<(i32, String, u32)>> = listed
            .into_iter()
            .map(|c| {
                let consultation = c
                    .consultation
                    .map(|x| (x.state, x.agent_id, x.queue_position));
                (c.title, consultation)
            })
            .collect();
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert_eq!(seen["friends"], None);
        assert_eq!(
            seen["first"],
            Some((pb::ConsultationState::Assigned as i32, A1.to_owned(), 0))
        );
        assert_eq!(
            seen["second"],
            Some((pb::ConsultationState::Queued as i32, String::new(), 1))
        );
        assert_ne!(taken.id, waiting.id);
    }

    #[tokio::test]
    async fn a_waiting_consultation_goes_to_the_first_agent_who_becomes_available() {
        let (desk, agents) = desk(5, 10.0);
        let (c, _) = desk
            .open(&person("c1", Role::Customer), "late", "anyone?".into())
            .await
            .expect("open");
        assert_eq!(agent_of(&desk, &c.id).await, "");
        let shutdown = CancellationToken::new();
        let dispatching = tokio::spawn(
            desk.clone()
                .dispatch(Duration::from_secs(3600), shutdown.clone()),
        );
        agents.set(&[A1], &[]);
        let assigned = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if agent_of(&desk, &c.id).await == A1 {
                    return;
                }
                tokio::task::yield_now().await;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(assigned.is_ok(), "not routed when the agent came");
        shutdown.cancel();
        dispatching.await.expect("dispatch ends at shutdown");
    }

    #[tokio::test]
    async fn a_lost_presence_event_is_caught_by_the_safety_pass() {
        let (desk, agents) = desk(5, 10.0);
        let (c, _) = desk
            .open(&person("c1", Role::Customer), "quiet", "anyone?".into())
            .await
            .expect("open");
        let shutdown = CancellationToken::new();
        let dispatching = tokio::spawn(
            desk.clone()
                .dispatch(Duration::from_secs(2), shutdown.clone()),
        );
        // The start's pass finds nobody; then the agent comes, but the event that says so
        // is lost: nothing routes it until the next pass, 2 s after the start.
        tokio::time::sleep(Duration::from_millis(200)).await;
        agents.set_quietly(&[A1], &[]);
        assert_eq!(
            agent_of(&desk, &c.id).await,
            "",
            "routed without a pass or an event"
        );
        let routed = tokio::time::timeout(Duration::from_secs(10), async {
            while agent_of(&desk, &c.id).await != A1 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(routed.is_ok(), "the safety pass missed it");
        shutdown.cancel();
        dispatching.await.expect("dispatch ends at shutdown");
    }

    #[tokio::test]
    async fn the_rules_refuse_what_a_role_or_a_state_does_not_allow() {
        let (desk, agents) = desk(5, 10.0);
        agents.set(&[A1], &[A2]);
        let (customer, a1, a2, a3) = (
            person("c1", Role::Customer),
            person(A1, Role::Agent),
            person(A2, Role::Agent),
            person(A3, Role::Agent),
        );
        assert!(matches!(
            desk.open(&a1, "t", "x".into()).await,
            Err(Error::PermissionDenied(_))
        ));
        assert!(matches!(
            desk.open(&customer, "", "x".into()).await,
            Err(Error::InvalidArgument(_))
        ));
        let (c, _) = desk.open(&customer, "t", "x".into()).await.expect("open");
        assert_eq!(agent_of(&desk, &c.id).await, A1);
        assert!(matches!(
            desk.accept(&customer, &c.id).await,
            Err(Error::PermissionDenied(_))
        ));
        assert!(
            matches!(
                desk.accept(&a2, &c.id).await,
                Err(Error::FailedPrecondition(_))
            ),
            "only queued ones can be accepted"
        );
        let r = desk.transfer(&a2, &c.id, A1, "").await;
        assert!(matches!(r, Err(Error::PermissionDenied(_))), "{r:?}");
        assert!(
            matches!(
                desk.transfer(&a1, &c.id, A3, "").await,
                Err(Error::FailedPrecondition(_))
            ),
            "a3 is not online"
        );
        let moved = desk
            .transfer(&a1, &c.id, A2, "yours")
            .await
            .expect("transfer");
        assert_eq!(moved.agent_id, A2);
        assert!(matches!(
            desk.close(&a3, &c.id, "no").await,
            Err(Error::PermissionDenied(_))
        ));
        let closed = desk.close(&customer, &c.id, "thanks").await.expect("close");
        assert_eq!(closed.resolution, "thanks");
        assert!(matches!(
            desk.close(&a2, &c.id, "again").await,
            Err(Error::FailedPrecondition(_))
        ));
    }

    #[tokio::test]
    async fn over_the_send_limit_nothing_is_opened() {
        let (desk, agents) = desk(5, 1.0);
        agents.set(&[], &[]);
        let customer = person("c1", Role::Customer);
        desk.open(&customer, "one", "x".into())
            .await
            .expect("first");
        assert!(matches!(
            desk.open(&customer, "two", "y".into()).await,
            Err(Error::RateLimited { .. })
        ));
        let waiting = desk
            .queue(&person(A1, Role::Agent), 0)
            .await
            .expect("queue");
        assert_eq!(waiting.len(), 1, "the refused one was stored");
    }
}
