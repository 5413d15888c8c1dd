//! The Switchboard test harness: real parts only.
//!
//! - [`redis::RedisServer`] starts a private `redis-server` on a free loopback port (never
//!   6379), each test its own, and kills it (by PID) when dropped.
//! - [`instance`] starts service instances on port 0, either in-process (calling the same
//!   `run` as `main`) or as child processes of the built binaries, for crash tests.
//! - [`otlp::Receiver`] is a real OTLP trace receiver; [`scrape`] reads `/metrics`.
//! - [`raw::RawCall`] speaks HTTP/2 directly, for frames no generated client sends.
//! - [`deploy`] reads back what `deploy/` deploys and checks it against the services.
//!
//! Everything a test starts is stopped when its handle drops, also when the test fails.

pub mod auth;
pub mod bench;
pub mod bench_presence;
pub mod deploy;
pub mod instance;
pub mod messaging;
pub mod otlp;
pub mod presence;
pub mod proxy;
pub mod raw;
pub mod redis;
pub mod scrape;
pub mod stack;
pub mod web;

use std::time::Duration;

/// Runs `check` every 50 ms until it returns `Some`, for at most `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Reads `stream` until it ends and returns the status it ended with; panics if it ends
/// cleanly or nothing ends it within `limit`.
pub async fn ended<T>(stream: &mut tonic::Streaming<T>, limit: Duration) -> tonic::Status {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, stream.message()).await {
            Ok(Ok(Some(_))) => {}
            Ok(Ok(None)) => panic!("stream ended without a status"),
            Ok(Err(status)) => return status,
            Err(_) => panic!("stream did not end within {limit:?}"),
        }
    }
}

/// The field a status's BadRequest details name first.
pub fn bad_field(status: &tonic::Status) -> Option<String> {
    use tonic_types::StatusExt as _;
    status
        .get_details_bad_request()
        .and_then(|b| b.field_violations.first().map(|v| v.field.clone()))
}
