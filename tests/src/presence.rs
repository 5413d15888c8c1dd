//! Helpers for presence in tests: a device session on `Connect`.

use std::time::Duration;

use switchboard_proto::presence::v1 as pb;
use switchboard_proto::presence::v1::presence_service_client::PresenceServiceClient;
use tokio::sync::mpsc;
use tonic::Streaming;
use tonic::transport::Channel;

use crate::auth::authed;

/// A device session: the request sender and the response stream.
pub struct Device {
    /// Client frames.
    pub tx: mpsc::Sender<pb::ConnectRequest>,
    /// Server frames (after Connected).
    pub rx: Streaming<pb::ConnectResponse>,
}

/// Opens a device session and waits for its Connected frame (panics on failure).
pub async fn connect(channel: Channel, token: &str) -> Device {
    let (tx, rx) = mpsc::channel(8);
    let mut client = PresenceServiceClient::new(channel);
    let mut stream = client
        .connect(authed(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            token,
        ))
        .await
        .unwrap_or_else(|e| panic!("presence connect: {e}"));
    let first = tokio::time::timeout(Duration::from_secs(5), stream.get_mut().message())
        .await
        .unwrap_or_else(|_| panic!("no Connected frame within 5 s"))
        .unwrap_or_else(|e| panic!("presence stream: {e}"));
    assert!(
        matches!(
            first.and_then(|f| f.frame),
            Some(pb::connect_response::Frame::Connected(_))
        ),
        "the first frame is Connected"
    );
    Device {
        tx,
        rx: stream.into_inner(),
    }
}

impl Device {
    /// Ends the stream cleanly (half-close) and waits for the server to finish it.
    pub async fn close(self) {
        let Device { tx, mut rx } = self;
        drop(tx);
        let drained = tokio::time::timeout(Duration::from_secs(5), async {
            while let Ok(Some(_)) = rx.message().await {}
        })
        .await;
        assert!(
            drained.is_ok(),
            "the server did not end a half-closed stream"
        );
    }

    /// Sets the device's state and custom text.
    pub async fn set(&self, state: pb::PresenceState, text: &str) {
        let set = pb::SetState {
            state: state as i32,
            custom_text: text.into(),
            device_name: String::new(),
        };
        self.tx
            .send(pb::ConnectRequest {
                frame: Some(pb::connect_request::Frame::SetState(set)),
            })
            .await
            .unwrap_or_else(|e| panic!("presence stream closed: {e}"));
    }

    /// Waits until the server echoes the device's presence in `state`.
    pub async fn echoed(&mut self, state: pb::PresenceState) {
        let seen = tokio::time::timeout(Duration::from_secs(5), async {
            while let Ok(Some(r)) = self.rx.message().await {
                if let Some(pb::connect_response::Frame::Presence(p)) = r.frame
                    && p.state == state as i32
                {
                    return true;
                }
            }
            false
        })
        .await;
        assert_eq!(seen, Ok(true), "the device never became {state:?}");
    }
}

/// Opens a `Session` stream (Connect's server-streaming twin) in `state` and waits for
/// its Connected frame: the session's id and the rest of the stream.
pub async fn session(
    channel: Channel,
    token: &str,
    state: pb::SetState,
) -> Result<(String, Streaming<pb::ConnectResponse>), tonic::Status> {
    let mut stream = PresenceServiceClient::new(channel)
        .session(authed(pb::SessionRequest { state: Some(state) }, token))
        .await?
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .map_err(|_| tonic::Status::deadline_exceeded("no Connected frame within 5 s"))??;
    match first.and_then(|f| f.frame) {
        Some(pb::connect_response::Frame::Connected(c)) => Ok((c.session_id, stream)),
        other => Err(tonic::Status::internal(format!(
            "the first frame is not Connected: {other:?}"
        ))),
    }
}
