//! The Redis connection every store uses: one node (`REDIS_URL`) or a Redis Cluster
//! (`REDIS_CLUSTER_URLS`), behind one type that runs commands, pipelines and scripts
//! alike. Both connect lazily and reconnect by themselves, with timeouts, so a dead Redis
//! turns into prompt errors (UNAVAILABLE), not hung calls.
//!
//! On a cluster, a command or a script goes to the node owning its keys' slot (the keys of
//! one script or transaction must share one slot: every key is hash-tagged by the entity
//! that owns it), and a pipeline's commands go each to their own node.

use std::collections::HashMap;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::Slot;
use redis::{Cmd, Pipeline, RedisFuture, Value};

/// How long connecting to a node may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one reply may take.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(3);

/// A connection to one Redis or to a Redis Cluster; clones share it.
#[derive(Clone)]
pub enum RedisConn {
    /// One node, through a reconnecting connection manager.
    Node(ConnectionManager),
    /// A cluster, through a connection per node that follows the slot map.
    Cluster(ClusterConnection),
}

impl RedisConn {
    /// Whether this is a cluster (pub/sub is then sharded: `SPUBLISH`).
    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }

    /// The publish command for this deployment: `SPUBLISH` on a cluster (delivered by the
    /// channel's shard only), `PUBLISH` on one node.
    pub fn publish_command(&self) -> &'static str {
        if self.is_cluster() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        }
    }
}

/// A lazily connecting, reconnecting connection to the Redis of `client`.
pub fn node(client: &redis::Client) -> redis::RedisResult<RedisConn> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(1));
    Ok(RedisConn::Node(ConnectionManager::new_lazy_with_config(
        client.clone(),
        config,
    )?))
}

/// A cluster client for the seed nodes `urls` (passwords and TLS as in each URL), with
/// the timeouts every store uses; `builder` adds to it (the bus adds its push sender).
pub fn cluster_builder(urls: &[String]) -> ClusterClientBuilder {
    ClusterClientBuilder::new(urls.to_vec())
        .connection_timeout(CONNECT_TIMEOUT)
        .response_timeout(RESPONSE_TIMEOUT)
        .retries(3)
}

/// A lazily connecting connection to the cluster seeded by `urls`.
pub fn cluster(urls: &[String]) -> redis::RedisResult<RedisConn> {
    let client = cluster_builder(urls).build()?;
    let config = redis::cluster::ClusterConfig::new()
        .set_connection_timeout(CONNECT_TIMEOUT)
        .set_response_timeout(RESPONSE_TIMEOUT);
    Ok(RedisConn::Cluster(
        client.get_pending_async_connection_with_config(config),
    ))
}

/// Commands on keys of any slots, sent together: one pipeline on one node; on a cluster
/// (whose pipelines must stay within one slot), one pipeline per slot, all at once.
/// Replies come back in the order the commands were added. Not atomic: use a script or a
/// transaction on one slot for that.
#[derive(Default)]
pub struct Batch {
    cmds: Vec<(Vec<u8>, redis::Cmd)>,
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `cmd`, routed on a cluster by `key` (its key, or its channel for a publish).
    pub fn add(&mut self, key: impl AsRef<[u8]>, cmd: redis::Cmd) -> &mut Self {
        self.cmds.push((key.as_ref().to_vec(), cmd));
        self
    }

    /// How many commands it holds.
    pub fn len(&self) -> usize {
        self.cmds.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.cmds.is_empty()
    }

    /// [`run`](Self::run), each reply read as a `T`.
    pub async fn run_as<T: redis::FromRedisValue>(
        self,
        conn: &RedisConn,
    ) -> redis::RedisResult<Vec<T>> {
        self.run(conn)
            .await?
            .into_iter()
            .map(|v| redis::from_redis_value(v).map_err(redis::RedisError::from))
            .collect()
    }

    /// Sends every command; one reply per command, in order.
    pub async fn run(self, conn: &RedisConn) -> redis::RedisResult<Vec<Value>> {
        if self.cmds.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = conn.clone();
        if !conn.is_cluster() {
            let mut pipe = redis::pipe();
            for (_, cmd) in &self.cmds {
                pipe.add_command(cmd.clone());
            }
            return pipe.query_async(&mut conn).await;
        }
        let mut by_slot: HashMap<Slot, Vec<usize>> = HashMap::new();
        for (i, (key, _)) in self.cmds.iter().enumerate() {
            by_slot.entry(Slot::for_key(key)).or_default().push(i);
        }
        let groups: Vec<Vec<usize>> = by_slot.into_values().collect();
        let replies = futures::future::try_join_all(groups.iter().map(|indices| {
            let mut pipe = redis::pipe();
            for &i in indices {
                pipe.add_command(self.cmds[i].1.clone());
            }
            let mut conn = conn.clone();
            async move { pipe.query_async::<Vec<Value>>(&mut conn).await }
        }))
        .await?;
        let mut out: Vec<Option<Value>> = vec![None; self.cmds.len()];
        for (indices, values) in groups.iter().zip(replies) {
            for (&i, v) in indices.iter().zip(values) {
                out[i] = Some(v);
            }
        }
        out.into_iter()
            .map(|v| {
                v.ok_or_else(|| {
                    redis::RedisError::from((
                        redis::ErrorKind::Client,
                        "a pipeline answered fewer replies than commands",
                    ))
                })
            })
            .collect()
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Node(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Node(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Node(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}
