//! The storage engine a service process runs on, set up once: the pub/sub bus, the
//! revocation store, and (with Redis) the shared connection the service's own store uses.
//!
//! Services hosted together in one process (`switchboard-server`) share one `Backend`, so
//! that with the embedded engine a logout, a presence change or a message published by one
//! service reaches the others exactly as it would through Redis.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::bus::{Bus, ClusterBus, MemoryBus, RedisBus};
use crate::config::Engine;
use crate::redis_conn::{self, RedisConn};
use crate::revocation::{
    self, MemoryRevocations, RedisRevocations, RevocationList, RevocationStore,
};
use crate::token::{GrpcKeySource, Verifier};

/// What a service's own store is built on.
#[derive(Clone)]
pub enum Link {
    /// The embedded engine; publishing goes to this in-process bus.
    Memory(MemoryBus),
    /// Redis (one node or a cluster) through this reconnecting connection.
    Redis(RedisConn),
}

/// The engine of one process; clones share it.
#[derive(Clone)]
pub struct Backend {
    /// Pub/sub between instances (or within the process).
    pub bus: Arc<dyn Bus>,
    /// Durable revocations.
    pub revocations: Arc<dyn RevocationStore>,
    /// For the service's own store.
    pub link: Link,
}

impl Backend {
    /// Connects (lazily) to the configured engine; background tasks stop with `shutdown`.
    pub fn start(engine: &Engine, shutdown: &CancellationToken) -> anyhow::Result<Self> {
        Ok(match engine {
            Engine::Memory => {
                let bus = MemoryBus::new();
                Self {
                    bus: Arc::new(bus.clone()),
                    revocations: Arc::new(MemoryRevocations::new(bus.clone())),
                    link: Link::Memory(bus),
                }
            }
            Engine::Redis(url) => {
                let client = redis::Client::open(url.expose())?;
                let conn = redis_conn::node(&client)?;
                Self {
                    bus: Arc::new(RedisBus::start(client, conn.clone(), shutdown.clone())),
                    revocations: Arc::new(RedisRevocations::new(conn.clone())),
                    link: Link::Redis(conn),
                }
            }
            Engine::RedisCluster(seeds) => {
                let seeds: Vec<String> = seeds.iter().map(|s| s.expose().to_owned()).collect();
                let conn = redis_conn::cluster(&seeds)?;
                Self {
                    bus: Arc::new(ClusterBus::start(&seeds, shutdown.clone())?),
                    revocations: Arc::new(RedisRevocations::new(conn.clone())),
                    link: Link::Redis(conn),
                }
            }
        })
    }

    /// A revocation list kept up to date for this process's token verifier (returns once
    /// the current revocations are loaded).
    pub async fn follow_revocations(&self, shutdown: &CancellationToken) -> Arc<RevocationList> {
        let list = Arc::new(RevocationList::default());
        revocation::follow(
            list.clone(),
            self.bus.clone(),
            self.revocations.clone(),
            shutdown.clone(),
        )
        .await;
        list
    }

    /// The token verifier of a service other than auth: keys fetched from the auth service
    /// at `auth_url` (connected lazily), revocations followed through this backend.
    pub async fn remote_verifier(
        &self,
        auth_url: &str,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Arc<Verifier>> {
        let list = self.follow_revocations(shutdown).await;
        let auth = crate::rpc::lazy_channel(auth_url, None)?;
        Ok(Arc::new(Verifier::new(
            Arc::new(GrpcKeySource::new(auth)),
            list,
        )))
    }
}
