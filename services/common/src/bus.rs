//! The pub/sub bus that carries events between instances: Redis pub/sub in production, an
//! in-process registry for the embedded engine.
//!
//! Each process holds **one** Redis pub/sub connection. Local subscribers of a channel
//! share one Redis subscription (reference-counted) and each gets its own bounded queue,
//! so a message costs one delivery per instance, not per subscriber. Pub/sub is
//! at-most-once: whenever messages may have been missed (a Redis reconnect, or a
//! subscriber whose queue overflowed) the subscriber receives [`BusEvent::Gap`] and must
//! recover from durable state.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use futures::channel::mpsc as queue;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::redis_conn::RedisConn;

/// A boxed future, so the bus can be used as `Arc<dyn Bus>`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// How many events a subscriber may have queued before it is told [`BusEvent::Gap`].
///
/// Each subscriber's queue is a `futures` bounded channel, which allocates per queued
/// event and nothing up front: a process holds one subscription per live channel (tens of
/// thousands when every stream has its own user channel), and most are idle, so slots
/// allocated in advance (as tokio's broadcast and mpsc channels do) would dominate the
/// memory of an idle stream. Events are few per channel per process (one per message, not
/// per stream), so the allocation per event costs nothing that matters.
pub const SUBSCRIBER_QUEUE: usize = 64;

/// How long `subscribe` waits for Redis to confirm.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);

/// What a subscriber receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusEvent {
    /// A published payload.
    Message(Arc<[u8]>),
    /// Messages may have been lost since the last event; recover from durable state.
    Gap,
}

/// Bus failures.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// Redis is unreachable or did not answer in time.
    #[error("pub/sub unavailable: {0}")]
    Unavailable(String),
}

/// Publish and subscribe by channel name.
pub trait Bus: Send + Sync + 'static {
    /// Publishes `payload` to every subscriber of `channel` on every instance; how many
    /// processes were subscribed (on a cluster: those subscribed on the channel's node,
    /// which is every one that subscribed through this bus).
    fn publish<'a>(
        &'a self,
        channel: &'a str,
        payload: Vec<u8>,
    ) -> BoxFuture<'a, Result<u64, BusError>>;
    /// Subscribes to `channel`; events published after this returns are delivered.
    fn subscribe<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<Subscription, BusError>>;
    /// Whether this is sharded pub/sub (a Redis Cluster): a channel lives in one slot,
    /// so a channel published from a transaction must share its keys' slot.
    fn sharded(&self) -> bool {
        false
    }
}

/// A live subscription; dropping it unsubscribes (the last one per channel also at Redis).
pub struct Subscription {
    rx: queue::Receiver<BusEvent>,
    lagged: Arc<AtomicBool>,
    _lease: Lease,
}

impl Subscription {
    /// The next event; `None` once the bus has shut down.
    ///
    /// A gap is reported as soon as it is known, possibly before events queued ahead of
    /// it: recovering from durable state then covers them too, and they arrive after as
    /// duplicates, which consumers drop.
    pub async fn recv(&mut self) -> Option<BusEvent> {
        if self.lagged.swap(false, Ordering::AcqRel) {
            metrics::counter!(crate::metrics::QUEUE_OVERFLOWS).increment(1);
            return Some(BusEvent::Gap);
        }
        self.rx.next().await
    }
}

/// Local subscribers by channel, shared by both bus engines.
#[derive(Default)]
struct Registry {
    channels: Mutex<HashMap<String, Vec<Sink>>>,
}

/// One subscriber's end in the registry.
struct Sink {
    id: u64,
    tx: queue::Sender<BusEvent>,
    lagged: Arc<AtomicBool>,
}

impl Sink {
    /// Queues `event`, or flags a gap when the queue is full.
    fn offer(&mut self, event: BusEvent) {
        if let Err(e) = self.tx.try_send(event)
            && e.is_full()
        {
            self.lagged.store(true, Ordering::Release);
        }
    }
}

/// Removes its subscriber from the channel on drop; tells the Redis task when it was the
/// last one.
struct Lease {
    registry: Arc<Registry>,
    channel: String,
    id: u64,
    on_last: Option<mpsc::Sender<Command>>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let last = {
            let mut channels = lock(&self.registry.channels);
            match channels.get_mut(&self.channel) {
                Some(sinks) => {
                    sinks.retain(|s| s.id != self.id);
                    let last = sinks.is_empty();
                    if last {
                        channels.remove(&self.channel);
                    }
                    last
                }
                None => false,
            }
        };
        if last && let Some(tx) = &self.on_last {
            // Best effort: if the command queue is full the Redis task still drops the
            // subscription at its next reconnect, when it resubscribes only live channels.
            let _ = tx.try_send(Command::Unsubscribe(self.channel.clone()));
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding this lock cannot leave the map inconsistent (each operation
    // is a single insert/remove), so a poisoned lock is still safe to use.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Registry {
    /// Adds a subscriber to `channel`; returns its subscription and whether it is the
    /// channel's first.
    fn add(
        self: &Arc<Self>,
        channel: &str,
        on_last: Option<mpsc::Sender<Command>>,
    ) -> (Subscription, bool) {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        // One slot is the sender's own (see `futures::channel::mpsc::channel`).
        let (tx, rx) = queue::channel(SUBSCRIBER_QUEUE - 1);
        let lagged = Arc::new(AtomicBool::new(false));
        let sink = Sink {
            id,
            tx,
            lagged: lagged.clone(),
        };
        let first = {
            let mut channels = lock(&self.channels);
            let sinks = channels.entry(channel.to_owned()).or_default();
            sinks.push(sink);
            sinks.len() == 1
        };
        let subscription = Subscription {
            rx,
            lagged,
            _lease: Lease {
                registry: self.clone(),
                channel: channel.to_owned(),
                id,
                on_last,
            },
        };
        (subscription, first)
    }

    /// Offers `event` to the subscribers of `channel`; how many there were.
    fn deliver(&self, channel: &str, event: BusEvent) -> usize {
        match lock(&self.channels).get_mut(channel) {
            Some(sinks) => {
                for sink in sinks.iter_mut() {
                    sink.offer(event.clone());
                }
                sinks.len()
            }
            None => 0,
        }
    }

    fn contains(&self, channel: &str) -> bool {
        lock(&self.channels).contains_key(channel)
    }

    fn names(&self) -> Vec<String> {
        lock(&self.channels).keys().cloned().collect()
    }

    /// Tells the subscribers of `channel` that they may have missed something.
    fn gap(&self, channel: &str) {
        let _ = self.deliver(channel, BusEvent::Gap);
    }

    fn gap_all(&self) {
        for sinks in lock(&self.channels).values_mut() {
            for sink in sinks {
                sink.offer(BusEvent::Gap);
            }
        }
    }
}

/// The in-process bus of the embedded engine: publish reaches subscribers of this process.
#[derive(Default, Clone)]
pub struct MemoryBus {
    registry: Arc<Registry>,
}

impl MemoryBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Delivers `payload` to this process's subscribers of `channel` before returning (so a
    /// caller holding a lock publishes in its own order).
    pub fn publish_now(&self, channel: &str, payload: Vec<u8>) {
        let _ = self
            .registry
            .deliver(channel, BusEvent::Message(payload.into()));
    }
}

impl Bus for MemoryBus {
    fn publish<'a>(
        &'a self,
        channel: &'a str,
        payload: Vec<u8>,
    ) -> BoxFuture<'a, Result<u64, BusError>> {
        // Subscribers of one process: at most one, as one Redis connection of an instance.
        let reached = self
            .registry
            .deliver(channel, BusEvent::Message(payload.into()));
        Box::pin(async move { Ok(u64::from(reached > 0)) })
    }

    fn subscribe<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<Subscription, BusError>> {
        let (subscription, _) = self.registry.add(channel, None);
        Box::pin(async move { Ok(subscription) })
    }
}

enum Command {
    Subscribe(String, oneshot::Sender<Result<(), BusError>>),
    Unsubscribe(String),
    /// A cluster node dropped a subscription this process still has (its slot moved).
    Resubscribe(String),
}

/// Publishes `payload` on `channel` with the deployment's command (`PUBLISH` on one
/// Redis, `SPUBLISH` on a cluster).
async fn publish_through(
    conn: &RedisConn,
    channel: &str,
    payload: Vec<u8>,
) -> Result<u64, BusError> {
    let mut conn = conn.clone();
    redis::cmd(conn.publish_command())
        .arg(channel)
        .arg(payload)
        .query_async::<u64>(&mut conn)
        .await
        .map_err(|e| BusError::Unavailable(e.to_string()))
}

/// The Redis bus: one pub/sub connection per process, reconnected with backoff.
#[derive(Clone)]
pub struct RedisBus {
    registry: Arc<Registry>,
    commands: mpsc::Sender<Command>,
    publisher: RedisConn,
}

impl RedisBus {
    /// Starts the pub/sub task; it runs until `shutdown` fires. `publisher` sends PUBLISH.
    pub fn start(client: redis::Client, publisher: RedisConn, shutdown: CancellationToken) -> Self {
        let registry = Arc::new(Registry::default());
        // Commands are subscribe/unsubscribe requests; a full queue makes `subscribe`
        // wait (bounded by its timeout), never grow memory.
        let (commands, rx) = mpsc::channel(1024);
        crate::shutdown::spawn(run_pubsub(client, registry.clone(), rx, shutdown));
        Self {
            registry,
            commands,
            publisher,
        }
    }
}

impl Bus for RedisBus {
    fn publish<'a>(
        &'a self,
        channel: &'a str,
        payload: Vec<u8>,
    ) -> BoxFuture<'a, Result<u64, BusError>> {
        Box::pin(publish_through(&self.publisher, channel, payload))
    }

    fn subscribe<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<Subscription, BusError>> {
        Box::pin(async move {
            let (subscription, first) = self.registry.add(channel, Some(self.commands.clone()));
            if first {
                let (ack, done) = oneshot::channel();
                let confirmed = tokio::time::timeout(SUBSCRIBE_TIMEOUT, async {
                    self.commands
                        .send(Command::Subscribe(channel.to_owned(), ack))
                        .await
                        .map_err(|_| BusError::Unavailable("bus stopped".into()))?;
                    done.await
                        .map_err(|_| BusError::Unavailable("bus stopped".into()))?
                })
                .await;
                match confirmed {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(e),
                    Err(_) => {
                        return Err(BusError::Unavailable(
                            "redis did not confirm the subscription in time".into(),
                        ));
                    }
                }
            }
            Ok(subscription)
        })
    }
}

async fn run_pubsub(
    client: redis::Client,
    registry: Arc<Registry>,
    mut commands: mpsc::Receiver<Command>,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(50);
    let mut connected_before = false;
    loop {
        let pubsub = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = client.get_async_pubsub() => r,
        };
        let (mut sink, mut stream) = match pubsub {
            Ok(p) => p.split(),
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "redis pub/sub connect failed");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        let mut healthy = true;
        for name in registry.names() {
            if let Err(e) = sink.subscribe(&name).await {
                tracing::warn!(error = %e, "redis resubscribe failed");
                healthy = false;
                break;
            }
        }
        if !healthy {
            continue;
        }
        backoff = Duration::from_millis(50);
        if connected_before {
            tracing::info!("redis pub/sub reconnected");
            metrics::counter!(crate::metrics::REDIS_RECONNECTS).increment(1);
            // Anything published while we were away is lost to pub/sub.
            registry.gap_all();
        }
        connected_before = true;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                cmd = commands.recv() => match cmd {
                    None => return,
                    Some(Command::Subscribe(name, ack)) => {
                        let result = if registry.contains(&name) {
                            sink.subscribe(&name).await.map_err(|e| BusError::Unavailable(e.to_string()))
                        } else {
                            Ok(())
                        };
                        let failed = result.is_err();
                        let _ = ack.send(result);
                        if failed { break; }
                    }
                    Some(Command::Unsubscribe(name)) => {
                        if !registry.contains(&name) && sink.unsubscribe(&name).await.is_err() {
                            break;
                        }
                    }
                    // Only a cluster drops subscriptions one by one.
                    Some(Command::Resubscribe(_)) => {}
                },
                msg = stream.next() => match msg {
                    Some(msg) => {
                        let _ = registry.deliver(msg.get_channel_name(), BusEvent::Message(msg.get_payload_bytes().into()));
                    }
                    None => {
                        tracing::warn!("redis pub/sub connection lost; reconnecting");
                        break;
                    }
                },
            }
        }
    }
}

/// The bus on a Redis Cluster: sharded pub/sub (`SSUBSCRIBE`/`SPUBLISH`), so a message
/// is carried only by the node that owns its channel's slot, not broadcast to every node.
/// The cluster connection keeps one connection per node for all of this process's
/// subscriptions there, and subscribes again after a reconnect. Whatever could have been
/// missed meanwhile is a [`BusEvent::Gap`] for the channels concerned: a subscription
/// confirmed again (after a reconnect or a failover), one the node dropped (its slot moved
/// to another node: the bus subscribes again where it went), or a lost connection (every
/// channel, since pushes do not say which node they came from).
#[derive(Clone)]
pub struct ClusterBus {
    registry: Arc<Registry>,
    commands: mpsc::Sender<Command>,
    /// For subscriptions.
    conn: redis::cluster_async::ClusterConnection,
    /// The same connection, for publishing.
    publisher: RedisConn,
}

impl ClusterBus {
    /// Connects (lazily) to the cluster seeded by `seeds`; the subscription task runs until
    /// `shutdown` fires.
    pub fn start(seeds: &[String], shutdown: CancellationToken) -> redis::RedisResult<Self> {
        let registry = Arc::new(Registry::default());
        let (commands, rx) = mpsc::channel(1024);
        let pushes = Pushes {
            registry: registry.clone(),
            confirmed: Mutex::default(),
            commands: commands.clone(),
        };
        let client = crate::redis_conn::cluster_builder(seeds)
            .use_protocol(redis::ProtocolVersion::RESP3)
            .push_sender(move |info: redis::PushInfo| {
                pushes.take(info);
                Ok::<(), std::convert::Infallible>(())
            })
            .build()?;
        let conn = client.get_pending_async_connection_with_config(
            redis::cluster::ClusterConfig::new()
                .set_connection_timeout(Duration::from_secs(2))
                .set_response_timeout(Duration::from_secs(3)),
        );
        crate::shutdown::spawn(run_sharded(conn.clone(), registry.clone(), rx, shutdown));
        Ok(Self {
            registry,
            commands,
            publisher: RedisConn::on_cluster(conn.clone()),
            conn,
        })
    }
}

/// What the cluster connection pushes: messages to deliver, confirmations to watch.
struct Pushes {
    registry: Arc<Registry>,
    /// Channels whose subscription a node has confirmed; a second confirmation means the
    /// subscription was made again, so something may have been missed.
    confirmed: Mutex<std::collections::HashSet<String>>,
    commands: mpsc::Sender<Command>,
}

impl Pushes {
    fn take(&self, info: redis::PushInfo) {
        let text = |v: &redis::Value| match v {
            redis::Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
            redis::Value::SimpleString(s) => Some(s.clone()),
            _ => None,
        };
        match info.kind {
            redis::PushKind::SMessage | redis::PushKind::Message => {
                if let [channel, redis::Value::BulkString(payload), ..] = info.data.as_slice()
                    && let Some(channel) = text(channel)
                {
                    self.registry
                        .deliver(&channel, BusEvent::Message(payload.clone().into()));
                }
            }
            redis::PushKind::SSubscribe => {
                if let Some(channel) = info.data.first().and_then(text)
                    && !lock(&self.confirmed).insert(channel.clone())
                {
                    self.registry.gap(&channel);
                }
            }
            redis::PushKind::SUnsubscribe => {
                if let Some(channel) = info.data.first().and_then(text) {
                    lock(&self.confirmed).remove(&channel);
                    if self.registry.contains(&channel) {
                        self.registry.gap(&channel);
                        if self
                            .commands
                            .try_send(Command::Resubscribe(channel))
                            .is_err()
                        {
                            tracing::warn!(
                                "bus command queue full; a dropped subscription waits for the next reconnect"
                            );
                        }
                    }
                }
            }
            redis::PushKind::Disconnection => {
                metrics::counter!(crate::metrics::REDIS_RECONNECTS).increment(1);
                self.registry.gap_all();
            }
            _ => {}
        }
    }
}

impl Bus for ClusterBus {
    fn sharded(&self) -> bool {
        true
    }

    fn publish<'a>(
        &'a self,
        channel: &'a str,
        payload: Vec<u8>,
    ) -> BoxFuture<'a, Result<u64, BusError>> {
        Box::pin(publish_through(&self.publisher, channel, payload))
    }

    fn subscribe<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<Subscription, BusError>> {
        Box::pin(async move {
            let (subscription, first) = self.registry.add(channel, Some(self.commands.clone()));
            if first {
                let mut conn = self.conn.clone();
                match tokio::time::timeout(SUBSCRIBE_TIMEOUT, conn.ssubscribe(channel)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(BusError::Unavailable(e.to_string())),
                    Err(_) => {
                        return Err(BusError::Unavailable(
                            "redis did not confirm the subscription in time".into(),
                        ));
                    }
                }
            }
            Ok(subscription)
        })
    }
}

/// Unsubscribes channels whose last local subscriber left, and subscribes again where a
/// node dropped a channel still in use.
async fn run_sharded(
    mut conn: redis::cluster_async::ClusterConnection,
    registry: Arc<Registry>,
    mut commands: mpsc::Receiver<Command>,
    shutdown: CancellationToken,
) {
    loop {
        let cmd = tokio::select! {
            _ = shutdown.cancelled() => return,
            cmd = commands.recv() => cmd,
        };
        match cmd {
            None => return,
            Some(Command::Unsubscribe(name)) => {
                if !registry.contains(&name)
                    && let Err(e) = conn.sunsubscribe(&name).await
                {
                    tracing::warn!(error = %e, "redis sunsubscribe failed");
                }
            }
            Some(Command::Resubscribe(name)) => {
                // Retried with backoff while the channel is still wanted: the slot may
                // still be moving.
                let mut backoff = Duration::from_millis(50);
                while registry.contains(&name) {
                    match conn.ssubscribe(&name).await {
                        Ok(()) => break,
                        Err(e) => {
                            tracing::warn!(error = %e, "redis resubscribe failed");
                            tokio::select! {
                                _ = shutdown.cancelled() => return,
                                _ = tokio::time::sleep(backoff) => {}
                            }
                            backoff = (backoff * 2).min(Duration::from_secs(2));
                        }
                    }
                }
            }
            Some(Command::Subscribe(_, ack)) => {
                let _ = ack.send(Ok(()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_bus_delivers_to_every_subscriber_and_forgets_dropped_ones() {
        let bus = MemoryBus::new();
        let mut a = bus.subscribe("c").await.expect("subscribe");
        let mut b = bus.subscribe("c").await.expect("subscribe");
        bus.publish("c", b"hi".to_vec()).await.expect("publish");
        assert_eq!(
            a.recv().await,
            Some(BusEvent::Message(Arc::from(&b"hi"[..])))
        );
        assert_eq!(
            b.recv().await,
            Some(BusEvent::Message(Arc::from(&b"hi"[..])))
        );
        drop(a);
        drop(b);
        assert!(!bus.registry.contains("c"));
    }

    #[tokio::test]
    async fn overflowing_subscriber_is_told_about_the_gap() {
        let bus = MemoryBus::new();
        let mut s = bus.subscribe("c").await.expect("subscribe");
        for i in 0..(SUBSCRIBER_QUEUE + 10) {
            bus.publish("c", vec![i as u8]).await.expect("publish");
        }
        assert_eq!(s.recv().await, Some(BusEvent::Gap));
        // What was queued before the overflow still arrives, then nothing more.
        for i in 0..SUBSCRIBER_QUEUE {
            assert_eq!(
                s.recv().await,
                Some(BusEvent::Message(Arc::from(&[i as u8][..]))),
                "event {i}"
            );
        }
        bus.publish("c", b"after".to_vec()).await.expect("publish");
        assert_eq!(
            s.recv().await,
            Some(BusEvent::Message(Arc::from(&b"after"[..])))
        );
    }

    #[tokio::test]
    async fn a_gap_reaches_every_subscriber_of_every_channel() {
        let bus = MemoryBus::new();
        let mut a = bus.subscribe("a").await.expect("subscribe");
        let mut b = bus.subscribe("b").await.expect("subscribe");
        bus.registry.gap_all();
        assert_eq!(a.recv().await, Some(BusEvent::Gap));
        assert_eq!(b.recv().await, Some(BusEvent::Gap));
    }
}
