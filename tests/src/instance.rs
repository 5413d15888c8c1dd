//! Service instances for tests: in-process (same `run` as `main`, port 0) or child
//! processes of the built binaries (for kill -9 and signal tests).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use switchboard_common::config::{Engine, Secret};
use switchboard_common::shutdown::CancellationToken;
use switchboard_proto::auth::v1::auth_service_client::AuthServiceClient;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};

use crate::redis::RedisServer;

/// A lazily connecting channel to `addr` (plaintext).
pub fn channel(addr: SocketAddr) -> Channel {
    // The URI is built from a socket address, so it is always valid.
    Endpoint::from_shared(format!("http://{addr}"))
        .map(|e| {
            e.connect_timeout(Duration::from_secs(5))
                .tcp_nodelay(true)
                .connect_lazy()
        })
        .unwrap_or_else(|e| panic!("bad endpoint for {addr}: {e}"))
}

/// A service running inside the test process; stopped when dropped.
pub struct InProcess {
    /// Where it listens.
    pub addr: SocketAddr,
    shutdown: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl InProcess {
    /// Binds `127.0.0.1:0` and runs `run(listener, shutdown)` on it.
    pub async fn start<F, Fut>(run: F) -> anyhow::Result<Self>
    where
        F: FnOnce(tokio::net::TcpListener, CancellationToken) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(listener, shutdown.clone()));
        Ok(Self {
            addr,
            shutdown,
            task: Some(task),
        })
    }

    /// A channel to it.
    pub fn channel(&self) -> Channel {
        channel(self.addr)
    }

    /// Waits up to `limit` for `run` to return by itself (a refusal to start); what it
    /// returned, or `None` if it is still running.
    pub async fn exited(&mut self, limit: Duration) -> Option<anyhow::Result<()>> {
        let task = self.task.as_mut()?;
        let joined = tokio::time::timeout(limit, task).await.ok()?;
        self.task = None;
        Some(joined.map_err(anyhow::Error::from).and_then(|r| r))
    }

    /// Stops it and waits until it has exited; returns what `run` returned.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        match self.task.take() {
            Some(task) => task.await?,
            None => Ok(()),
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Options for an in-process auth instance.
#[derive(Clone)]
pub struct AuthOptions {
    /// Shared signing key (PEM); `None`: the instance makes its own and publishes it.
    pub signing_key_pem: Option<String>,
    /// Failed logins per username before limiting.
    pub per_user: u64,
    /// Failed logins per address before limiting.
    pub per_peer: u64,
    /// First admin.
    pub admin: Option<(String, String)>,
    /// Cheaper argon2 (tests that are not about hashing cost).
    pub cheap_hashing: bool,
    /// Largest request message.
    pub max_message_bytes: usize,
    /// TLS certificate and key PEM.
    pub tls: Option<(Vec<u8>, Vec<u8>)>,
    /// Registrations per address per window (0: no limit, the harness default, since
    /// tests register many users from loopback).
    pub registrations_per_peer: u64,
    /// Overload limits of the server.
    pub limits: switchboard_common::config::ServerLimits,
    /// Web origins allowed to call with gRPC-Web (CORS_ALLOWED_ORIGINS).
    pub cors_allowed_origins: Vec<String>,
    /// Guest sessions per address per window (0: no limit, the harness default).
    pub guests_per_peer: u64,
    /// A guest session's life past its last refresh (AUTH_GUEST_SESSION_TTL_SECS).
    pub guest_ttl: Duration,
}

impl Default for AuthOptions {
    fn default() -> Self {
        Self {
            signing_key_pem: None,
            per_user: 10,
            per_peer: 100,
            admin: None,
            cheap_hashing: true,
            max_message_bytes: 1024 * 1024,
            tls: None,
            registrations_per_peer: 0,
            limits: switchboard_common::config::ServerLimits::default(),
            cors_allowed_origins: Vec::new(),
            guests_per_peer: 0,
            guest_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

/// The service token every in-process instance shares (messaging → presence).
pub const SERVICE_TOKEN: &str = "test-service-token-0123456789abcdef0123456789";

/// Redis at `redis`, or the embedded engine with `None`.
pub fn engine(redis: Option<&RedisServer>) -> Engine {
    match redis {
        Some(r) => Engine::Redis(Secret::new(r.url())),
        None => Engine::Memory,
    }
}

/// An in-process auth instance on `redis` (or the memory engine with `None`).
pub async fn spawn_auth(
    redis: Option<&RedisServer>,
    options: AuthOptions,
) -> anyhow::Result<InProcess> {
    spawn_auth_on(engine(redis), options).await
}

/// An in-process auth instance on `engine`.
pub async fn spawn_auth_on(engine: Engine, options: AuthOptions) -> anyhow::Result<InProcess> {
    InProcess::start(move |listener, shutdown| {
        let mut config = switchboard_auth::Config::for_tests(
            listener
                .local_addr()
                .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0))),
            engine,
        );
        config.signing_key_pem = options.signing_key_pem.map(Secret::new);
        config.limits.per_user = options.per_user;
        config.limits.per_peer = options.per_peer;
        config.admin = options.admin.map(|(u, p)| (u, Secret::new(p)));
        if options.cheap_hashing {
            config.argon2.memory_kib = 1024;
            config.argon2.iterations = 1;
        }
        config.server.max_message_bytes = options.max_message_bytes;
        config.server.limits = options.limits;
        config.server.cors_allowed_origins = options
            .cors_allowed_origins
            .iter()
            .filter_map(|o| http::HeaderValue::from_str(o).ok())
            .collect();
        config.limits.registrations_per_peer =
            (options.registrations_per_peer > 0).then_some(options.registrations_per_peer);
        config.limits.guests_per_peer =
            (options.guests_per_peer > 0).then_some(options.guests_per_peer);
        config.guest_ttl = options.guest_ttl;
        config.server.tls = options
            .tls
            .map(|(cert_pem, key_pem)| switchboard_common::config::TlsFiles { cert_pem, key_pem });
        switchboard_auth::run(config, listener, shutdown)
    })
    .await
}

/// An auth client for `instance`.
pub fn auth_client(instance: &InProcess) -> AuthServiceClient<Channel> {
    AuthServiceClient::new(instance.channel())
}

/// Options for an in-process messaging instance.
#[derive(Clone)]
pub struct MessagingOptions {
    /// The presence instance the desk routes with (`None`: an unused address).
    pub presence: Option<SocketAddr>,
    /// Consultations routed to one agent at most (0: no limit).
    pub agent_capacity: u32,
    /// Deliveries a stream may have waiting before it is cut off.
    pub outbound_queue: usize,
    /// Sends per second per user.
    pub send_rate: f64,
    /// Send burst per user.
    pub send_burst: f64,
    /// Messages kept per conversation.
    pub history_retention: usize,
    /// Connect streams per user (`None`: no limit).
    pub max_streams_per_user: Option<usize>,
    /// Replicas a send waits for, and how long (REDIS_ACK_REPLICAS).
    pub ack_replicas: Option<(u32, Duration)>,
    /// A Connect stream's age limit (MESSAGING_MAX_STREAM_AGE_SECS).
    pub max_stream_age: Option<Duration>,
    /// A Subscribe stream's keep-alive period (MESSAGING_STREAM_KEEPALIVE_SECS).
    pub stream_keepalive: Duration,
}

impl Default for MessagingOptions {
    fn default() -> Self {
        Self {
            presence: None,
            agent_capacity: 5,
            outbound_queue: 1024,
            send_rate: 10_000.0,
            send_burst: 10_000.0,
            history_retention: 10_000,
            max_streams_per_user: Some(100),
            ack_replicas: None,
            max_stream_age: None,
            stream_keepalive: Duration::from_secs(25),
        }
    }
}

/// An in-process messaging instance on `redis` (memory engine with `None`), verifying
/// tokens with keys from the auth instance at `auth`.
pub async fn spawn_messaging(
    redis: Option<&RedisServer>,
    auth: SocketAddr,
    options: MessagingOptions,
) -> anyhow::Result<InProcess> {
    spawn_messaging_on(engine(redis), auth, options).await
}

/// An in-process messaging instance on `engine` (see [`spawn_messaging`]).
pub async fn spawn_messaging_on(
    engine: Engine,
    auth: SocketAddr,
    options: MessagingOptions,
) -> anyhow::Result<InProcess> {
    InProcess::start(move |listener, shutdown| {
        let addr = listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)));
        let mut config =
            switchboard_messaging::Config::for_tests(addr, engine, format!("http://{auth}"));
        config.outbound_queue = options.outbound_queue;
        config.send_limit.per_second = options.send_rate;
        config.send_limit.burst = options.send_burst;
        config.history_retention = options.history_retention;
        config.service_token = Some(Secret::new(SERVICE_TOKEN));
        config.agent_capacity = options.agent_capacity;
        config.max_streams_per_user = options.max_streams_per_user;
        config.ack_replicas = options.ack_replicas;
        config.max_stream_age = options.max_stream_age;
        config.stream_keepalive = options.stream_keepalive;
        // Without a presence instance, a closed port: never someone else's presence.
        config.presence_url = match options.presence {
            Some(presence) => format!("http://{presence}"),
            None => "http://127.0.0.1:1".into(),
        };
        switchboard_messaging::run(config, listener, shutdown)
    })
    .await
}

/// A messaging client for `instance`.
pub fn messaging_client(
    instance: &InProcess,
) -> switchboard_proto::messaging::v1::messaging_service_client::MessagingServiceClient<Channel> {
    switchboard_proto::messaging::v1::messaging_service_client::MessagingServiceClient::new(
        instance.channel(),
    )
}

/// An in-process presence instance on `redis` (memory engine with `None`) with the given
/// session TTL and sweep interval, verifying tokens with keys from the auth at `auth`.
pub async fn spawn_presence(
    redis: Option<&RedisServer>,
    auth: SocketAddr,
    ttl: Duration,
    sweep: Duration,
    grace: Duration,
) -> anyhow::Result<InProcess> {
    spawn_presence_with(redis, auth, ttl, sweep, grace, |_| {}).await
}

/// [`spawn_presence`], with `tweak` applied to the configuration last.
pub async fn spawn_presence_with(
    redis: Option<&RedisServer>,
    auth: SocketAddr,
    ttl: Duration,
    sweep: Duration,
    grace: Duration,
    tweak: impl FnOnce(&mut switchboard_presence::Config) + Send + 'static,
) -> anyhow::Result<InProcess> {
    spawn_presence_on(engine(redis), auth, (ttl, sweep, grace), tweak).await
}

/// An in-process presence instance on `engine` with (TTL, sweep interval, reconnect
/// grace), `tweak` applied to the configuration last.
pub async fn spawn_presence_on(
    engine: Engine,
    auth: SocketAddr,
    (ttl, sweep, grace): (Duration, Duration, Duration),
    tweak: impl FnOnce(&mut switchboard_presence::Config) + Send + 'static,
) -> anyhow::Result<InProcess> {
    InProcess::start(move |listener, shutdown| {
        let addr = listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)));
        let mut config =
            switchboard_presence::Config::for_tests(addr, engine, format!("http://{auth}"));
        config.ttl = ttl;
        config.sweep_interval = sweep;
        config.reconnect_grace = grace;
        config.service_token = Some(Secret::new(SERVICE_TOKEN));
        tweak(&mut config);
        switchboard_presence::run(config, listener, shutdown)
    })
    .await
}

/// A built service binary: next to the running executable (the bench binary in
/// `target/<profile>/`) or one level up (test executables in `target/<profile>/deps/`).
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let here = exe.parent().context("executable has no directory")?;
    for dir in [Some(here), here.parent()].into_iter().flatten() {
        let path = dir.join(name);
        if path.exists() {
            return Ok(path);
        }
    }
    bail!(
        "{name} is not built next to {}; run `cargo build --bins` first (make test does)",
        exe.display()
    )
}

/// Clears `cmd`'s environment but for what finding programs needs (`PATH`, `HOME`,
/// `PYENV_*`): a child of a test sees only the settings the test gives it, never the
/// developer's shell (a stray `REDIS_URL` or `SWITCHBOARD_OUTPUT`).
pub fn isolate(cmd: &mut Command) -> &mut Command {
    cmd.env_clear();
    for (k, v) in std::env::vars_os() {
        let keep = k == "PATH" || k == "HOME" || k.to_string_lossy().starts_with("PYENV_");
        if keep {
            cmd.env(k, v);
        }
    }
    cmd
}

/// A command running the built binary `name`, with an [`isolate`]d environment.
pub fn command(name: &str) -> anyhow::Result<Command> {
    let mut cmd = Command::new(binary(name)?);
    isolate(&mut cmd);
    Ok(cmd)
}

/// The address in a log line's field `name`: text or JSON lines, `addr=1.2.3.4:5` or
/// `"addr":"1.2.3.4:5"`.
fn logged_field(line: &str, name: &str) -> Option<SocketAddr> {
    [format!(" {name}="), format!("\"{name}\":\"")]
        .iter()
        .find_map(|k| line.split(k.as_str()).nth(1))
        .and_then(|a| a.split(|c: char| c.is_whitespace() || c == '"').next())
        .and_then(|a| a.parse::<SocketAddr>().ok())
}

/// A service binary running as a child process; killed (by PID) when dropped.
pub struct ChildService {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Where it serves `/metrics` (the harness sets `METRICS_ADDR=127.0.0.1:0`).
    pub metrics_addr: Option<SocketAddr>,
    output: Arc<Mutex<String>>,
}

impl ChildService {
    /// Starts `binary` with `env` (plus `LISTEN_ADDR` and `METRICS_ADDR` on
    /// `127.0.0.1:0`) and waits until it
    /// logs the address it listens on (an info line of `switchboard_common`, so a
    /// `RUST_LOG` given in `env` must keep it).
    pub fn spawn(binary_name: &str, env: &[(&str, String)]) -> anyhow::Result<Self> {
        let mut cmd = command(binary_name)?;
        cmd.env("LISTEN_ADDR", "127.0.0.1:0")
            .env("METRICS_ADDR", "127.0.0.1:0")
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
        let output = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel::<(bool, SocketAddr)>();
        let stdout = child.stdout.take().context("no stdout")?;
        let stderr = child.stderr.take().context("no stderr")?;
        for pipe in [
            Box::new(stdout) as Box<dyn std::io::Read + Send>,
            Box::new(stderr),
        ] {
            let output = output.clone();
            let tx = tx.clone();
            // Drains the pipe for the life of the child so it never blocks on a full pipe.
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    // Kept before it is announced, so `output()` has every line reported.
                    if let Ok(mut o) = output.lock() {
                        o.push_str(&line);
                        o.push('\n');
                    }
                    let field = |name: &str| logged_field(&line, name);
                    if let Some(addr) = field("metrics_addr") {
                        let _ = tx.send((true, addr));
                    }
                    if line.contains("listening")
                        && let Some(addr) = field("addr")
                    {
                        let _ = tx.send((false, addr));
                    }
                }
            });
        }
        let mut metrics_addr = None;
        let deadline = Instant::now() + Duration::from_secs(30);
        let listening = loop {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok((true, addr)) => metrics_addr = Some(addr),
                Ok((false, addr)) => break Some(addr),
                Err(_) => break None,
            }
        };
        match listening {
            Some(addr) => Ok(Self {
                child,
                addr,
                metrics_addr,
                output,
            }),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "{binary_name} did not report its address within 30 s; output:\n{}",
                    output.lock().map(|o| o.clone()).unwrap_or_default()
                )
            }
        }
    }

    /// A channel to it.
    pub fn channel(&self) -> Channel {
        channel(self.addr)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The address it logged as `field` (e.g. `auth_addr`), if it did.
    pub fn logged_addr(&self, field: &str) -> Option<SocketAddr> {
        self.output().lines().find_map(|l| logged_field(l, field))
    }

    /// Everything it printed, once it contains `needle` or `limit` has passed (its pipes
    /// are read on threads, so the last lines can come just after the process exits).
    pub fn output_with(&self, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let out = self.output();
            if out.contains(needle) || Instant::now() > deadline {
                return out;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything it printed so far.
    pub fn output(&self) -> String {
        self.output.lock().map(|o| o.clone()).unwrap_or_default()
    }

    /// `kill -9`: the crash case.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits up to `limit` for the exit status.
    pub fn terminate(&mut self, limit: Duration) -> anyhow::Result<ExitStatus> {
        self.signal_term()?;
        self.wait_exit(limit)
    }

    /// Sends SIGTERM (the start of a drain).
    pub fn signal_term(&self) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()?;
        if !status.success() {
            bail!("kill -TERM {} failed", self.pid());
        }
        Ok(())
    }

    /// Waits up to `limit` for the process to exit; its exit status.
    pub fn wait_exit(&mut self, limit: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("process {} still running after {limit:?}", self.pid());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ChildService {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Asserts that `binary_name --help` succeeds and lists every one of `vars` as the
/// environment variable of a setting, and every telemetry variable after the flags.
pub fn assert_help_lists(binary_name: &str, vars: &[&str]) {
    let bin = binary(binary_name).unwrap_or_else(|e| panic!("{binary_name}: {e}"));
    let out = isolate(&mut Command::new(&bin))
        .arg("--help")
        .output()
        .unwrap_or_else(|e| panic!("run {binary_name}: {e}"));
    assert!(out.status.success(), "{binary_name} --help failed");
    let help = String::from_utf8_lossy(&out.stdout);
    for var in vars {
        assert!(
            help.contains(&format!("[env: {var}")),
            "{binary_name} --help does not list {var}"
        );
    }
    let telemetry = help
        .split("Telemetry (environment only):")
        .nth(1)
        .unwrap_or_else(|| panic!("{binary_name} --help has no telemetry section"));
    for (var, _) in switchboard_common::telemetry::ENV {
        assert!(
            telemetry.lines().any(|l| l.trim_start().starts_with(var)),
            "{binary_name} --help does not list {var}"
        );
    }
}

/// Asserts that `binary_name` started with the bad settings `env` exits with 64 and
/// names every one of `named` in its report.
pub fn assert_bad_config_exits_64(binary_name: &str, env: &[(&str, &str)], named: &[&str]) {
    let bin = binary(binary_name).unwrap_or_else(|e| panic!("{binary_name}: {e}"));
    let out = isolate(&mut Command::new(&bin))
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("run {binary_name}: {e}"));
    assert_eq!(out.status.code(), Some(64), "{binary_name} with {env:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    for name in named {
        assert!(stderr.contains(name), "{name} not reported in:\n{stderr}");
    }
}
