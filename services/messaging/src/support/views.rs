//! How a consultation looks to the people in it: the views of the desk's records that the
//! desk's rules ([`super::desk`]) hand out, and [`Views`], the desk's side of messaging's
//! one hook ([`SupportViews`]): a SUPPORT conversation's view carries its consultation.

use std::sync::Arc;

use switchboard_proto::messaging::v1 as pb;

use crate::clock::timestamp;
use crate::conversation::ConversationRecord;
use crate::domain::SupportViews;
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

/// The consultation of conversation `id` as `viewer` sees it, if it has one: its record
/// and its queue position are read together (one round trip).
pub async fn consultation_by_id<S: DeskStore>(
    store: &S,
    id: &str,
    viewer: &str,
) -> Result<Option<pb::Consultation>> {
    let (record, position) = futures::try_join!(store.consultation(id), store.queue_position(id))?;
    Ok(record.map(|r| {
        let position = position.filter(|_| r.state == ConsultationState::Queued);
        consultation_view(&r, position, viewer)
    }))
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

/// The desk's [`SupportViews`] over its store: what [`Messaging`](crate::domain::Messaging)
/// is given so that a SUPPORT conversation's view carries its consultation.
pub struct Views<S>(pub Arc<S>);

impl<S: DeskStore> SupportViews for Views<S> {
    fn consultation<'a>(
        &'a self,
        record: &'a ConversationRecord,
        user: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<Option<pb::Consultation>>> {
        Box::pin(consultation_by_id(self.0.as_ref(), &record.id, user))
    }

    fn consultations<'a>(
        &'a self,
        ids: &'a [String],
        user: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<Vec<Option<pb::Consultation>>>> {
        Box::pin(async move {
            Ok(self
                .0
                .consultations(ids)
                .await?
                .into_iter()
                .map(|found| found.map(|(r, position)| consultation_view(&r, position, user)))
                .collect())
        })
    }
}
