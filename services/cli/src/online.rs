//! Being online while `chat` runs: one presence device session, kept open (and reopened
//! after a drop) for as long as the chat or the agent console runs. Presence being
//! unreachable never stops a chat; the user is told they appear offline.

use std::time::Duration;

use switchboard_proto::presence::v1 as presence_pb;
use switchboard_proto::presence::v1::presence_service_client::PresenceServiceClient;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::keyboard::say;
use super::{Client, authed, channel};

/// How long presence may take to confirm the state of a new session.
const CONFIRM: Duration = Duration::from_secs(5);

/// The device session, if it is up.
struct Device {
    tx: mpsc::Sender<presence_pb::ConnectRequest>,
    rx: tonic::Streaming<presence_pb::ConnectResponse>,
}

/// A presence session that heals itself.
pub(crate) struct Online {
    presence: String,
    state: presence_pb::PresenceState,
    device: Option<Device>,
    retry_at: Instant,
    backoff: Duration,
}

impl Online {
    /// Goes online in `state` (or says why it cannot, and keeps trying).
    pub(crate) async fn start(
        client: &Client,
        token: &str,
        state: presence_pb::PresenceState,
    ) -> Self {
        let mut online = Self {
            presence: client.presence.clone(),
            state,
            device: None,
            retry_at: Instant::now(),
            backoff: Duration::from_secs(1),
        };
        online.heal(token).await;
        online
    }

    /// Changes the state (kept across reconnects).
    pub(crate) async fn set(&mut self, state: presence_pb::PresenceState) {
        self.state = state;
        if let Some(d) = &self.device {
            let _ = d.tx.send(set_state(state)).await;
        }
    }

    /// Resolves when the session needs [`Online::heal`]: it dropped, or it is time to try
    /// again. Cancel-safe (for `select!`).
    pub(crate) async fn needs_healing(&mut self) {
        match &mut self.device {
            Some(d) => while let Ok(Some(_)) = d.rx.message().await {},
            None => tokio::time::sleep_until(self.retry_at).await,
        }
    }

    /// Reopens the session if it is down (with `token`, which may be fresher).
    pub(crate) async fn heal(&mut self, token: &str) {
        let was_up = self.device.take().is_some();
        match self.open(token).await {
            Ok(d) => {
                if was_up || self.backoff > Duration::from_secs(1) {
                    say!("(online again)");
                }
                self.device = Some(d);
                self.backoff = Duration::from_secs(1);
            }
            Err(e) => {
                if was_up || self.backoff == Duration::from_secs(1) {
                    say!("(presence unreachable: {e}; you appear offline, retrying)");
                }
                self.retry_at = Instant::now() + self.backoff;
                self.backoff = (self.backoff * 2).min(Duration::from_secs(30));
            }
        }
    }

    async fn open(&self, token: &str) -> Result<Device, String> {
        let (tx, rx) = mpsc::channel(8);
        let request = authed(tokio_stream::wrappers::ReceiverStream::new(rx), token)
            .map_err(|e| e.to_string())?;
        let channel = channel(&self.presence).map_err(|e| e.to_string())?;
        let mut stream = PresenceServiceClient::new(channel)
            .connect(request)
            .await
            .map_err(|s| s.message().to_owned())?
            .into_inner();
        let _ = tx.send(set_state(self.state)).await;
        // Online once presence echoes the state (others see it from then on).
        let echoed = tokio::time::timeout(CONFIRM, async {
            loop {
                match stream.message().await {
                    Ok(Some(presence_pb::ConnectResponse {
                        frame: Some(presence_pb::connect_response::Frame::Presence(_)),
                    })) => return Ok(()),
                    Ok(Some(_)) => continue,
                    Ok(None) => return Err("presence ended the session".to_owned()),
                    Err(s) => return Err(s.message().to_owned()),
                }
            }
        })
        .await
        .map_err(|_| format!("presence did not confirm within {CONFIRM:?}"))?;
        echoed?;
        Ok(Device { tx, rx: stream })
    }
}

fn set_state(state: presence_pb::PresenceState) -> presence_pb::ConnectRequest {
    let frame = presence_pb::connect_request::Frame::SetState(presence_pb::SetState {
        state: state as i32,
        custom_text: String::new(),
        device_name: "switchboard cli".into(),
    });
    presence_pb::ConnectRequest { frame: Some(frame) }
}
