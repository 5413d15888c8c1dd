//! `switchboard-server`: auth, presence and messaging in one process, on one engine.
//!
//! This is what `make run` starts when no Redis is configured. The three services keep
//! their own ports (so every client, printed walk-through and grpcurl line works
//! unchanged) but share one [`Backend`]: with the embedded in-memory engine, a logout at
//! auth ends streams at messaging and presence, and the desk sees agents' presence,
//! exactly as separate processes do through Redis. With `REDIS_URL` it runs the same three
//! services on Redis, which suits a small deployment; larger ones run the three binaries
//! separately, several instances each.
//!
//! It binds all three ports before serving anything, and exits non-zero naming the port
//! when one cannot be bound.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::ExitCode;

use clap::Parser;
use rand_core::RngCore;
use switchboard_common::backend::Backend;
use switchboard_common::config::{ConfigError, MetricsAddr, Parsed, StoreArgs, env, parse_args};
use tokio::net::TcpListener;

const ABOUT: &str = "Switchboard in one process: auth, presence and messaging on one shared engine";

const LONG_ABOUT: &str = "Switchboard in one process: auth, presence and messaging on one shared \
engine, each on its own port.

Without REDIS_URL the engine is embedded and in memory: logout, revocation, presence and the \
support desk behave exactly as with Redis, but every account, message and session is lost \
when the process stops. With REDIS_URL the state lives in Redis.

Every other setting is read from the same environment variables as the separate binaries \
(see switchboard-auth --help, switchboard-presence --help, switchboard-messaging --help); \
their LISTEN_ADDR, METRICS_ADDR, AUTH_URL and PRESENCE_URL are replaced by the flags below. \
SERVICE_TOKEN, if unset, is generated for this process.";

/// The process's own settings; the services' settings come from their variables.
#[derive(Debug, Parser)]
#[command(
    name = "switchboard-server",
    version,
    about = ABOUT,
    long_about = LONG_ABOUT,
    after_help = switchboard_common::telemetry::env_help()
)]
struct Args {
    /// Address the auth service listens on.
    #[arg(long, env = "AUTH_ADDR", default_value = "127.0.0.1:50051")]
    auth_addr: SocketAddr,
    /// Address the presence service listens on.
    #[arg(long, env = "PRESENCE_ADDR", default_value = "127.0.0.1:50052")]
    presence_addr: SocketAddr,
    /// Address the messaging service listens on.
    #[arg(long, env = "MESSAGING_ADDR", default_value = "127.0.0.1:50053")]
    messaging_addr: SocketAddr,
    /// Address of the process's Prometheus `/metrics` endpoint (all three services), or `off`.
    #[arg(long, env = env::METRICS_ADDR, default_value = "127.0.0.1:9464")]
    metrics_addr: MetricsAddr,
    #[command(flatten)]
    store: StoreArgs,
}

/// The three services' validated configurations.
struct Configs {
    auth: switchboard_auth::Config,
    presence: switchboard_presence::Config,
    messaging: switchboard_messaging::Config,
}

#[tokio::main]
async fn main() -> ExitCode {
    let parsed: Parsed<Args> = parse_args();
    let own = parsed.validate(|args| {
        let mut problems = switchboard_common::config::Problems::default();
        let engine = args.store.validate(&mut problems);
        problems.finish((args, engine))
    });
    // The services' settings are checked now too (with the ports not yet bound), so that
    // every problem is reported at once.
    let planned = match &own {
        Ok((a, _)) => [a.auth_addr, a.presence_addr, a.messaging_addr],
        Err(_) => [SocketAddr::from((Ipv4Addr::LOCALHOST, 0)); 3],
    };
    let (args, engine) = match (own, configs(&planned)) {
        (Ok(own), Ok(_)) => own,
        (own, services) => {
            let mut problems = own.err().map(|e| e.0).unwrap_or_default();
            problems.extend(services.err().map(|e| e.0).unwrap_or_default());
            ConfigError(problems).exit()
        }
    };

    // Every port first: nothing is served unless all three can be.
    let mut listeners = Vec::new();
    for (service, addr) in [
        ("auth", args.auth_addr),
        ("presence", args.presence_addr),
        ("messaging", args.messaging_addr),
    ] {
        match TcpListener::bind(addr).await {
            Ok(l) => listeners.push(l),
            Err(e) => {
                eprintln!("switchboard-server: cannot listen on {addr} for {service}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let bound: Vec<SocketAddr> = match listeners.iter().map(|l| l.local_addr()).collect() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("switchboard-server: cannot read a listening address: {e}");
            return ExitCode::FAILURE;
        }
    };
    let configs = configs(&bound).unwrap_or_else(|e| e.exit());
    let (Some(messaging_listener), Some(presence_listener), Some(auth_listener)) =
        (listeners.pop(), listeners.pop(), listeners.pop())
    else {
        return ExitCode::FAILURE;
    };

    let telemetry = match switchboard_common::telemetry::init(
        "switchboard-server",
        configs.auth.server.log_format,
    ) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("switchboard-server: cannot start telemetry: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(addr) = args.metrics_addr.0 {
        match switchboard_common::metrics::serve(addr).await {
            Ok(Some(bound)) => {
                tracing::info!(metrics_addr = %bound, "metrics at http://{bound}/metrics")
            }
            Ok(None) => {}
            Err(e) => {
                eprintln!("switchboard-server: cannot serve metrics on {addr}: {e:#}");
                telemetry.shutdown();
                return ExitCode::FAILURE;
            }
        }
    }

    let configs_grace = configs.auth.server.shutdown_grace;
    let shutdown = switchboard_common::shutdown::on_signal();
    let backend = match Backend::start(&engine, &shutdown) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("switchboard-server: cannot start the engine: {e:#}");
            telemetry.shutdown();
            return ExitCode::FAILURE;
        }
    };
    let mut services = tokio::task::JoinSet::new();
    services.spawn(named(
        "auth",
        switchboard_auth::run_on(
            configs.auth,
            auth_listener,
            shutdown.clone(),
            backend.clone(),
        ),
    ));
    services.spawn(named(
        "presence",
        switchboard_presence::run_on(
            configs.presence,
            presence_listener,
            shutdown.clone(),
            backend.clone(),
        ),
    ));
    services.spawn(named(
        "messaging",
        switchboard_messaging::run_on(
            configs.messaging,
            messaging_listener,
            shutdown.clone(),
            backend,
        ),
    ));
    tracing::info!(
        auth_addr = %bound[0],
        presence_addr = %bound[1],
        addr = %bound[2],
        engine = if matches!(engine, switchboard_common::config::Engine::Memory) { "embedded (state is lost at exit)" } else { "redis" },
        "switchboard-server listening (addr is messaging's)"
    );

    // One service ending (a failure, or a stop nobody asked for) stops the others.
    let mut failed = false;
    while let Some(joined) = services.join_next().await {
        let (service, result) = match joined {
            Ok(r) => r,
            Err(e) => ("a service", Err(anyhow::anyhow!("its task ended: {e}"))),
        };
        if let Err(e) = result {
            eprintln!("switchboard-server: {service} failed: {e:#}");
            failed = true;
        } else if !shutdown.is_cancelled() {
            tracing::warn!(service, "stopped by itself; stopping the others");
        }
        shutdown.cancel();
    }
    switchboard_common::server::background_tasks(configs_grace).await;
    telemetry.shutdown();
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

async fn named(
    service: &'static str,
    run: impl Future<Output = anyhow::Result<()>>,
) -> (&'static str, anyhow::Result<()>) {
    (service, run.await)
}

/// Each service's configuration from its own environment variables, with the addresses
/// this process bound (`bound`: auth, presence, messaging); every problem of the three at
/// once.
fn configs(bound: &[SocketAddr]) -> Result<Configs, ConfigError> {
    let url = |a: &SocketAddr| {
        // A wildcard listen address is reached on loopback from inside the process.
        let host = if a.ip().is_unspecified() {
            Ipv4Addr::LOCALHOST.into()
        } else {
            a.ip()
        };
        format!("http://{}", SocketAddr::new(host, a.port()))
    };
    let (auth_url, presence_url) = (url(&bound[0]), url(&bound[1]));
    let service_token = std::env::var(env::SERVICE_TOKEN).unwrap_or_else(|_| {
        let mut bytes = [0u8; 24];
        rand_core::OsRng.fill_bytes(&mut bytes);
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    });
    let mut problems: Vec<String> = Vec::new();
    let mut keep = |e: ConfigError| {
        for p in e.0 {
            if !problems.contains(&p) {
                problems.push(p);
            }
        }
    };
    let listen = |a: &SocketAddr| a.to_string();
    let auth = switchboard_common::config::try_parse_env::<switchboard_auth::Args>(&[
        "--listen-addr",
        &listen(&bound[0]),
        "--metrics-addr",
        "off",
    ])
    .and_then(|a| a.validate(switchboard_auth::Args::validate))
    .map_err(&mut keep)
    .ok();
    let presence = switchboard_common::config::try_parse_env::<switchboard_presence::Args>(&[
        "--listen-addr",
        &listen(&bound[1]),
        "--metrics-addr",
        "off",
        "--auth-url",
        &auth_url,
        "--service-token",
        &service_token,
    ])
    .and_then(|a| a.validate(switchboard_presence::Args::validate))
    .map_err(&mut keep)
    .ok();
    let messaging = switchboard_common::config::try_parse_env::<switchboard_messaging::Args>(&[
        "--listen-addr",
        &listen(&bound[2]),
        "--metrics-addr",
        "off",
        "--auth-url",
        &auth_url,
        "--presence-url",
        &presence_url,
        "--service-token",
        &service_token,
    ])
    .and_then(|a| a.validate(switchboard_messaging::Args::validate))
    .map_err(&mut keep)
    .ok();
    match (auth, presence, messaging) {
        (Some(auth), Some(presence), Some(messaging)) if problems.is_empty() => Ok(Configs {
            auth,
            presence,
            messaging,
        }),
        _ => Err(ConfigError(problems)),
    }
}
