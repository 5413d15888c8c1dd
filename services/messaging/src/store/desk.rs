//! The support desk's durable state: consultations, the queue and each agent's load,
//! behind [`DeskStore`], implemented by both engines next to their conversations (a
//! consultation is a SUPPORT conversation plus its record).
//!
//! Every change of a consultation's state is one atomic step, so several messaging
//! instances can route at once: a consultation is assigned at most once, and an agent is
//! never given more than their capacity. In memory and on one Redis that step also moves
//! the queue, the agents' loads and the conversation's members; on a Redis Cluster those
//! follow it in an order that leaves only entries too many after a crash, which
//! [`DeskStore::repair`] drops.

use std::future::Future;

use super::MessagingStore;
use crate::conversation::ConversationRecord;
use crate::error::Result;
// The desk's records are the desk's model; storage code names them from here too.
pub use crate::support::model::{ConsultationRecord, ConsultationState, Routed, Step};

/// A consultation with its 1-based queue position (while queued).
pub type Found = (ConsultationRecord, Option<u32>);

/// The desk's storage contract (on top of conversations).
pub trait DeskStore: MessagingStore {
    /// Stores the SUPPORT conversation, its consultation record, queues it, and stores
    /// its first message (the send step, as [`MessagingStore::send`]), in one atomic step:
    /// all of it or none.
    fn open(
        &self,
        conversation: &ConversationRecord,
        consultation: &ConsultationRecord,
        first: &super::Outgoing,
    ) -> impl Future<Output = Result<super::Sent>> + Send;
    /// A consultation by id.
    fn consultation(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Option<ConsultationRecord>>> + Send;
    /// Consultations by id, each with its 1-based queue position while queued, in the
    /// order asked (`None` for an id without one). Engines that can answer in one round
    /// trip do.
    fn consultations(
        &self,
        ids: &[String],
    ) -> impl Future<Output = Result<Vec<Option<Found>>>> + Send {
        async move {
            let mut out = Vec::with_capacity(ids.len());
            for id in ids {
                out.push(match self.consultation(id).await? {
                    Some(r) => {
                        let position = match r.state {
                            ConsultationState::Queued => self.queue_position(id).await?,
                            _ => None,
                        };
                        Some((r, position))
                    }
                    None => None,
                });
            }
            Ok(out)
        }
    }
    /// 1-based position in the queue, `None` if not queued.
    fn queue_position(&self, id: &str) -> impl Future<Output = Result<Option<u32>>> + Send;
    /// Queued consultations, oldest first, at most `limit`.
    fn queue(&self, limit: usize) -> impl Future<Output = Result<Vec<ConsultationRecord>>> + Send;
    /// Assigns the oldest queued consultation to the candidate with the fewest assigned
    /// consultations below `capacity` (0: no limit); ties go to the earlier candidate.
    fn route_next(
        &self,
        candidates: &[String],
        capacity: u32,
        now_ms: u64,
    ) -> impl Future<Output = Result<Routed>> + Send;
    /// A QUEUED consultation goes to `agent` (whatever its load).
    fn accept(
        &self,
        id: &str,
        agent: &str,
        now_ms: u64,
    ) -> impl Future<Output = Result<Step>> + Send;
    /// An ASSIGNED consultation held by `from` moves to `to`: loads move, `to` becomes a
    /// member and `from` stops being one.
    fn transfer(
        &self,
        id: &str,
        from: &str,
        to: &str,
        note: &str,
        now_ms: u64,
    ) -> impl Future<Output = Result<Step>> + Send;
    /// Closes a consultation that is not closed: leaves the queue or frees the agent's
    /// load, and the conversation becomes read-only.
    fn close(
        &self,
        id: &str,
        resolution: &str,
        now_ms: u64,
    ) -> impl Future<Output = Result<Step>> + Send;
    /// Assigned consultations per agent, in the order asked.
    fn loads(&self, agents: &[String]) -> impl Future<Output = Result<Vec<u32>>> + Send;
    /// The repair pass: drops desk-wide entries that no consultation backs any
    /// more and that are old enough (at `now_ms`) not to belong to a step in flight.
    /// Returns how many it dropped; engines whose steps are atomic have none.
    fn repair(&self, now_ms: u64) -> impl Future<Output = Result<usize>> + Send {
        let _ = now_ms;
        async { Ok(0) }
    }
}
