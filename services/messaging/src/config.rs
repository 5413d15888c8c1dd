//! Messaging configuration: one struct from flags and environment variables, validated once.

use std::net::SocketAddr;

use std::time::Duration;

use switchboard_common::config::{
    Engine, Problems, Secret, ServerArgs, ServerConfig, ServiceTokenArgs, StoreArgs, check_url,
};

/// Environment variable names of messaging's own settings.
pub mod env {
    /// Where the auth service is.
    pub const AUTH_URL: &str = switchboard_common::config::env::AUTH_URL;
    /// Messages kept per conversation.
    pub const HISTORY_RETENTION: &str = "MESSAGING_HISTORY_RETENTION";
    /// Deliveries a stream may have waiting.
    pub const OUTBOUND_QUEUE: &str = "MESSAGING_OUTBOUND_QUEUE";
    /// Sustained sends per second per user.
    pub const SEND_RATE: &str = "MESSAGING_SEND_RATE_PER_SEC";
    /// Send burst per user.
    pub const SEND_BURST: &str = "MESSAGING_SEND_BURST";
    /// Where the presence service is (the desk routes to available agents).
    pub const PRESENCE_URL: &str = "PRESENCE_URL";
    /// Consultations an agent holds at once before routing skips them.
    pub const AGENT_CAPACITY: &str = "MESSAGING_SUPPORT_AGENT_CAPACITY";
    /// Seconds between safety passes over the support queue.
    pub const QUEUE_RECHECK_SECS: &str = "MESSAGING_SUPPORT_RECHECK_SECS";
    /// Connect streams one user may have open on one instance.
    pub const MAX_STREAMS_PER_USER: &str = "MESSAGING_MAX_STREAMS_PER_USER";
    /// Most members of a group, owner included.
    pub const MAX_GROUP_MEMBERS: &str = "MESSAGING_MAX_GROUP_MEMBERS";
    /// Seconds after which a Connect stream ends so the client reconnects (rebalancing).
    pub const MAX_STREAM_AGE_SECS: &str = "MESSAGING_MAX_STREAM_AGE_SECS";
    /// Seconds between the keep-alive Pongs of a Subscribe stream.
    pub const STREAM_KEEPALIVE_SECS: &str = "MESSAGING_STREAM_KEEPALIVE_SECS";
    /// Replicas that must have a send before it is acknowledged.
    pub const ACK_REPLICAS: &str = "REDIS_ACK_REPLICAS";
    /// How long a send waits for them.
    pub const ACK_TIMEOUT_MS: &str = "REDIS_ACK_TIMEOUT_MS";
}

/// `switchboard-messaging`: conversations, history and the real-time Connect stream.
///
/// Every flag can also be set by the environment variable shown.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "switchboard-messaging",
    version,
    about,
    long_about = None,
    after_help = switchboard_common::telemetry::env_help()
)]
pub struct Args {
    /// Address the gRPC server listens on.
    #[arg(long, env = switchboard_common::config::env::LISTEN_ADDR, default_value = "0.0.0.0:50053")]
    pub listen_addr: SocketAddr,
    /// Address of the Prometheus `/metrics` HTTP endpoint, or `off`.
    #[arg(long, env = switchboard_common::config::env::METRICS_ADDR, default_value = "0.0.0.0:9466")]
    pub metrics_addr: switchboard_common::config::MetricsAddr,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub server: ServerArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub store: StoreArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub service: ServiceTokenArgs,
    /// The auth service, for its token keys (GetJwks).
    #[arg(long, env = env::AUTH_URL, default_value = "http://127.0.0.1:50051")]
    pub auth_url: String,
    /// Messages kept per conversation (older ones are trimmed; resuming from before them
    /// answers Resync).
    #[arg(long, env = env::HISTORY_RETENTION, default_value_t = 10_000)]
    pub history_retention: usize,
    /// Deliveries a Connect stream may have waiting; a client that falls further behind is
    /// disconnected with RESOURCE_EXHAUSTED and resumes from its last seq.
    #[arg(long, env = env::OUTBOUND_QUEUE, default_value_t = 1024)]
    pub outbound_queue: usize,
    /// Sustained messages per second a user may send (per instance).
    #[arg(long, env = env::SEND_RATE, default_value_t = 20.0)]
    pub send_rate_per_sec: f64,
    /// Messages a user may send in a burst.
    #[arg(long, env = env::SEND_BURST, default_value_t = 100.0)]
    pub send_burst: f64,
    /// The presence service: the support desk asks it for available agents (ListOnline)
    /// and watches agents' presence to route waiting consultations.
    #[arg(long, env = env::PRESENCE_URL, default_value = "http://127.0.0.1:50052")]
    pub presence_url: String,
    /// Consultations an agent holds at once; routing skips agents at this load (0: no
    /// limit). Agents may still accept more from the queue themselves.
    #[arg(long, env = env::AGENT_CAPACITY, default_value_t = 5)]
    pub support_agent_capacity: u32,
    /// Seconds between safety passes over the support queue. Routing is driven by events
    /// (new consultations, agents becoming available, closes); this pass only catches
    /// what a crashed instance or a lost event left waiting. On a Redis Cluster a repair
    /// pass runs as often, dropping the queue entries and agent reservations a crashed
    /// step left behind (once they are two minutes old).
    #[arg(long, env = env::QUEUE_RECHECK_SECS, default_value_t = 10)]
    pub support_recheck_secs: u64,
    /// Connect streams one user may have open on this instance; one more is refused with
    /// RESOURCE_EXHAUSTED (reason TOO_MANY_STREAMS). 0: no limit.
    #[arg(long, env = env::MAX_STREAMS_PER_USER, default_value_t = 100)]
    pub max_streams_per_user: usize,
    /// Most members of a group, owner included (2 to 1000000). Sends check membership in
    /// O(1) whatever the size; creating or listing a group's members is linear in it.
    #[arg(long, env = env::MAX_GROUP_MEMBERS, default_value_t = crate::conversation::DEFAULT_MAX_GROUP_MEMBERS)]
    pub max_group_members: usize,
    /// Replicas of the master that stores a send which must have it (Redis `WAIT`) before
    /// the send is acknowledged, so that a failover cannot lose an acknowledged message
    /// (Redis replicates asynchronously). 0: acknowledged once the master has it. If they
    /// do not confirm in time, the send answers UNAVAILABLE; it is stored, and a retry with
    /// the same client_msg_id is safe.
    #[arg(long, env = env::ACK_REPLICAS, default_value_t = 0)]
    pub redis_ack_replicas: u32,
    /// How long a send waits for REDIS_ACK_REPLICAS replicas, in milliseconds.
    #[arg(long, env = env::ACK_TIMEOUT_MS, default_value_t = 1000)]
    pub redis_ack_timeout_ms: u64,
    /// Seconds (± 10 % at random) after which a Connect stream ends with UNAVAILABLE
    /// (reason RECONNECT), so that clients spread over instances added since they
    /// connected; they resume from their last seq with nothing lost. 0: streams live on.
    #[arg(long, env = env::MAX_STREAM_AGE_SECS, default_value_t = 0)]
    pub max_stream_age_secs: u64,
    /// Seconds between the Pong frames (nonce 0) a Subscribe stream sends, so that
    /// proxies and load balancers in front of browsers do not close a quiet stream, and a
    /// vanished client is found by the failed write. 1 to 3600.
    #[arg(long, env = env::STREAM_KEEPALIVE_SECS, default_value_t = 25)]
    pub stream_keepalive_secs: u64,
}

/// Validated messaging settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// gRPC server settings.
    pub server: ServerConfig,
    /// Storage engine.
    pub engine: Engine,
    /// The auth service.
    pub auth_url: String,
    /// Messages kept per conversation.
    pub history_retention: usize,
    /// Stream inbox size.
    pub outbound_queue: usize,
    /// Send limit.
    pub send_limit: crate::domain::SendLimit,
    /// The presence service.
    pub presence_url: String,
    /// Shared secret for calls to presence.
    pub service_token: Option<Secret>,
    /// Most consultations routed to one agent.
    pub agent_capacity: u32,
    /// Period of the queue's safety pass.
    pub queue_recheck: Duration,
    /// Connect streams per user on this instance (`None`: no limit).
    pub max_streams_per_user: Option<usize>,
    /// Most members of a group.
    pub max_group_members: usize,
    /// Replicas a send waits for, and how long (`None`: none).
    pub ack_replicas: Option<(u32, Duration)>,
    /// A Connect stream's longest life, before jitter (`None`: unlimited).
    pub max_stream_age: Option<Duration>,
    /// Time between a Subscribe stream's keep-alive Pongs.
    pub stream_keepalive: Duration,
}

impl Args {
    /// Checks every setting, reporting all problems together.
    pub fn validate(self) -> Result<Config, switchboard_common::config::ConfigError> {
        let mut problems = Problems::default();
        let server = self
            .server
            .validate(self.listen_addr, self.metrics_addr, &mut problems);
        let engine = self.store.validate(&mut problems);
        let service_token = self.service.validate(&mut problems);
        check_url(env::PRESENCE_URL, &self.presence_url, &mut problems);
        if !(1..=3600).contains(&self.support_recheck_secs) {
            problems.add(format!("{}: must be 1 to 3600", env::QUEUE_RECHECK_SECS));
        }
        check_url(env::AUTH_URL, &self.auth_url, &mut problems);
        if self.history_retention < 100 {
            problems.add(format!("{}: must be at least 100", env::HISTORY_RETENTION));
        }
        if !(2..=1_000_000).contains(&self.max_group_members) {
            problems.add(format!("{}: must be 2 to 1000000", env::MAX_GROUP_MEMBERS));
        }
        if self.redis_ack_replicas > 0 && matches!(engine, Engine::Memory) {
            problems.add(format!(
                "{}: needs Redis (REDIS_URL or REDIS_CLUSTER_URLS); the embedded engine has no replicas",
                env::ACK_REPLICAS
            ));
        }
        if !(1..=60_000).contains(&self.redis_ack_timeout_ms) {
            problems.add(format!("{}: must be 1 to 60000", env::ACK_TIMEOUT_MS));
        }
        if self.max_stream_age_secs > 31 * 24 * 3600 {
            problems.add(format!(
                "{}: at most 2678400 (31 days), or 0 for none",
                env::MAX_STREAM_AGE_SECS
            ));
        }
        if !(1..=3600).contains(&self.stream_keepalive_secs) {
            problems.add(format!("{}: must be 1 to 3600", env::STREAM_KEEPALIVE_SECS));
        }
        if !(16..=1_000_000).contains(&self.outbound_queue) {
            problems.add(format!("{}: must be 16 to 1000000", env::OUTBOUND_QUEUE));
        }
        let limits_ok = self.send_rate_per_sec.is_finite()
            && self.send_rate_per_sec > 0.0
            && self.send_burst.is_finite()
            && self.send_burst >= 1.0;
        if !limits_ok {
            problems.add(format!(
                "{} must be > 0 and {} at least 1",
                env::SEND_RATE,
                env::SEND_BURST
            ));
        }
        problems.finish(Config {
            server,
            engine,
            auth_url: self.auth_url,
            history_retention: self.history_retention,
            outbound_queue: self.outbound_queue,
            send_limit: crate::domain::SendLimit {
                per_second: self.send_rate_per_sec,
                burst: self.send_burst,
            },
            presence_url: self.presence_url,
            service_token,
            agent_capacity: self.support_agent_capacity,
            queue_recheck: Duration::from_secs(self.support_recheck_secs),
            max_streams_per_user: (self.max_streams_per_user > 0)
                .then_some(self.max_streams_per_user),
            max_group_members: self.max_group_members,
            max_stream_age: (self.max_stream_age_secs > 0)
                .then(|| Duration::from_secs(self.max_stream_age_secs)),
            stream_keepalive: Duration::from_secs(self.stream_keepalive_secs),
            ack_replicas: (self.redis_ack_replicas > 0).then(|| {
                (
                    self.redis_ack_replicas,
                    Duration::from_millis(self.redis_ack_timeout_ms),
                )
            }),
        })
    }
}

impl Config {
    /// Defaults for tests and tools (the environment is not read): plaintext on
    /// `listen_addr`, given engine and auth.
    pub fn for_tests(listen_addr: SocketAddr, engine: Engine, auth_url: String) -> Self {
        let mut config = switchboard_common::config::defaults::<Args>()
            .validate()
            .unwrap_or_else(|e| e.exit());
        config.server = ServerConfig::plain(listen_addr);
        config.engine = engine;
        config.auth_url = auth_url;
        config
    }
}
