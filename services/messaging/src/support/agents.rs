//! Where the support desk learns which agents can take consultations: the
//! [`AgentDirectory`] trait, and its implementation over the presence service
//! ([`PresenceAgents`]: `ListOnline`, `Get` and a `Watch` by role, with the service token).
//! The desk's rules depend only on the trait, so they are tested without processes.

use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use switchboard_common::config::Secret;
use switchboard_common::rpc::Traced;
use switchboard_common::server::SERVICE_TOKEN_HEADER;
use switchboard_proto::auth::v1 as auth_pb;
use switchboard_proto::presence::v1 as presence_pb;
use switchboard_proto::presence::v1::presence_service_client::PresenceServiceClient;
use tonic::transport::Channel;

use crate::error::{Dependency, Error, Result};

/// The agents the desk may route to.
pub trait AgentDirectory: Send + Sync + 'static {
    /// Agents online and AVAILABLE now, by id.
    fn available(&self) -> BoxFuture<'_, Result<Vec<String>>>;
    /// Whether `user` is an agent with a live session (whatever its state).
    fn is_online<'a>(&'a self, user: &'a str) -> BoxFuture<'a, Result<bool>>;
    /// A stream with an item whenever an agent may have become available (and one at the
    /// start); it ends when the source does, and the desk watches again.
    fn watch(&self) -> BoxFuture<'_, Result<BoxStream<'static, ()>>>;
}

/// The presence service as the desk uses it, authenticated with the service token.
#[derive(Clone)]
pub struct PresenceAgents {
    client: PresenceServiceClient<Traced<Channel>>,
    token: Option<Secret>,
}

impl PresenceAgents {
    /// A lazily connected client of the presence service at `url`; its calls are client
    /// spans of the desk operation that made them.
    pub fn new(url: &str, token: Option<Secret>) -> Result<Self> {
        let channel = switchboard_common::rpc::lazy_channel(url, Some(Duration::from_secs(5)))
            .map_err(|e| Error::Internal(format!("presence url {url}: {e}")))?;
        Ok(Self {
            client: PresenceServiceClient::new(Traced::new(
                channel,
                &["/switchboard.presence.v1.PresenceService/Watch"],
            )),
            token,
        })
    }

    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        if let Some(value) = self.token.as_ref().and_then(|t| t.expose().parse().ok()) {
            req.metadata_mut().insert(SERVICE_TOKEN_HEADER, value);
        }
        req
    }

    fn unavailable(status: tonic::Status) -> Error {
        Error::Unavailable {
            dependency: Dependency::Presence,
            cause: format!("presence: {:?}: {}", status.code(), status.message()),
        }
    }

    async fn available_agents(&self) -> Result<Vec<String>> {
        let reply = self
            .client
            .clone()
            .list_online(self.request(presence_pb::ListOnlineRequest {
                role: auth_pb::Role::Agent as i32,
                state: presence_pb::PresenceState::Available as i32,
            }))
            .await
            .map_err(Self::unavailable)?;
        Ok(reply
            .into_inner()
            .users
            .into_iter()
            .map(|u| u.user_id)
            .collect())
    }

    async fn is_online_agent(&self, user: &str) -> Result<bool> {
        let reply = self
            .client
            .clone()
            .get(self.request(presence_pb::GetRequest {
                user_ids: vec![user.to_owned()],
            }))
            .await
            .map_err(Self::unavailable)?;
        Ok(reply.into_inner().presences.iter().any(|p| {
            p.user_id == user
                && p.role == auth_pb::Role::Agent as i32
                && p.state != presence_pb::PresenceState::Offline as i32
        }))
    }

    /// Every change of every agent, starting with a snapshot of the online ones.
    async fn watch_agents(&self) -> Result<tonic::Streaming<presence_pb::WatchResponse>> {
        // Watch is a stream: no overall deadline.
        let mut req = self.request(presence_pb::WatchRequest {
            user_ids: Vec::new(),
            role: auth_pb::Role::Agent as i32,
        });
        req.set_timeout(Duration::from_secs(24 * 3600));
        Ok(self
            .client
            .clone()
            .watch(req)
            .await
            .map_err(Self::unavailable)?
            .into_inner())
    }
}

impl AgentDirectory for PresenceAgents {
    fn available(&self) -> BoxFuture<'_, Result<Vec<String>>> {
        Box::pin(self.available_agents())
    }

    fn is_online<'a>(&'a self, user: &'a str) -> BoxFuture<'a, Result<bool>> {
        Box::pin(self.is_online_agent(user))
    }

    fn watch(&self) -> BoxFuture<'_, Result<BoxStream<'static, ()>>> {
        Box::pin(async move {
            let stream = self.watch_agents().await?;
            // A snapshot (the start) or a change to AVAILABLE may let routing assign.
            let wakes = stream
                .take_while(|m| futures::future::ready(m.is_ok()))
                .filter_map(|m| {
                    let wake = match m {
                        Ok(presence_pb::WatchResponse { event: Some(e) }) => match e {
                            presence_pb::watch_response::Event::Snapshot(_) => true,
                            presence_pb::watch_response::Event::Change(p) => {
                                p.state == presence_pb::PresenceState::Available as i32
                            }
                        },
                        _ => false,
                    };
                    futures::future::ready(wake.then_some(()))
                });
            Ok(wakes.boxed())
        })
    }
}
