//! The live streams, `Connect` and its server-streaming twin `Subscribe` (one session
//! either way; `Subscribe` feeds it the request's subscriptions as client frames): a
//! session task per open stream for what needs deciding (client frames, subscriptions,
//! gaps, revocations, token expiry, shutdown, keep-alives), and the fan-out's gates for
//! the rest: a live message that is the next of its subscription goes from the feed
//! straight into the transport queue, without waking the session (see `fanout.rs`).
//!
//! Exactly-once, in-order delivery per conversation rests on one [`Cursor`](crate::gapless::Cursor) per
//! subscription, in its gate: the highest seq sent on this stream. A Subscribe joins the
//! live feed **first** with its gate held (deliveries queue up in the session's inbox),
//! then replays history after `since_seq`, then drains the inbox and only then opens the
//! gate to the feed. Anything at or below the cursor is a duplicate and dropped; anything
//! that skips ahead is first filled from history. So there is no gap and no duplicate at
//! the switch from history to live, nor after a pub/sub hiccup.
//!
//! Back-pressure: frames wait in the stream's bounded queues. If the client reads too
//! slowly a queue fills, the feed cuts the stream off, and it ends with
//! RESOURCE_EXHAUSTED; the client resumes from its last seq and loses nothing.

use std::collections::HashMap;
use std::future::Future as _;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{FutureExt as _, Stream, StreamExt as _};
use switchboard_common::token::{Caller, TokenError, Verifier, now_secs};
use switchboard_proto::messaging::v1 as pb;
use switchboard_proto::messaging::v1::connect_request::Frame as In;
use switchboard_proto::messaging::v1::connect_response::Frame as Out;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tonic::Status;

use switchboard_common::limits::{PerUser, StreamSlot};
use switchboard_common::rpc::SpanLink;
use tracing::Instrument;

use crate::domain::Messaging;
use crate::error::Error;
use crate::fanout::{Gate, Hub, Joined, Kind, Outlet, OutletEnds, Routed, Shared};
use crate::gapless::Next;
use crate::message::Draft;
use crate::store::{MessagingStore, conversation_channel, user_channel};
use switchboard_proto::encoded::EncodedConnectResponse;

/// Page size of history replay.
const REPLAY_PAGE: usize = 200;

/// Most Send frames a stream hands to the store in one round trip.
const SEND_BATCH: usize = 64;

/// What every stream of an instance shares.
pub struct Streams<S> {
    /// The rules.
    pub messaging: Arc<Messaging<S>>,
    /// The fan-out.
    pub hub: Arc<Hub<S>>,
    /// Token checks for RefreshToken, and the revocation feed.
    pub verifier: Arc<Verifier>,
    /// Deliveries a stream may have waiting before it is cut off.
    pub queue: usize,
    /// Fires at shutdown: streams end with UNAVAILABLE so clients reconnect elsewhere.
    pub shutdown: CancellationToken,
    /// Open streams per user, capped.
    pub per_user: Arc<PerUser>,
    /// A stream's longest life before jitter (`None`: unlimited).
    pub max_age: Option<Duration>,
    /// How often a stream without client frames (`Subscribe`) sends a Pong (nonce 0), so
    /// that proxies and browsers do not take a quiet stream for a dead one, and a dead
    /// client is noticed by the failed write.
    pub keepalive: Duration,
}

/// The response stream handed to tonic: frames, then (if the stream ended on an error)
/// that status, which takes precedence over frames still queued. tonic's encoder takes
/// every frame that is ready before it yields to the transport, so frames that queue up
/// under load leave in one write, and a lone frame leaves at once.
pub struct Outbound {
    frames: mpsc::Receiver<Shared>,
    end: Option<oneshot::Receiver<Status>>,
}

impl Stream for Outbound {
    type Item = Result<EncodedConnectResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(end) = self.end.as_mut() {
            match Pin::new(end).poll(cx) {
                Poll::Ready(Ok(status)) => {
                    self.end = None;
                    self.frames.close();
                    return Poll::Ready(Some(Err(status)));
                }
                Poll::Ready(Err(_)) => self.end = None,
                Poll::Pending => {}
            }
        }
        match self.frames.poll_recv(cx) {
            // A reference-count bump: the bytes are the ones the feed encoded.
            Poll::Ready(Some(frame)) => {
                Poll::Ready(Some(Ok(EncodedConnectResponse::clone(&frame))))
            }
            Poll::Ready(None) if self.end.is_some() => Poll::Pending,
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Why a stream stops.
enum End {
    /// The client went away; nothing to say.
    Gone,
    /// End with this status.
    Status(Status),
}

struct Subscription {
    gate: Arc<Gate>,
    _joined: Joined,
}

struct Session<S> {
    ctx: Arc<Streams<S>>,
    caller: Caller,
    outlet: Arc<Outlet>,
    overflow: CancellationToken,
    subs: HashMap<String, Subscription>,
    /// The gate of the user's own channel (conversation events).
    user_gate: Arc<Gate>,
    /// Gates this session holds and must open once its inbox is empty.
    held: Vec<Arc<Gate>>,
    /// Subscribed to all conversations: conversations the caller joins later (a new
    /// direct chat, an assigned consultation) are followed too.
    all: bool,
    /// The stream's set-up span, linked from each client frame's own span.
    setup: SpanLink,
}

/// Opens a stream for `caller` reading client frames from `inbound`: the client's own
/// stream for `Connect`, or the subscriptions of a `Subscribe` call (which then ends,
/// like a client that half-closed its side and keeps listening). Every frame, from
/// either, goes through the same session. With `keepalive`, the stream sends a Pong
/// (nonce 0) every [`Streams::keepalive`].
pub fn open<S, I>(
    ctx: Arc<Streams<S>>,
    caller: Caller,
    slot: StreamSlot,
    inbound: I,
    keepalive: bool,
) -> Outbound
where
    S: MessagingStore,
    I: Stream<Item = Result<pb::ConnectRequest, Status>> + Unpin + Send + 'static,
{
    let (outlet, ends) = Outlet::new(&caller.user_id, ctx.queue);
    let OutletEnds {
        frames,
        inbox,
        overflow,
    } = ends;
    let (end_tx, end_rx) = oneshot::channel();
    let setup = SpanLink::to_current();
    switchboard_common::shutdown::spawn(async move {
        // The user's place among their streams, held for the life of this one.
        let _slot = slot;
        let user_gate = outlet.gate(0, true);
        let mut session = Session {
            ctx,
            caller,
            outlet,
            overflow,
            subs: HashMap::new(),
            user_gate,
            held: Vec::new(),
            all: false,
            setup,
        };
        let keepalive = keepalive.then_some(session.ctx.keepalive);
        if let End::Status(status) = session.run(inbound, inbox, keepalive).await {
            let _ = end_tx.send(status);
        }
    });
    Outbound {
        frames,
        end: Some(end_rx),
    }
}

/// A client frame's own short span: a new trace (a stream lives too long to be one),
/// linked to the stream's set-up.
fn frame_span(req: &pb::ConnectRequest) -> tracing::Span {
    let frame = match &req.frame {
        None => "empty",
        Some(In::Ping(_)) => "ping",
        Some(In::Subscribe(_)) => "subscribe",
        Some(In::Unsubscribe(_)) => "unsubscribe",
        Some(In::Send(_)) => "send",
        Some(In::Typing(_)) => "typing",
        Some(In::Read(_)) => "read",
        Some(In::RefreshToken(_)) => "refresh_token",
    };
    tracing::info_span!(
        parent: None,
        "frame",
        otel.name = %format_args!("Connect {frame}"),
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = "switchboard.messaging.v1.MessagingService",
        rpc.method = "Connect",
        switchboard.frame = frame,
    )
}

fn frame_error(e: &Error, conversation_id: &str) -> pb::FrameError {
    let refusal = e.refusal();
    pb::FrameError {
        code: refusal.code() as i32,
        message: refusal.message.clone(),
        retry_after_ms: refusal.retry_after_ms(),
        // Echoed only when it is an id: a crafted one stays out of the answer.
        conversation_id: if switchboard_common::id::is_id(conversation_id) {
            conversation_id.to_owned()
        } else {
            String::new()
        },
        reason: refusal.reason.as_str().to_owned(),
    }
}

/// Whether `user` is a member of `c` after `event`. A large group's event carries no
/// member list (see `EVENT_MEMBER_IDS`); it reaches members and those who just left, so
/// whoever it names as having left is not one and everyone else is.
fn still_member(event: &pb::ConversationEvent, c: &pb::Conversation, user: &str) -> bool {
    if !c.member_ids.is_empty() || c.member_count == 0 {
        return c.member_ids.iter().any(|m| m == user);
    }
    let left = event.kind == pb::ConversationEventKind::MemberLeft as i32;
    !(left && event.user_ids.iter().any(|u| u == user))
}

/// How a stream ends when reading the client's frames failed: the client's own fault gets
/// its precise status; anything else is the transport, which no status can reach.
fn inbound_failed(status: &Status) -> End {
    match switchboard_common::server::client_fault(status) {
        Some(precise) => End::Status(precise),
        None => End::Gone,
    }
}

impl From<Error> for End {
    fn from(e: Error) -> Self {
        End::Status(e.to_status())
    }
}

impl<S: MessagingStore> Session<S> {
    async fn run<I>(
        &mut self,
        mut inbound: I,
        mut rx: mpsc::Receiver<Box<Routed>>,
        keepalive: Option<Duration>,
    ) -> End
    where
        I: Stream<Item = Result<pb::ConnectRequest, Status>> + Unpin,
    {
        let user_gate = self.user_gate.clone();
        // Boxed, here and below: the task lives as long as the stream, and an idle one should
        // hold the futures it waits on, not room for the largest it ever awaited.
        let _user_feed = match Box::pin(self.ctx.hub.join(
            &user_channel(&self.caller.user_id),
            None,
            &user_gate,
        ))
        .await
        {
            Ok(j) => j,
            Err(e) => return End::Status(e.to_status()),
        };
        let mut revoked = self.ctx.verifier.revocations().watch();
        let shutdown = self.ctx.shutdown.clone();
        let overflow = self.overflow.clone();
        let outlet = self.outlet.clone();
        // A client may half-close its side and keep listening (grpcurl does); the stream
        // then lives until the client goes away.
        let mut inbound_open = true;
        // Armed once and reset only when RefreshToken moves the expiry: re-creating the
        // timer every iteration would cost a timer-wheel insert per delivery.
        let deadline = |exp: u64| {
            tokio::time::Instant::now() + Duration::from_secs(exp.saturating_sub(now_secs()))
        };
        let mut armed = self.caller.expires_at;
        let expiry = tokio::time::sleep_until(deadline(armed));
        tokio::pin!(expiry);
        // Streams end at their age so clients spread over instances added since; the
        // jitter keeps those that connected together from all reconnecting together.
        let ages = self.ctx.max_age.is_some();
        let aged = tokio::time::sleep(self.ctx.max_age.map_or(Duration::MAX, jittered));
        tokio::pin!(aged);
        // Only streams that asked for them have a timer: a Connect stream carries none.
        let mut pings = keepalive.map(|every| {
            let mut pings = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            pings.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            pings
        });
        loop {
            if self.caller.expires_at != armed {
                armed = self.caller.expires_at;
                expiry.as_mut().reset(deadline(armed));
            }
            let result = tokio::select! {
                biased;
                _ = shutdown.cancelled() => Err(Error::ShuttingDown.into()),
                _ = overflow.cancelled() => Err(self.overflowed()),
                _ = outlet.sender().closed() => Err(End::Gone),
                _ = &mut expiry => Err(Error::Token(TokenError::Expired).into()),
                _ = &mut aged, if ages => Err(Error::Reconnect(
                    "this stream reached its age limit (MESSAGING_MAX_STREAM_AGE_SECS); reconnect and resume from your last seq".into(),
                ).into()),
                r = revoked.recv() => match r {
                    Ok(sid) if sid == self.caller.session_id => Err(Error::Token(TokenError::Revoked).into()),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_))
                        if self.ctx.verifier.revocations().is_revoked(&self.caller.session_id, now_secs()) =>
                        Err(Error::Token(TokenError::Revoked).into()),
                    _ => Ok(()),
                },
                // Deliveries before client frames: draining the inbox is what keeps a busy
                // sender from being cut off as a slow consumer.
                Some(routed) = rx.recv() => Box::pin(self.deliver(routed)).await,
                frame = inbound.next(), if inbound_open => match frame {
                    // Boxed: client frames are rare next to deliveries, and the idle task
                    // then holds a pointer instead of space for the largest frame handler.
                    Some(Ok(req)) => Box::pin(self.frames(req, &mut inbound, &mut inbound_open)).await,
                    None => {
                        inbound_open = false;
                        Ok(())
                    }
                    Some(Err(status)) => Err(inbound_failed(&status)),
                },
                // Boxed too: inline, this await would make every stream's task 700 bytes
                // bigger (measured), for a frame sent twice a minute.
                _ = async { if let Some(p) = pings.as_mut() { p.tick().await; } }, if pings.is_some() => {
                    Box::pin(self.emit(Out::Pong(pb::Pong { nonce: 0 }))).await
                }
            };
            if let Err(end) = result {
                return end;
            }
            // Gates go back to the feed only once nothing of theirs waits in the inbox.
            self.held.retain(|gate| !gate.open(|| !rx.is_empty()));
        }
    }

    fn overflowed(&self) -> End {
        Error::SlowConsumer(self.ctx.queue).into()
    }

    /// Room for one frame in the transport queue.
    async fn reserve(&self) -> Result<mpsc::Permit<'_, Shared>, End> {
        tokio::select! {
            r = self.outlet.sender().reserve() => r.map_err(|_| End::Gone),
            _ = self.overflow.cancelled() => Err(self.overflowed()),
            _ = self.ctx.shutdown.cancelled() => Err(Error::ShuttingDown.into()),
        }
    }

    async fn emit(&self, frame: Out) -> Result<(), End> {
        self.emit_encoded(Arc::new(EncodedConnectResponse::new(frame)))
            .await
    }

    async fn emit_encoded(&self, frame: Shared) -> Result<(), End> {
        self.reserve().await?.send(frame);
        Ok(())
    }

    async fn refuse(&self, e: &Error, conversation_id: &str) -> Result<(), End> {
        self.emit(Out::Error(frame_error(e, conversation_id))).await
    }

    /// Handles `first` and the frames the client has already queued behind it. Consecutive
    /// Send frames go to the store together (one round trip, in order), so a client that
    /// keeps several sends in flight is not held to one per round trip.
    async fn frames<I>(
        &mut self,
        first: pb::ConnectRequest,
        inbound: &mut I,
        inbound_open: &mut bool,
    ) -> Result<(), End>
    where
        I: Stream<Item = Result<pb::ConnectRequest, Status>> + Unpin,
    {
        let mut next = Some(first);
        while let Some(req) = next.take() {
            let span = frame_span(&req);
            self.setup.attach(&span);
            let Some(In::Send(send)) = req.frame else {
                return self.handle(req).instrument(span).await;
            };
            let mut batch = vec![send];
            let mut failed = None;
            while batch.len() < SEND_BATCH {
                match inbound.next().now_or_never() {
                    Some(Some(Ok(pb::ConnectRequest {
                        frame: Some(In::Send(s)),
                    }))) => batch.push(s),
                    Some(Some(Ok(other))) => {
                        next = Some(other);
                        break;
                    }
                    Some(None) => {
                        *inbound_open = false;
                        break;
                    }
                    Some(Some(Err(status))) => {
                        failed = Some(inbound_failed(&status));
                        break;
                    }
                    None => break,
                }
            }
            self.send_batch(batch).instrument(span).await?;
            if let Some(end) = failed {
                return Err(end);
            }
        }
        Ok(())
    }

    /// Stores `sends` in order and answers each with a SendResult, in the same order.
    async fn send_batch(&mut self, sends: Vec<pb::Send>) -> Result<(), End> {
        let mut answers = Vec::with_capacity(sends.len());
        let mut drafts = Vec::with_capacity(sends.len());
        for s in sends {
            let conversation_id = s.conversation_id.clone();
            let client_msg_id = s.client_msg_id.clone();
            let refused = match Draft::parse(s.conversation_id, s.client_msg_id, s.body, s.metadata)
            {
                Ok(draft) => {
                    drafts.push(draft);
                    None
                }
                Err(e) => Some(e),
            };
            answers.push((client_msg_id, conversation_id, refused));
        }
        let mut stored = self
            .ctx
            .messaging
            .send_batch(&self.caller, drafts)
            .await
            .into_iter();
        for (client_msg_id, conversation_id, refused) in answers {
            let result = match refused {
                Some(e) => Err(e),
                None => stored
                    .next()
                    .unwrap_or_else(|| Err(Error::Internal("a send had no result".into()))),
            };
            let result = match result {
                Ok((message, _)) => pb::send_result::Result::Message(message),
                Err(e) => pb::send_result::Result::Error(frame_error(&e, &conversation_id)),
            };
            self.emit(Out::SendResult(pb::SendResult {
                client_msg_id,
                result: Some(result),
            }))
            .await?;
        }
        Ok(())
    }

    async fn handle(&mut self, req: pb::ConnectRequest) -> Result<(), End> {
        let ctx = self.ctx.clone();
        match req.frame {
            None => {
                let e = Error::invalid(
                    "frame",
                    "empty frame: set one of subscribe, unsubscribe, send, typing, read, refresh_token, ping",
                );
                self.refuse(&e, "").await
            }
            Some(In::Ping(p)) => self.emit(Out::Pong(pb::Pong { nonce: p.nonce })).await,
            Some(In::Subscribe(s)) => {
                if s.all_conversations {
                    let ids = match ctx.messaging.conversation_ids(&self.caller).await {
                        Ok(ids) => ids,
                        Err(e) => return self.refuse(&e, "").await,
                    };
                    self.all = true;
                    for id in ids {
                        let since = match s.positions.get(&id) {
                            Some(p) => *p,
                            None => self.read_position(&id).await,
                        };
                        self.subscribe(&id, since, "").await?;
                    }
                    Ok(())
                } else {
                    self.subscribe(&s.conversation_id, s.since_seq, &s.epoch)
                        .await
                }
            }
            Some(In::Unsubscribe(u)) => {
                self.unsubscribe(&u.conversation_id);
                Ok(())
            }
            Some(In::Send(s)) => self.send_batch(vec![s]).await,
            Some(In::Typing(t)) => {
                match ctx.messaging.typing(&self.caller, &t.conversation_id).await {
                    Ok(()) => Ok(()),
                    Err(e) => self.refuse(&e, &t.conversation_id).await,
                }
            }
            Some(In::Read(r)) => match ctx
                .messaging
                .mark_read(&self.caller, &r.conversation_id, r.seq)
                .await
            {
                Ok(_) => Ok(()),
                Err(e) => self.refuse(&e, &r.conversation_id).await,
            },
            Some(In::RefreshToken(t)) => match ctx.verifier.verify(&t.access_token).await {
                Ok(fresh) if fresh.user_id == self.caller.user_id => {
                    self.caller = fresh;
                    Ok(())
                }
                Ok(_) => {
                    let e = Error::PermissionDenied("refresh_token belongs to another user".into());
                    self.refuse(&e, "").await
                }
                // Keys unavailable is the server's trouble: say so (retry), keep the stream.
                Err(TokenError::KeysUnavailable) => {
                    self.refuse(&Error::Token(TokenError::KeysUnavailable), "")
                        .await
                }
                Err(e) => {
                    let e = Error::invalid("refresh_token", format!("refresh_token refused: {e}"));
                    self.refuse(&e, "").await
                }
            },
        }
    }

    /// The caller's read position in a conversation (0 if unknown or unreadable).
    async fn read_position(&self, conversation_id: &str) -> u64 {
        self.ctx
            .messaging
            .read_position(&self.caller, conversation_id)
            .await
    }

    async fn subscribe(
        &mut self,
        conversation_id: &str,
        since: u64,
        epoch: &str,
    ) -> Result<(), End> {
        let ctx = self.ctx.clone();
        let current_epoch = match ctx
            .messaging
            .check_member(&self.caller, conversation_id)
            .await
        {
            Ok(e) => e,
            Err(e) => return self.refuse(&e, conversation_id).await,
        };
        // Live first, so nothing published from now on can slip between history and live;
        // the gate stays held (live frames wait in the inbox) until the replay is done.
        self.unsubscribe(conversation_id);
        let gate = self.outlet.gate(since, false);
        let joined = match ctx
            .hub
            .join(
                &conversation_channel(conversation_id),
                Some(conversation_id),
                &gate,
            )
            .await
        {
            Ok(j) => j,
            Err(e) => return self.refuse(&e, conversation_id).await,
        };
        let first = match ctx
            .messaging
            .replay(conversation_id, since, REPLAY_PAGE)
            .await
        {
            Ok(page) => page,
            Err(e) => return self.refuse(&e, conversation_id).await,
        };
        let lost = !epoch.is_empty() && epoch != current_epoch;
        let ahead = since > first.last_seq;
        // Any u64 may come from the wire: saturate rather than wrap.
        let trimmed = first.oldest_seq > 0 && since.saturating_add(1) < first.oldest_seq;
        if lost || ahead || trimmed {
            let oldest_seq = first.oldest_seq.max(1);
            return self
                .emit(Out::Resync(pb::Resync {
                    conversation_id: conversation_id.to_owned(),
                    oldest_seq,
                }))
                .await;
        }
        self.emit(Out::Subscribed(pb::Subscribed {
            conversation_id: conversation_id.to_owned(),
            last_seq: first.last_seq,
            epoch: current_epoch.clone(),
        }))
        .await?;
        self.subs.insert(
            conversation_id.to_owned(),
            Subscription {
                gate: gate.clone(),
                _joined: joined,
            },
        );
        let mut page = first.messages;
        loop {
            let full = page.len() >= REPLAY_PAGE;
            metrics::counter!(switchboard_common::metrics::MESSAGES_DELIVERED)
                .increment(page.len() as u64);
            for message in page {
                let seq = message.seq;
                let frame = Arc::new(EncodedConnectResponse::new(Out::Message(message)));
                self.pass(conversation_id, &gate, seq, &frame).await?;
            }
            if !full {
                break;
            }
            let after = gate.passed();
            page = match ctx
                .messaging
                .replay(conversation_id, after, REPLAY_PAGE)
                .await
            {
                Ok(p) => p.messages,
                Err(e) => return self.refuse(&e, conversation_id).await,
            };
        }
        let to = gate.passed();
        let (from_seq, to_seq) = if to > since {
            (since.saturating_add(1), to)
        } else {
            (0, 0)
        };
        self.emit(Out::Recovered(pb::Recovered {
            conversation_id: conversation_id.to_owned(),
            from_seq,
            to_seq,
        }))
        .await?;
        // Opened by the run loop once the inbox holds nothing of it.
        self.held.push(gate);
        Ok(())
    }

    fn unsubscribe(&mut self, conversation_id: &str) {
        if let Some(sub) = self.subs.remove(conversation_id) {
            self.held.retain(|g| !Arc::ptr_eq(g, &sub.gate));
        }
    }

    /// Sends message `seq` (`frame`) of `conversation_id` through `gate` if it is the next
    /// one of its subscription, filling a hole from history first.
    async fn pass(
        &mut self,
        conversation_id: &str,
        gate: &Arc<Gate>,
        seq: u64,
        frame: &Shared,
    ) -> Result<(), End> {
        let permit = self.reserve().await?;
        if !matches!(gate.pass(seq, frame, permit), Next::Missing { .. }) {
            return Ok(());
        }
        self.fill(conversation_id, gate, seq).await?;
        let permit = self.reserve().await?;
        match gate.pass(seq, frame, permit) {
            // History no longer has them (trimmed) or is unreachable: say so rather than skip.
            Next::Missing { .. } => Err(Error::Reconnect(
                "could not recover missing messages; reconnect and resume from your last seq"
                    .into(),
            )
            .into()),
            Next::Pass | Next::Duplicate => Ok(()),
        }
    }

    /// Sends the messages from history that `gate` has not passed and that come before
    /// `before`, as far as history has them.
    async fn fill(
        &mut self,
        conversation_id: &str,
        gate: &Arc<Gate>,
        before: u64,
    ) -> Result<(), End> {
        loop {
            let after = gate.passed();
            if after.saturating_add(1) >= before {
                return Ok(());
            }
            let page = self
                .ctx
                .messaging
                .replay(conversation_id, after, REPLAY_PAGE)
                .await
                .map_err(End::from)?
                .messages;
            let full = page.len() >= REPLAY_PAGE;
            for m in page.into_iter().take_while(|m| m.seq < before) {
                let seq = m.seq;
                let frame = Arc::new(EncodedConnectResponse::new(Out::Message(m)));
                let permit = self.reserve().await?;
                if let Next::Missing { .. } = gate.pass(seq, &frame, permit) {
                    // History itself has a hole (trimmed): the caller says so.
                    return Ok(());
                }
            }
            if !full || gate.passed() == after {
                return Ok(());
            }
        }
    }

    /// Whether `gate` is one this session still uses.
    fn current(&self, gate: &Arc<Gate>, kind: &Kind) -> bool {
        if Arc::ptr_eq(gate, &self.user_gate) {
            return true;
        }
        match kind {
            Kind::Message {
                conversation_id, ..
            } => self
                .subs
                .get(conversation_id)
                .is_some_and(|s| Arc::ptr_eq(&s.gate, gate)),
            _ => self.subs.values().any(|s| Arc::ptr_eq(&s.gate, gate)),
        }
    }

    async fn deliver(&mut self, routed: Box<Routed>) -> Result<(), End> {
        let Routed { gate, live, shown } = *routed;
        if !self.current(&gate, &live.kind) {
            return Ok(());
        }
        if gate.held() && !self.held.iter().any(|g| Arc::ptr_eq(g, &gate)) {
            self.held.push(gate.clone());
        }
        match &live.kind {
            Kind::Message {
                conversation_id,
                seq,
            } => self.pass(conversation_id, &gate, *seq, &live.frame).await,
            Kind::Receipt | Kind::Typing { .. } => {
                if shown {
                    Ok(())
                } else {
                    self.emit_encoded(live.frame.clone()).await
                }
            }
            Kind::Event(event) => {
                let mut follow = None;
                if let Some(c) = &event.conversation {
                    if !still_member(event, c, &self.caller.user_id) {
                        // Left, removed, or a consultation transferred away.
                        self.unsubscribe(&c.id);
                    } else if self.all && !self.subs.contains_key(&c.id) {
                        follow = Some(c.id.clone());
                    }
                }
                if !shown {
                    self.emit_encoded(live.frame.clone()).await?;
                }
                match follow {
                    Some(id) => {
                        let since = self.read_position(&id).await;
                        self.subscribe(&id, since, "").await
                    }
                    None => Ok(()),
                }
            }
        }
    }
}

/// `age` ± 10 %, at random.
fn jittered(age: Duration) -> Duration {
    use rand_core::RngCore;
    // A fraction in [0.9, 1.1).
    let unit = (rand_core::OsRng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    age.mul_f64(0.9 + 0.2 * unit)
}
