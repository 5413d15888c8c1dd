//! The desk in memory: the same steps as the Redis scripts, each under the store's lock.

use super::desk::{ConsultationRecord, ConsultationState, DeskStore, Routed, Step};
use super::memory::{MemoryStore, State, index, insert};
use super::{Outgoing, Sent};
use crate::conversation::ConversationRecord;
use crate::error::Result;

/// Makes `agent` the holder of consultation `id` and a member of its conversation.
fn hand_to(s: &mut State, id: &str, agent: &str, now_ms: u64) {
    *s.desk.load.entry(agent.to_owned()).or_default() += 1;
    let record = s.conversation_mut(id).map(|c| {
        c.join(agent, now_ms);
        c.record.clone()
    });
    if let Some(record) = record {
        index(s, &record);
    }
}

fn release(s: &mut State, agent: &str) {
    if let Some(l) = s.desk.load.get_mut(agent) {
        *l = l.saturating_sub(1);
        if *l == 0 {
            s.desk.load.remove(agent);
        }
    }
}

impl DeskStore for MemoryStore {
    async fn open(
        &self,
        c: &ConversationRecord,
        r: &ConsultationRecord,
        first: &Outgoing,
    ) -> Result<Sent> {
        // One lock for all of it: nobody sees the consultation without its first message.
        Ok(self.with(|s| {
            insert(s, c);
            s.desk.consultations.insert(r.id.clone(), r.clone());
            s.desk.queue.insert((r.opened_at_ms, r.id.clone()));
            self.send_in(s, first)
        }))
    }

    async fn consultation(&self, id: &str) -> Result<Option<ConsultationRecord>> {
        Ok(self.with(|s| s.desk.consultations.get(id).cloned()))
    }

    async fn queue_position(&self, id: &str) -> Result<Option<u32>> {
        Ok(self.with(|s| {
            s.desk
                .queue
                .iter()
                .position(|(_, q)| q == id)
                .map(|p| p as u32 + 1)
        }))
    }

    async fn queue(&self, limit: usize) -> Result<Vec<ConsultationRecord>> {
        Ok(self.with(|s| {
            s.desk
                .queue
                .iter()
                .take(limit)
                .filter_map(|(_, id)| s.desk.consultations.get(id).cloned())
                .collect()
        }))
    }

    async fn route_next(
        &self,
        candidates: &[String],
        capacity: u32,
        now_ms: u64,
    ) -> Result<Routed> {
        Ok(self.with(|s| {
            let Some((opened, id)) = s.desk.queue.first().cloned() else {
                return Routed::Empty;
            };
            let best = candidates
                .iter()
                .map(|c| (s.desk.load.get(c).copied().unwrap_or(0), c))
                .filter(|(l, _)| capacity == 0 || *l < capacity)
                .min_by_key(|(l, _)| *l)
                .map(|(_, c)| c.clone());
            let Some(agent) = best else {
                return Routed::NoAgent;
            };
            s.desk.queue.remove(&(opened, id.clone()));
            if let Some(r) = s.desk.consultations.get_mut(&id) {
                r.agent_id = agent.clone();
                r.state = ConsultationState::Assigned;
                r.assigned_at_ms = now_ms;
            }
            hand_to(s, &id, &agent, now_ms);
            Routed::Assigned {
                id,
                agent_id: agent,
            }
        }))
    }

    async fn accept(&self, id: &str, agent: &str, now_ms: u64) -> Result<Step> {
        Ok(self.with(|s| {
            let Some(r) = s.desk.consultations.get_mut(id) else {
                return Step::NotFound;
            };
            if r.state != ConsultationState::Queued {
                return Step::WrongState(r.state);
            }
            r.agent_id = agent.to_owned();
            r.state = ConsultationState::Assigned;
            r.assigned_at_ms = now_ms;
            let key = (r.opened_at_ms, id.to_owned());
            s.desk.queue.remove(&key);
            hand_to(s, id, agent, now_ms);
            Step::Done(agent.to_owned())
        }))
    }

    async fn transfer(
        &self,
        id: &str,
        from: &str,
        to: &str,
        note: &str,
        now_ms: u64,
    ) -> Result<Step> {
        Ok(self.with(|s| {
            let Some(r) = s.desk.consultations.get_mut(id) else {
                return Step::NotFound;
            };
            if r.state != ConsultationState::Assigned {
                return Step::WrongState(r.state);
            }
            if r.agent_id != from {
                return Step::Moved(r.agent_id.clone());
            }
            r.agent_id = to.to_owned();
            r.assigned_at_ms = now_ms;
            r.transfer_note = note.to_owned();
            release(s, from);
            if let Some(c) = s.conversation_mut(id) {
                c.leave(from);
            }
            s.unindex(from, id);
            hand_to(s, id, to, now_ms);
            Step::Done(to.to_owned())
        }))
    }

    async fn close(&self, id: &str, resolution: &str, now_ms: u64) -> Result<Step> {
        Ok(self.with(|s| {
            let Some(r) = s.desk.consultations.get_mut(id) else {
                return Step::NotFound;
            };
            if r.state == ConsultationState::Closed {
                return Step::WrongState(r.state);
            }
            let was = r.state;
            let agent = r.agent_id.clone();
            r.state = ConsultationState::Closed;
            r.closed_at_ms = now_ms;
            r.resolution = resolution.to_owned();
            let key = (r.opened_at_ms, id.to_owned());
            s.desk.queue.remove(&key);
            if was == ConsultationState::Assigned {
                release(s, &agent);
            }
            if let Some(c) = s.conversation_mut(id) {
                c.record.read_only = true;
            }
            Step::Done(agent)
        }))
    }

    async fn loads(&self, agents: &[String]) -> Result<Vec<u32>> {
        Ok(self.with(|s| {
            agents
                .iter()
                .map(|a| s.desk.load.get(a).copied().unwrap_or(0))
                .collect()
        }))
    }
}
