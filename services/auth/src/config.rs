//! Auth configuration: one struct from flags and environment variables, validated once.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use switchboard_common::config::{Engine, Problems, Secret, ServerArgs, ServerConfig, StoreArgs};

/// Environment variable names of auth's own settings.
pub mod env {
    /// Access token lifetime.
    pub const ACCESS_TTL_SECS: &str = "AUTH_ACCESS_TTL_SECS";
    /// Session (refresh token) lifetime.
    pub const REFRESH_TTL_SECS: &str = "AUTH_REFRESH_TTL_SECS";
    /// Ed25519 signing key file.
    pub const SIGNING_KEY_FILE: &str = "AUTH_SIGNING_KEY_FILE";
    /// First admin's username.
    pub const ADMIN_USERNAME: &str = "AUTH_ADMIN_USERNAME";
    /// First admin's password.
    pub const ADMIN_PASSWORD: &str = "AUTH_ADMIN_PASSWORD";
    /// argon2 memory cost.
    pub const ARGON2_MEMORY_KIB: &str = "AUTH_ARGON2_MEMORY_KIB";
    /// argon2 iterations.
    pub const ARGON2_ITERATIONS: &str = "AUTH_ARGON2_ITERATIONS";
    /// Concurrent password hashes.
    pub const HASH_CONCURRENCY: &str = "AUTH_HASH_CONCURRENCY";
    /// Logins allowed to wait for a hashing slot.
    pub const HASH_QUEUE: &str = "AUTH_HASH_QUEUE";
    /// Failed logins allowed per username per window.
    pub const MAX_FAILURES_PER_USER: &str = "AUTH_LOGIN_MAX_FAILURES_PER_USER";
    /// Failed logins allowed per client address per window.
    pub const MAX_FAILURES_PER_PEER: &str = "AUTH_LOGIN_MAX_FAILURES_PER_PEER";
    /// Failure counting window.
    pub const FAILURE_WINDOW_SECS: &str = "AUTH_LOGIN_FAILURE_WINDOW_SECS";
    /// Registrations allowed per client address per window.
    pub const REGISTRATIONS_PER_PEER: &str = "AUTH_REGISTRATIONS_PER_PEER";
    /// Guest sessions allowed per client address per window.
    pub const GUESTS_PER_PEER: &str = "AUTH_GUESTS_PER_PEER";
    /// Guest session lifetime without refresh.
    pub const GUEST_SESSION_TTL_SECS: &str = "AUTH_GUEST_SESSION_TTL_SECS";
}

/// `switchboard-auth`: accounts, sessions and token keys for Switchboard.
///
/// Every flag can also be set by the environment variable shown.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "switchboard-auth",
    version,
    about,
    long_about = None,
    after_help = switchboard_common::telemetry::env_help()
)]
pub struct Args {
    /// Print a new PKCS#8 PEM Ed25519 signing key (for AUTH_SIGNING_KEY_FILE) and exit.
    #[arg(long)]
    pub generate_signing_key: bool,
    /// Address the gRPC server listens on.
    #[arg(long, env = switchboard_common::config::env::LISTEN_ADDR, default_value = "0.0.0.0:50051")]
    pub listen_addr: SocketAddr,
    /// Address of the Prometheus `/metrics` HTTP endpoint, or `off`.
    #[arg(long, env = switchboard_common::config::env::METRICS_ADDR, default_value = "0.0.0.0:9464")]
    pub metrics_addr: switchboard_common::config::MetricsAddr,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub server: ServerArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub store: StoreArgs,
    /// Lifetime of access tokens in seconds (60 to 3600).
    #[arg(long, env = env::ACCESS_TTL_SECS, default_value_t = 900)]
    pub access_ttl_secs: u64,
    /// Lifetime of a session without refresh, in seconds; each Refresh extends it.
    #[arg(long, env = env::REFRESH_TTL_SECS, default_value_t = 30 * 24 * 3600)]
    pub refresh_ttl_secs: u64,
    /// PEM (PKCS#8) Ed25519 private key for signing access tokens; share it between
    /// instances or leave it unset: each instance then makes its own key and publishes the
    /// public half through the store, so GetJwks on any instance lists every live key.
    #[arg(long, env = env::SIGNING_KEY_FILE, value_name = "PATH")]
    pub signing_key_file: Option<PathBuf>,
    /// Username of the first admin, created (or promoted) at start. Needs --admin-password.
    #[arg(long, env = env::ADMIN_USERNAME)]
    pub admin_username: Option<String>,
    /// Password of the first admin (used only when the account is created).
    #[arg(long, env = env::ADMIN_PASSWORD, hide_env_values = true)]
    pub admin_password: Option<Secret>,
    /// argon2id memory cost in KiB (OWASP's 19 MiB by default).
    #[arg(long, env = env::ARGON2_MEMORY_KIB, default_value_t = 19 * 1024)]
    pub argon2_memory_kib: u32,
    /// argon2id iterations.
    #[arg(long, env = env::ARGON2_ITERATIONS, default_value_t = 2)]
    pub argon2_iterations: u32,
    /// Password hashes computed at once, off the async runtime (0 = number of CPUs).
    #[arg(long, env = env::HASH_CONCURRENCY, default_value_t = 0)]
    pub hash_concurrency: usize,
    /// Logins allowed to wait for a hashing slot; beyond that they get RESOURCE_EXHAUSTED.
    #[arg(long, env = env::HASH_QUEUE, default_value_t = 1024)]
    pub hash_queue: usize,
    /// Failed logins allowed per username within the window, then RESOURCE_EXHAUSTED.
    #[arg(long, env = env::MAX_FAILURES_PER_USER, default_value_t = 10)]
    pub login_max_failures_per_user: u64,
    /// Failed logins allowed per client address within the window.
    #[arg(long, env = env::MAX_FAILURES_PER_PEER, default_value_t = 100)]
    pub login_max_failures_per_peer: u64,
    /// Window for counting failed logins (and registrations), in seconds.
    #[arg(long, env = env::FAILURE_WINDOW_SECS, default_value_t = 900)]
    pub login_failure_window_secs: u64,
    /// Registrations (attempts, successful or not) allowed per client address within the
    /// window of AUTH_LOGIN_FAILURE_WINDOW_SECS, counted in the store so every instance
    /// shares them; then RESOURCE_EXHAUSTED (reason RATE_LIMITED). 0: no limit.
    #[arg(long, env = env::REGISTRATIONS_PER_PEER, default_value_t = 20)]
    pub registrations_per_peer: u64,
    /// Guest sessions (StartGuestSession, for chat widgets) allowed per client address
    /// within the window of AUTH_LOGIN_FAILURE_WINDOW_SECS, counted in the store so every
    /// instance shares them; then RESOURCE_EXHAUSTED (reason RATE_LIMITED). 0: no limit.
    #[arg(long, env = env::GUESTS_PER_PEER, default_value_t = 30)]
    pub guests_per_peer: u64,
    /// How long a guest's session lasts past its last refresh, in seconds (at least
    /// AUTH_ACCESS_TTL_SECS).
    #[arg(long, env = env::GUEST_SESSION_TTL_SECS, default_value_t = 24 * 3600)]
    pub guest_session_ttl_secs: u64,
}

/// Validated auth settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// gRPC server settings.
    pub server: ServerConfig,
    /// Storage engine.
    pub engine: Engine,
    /// Access token lifetime.
    pub access_ttl: Duration,
    /// Session lifetime without refresh.
    pub refresh_ttl: Duration,
    /// A guest session's lifetime without refresh.
    pub guest_ttl: Duration,
    /// PEM of the signing key, if configured.
    pub signing_key_pem: Option<Secret>,
    /// First admin's username and password.
    pub admin: Option<(String, Secret)>,
    /// argon2id cost.
    pub argon2: Argon2Cost,
    /// Concurrent hashes.
    pub hash_concurrency: usize,
    /// Logins allowed to wait for hashing.
    pub hash_queue: usize,
    /// Login failure limits.
    pub limits: LoginLimits,
}

/// argon2id cost parameters.
#[derive(Debug, Clone, Copy)]
pub struct Argon2Cost {
    /// Memory in KiB.
    pub memory_kib: u32,
    /// Iterations.
    pub iterations: u32,
}

/// How many failed logins are tolerated.
#[derive(Debug, Clone, Copy)]
pub struct LoginLimits {
    /// Per username.
    pub per_user: u64,
    /// Per client address.
    pub per_peer: u64,
    /// Counting window.
    pub window: Duration,
    /// Registrations per client address per window (`None`: no limit).
    pub registrations_per_peer: Option<u64>,
    /// Guest sessions per client address per window (`None`: no limit).
    pub guests_per_peer: Option<u64>,
}

impl Args {
    /// Checks every setting, reporting all problems together.
    pub fn validate(self) -> Result<Config, switchboard_common::config::ConfigError> {
        let mut problems = Problems::default();
        let server = self
            .server
            .validate(self.listen_addr, self.metrics_addr, &mut problems);
        let engine = self.store.validate(&mut problems);
        if !(60..=3600).contains(&self.access_ttl_secs) {
            problems.add(format!(
                "{}: must be 60 to 3600 seconds",
                env::ACCESS_TTL_SECS
            ));
        }
        if self.refresh_ttl_secs < self.access_ttl_secs {
            problems.add(format!(
                "{}: must not be shorter than {}",
                env::REFRESH_TTL_SECS,
                env::ACCESS_TTL_SECS
            ));
        }
        if self.guest_session_ttl_secs < self.access_ttl_secs {
            problems.add(format!(
                "{}: must not be shorter than {}",
                env::GUEST_SESSION_TTL_SECS,
                env::ACCESS_TTL_SECS
            ));
        }
        let signing_key_pem = self.signing_key_file.as_ref().and_then(|path| {
            std::fs::read_to_string(path)
                .map_err(|e| {
                    problems.add(format!(
                        "{}: cannot read {}: {e}",
                        env::SIGNING_KEY_FILE,
                        path.display()
                    ))
                })
                .ok()
                .map(Secret::new)
        });
        if let Some(pem) = &signing_key_pem
            && let Err(e) = crate::signing::Keyring::from_pem(pem.expose(), 60)
        {
            problems.add(format!("{}: {e}", env::SIGNING_KEY_FILE));
        }
        let admin = match (self.admin_username, self.admin_password) {
            (None, None) => None,
            (Some(u), Some(p)) => {
                if let Err(e) = crate::account::Username::parse(&u) {
                    problems.add(format!("{}: {e}", env::ADMIN_USERNAME));
                }
                if let Err(e) = crate::account::Password::parse(p.expose()) {
                    problems.add(format!("{}: {e}", env::ADMIN_PASSWORD));
                }
                Some((u, p))
            }
            _ => {
                problems.add(format!(
                    "{} and {} must be set together",
                    env::ADMIN_USERNAME,
                    env::ADMIN_PASSWORD
                ));
                None
            }
        };
        if !(1024..=4 * 1024 * 1024).contains(&self.argon2_memory_kib) {
            problems.add(format!(
                "{}: must be 1024 to 4194304 KiB",
                env::ARGON2_MEMORY_KIB
            ));
        }
        if !(1..=16).contains(&self.argon2_iterations) {
            problems.add(format!("{}: must be 1 to 16", env::ARGON2_ITERATIONS));
        }
        if self.login_max_failures_per_user == 0 || self.login_max_failures_per_peer == 0 {
            problems.add(format!(
                "{} and {} must be at least 1",
                env::MAX_FAILURES_PER_USER,
                env::MAX_FAILURES_PER_PEER
            ));
        }
        if self.login_failure_window_secs == 0 {
            problems.add(format!(
                "{}: must be at least 1 second",
                env::FAILURE_WINDOW_SECS
            ));
        }
        let hash_concurrency = match self.hash_concurrency {
            0 => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            n => n,
        };
        problems.finish(Config {
            server,
            engine,
            access_ttl: Duration::from_secs(self.access_ttl_secs),
            refresh_ttl: Duration::from_secs(self.refresh_ttl_secs),
            guest_ttl: Duration::from_secs(self.guest_session_ttl_secs),
            signing_key_pem,
            admin,
            argon2: Argon2Cost {
                memory_kib: self.argon2_memory_kib,
                iterations: self.argon2_iterations,
            },
            hash_concurrency,
            hash_queue: self.hash_queue,
            limits: LoginLimits {
                per_user: self.login_max_failures_per_user,
                per_peer: self.login_max_failures_per_peer,
                window: Duration::from_secs(self.login_failure_window_secs),
                registrations_per_peer: (self.registrations_per_peer > 0)
                    .then_some(self.registrations_per_peer),
                guests_per_peer: (self.guests_per_peer > 0).then_some(self.guests_per_peer),
            },
        })
    }
}

impl Config {
    /// Defaults for tests and tools (the environment is not read): plaintext on
    /// `listen_addr` with the given engine.
    pub fn for_tests(listen_addr: SocketAddr, engine: Engine) -> Self {
        let mut config = switchboard_common::config::defaults::<Args>()
            .validate()
            .unwrap_or_else(|e| e.exit());
        config.server = ServerConfig::plain(listen_addr);
        config.engine = engine;
        config
    }
}
