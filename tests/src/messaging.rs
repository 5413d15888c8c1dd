//! Helpers for messaging tests: a Connect stream client with typed frame helpers.

use std::time::Duration;

use anyhow::{Context, bail};
use switchboard_proto::messaging::v1 as pb;
use switchboard_proto::messaging::v1::connect_request::Frame as In;
use switchboard_proto::messaging::v1::connect_response::Frame as Out;
use switchboard_proto::messaging::v1::messaging_service_client::MessagingServiceClient;
use tokio::sync::mpsc;
use tonic::Streaming;
use tonic::transport::Channel;

use crate::auth::authed;

/// An open Connect stream.
pub struct Connection {
    tx: mpsc::Sender<pb::ConnectRequest>,
    rx: Streaming<pb::ConnectResponse>,
}

impl Connection {
    /// Opens a stream on `channel` with `token`.
    pub async fn open(channel: Channel, token: &str) -> anyhow::Result<Self> {
        let (tx, rx) = mpsc::channel(64);
        let outbound = tokio_stream::wrappers::ReceiverStream::new(rx);
        let mut client =
            MessagingServiceClient::new(channel).max_decoding_message_size(64 * 1024 * 1024);
        let rx = client.connect(authed(outbound, token)).await?.into_inner();
        Ok(Self { tx, rx })
    }

    /// Opens a stream on `channel` with `token`, subscribed to `conversation` from the
    /// start, once its history replay is over.
    pub async fn following(
        channel: Channel,
        token: &str,
        conversation: &str,
    ) -> anyhow::Result<Self> {
        let mut conn = Self::open(channel, token).await?;
        conn.subscribe(conversation, 0).await?;
        conn.recovered(conversation).await?;
        Ok(conn)
    }

    /// Sends a client frame.
    pub async fn send(&self, frame: In) -> anyhow::Result<()> {
        self.tx
            .send(pb::ConnectRequest { frame: Some(frame) })
            .await
            .context("stream closed")
    }

    /// Sends an empty (malformed) frame.
    pub async fn send_empty(&self) -> anyhow::Result<()> {
        self.tx
            .send(pb::ConnectRequest { frame: None })
            .await
            .context("stream closed")
    }

    /// Subscribes to `conversation` after `since`.
    pub async fn subscribe(&self, conversation: &str, since: u64) -> anyhow::Result<()> {
        self.send(In::Subscribe(pb::Subscribe {
            conversation_id: conversation.into(),
            since_seq: since,
            ..Default::default()
        }))
        .await
    }

    /// The next server frame within `limit`: `Ok(None)` when the stream ended cleanly,
    /// `Err` with the status when it ended with one.
    pub async fn next(&mut self, limit: Duration) -> Result<Option<Out>, tonic::Status> {
        match tokio::time::timeout(limit, self.rx.message()).await {
            Ok(Ok(Some(r))) => Ok(r.frame),
            Ok(Ok(None)) => Ok(None),
            Ok(Err(status)) => Err(status),
            Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                "no frame within {limit:?}"
            ))),
        }
    }

    /// Reads frames until the stream ends and returns its status (see [`crate::ended`]).
    pub async fn ended(&mut self, limit: Duration) -> tonic::Status {
        crate::ended(&mut self.rx, limit).await
    }

    /// Skips frames until one matches `pick`, within `limit` in all.
    pub async fn until<T>(
        &mut self,
        limit: Duration,
        mut pick: impl FnMut(Out) -> Option<T>,
    ) -> anyhow::Result<T> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Ok(Some(frame)) => {
                    if let Some(v) = pick(frame) {
                        return Ok(v);
                    }
                }
                Ok(None) => bail!("stream ended"),
                Err(s) => bail!("stream failed: {s:?}"),
            }
        }
    }

    /// Waits for the Recovered frame of `conversation` (after a Subscribe).
    pub async fn recovered(&mut self, conversation: &str) -> anyhow::Result<pb::Recovered> {
        let c = conversation.to_owned();
        self.until(Duration::from_secs(10), |f| match f {
            Out::Recovered(r) if r.conversation_id == c => Some(r),
            _ => None,
        })
        .await
    }
}

/// Creates a group of `members` owned by the caller of `token`.
pub async fn create_group(
    client: &mut MessagingServiceClient<Channel>,
    token: &str,
    title: &str,
    members: &[String],
) -> anyhow::Result<pb::Conversation> {
    let req = pb::CreateConversationRequest {
        kind: pb::ConversationKind::Group as i32,
        title: title.into(),
        member_ids: members.to_vec(),
    };
    client
        .create_conversation(authed(req, token))
        .await?
        .into_inner()
        .conversation
        .context("no conversation")
}

/// Sends a message with the unary RPC.
pub async fn send(
    client: &mut MessagingServiceClient<Channel>,
    token: &str,
    conversation: &str,
    client_msg_id: &str,
    body: &str,
) -> Result<pb::Message, tonic::Status> {
    let req = pb::SendMessageRequest {
        conversation_id: conversation.into(),
        client_msg_id: client_msg_id.into(),
        body: body.into(),
        metadata: Default::default(),
    };
    Ok(client
        .send_message(authed(req, token))
        .await?
        .into_inner()
        .message
        .unwrap_or_default())
}
