//! The Redis connection every store uses: one node (`REDIS_URL`) or a Redis Cluster
//! (`REDIS_CLUSTER_URLS`), behind one type that runs commands, pipelines and scripts
//! alike. Both connect lazily and reconnect by themselves, with timeouts, so a dead Redis
//! turns into prompt errors (UNAVAILABLE), not hung calls.
//!
//! On a cluster, a command or a script goes to the node owning its keys' slot (the keys of
//! one script or transaction must share one slot: every key is hash-tagged by the entity
//! that owns it), and a pipeline's commands go each to their own node.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, SingleNodeRoutingInfo, Slot, SlotAddr};
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
    /// A cluster, through a connection per node that follows the slot map, with the
    /// slots' masters as last read (for grouping a [`Batch`] by node).
    Cluster(ClusterConnection, Arc<Owners>),
}

impl RedisConn {
    /// The store connection over a cluster connection.
    pub fn on_cluster(conn: ClusterConnection) -> Self {
        Self::Cluster(conn, Arc::default())
    }

    /// For each key, the master serving it as last read (an index; `None` on one node,
    /// or while the masters are unknown), reading them first when the last read is old:
    /// keys with the same index can share one pipeline ([`pipeline_on`](Self::pipeline_on)).
    pub async fn masters_of(&self, keys: &[&[u8]]) -> Vec<Option<usize>> {
        let Self::Cluster(cluster, owners) = self else {
            return vec![None; keys.len()];
        };
        if !owners.is_fresh()
            && let Err(e) = owners.refresh(&mut cluster.clone()).await
        {
            tracing::debug!(error = %e, "cannot read the cluster's slots; grouping by slot");
        }
        owners.masters_of(keys)
    }

    /// Sends `pipe` (of `count` commands, on keys of any slots the master of `key`'s slot
    /// serves) to that master, as one pipeline; each command's reply as it came, errors
    /// included. A redirect makes the client send the whole pipeline again (so only
    /// commands safe to repeat belong here) and, if it keeps failing, an error: then
    /// [`forget_masters`](Self::forget_masters) and send by slot. On one node: the node.
    pub async fn pipeline_on(
        &self,
        pipe: Pipeline,
        count: usize,
        key: &[u8],
    ) -> redis::RedisResult<Vec<Value>> {
        match self {
            Self::Node(c) => c.clone().req_packed_commands(&pipe, 0, count).await,
            Self::Cluster(c, _) => {
                let route =
                    SingleNodeRoutingInfo::SpecificNode(Route::with_key(key, SlotAddr::Master));
                c.clone().route_pipeline(pipe, 0, count, route).await
            }
        }
    }

    /// Drops the masters last read, after a pipeline sent by them failed.
    pub fn forget_masters(&self) {
        if let Self::Cluster(_, owners) = self {
            owners.forget();
        }
    }

    /// Whether this is a cluster (pub/sub is then sharded: `SPUBLISH`).
    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(..))
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
    Ok(RedisConn::on_cluster(
        client.get_pending_async_connection_with_config(config),
    ))
}

/// Slots of a Redis Cluster.
const SLOTS: u16 = 16384;

/// How long a read of the slots' masters serves for grouping before it is read again.
const OWNERS_TTL: Duration = Duration::from_secs(5);

/// Which master serves each slot, as `CLUSTER SLOTS` said last: only to group a
/// [`Batch`]'s commands by node. The client's own slot map still routes every pipeline,
/// so a stale read costs a retry, never a command on the wrong node.
#[derive(Default)]
pub struct Owners {
    /// When it was read, and each slot's master (by the client's own slot routes, so a
    /// key's slot is computed by the client alone) as an index into the masters' ids.
    read: RwLock<Option<(Instant, HashMap<Route, usize>)>>,
}

impl Owners {
    /// The index of `slot`'s master, if the last read is fresh and covers it.
    /// Each key's master index, under one look at the last read; all `None` when it is
    /// missing or old.
    fn masters_of(&self, keys: &[&[u8]]) -> Vec<Option<usize>> {
        let read = self.read.read().ok();
        let fresh = read
            .as_ref()
            .and_then(|r| r.as_ref())
            .filter(|(at, _)| at.elapsed() <= OWNERS_TTL);
        keys.iter()
            .map(|k| {
                let (_, masters) = fresh?;
                masters
                    .get(&Route::with_slot(Slot::for_key(k), SlotAddr::Master))
                    .copied()
            })
            .collect()
    }

    fn is_fresh(&self) -> bool {
        self.read
            .read()
            .is_ok_and(|r| r.as_ref().is_some_and(|(at, _)| at.elapsed() <= OWNERS_TTL))
    }

    /// Forgets the last read (after a failed grouped pipeline).
    fn forget(&self) {
        if let Ok(mut read) = self.read.write() {
            *read = None;
        }
    }

    /// Reads the masters again (`CLUSTER SLOTS`: start, end, then the master's host, port
    /// and id first of each entry).
    async fn refresh(&self, conn: &mut ClusterConnection) -> redis::RedisResult<()> {
        let entries: Vec<Vec<Value>> = redis::cmd("CLUSTER").arg("SLOTS").query_async(conn).await?;
        let mut ids: Vec<String> = Vec::new();
        let mut masters: HashMap<Route, usize> = HashMap::with_capacity(SLOTS as usize);
        for entry in entries {
            let mut fields = entry.into_iter();
            let (Some(start), Some(end), Some(master)) =
                (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            let start: u16 = redis::from_redis_value(start).map_err(redis::RedisError::from)?;
            let end: u16 = redis::from_redis_value(end).map_err(redis::RedisError::from)?;
            let master: Vec<Value> =
                redis::from_redis_value(master).map_err(redis::RedisError::from)?;
            // host, port, id: the id names the node whatever address it announces.
            let Some(id) = master.into_iter().nth(2) else {
                continue;
            };
            let id: String = redis::from_redis_value(id).map_err(redis::RedisError::from)?;
            let node = match ids.iter().position(|known| *known == id) {
                Some(n) => n,
                None => {
                    ids.push(id);
                    ids.len() - 1
                }
            };
            for slot in start..=end.min(SLOTS - 1) {
                masters.insert(Route::new(slot, SlotAddr::Master), node);
            }
        }
        if let Ok(mut read) = self.read.write() {
            *read = Some((Instant::now(), masters));
        }
        Ok(())
    }
}

/// Commands on keys of any slots, sent together: one pipeline on one node; on a cluster
/// (whose pipelines the client keeps within one slot), one pipeline per master, routed to
/// it explicitly, all at once (one per slot while the masters are unknown, or for a group
/// that failed: a redirect during a slot move or a failover). Replies come back in the
/// order the commands were added. Not atomic (use a script or a transaction on one slot
/// for that), and a command may run twice when its group is sent again after a redirect:
/// only idempotent commands, reads or publishes belong in a batch.
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
        let keys: Vec<&[u8]> = self.cmds.iter().map(|(key, _)| key.as_slice()).collect();
        let masters = conn.masters_of(&keys).await;
        let mut by_node: HashMap<Group, Vec<usize>> = HashMap::new();
        for (i, (key, master)) in keys.iter().zip(masters).enumerate() {
            let group = match master {
                Some(node) => Group::Node(node),
                // Unknown masters only cost grouping: one pipeline per slot then.
                None => Group::Slot(Slot::for_key(key)),
            };
            by_node.entry(group).or_default().push(i);
        }
        let groups: Vec<Vec<usize>> = by_node.into_values().collect();
        let replies = futures::future::try_join_all(
            groups.iter().map(|indices| self.run_group(&conn, indices)),
        )
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

/// Where a batch's commands go together.
#[derive(Hash, PartialEq, Eq)]
enum Group {
    /// The master of this index in the last read.
    Node(usize),
    /// Whoever serves this slot.
    Slot(Slot),
}

impl Batch {
    /// One group of a cluster batch (`indices` into its commands): one pipeline routed to
    /// the master of its first command's slot; when that fails, one pipeline per slot,
    /// which the client routes and redirects by itself.
    async fn run_group(
        &self,
        conn: &RedisConn,
        indices: &[usize],
    ) -> redis::RedisResult<Vec<Value>> {
        let pipeline = |indices: &[usize]| {
            let mut pipe = redis::pipe();
            for &i in indices {
                pipe.add_command(self.cmds[i].1.clone());
            }
            pipe
        };
        let slot_of = |i: usize| Slot::for_key(&self.cmds[i].0);
        let Some(first) = indices.first().map(|&i| slot_of(i)) else {
            return Ok(Vec::new());
        };
        if indices.iter().all(|&i| slot_of(i) == first) {
            return pipeline(indices).query_async(&mut conn.clone()).await;
        }
        let grouped = conn
            .pipeline_on(pipeline(indices), indices.len(), &self.cmds[indices[0]].0)
            .await
            .and_then(|values| {
                values
                    .into_iter()
                    .map(|v| match v {
                        Value::ServerError(e) => Err(redis::RedisError::from(e)),
                        v => Ok(v),
                    })
                    .collect::<redis::RedisResult<Vec<Value>>>()
            });
        match grouped {
            Ok(values) if values.len() == indices.len() => return Ok(values),
            Ok(_) => conn.forget_masters(),
            Err(e) => {
                tracing::debug!(error = %e, "a batch's node pipeline failed; sending it by slot");
                conn.forget_masters();
            }
        }
        let mut by_slot: HashMap<Slot, Vec<usize>> = HashMap::new();
        for (at, &i) in indices.iter().enumerate() {
            by_slot.entry(slot_of(i)).or_default().push(at);
        }
        let slots: Vec<Vec<usize>> = by_slot.into_values().collect();
        let replies = futures::future::try_join_all(slots.iter().map(|ats| {
            let cmds: Vec<usize> = ats.iter().map(|&at| indices[at]).collect();
            let pipe = pipeline(&cmds);
            let mut conn = conn.clone();
            async move { pipe.query_async::<Vec<Value>>(&mut conn).await }
        }))
        .await?;
        let mut out: Vec<Value> = vec![Value::Nil; indices.len()];
        for (ats, values) in slots.iter().zip(replies) {
            for (&at, v) in ats.iter().zip(values) {
                out[at] = v;
            }
        }
        Ok(out)
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Node(c) => c.req_packed_command(cmd),
            Self::Cluster(c, _) => c.req_packed_command(cmd),
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
            Self::Cluster(c, _) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Node(c) => c.get_db(),
            Self::Cluster(c, _) => c.get_db(),
        }
    }
}
