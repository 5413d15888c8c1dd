//! The Switchboard messaging service: conversations, durable history and the real-time
//! `Connect` stream (and `Subscribe`, its server-streaming twin for browsers), with every
//! guarantee holding whichever instance a client reaches.
//!
//! How a message travels: [`domain::Messaging::send`] hands it to the store's one atomic
//! step ([`store::MessagingStore::send`]: idempotency, membership, next seq, history append,
//! publish). Each instance holds one pub/sub connection; [`fanout`] decodes a published
//! message once, encodes its frame once, and puts a shared copy into the transport queue of
//! every local stream that is up to date; [`stream`] handles the rest (subscriptions,
//! history replay, gaps), so that every stream's deliveries are gapless and duplicate-free
//! by one rule ([`gapless`]), filling from history when pub/sub drops something. Tokens
//! are verified locally with auth's published keys.
//!
//! Where each rule lives:
//! - [`domain`]: conversations, membership, sends (rate limit, idempotency, retries),
//!   history pages, ListConversations' order and cursor, read positions, events;
//! - [`gapless`]: a stream's per-conversation cursor (next, duplicate, missing);
//! - [`support`]: the support desk in its own room (model, rules, routing, views, the
//!   agent directory); messaging's core knows it only through one hook
//!   ([`domain::SupportViews`]) and is bound by [`store::MessagingStore`] alone;
//! - [`store`]: the storage trait and its engines (`memory`, `redis`; the desk's parts in
//!   `store::desk`), one contract suite for both; how a conversation ranks in its members'
//!   lists ([`store::Ranked`]) and the per-user index that keeps a page's work to the
//!   page ([`store::redis`]);
//! - [`grpc`]: the thin tonic adapter; [`error`]: the one mapping to statuses.

pub mod clock;
pub mod config;
pub mod conversation;
pub mod directory;
pub mod domain;
pub mod error;
pub mod fanout;
pub mod gapless;
pub mod grpc;
pub mod message;
pub mod store;
pub mod stream;
pub mod support;

use std::sync::Arc;

use switchboard_common::backend::{Backend, Link};
use switchboard_common::server::{self, Assembly, AuthLayer};
use switchboard_common::shutdown::CancellationToken;
use switchboard_common::tune;
use switchboard_proto::messaging::v1::servers::messaging_service_server::MessagingServiceServer;
use switchboard_proto::messaging::v1::servers::support_service_server::SupportServiceServer;
use tokio::net::TcpListener;
use tonic::server::NamedService;

pub use config::{Args, Config};

use crate::domain::Messaging;
use crate::fanout::Hub;
use crate::grpc::{MessagingGrpc, SupportGrpc};
use crate::store::DeskStore;
use crate::stream::Streams;
use crate::support::Desk;
use crate::support::agents::PresenceAgents;

/// Serves messaging on `listener` until `shutdown` fires. `main` and the tests call this.
///
/// With the embedded engine in a process of its own, revocations are not shared with the
/// auth process, so logouts end streams only with Redis or inside `switchboard-server`,
/// where the services share one engine ([`run_on`]).
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let backend = Backend::start(&config.engine, &shutdown)?;
    run_on(config, listener, shutdown, backend).await
}

/// Like [`run`], on a `backend` this process may share with other services (the
/// one-process `switchboard-server`); `config.engine` is not consulted.
pub async fn run_on(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
    backend: Backend,
) -> anyhow::Result<()> {
    match &backend.link {
        Link::Memory(bus) => {
            let store = Arc::new(store::memory::MemoryStore::new(
                bus.clone(),
                config.history_retention,
            ));
            serve(config, listener, shutdown, store, backend).await
        }
        Link::Redis(conn) => {
            let store = Arc::new(
                store::redis::RedisStore::new(conn.clone(), config.history_retention)
                    .with_ack(config.ack_replicas),
            );
            // Lists written by builds before the cluster engine move to their new names.
            let (migrating, stop) = (store.clone(), shutdown.clone());
            switchboard_common::shutdown::spawn(async move {
                let moved = tokio::select! {
                    _ = stop.cancelled() => return,
                    m = migrating.migrate_user_lists() => m,
                };
                match moved {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(lists = n, "moved user lists to their tagged names"),
                    Err(e) => {
                        tracing::warn!(error = %e, "moving user lists to their tagged names failed; it runs again at the next start")
                    }
                }
            });
            serve(config, listener, shutdown, store, backend).await
        }
    }
}

async fn serve<S: DeskStore>(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
    store: Arc<S>,
    backend: Backend,
) -> anyhow::Result<()> {
    let verifier = backend.remote_verifier(&config.auth_url, &shutdown).await?;

    let users = Arc::new(directory::AuthDirectory::new(&config.auth_url)?);
    // The desk's one hook into messaging: SUPPORT conversations' views carry their
    // consultation.
    let messaging = Arc::new(
        Messaging::new(
            store.clone(),
            config.send_limit,
            config.max_group_members,
            users,
        )
        .with_support(Arc::new(support::views::Views(store.clone()))),
    );
    if config.service_token.is_none() {
        tracing::warn!(
            "SERVICE_TOKEN is unset: the support desk cannot ask presence for agents, so consultations wait until an agent accepts one"
        );
    }
    let presence = Arc::new(PresenceAgents::new(
        &config.presence_url,
        config.service_token.clone(),
    )?);
    let desk = Arc::new(Desk::new(
        messaging.clone(),
        presence,
        config.agent_capacity,
    ));
    switchboard_common::shutdown::spawn(
        desk.clone()
            .repair_every(config.queue_recheck, shutdown.clone()),
    );
    // Routing needs presence, which needs the token: without it there is nothing to run.
    if config.service_token.is_some() {
        switchboard_common::shutdown::spawn(
            desk.clone()
                .dispatch(config.queue_recheck, shutdown.clone()),
        );
    }
    // Ended by the server once health reports NOT_SERVING at shutdown.
    let drain = CancellationToken::new();
    let streams = Arc::new(Streams {
        messaging,
        hub: Hub::new(backend.bus.clone(), store),
        verifier: verifier.clone(),
        queue: config.outbound_queue,
        shutdown: drain.clone(),
        per_user: switchboard_common::limits::PerUser::new(config.max_streams_per_user),
        max_age: config.max_stream_age,
        keepalive: config.stream_keepalive,
    });
    let mut routes = tonic::service::Routes::builder();
    routes.add_service(tune!(
        MessagingServiceServer::new(MessagingGrpc::new(streams)),
        config.server
    ));
    routes.add_service(tune!(
        SupportServiceServer::new(SupportGrpc::new(desk)),
        config.server
    ));
    let assembly = Assembly {
        routes: routes.routes(),
        service_names: vec![
            <MessagingServiceServer<MessagingGrpc<S>> as NamedService>::NAME,
            <SupportServiceServer<SupportGrpc<S>> as NamedService>::NAME,
        ],
        auth: AuthLayer::new(verifier, &[]),
        long_lived: &["/switchboard.messaging.v1.MessagingService/Connect"],
        // A cancelled Connect and a half-closed one end the same way here.
        cancel_aware: &[],
        drain,
    };
    server::serve(&config.server, listener, shutdown, assembly).await
}
