//! Presence benchmarks: state changes per second, and watch fan-out latency with many
//! watchers spread over two presence instances (separate processes on one Redis).
//!
//! Each change carries its send time in the custom text (micros since the run's start, one
//! process's clock), so a watcher's receive time minus it is the change's fan-out latency.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use serde_json::json;
use switchboard_proto::auth::v1::WhoAmIRequest;
use switchboard_proto::presence::v1 as pb;
use switchboard_proto::presence::v1::presence_service_client::PresenceServiceClient;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::auth::{authed, register_and_login};
use crate::instance::{AuthOptions, ChildService, InProcess, auth_client, spawn_auth};
use crate::redis::RedisServer;

/// Presence workload parameters.
#[derive(Debug, Clone)]
pub struct PresenceBench {
    /// Watch streams, split evenly over the instances.
    pub watchers: usize,
    /// Users whose presence changes; every watcher watches all of them.
    pub subjects: usize,
    /// Changes per second in the fan-out run.
    pub rate: f64,
    /// Measured seconds of each run.
    pub duration: u64,
    /// Devices flipping state as fast as acknowledged in the throughput run.
    pub devices: usize,
}

fn presence_process(redis: &RedisServer, auth: &InProcess) -> anyhow::Result<ChildService> {
    ChildService::spawn(
        "switchboard-presence",
        &[
            ("REDIS_URL", redis.url()),
            ("AUTH_URL", format!("http://{}", auth.addr)),
            (
                "RUST_LOG",
                "warn,switchboard_common=info,switchboard_presence=info".into(),
            ),
        ],
    )
}

async fn user(auth: &InProcess, name: &str) -> anyhow::Result<(String, String)> {
    let mut c = auth_client(auth);
    let t = register_and_login(&mut c, name).await?;
    let me = c
        .who_am_i(authed(WhoAmIRequest {}, &t.access_token))
        .await?
        .into_inner()
        .user
        .context("user")?;
    Ok((me.id, t.access_token))
}

/// A device: its frame sender and its response stream.
type Device = (
    mpsc::Sender<pb::ConnectRequest>,
    tonic::Streaming<pb::ConnectResponse>,
);

async fn device(server: &ChildService, token: &str) -> anyhow::Result<Device> {
    let (tx, rx) = mpsc::channel(16);
    let mut stream = PresenceServiceClient::new(server.channel())
        .connect(authed(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            token,
        ))
        .await?
        .into_inner();
    stream.message().await?.context("no Connected frame")?;
    Ok((tx, stream))
}

fn set_state(state: pb::PresenceState, text: String) -> pb::ConnectRequest {
    pb::ConnectRequest {
        frame: Some(pb::connect_request::Frame::SetState(pb::SetState {
            state: state as i32,
            custom_text: text,
            device_name: String::new(),
        })),
    }
}

fn flip(i: u64) -> pb::PresenceState {
    if i.is_multiple_of(2) {
        pb::PresenceState::Away
    } else {
        pb::PresenceState::Available
    }
}

/// Runs both presence workloads; their JSON lines.
pub async fn presence(p: PresenceBench) -> anyhow::Result<Vec<serde_json::Value>> {
    let redis = RedisServer::spawn()?;
    let auth = spawn_auth(
        Some(&redis),
        AuthOptions {
            per_peer: u64::MAX,
            ..AuthOptions::default()
        },
    )
    .await?;
    let servers = [
        presence_process(&redis, &auth)?,
        presence_process(&redis, &auth)?,
    ];
    // The first `subjects` users are watched; the next `devices` flip in the throughput run.
    let mut subjects = Vec::with_capacity(p.subjects + p.devices);
    for i in 0..p.subjects + p.devices {
        subjects.push(user(&auth, &format!("subject{i}")).await?);
    }
    let (_, watcher_token) = user(&auth, "watcher").await?;

    // Throughput: devices flip state, each waiting for its echo, for the duration.
    eprintln!("presence: {} devices flipping state…", p.devices);
    let stop = CancellationToken::new();
    let changes = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, (_, token)) in subjects.iter().skip(p.subjects).enumerate() {
        let (tx, mut rx) = device(&servers[i % 2], token).await?;
        let (stop, changes) = (stop.clone(), changes.clone());
        tasks.spawn(async move {
            let mut n = 0u64;
            while !stop.is_cancelled() {
                if tx.send(set_state(flip(n), String::new())).await.is_err() {
                    break;
                }
                // The echo: the user's presence after the change.
                loop {
                    match rx.message().await {
                        Ok(Some(pb::ConnectResponse {
                            frame: Some(pb::connect_response::Frame::Presence(_)),
                        })) => break,
                        Ok(Some(_)) => {}
                        _ => return,
                    }
                }
                n += 1;
                changes.fetch_add(1, Ordering::Relaxed);
            }
            drop(tx);
        });
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let c0 = changes.load(Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(p.duration)).await;
    let done = changes.load(Ordering::Relaxed) - c0;
    let secs = started.elapsed().as_secs_f64();
    stop.cancel();
    while tokio::time::timeout(Duration::from_secs(5), tasks.join_next())
        .await
        .ok()
        .flatten()
        .is_some()
    {}
    let throughput = json!({
        "system": "switchboard",
        "bench": "presence_changes",
        "instances": 2,
        "devices": p.devices,
        "duration_s": p.duration,
        "changes": done,
        "changes_per_s": (done as f64 / secs * 10.0).round() / 10.0,
    });
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Fan-out: watchers on both instances follow every subject; changes at a fixed rate.
    eprintln!(
        "presence: {} watchers of {} users, {} changes/s…",
        p.watchers, p.subjects, p.rate
    );
    let t0 = Instant::now();
    let ids: Vec<String> = subjects
        .iter()
        .take(p.subjects)
        .map(|(id, _)| id.clone())
        .collect();
    let stop = CancellationToken::new();
    let mut watchers = tokio::task::JoinSet::new();
    let ready = Arc::new(AtomicU64::new(0));
    let mut channels = [servers[0].channel(), servers[1].channel()];
    for w in 0..p.watchers {
        // 100 watch streams per HTTP/2 connection, as a client library would multiplex.
        if w.is_multiple_of(200) {
            channels = [servers[0].channel(), servers[1].channel()];
        }
        let mut stream = PresenceServiceClient::new(channels[w % 2].clone())
            .watch(authed(
                pb::WatchRequest {
                    user_ids: ids.clone(),
                    role: 0,
                },
                &watcher_token,
            ))
            .await?
            .into_inner();
        let (stop, ready) = (stop.clone(), ready.clone());
        watchers.spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
                .unwrap_or_else(|e| panic!("histogram: {e}"));
            let mut got = 0u64;
            ready.fetch_add(1, Ordering::Relaxed);
            loop {
                let msg = tokio::select! {
                    _ = stop.cancelled() => break,
                    m = stream.message() => m,
                };
                match msg {
                    Ok(Some(pb::WatchResponse {
                        event: Some(pb::watch_response::Event::Change(c)),
                    })) => {
                        if let Some(sent) = c.custom_text.strip_prefix("t=")
                            && let Ok(sent) = sent.parse::<u64>()
                        {
                            let now = t0.elapsed().as_micros() as u64;
                            let _ = hist.record(now.saturating_sub(sent).max(1));
                            got += 1;
                        }
                    }
                    Ok(Some(_)) => {}
                    _ => break,
                }
            }
            (hist, got)
        });
        if w % 100 == 99 {
            eprint!("\rwatchers: {}/{}", w + 1, p.watchers);
        }
    }
    eprintln!();
    let mut devices = Vec::with_capacity(p.subjects);
    for (i, (_, token)) in subjects.iter().take(p.subjects).enumerate() {
        let (tx, rx) = device(&servers[i % 2], token).await?;
        devices.push((tx, rx));
    }
    // Let the devices' online changes reach everyone before timing.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let period = Duration::from_secs_f64(1.0 / p.rate.max(0.1));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let end = Instant::now() + Duration::from_secs(p.duration);
    let mut sent = 0u64;
    while Instant::now() < end {
        tick.tick().await;
        let (tx, _) = &devices[sent as usize % devices.len()];
        let text = format!("t={}", t0.elapsed().as_micros());
        // The state flips each round over all subjects, so every SetState is a change.
        let round = sent / devices.len() as u64;
        if tx.send(set_state(flip(round), text)).await.is_err() {
            break;
        }
        sent += 1;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.cancel();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut delivered = 0;
    while let Some(r) = watchers.join_next().await {
        let (h, got) = r?;
        hist.add(&h)?;
        delivered += got;
    }
    drop(devices);
    let expected = sent * p.watchers as u64;
    let fanout = json!({
        "system": "switchboard",
        "bench": "presence_watch",
        "instances": 2,
        "watchers": p.watchers,
        "subjects": p.subjects,
        "rate_target": p.rate,
        "duration_s": p.duration,
        "changes": sent,
        "expected": expected,
        "delivered": delivered,
        "lost": expected.saturating_sub(delivered),
        "latency_us": {
            "p50": hist.value_at_quantile(0.50),
            "p90": hist.value_at_quantile(0.90),
            "p99": hist.value_at_quantile(0.99),
            "max": hist.max(),
        },
    });
    auth.stop().await?;
    Ok(vec![throughput, fanout])
}
