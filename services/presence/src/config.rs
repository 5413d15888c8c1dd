//! Presence configuration: one struct from flags and environment variables, validated once.

use std::net::SocketAddr;
use std::time::Duration;

use switchboard_common::config::{
    Engine, Problems, Secret, ServerArgs, ServerConfig, ServiceTokenArgs, StoreArgs, check_url,
};

/// Environment variable names of presence's own settings.
pub mod env {
    /// Where the auth service is.
    pub const AUTH_URL: &str = switchboard_common::config::env::AUTH_URL;
    /// Session lifetime without refresh.
    pub const TTL_SECS: &str = "PRESENCE_TTL_SECS";
    /// How often expired sessions are swept.
    pub const SWEEP_INTERVAL_MS: &str = "PRESENCE_SWEEP_INTERVAL_MS";
    /// How long a broken device stream stays online, waiting for the device to reconnect.
    pub const RECONNECT_GRACE_MS: &str = "PRESENCE_RECONNECT_GRACE_MS";
    /// Connect and Watch streams one user may have open on one instance.
    pub const MAX_STREAMS_PER_USER: &str = "PRESENCE_MAX_STREAMS_PER_USER";
}

/// `switchboard-presence`: who is online, on how many devices, in which state.
///
/// Every flag can also be set by the environment variable shown.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "switchboard-presence",
    version,
    about,
    long_about = None,
    after_help = switchboard_common::telemetry::env_help()
)]
pub struct Args {
    /// Address the gRPC server listens on.
    #[arg(long, env = switchboard_common::config::env::LISTEN_ADDR, default_value = "0.0.0.0:50052")]
    pub listen_addr: SocketAddr,
    /// Address of the Prometheus `/metrics` HTTP endpoint, or `off`.
    #[arg(long, env = switchboard_common::config::env::METRICS_ADDR, default_value = "0.0.0.0:9465")]
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
    /// Seconds a device session lives without being refreshed; the sessions of a crashed
    /// instance go offline after this (plus up to one sweep interval).
    #[arg(long, env = env::TTL_SECS, default_value_t = 30)]
    pub ttl_secs: u64,
    /// Milliseconds between sweeps for expired sessions (every instance sweeps; it is safe).
    #[arg(long, env = env::SWEEP_INTERVAL_MS, default_value_t = 2000)]
    pub sweep_interval_ms: u64,
    /// Milliseconds a device whose stream broke (network loss, instance shutdown) stays
    /// online waiting for it to reconnect, so watchers see no offline/online flap; 0 turns
    /// damping off. A stream the client closes goes offline at once.
    #[arg(long, env = env::RECONNECT_GRACE_MS, default_value_t = 5000)]
    pub reconnect_grace_ms: u64,
    /// Connect and Watch streams one user may have open on this instance; one more is
    /// refused with RESOURCE_EXHAUSTED (reason TOO_MANY_STREAMS). Services (the desk) are
    /// not counted. 0: no limit.
    #[arg(long, env = env::MAX_STREAMS_PER_USER, default_value_t = 100)]
    pub max_streams_per_user: usize,
}

/// Validated presence settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// gRPC server settings.
    pub server: ServerConfig,
    /// Storage engine.
    pub engine: Engine,
    /// The auth service.
    pub auth_url: String,
    /// Session lifetime without refresh.
    pub ttl: Duration,
    /// Sweep period.
    pub sweep_interval: Duration,
    /// Flap damping: how long a broken stream's session lingers.
    pub reconnect_grace: Duration,
    /// Shared secret accepted from other services.
    pub service_token: Option<Secret>,
    /// Streams per user on this instance (`None`: no limit).
    pub max_streams_per_user: Option<usize>,
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
        check_url(env::AUTH_URL, &self.auth_url, &mut problems);
        if !(1..=3600).contains(&self.ttl_secs) {
            problems.add(format!("{}: must be 1 to 3600 seconds", env::TTL_SECS));
        }
        if !(50..=60_000).contains(&self.sweep_interval_ms) {
            problems.add(format!(
                "{}: must be 50 to 60000 ms",
                env::SWEEP_INTERVAL_MS
            ));
        }
        if self.reconnect_grace_ms > 60_000 {
            problems.add(format!(
                "{}: must be 0 to 60000 ms",
                env::RECONNECT_GRACE_MS
            ));
        }
        problems.finish(Config {
            server,
            engine,
            auth_url: self.auth_url,
            ttl: Duration::from_secs(self.ttl_secs),
            sweep_interval: Duration::from_millis(self.sweep_interval_ms),
            reconnect_grace: Duration::from_millis(self.reconnect_grace_ms),
            service_token,
            max_streams_per_user: (self.max_streams_per_user > 0)
                .then_some(self.max_streams_per_user),
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
