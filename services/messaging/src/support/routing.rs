//! Routing: queued consultations go, oldest first, to the available agent with the fewest
//! open ones (within [`Desk`]'s capacity), in one atomic store step each, so instances may
//! route at the same time without assigning anything twice. It is driven by events, never
//! a tight poll: a new consultation routes at once; the agents' presence is watched
//! ([`AgentDirectory::watch`](super::agents::AgentDirectory::watch)) and routing runs when
//! one becomes available; closes and transfers free room and route again; a slow safety
//! pass catches what a crashed instance or a lost event left waiting; a repair pass of its own
//! lets the store drop what a crashed step left behind ([`DeskStore::repair`]). Whenever the queue
//! moves, the first [`QUEUE_NOTICES`] waiting customers hear their place.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use switchboard_common::metrics as m;
use switchboard_common::shutdown::CancellationToken;
use switchboard_proto::messaging::v1 as pb;
use tracing::Instrument;

use super::desk::Desk;
use crate::clock::now_ms;
use crate::error::Result;
use crate::store::DeskStore;
use crate::store::desk::Routed;

/// Most assignments one routing pass makes (the next event or pass continues).
const MAX_PER_PASS: usize = 1000;

/// Customers told their new place when the queue moves: the first this many in line.
pub const QUEUE_NOTICES: usize = 100;

impl<S: DeskStore> Desk<S> {
    /// After consultations left the queue: tells the customers of the first
    /// [`QUEUE_NOTICES`] in line their place now (best effort, like every event).
    pub(super) async fn queue_moved(&self) {
        let waiting = match self.store().queue(QUEUE_NOTICES).await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "cannot announce the queue's new order");
                return;
            }
        };
        // Side by side, a few at a time: up to QUEUE_NOTICES customers, not one after another.
        futures::stream::iter(&waiting)
            .for_each_concurrent(16, |record| {
                self.tell(
                    record,
                    pb::ConversationEventKind::ConsultationQueueMoved,
                    "",
                    &[],
                )
            })
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
                    candidates.insert(self.agents.available().await?)
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
    pub(super) async fn route_logged(&self, why: &str) {
        let span =
            tracing::info_span!(parent: None, "route consultations", switchboard.trigger = why);
        match self.route().instrument(span).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(assigned = n, trigger = why, "routing pass"),
            Err(e) => tracing::warn!(error = %e, trigger = why, "routing pass failed"),
        }
    }

    /// Every `every` until shutdown, the store's repair of what crashed steps left behind
    /// ([`DeskStore::repair`]; work only on a Redis Cluster), each in a trace of its own.
    /// Apart from routing, so it runs without presence or a service token too.
    pub async fn repair_every(self: Arc<Self>, every: Duration, shutdown: CancellationToken) {
        let mut pass = tokio::time::interval(every);
        pass.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = pass.tick() => {}
            }
            let span = tracing::info_span!(parent: None, "repair the desk");
            match self.store().repair(now_ms()).instrument(span).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(dropped = n, "desk repair dropped stale entries"),
                Err(e) => tracing::warn!(error = %e, "desk repair failed"),
            }
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
                w = self.agents.watch() => w,
            };
            match watch {
                Ok(mut watch) => loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = self.wake.notified() => self.route_logged("room freed").await,
                        _ = pass.tick() => self.route_logged("safety pass").await,
                        m = watch.next() => match m {
                            Some(()) => {
                                retry = Duration::from_millis(200);
                                self.route_logged("agent available").await;
                            }
                            None => {
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
