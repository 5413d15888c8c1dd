//! Helpers for messaging tests: a Connect or Subscribe stream client with typed frame
//! helpers, over native gRPC or gRPC-Web (HTTP/1.1, as a browser sends it).

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

/// An open Connect stream, or a Subscribe stream (which takes no client frames).
pub struct Connection {
    tx: Option<mpsc::Sender<pb::ConnectRequest>>,
    rx: Streaming<pb::ConnectResponse>,
}

/// A messaging client speaking gRPC-Web over HTTP/1.1 to one address, as a browser's
/// connect-web transport does.
pub type WebClient = MessagingServiceClient<
    tonic_web::GrpcWebClientService<
        hyper_util::client::legacy::Client<
            hyper_util::client::legacy::connect::HttpConnector,
            tonic_web::GrpcWebCall<tonic::body::Body>,
        >,
    >,
>;

/// A [`WebClient`] for the server at `addr`.
pub fn web_client(addr: std::net::SocketAddr) -> anyhow::Result<WebClient> {
    let http1 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let origin = format!("http://{addr}").parse()?;
    Ok(
        MessagingServiceClient::with_origin(tonic_web::GrpcWebClientService::new(http1), origin)
            .max_decoding_message_size(64 * 1024 * 1024),
    )
}

/// A Subscribe entry for `conversation` after `since`.
pub fn from(conversation: &str, since: u64) -> pb::Subscribe {
    pb::Subscribe {
        conversation_id: conversation.into(),
        since_seq: since,
        ..Default::default()
    }
}

impl Connection {
    /// Opens a stream on `channel` with `token`.
    pub async fn open(channel: Channel, token: &str) -> anyhow::Result<Self> {
        let (tx, rx) = mpsc::channel(64);
        let outbound = tokio_stream::wrappers::ReceiverStream::new(rx);
        let mut client =
            MessagingServiceClient::new(channel).max_decoding_message_size(64 * 1024 * 1024);
        let rx = client.connect(authed(outbound, token)).await?.into_inner();
        Ok(Self { tx: Some(tx), rx })
    }

    /// Opens a Subscribe stream on `channel` with `token` holding `subscriptions`.
    pub async fn subscribed(
        channel: Channel,
        token: &str,
        subscriptions: Vec<pb::Subscribe>,
    ) -> Result<Self, tonic::Status> {
        let mut client =
            MessagingServiceClient::new(channel).max_decoding_message_size(64 * 1024 * 1024);
        let request = authed(pb::SubscribeRequest { subscriptions }, token);
        let rx = client.subscribe(request).await?.into_inner();
        Ok(Self { tx: None, rx })
    }

    /// [`subscribed`](Self::subscribed) over gRPC-Web (HTTP/1.1) to the server at `addr`.
    pub async fn subscribed_web(
        addr: std::net::SocketAddr,
        token: &str,
        subscriptions: Vec<pb::Subscribe>,
    ) -> Result<Self, tonic::Status> {
        let mut client = web_client(addr).map_err(|e| tonic::Status::internal(e.to_string()))?;
        let request = authed(pb::SubscribeRequest { subscriptions }, token);
        let rx = client.subscribe(request).await?.into_inner();
        Ok(Self { tx: None, rx })
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
        self.sender()?
            .send(pb::ConnectRequest { frame: Some(frame) })
            .await
            .context("stream closed")
    }

    /// Sends an empty (malformed) frame.
    pub async fn send_empty(&self) -> anyhow::Result<()> {
        self.sender()?
            .send(pb::ConnectRequest { frame: None })
            .await
            .context("stream closed")
    }

    fn sender(&self) -> anyhow::Result<&mpsc::Sender<pb::ConnectRequest>> {
        self.tx
            .as_ref()
            .context("a Subscribe stream takes no client frames")
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
