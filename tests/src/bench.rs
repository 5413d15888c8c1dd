//! Benchmark workloads of `shared/design/BENCH.md`, run by the `switchboard-bench` binary.
//!
//! Messaging instances run as separate processes (the built binary) so their CPU time can
//! be read from `/proc/<pid>/stat` and compared with other servers; Redis and auth are
//! started by the benchmark too (auth only mints tokens before timing starts).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use serde_json::json;
use switchboard_proto::messaging::v1 as pb;
use switchboard_proto::messaging::v1::connect_request::Frame as In;
use switchboard_proto::messaging::v1::connect_response::Frame as Out;
use tokio::sync::Semaphore;

use crate::auth::{authed, register_and_login};
use crate::instance::{AuthOptions, ChildService, InProcess, auth_client, spawn_auth_on};
use crate::messaging::Connection;
use crate::redis::{Backing, RedisCluster, RedisServer};

/// Fan-out parameters (BENCH.md names).
#[derive(Debug, Clone)]
pub struct Fanout {
    /// `fixed` (rate R) or `max` (window W per publisher).
    pub max_mode: bool,
    /// Subscriber streams, split across instances.
    pub subscribers: usize,
    /// Publishers, split across instances.
    pub publishers: usize,
    /// Total publish rate in `fixed` mode (messages per second).
    pub rate: f64,
    /// Measured seconds.
    pub duration: u64,
    /// Unacknowledged sends per publisher in `max` mode.
    pub window: usize,
    /// Messaging instances.
    pub instances: usize,
    /// `send_ack`: the first publisher also subscribes to the group (so its stream receives
    /// every delivery) and times each of its sends until its SendResult arrives. The
    /// result is the `send_ack` line, not the fanout line (one more delivery stream would
    /// change BENCH.md's workload).
    pub ack_probe: bool,
    /// Conversations (1: BENCH.md's `fanout`; more: `fanout_sharded`): subscriber `i`
    /// follows conversation `i % conversations`, every publisher is in all of them and
    /// sends to them in turn.
    pub conversations: usize,
    /// A 3-master Redis Cluster (3 replicas) instead of one Redis.
    pub cluster: bool,
    /// REDIS_ACK_REPLICAS for the messaging instances (0: off).
    pub ack_replicas: u32,
    /// Subscribers read `Subscribe` over gRPC-Web (HTTP/1.1) instead of `Connect`.
    pub web: bool,
}

/// A subscriber's stream of `conversation` after `since`: `Connect` over HTTP/2, or
/// `Subscribe` over gRPC-Web on HTTP/1.1 with `web`.
async fn follow(
    server: &ChildService,
    token: &str,
    conversation: &str,
    since: u64,
    web: bool,
) -> anyhow::Result<Connection> {
    if web {
        let from = crate::messaging::from(conversation, since);
        return Ok(Connection::subscribed_web(server.addr, token, vec![from]).await?);
    }
    let conn = Connection::open(server.channel(), token).await?;
    conn.subscribe(conversation, since).await?;
    Ok(conn)
}

const PAYLOAD_BYTES: usize = 100;

/// Records the latency of the probe's send that `result` acknowledges.
fn record_ack(
    pending: &mut std::collections::HashMap<String, Instant>,
    acks: &mut Histogram<u64>,
    result: &pb::SendResult,
) {
    if let Some(at) = pending.remove(&result.client_msg_id) {
        let _ = acks.record((at.elapsed().as_micros() as u64).max(1));
    }
}
const WARMUP: Duration = Duration::from_secs(2);

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// CPU seconds (user + system) a process has used, from `/proc/<pid>/stat`.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("bad stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11).context("utime")?.parse()?;
    let stime: f64 = fields.get(12).context("stime")?.parse()?;
    Ok((utime + stime) / clock_ticks())
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// Resident memory of a process in KiB, from `/proc/<pid>/status`.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("VmRSS value")?
        .parse()?)
}

fn progress(label: &str, done: f64, total: f64) {
    let width = 30;
    let filled = ((done / total).clamp(0.0, 1.0) * width as f64) as usize;
    eprint!(
        "\r{label} [{}{}] {done:.0}/{total:.0} s",
        "#".repeat(filled),
        " ".repeat(width - filled)
    );
    if done >= total {
        eprintln!();
    }
}

/// Registers and logs in `n` users, 16 at a time; (id, access token) in order.
async fn users(auth: &InProcess, prefix: &str, n: usize) -> anyhow::Result<Vec<(String, String)>> {
    let mut out: Vec<Option<(String, String)>> = vec![None; n];
    let mut tasks = tokio::task::JoinSet::new();
    let mut next = 0;
    let mut done = 0;
    while done < n {
        while next < n && tasks.len() < 16 {
            let (i, name, mut c) = (next, format!("{prefix}{next}"), auth_client(auth));
            tasks.spawn(async move {
                let t = register_and_login(&mut c, &name).await?;
                let me = c
                    .who_am_i(authed(
                        switchboard_proto::auth::v1::WhoAmIRequest {},
                        &t.access_token,
                    ))
                    .await?;
                Ok::<_, anyhow::Error>((
                    i,
                    me.into_inner().user.context("user")?.id,
                    t.access_token,
                ))
            });
            next += 1;
        }
        if let Some(r) = tasks.join_next().await {
            let (i, id, token) = r??;
            out[i] = Some((id, token));
            done += 1;
            if done % 500 == 0 {
                eprint!("\rusers: {done}/{n}");
            }
        }
    }
    if n >= 500 {
        eprintln!();
    }
    out.into_iter().map(|u| u.context("missing user")).collect()
}

fn messaging_process(
    redis: &Backing,
    auth: &InProcess,
    ack_replicas: u32,
) -> anyhow::Result<ChildService> {
    let store = match redis {
        Backing::One(r) => ("REDIS_URL", r.url()),
        Backing::Cluster(c) => ("REDIS_CLUSTER_URLS", c.urls().join(",")),
    };
    ChildService::spawn(
        "switchboard-messaging",
        &[
            store,
            ("REDIS_ACK_REPLICAS", ack_replicas.to_string()),
            ("AUTH_URL", format!("http://{}", auth.addr)),
            (
                "RUST_LOG",
                "warn,switchboard_common=info,switchboard_messaging=info".into(),
            ),
            ("MESSAGING_SEND_RATE_PER_SEC", "1000000".into()),
            ("MESSAGING_SEND_BURST", "1000000".into()),
        ],
    )
}

/// Runs the fan-out workload and returns its JSON line.
pub async fn fanout(p: Fanout) -> anyhow::Result<serde_json::Value> {
    if p.instances == 0 || p.publishers == 0 || p.subscribers == 0 || p.conversations == 0 {
        bail!("instances, publishers, subscribers and conversations must be at least 1");
    }
    if !p.subscribers.is_multiple_of(p.conversations) {
        bail!("subscribers must be a multiple of conversations");
    }
    let redis = if p.cluster {
        Backing::Cluster(RedisCluster::spawn()?)
    } else {
        Backing::One(RedisServer::spawn()?)
    };
    let auth = spawn_auth_on(
        redis.engine(),
        AuthOptions {
            per_peer: u64::MAX,
            ..AuthOptions::default()
        },
    )
    .await?;
    let mut servers = Vec::new();
    for _ in 0..p.instances {
        servers.push(messaging_process(&redis, &auth, p.ack_replicas)?);
    }
    eprintln!(
        "fanout: {} subscribers, {} publishers on {} instances",
        p.subscribers, p.publishers, p.instances
    );
    let pubs = users(&auth, "pub", p.publishers).await?;
    let subs = users(&auth, "sub", p.subscribers).await?;
    let mut client =
        switchboard_proto::messaging::v1::messaging_service_client::MessagingServiceClient::new(
            servers[0].channel(),
        );
    let mut groups = Vec::with_capacity(p.conversations);
    for c in 0..p.conversations {
        let members: Vec<String> = pubs
            .iter()
            .skip(1)
            .chain(subs.iter().skip(c).step_by(p.conversations))
            .map(|(id, _)| id.clone())
            .collect();
        groups.push(
            crate::messaging::create_group(&mut client, &pubs[0].1, "fanout", &members)
                .await?
                .id,
        );
    }

    // Measurement window in microseconds since the epoch; set once warm-up is over.
    let window_start = Arc::new(AtomicU64::new(u64::MAX));
    let window_end = Arc::new(AtomicU64::new(u64::MAX));

    // Subscribers, split across instances; one histogram each, merged at the end.
    let mut subscriber_tasks = tokio::task::JoinSet::new();
    let stop = tokio_util::sync::CancellationToken::new();
    let servers = Arc::new(servers);
    for (i, (_, token)) in subs.iter().enumerate() {
        let server = i % p.instances;
        let group_id = groups[i % p.conversations].clone();
        let mut conn = follow(&servers[server], token, &group_id, 0, p.web).await?;
        conn.recovered(&group_id).await?;
        let (servers, web) = (servers.clone(), p.web);
        let (start, end, stop, token) = (
            window_start.clone(),
            window_end.clone(),
            stop.clone(),
            token.clone(),
        );
        subscriber_tasks.spawn(async move {
            let mut hist =
                Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
            let (mut delivered, mut last_delivery, mut last_seq, mut resumes) =
                (0u64, 0u64, 0u64, 0u64);
            loop {
                let frame = tokio::select! {
                    _ = stop.cancelled() => break,
                    f = conn.next(Duration::from_secs(30)) => f,
                };
                match frame {
                    Ok(Some(Out::Message(m))) if m.seq > last_seq => {
                        last_seq = m.seq;
                        let now = now_us();
                        let sent: u64 = m.body.get(..20).and_then(|s| s.parse().ok()).unwrap_or(0);
                        if sent >= start.load(Ordering::Relaxed)
                            && sent < end.load(Ordering::Relaxed)
                        {
                            delivered += 1;
                            last_delivery = last_delivery.max(now);
                            let _ = hist.record(now.saturating_sub(sent).max(1));
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(_) => {
                        // Cut off as a slow consumer (or a hiccup): resume like a real client.
                        resumes += 1;
                        match follow(&servers[server], &token, &group_id, last_seq, web).await {
                            Ok(c) => conn = c,
                            Err(_) => break,
                        }
                    }
                }
            }
            (hist, delivered, last_delivery, resumes)
        });
    }
    eprintln!("subscribers connected");

    // Publishers: one Connect stream each, half per instance.
    let sent_in_window = Arc::new(AtomicU64::new(0));
    let per_publisher_rate = p.rate / p.publishers as f64;
    let total = WARMUP + Duration::from_secs(p.duration);
    let mut publisher_tasks = tokio::task::JoinSet::new();
    let began = Instant::now();
    for (i, (_, token)) in pubs.iter().enumerate() {
        let conn = Connection::open(servers[i % p.instances].channel(), token).await?;
        let probe = p.ack_probe && !p.max_mode && i == 0;
        if probe {
            conn.subscribe(&groups[0], 0).await?;
        }
        let (groups, start, end, sent_in_window) = (
            groups.clone(),
            window_start.clone(),
            window_end.clone(),
            sent_in_window.clone(),
        );
        let publishers = p.publishers;
        let (max_mode, window) = (p.max_mode, p.window);
        publisher_tasks.spawn(async move {
            let mut conn = conn;
            let permits = Arc::new(Semaphore::new(if max_mode {
                window
            } else {
                usize::MAX >> 4
            }));
            let (mut k, mut acked) = (0u64, 0u64);
            // The probe's sends in the window: client_msg_id → when it was sent.
            let mut pending: std::collections::HashMap<String, Instant> = Default::default();
            let mut acks =
                Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
            let mut next = Instant::now();
            let interval = Duration::from_secs_f64(1.0 / per_publisher_rate.max(0.001));
            while began.elapsed() < total {
                if max_mode {
                    // Acks release window slots.
                    loop {
                        match permits.clone().try_acquire_owned() {
                            Ok(p) => {
                                p.forget();
                                break;
                            }
                            Err(_) => match conn.next(Duration::from_secs(10)).await {
                                Ok(Some(Out::SendResult(_))) => {
                                    acked += 1;
                                    permits.add_permits(1)
                                }
                                Ok(Some(_)) => {}
                                other => {
                                    return Err(anyhow::anyhow!(
                                        "publisher stream failed: {other:?}"
                                    ));
                                }
                            },
                        }
                    }
                } else {
                    // Until the next send is due, read what arrives, so acks are timed
                    // when they arrive rather than at the next send.
                    loop {
                        let left = next.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            break;
                        }
                        match conn.next(left).await {
                            Ok(Some(Out::SendResult(r))) => {
                                record_ack(&mut pending, &mut acks, &r);
                                acked += 1;
                            }
                            Ok(Some(_)) => {}
                            Err(s) if s.code() == tonic::Code::DeadlineExceeded => break,
                            other => {
                                return Err(anyhow::anyhow!("publisher stream failed: {other:?}"));
                            }
                        }
                    }
                    next += interval;
                }
                let ts = now_us();
                let mut body = format!("{ts:020}");
                body.push_str(&"x".repeat(PAYLOAD_BYTES - body.len()));
                let client_msg_id = format!("{i}-{k}");
                if probe && ts >= start.load(Ordering::Relaxed) && ts < end.load(Ordering::Relaxed)
                {
                    pending.insert(client_msg_id.clone(), Instant::now());
                }
                // Publisher i's k-th send: conversations in turn, publishers interleaved.
                let group_id = &groups[(i + k as usize * publishers) % groups.len()];
                conn.send(In::Send(pb::Send {
                    conversation_id: group_id.clone(),
                    client_msg_id,
                    body,
                    metadata: Default::default(),
                }))
                .await?;
                k += 1;
                if ts >= start.load(Ordering::Relaxed) && ts < end.load(Ordering::Relaxed) {
                    sent_in_window.fetch_add(1, Ordering::Relaxed);
                }
                // Fixed mode: drain acks without waiting.
                if !max_mode {
                    while let Ok(Some(frame)) = conn.next(Duration::from_millis(0)).await {
                        if let Out::SendResult(r) = frame {
                            record_ack(&mut pending, &mut acks, &r);
                            acked += 1;
                        }
                    }
                }
            }
            // Wait for the sends still in flight: dropping the stream would discard them.
            while acked < k {
                match conn.next(Duration::from_secs(10)).await {
                    Ok(Some(Out::SendResult(r))) => {
                        record_ack(&mut pending, &mut acks, &r);
                        acked += 1
                    }
                    Ok(Some(_)) => {}
                    other => {
                        return Err(anyhow::anyhow!(
                            "publisher stream failed while draining: {other:?}"
                        ));
                    }
                }
            }
            Ok::<_, anyhow::Error>(probe.then_some(acks))
        });
    }

    // Warm-up, then the measured window.
    tokio::time::sleep(WARMUP).await;
    let t0 = now_us();
    window_start.store(t0, Ordering::Relaxed);
    window_end.store(t0 + p.duration * 1_000_000, Ordering::Relaxed);
    let cpu0: f64 = servers
        .iter()
        .map(|s| cpu_seconds(s.pid()).unwrap_or(0.0))
        .sum();
    let redis_pids = redis.pids();
    let redis0: Vec<f64> = redis_pids
        .iter()
        .map(|&pid| cpu_seconds(pid).unwrap_or(0.0))
        .collect();
    // The bench's own CPU over the same window: on a small machine it shares the cores
    // with the servers, and it can become the limit in `max` mode.
    let client0 = cpu_seconds(std::process::id()).unwrap_or(0.0);
    for s in 0..p.duration {
        progress(
            if p.max_mode {
                "fanout max"
            } else {
                "fanout fixed"
            },
            s as f64,
            p.duration as f64,
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    progress(
        if p.max_mode {
            "fanout max"
        } else {
            "fanout fixed"
        },
        p.duration as f64,
        p.duration as f64,
    );
    let mut acks = None;
    while let Some(r) = publisher_tasks.join_next().await {
        if let Some(h) = r?? {
            acks = Some(h);
        }
    }
    let sent = sent_in_window.load(Ordering::Relaxed);
    let expected = sent * (p.subscribers / p.conversations) as u64;
    // Let in-flight deliveries land (bounded).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cpu1: f64 = servers
        .iter()
        .map(|s| cpu_seconds(s.pid()).unwrap_or(0.0))
        .sum();
    let client1 = cpu_seconds(std::process::id()).unwrap_or(0.0);
    let redis_cpu: Vec<f64> = redis_pids
        .iter()
        .zip(&redis0)
        .map(|(&pid, before)| {
            ((cpu_seconds(pid).unwrap_or(0.0) - before).max(0.0) * 100.0).round() / 100.0
        })
        .collect();
    stop.cancel();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut delivered = 0u64;
    let mut last_delivery = t0;
    let mut resumes = 0;
    while let Some(r) = subscriber_tasks.join_next().await {
        let (h, d, l, n) = r?;
        hist.add(&h)?;
        delivered += d;
        last_delivery = last_delivery.max(l);
        resumes += n;
    }
    if resumes > 0 {
        eprintln!("subscribers resumed {resumes} times after being cut off as slow consumers");
    }
    let span = (p.duration as f64).max((last_delivery.saturating_sub(t0)) as f64 / 1e6);
    let round1 = |v: f64| (v * 10.0).round() / 10.0;
    // The sharded runs name their setup (and Redis's CPU) on whichever line they print.
    let sharded = |line: &mut serde_json::Value, bench: &str| {
        if p.conversations > 1 || p.cluster || p.ack_replicas > 0 {
            line["bench"] = json!(bench);
            line["conversations"] = json!(p.conversations);
            line["engine"] = json!(if p.cluster { "redis_cluster" } else { "redis" });
            line["ack_replicas"] = json!(p.ack_replicas);
            // Each Redis process's CPU in the window, masters and replicas alike.
            line["redis_cpu_s"] = json!(redis_cpu);
        }
    };
    if let Some(acks) = acks {
        let mut line = json!({
            "system": "switchboard",
            "bench": "send_ack",
            "instances": p.instances,
            "subscribers": p.subscribers,
            "publishers": p.publishers,
            "rate_target": p.rate,
            "duration_s": p.duration,
            "acks": acks.len(),
            "lost": expected.saturating_sub(delivered),
            "latency_us": {
                "p50": acks.value_at_quantile(0.50),
                "p90": acks.value_at_quantile(0.90),
                "p99": acks.value_at_quantile(0.99),
                "max": acks.max(),
            },
        });
        sharded(&mut line, "send_ack");
        return Ok(line);
    }
    let mut line = json!({
        "system": "switchboard",
        "mode": if p.max_mode { "max" } else { "fixed" },
        "instances": p.instances,
        "subscribers": p.subscribers,
        "publishers": p.publishers,
        "payload_bytes": PAYLOAD_BYTES,
        "duration_s": p.duration,
        "rate_target": match (p.max_mode, p.rate.fract() == 0.0) {
            (true, _) => serde_json::Value::Null,
            (false, true) => json!(p.rate as u64),
            (false, false) => json!(p.rate),
        },
        "sent": sent,
        "expected": expected,
        "delivered": delivered,
        "lost": expected.saturating_sub(delivered),
        "deliveries_per_s": round1(delivered as f64 / span),
        "latency_us": {
            "p50": hist.value_at_quantile(0.50),
            "p90": hist.value_at_quantile(0.90),
            "p99": hist.value_at_quantile(0.99),
            "p999": hist.value_at_quantile(0.999),
            "max": hist.max(),
        },
        "server_cpu_s": ((cpu1 - cpu0).max(0.0) * 100.0).round() / 100.0,
        // Beyond BENCH.md's keys: the benchmark process's own CPU in the same window
        // (subscribers, publishers and auth together).
        "client_cpu_s": ((client1 - client0).max(0.0) * 100.0).round() / 100.0,
    });
    sharded(&mut line, "fanout_sharded");
    if p.web {
        line["bench"] = json!("fanout_web");
        line["transport"] = json!("grpc-web");
        // Subscribers cut off as slow consumers that resumed: with `lost`, whether the
        // run's readers kept up (a resumed reader still behind at the end counts as lost).
        line["resumes"] = json!(resumes);
    }
    Ok(line)
}

/// Runs the idle-connections workload (`concurrency` streams opening at once) and returns
/// its JSON line.
pub async fn connections(streams: usize, concurrency: usize) -> anyhow::Result<serde_json::Value> {
    let redis = Backing::One(RedisServer::spawn()?);
    let auth = spawn_auth_on(
        redis.engine(),
        AuthOptions {
            per_peer: u64::MAX,
            ..AuthOptions::default()
        },
    )
    .await?;
    let server = messaging_process(&redis, &auth, 0)?;
    let peer = users(&auth, "peer", 1).await?.remove(0);
    eprintln!("connections: creating {streams} users and direct conversations");
    let people = users(&auth, "idle", streams).await?;
    let mut conversations: Vec<String> = vec![String::new(); streams];
    let mut tasks = tokio::task::JoinSet::new();
    for (i, (_, token)) in people.iter().enumerate() {
        let mut client =
            switchboard_proto::messaging::v1::messaging_service_client::MessagingServiceClient::new(
                server.channel(),
            );
        let (token, peer_id) = (token.clone(), peer.0.clone());
        tasks.spawn(async move {
            let req = pb::CreateConversationRequest {
                kind: pb::ConversationKind::Direct as i32,
                title: String::new(),
                member_ids: vec![peer_id],
            };
            let c = client
                .create_conversation(authed(req, &token))
                .await?
                .into_inner()
                .conversation
                .context("conversation")?;
            Ok::<_, anyhow::Error>((i, c.id))
        });
        if tasks.len() >= 16
            && let Some(r) = tasks.join_next().await
        {
            let (i, id) = r??;
            conversations[i] = id;
        }
    }
    while let Some(r) = tasks.join_next().await {
        let (i, id) = r??;
        conversations[i] = id;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib(server.pid())?;
    let started = Instant::now();
    // 100 streams per HTTP/2 connection, as a client library would multiplex them, and up
    // to `concurrency` streams being opened at once, as clients arrive (the peer keeps 200
    // handshakes in flight).
    let channels: Vec<_> = (0..streams.div_ceil(100))
        .map(|_| server.channel())
        .collect();
    let mut open = Vec::with_capacity(streams);
    let mut opening = tokio::task::JoinSet::new();
    for (i, ((_, token), conversation)) in people.iter().zip(&conversations).enumerate() {
        let (channel, token, conversation) = (
            channels[i / 100].clone(),
            token.clone(),
            conversation.clone(),
        );
        opening.spawn(async move {
            let mut conn = Connection::open(channel, &token).await?;
            conn.subscribe(&conversation, 0).await?;
            conn.recovered(&conversation).await?;
            Ok::<_, anyhow::Error>(conn)
        });
        while opening.len() >= concurrency.max(1) {
            if let Some(done) = opening.join_next().await {
                open.push(done??);
            }
        }
        if i % 500 == 499 {
            eprint!("\rstreams: {}/{streams}", open.len());
        }
    }
    while let Some(done) = opening.join_next().await {
        open.push(done??);
    }
    eprintln!();
    let connect_s = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_kib(server.pid())?;
    let per_stream = (after.saturating_sub(before) * 1024) as f64 / streams.max(1) as f64;
    drop(open);
    Ok(json!({
        "system": "switchboard",
        "streams": streams,
        "rss_before_kib": before,
        "rss_after_kib": after,
        "bytes_per_stream": per_stream.round(),
        "connect_s": (connect_s * 100.0).round() / 100.0,
    }))
}
