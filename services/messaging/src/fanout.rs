//! In-process fan-out: from the instance's one pub/sub connection to every local stream,
//! waking as little as possible on the way.
//!
//! A `Feed` exists per channel while at least one local stream needs it. It holds the
//! channel's only bus subscription on this instance and a task that decodes each payload
//! **once**, encodes the frame streams will send **once** ([`Live`]), and offers it to the
//! [`Gate`] of every stream that joined. In the common case (the next seq of a
//! subscription that is up to date) the gate puts a reference-counted copy of the encoded
//! frame straight into the stream's transport queue: no other task of the stream wakes but
//! the one writing to the connection. Only what needs a decision goes to the stream's
//! session task instead, through its inbox: messages that skip ahead, everything that
//! arrives while a subscription replays history, and conversation events (the session
//! follows or drops subscriptions on them).
//!
//! Both queues are **bounded** and filled with `try_send`: a stream whose queue is full is
//! cut off (its `overflow` token fires; the stream ends with RESOURCE_EXHAUSTED and the
//! client resumes from its last seq) so nobody else waits.
//!
//! Pub/sub is at-most-once. The feed of a conversation keeps a [`Cursor`]; when a message
//! skips ahead, or the bus reports a [`BusEvent::Gap`] (reconnect), it reads the missing
//! messages from history before going on. Each gate keeps its own cursor too, which covers
//! the window before a feed has seen its first message and a subscription's switch from
//! history to live.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use switchboard_common::bus::{Bus, BusEvent};
use switchboard_proto::encoded::EncodedConnectResponse;
use switchboard_proto::messaging::v1 as pb;
use switchboard_proto::messaging::v1::connect_response::Frame as Out;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use switchboard_common::metrics as m;

use crate::error::{Error, Result};
use crate::gapless::{Cursor, Next};
use crate::message::{Frame, decode};
use crate::store::{MessagingStore, Range};

/// Page size when a feed fills a gap from history.
const FILL_PAGE: usize = 200;

/// An encoded frame as queues hold it: one pointer, so a stream's queue costs 8 bytes a
/// slot (tokio allocates a queue's first 32 slots up front, idle or not).
pub type Shared = Arc<EncodedConnectResponse>;

/// One payload as this instance hands it on: decoded once, its frame encoded once.
#[derive(Debug)]
pub struct Live {
    /// What it is, with what the gates and sessions decide on.
    pub kind: Kind,
    /// The frame every stream sends, encoded.
    pub frame: Shared,
}

/// The kinds of [`Live`] payload.
#[derive(Debug)]
pub enum Kind {
    /// A stored message.
    Message {
        /// Its conversation.
        conversation_id: String,
        /// Its seq.
        seq: u64,
    },
    /// A read receipt.
    Receipt,
    /// A typing notice from `user_id` (not shown to that user's own streams).
    Typing {
        /// Who is typing.
        user_id: String,
    },
    /// A conversation event (creation, membership, desk); the session acts on it.
    Event(Box<pb::ConversationEvent>),
}

impl Live {
    /// A stored message (seq set).
    pub fn message(message: pb::Message) -> Self {
        let kind = Kind::Message {
            conversation_id: message.conversation_id.clone(),
            seq: message.seq,
        };
        Self {
            kind,
            frame: Arc::new(EncodedConnectResponse::new(Out::Message(message))),
        }
    }

    /// An ephemeral frame (receipt, typing, event); `None` for any other frame.
    pub fn ephemeral(frame: Out) -> Option<Self> {
        let kind = match &frame {
            Out::Receipt(_) => Kind::Receipt,
            Out::Typing(t) => Kind::Typing {
                user_id: t.user_id.clone(),
            },
            Out::ConversationEvent(e) => Kind::Event(Box::new(e.clone())),
            _ => return None,
        };
        Some(Self {
            kind,
            frame: Arc::new(EncodedConnectResponse::new(frame)),
        })
    }
}

/// What a session receives from a gate.
pub struct Routed {
    /// The gate it came through, so the session can tell a current subscription's
    /// deliveries from a replaced one's.
    pub gate: Arc<Gate>,
    /// The payload.
    pub live: Arc<Live>,
    /// Already in the transport queue (a conversation event the session only acts on).
    pub shown: bool,
}

/// A stream's side of the fan-out: its transport queue, its session's inbox and its
/// cut-off signal. Shared by the stream's session and every gate it has.
pub struct Outlet {
    user_id: String,
    out: mpsc::Sender<Shared>,
    /// Boxed for the same reason; only the slow path goes through it.
    inbox: mpsc::Sender<Box<Routed>>,
    overflow: CancellationToken,
}

/// What [`Outlet::new`] gives the stream's session and transport.
pub struct OutletEnds {
    /// Frames for the transport, in order.
    pub frames: mpsc::Receiver<Shared>,
    /// The session's slow path.
    pub inbox: mpsc::Receiver<Box<Routed>>,
    /// Fires when a queue overflowed.
    pub overflow: CancellationToken,
}

impl Outlet {
    /// The outlet of a stream of `user_id`, each queue holding `capacity` frames.
    pub fn new(user_id: &str, capacity: usize) -> (Arc<Self>, OutletEnds) {
        let (out, frames) = mpsc::channel(capacity.max(1));
        let (inbox_tx, inbox) = mpsc::channel(capacity.max(1));
        let overflow = CancellationToken::new();
        let outlet = Arc::new(Self {
            user_id: user_id.to_owned(),
            out,
            inbox: inbox_tx,
            overflow: overflow.clone(),
        });
        (
            outlet,
            OutletEnds {
                frames,
                inbox,
                overflow,
            },
        )
    }

    /// The transport queue, for the session's own frames.
    pub fn sender(&self) -> &mpsc::Sender<Shared> {
        &self.out
    }

    /// A gate of this stream for one channel; `live` gates pass frames on from the start
    /// (a user's channel), others wait for [`Gate::open`] (a subscription replaying).
    pub fn gate(self: &Arc<Self>, passed: u64, live: bool) -> Arc<Gate> {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Arc::new(Gate {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            outlet: self.clone(),
            state: Mutex::new(GateState {
                cursor: Cursor::at(passed),
                mode: if live { Mode::Live } else { Mode::Held },
            }),
        })
    }

    fn cut_off(&self, channel: &str) {
        if !self.overflow.is_cancelled() {
            tracing::info!(%channel, "slow consumer cut off");
            metrics::counter!(m::SLOW_CONSUMER_DISCONNECTS).increment(1);
        }
        self.overflow.cancel();
    }
}

/// Who passes a gate's frames on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The feed, straight into the transport queue.
    Live,
    /// The session: everything goes to its inbox, in order, until it has caught up.
    Held,
}

struct GateState {
    cursor: Cursor,
    mode: Mode,
}

/// One stream's place on one channel: the gap-free rule and who applies it.
///
/// The feed and the session both pass frames through it, always under its lock and only
/// in seq order, so whichever does cannot reorder or repeat what the other did.
pub struct Gate {
    id: u64,
    outlet: Arc<Outlet>,
    state: Mutex<GateState>,
}

impl Gate {
    /// The highest seq sent through this gate.
    pub fn passed(&self) -> u64 {
        lock(&self.state).cursor.passed()
    }

    /// The feed's side: sends `live` on, or routes it to the session. `false` when the
    /// stream is gone or cut off (leave it out from now on).
    fn offer(self: &Arc<Self>, channel: &str, live: &Arc<Live>) -> bool {
        let outlet = &self.outlet;
        if let Kind::Typing { user_id } = &live.kind
            && *user_id == outlet.user_id
        {
            return true;
        }
        let mut state = lock(&self.state);
        let direct = match (&live.kind, state.mode) {
            (_, Mode::Held) => false,
            (Kind::Message { seq, .. }, Mode::Live) => match state.cursor.check(*seq) {
                Next::Pass => true,
                Next::Duplicate => return true,
                Next::Missing { .. } => {
                    state.mode = Mode::Held;
                    false
                }
            },
            (_, Mode::Live) => true,
        };
        if direct {
            match outlet.out.try_send(live.frame.clone()) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    outlet.cut_off(channel);
                    return false;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return false,
            }
            match &live.kind {
                Kind::Message { seq, .. } => {
                    state.cursor.advance(*seq);
                    return true;
                }
                Kind::Event(_) => {}
                Kind::Receipt | Kind::Typing { .. } => return true,
            }
        }
        let routed = Box::new(Routed {
            gate: self.clone(),
            live: live.clone(),
            shown: direct,
        });
        match outlet.inbox.try_send(routed) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                outlet.cut_off(channel);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// The session's side: sends message `seq` (`frame`) with `permit` if the cursor says
    /// [`Next::Pass`]; what the cursor said either way.
    pub fn pass(&self, seq: u64, frame: &Shared, permit: mpsc::Permit<'_, Shared>) -> Next {
        let mut state = lock(&self.state);
        let next = state.cursor.check(seq);
        if next == Next::Pass {
            permit.send(frame.clone());
            state.cursor.advance(seq);
        }
        next
    }

    /// Hands the gate back to the feed if the session has nothing of it left to pass:
    /// `pending` says whether the session's inbox still holds anything. Checked under the
    /// gate's lock, which the feed holds while it routes, so nothing can be in flight.
    pub fn open(&self, pending: impl Fn() -> bool) -> bool {
        let mut state = lock(&self.state);
        if state.mode == Mode::Live {
            return true;
        }
        if pending() {
            return false;
        }
        state.mode = Mode::Live;
        true
    }

    /// Whether the session holds this gate (it must [`open`](Self::open) it once caught up).
    pub fn held(&self) -> bool {
        lock(&self.state).mode == Mode::Held
    }
}

struct Feed {
    channel: String,
    gates: Mutex<HashMap<u64, Arc<Gate>>>,
    /// The feed's task; dropping the feed (last stream left) stops it and its subscription.
    _task: tokio_util::task::AbortOnDropHandle<()>,
}

impl Feed {
    fn dispatch(&self, live: &Arc<Live>) -> usize {
        let mut gates = lock(&self.gates);
        gates.retain(|_, gate| gate.offer(&self.channel, live));
        gates.len()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section is a map insert/remove/retain; a poisoned lock still holds
    // consistent data.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// All feeds of this instance.
pub struct Hub<S> {
    bus: Arc<dyn Bus>,
    store: Arc<S>,
    feeds: Mutex<Feeds>,
}

/// The feeds by channel, as weak references: a feed lives while a stream is joined to it.
/// Entries of feeds that are gone are swept once the map has doubled since the last
/// sweep, so it never holds more than about twice the live ones, at constant amortised
/// work per new feed. (Sweeping on every insert made opening n channels cost n²: 21 % of
/// an instance's CPU while 10,000 streams connected.)
struct Feeds {
    by_channel: HashMap<String, Weak<Feed>>,
    sweep_at: usize,
    /// Sweeps so far.
    sweeps: u64,
}

/// The smallest map that is swept.
const SWEEP_FROM: usize = 64;

impl Feeds {
    fn new() -> Self {
        Self {
            by_channel: HashMap::new(),
            sweep_at: SWEEP_FROM,
            sweeps: 0,
        }
    }

    /// The live feed of `channel`, if there is one.
    fn live(&self, channel: &str) -> Option<Arc<Feed>> {
        self.by_channel.get(channel).and_then(Weak::upgrade)
    }

    fn insert(&mut self, channel: &str, feed: Weak<Feed>) {
        if self.by_channel.len() >= self.sweep_at {
            self.by_channel.retain(|_, f| f.strong_count() > 0);
            self.sweep_at = (self.by_channel.len() * 2).max(SWEEP_FROM);
            self.sweeps += 1;
        }
        self.by_channel.insert(channel.to_owned(), feed);
    }
}

/// A stream's place in a feed; leaving (drop) removes its gate, and the last one out
/// closes the feed.
pub struct Joined {
    feed: Arc<Feed>,
    gate: u64,
}

impl Drop for Joined {
    fn drop(&mut self) {
        lock(&self.feed.gates).remove(&self.gate);
    }
}

impl<S: MessagingStore> Hub<S> {
    /// A hub over `bus`, filling gaps from `store`.
    pub fn new(bus: Arc<dyn Bus>, store: Arc<S>) -> Arc<Self> {
        Arc::new(Self {
            bus,
            store,
            feeds: Mutex::new(Feeds::new()),
        })
    }

    /// Joins `gate` to `channel`; everything published there after this returns reaches
    /// it. `conversation` names the conversation whose seqs the feed keeps contiguous.
    pub async fn join(
        self: &Arc<Self>,
        channel: &str,
        conversation: Option<&str>,
        gate: &Arc<Gate>,
    ) -> Result<Joined> {
        let existing = lock(&self.feeds).live(channel);
        let feed = match existing {
            Some(feed) => feed,
            None => self.open(channel, conversation).await?,
        };
        lock(&feed.gates).insert(gate.id, gate.clone());
        Ok(Joined {
            feed,
            gate: gate.id,
        })
    }

    async fn open(
        self: &Arc<Self>,
        channel: &str,
        conversation: Option<&str>,
    ) -> Result<Arc<Feed>> {
        let subscription = self
            .bus
            .subscribe(channel)
            .await
            .map_err(|e| Error::storage(format!("subscribe {channel}: {e}")))?;
        // Another stream may have opened the feed while we subscribed; use one feed.
        let mut feeds = lock(&self.feeds);
        if let Some(feed) = feeds.live(channel) {
            return Ok(feed);
        }
        let feed = Arc::new_cyclic(|weak: &Weak<Feed>| {
            let task = switchboard_common::shutdown::spawn(run_feed(
                weak.clone(),
                subscription,
                self.store.clone(),
                conversation.map(str::to_owned),
            ));
            Feed {
                channel: channel.to_owned(),
                gates: Mutex::new(HashMap::new()),
                _task: tokio_util::task::AbortOnDropHandle::new(task),
            }
        });
        feeds.insert(channel, Arc::downgrade(&feed));
        Ok(feed)
    }
}

/// A payload, decoded and its frame encoded, with what the feed needs besides.
struct Incoming {
    live: Live,
    /// The seq of a message (0 for ephemeral frames).
    seq: u64,
    trace: HashMap<String, String>,
    sent_at: Option<switchboard_proto::prost_types::Timestamp>,
}

/// Decodes a payload; `None` for what no stream shows (logged when undecodable).
fn incoming(channel: &str, payload: &[u8]) -> Option<Incoming> {
    match decode(payload) {
        Some(Frame::Message(seq, envelope)) => {
            let mut message = envelope.message?;
            message.seq = seq;
            let sent_at = message.sent_at;
            Some(Incoming {
                live: Live::message(message),
                seq,
                trace: envelope.trace,
                sent_at,
            })
        }
        Some(Frame::Event(envelope)) => {
            let frame = if let Some(r) = envelope.receipt {
                Out::Receipt(r)
            } else if let Some(t) = envelope.typing {
                Out::Typing(t)
            } else {
                Out::ConversationEvent(envelope.event?)
            };
            Some(Incoming {
                live: Live::ephemeral(frame)?,
                seq: 0,
                trace: envelope.trace,
                sent_at: None,
            })
        }
        None => {
            tracing::warn!(%channel, "ignoring an undecodable payload");
            None
        }
    }
}

async fn run_feed<S: MessagingStore>(
    feed: Weak<Feed>,
    mut subscription: switchboard_common::bus::Subscription,
    store: Arc<S>,
    conversation: Option<String>,
) {
    // One task per channel per instance, mostly idle: payloads are decoded outside this
    // future and filling from history is boxed, so an idle feed holds little more than
    // its subscription.
    // Unknown until the first message: a feed starts wherever the conversation is.
    let mut cursor: Option<Cursor> = None;
    while let Some(event) = subscription.recv().await {
        let Some(feed) = feed.upgrade() else { return };
        let payload = match event {
            BusEvent::Message(payload) => payload,
            BusEvent::Gap => {
                if let (Some(c), Some(name)) = (cursor, &conversation) {
                    tracing::info!(channel = %feed.channel, after = c.passed(), "filling a pub/sub gap from history");
                    if let Some(filled) =
                        Box::pin(fill(&feed, &*store, name, c.passed(), None)).await
                    {
                        cursor = Some(Cursor::at(filled));
                    }
                }
                continue;
            }
        };
        let Some(incoming) = incoming(&feed.channel, &payload) else {
            continue;
        };
        let seq = incoming.seq;
        if let Kind::Message { .. } = incoming.live.kind {
            match cursor.map(|c| c.check(seq)) {
                Some(Next::Duplicate) => continue,
                Some(Next::Missing { after }) => {
                    if let Some(c) = &conversation
                        && let Some(filled) =
                            Box::pin(fill(&feed, &*store, c, after, Some(seq - 1))).await
                    {
                        cursor = Some(Cursor::at(filled));
                    }
                    // History may have caught up past it while filling.
                    if cursor.is_some_and(|c| c.check(seq) == Next::Duplicate) {
                        continue;
                    }
                }
                Some(Next::Pass) | None => {}
            }
            cursor.get_or_insert_default().advance(seq);
        }
        let span = deliver_span(&incoming.trace, conversation.as_deref(), seq);
        let streams = span.in_scope(|| feed.dispatch(&Arc::new(incoming.live)));
        span.record("switchboard.local_subscribers", streams);
        if seq > 0 {
            delivered(streams, incoming.sent_at);
        }
    }
}

/// The span of one payload's hand-over to this instance's streams, a child of the span
/// that published it (its context crossed Redis in the envelope).
fn deliver_span(
    trace: &std::collections::HashMap<String, String>,
    conversation: Option<&str>,
    seq: u64,
) -> tracing::Span {
    let span = tracing::info_span!(
        "deliver",
        otel.kind = "consumer",
        messaging.system = "redis",
        messaging.operation.type = "process",
        switchboard.conversation_id = conversation.unwrap_or_default(),
        switchboard.seq = seq,
        switchboard.local_subscribers = tracing::field::Empty,
    );
    switchboard_common::rpc::continue_from(&span, trace);
    span
}

/// Counts a live message handed to `streams` local streams, and its latency since sending.
fn delivered(streams: usize, sent_at: Option<switchboard_proto::prost_types::Timestamp>) {
    metrics::counter!(m::MESSAGES_DELIVERED).increment(streams as u64);
    if let Some(t) = sent_at {
        let sent = std::time::UNIX_EPOCH
            + std::time::Duration::new(t.seconds.max(0) as u64, t.nanos.max(0) as u32);
        if let Ok(age) = std::time::SystemTime::now().duration_since(sent) {
            metrics::histogram!(m::DELIVERY_LATENCY).record(age.as_secs_f64());
        }
    }
}

/// Dispatches history after `after` (up to `upto`, or everything) in pages; returns the
/// last seq dispatched, `None` if nothing could be read.
async fn fill<S: MessagingStore>(
    feed: &Feed,
    store: &S,
    conversation: &str,
    after: u64,
    upto: Option<u64>,
) -> Option<u64> {
    let mut last = after;
    loop {
        let page = match store
            .history(conversation, Range::After(last), FILL_PAGE)
            .await
        {
            Ok(page) => page,
            Err(e) => {
                // Streams notice the hole themselves and retry from history.
                tracing::warn!(error = %e, conversation, "cannot fill a gap from history");
                return (last > after).then_some(last);
            }
        };
        let count = page.messages.len();
        for message in page.messages {
            if upto.is_some_and(|u| message.seq > u) {
                return Some(last);
            }
            last = message.seq;
            feed.dispatch(&Arc::new(Live::message(message)));
        }
        if count < FILL_PAGE {
            return Some(last);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(seq: u64) -> Arc<Live> {
        Arc::new(Live::message(pb::Message {
            conversation_id: "c".into(),
            seq,
            ..Default::default()
        }))
    }

    fn typing(user: &str) -> Arc<Live> {
        Arc::new(
            Live::ephemeral(Out::Typing(pb::TypingEvent {
                conversation_id: "c".into(),
                user_id: user.into(),
            }))
            .expect("ephemeral"),
        )
    }

    /// The seqs (0 for other frames) in the transport queue, in order.
    fn sent(ends: &mut OutletEnds) -> Vec<u64> {
        let mut out = Vec::new();
        while let Ok(frame) = ends.frames.try_recv() {
            out.push(match frame.decode_response().map(|r| r.frame) {
                Ok(Some(Out::Message(m))) => m.seq,
                _ => 0,
            });
        }
        out
    }

    /// The seqs routed to the session, in order.
    fn routed(ends: &mut OutletEnds) -> Vec<(u64, bool)> {
        let mut out = Vec::new();
        while let Ok(r) = ends.inbox.try_recv() {
            let seq = match r.live.kind {
                Kind::Message { seq, .. } => seq,
                _ => 0,
            };
            out.push((seq, r.shown));
        }
        out
    }

    fn feed(channel: &str) -> Arc<Feed> {
        Arc::new(Feed {
            channel: channel.into(),
            gates: Mutex::new(HashMap::new()),
            _task: tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async {})),
        })
    }

    #[tokio::test]
    async fn feeds_that_are_gone_are_swept_and_the_map_stays_near_the_live_ones() {
        let kept = feed("kept");
        let mut feeds = Feeds::new();
        feeds.insert("kept", Arc::downgrade(&kept));
        for i in 0..10_000 {
            // Gone at once: its stream left.
            feeds.insert(&format!("c{i}"), Arc::downgrade(&feed("c")));
            assert!(
                feeds.by_channel.len() <= SWEEP_FROM + 1,
                "{} entries for one live feed",
                feeds.by_channel.len()
            );
        }
        assert!(feeds.live("kept").is_some(), "a live feed is never swept");
        assert!(feeds.live("c9999").is_none());
        // One sweep per ~SWEEP_FROM new feeds, not one per feed.
        assert!(
            feeds.sweeps <= 10_000 / (SWEEP_FROM as u64 - 2),
            "{} sweeps",
            feeds.sweeps
        );

        // With many live feeds, sweeps come further apart.
        let live: Vec<_> = (0..1_000).map(|i| feed(&format!("l{i}"))).collect();
        let mut feeds = Feeds::new();
        for (i, f) in live.iter().enumerate() {
            feeds.insert(&format!("l{i}"), Arc::downgrade(f));
        }
        let before = feeds.sweeps;
        for i in 0..1_000 {
            feeds.insert(&format!("d{i}"), Arc::downgrade(&feed("d")));
        }
        assert!(
            feeds.sweeps - before <= 1,
            "{} sweeps",
            feeds.sweeps - before
        );
        assert!(feeds.by_channel.len() <= 2 * 1_000 + 1);
    }

    #[test]
    fn a_live_gate_sends_the_next_seq_itself_and_holds_at_a_gap() {
        let (outlet, mut ends) = Outlet::new("me", 16);
        let gate = outlet.gate(3, true);
        assert!(gate.offer("c", &message(4)));
        assert!(
            gate.offer("c", &message(4)),
            "a repeat is dropped, not an error"
        );
        assert!(gate.offer("c", &message(2)));
        assert_eq!(sent(&mut ends), vec![4]);
        assert!(routed(&mut ends).is_empty());
        // 5 is missing: 6 and everything after it go to the session, in order.
        assert!(gate.offer("c", &message(6)));
        assert!(gate.held());
        assert!(gate.offer("c", &message(7)));
        assert!(gate.offer("c", &typing("other")));
        assert!(sent(&mut ends).is_empty());
        assert_eq!(routed(&mut ends), vec![(6, false), (7, false), (0, false)]);
        // The session passes 5 (from history), then 6 and 7.
        for seq in [5, 6, 7] {
            let permit = outlet.sender().try_reserve().expect("room");
            assert_eq!(
                gate.pass(seq, &message(seq).frame, permit),
                Next::Pass,
                "seq {seq}"
            );
        }
        let permit = outlet.sender().try_reserve().expect("room");
        assert_eq!(
            gate.pass(9, &message(9).frame, permit),
            Next::Missing { after: 7 }
        );
        assert_eq!(sent(&mut ends), vec![5, 6, 7]);
        // Opened only once nothing of it waits; then the feed sends again.
        assert!(!gate.open(|| true));
        assert!(gate.open(|| false));
        assert!(gate.offer("c", &message(8)));
        assert_eq!(sent(&mut ends), vec![8]);
    }

    #[test]
    fn a_held_gate_routes_everything_until_opened() {
        let (outlet, mut ends) = Outlet::new("me", 16);
        let gate = outlet.gate(0, false);
        assert!(gate.offer("c", &message(1)));
        assert!(sent(&mut ends).is_empty());
        assert_eq!(routed(&mut ends), vec![(1, false)]);
        let permit = outlet.sender().try_reserve().expect("room");
        assert_eq!(gate.pass(1, &message(1).frame, permit), Next::Pass);
        let permit = outlet.sender().try_reserve().expect("room");
        assert_eq!(gate.pass(1, &message(1).frame, permit), Next::Duplicate);
        assert!(gate.open(|| false));
        assert!(gate.offer("c", &message(2)));
        assert_eq!(sent(&mut ends), vec![1, 2]);
        assert_eq!(gate.passed(), 2);
    }

    #[test]
    fn own_typing_is_not_shown_and_events_reach_the_session_too() {
        let (outlet, mut ends) = Outlet::new("me", 16);
        let gate = outlet.gate(0, true);
        assert!(gate.offer("u", &typing("me")));
        assert!(gate.offer("u", &typing("other")));
        let event = Arc::new(
            Live::ephemeral(Out::ConversationEvent(pb::ConversationEvent::default()))
                .expect("ephemeral"),
        );
        assert!(gate.offer("u", &event));
        assert_eq!(
            sent(&mut ends),
            vec![0, 0],
            "other's typing, then the event"
        );
        assert_eq!(
            routed(&mut ends),
            vec![(0, true)],
            "the event, already shown"
        );
    }

    #[test]
    fn a_full_queue_cuts_the_stream_off() {
        let (outlet, mut ends) = Outlet::new("me", 2);
        let gate = outlet.gate(0, true);
        assert!(gate.offer("c", &message(1)));
        assert!(gate.offer("c", &message(2)));
        assert!(!ends.overflow.is_cancelled());
        assert!(!gate.offer("c", &message(3)), "the feed drops the gate");
        assert!(ends.overflow.is_cancelled());
        assert_eq!(gate.passed(), 2, "3 was not counted as sent");
        assert_eq!(sent(&mut ends), vec![1, 2]);
        // Gone: the feed drops it too.
        drop(ends);
        assert!(!gate.offer("c", &message(3)));
    }
}
