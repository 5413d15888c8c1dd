//! Private `redis-server` processes for tests.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// A `redis-server` owned by one test; killed on drop.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    appendonly: bool,
    /// The cluster bus port, for a node of a Redis Cluster.
    cluster_port: Option<u16>,
}

impl RedisServer {
    /// Starts a server without persistence on a free loopback port.
    pub fn spawn() -> anyhow::Result<Self> {
        Self::spawn_with(false)
    }

    /// Starts a server; with `appendonly`, every write is in an AOF (fsync always), so a
    /// restart keeps acknowledged data.
    pub fn spawn_with(appendonly: bool) -> anyhow::Result<Self> {
        Self::spawn_node(appendonly, false)
    }

    /// Starts a server, as a Redis Cluster node (not yet in a cluster) if `cluster`.
    fn spawn_node(appendonly: bool, cluster: bool) -> anyhow::Result<Self> {
        let mut last = None;
        // The port is free when picked but may be taken before redis binds it; retry.
        for _ in 0..5 {
            let port = crate::free_port()?;
            let mut server = Self {
                child: None,
                port,
                dir: tempfile::tempdir()?,
                appendonly,
                cluster_port: if cluster {
                    Some(crate::free_port()?)
                } else {
                    None
                },
            };
            match server.start() {
                Ok(()) => return Ok(server),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("redis did not start")))
    }

    /// `redis://127.0.0.1:<port>/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server (SIGKILL) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and directory (after [`stop`](Self::stop)).
    pub fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::File::create(self.log_path())?;
        let mut cmd = Command::new("redis-server");
        cmd.args([
            "--port",
            &self.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--daemonize",
            "no",
        ])
        .args(["--dir", &self.dir.path().to_string_lossy()])
        .args(["--protected-mode", "no"]);
        if let Some(bus) = self.cluster_port {
            cmd.args(["--cluster-enabled", "yes"])
                .args(["--cluster-config-file", "nodes.conf"])
                .args(["--cluster-port", &bus.to_string()])
                .args(["--cluster-node-timeout", "1000"])
                // A replica takes over however long ago it last heard from its master: with
                // the default (10) an idle replica of a killed master may refuse to.
                .args(["--cluster-replica-validity-factor", "0"]);
        }
        if self.appendonly {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        let child = cmd
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .context("cannot start redis-server (is it installed? `make test` installs it)")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                bail!(
                    "redis-server exited with {status}: {}",
                    std::fs::read_to_string(self.log_path()).unwrap_or_default()
                );
            }
            if self.ping() {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.stop();
                bail!(
                    "redis-server on port {} did not answer PING within 10 s",
                    self.port
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Closes every pub/sub connection (`CLIENT KILL TYPE pubsub`): what subscribers see
    /// when Redis fails over or a network blip cuts them off.
    pub async fn kill_pubsub_clients(&self) -> anyhow::Result<()> {
        let client = redis::Client::open(self.url())?;
        let mut admin = client.get_multiplexed_async_connection().await?;
        let _: redis::Value = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("pubsub")
            .query_async(&mut admin)
            .await?;
        Ok(())
    }

    fn ping(&self) -> bool {
        self.connect(Duration::from_millis(200))
            .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
            .is_ok()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A Redis Cluster owned by one test: three masters with one replica each, on free
/// loopback ports; every node is killed on drop.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts six nodes and forms the cluster (`redis-cli --cluster create`), then waits
    /// until every node reports `cluster_state:ok` and knows all six.
    pub fn spawn() -> anyhow::Result<Self> {
        let cluster = Self::spawn_unformed()?;
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(cluster.addresses())
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .context("cannot run redis-cli (installed with redis-server)")?;
        if !out.status.success() {
            bail!(
                "redis-cli --cluster create failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        cluster.wait_until_ok(Duration::from_secs(20))?;
        Ok(cluster)
    }

    /// Six nodes in cluster mode that do not know each other yet (for a test that forms
    /// them its own way, then calls [`wait_until_ok`](Self::wait_until_ok)).
    pub fn spawn_unformed() -> anyhow::Result<Self> {
        let nodes = (0..6)
            .map(|_| RedisServer::spawn_node(false, true))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self { nodes })
    }

    /// Every node's `127.0.0.1:<port>`, in the order they were started.
    pub fn addresses(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect()
    }

    /// Every node's `redis://127.0.0.1:<port>/`, masters and replicas.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The nodes, in the order they were started.
    pub fn nodes(&mut self) -> &mut [RedisServer] {
        &mut self.nodes
    }

    /// Waits until every live node says the cluster is ok and every live replica's link to
    /// its master is up.
    pub fn wait_until_ok(&self, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            let ready = self.nodes.iter().filter(|n| n.child.is_some()).all(|n| {
                n.cluster_info()
                    .is_some_and(|i| i.contains("cluster_state:ok"))
                    && n.replica_in_sync_or_master()
            });
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the cluster did not reach cluster_state:ok within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl RedisServer {
    /// Whether this node is a master, or a replica whose link to its master is up (so a
    /// write can be confirmed by `WAIT`).
    fn replica_in_sync_or_master(&self) -> bool {
        self.replication()
            .is_some_and(|i| i.contains("role:master") || i.contains("master_link_status:up"))
    }

    /// Whether this node answers as a master.
    fn is_master(&self) -> bool {
        self.replication()
            .is_some_and(|i| i.contains("role:master"))
    }

    /// `INFO replication`, if the node answers.
    fn replication(&self) -> Option<String> {
        let mut c = self.connect(Duration::from_millis(200)).ok()?;
        redis::cmd("INFO").arg("replication").query(&mut c).ok()
    }

    /// `CLUSTER INFO`, if the node answers.
    fn cluster_info(&self) -> Option<String> {
        let mut c = self.connect(Duration::from_millis(200)).ok()?;
        redis::cmd("CLUSTER").arg("INFO").query(&mut c).ok()
    }

    /// A blocking connection, connecting within `timeout`.
    fn connect(&self, timeout: Duration) -> redis::RedisResult<redis::Connection> {
        redis::Client::open(self.url())?.get_connection_with_timeout(timeout)
    }
}

impl RedisCluster {
    /// A store connection to the cluster, as a service builds it from REDIS_CLUSTER_URLS.
    pub fn conn(&self) -> switchboard_common::redis_conn::RedisConn {
        switchboard_common::redis_conn::cluster(&self.urls()).expect("cluster connection")
    }

    /// The cluster's sharded bus, stopped by `shutdown`.
    pub fn bus(
        &self,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> switchboard_common::bus::ClusterBus {
        switchboard_common::bus::ClusterBus::start(&self.urls(), shutdown.clone())
            .expect("cluster bus")
    }
}

impl RedisCluster {
    /// Closes every pub/sub connection on every live node (`CLIENT KILL TYPE pubsub`).
    pub async fn kill_pubsub_clients(&self) -> anyhow::Result<()> {
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            node.kill_pubsub_clients().await?;
        }
        Ok(())
    }

    /// A revocation follower as a service instance on the cluster runs one: its own
    /// sharded bus and store connection.
    pub async fn revocation_follower(
        &self,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> std::sync::Arc<switchboard_common::revocation::RevocationList> {
        use std::sync::Arc;
        let list = Arc::new(switchboard_common::revocation::RevocationList::default());
        switchboard_common::revocation::follow(
            list.clone(),
            Arc::new(self.bus(shutdown)),
            Arc::new(switchboard_common::revocation::RedisRevocations::new(
                self.conn(),
            )),
            shutdown.clone(),
        )
        .await;
        list
    }
}

impl RedisCluster {
    /// Empties every master (`FLUSHALL`; replicas follow), so one cluster can serve
    /// several contracts in a row.
    pub async fn flush(&self) -> anyhow::Result<()> {
        for node in self
            .nodes
            .iter()
            .filter(|n| n.child.is_some() && n.is_master())
        {
            let client = redis::Client::open(node.url())?;
            let mut c = client.get_multiplexed_async_connection().await?;
            let () = redis::cmd("FLUSHALL").query_async(&mut c).await?;
        }
        Ok(())
    }
}

/// What a test's services store on: one Redis or a Redis Cluster.
pub enum Backing {
    /// One `redis-server`.
    One(RedisServer),
    /// Three masters and three replicas.
    Cluster(RedisCluster),
}

impl Backing {
    /// The process ids of its `redis-server`s (live ones).
    pub fn pids(&self) -> Vec<u32> {
        let nodes: Vec<&RedisServer> = match self {
            Self::One(r) => vec![r],
            Self::Cluster(c) => c.nodes.iter().collect(),
        };
        nodes
            .into_iter()
            .filter_map(|n| n.child.as_ref().map(|c| c.id()))
            .collect()
    }

    /// The engine the services are configured with (REDIS_URL or REDIS_CLUSTER_URLS).
    pub fn engine(&self) -> switchboard_common::config::Engine {
        use switchboard_common::config::{Engine, Secret};
        match self {
            Self::One(r) => Engine::Redis(Secret::new(r.url())),
            Self::Cluster(c) => {
                Engine::RedisCluster(c.urls().into_iter().map(Secret::new).collect())
            }
        }
    }

    /// The one server; panics on a cluster (for tests that are about one Redis).
    pub fn one(&self) -> &RedisServer {
        match self {
            Self::One(r) => r,
            Self::Cluster(_) => panic!("this test needs one Redis, not a cluster"),
        }
    }

    /// [`one`](Self::one), to stop and start it.
    pub fn one_mut(&mut self) -> &mut RedisServer {
        match self {
            Self::One(r) => r,
            Self::Cluster(_) => panic!("this test needs one Redis, not a cluster"),
        }
    }
}

impl RedisCluster {
    /// The index (in [`nodes`](Self::nodes)) of the live master serving `key`'s slot.
    pub fn master_of(&self, key: &str) -> anyhow::Result<usize> {
        let node = self
            .nodes
            .iter()
            .find(|n| n.child.is_some())
            .context("no live node")?;
        let mut c = node.connect(Duration::from_secs(1))?;
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut c)?;
        let table: String = redis::cmd("CLUSTER").arg("NODES").query(&mut c)?;
        for line in table.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(address), Some(flags)) = (fields.get(1), fields.get(2)) else {
                continue;
            };
            if !flags.contains("master") || flags.contains("fail") {
                continue;
            }
            let serves = fields.iter().skip(8).any(|range| {
                let (lo, hi) = range.split_once('-').unwrap_or((range, range));
                matches!((lo.parse::<u16>(), hi.parse::<u16>()), (Ok(lo), Ok(hi)) if (lo..=hi).contains(&slot))
            });
            if !serves {
                continue;
            }
            let port = port_of(address)?;
            return self
                .nodes
                .iter()
                .position(|n| n.port == port)
                .context("the master is not one of ours");
        }
        bail!("no live master serves slot {slot}")
    }
}

impl Backing {
    /// The cluster; panics on one Redis (for tests that are about a cluster).
    pub fn cluster_mut(&mut self) -> &mut RedisCluster {
        match self {
            Self::Cluster(c) => c,
            Self::One(_) => panic!("this test needs a Redis Cluster"),
        }
    }
}

impl RedisCluster {
    /// Moves `key`'s slot, keys and all, from its master to the master `to` (an index into
    /// [`nodes`](Self::nodes)) the way `redis-cli --cluster reshard` does: IMPORTING and
    /// MIGRATING, MIGRATE of every key in batches, then the new owner announced to every
    /// master. Returns the slot.
    pub fn move_slot(&self, key: &str, to: usize) -> anyhow::Result<u16> {
        let from = self.master_of(key)?;
        anyhow::ensure!(from != to, "the slot is already on node {to}");
        let connect = |i: usize| self.nodes[i].connect(Duration::from_secs(2));
        let id = |c: &mut redis::Connection| -> anyhow::Result<String> {
            Ok(redis::cmd("CLUSTER").arg("MYID").query(c)?)
        };
        let (mut source, mut target) = (connect(from)?, connect(to)?);
        let (source_id, target_id) = (id(&mut source)?, id(&mut target)?);
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut source)?;
        let () = redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg("IMPORTING")
            .arg(&source_id)
            .query(&mut target)?;
        let () = redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg("MIGRATING")
            .arg(&target_id)
            .query(&mut source)?;
        for _ in 0..10_000 {
            let keys: Vec<String> = redis::cmd("CLUSTER")
                .arg("GETKEYSINSLOT")
                .arg(slot)
                .arg(100)
                .query(&mut source)?;
            if keys.is_empty() {
                break;
            }
            let () = redis::cmd("MIGRATE")
                .arg("127.0.0.1")
                .arg(self.nodes[to].port)
                .arg("")
                .arg(0)
                .arg(5000)
                .arg("KEYS")
                .arg(&keys)
                .query(&mut source)?;
        }
        for node in self
            .nodes
            .iter()
            .filter(|n| n.child.is_some() && n.is_master())
        {
            let mut c = node.connect(Duration::from_secs(2))?;
            let () = redis::cmd("CLUSTER")
                .arg("SETSLOT")
                .arg(slot)
                .arg("NODE")
                .arg(&target_id)
                .query(&mut c)?;
        }
        Ok(slot)
    }
}

impl RedisCluster {
    /// The indexes of the live replicas of master `master`.
    pub fn replicas_of(&self, master: usize) -> anyhow::Result<Vec<usize>> {
        let mut c = self.nodes[master].connect(Duration::from_secs(1))?;
        let id: String = redis::cmd("CLUSTER").arg("MYID").query(&mut c)?;
        let table: String = redis::cmd("CLUSTER").arg("NODES").query(&mut c)?;
        let mut out = Vec::new();
        for line in table.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(address), Some(flags), Some(of)) =
                (fields.get(1), fields.get(2), fields.get(3))
            else {
                continue;
            };
            if !flags.contains("slave") || *of != id || flags.contains("fail") {
                continue;
            }
            let port = port_of(address)?;
            if let Some(i) = self.nodes.iter().position(|n| n.port == port) {
                out.push(i);
            }
        }
        Ok(out)
    }
}

/// The port of a `CLUSTER NODES` address, `ip:port@cport`.
fn port_of(address: &str) -> anyhow::Result<u16> {
    address
        .split(['@', ':'])
        .nth(1)
        .and_then(|p| p.parse().ok())
        .context("a node address without a port")
}
