//! The gRPC adapter and the streams: a device session (`Connect`, or its server-streaming
//! twin `Session` steered by `SetSessionState` and `EndSession` over the bus; one loop
//! runs both, and their lifecycle rules are [`crate::session`]'s) and `Watch`
//! ([`crate::watch`]'s).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use switchboard_common::bus::Bus;
use switchboard_common::limits::{PerUser, StreamSlot};
use switchboard_common::revocation::RevocationList;
use switchboard_common::server::{ClientCancel, ServiceCall, client_fault};
use switchboard_common::shutdown::CancellationToken;
use switchboard_common::token::{Caller, TokenError, now_secs};
use switchboard_proto::presence::v1 as pb;
use switchboard_proto::presence::v1::presence_service_server::PresenceService;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::error::{Error, Result};
use crate::model::State;
use crate::session::{DeviceSession, Ending};
use crate::store::PresenceStore;
use crate::watch::{Target, Watcher};

/// Most ids per Get or Watch.
pub const MAX_IDS: usize = 500;

/// `switchboard.presence.v1.PresenceService`.
pub struct PresenceGrpc<S> {
    store: Arc<S>,
    bus: Arc<dyn Bus>,
    ttl: Duration,
    grace: Duration,
    shutdown: CancellationToken,
    revocations: Arc<RevocationList>,
    per_user: Arc<PerUser>,
}

/// Why a device stream ended ([`Ending`], which decides the session's fate), and the
/// status the client gets, if any.
enum End {
    /// The client closed its side.
    Closed,
    /// The stream broke (client gone, network, shutdown).
    Broken(Option<Status>),
    /// Refused or revoked.
    Refused(Status),
}

impl End {
    fn split(self) -> (Ending, Option<Status>) {
        match self {
            End::Closed => (Ending::Goodbye, None),
            End::Broken(status) => (Ending::Lost, status),
            End::Refused(status) => (Ending::Refused, Some(status)),
        }
    }
}

impl<S> PresenceGrpc<S> {
    /// Serves presence from `store`, changes from `bus`; device sessions end when their
    /// session is revoked (logout). They outlive the access token they were opened with
    /// (presence's Connect has no RefreshToken frame, and ending them at expiry would make
    /// every device flap offline and online every 15 minutes).
    pub fn new(
        store: Arc<S>,
        bus: Arc<dyn Bus>,
        ttl: Duration,
        grace: Duration,
        shutdown: CancellationToken,
        revocations: Arc<RevocationList>,
        per_user: Arc<PerUser>,
    ) -> Self {
        Self {
            store,
            bus,
            ttl,
            grace,
            shutdown,
            revocations,
            per_user,
        }
    }

    /// A place for one more stream of `user_id` on this instance.
    fn slot(&self, user_id: &str) -> Result<StreamSlot> {
        self.per_user.open(user_id).map_err(Error::TooManyStreams)
    }
}

/// Unix milliseconds now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A user or another Switchboard service (the desk's routing) may read presence.
fn reader<T>(req: &Request<T>) -> std::result::Result<(), Status> {
    if req.extensions().get::<ServiceCall>().is_some() {
        return Ok(());
    }
    caller(req).map(|_| ())
}

fn caller<T>(req: &Request<T>) -> std::result::Result<Caller, Status> {
    if req.extensions().get::<ServiceCall>().is_some() {
        return Err(Error::PermissionDenied(
            "a service cannot open a device session; use a user's access token".into(),
        )
        .into());
    }
    Ok(switchboard_common::server::caller(req)?)
}

/// 1 to [`MAX_IDS`] distinct ids, in the order first given: the count is checked first and
/// the rest is linear, so the work is bounded by the limit.
fn user_ids(ids: Vec<String>) -> Result<Vec<String>> {
    if ids.is_empty() || ids.len() > MAX_IDS {
        return Err(Error::invalid(
            "user_ids",
            format!("user_ids must hold 1 to {MAX_IDS} ids, got {}", ids.len()),
        ));
    }
    switchboard_common::id::check_all("user_ids", &ids)?;
    Ok(switchboard_common::id::distinct(
        ids.iter().map(String::as_str),
    ))
}

/// A role's wire value, if it names one.
fn valid_role(role: i32) -> Result<i32> {
    match switchboard_common::token::Role::from_proto(role) {
        Some(_) => Ok(role),
        None => Err(Error::invalid(
            "role",
            format!("role must be CUSTOMER, AGENT or ADMIN, got {role}"),
        )),
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = std::result::Result<T, Status>> + Send>>;

/// What a Session stream is told over the bus by SetSessionState and EndSession: a tag
/// byte, then for a state change the `SetState` it applies (already validated).
enum Command {
    Set(pb::SetState),
    End,
}

impl Command {
    fn encode(&self) -> Vec<u8> {
        match self {
            Command::Set(set) => {
                let mut out = vec![b'S'];
                prost::Message::encode(set, &mut out).unwrap_or_default();
                out
            }
            Command::End => vec![b'E'],
        }
    }

    fn decode(payload: &[u8]) -> Option<Self> {
        match payload.split_first() {
            Some((b'S', set)) => prost::Message::decode(set).ok().map(Command::Set),
            Some((b'E', [])) => Some(Command::End),
            _ => None,
        }
    }
}

impl<S: PresenceStore> PresenceGrpc<S> {
    /// The device stream behind both Connect and Session: registers the session (in
    /// `initial`'s state), then keeps it alive, applies its state changes and ends it by
    /// [`crate::session`]'s rules. It is driven by the client's `frames` (Connect), or
    /// without them by commands on the session's bus channel, with the server sending
    /// keep-alives (Session).
    async fn device<I>(
        &self,
        c: Caller,
        slot: StreamSlot,
        initial: Option<pb::SetState>,
        frames: Option<(I, ClientCancel)>,
    ) -> Result<BoxStream<pb::ConnectResponse>>
    where
        I: Stream<Item = std::result::Result<pb::ConnectRequest, Status>> + Unpin + Send + 'static,
    {
        let (out, rx) = mpsc::channel::<std::result::Result<pb::ConnectResponse, Status>>(8);
        let (store, ttl, grace) = (self.store.clone(), self.ttl, self.grace);
        let shutdown = self.shutdown.clone();
        let revocations = self.revocations.clone();
        let mut revoked = revocations.watch();
        let (mut session, presence) = DeviceSession::open_in(
            store,
            &c.user_id,
            c.role.to_proto(),
            initial,
            ttl,
            grace,
            now_ms(),
        )
        .await?;
        // Listening before the Connected frame names the session, so a SetSessionState
        // right after it is heard.
        let mut commands = None;
        if frames.is_none() {
            let channel = crate::store::session_channel(&c.user_id, session.id());
            match self.bus.subscribe(&channel).await {
                Ok(sub) => commands = Some(sub),
                Err(e) => {
                    let _ = session.end(Ending::Refused, now_ms()).await;
                    return Err(Error::Bus(e.to_string()));
                }
            }
        }
        let held =
            switchboard_common::metrics::Held::new(switchboard_common::metrics::PRESENCE_SESSIONS);
        switchboard_common::shutdown::spawn(async move {
            let (_held, _slot) = (held, slot);
            let frame = |f: pb::connect_response::Frame| Ok(pb::ConnectResponse { frame: Some(f) });
            let connected = pb::Connected {
                session_id: session.id().to_owned(),
                heartbeat_interval_seconds: (session.ttl().as_secs() / 3).max(1) as u32,
                ttl_seconds: session.ttl().as_secs() as u32,
            };
            let _ = out
                .send(frame(pb::connect_response::Frame::Connected(connected)))
                .await;
            let _ = out
                .send(frame(pb::connect_response::Frame::Presence(presence)))
                .await;
            let (mut inbound, cancel) = match frames {
                Some((inbound, cancel)) => (Some(inbound), cancel),
                None => (None, ClientCancel::default()),
            };
            // The server's keep-alive on a Session stream: the client sends nothing, so a
            // write is what finds a dead peer (and keeps proxies from idling it out).
            let keepalive = commands.is_some();
            // While the stream is open this instance keeps the session alive; if it crashes,
            // the session expires after the TTL and any instance's sweep removes it.
            let mut refresh = tokio::time::interval(session.refresh_every());
            refresh.tick().await;
            let end = loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break End::Broken(Some(Error::ShuttingDown.into())),
                    r = revoked.recv() => {
                        let gone = match r {
                            Ok(sid) => sid == c.session_id,
                            Err(_) => revocations.is_revoked(&c.session_id, now_secs()),
                        };
                        if gone {
                            break End::Refused(Error::Token(TokenError::Revoked).into());
                        }
                    }
                    _ = out.closed() => break End::Broken(None),
                    _ = refresh.tick() => {
                        if let Err(e) = session.refresh(now_ms()).await {
                            tracing::warn!(error = %e, "cannot refresh a presence session");
                        }
                        // Dropped when the client is behind: the next one will do.
                        if keepalive {
                            let _ = out.try_send(frame(pb::connect_response::Frame::HeartbeatAck(pb::HeartbeatAck {})));
                        }
                    }
                    cmd = next_command(&mut commands) => match cmd {
                        Some(Command::Set(set)) => match session.set(set, now_ms()).await {
                            Ok(p) => { let _ = out.send(frame(pb::connect_response::Frame::Presence(p))).await; }
                            // SetSessionState validated it; only a stored state can fail.
                            Err(e) => tracing::warn!(error = %e, "cannot apply SetSessionState"),
                        },
                        Some(Command::End) => break End::Closed,
                        None => break End::Broken(Some(Error::ShuttingDown.into())),
                    },
                    msg = next_frame(&mut inbound) => match msg {
                        Some(Ok(pb::ConnectRequest { frame: Some(pb::connect_request::Frame::SetState(set)) })) => {
                            match session.set(set, now_ms()).await {
                                Ok(p) => { let _ = out.send(frame(pb::connect_response::Frame::Presence(p))).await; }
                                Err(e @ Error::InvalidArgument(_)) => break End::Refused(e.into()),
                                Err(e) => break End::Broken(Some(e.into())),
                            }
                        }
                        Some(Ok(pb::ConnectRequest { frame: Some(pb::connect_request::Frame::Heartbeat(_)) })) => {
                            let _ = session.refresh(now_ms()).await;
                            let _ = out.send(frame(pb::connect_response::Frame::HeartbeatAck(pb::HeartbeatAck {}))).await;
                        }
                        Some(Ok(pb::ConnectRequest { frame: None })) => {
                            break End::Refused(Error::invalid("frame", "empty frame: set set_state or heartbeat").into());
                        }
                        // tonic ends the request stream the same way for a half-close and
                        // for a cancel; only the half-close is a goodbye.
                        None if cancel.cancelled() => break End::Broken(None),
                        None => break End::Closed,
                        // The client's own fault (oversize, undecodable, a gzip bomb) is
                        // refused with its precise status; anything else is the transport.
                        Some(Err(status)) => match client_fault(&status) {
                            Some(precise) => break End::Refused(precise),
                            None => break End::Broken(None),
                        },
                    },
                }
            };
            // The session's fate (dropped, or lingering for the grace) is session.rs's rule.
            let (ending, status) = end.split();
            if let Err(e) = session.end(ending, now_ms()).await {
                tracing::warn!(error = %e, "cannot end a presence session; it will expire");
            }
            if let Some(status) = status {
                let _ = out.send(Err(status)).await;
            }
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }

    /// Tells the caller's Session stream `session_id` to apply `command`.
    async fn command(&self, c: &Caller, session_id: &str, command: Command) -> Result<()> {
        switchboard_common::id::check("session_id", session_id)?;
        let reached = self
            .bus
            .publish(
                &crate::store::session_channel(&c.user_id, session_id),
                command.encode(),
            )
            .await
            .map_err(|e| Error::Bus(e.to_string()))?;
        if reached == 0 {
            return Err(Error::NoSuchSession(session_id.to_owned()));
        }
        Ok(())
    }
}

/// The next client frame of a Connect stream; never, for a Session stream.
async fn next_frame<I>(
    inbound: &mut Option<I>,
) -> Option<std::result::Result<pb::ConnectRequest, Status>>
where
    I: Stream<Item = std::result::Result<pb::ConnectRequest, Status>> + Unpin,
{
    match inbound {
        Some(inbound) => futures::StreamExt::next(inbound).await,
        None => std::future::pending().await,
    }
}

/// The next command of a Session stream (`None`: the bus stopped); never, for Connect.
/// Anything undecodable, and a gap (a command lost: its caller got OK, the state is
/// simply not applied), is skipped.
async fn next_command(
    commands: &mut Option<switchboard_common::bus::Subscription>,
) -> Option<Command> {
    let Some(sub) = commands else {
        return std::future::pending().await;
    };
    loop {
        match sub.recv().await? {
            switchboard_common::bus::BusEvent::Message(payload) => {
                if let Some(c) = Command::decode(&payload) {
                    return Some(c);
                }
            }
            switchboard_common::bus::BusEvent::Gap => {}
        }
    }
}

/// A SetState that [`crate::session::apply`] accepts, or why not.
fn valid_set(set: &pb::SetState) -> Result<()> {
    crate::session::apply(&mut crate::model::Session::default(), set.clone())
}

#[tonic::async_trait]
impl<S: PresenceStore> PresenceService for PresenceGrpc<S> {
    type ConnectStream = BoxStream<pb::ConnectResponse>;

    #[tracing::instrument(skip_all)]
    async fn connect(
        &self,
        req: Request<Streaming<pb::ConnectRequest>>,
    ) -> std::result::Result<Response<Self::ConnectStream>, Status> {
        let c = caller(&req)?;
        let slot = self.slot(&c.user_id)?;
        let cancel = req
            .extensions()
            .get::<ClientCancel>()
            .cloned()
            .unwrap_or_default();
        let inbound = req.into_inner();
        let stream = self.device(c, slot, None, Some((inbound, cancel))).await?;
        Ok(Response::new(stream))
    }

    type SessionStream = BoxStream<pb::ConnectResponse>;

    #[tracing::instrument(skip_all)]
    async fn session(
        &self,
        req: Request<pb::SessionRequest>,
    ) -> std::result::Result<Response<Self::SessionStream>, Status> {
        let c = caller(&req)?;
        let mut initial = req.into_inner().state.unwrap_or_default();
        if initial.state == pb::PresenceState::Unspecified as i32 {
            initial.state = pb::PresenceState::Available as i32;
        }
        valid_set(&initial)?;
        let slot = self.slot(&c.user_id)?;
        let stream = self
            .device::<Streaming<pb::ConnectRequest>>(c, slot, Some(initial), None)
            .await?;
        Ok(Response::new(stream))
    }

    #[tracing::instrument(skip_all)]
    async fn set_session_state(
        &self,
        req: Request<pb::SetSessionStateRequest>,
    ) -> std::result::Result<Response<pb::SetSessionStateResponse>, Status> {
        let c = caller(&req)?;
        let r = req.into_inner();
        let set = r
            .state
            .ok_or_else(|| Error::invalid("state", "state is required: the SetState to apply"))?;
        valid_set(&set)?;
        self.command(&c, &r.session_id, Command::Set(set)).await?;
        Ok(Response::new(pb::SetSessionStateResponse {}))
    }

    #[tracing::instrument(skip_all)]
    async fn end_session(
        &self,
        req: Request<pb::EndSessionRequest>,
    ) -> std::result::Result<Response<pb::EndSessionResponse>, Status> {
        let c = caller(&req)?;
        let r = req.into_inner();
        self.command(&c, &r.session_id, Command::End).await?;
        Ok(Response::new(pb::EndSessionResponse {}))
    }

    #[tracing::instrument(skip_all)]
    async fn get(
        &self,
        req: Request<pb::GetRequest>,
    ) -> std::result::Result<Response<pb::GetResponse>, Status> {
        reader(&req)?;
        let ids = user_ids(req.into_inner().user_ids)?;
        let rows = self.store.get(&ids, now_ms()).await.map_err(Error::from)?;
        Ok(Response::new(pb::GetResponse {
            presences: rows.into_iter().map(|(_, p)| p).collect(),
        }))
    }

    type WatchStream = BoxStream<pb::WatchResponse>;

    #[tracing::instrument(skip_all)]
    async fn watch(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> std::result::Result<Response<Self::WatchStream>, Status> {
        reader(&req)?;
        // Users' watches count against their stream limit; the desk's (a service) do not.
        let slot = match req.extensions().get::<Caller>() {
            Some(c) => Some(self.slot(&c.user_id)?),
            None => None,
        };
        let r = req.into_inner();
        let role = match (r.role, r.user_ids.is_empty()) {
            (0, _) => None,
            (role, true) => Some(valid_role(role)?),
            (_, false) => {
                return Err(
                    Error::invalid("role", "give either user_ids or role, not both").into(),
                );
            }
        };
        let target = match role {
            Some(role) => Target::Role(role),
            None => Target::Users(user_ids(r.user_ids)?),
        };
        let (mut watcher, snapshot) =
            Watcher::open(self.store.clone(), self.bus.as_ref(), target, now_ms()).await?;
        let (out, rx) = mpsc::channel::<std::result::Result<pb::WatchResponse, Status>>(64);
        let shutdown = self.shutdown.clone();
        switchboard_common::shutdown::spawn(async move {
            let _slot = slot;
            let first = pb::WatchResponse {
                event: Some(pb::watch_response::Event::Snapshot(pb::Snapshot {
                    presences: snapshot,
                })),
            };
            if out.send(Ok(first)).await.is_err() {
                return;
            }
            loop {
                let changes = tokio::select! {
                    _ = shutdown.cancelled() => {
                        let _ = out.send(Err(Error::ShuttingDown.into())).await;
                        return;
                    }
                    _ = out.closed() => return,
                    c = watcher.next(now_ms()) => match c {
                        Some(c) => c,
                        None => return,
                    },
                };
                for presence in changes {
                    let change = pb::WatchResponse {
                        event: Some(pb::watch_response::Event::Change(presence)),
                    };
                    if out.send(Ok(change)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    #[tracing::instrument(skip_all)]
    async fn list_online(
        &self,
        req: Request<pb::ListOnlineRequest>,
    ) -> std::result::Result<Response<pb::ListOnlineResponse>, Status> {
        reader(&req)?;
        let r = req.into_inner();
        valid_role(r.role)?;
        let filter = match r.state {
            0 => None,
            s => Some(State::from_proto(s).ok_or_else(|| {
                Error::invalid("state", "state must be unset, AVAILABLE, AWAY or BUSY")
            })?),
        };
        let ids = self.store.online(r.role).await.map_err(Error::from)?;
        let rows = self.store.get(&ids, now_ms()).await.map_err(Error::from)?;
        let users = rows
            .into_iter()
            .map(|(_, p)| p)
            .filter(|p| p.session_count > 0 && filter.is_none_or(|f| p.state == f.to_proto()))
            .collect();
        Ok(Response::new(pb::ListOnlineResponse { users }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_common::status::Invalid;

    proptest::proptest! {
        /// Any id list: 1 to MAX_IDS distinct ids in the order given, or INVALID_ARGUMENT
        /// naming the field; never a panic.
        #[test]
        fn id_lists_parse_or_name_the_field(
            ids in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::strategy::Just("0190d6a2-8c5e-7d3a-9f41-6b2e8a1c0d57".to_owned()),
                    ".{0,40}",
                ],
                0..600,
            ),
        ) {
            match user_ids(ids.clone()) {
                Ok(out) => {
                    proptest::prop_assert!(!out.is_empty() && out.len() <= MAX_IDS);
                    let unique: std::collections::HashSet<&String> = out.iter().collect();
                    proptest::prop_assert_eq!(unique.len(), out.len());
                }
                Err(Error::InvalidArgument(Invalid { field, .. })) => {
                    proptest::prop_assert!(field.starts_with("user_ids"), "{field}")
                }
                Err(e) => proptest::prop_assert!(false, "{e:?}"),
            }
        }

    }
}
