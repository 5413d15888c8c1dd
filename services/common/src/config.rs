//! Configuration shared by every service: command-line flags that default to environment
//! variables (`--help` lists both and every default), validated once at start.
//!
//! Each service has one `Config` struct that flattens [`ServerArgs`] and [`StoreArgs`]
//! next to its own settings. Problems are collected and reported together, and the
//! process exits with code 64 (`EX_USAGE`) on bad configuration.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// Exit code for bad configuration (`EX_USAGE` from sysexits.h).
pub const EXIT_BAD_CONFIG: i32 = 64;

/// Environment variable names read by [`ServerArgs`] and [`StoreArgs`].
pub mod env {
    /// Address the gRPC server listens on.
    pub const LISTEN_ADDR: &str = "LISTEN_ADDR";
    /// Address of the Prometheus `/metrics` HTTP endpoint, or `off`.
    pub const METRICS_ADDR: &str = "METRICS_ADDR";
    /// PEM certificate chain for TLS.
    pub const TLS_CERT_FILE: &str = "TLS_CERT_FILE";
    /// PEM private key for TLS.
    pub const TLS_KEY_FILE: &str = "TLS_KEY_FILE";
    /// Largest accepted request message in bytes.
    pub const MAX_MESSAGE_BYTES: &str = "MAX_MESSAGE_BYTES";
    /// Seconds allowed for draining at shutdown.
    pub const SHUTDOWN_GRACE_SECS: &str = "SHUTDOWN_GRACE_SECS";
    /// `text` or `json` log lines.
    pub const LOG_FORMAT: &str = "LOG_FORMAT";
    /// Redis connection URL; unset means the embedded in-memory engine.
    pub const REDIS_URL: &str = "REDIS_URL";
    /// Seed nodes of a Redis Cluster, comma-separated; selects the cluster engine.
    pub const REDIS_CLUSTER_URLS: &str = "REDIS_CLUSTER_URLS";
    /// Where other services reach the auth service for token keys.
    pub const AUTH_URL: &str = "AUTH_URL";
    /// Shared secret with which services call each other (messaging → presence).
    pub const SERVICE_TOKEN: &str = "SERVICE_TOKEN";
    /// Unary calls served at once per instance before new ones are shed.
    pub const MAX_CONCURRENT_REQUESTS: &str = "MAX_CONCURRENT_REQUESTS";
    /// HTTP/2 streams one connection may have open at once.
    pub const MAX_STREAMS_PER_CONNECTION: &str = "MAX_STREAMS_PER_CONNECTION";
    /// Web origins allowed to call with gRPC-Web (CORS).
    pub const CORS_ALLOWED_ORIGINS: &str = "CORS_ALLOWED_ORIGINS";
    /// Longest a unary call may run, in milliseconds.
    pub const UNARY_TIMEOUT_MS: &str = "UNARY_TIMEOUT_MS";
    /// Longest a new connection may take to send its first bytes (HTTP/2 preface or TLS
    /// hello), in milliseconds.
    pub const HANDSHAKE_TIMEOUT_MS: &str = "HANDSHAKE_TIMEOUT_MS";
}

/// Parses the command line (and environment) into `T`, printing help or version and
/// exiting 0 when asked, or printing the error and exiting 64. An environment variable that
/// does not parse is not fatal here: it is one of the [`Parsed`] problems, reported with
/// the rest when the settings are validated ([`Parsed::validate`]).
pub fn parse_args<T: Parser>() -> Parsed<T> {
    match parse_from(std::env::args_os().collect()) {
        Ok(parsed) => parsed,
        Err(e) => {
            use clap::error::ErrorKind;
            let code = match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => 0,
                _ => EXIT_BAD_CONFIG,
            };
            let _ = e.print();
            std::process::exit(code);
        }
    }
}

/// `T` with every setting at its default, whatever the environment says: for tests and
/// tools, which must not depend on the shell they run in.
pub fn defaults<T: Parser>() -> T {
    let command = T::command().mut_args(|a| a.env(None));
    let name = command.get_name().to_owned();
    command
        .try_get_matches_from([name])
        .and_then(|m| T::from_arg_matches(&m))
        .unwrap_or_else(|e| e.exit())
}

/// `T` from these command-line flags (no program name) and the environment, for a process
/// that hosts a service and sets some of its flags itself; every problem as a
/// [`ConfigError`].
pub fn try_parse_env<T: Parser>(flags: &[&str]) -> Result<Parsed<T>, ConfigError> {
    let mut argv = vec![std::ffi::OsString::from(T::command().get_name().to_owned())];
    argv.extend(flags.iter().map(std::ffi::OsString::from));
    parse_from(argv).map_err(|e| ConfigError(vec![reason(&e)]))
}

/// Settings as parsed, and the environment variables that were set but could not be
/// parsed (their settings keep their defaults meanwhile).
#[derive(Debug)]
pub struct Parsed<T> {
    /// The settings.
    pub args: T,
    problems: Problems,
}

impl<T> Parsed<T> {
    /// Runs `validate` on the settings; the parsing problems and validation's come out
    /// together, so a user sees every bad variable at once.
    pub fn validate<C>(
        self,
        validate: impl FnOnce(T) -> Result<C, ConfigError>,
    ) -> Result<C, ConfigError> {
        let mut all = self.problems.0;
        match validate(self.args) {
            Ok(config) if all.is_empty() => Ok(config),
            Ok(_) => Err(ConfigError(all)),
            Err(e) => {
                all.extend(e.0);
                Err(ConfigError(all))
            }
        }
    }
}

/// Parses `argv` (program name first). Each setting that comes from a set environment
/// variable is tried on its own first, so that a bad value is reported by the variable's
/// name (not by the flag the user never typed) and every bad variable is found at once.
fn parse_from<T: Parser>(argv: Vec<std::ffi::OsString>) -> Result<Parsed<T>, clap::Error> {
    // Flags given on the command line win over the environment: their variables are not read.
    let given: Vec<String> = argv
        .iter()
        .skip(1)
        .filter_map(|a| a.to_str()?.strip_prefix("--"))
        .map(|a| a.split('=').next().unwrap_or(a).to_owned())
        .collect();
    let mut command = T::command();
    let mut problems = Problems::default();
    let mut unreadable = Vec::new();
    for arg in command.get_arguments() {
        let (Some(var), Some(long)) = (arg.get_env(), arg.get_long()) else {
            continue;
        };
        let Some(value) = std::env::var_os(var) else {
            continue;
        };
        if given.iter().any(|g| g == long) {
            continue;
        }
        // A command of this one setting, which reads it from the variable.
        let alone = clap::Command::new("env")
            .no_binary_name(true)
            .arg(arg.clone());
        if let Err(e) = alone.try_get_matches_from(std::iter::empty::<std::ffi::OsString>()) {
            let shown = if arg.is_hide_env_values_set() {
                String::from("(hidden)")
            } else {
                format!("{:?}", value.to_string_lossy())
            };
            problems.add(format!("{}={shown}: {}", var.to_string_lossy(), reason(&e)));
            unreadable.push(arg.get_id().clone());
        }
    }
    for id in unreadable {
        command = command.mut_arg(id, |a| a.env(None));
    }
    let matches = command.try_get_matches_from(argv)?;
    let args = T::from_arg_matches(&matches)?;
    Ok(Parsed { args, problems })
}

/// What was wrong with a value, without clap's framing (`error:`, usage, `--help` hint).
fn reason(e: &clap::Error) -> String {
    use clap::error::{ContextKind, ContextValue};
    if let Some(source) = std::error::Error::source(e) {
        return source.to_string();
    }
    if let Some(ContextValue::Strings(valid)) = e.get(ContextKind::ValidValue) {
        return format!("expected one of: {}", valid.join(", "));
    }
    let text = e.to_string();
    let first = text.lines().next().unwrap_or_default();
    first.trim_start_matches("error: ").to_owned()
}

/// Checks that the setting `var` is an `http://` or `https://` URL with a host, as every
/// service-to-service URL must be; a problem naming the variable otherwise.
pub fn check_url(var: &str, value: &str, problems: &mut Problems) {
    let problem = match value.parse::<http::Uri>() {
        Err(e) => Some(format!("{e}")),
        Ok(uri) => match (uri.scheme_str(), uri.host()) {
            (Some("http" | "https"), Some(host)) if !host.is_empty() => None,
            (Some("http" | "https"), _) => Some("no host".into()),
            _ => Some("must start with http:// or https://".into()),
        },
    };
    if let Some(p) = problem {
        problems.add(format!(
            "{var}={value:?}: not a URL ({p}); expected e.g. http://auth:50051"
        ));
    }
}

/// Collects configuration problems so they can be reported together.
#[derive(Debug, Default)]
pub struct Problems(Vec<String>);

impl Problems {
    /// Records one problem; name the variable and say what is expected.
    pub fn add(&mut self, problem: impl Into<String>) {
        self.0.push(problem.into());
    }

    /// `Ok(value)` if no problem was recorded, else every problem.
    pub fn finish<T>(self, value: T) -> Result<T, ConfigError> {
        if self.0.is_empty() {
            Ok(value)
        } else {
            Err(ConfigError(self.0))
        }
    }
}

/// One or more configuration problems.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError(pub Vec<String>);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "bad configuration:")?;
        for p in &self.0 {
            writeln!(f, "  - {p}")?;
        }
        Ok(())
    }
}

impl ConfigError {
    /// Prints every problem to stderr and exits with code 64.
    pub fn exit(&self) -> ! {
        eprint!("{self}");
        std::process::exit(EXIT_BAD_CONFIG)
    }
}

/// A string that never shows up in logs or `Debug` output (passwords, URLs with credentials).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself; call only where it is used, never to log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

/// Where `/metrics` is served: an address, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsAddr(pub Option<SocketAddr>);

impl std::str::FromStr for MetricsAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "" | "off" => Ok(Self(None)),
            addr => addr
                .parse()
                .map(|a| Self(Some(a)))
                .map_err(|e| format!("{e}: expected host:port (e.g. 0.0.0.0:9464) or `off`")),
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// gRPC server settings every service has.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerArgs {
    /// PEM certificate chain; together with --tls-key-file the server speaks only TLS.
    #[arg(long, env = env::TLS_CERT_FILE, value_name = "PATH")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of --tls-cert-file.
    #[arg(long, env = env::TLS_KEY_FILE, value_name = "PATH")]
    pub tls_key_file: Option<PathBuf>,
    /// Largest request message accepted, in bytes (after decompression); larger requests
    /// get RESOURCE_EXHAUSTED.
    #[arg(long, env = env::MAX_MESSAGE_BYTES, default_value_t = 1024 * 1024, value_name = "BYTES")]
    pub max_message_bytes: usize,
    /// Seconds a drain may take after SIGTERM: health turns NOT_SERVING, open streams are
    /// ended with UNAVAILABLE ("reconnect elsewhere"), unary calls get this long to finish.
    /// Keep Kubernetes' terminationGracePeriodSeconds longer.
    #[arg(long, env = env::SHUTDOWN_GRACE_SECS, default_value_t = 10, value_name = "SECS")]
    pub shutdown_grace_secs: u64,
    /// Log line format (`RUST_LOG` sets the filter, e.g. `info,switchboard_auth=debug`).
    #[arg(long, env = env::LOG_FORMAT, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Unary calls this instance serves at once; one more is shed at once with
    /// RESOURCE_EXHAUSTED (reason OVERLOADED, RetryInfo) instead of queueing without bound.
    /// Streams are not counted (see the per-user stream limits). 0: no limit.
    #[arg(long, env = env::MAX_CONCURRENT_REQUESTS, default_value_t = 1024, value_name = "N")]
    pub max_concurrent_requests: usize,
    /// Longest a unary call may run, in milliseconds, before it ends with
    /// DEADLINE_EXCEEDED (reason TIMEOUT); a client's shorter `grpc-timeout` still applies.
    /// 0: no limit.
    #[arg(long, env = env::UNARY_TIMEOUT_MS, default_value_t = 30_000, value_name = "MS")]
    pub unary_timeout_ms: u64,
    /// Longest a new connection may take to send its first 24 bytes (the HTTP/2 preface,
    /// or a TLS hello), in milliseconds, before it is closed: idle sockets cannot pile up.
    /// 0: no limit.
    #[arg(long, env = env::HANDSHAKE_TIMEOUT_MS, default_value_t = 10_000, value_name = "MS")]
    pub handshake_timeout_ms: u64,
    /// HTTP/2 streams (calls) one connection may have open at once, announced to the client
    /// in SETTINGS_MAX_CONCURRENT_STREAMS; a client opens more only as earlier ones end.
    /// Bounds what one connection can hold on an instance. 1 to 1000000.
    #[arg(long, env = env::MAX_STREAMS_PER_CONNECTION, default_value_t = 1000, value_name = "N")]
    pub max_streams_per_connection: u32,
    /// Web origins whose pages may call this server with gRPC-Web (CORS), comma-separated,
    /// each `scheme://host[:port]` (e.g. `https://shop.example,http://localhost:8080`).
    /// Unset or empty: none (gRPC-Web still answers callers that are not browsers, and
    /// native gRPC is unaffected).
    #[arg(long, env = env::CORS_ALLOWED_ORIGINS, value_name = "ORIGINS", default_value = "")]
    pub cors_allowed_origins: String,
}

/// Validated server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on.
    pub listen_addr: SocketAddr,
    /// Where `/metrics` is served; `None`: not at all.
    pub metrics_addr: Option<SocketAddr>,
    /// PEM certificate chain and key, when TLS is on.
    pub tls: Option<TlsFiles>,
    /// Largest request message accepted, in bytes.
    pub max_message_bytes: usize,
    /// Time open calls get at shutdown.
    pub shutdown_grace: Duration,
    /// Log line format.
    pub log_format: LogFormat,
    /// The overload limits of the server.
    pub limits: ServerLimits,
    /// Origins allowed to call with gRPC-Web from a browser (CORS); empty: none.
    pub cors_allowed_origins: Vec<http::HeaderValue>,
}

/// Limits a public server needs; `None` is off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// Unary calls served at once before new ones are shed.
    pub max_concurrent_requests: Option<usize>,
    /// Longest a unary call may run.
    pub unary_timeout: Option<Duration>,
    /// Longest a connection may take to send its first bytes.
    pub handshake_timeout: Option<Duration>,
    /// HTTP/2 streams one connection may have open at once.
    pub max_streams_per_connection: u32,
}

impl Default for ServerLimits {
    /// The defaults of the settings.
    fn default() -> Self {
        Self {
            max_concurrent_requests: Some(1024),
            unary_timeout: Some(Duration::from_secs(30)),
            handshake_timeout: Some(Duration::from_secs(10)),
            max_streams_per_connection: 1000,
        }
    }
}

/// `Some(d)` unless `ms` is 0.
fn millis(ms: u64) -> Option<Duration> {
    (ms > 0).then(|| Duration::from_millis(ms))
}

/// The contents of the TLS certificate chain and key files.
#[derive(Clone)]
pub struct TlsFiles {
    /// PEM certificate chain.
    pub cert_pem: Vec<u8>,
    /// PEM private key.
    pub key_pem: Vec<u8>,
}

impl fmt::Debug for TlsFiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsFiles").finish_non_exhaustive()
    }
}

impl ServerArgs {
    /// Validates the settings, reading the TLS files; problems go to `problems`.
    pub fn validate(
        &self,
        listen_addr: SocketAddr,
        metrics_addr: MetricsAddr,
        problems: &mut Problems,
    ) -> ServerConfig {
        let tls = match (&self.tls_cert_file, &self.tls_key_file) {
            (None, None) => None,
            (Some(cert), Some(key)) => {
                let read = |path: &PathBuf, var: &str, problems: &mut Problems| {
                    std::fs::read(path)
                        .map_err(|e| {
                            problems.add(format!("{var}: cannot read {}: {e}", path.display()))
                        })
                        .ok()
                };
                match (
                    read(cert, env::TLS_CERT_FILE, problems),
                    read(key, env::TLS_KEY_FILE, problems),
                ) {
                    (Some(cert_pem), Some(key_pem)) => Some(TlsFiles { cert_pem, key_pem }),
                    _ => None,
                }
            }
            _ => {
                problems.add(format!(
                    "{} and {} must be set together",
                    env::TLS_CERT_FILE,
                    env::TLS_KEY_FILE
                ));
                None
            }
        };
        if self.max_message_bytes < 1024 {
            problems.add(format!(
                "{}: must be at least 1024 bytes",
                env::MAX_MESSAGE_BYTES
            ));
        }
        if !(1..=1_000_000).contains(&self.max_streams_per_connection) {
            problems.add(format!(
                "{}: must be 1 to 1000000",
                env::MAX_STREAMS_PER_CONNECTION
            ));
        }
        let cors_allowed_origins = cors_origins(&self.cors_allowed_origins, problems);
        if metrics_addr
            .0
            .is_some_and(|m| m.port() != 0 && m == listen_addr)
        {
            problems.add(format!(
                "{}: must differ from {} ({listen_addr})",
                env::METRICS_ADDR,
                env::LISTEN_ADDR
            ));
        }
        ServerConfig {
            listen_addr,
            metrics_addr: metrics_addr.0,
            tls,
            max_message_bytes: self.max_message_bytes,
            shutdown_grace: Duration::from_secs(self.shutdown_grace_secs),
            log_format: self.log_format,
            limits: ServerLimits {
                max_concurrent_requests: (self.max_concurrent_requests > 0)
                    .then_some(self.max_concurrent_requests),
                unary_timeout: millis(self.unary_timeout_ms),
                handshake_timeout: millis(self.handshake_timeout_ms),
                max_streams_per_connection: self.max_streams_per_connection,
            },
            cors_allowed_origins,
        }
    }
}

/// The origins of CORS_ALLOWED_ORIGINS, each `http://` or `https://` then a host and an
/// optional port, nothing after (a browser's `Origin` never has a path); problems go to
/// `problems`.
fn cors_origins(list: &str, problems: &mut Problems) -> Vec<http::HeaderValue> {
    let mut origins = Vec::new();
    for origin in list.split(',').map(str::trim).filter(|o| !o.is_empty()) {
        let host = origin
            .strip_prefix("https://")
            .or_else(|| origin.strip_prefix("http://"));
        let valid = host.is_some_and(|h| {
            !h.is_empty()
                && !h.contains(['/', '?', '#', '@'])
                && h.parse::<http::uri::Authority>().is_ok()
        });
        match http::HeaderValue::from_str(origin) {
            Ok(value) if valid => origins.push(value),
            _ => problems.add(format!(
                "{}: '{origin}' is not an origin; expected scheme://host[:port], e.g. https://shop.example",
                env::CORS_ALLOWED_ORIGINS
            )),
        }
    }
    origins
}

impl ServerConfig {
    /// Settings for tests and tools: plaintext on `listen_addr`, no metrics endpoint,
    /// defaults elsewhere.
    pub fn plain(listen_addr: SocketAddr) -> Self {
        Self {
            listen_addr,
            metrics_addr: None,
            tls: None,
            max_message_bytes: 1024 * 1024,
            shutdown_grace: Duration::from_secs(10),
            log_format: LogFormat::Text,
            limits: ServerLimits::default(),
            cors_allowed_origins: Vec::new(),
        }
    }
}

/// Where durable state and pub/sub live.
#[derive(Debug, Clone, clap::Args)]
pub struct StoreArgs {
    /// Redis URL (`redis://[:password@]host:port[/db]`). Unset: the embedded in-memory
    /// engine, for trying Switchboard on one machine (state is lost at exit and not shared
    /// between processes).
    #[arg(long, env = env::REDIS_URL, value_name = "URL")]
    pub redis_url: Option<Secret>,
    /// Seed nodes of a Redis Cluster (`redis://host:port,redis://host2:port`, passwords
    /// and `rediss://` for TLS as in REDIS_URL): selects the cluster engine, with sharded
    /// pub/sub. A few nodes are enough; the others are found from them. Set this or
    /// REDIS_URL, not both.
    #[arg(long, env = env::REDIS_CLUSTER_URLS, value_name = "URLS")]
    pub redis_cluster_urls: Option<Secret>,
}

/// The shared secret services present to each other: presence accepts it in place of a
/// user's token, messaging sends it to presence.
#[derive(Debug, Clone, clap::Args)]
pub struct ServiceTokenArgs {
    /// Shared secret (at least 32 characters) that messaging presents to presence for the
    /// support desk's routing; set the same value on both. Unset: presence refuses service
    /// calls, and consultations wait in the queue until an agent accepts one.
    #[arg(long, env = env::SERVICE_TOKEN, value_name = "SECRET", hide_env_values = true)]
    pub service_token: Option<Secret>,
}

/// Shortest service token accepted.
pub const MIN_SERVICE_TOKEN: usize = 32;

impl ServiceTokenArgs {
    /// Checks the token's length; problems go to `problems`.
    pub fn validate(&self, problems: &mut Problems) -> Option<Secret> {
        let token = self.service_token.clone()?;
        if token.expose().len() < MIN_SERVICE_TOKEN {
            problems.add(format!(
                "{}: must be at least {MIN_SERVICE_TOKEN} characters (e.g. `openssl rand -hex 32`)",
                env::SERVICE_TOKEN
            ));
        }
        Some(token)
    }
}

/// Which storage engine a service uses.
#[derive(Debug, Clone)]
pub enum Engine {
    /// In-process state; for `make run` and unit tests.
    Memory,
    /// Redis at this URL.
    Redis(Secret),
    /// A Redis Cluster seeded by these URLs.
    RedisCluster(Vec<Secret>),
}

impl StoreArgs {
    /// Validates the URL's form (no connection is made here).
    pub fn validate(&self, problems: &mut Problems) -> Engine {
        match (&self.redis_url, &self.redis_cluster_urls) {
            (None, None) => Engine::Memory,
            (Some(url), cluster) => {
                if cluster.is_some() {
                    problems.add(format!(
                        "{} and {}: set one of them (one Redis, or a Redis Cluster), not both",
                        env::REDIS_URL,
                        env::REDIS_CLUSTER_URLS
                    ));
                }
                if let Err(e) = redis::Client::open(url.expose()) {
                    problems.add(format!("{}: not a Redis URL: {e}", env::REDIS_URL));
                }
                Engine::Redis(url.clone())
            }
            (None, Some(urls)) => {
                let seeds: Vec<String> = urls
                    .expose()
                    .split(',')
                    .map(str::trim)
                    .filter(|u| !u.is_empty())
                    .map(str::to_owned)
                    .collect();
                if seeds.is_empty() {
                    problems.add(format!(
                        "{}: no URL given (comma-separated redis:// URLs of some cluster nodes)",
                        env::REDIS_CLUSTER_URLS
                    ));
                }
                for (i, seed) in seeds.iter().enumerate() {
                    if let Err(e) = redis::Client::open(seed.as_str()) {
                        problems.add(format!(
                            "{}: URL {} of {} is not a Redis URL: {e}",
                            env::REDIS_CLUSTER_URLS,
                            i + 1,
                            seeds.len()
                        ));
                    }
                }
                Engine::RedisCluster(seeds.into_iter().map(Secret::new).collect())
            }
        }
    }
}
