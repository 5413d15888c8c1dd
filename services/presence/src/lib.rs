//! The Switchboard presence service: who is online, on how many devices, in which state,
//! and when they were last seen, across every instance.
//!
//! A device is online while its `Connect` stream is open; the serving instance keeps the
//! session's expiry fresh, so sessions of a crashed instance expire after the TTL and are
//! removed by a sweep that every instance runs ([`store::PresenceStore::sweep`], safe when
//! several run at once). Each change is published on the user's channel with a version,
//! so `Watch` on any instance sees changes made anywhere, in order. A device session's
//! rules (online, damped for the reconnect grace when its stream breaks, offline) are in
//! [`session`], and a watch's (subscribe before the snapshot, each version once, re-read
//! after a gap) in [`watch`]: plain Rust over the store, tested without processes.

pub mod config;
pub mod error;
pub mod grpc;
pub mod model;
pub mod session;
pub mod store;
pub mod watch;

use std::sync::Arc;

use switchboard_common::backend::{Backend, Link};
use switchboard_common::server::{self, Assembly, AuthLayer};
use switchboard_common::shutdown::CancellationToken;
use switchboard_common::tune;
use switchboard_proto::presence::v1::presence_service_server::PresenceServiceServer;
use tokio::net::TcpListener;
use tonic::server::NamedService;

pub use config::{Args, Config};

use crate::grpc::{PresenceGrpc, now_ms};
use crate::store::PresenceStore;

/// Serves presence on `listener` until `shutdown` fires. `main` and the tests call this.
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
            let store = Arc::new(store::memory::MemoryStore::new(bus.clone()));
            serve(config, listener, shutdown, store, backend).await
        }
        Link::Redis(conn) => {
            let store = Arc::new(store::redis::RedisStore::new(conn.clone()));
            serve(config, listener, shutdown, store, backend).await
        }
    }
}

async fn serve<S: PresenceStore>(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
    store: Arc<S>,
    backend: Backend,
) -> anyhow::Result<()> {
    let verifier = backend.remote_verifier(&config.auth_url, &shutdown).await?;
    switchboard_common::shutdown::spawn(sweep(
        store.clone(),
        config.sweep_interval,
        shutdown.clone(),
    ));

    // Ended by the server once health reports NOT_SERVING at shutdown.
    let drain = CancellationToken::new();
    let service = PresenceGrpc::new(
        store,
        backend.bus.clone(),
        config.ttl,
        config.reconnect_grace,
        drain.clone(),
        verifier.revocations().clone(),
        switchboard_common::limits::PerUser::new(config.max_streams_per_user),
    );
    let mut routes = tonic::service::Routes::builder();
    routes.add_service(tune!(PresenceServiceServer::new(service), config.server));
    let assembly = Assembly {
        routes: routes.routes(),
        service_names: vec![<PresenceServiceServer<PresenceGrpc<S>> as NamedService>::NAME],
        auth: AuthLayer::new(verifier, &[]).accepting_service_token(config.service_token.clone()),
        long_lived: &[
            "/switchboard.presence.v1.PresenceService/Connect",
            "/switchboard.presence.v1.PresenceService/Watch",
        ],
        // A cancelled device stream lingers for the grace; a half-closed one does not.
        cancel_aware: &["/switchboard.presence.v1.PresenceService/Connect"],
        drain,
    };
    server::serve(&config.server, listener, shutdown, assembly).await
}

/// Removes expired sessions every `interval` until shutdown.
async fn sweep<S: PresenceStore>(
    store: Arc<S>,
    interval: std::time::Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match store.sweep(now_ms(), 1000).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(expired = n, "swept expired presence sessions"),
            Err(e) => tracing::warn!(error = %e, "presence sweep failed"),
        }
    }
}
