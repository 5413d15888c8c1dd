//! In-process fan-out: from the instance's one pub/sub connection to every local stream.
//!
//! A [`Feed`] exists per channel while at least one local stream needs it. It holds the
//! channel's only bus subscription on this instance and a task that decodes each payload
//! once and hands it to every joined stream's **bounded** queue with `try_send`. A stream
//! whose queue is full is cut off (its `overflow` token fires; the stream ends with
//! RESOURCE_EXHAUSTED and the client resumes from its last seq) so nobody else waits.
//!
//! Pub/sub is at-most-once. The feed of a conversation remembers the last seq it passed
//! on; when a message skips ahead, or the bus reports a [`BusEvent::Gap`] (reconnect), it
//! reads the missing messages from history before going on, so streams see every seq in
//! order. Streams still check contiguity themselves (see `stream.rs`), which covers the
//! window before a feed has seen its first message.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use switchboard_common::bus::{Bus, BusEvent};
use switchboard_proto::messaging::v1 as pb;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use switchboard_common::metrics as m;

use crate::error::{Error, Result};
use crate::message::{Frame, decode};
use crate::store::{MessagingStore, Range};

/// Page size when a feed fills a gap from history.
const FILL_PAGE: usize = 200;

/// What a stream receives from a feed.
#[derive(Debug, Clone)]
pub enum Delivery {
    /// A stored message of a conversation (seq set).
    Message(Arc<pb::Message>),
    /// A ready frame: receipt, typing or conversation event.
    Frame(Arc<pb::connect_response::Frame>),
}

/// A stream's side of the fan-out: its queue and its cut-off signal.
#[derive(Clone)]
pub struct Inbox {
    id: u64,
    tx: mpsc::Sender<Delivery>,
    overflow: CancellationToken,
}

impl Inbox {
    /// A new inbox of `capacity` deliveries; the receiver goes to the stream.
    pub fn new(capacity: usize) -> (Self, mpsc::Receiver<Delivery>, CancellationToken) {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let overflow = CancellationToken::new();
        (
            Self {
                id: NEXT.fetch_add(1, Ordering::Relaxed),
                tx,
                overflow: overflow.clone(),
            },
            rx,
            overflow,
        )
    }
}

struct Feed {
    channel: String,
    inboxes: Mutex<HashMap<u64, Inbox>>,
    /// The feed's task; dropping the feed (last stream left) stops it and its subscription.
    _task: tokio_util::task::AbortOnDropHandle<()>,
}

impl Feed {
    fn dispatch(&self, delivery: &Delivery) -> usize {
        let mut inboxes = lock(&self.inboxes);
        inboxes.retain(|_, inbox| match inbox.tx.try_send(delivery.clone()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::info!(channel = %self.channel, "slow consumer cut off");
                metrics::counter!(m::SLOW_CONSUMER_DISCONNECTS).increment(1);
                inbox.overflow.cancel();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        });
        inboxes.len()
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
    feeds: Mutex<HashMap<String, Weak<Feed>>>,
}

/// A stream's place in a feed; leaving (drop) removes it, and the last one out closes the feed.
pub struct Joined {
    feed: Arc<Feed>,
    inbox: u64,
}

impl Drop for Joined {
    fn drop(&mut self) {
        lock(&self.feed.inboxes).remove(&self.inbox);
    }
}

impl<S: MessagingStore> Hub<S> {
    /// A hub over `bus`, filling gaps from `store`.
    pub fn new(bus: Arc<dyn Bus>, store: Arc<S>) -> Arc<Self> {
        Arc::new(Self {
            bus,
            store,
            feeds: Mutex::new(HashMap::new()),
        })
    }

    /// Joins `inbox` to `channel`; everything published there after this returns reaches
    /// it. `conversation` names the conversation whose seqs the feed keeps contiguous.
    pub async fn join(
        self: &Arc<Self>,
        channel: &str,
        conversation: Option<&str>,
        inbox: &Inbox,
    ) -> Result<Joined> {
        let existing = lock(&self.feeds).get(channel).and_then(Weak::upgrade);
        let feed = match existing {
            Some(feed) => feed,
            None => self.open(channel, conversation).await?,
        };
        lock(&feed.inboxes).insert(inbox.id, inbox.clone());
        Ok(Joined {
            feed,
            inbox: inbox.id,
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
        if let Some(feed) = feeds.get(channel).and_then(Weak::upgrade) {
            return Ok(feed);
        }
        let feed = Arc::new_cyclic(|weak: &Weak<Feed>| {
            let task = tokio::spawn(run_feed(
                weak.clone(),
                subscription,
                self.store.clone(),
                conversation.map(str::to_owned),
            ));
            Feed {
                channel: channel.to_owned(),
                inboxes: Mutex::new(HashMap::new()),
                _task: tokio_util::task::AbortOnDropHandle::new(task),
            }
        });
        feeds.retain(|_, f| f.strong_count() > 0);
        feeds.insert(channel.to_owned(), Arc::downgrade(&feed));
        Ok(feed)
    }
}

async fn run_feed<S: MessagingStore>(
    feed: Weak<Feed>,
    mut subscription: switchboard_common::bus::Subscription,
    store: Arc<S>,
    conversation: Option<String>,
) {
    let mut last: Option<u64> = None;
    while let Some(event) = subscription.recv().await {
        let Some(feed) = feed.upgrade() else { return };
        match event {
            BusEvent::Message(payload) => match decode(&payload) {
                Some(Frame::Message(seq, envelope)) => {
                    let Some(mut message) = envelope.message else {
                        continue;
                    };
                    if let Some(l) = last {
                        if seq <= l {
                            continue;
                        }
                        if seq > l + 1
                            && let Some(c) = &conversation
                        {
                            last = fill(&feed, &*store, c, l, Some(seq - 1)).await.or(last);
                        }
                    }
                    message.seq = seq;
                    if last.is_none_or(|l| seq > l) {
                        let span = deliver_span(&envelope.trace, conversation.as_deref(), seq);
                        let sent_at = message.sent_at;
                        let streams =
                            span.in_scope(|| feed.dispatch(&Delivery::Message(Arc::new(message))));
                        span.record("switchboard.local_subscribers", streams);
                        delivered(streams, sent_at);
                        last = Some(seq);
                    }
                }
                Some(Frame::Event(envelope)) => {
                    use pb::connect_response::Frame as F;
                    let frame = if let Some(r) = envelope.receipt {
                        F::Receipt(r)
                    } else if let Some(t) = envelope.typing {
                        F::Typing(t)
                    } else if let Some(e) = envelope.event {
                        F::ConversationEvent(e)
                    } else {
                        continue;
                    };
                    let span = deliver_span(&envelope.trace, conversation.as_deref(), 0);
                    let streams =
                        span.in_scope(|| feed.dispatch(&Delivery::Frame(Arc::new(frame))));
                    span.record("switchboard.local_subscribers", streams);
                }
                None => tracing::warn!(channel = %feed.channel, "ignoring an undecodable payload"),
            },
            BusEvent::Gap => {
                if let (Some(l), Some(c)) = (last, &conversation) {
                    tracing::info!(channel = %feed.channel, after = l, "filling a pub/sub gap from history");
                    last = fill(&feed, &*store, c, l, None).await.or(last);
                }
            }
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
            feed.dispatch(&Delivery::Message(Arc::new(message)));
        }
        if count < FILL_PAGE {
            return Some(last);
        }
    }
}
