//! `switchboard-bench`: Switchboard's benchmarks. Each run prints one JSON line per figure
//! on stdout; progress goes to stderr. Workloads are defined in `shared/design/BENCH.md`
//! and the README ("Benchmarks").
//!
//! - `auth`: access-token verifications per second on one core, and login latency
//!   (p50/p99) with the production argon2id parameters, against a private Redis.
//! - `fanout`: one group, subscribers split over messaging instances (separate
//!   processes), publishers at a fixed rate or with a window of unacknowledged sends.
//!   With `--send-ack`, the `send_ack` line instead: Send → SendResult latency on a
//!   publisher stream that also receives every delivery.
//! - `connections`: many idle Connect streams on one instance; memory per stream.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde_json::json;
use switchboard_common::bus::BoxFuture;
use switchboard_common::revocation::RevocationList;
use switchboard_common::token::{KeySource, PublicKey, Role, Verifier, now_secs};
use switchboard_proto::auth::v1 as pb;
use switchboard_tests::instance::{AuthOptions, auth_client, spawn_auth};
use switchboard_tests::redis::RedisServer;

/// Switchboard benchmarks (JSON lines on stdout, progress on stderr).
#[derive(Parser)]
#[command(name = "switchboard-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    workload: Workload,
}

#[derive(Subcommand)]
enum Workload {
    /// Token verification throughput (one core) and login latency.
    Auth {
        /// Seconds of token verification.
        #[arg(long, default_value_t = 5)]
        verify_secs: u64,
        /// Logins measured one after another.
        #[arg(long, default_value_t = 200)]
        logins: usize,
        /// Concurrent logins in the throughput run.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// A short run to check the benchmark itself works (used by `make test`).
        #[arg(long)]
        quick: bool,
    },
    /// One conversation, subscribers on several instances (BENCH.md `fanout`).
    Fanout {
        /// `fixed`: total rate --rate; `max`: each publisher keeps --window sends unacknowledged.
        #[arg(long, value_parser = ["fixed", "max"], default_value = "fixed")]
        mode: String,
        /// Subscriber streams, split evenly across instances.
        #[arg(long, default_value_t = 200)]
        subscribers: usize,
        /// Publishers, split across instances.
        #[arg(long, default_value_t = 4)]
        publishers: usize,
        /// Total messages per second in `fixed` mode.
        #[arg(long, default_value_t = 200.0)]
        rate: f64,
        /// Measured seconds (after 2 s of warm-up).
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// Unacknowledged sends per publisher in `max` mode.
        #[arg(long, default_value_t = 64)]
        window: usize,
        /// Messaging instances (separate processes).
        #[arg(long, default_value_t = 2)]
        instances: usize,
        /// Print the `send_ack` line instead: latency from a Send frame to its SendResult
        /// on a publisher stream that also receives every delivery (`fixed` mode only).
        #[arg(long)]
        send_ack: bool,
        /// Conversations; subscribers are split over them and publishers send to each in
        /// turn. More than 1 prints a `fanout_sharded` line.
        #[arg(long, default_value_t = 1)]
        conversations: usize,
        /// Run on a 3-master Redis Cluster (3 replicas) instead of one Redis.
        #[arg(long)]
        cluster: bool,
        /// REDIS_ACK_REPLICAS for the messaging instances (needs --cluster for replicas).
        #[arg(long, default_value_t = 0)]
        ack_replicas: u32,
        /// Subscribers read `Subscribe` over gRPC-Web on HTTP/1.1 (one connection each, as
        /// browsers do) instead of `Connect` over HTTP/2; prints a `fanout_web` line.
        #[arg(long)]
        web: bool,
    },
    /// Presence: state changes per second, and watch fan-out latency with many watchers
    /// across two instances.
    Presence {
        /// Watch streams, split over two instances.
        #[arg(long, default_value_t = 1000)]
        watchers: usize,
        /// Users every watcher follows, whose state changes.
        #[arg(long, default_value_t = 10)]
        subjects: usize,
        /// Changes per second in the fan-out run.
        #[arg(long, default_value_t = 50.0)]
        rate: f64,
        /// Measured seconds of each run.
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// Devices flipping state as fast as acknowledged in the throughput run.
        #[arg(long, default_value_t = 64)]
        devices: usize,
    },
    /// Many idle Connect streams on one instance (BENCH.md `connections`).
    Connections {
        /// Streams to open, each subscribed to its own direct conversation.
        #[arg(long, default_value_t = 10_000)]
        streams: usize,
        /// Streams being opened at once (as clients arrive; the peer keeps 200 in flight).
        #[arg(long, default_value_t = 200)]
        concurrency: usize,
    },
}

struct Fixed(Vec<PublicKey>);
impl KeySource for Fixed {
    fn fetch(&self) -> BoxFuture<'_, Result<Vec<PublicKey>, String>> {
        let keys = self.0.clone();
        Box::pin(async move { Ok(keys) })
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn round(v: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (v * f).round() / f
}

/// Verifies one token in a loop on a single-threaded runtime for `secs`.
fn bench_verify(secs: u64) -> anyhow::Result<serde_json::Value> {
    let keyring = switchboard_auth::signing::Keyring::generate(900)?;
    let (token, _) = keyring.issue(
        "0190a0b0-0000-7000-8000-000000000001",
        Role::Customer,
        "bench-session",
        now_secs(),
    )?;
    let verifier = Verifier::new(
        Arc::new(Fixed(vec![keyring.public().clone()])),
        Arc::new(RevocationList::default()),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        verifier
            .verify(&token)
            .await
            .context("warm-up verification")?;
        let started = Instant::now();
        let limit = Duration::from_secs(secs);
        let mut count: u64 = 0;
        while started.elapsed() < limit {
            for _ in 0..100 {
                verifier.verify(&token).await.context("verification")?;
            }
            count += 100;
        }
        let elapsed = started.elapsed().as_secs_f64();
        Ok(json!({
            "system": "switchboard", "bench": "token_verify", "threads": 1,
            "verifications": count, "duration_s": round(elapsed, 3),
            "verifications_per_s": round(count as f64 / elapsed, 1),
            "us_per_verification": round(elapsed * 1e6 / count as f64, 2),
        }))
    })
}

async fn bench_login(logins: usize, concurrency: usize) -> anyhow::Result<Vec<serde_json::Value>> {
    let redis = RedisServer::spawn()?;
    let options = AuthOptions {
        cheap_hashing: false,
        per_user: u64::MAX,
        per_peer: u64::MAX,
        ..AuthOptions::default()
    };
    let auth = spawn_auth(Some(&redis), options).await?;
    let defaults = switchboard_auth::Config::for_tests(
        "127.0.0.1:0".parse()?,
        switchboard_common::config::Engine::Memory,
    );
    let mut client = auth_client(&auth);
    client
        .register(pb::RegisterRequest {
            username: "bencher".into(),
            password: "bench password".into(),
            display_name: String::new(),
        })
        .await?;
    let login = pb::LoginRequest {
        username: "bencher".into(),
        password: "bench password".into(),
    };
    // Warm-up.
    for _ in 0..5 {
        client.login(login.clone()).await?;
    }
    let mut samples = Vec::with_capacity(logins);
    for i in 0..logins {
        let t = Instant::now();
        client.login(login.clone()).await?;
        samples.push(t.elapsed().as_secs_f64() * 1000.0);
        if i % 50 == 49 {
            eprintln!("login (sequential): {}/{logins}", i + 1);
        }
    }
    samples.sort_by(f64::total_cmp);
    let params = json!({"algorithm": "argon2id", "memory_kib": defaults.argon2.memory_kib, "iterations": defaults.argon2.iterations, "parallelism": 1});
    let sequential = json!({
        "system": "switchboard", "bench": "login", "concurrency": 1, "logins": logins,
        "argon2": params.clone(), "hash_concurrency": defaults.hash_concurrency,
        "latency_ms": {"p50": round(percentile(&samples, 50.0), 2), "p99": round(percentile(&samples, 99.0), 2),
                       "max": round(samples.last().copied().unwrap_or(0.0), 2)},
    });

    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let mut c = auth_client(&auth);
        let login = login.clone();
        let per = logins.div_ceil(concurrency);
        tasks.spawn(async move {
            let mut lat = Vec::with_capacity(per);
            for _ in 0..per {
                let t = Instant::now();
                c.login(login.clone()).await?;
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            Ok::<_, tonic::Status>(lat)
        });
    }
    let mut all = Vec::new();
    while let Some(r) = tasks.join_next().await {
        all.extend(r??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_by(f64::total_cmp);
    let concurrent = json!({
        "system": "switchboard", "bench": "login", "concurrency": concurrency, "logins": all.len(),
        "argon2": params, "hash_concurrency": defaults.hash_concurrency,
        "logins_per_s": round(all.len() as f64 / elapsed, 1),
        "latency_ms": {"p50": round(percentile(&all, 50.0), 2), "p99": round(percentile(&all, 99.0), 2),
                       "max": round(all.last().copied().unwrap_or(0.0), 2)},
    });
    auth.stop().await?;
    Ok(vec![sequential, concurrent])
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.workload {
        Workload::Fanout {
            mode,
            subscribers,
            publishers,
            rate,
            duration,
            window,
            instances,
            send_ack,
            conversations,
            cluster,
            ack_replicas,
            web,
        } => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let params = switchboard_tests::bench::Fanout {
                max_mode: mode == "max",
                subscribers,
                publishers,
                rate,
                duration,
                window,
                instances,
                ack_probe: send_ack,
                conversations,
                cluster,
                ack_replicas,
                web,
            };
            println!("{}", rt.block_on(switchboard_tests::bench::fanout(params))?);
        }
        Workload::Presence {
            watchers,
            subjects,
            rate,
            duration,
            devices,
        } => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let params = switchboard_tests::bench_presence::PresenceBench {
                watchers,
                subjects: subjects.max(1),
                rate,
                duration,
                devices: devices.max(1),
            };
            for line in rt.block_on(switchboard_tests::bench_presence::presence(params))? {
                println!("{line}");
            }
        }
        Workload::Connections {
            streams,
            concurrency,
        } => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            println!(
                "{}",
                rt.block_on(switchboard_tests::bench::connections(streams, concurrency))?
            );
        }
        Workload::Auth {
            verify_secs,
            logins,
            concurrency,
            quick,
        } => {
            let (verify_secs, logins) = if quick {
                (1, 10)
            } else {
                (verify_secs, logins)
            };
            eprintln!("token_verify: {verify_secs} s on one thread…");
            println!("{}", bench_verify(verify_secs)?);
            eprintln!("login: {logins} sequential, then {logins} with concurrency {concurrency}…");
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            for line in rt.block_on(bench_login(logins, concurrency.max(1)))? {
                println!("{line}");
            }
        }
    }
    Ok(())
}
