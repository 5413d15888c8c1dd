//! The online customer-service desk: customers open consultations, routing hands each to
//! the available agent with the fewest open consultations, agents accept, transfer and
//! close them. Plain Rust over [`DeskStore`] and the presence service.
//!
//! Routing is driven by events, never by a tight poll: a new consultation routes at once;
//! every instance watches its agents' presence (`Watch` by role over gRPC) and routes when
//! one becomes available; closes and transfers free room and route again. A slow safety
//! pass ([`Config::queue_recheck`](crate::Config)) catches what a crashed instance or a lost
//! event left waiting. Each assignment is one atomic store step, so instances may route at
//! the same time without assigning anything twice.

use std::sync::Arc;
use std::time::Duration;

use switchboard_common::config::Secret;
use switchboard_common::metrics as m;
use switchboard_common::rpc::Traced;
use switchboard_common::server::SERVICE_TOKEN_HEADER;
use switchboard_common::shutdown::CancellationToken;
use switchboard_common::status::Invalid;
use switchboard_common::token::{Caller, Role};
use switchboard_proto::auth::v1 as auth_pb;
use switchboard_proto::messaging::v1 as pb;
use switchboard_proto::presence::v1 as presence_pb;
use switchboard_proto::presence::v1::presence_service_client::PresenceServiceClient;
use tokio::sync::Notify;
use tonic::transport::Channel;
use tracing::Instrument;

use crate::conversation::{ConversationRecord, Kind, MAX_TITLE_CHARS, Member};
use crate::domain::{Messaging, now_ms, timestamp};
use crate::error::{Dependency, Error, Result};
use crate::message::Draft;
use crate::store::DeskStore;
use crate::store::desk::{ConsultationRecord, ConsultationState, Routed, Step};

/// Longest resolution or transfer note, in bytes.
pub const MAX_NOTE_BYTES: usize = 1024;
/// Largest ListQueue page.
pub const MAX_QUEUE_PAGE: u32 = 200;
/// Most assignments one routing pass makes (the next event or pass continues).
const MAX_PER_PASS: usize = 1000;

/// Customers told their new place when the queue moves: the first this many in line.
pub const QUEUE_NOTICES: usize = 100;

/// The presence service as the desk uses it, authenticated with the service token.
#[derive(Clone)]
pub struct Presence {
    client: PresenceServiceClient<Traced<Channel>>,
    token: Option<Secret>,
}

impl Presence {
    /// A lazily connected client of the presence service at `url`; its calls are client
    /// spans of the desk operation that made them.
    pub fn new(url: &str, token: Option<Secret>) -> Result<Self> {
        let channel = switchboard_common::rpc::lazy_channel(url, Some(Duration::from_secs(5)))
            .map_err(|e| Error::Internal(format!("presence url {url}: {e}")))?;
        Ok(Self {
            client: PresenceServiceClient::new(Traced::new(
                channel,
                &["/switchboard.presence.v1.PresenceService/Watch"],
            )),
            token,
        })
    }

    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        if let Some(value) = self.token.as_ref().and_then(|t| t.expose().parse().ok()) {
            req.metadata_mut().insert(SERVICE_TOKEN_HEADER, value);
        }
        req
    }

    fn unavailable(status: tonic::Status) -> Error {
        Error::Unavailable {
            dependency: Dependency::Presence,
            cause: format!("presence: {:?}: {}", status.code(), status.message()),
        }
    }

    /// Agents that are online and AVAILABLE, by id.
    pub async fn available_agents(&self) -> Result<Vec<String>> {
        let reply = self
            .client
            .clone()
            .list_online(self.request(presence_pb::ListOnlineRequest {
                role: auth_pb::Role::Agent as i32,
                state: presence_pb::PresenceState::Available as i32,
            }))
            .await
            .map_err(Self::unavailable)?;
        Ok(reply
            .into_inner()
            .users
            .into_iter()
            .map(|u| u.user_id)
            .collect())
    }

    /// Whether `user` is an agent with a live session.
    pub async fn is_online_agent(&self, user: &str) -> Result<bool> {
        let reply = self
            .client
            .clone()
            .get(self.request(presence_pb::GetRequest {
                user_ids: vec![user.to_owned()],
            }))
            .await
            .map_err(Self::unavailable)?;
        Ok(reply.into_inner().presences.iter().any(|p| {
            p.user_id == user
                && p.role == auth_pb::Role::Agent as i32
                && p.state != presence_pb::PresenceState::Offline as i32
        }))
    }

    /// Every change of every agent, starting with a snapshot of the online ones.
    async fn watch_agents(&self) -> Result<tonic::Streaming<presence_pb::WatchResponse>> {
        // Watch is a stream: no overall deadline.
        let mut req = self.request(presence_pb::WatchRequest {
            user_ids: Vec::new(),
            role: auth_pb::Role::Agent as i32,
        });
        req.set_timeout(Duration::from_secs(24 * 3600));
        Ok(self
            .client
            .clone()
            .watch(req)
            .await
            .map_err(Self::unavailable)?
            .into_inner())
    }
}

/// The desk's rules and routing.
pub struct Desk<S> {
    messaging: Arc<Messaging<S>>,
    presence: Presence,
    capacity: u32,
    wake: Notify,
    routing: tokio::sync::Mutex<()>,
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

/// A stored consultation as `viewer` sees it, with its queue position while queued.
pub async fn consultation_of<S: DeskStore>(
    store: &S,
    r: &ConsultationRecord,
    viewer: &str,
) -> Result<pb::Consultation> {
    let position = match r.state {
        ConsultationState::Queued => store.queue_position(&r.id).await?,
        _ => None,
    };
    Ok(consultation_view(r, position, viewer))
}

/// A consultation as `viewer` sees it (the transfer note is for agents only).
pub fn consultation_view(
    r: &ConsultationRecord,
    queue_position: Option<u32>,
    viewer: &str,
) -> pb::Consultation {
    let at = |ms: u64| (ms > 0).then(|| timestamp(ms));
    pb::Consultation {
        id: r.id.clone(),
        customer_id: r.customer_id.clone(),
        agent_id: r.agent_id.clone(),
        topic: r.topic.clone(),
        state: match r.state {
            ConsultationState::Queued => pb::ConsultationState::Queued,
            ConsultationState::Assigned => pb::ConsultationState::Assigned,
            ConsultationState::Closed => pb::ConsultationState::Closed,
        } as i32,
        queue_position: queue_position.unwrap_or(0),
        opened_at: at(r.opened_at_ms),
        assigned_at: at(r.assigned_at_ms),
        closed_at: at(r.closed_at_ms),
        resolution: r.resolution.clone(),
        transfer_note: if viewer == r.customer_id {
            String::new()
        } else {
            r.transfer_note.clone()
        },
    }
}

impl<S: DeskStore> Desk<S> {
    /// The desk over `messaging`, routing with `presence`, at most `capacity` consultations
    /// per agent (0: no limit).
    pub fn new(messaging: Arc<Messaging<S>>, presence: Presence, capacity: u32) -> Self {
        Self {
            messaging,
            presence,
            capacity,
            wake: Notify::new(),
            routing: tokio::sync::Mutex::new(()),
        }
    }

    fn store(&self) -> &Arc<S> {
        self.messaging.store()
    }

    async fn record(&self, id: &str) -> Result<ConsultationRecord> {
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
        if caller.role != Role::Customer {
            return Err(Error::PermissionDenied(format!(
                "only customers open consultations; you are {} (agents take them with AcceptConsultation or by routing)",
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
        // anything is stored, and a first message that cannot be stored closes the
        // consultation again (it never waits in the queue without one).
        self.messaging.admit(caller)?;
        self.store().open(&conversation, &consultation).await?;
        if let Err(e) = self.messaging.send_admitted(caller, draft).await {
            let undo = self
                .store()
                .close(
                    &id,
                    "not opened: its first message could not be stored",
                    now_ms(),
                )
                .await;
            if let Err(u) = undo {
                tracing::warn!(error = %u, consultation_id = %id, "cannot close a consultation whose first message failed");
            }
            return Err(e);
        }
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
        let conversation = self.messaging.get(caller, &id).await?;
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
        if !self.presence.is_online_agent(to).await? {
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

    /// After consultations left the queue: tells the customers of the first
    /// [`QUEUE_NOTICES`] in line their place now (best effort, like every event).
    async fn queue_moved(&self) {
        let waiting = match self.store().queue(QUEUE_NOTICES).await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "cannot announce the queue's new order");
                return;
            }
        };
        for record in &waiting {
            self.tell(
                record,
                pb::ConversationEventKind::ConsultationQueueMoved,
                "",
                &[],
            )
            .await;
        }
    }

    /// Tells the customer and the agent (and `also`) about a change of `record`.
    async fn tell(
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

    /// Assigns queued consultations, oldest first, while an available agent has room.
    pub async fn route(&self) -> Result<usize> {
        let _one_pass_at_a_time = self.routing.lock().await;
        let mut candidates: Option<Vec<String>> = None;
        let mut assigned = 0;
        while assigned < MAX_PER_PASS {
            let agents = match &candidates {
                Some(a) => a,
                None => {
                    if self.store().queue(1).await?.is_empty() {
                        break;
                    }
                    candidates.insert(self.presence.available_agents().await?)
                }
            };
            if agents.is_empty() {
                break;
            }
            match self
                .store()
                .route_next(agents, self.capacity, now_ms())
                .await?
            {
                Routed::Assigned { id, agent_id } => {
                    assigned += 1;
                    metrics::counter!(m::CONSULTATIONS_ASSIGNED, "how" => "routed").increment(1);
                    tracing::info!(consultation_id = %id, agent_id = %agent_id, "consultation assigned");
                    if let Ok(record) = self.record(&id).await {
                        self.tell(
                            &record,
                            pb::ConversationEventKind::ConsultationAssigned,
                            "",
                            &[],
                        )
                        .await;
                    }
                }
                Routed::Empty | Routed::NoAgent => break,
            }
        }
        if assigned > 0 {
            self.queue_moved().await;
        }
        Ok(assigned)
    }

    /// A routing pass of its own trace (nobody's call caused it).
    async fn route_logged(&self, why: &str) {
        let span =
            tracing::info_span!(parent: None, "route consultations", switchboard.trigger = why);
        match self.route().instrument(span).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(assigned = n, trigger = why, "routing pass"),
            Err(e) => tracing::warn!(error = %e, trigger = why, "routing pass failed"),
        }
    }

    /// Routes on every trigger until shutdown: agents' presence changes (watched over
    /// gRPC, re-watched after failures), local wake-ups, and the safety pass.
    pub async fn dispatch(self: Arc<Self>, recheck: Duration, shutdown: CancellationToken) {
        let mut retry = Duration::from_millis(200);
        let mut pass = tokio::time::interval(recheck);
        pass.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let watch = tokio::select! {
                _ = shutdown.cancelled() => return,
                w = self.presence.watch_agents() => w,
            };
            match watch {
                Ok(mut watch) => loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = self.wake.notified() => self.route_logged("room freed").await,
                        _ = pass.tick() => self.route_logged("safety pass").await,
                        m = watch.message() => match m {
                            Ok(Some(presence_pb::WatchResponse { event: Some(e) })) => {
                                retry = Duration::from_millis(200);
                                let available = match e {
                                    presence_pb::watch_response::Event::Snapshot(_) => true,
                                    presence_pb::watch_response::Event::Change(p) => {
                                        p.state == presence_pb::PresenceState::Available as i32
                                    }
                                };
                                if available {
                                    self.route_logged("agent available").await;
                                }
                            }
                            Ok(Some(_)) => {}
                            Ok(None) | Err(_) => {
                                tracing::warn!("the watch of agents' presence ended; watching again");
                                break;
                            }
                        },
                    }
                },
                Err(e) => tracing::warn!(error = %e, "cannot watch agents' presence; retrying"),
            }
            // Back off before watching again, so a failing presence is not hammered.
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(retry) => {}
            }
            retry = (retry * 2).min(Duration::from_secs(10));
        }
    }
}
