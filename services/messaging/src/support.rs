//! How a consultation looks to the people in it: the views of the desk's records that both
//! messaging (a SUPPORT conversation's view carries its consultation: messaging's one hook
//! for the desk) and the desk's rules ([`crate::desk`]) hand out. Depends on neither, so
//! the two do not depend on each other through it.

use switchboard_proto::messaging::v1 as pb;

use crate::clock::timestamp;
use crate::error::Result;
use crate::store::DeskStore;
use crate::store::desk::{ConsultationRecord, ConsultationState};

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
