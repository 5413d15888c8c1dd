//! Metrics: every counter, gauge and histogram a Switchboard process exports, served in the
//! Prometheus text format on a separate HTTP port (`METRICS_ADDR`, path `/metrics`).
//!
//! Code records through the `metrics` facade with the names below; a process installs the
//! Prometheus recorder once ([`serve`], called by [`crate::server::main`]). Without a
//! recorder (in-process test instances) recording costs nothing. Names follow Prometheus
//! conventions: `switchboard_` prefix, `_total` on counters, base units (`_seconds`).

use std::net::SocketAddr;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

/// gRPC calls finished, by `service`, `method` and status `code` (e.g. `OK`).
pub const GRPC_REQUESTS: &str = "switchboard_grpc_requests_total";
/// Duration of unary gRPC calls, by `service` and `method`.
pub const GRPC_DURATION: &str = "switchboard_grpc_request_duration_seconds";
/// Long-lived streams open now (Connect, Watch), by `service` and `method`.
pub const STREAMS_ACTIVE: &str = "switchboard_streams_active";
/// Messages stored and published (messaging).
pub const MESSAGES_PUBLISHED: &str = "switchboard_messages_published_total";
/// Messages handed to a client stream, history replay included (messaging).
pub const MESSAGES_DELIVERED: &str = "switchboard_messages_delivered_total";
/// From a message's send time to its hand-over to a local stream, live deliveries only.
pub const DELIVERY_LATENCY: &str = "switchboard_delivery_latency_seconds";
/// A local pub/sub subscriber fell behind and missed events (recovered from history).
pub const QUEUE_OVERFLOWS: &str = "switchboard_queue_overflows_total";
/// Streams cut off because the client read too slowly (it resumes from its last seq).
pub const SLOW_CONSUMER_DISCONNECTS: &str = "switchboard_slow_consumer_disconnects_total";
/// Redis commands that failed.
pub const REDIS_ERRORS: &str = "switchboard_redis_errors_total";
/// Times the pub/sub connection to Redis was re-established.
pub const REDIS_RECONNECTS: &str = "switchboard_redis_reconnects_total";
/// Login attempts, by `result`: `success`, `failure` (wrong name or password), `limited`
/// (too many attempts), `error` (bad input, storage down).
pub const LOGINS: &str = "switchboard_logins_total";
/// Device sessions held open on this presence instance.
pub const PRESENCE_SESSIONS: &str = "switchboard_presence_sessions";
/// Consultations opened into the support queue.
pub const CONSULTATIONS_QUEUED: &str = "switchboard_consultations_queued_total";
/// Consultations assigned to an agent, by `how` (`routed`, `accepted`, `transferred`).
pub const CONSULTATIONS_ASSIGNED: &str = "switchboard_consultations_assigned_total";
/// Finished spans the OTLP exporter could not deliver (collector down or too slow).
pub const SPANS_DROPPED: &str = "switchboard_otel_spans_dropped_total";
/// Unary calls shed at the concurrency limit (`MAX_CONCURRENT_REQUESTS`).
pub const REQUESTS_SHED: &str = "switchboard_requests_shed_total";
/// Connections closed for sending no HTTP/2 preface in time (`HANDSHAKE_TIMEOUT_MS`).
pub const HANDSHAKE_TIMEOUTS: &str = "switchboard_handshake_timeouts_total";

/// Every metric with its help text, as the README lists them.
pub const ALL: &[(&str, &str)] = &[
    (
        GRPC_REQUESTS,
        "gRPC calls finished, by service, method and status code",
    ),
    (
        GRPC_DURATION,
        "Duration of unary gRPC calls, by service and method",
    ),
    (
        STREAMS_ACTIVE,
        "Long-lived streams (Connect, Watch) open now",
    ),
    (MESSAGES_PUBLISHED, "Messages stored and published"),
    (MESSAGES_DELIVERED, "Messages written to client streams"),
    (
        DELIVERY_LATENCY,
        "Seconds from a message's send time to its hand-over to a local stream",
    ),
    (
        QUEUE_OVERFLOWS,
        "Local pub/sub subscribers that fell behind (recovered from history)",
    ),
    (
        SLOW_CONSUMER_DISCONNECTS,
        "Streams cut off because the client read too slowly",
    ),
    (REDIS_ERRORS, "Redis commands that failed"),
    (REDIS_RECONNECTS, "Pub/sub reconnections to Redis"),
    (LOGINS, "Login attempts by result"),
    (
        PRESENCE_SESSIONS,
        "Device sessions held open on this presence instance",
    ),
    (CONSULTATIONS_QUEUED, "Consultations opened into the queue"),
    (
        CONSULTATIONS_ASSIGNED,
        "Consultations assigned to an agent, by how",
    ),
    (
        SPANS_DROPPED,
        "Finished spans the OTLP exporter could not deliver",
    ),
    (REQUESTS_SHED, "Unary calls shed at the concurrency limit"),
    (
        HANDSHAKE_TIMEOUTS,
        "Connections closed for sending no HTTP/2 preface in time",
    ),
];

/// Buckets of the seconds histograms: 0.5 ms to 10 s.
const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Holds one unit of a gauge: +1 when made, -1 when dropped (a session, a stream).
pub struct Held(&'static str);

impl Held {
    /// Adds one to the unlabelled gauge `name` until the returned value is dropped.
    pub fn new(name: &'static str) -> Self {
        metrics::gauge!(name).increment(1.0);
        Self(name)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        metrics::gauge!(self.0).decrement(1.0);
    }
}

/// Counts one failed Redis command.
pub fn redis_error() {
    metrics::counter!(REDIS_ERRORS).increment(1);
}

/// Counts one shed unary call.
pub fn shed() {
    metrics::counter!(REQUESTS_SHED).increment(1);
}

/// Counts one connection closed before its HTTP/2 preface.
pub fn handshake_timeout() {
    metrics::counter!(HANDSHAKE_TIMEOUTS).increment(1);
}

/// Installs the process-wide Prometheus recorder, or returns `None` if one is installed
/// already (a second service in the same process).
fn install() -> anyhow::Result<Option<PrometheusHandle>> {
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)?;
    let recorder = builder.build_recorder();
    let handle = recorder.handle();
    if metrics::set_global_recorder(recorder).is_err() {
        return Ok(None);
    }
    for (name, help) in ALL {
        match *name {
            GRPC_DURATION | DELIVERY_LATENCY => metrics::describe_histogram!(*name, *help),
            STREAMS_ACTIVE | PRESENCE_SESSIONS => metrics::describe_gauge!(*name, *help),
            _ => metrics::describe_counter!(*name, *help),
        }
    }
    // Present from the start, so a scrape shows 0 rather than nothing.
    metrics::counter!(REDIS_ERRORS).absolute(0);
    metrics::counter!(SPANS_DROPPED).absolute(0);
    Ok(Some(handle))
}

/// Installs the recorder and serves `/metrics` on `addr` for the rest of the process's
/// life (so the last scrape during a drain still answers); returns the bound address
/// (`None` when another service of this process already serves them).
pub async fn serve(addr: SocketAddr) -> anyhow::Result<Option<SocketAddr>> {
    let Some(handle) = install()? else {
        return Ok(None);
    };
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("METRICS_ADDR {addr}: cannot listen: {e}"))?;
    let bound = listener.local_addr()?;
    let upkeep = handle.clone();
    let render = move || {
        let handle = handle.clone();
        async move {
            (
                [(
                    http::header::CONTENT_TYPE,
                    "text/plain; version=0.0.4; charset=utf-8",
                )],
                handle.render(),
            )
        }
    };
    let app = axum::Router::new().route("/metrics", axum::routing::get(render));
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(error = %e, "metrics endpoint stopped");
        }
    });
    // Histograms keep raw samples until upkeep folds them into buckets.
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    Ok(Some(bound))
}
