//! The Switchboard auth service: accounts, sessions and the tokens every other service
//! verifies on its own.
//!
//! It owns users (argon2id password hashes, roles; guests, who have no password),
//! sessions (rotating refresh tokens with theft detection) and the Ed25519 keys that sign
//! access tokens. Other services never
//! call auth per request: they fetch the public keys once (`GetJwks`) and learn of
//! logouts over the revocation channel ([`switchboard_common::revocation`]).
//!
//! Layout: [`config`] → [`run`] wires a storage engine ([`store`]) into the rules
//! ([`domain`]), exposed over gRPC by the thin adapter in [`grpc`].

pub mod account;
pub mod config;
pub mod domain;
pub mod error;
pub mod grpc;
pub mod password;
pub mod signing;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use switchboard_common::backend::{Backend, Link};
use switchboard_common::server::{self, Assembly, AuthLayer};
use switchboard_common::shutdown::CancellationToken;
use switchboard_common::token::Verifier;
use switchboard_common::tune;
use switchboard_proto::auth::v1::auth_service_server::AuthServiceServer;
use tokio::net::TcpListener;
use tonic::server::NamedService;

pub use config::{Args, Config};

use crate::domain::{Auth, KEY_REPUBLISH, StoreKeys};
use crate::grpc::{AuthGrpc, PUBLIC_METHODS};
use crate::password::Hasher;
use crate::signing::Keyring;
use crate::store::AuthStore;
use crate::store::memory::MemoryStore;
use crate::store::redis::RedisStore;

/// Serves auth on `listener` until `shutdown` fires. `main` and the tests both call this.
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
        Link::Memory(_) => {
            serve(
                config,
                listener,
                shutdown,
                Arc::new(MemoryStore::new()),
                backend,
            )
            .await
        }
        Link::Redis(conn) => {
            let store = Arc::new(RedisStore::new(conn.clone()));
            serve(config, listener, shutdown, store, backend).await
        }
    }
}

async fn serve<S: AuthStore>(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
    store: Arc<S>,
    backend: Backend,
) -> anyhow::Result<()> {
    let hasher = Hasher::new(config.argon2, config.hash_concurrency, config.hash_queue)?;
    let access_ttl = config.access_ttl.as_secs();
    let keyring = match &config.signing_key_pem {
        Some(pem) => Keyring::from_pem(pem.expose(), access_ttl)?,
        None => Keyring::generate(access_ttl)?,
    };
    tracing::info!(kid = %keyring.public().kid, configured = config.signing_key_pem.is_some(), "signing key ready");
    let auth = Arc::new(Auth::new(
        store,
        hasher,
        keyring,
        backend.revocations.clone(),
        config.limits,
        config.refresh_ttl,
        config.guest_ttl,
    ));

    // A first-admin conflict stops the service: serving on would leave no admin, or worse.
    let (fatal_tx, fatal) = tokio::sync::oneshot::channel();
    switchboard_common::shutdown::spawn(maintain(
        auth.clone(),
        config.admin.clone(),
        shutdown.clone(),
        fatal_tx,
    ));

    let list = backend.follow_revocations(&shutdown).await;
    let verifier = Arc::new(Verifier::new(Arc::new(StoreKeys(auth.clone())), list));

    let mut routes = tonic::service::Routes::builder();
    routes.add_service(tune!(
        AuthServiceServer::new(AuthGrpc::new(auth)),
        config.server
    ));
    let assembly = Assembly {
        routes: routes.routes(),
        service_names: vec![<AuthServiceServer<AuthGrpc<S>> as NamedService>::NAME],
        auth: AuthLayer::new(verifier, PUBLIC_METHODS),
        long_lived: &[],
        cancel_aware: &[],
        drain: CancellationToken::new(),
    };
    tokio::select! {
        served = server::serve(&config.server, listener, shutdown, assembly) => served,
        Ok(e) = fatal => {
            tracing::error!(error = %e, "cannot start");
            Err(anyhow::anyhow!(e))
        }
    }
}

/// Keeps the public key published and makes sure the first admin exists, retrying while
/// the store is unreachable.
async fn maintain<S: AuthStore>(
    auth: Arc<Auth<S>>,
    admin: Option<(String, switchboard_common::config::Secret)>,
    shutdown: CancellationToken,
    fatal: tokio::sync::oneshot::Sender<error::Error>,
) {
    let mut admin = admin;
    loop {
        let mut healthy = true;
        if let Err(e) = auth.publish_key().await {
            tracing::warn!(error = %e, "cannot publish the signing key; retrying");
            healthy = false;
        }
        if let Some((name, password)) = &admin {
            match auth.ensure_admin(name, password.expose()).await {
                Ok(()) => {
                    tracing::info!(username = %name, "first admin ready");
                    admin = None;
                }
                Err(e @ error::Error::AdminNameTaken(_)) => {
                    let _ = fatal.send(e);
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot create the first admin; retrying");
                    healthy = false;
                }
            }
        }
        let wait = if healthy {
            KEY_REPUBLISH
        } else {
            Duration::from_secs(1)
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}
