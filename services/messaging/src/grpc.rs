//! The gRPC adapter: wire types in, calls into [`Messaging`], wire types out.

use std::sync::Arc;

use switchboard_common::token::Caller;
use switchboard_proto::messaging::v1 as pb;
use switchboard_proto::messaging::v1::servers::messaging_service_server::MessagingService;
use switchboard_proto::messaging::v1::servers::support_service_server::SupportService;
use tonic::{Request, Response, Status, Streaming};

use crate::directory::Credential;
use crate::domain::Messaging;
use crate::error::Error;
use crate::message::Draft;
use crate::store::{DeskStore, MessagingStore};
use crate::stream::{Outbound, Streams};
use crate::support::Desk;

/// `switchboard.messaging.v1.MessagingService`.
pub struct MessagingGrpc<S> {
    messaging: Arc<Messaging<S>>,
    streams: Arc<Streams<S>>,
}

impl<S> MessagingGrpc<S> {
    /// Serves `streams` (and the rules it holds).
    pub fn new(streams: Arc<Streams<S>>) -> Self {
        Self {
            messaging: streams.messaging.clone(),
            streams,
        }
    }
}

/// The verified caller the auth layer put into the request.
fn caller<T>(req: &Request<T>) -> Result<Caller, Status> {
    Ok(switchboard_common::server::caller(req)?)
}

/// The caller's `authorization` value, for calls made on their behalf.
fn credential<T>(req: &Request<T>) -> Credential {
    Credential(req.metadata().get("authorization").cloned())
}

#[tonic::async_trait]
impl<S: MessagingStore> MessagingService for MessagingGrpc<S> {
    #[tracing::instrument(skip_all)]
    async fn create_conversation(
        &self,
        req: Request<pb::CreateConversationRequest>,
    ) -> Result<Response<pb::CreateConversationResponse>, Status> {
        let c = caller(&req)?;
        let on_behalf = credential(&req);
        let r = req.into_inner();
        let (conversation, created) = self
            .messaging
            .create(&c, &on_behalf, r.kind, &r.title, &r.member_ids)
            .await?;
        Ok(Response::new(pb::CreateConversationResponse {
            conversation: Some(conversation),
            created,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn get_conversation(
        &self,
        req: Request<pb::GetConversationRequest>,
    ) -> Result<Response<pb::GetConversationResponse>, Status> {
        let c = caller(&req)?;
        let conversation = self
            .messaging
            .get(&c, &req.into_inner().conversation_id)
            .await?;
        Ok(Response::new(pb::GetConversationResponse {
            conversation: Some(conversation),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_conversations(
        &self,
        req: Request<pb::ListConversationsRequest>,
    ) -> Result<Response<pb::ListConversationsResponse>, Status> {
        let c = caller(&req)?;
        let r = req.into_inner();
        let (conversations, next_page_token) =
            self.messaging.list(&c, r.page_size, &r.page_token).await?;
        Ok(Response::new(pb::ListConversationsResponse {
            conversations,
            next_page_token,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn add_members(
        &self,
        req: Request<pb::AddMembersRequest>,
    ) -> Result<Response<pb::AddMembersResponse>, Status> {
        let c = caller(&req)?;
        let on_behalf = credential(&req);
        let r = req.into_inner();
        let conversation = self
            .messaging
            .add_members(&c, &on_behalf, &r.conversation_id, &r.user_ids)
            .await?;
        Ok(Response::new(pb::AddMembersResponse {
            conversation: Some(conversation),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn remove_member(
        &self,
        req: Request<pb::RemoveMemberRequest>,
    ) -> Result<Response<pb::RemoveMemberResponse>, Status> {
        let c = caller(&req)?;
        let r = req.into_inner();
        let conversation = self
            .messaging
            .remove_member(&c, &r.conversation_id, &r.user_id)
            .await?;
        Ok(Response::new(pb::RemoveMemberResponse {
            conversation: Some(conversation),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn leave(
        &self,
        req: Request<pb::LeaveRequest>,
    ) -> Result<Response<pb::LeaveResponse>, Status> {
        let c = caller(&req)?;
        self.messaging
            .leave(&c, &req.into_inner().conversation_id)
            .await?;
        Ok(Response::new(pb::LeaveResponse {}))
    }

    #[tracing::instrument(skip_all, fields(conversation_id))]
    async fn send_message(
        &self,
        req: Request<pb::SendMessageRequest>,
    ) -> Result<Response<pb::SendMessageResponse>, Status> {
        let c = caller(&req)?;
        let r = req.into_inner();
        tracing::Span::current().record("conversation_id", r.conversation_id.as_str());
        let draft = Draft::parse(r.conversation_id, r.client_msg_id, r.body, r.metadata)?;
        let (message, duplicate) = self.messaging.send(&c, draft).await?;
        Ok(Response::new(pb::SendMessageResponse {
            message: Some(message),
            duplicate,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_messages(
        &self,
        req: Request<pb::ListMessagesRequest>,
    ) -> Result<Response<pb::ListMessagesResponse>, Status> {
        let c = caller(&req)?;
        let r = req.into_inner();
        let (messages, has_more, oldest_retained_seq) = self
            .messaging
            .history(&c, &r.conversation_id, r.before_seq, r.after_seq, r.limit)
            .await?;
        Ok(Response::new(pb::ListMessagesResponse {
            messages,
            has_more,
            oldest_retained_seq,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn mark_read(
        &self,
        req: Request<pb::MarkReadRequest>,
    ) -> Result<Response<pb::MarkReadResponse>, Status> {
        let c = caller(&req)?;
        let r = req.into_inner();
        let read_seq = self
            .messaging
            .mark_read(&c, &r.conversation_id, r.seq)
            .await?;
        Ok(Response::new(pb::MarkReadResponse { read_seq }))
    }

    #[tracing::instrument(skip_all)]
    async fn send_typing(
        &self,
        req: Request<pb::SendTypingRequest>,
    ) -> Result<Response<pb::SendTypingResponse>, Status> {
        let c = caller(&req)?;
        self.messaging
            .typing(&c, &req.into_inner().conversation_id)
            .await?;
        Ok(Response::new(pb::SendTypingResponse {}))
    }

    type ConnectStream = Outbound;

    #[tracing::instrument(skip_all)]
    async fn connect(
        &self,
        req: Request<Streaming<pb::ConnectRequest>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let c = caller(&req)?;
        let slot = self.stream_slot(&c)?;
        Ok(Response::new(crate::stream::open(
            self.streams.clone(),
            c,
            slot,
            req.into_inner(),
            false,
        )))
    }

    type SubscribeStream = Outbound;

    #[tracing::instrument(skip_all)]
    async fn subscribe(
        &self,
        req: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let c = caller(&req)?;
        let subscriptions = subscriptions(req.into_inner().subscriptions)?;
        let slot = self.stream_slot(&c)?;
        // The same session as Connect's, fed the subscriptions as if they were the
        // client's frames, after which the client side is closed.
        let frames = futures::stream::iter(subscriptions.into_iter().map(|s| {
            Ok(pb::ConnectRequest {
                frame: Some(pb::connect_request::Frame::Subscribe(s)),
            })
        }));
        Ok(Response::new(crate::stream::open(
            self.streams.clone(),
            c,
            slot,
            frames,
            true,
        )))
    }
}

/// Most subscriptions one Subscribe call may hold.
pub const MAX_SUBSCRIPTIONS: usize = 100;

/// The subscriptions of a Subscribe call: 1 to [`MAX_SUBSCRIPTIONS`], each naming a
/// conversation by a well-formed id unless it asks for all of them. Whether the caller
/// may read each one is the stream's to say (a FrameError each), as on Connect.
fn subscriptions(subs: Vec<pb::Subscribe>) -> Result<Vec<pb::Subscribe>, Error> {
    if subs.is_empty() || subs.len() > MAX_SUBSCRIPTIONS {
        return Err(Error::invalid(
            "subscriptions",
            format!(
                "subscriptions must hold 1 to {MAX_SUBSCRIPTIONS} entries, got {}",
                subs.len()
            ),
        ));
    }
    for (i, s) in subs.iter().enumerate() {
        if s.all_conversations {
            if !s.conversation_id.is_empty() {
                return Err(Error::invalid(
                    format!("subscriptions[{i}].conversation_id"),
                    "give either conversation_id or all_conversations, not both",
                ));
            }
        } else {
            switchboard_common::id::check(
                &format!("subscriptions[{i}].conversation_id"),
                &s.conversation_id,
            )?;
        }
    }
    Ok(subs)
}

impl<S> MessagingGrpc<S> {
    /// A place for one more stream of the caller on this instance, unless it is shutting
    /// down.
    fn stream_slot(&self, c: &Caller) -> Result<switchboard_common::limits::StreamSlot, Error> {
        if self.streams.shutdown.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        let slot = self
            .streams
            .per_user
            .open(&c.user_id)
            .map_err(Error::TooManyStreams)?;
        tracing::debug!(user_id = %c.user_id, "stream opened");
        Ok(slot)
    }
}

/// `switchboard.messaging.v1.SupportService`.
pub struct SupportGrpc<S> {
    desk: Arc<Desk<S>>,
}

impl<S> SupportGrpc<S> {
    /// Serves `desk`.
    pub fn new(desk: Arc<Desk<S>>) -> Self {
        Self { desk }
    }
}

#[tonic::async_trait]
impl<S: DeskStore> SupportService for SupportGrpc<S> {
    #[tracing::instrument(skip_all)]
    async fn open_consultation(
        &self,
        req: Request<pb::OpenConsultationRequest>,
    ) -> Result<Response<pb::OpenConsultationResponse>, Status> {
        let c = caller(&req)?;
        let r = req.into_inner();
        let (consultation, conversation) = self.desk.open(&c, &r.topic, r.first_message).await?;
        Ok(Response::new(pb::OpenConsultationResponse {
            consultation: Some(consultation),
            conversation: Some(conversation),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_queue(
        &self,
        req: Request<pb::ListQueueRequest>,
    ) -> Result<Response<pb::ListQueueResponse>, Status> {
        let c = caller(&req)?;
        let consultations = self.desk.queue(&c, req.into_inner().limit).await?;
        Ok(Response::new(pb::ListQueueResponse { consultations }))
    }

    #[tracing::instrument(skip_all)]
    async fn accept_consultation(
        &self,
        req: Request<pb::AcceptConsultationRequest>,
    ) -> Result<Response<pb::AcceptConsultationResponse>, Status> {
        let c = caller(&req)?;
        let consultation = self
            .desk
            .accept(&c, &req.into_inner().consultation_id)
            .await?;
        Ok(Response::new(pb::AcceptConsultationResponse {
            consultation: Some(consultation),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn transfer_consultation(
        &self,
        req: Request<pb::TransferConsultationRequest>,
    ) -> Result<Response<pb::TransferConsultationResponse>, Status> {
        let c = caller(&req)?;
        let r = req.into_inner();
        let consultation = self
            .desk
            .transfer(&c, &r.consultation_id, &r.to_agent_id, &r.note)
            .await?;
        Ok(Response::new(pb::TransferConsultationResponse {
            consultation: Some(consultation),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn close_consultation(
        &self,
        req: Request<pb::CloseConsultationRequest>,
    ) -> Result<Response<pb::CloseConsultationResponse>, Status> {
        let c = caller(&req)?;
        let r = req.into_inner();
        let consultation = self
            .desk
            .close(&c, &r.consultation_id, &r.resolution)
            .await?;
        Ok(Response::new(pb::CloseConsultationResponse {
            consultation: Some(consultation),
        }))
    }
}
