//! Reads a service's `/metrics` over plain HTTP and parses it as Prometheus text with an
//! independent parser (`prometheus-parse`), so a malformed exposition fails the test.

use std::net::SocketAddr;

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The body of `GET /metrics` at `addr`, after checking status and content type.
pub async fn metrics_text(addr: SocketAddr) -> anyhow::Result<String> {
    let mut conn = tokio::net::TcpStream::connect(addr).await?;
    conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: test\r\n\r\n")
        .await?;
    let mut raw = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        conn.read_to_end(&mut raw),
    )
    .await
    .context("no answer from /metrics within 10 s")??;
    let raw = String::from_utf8(raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").context("no HTTP header end")?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        bail!("GET /metrics: {}", head.lines().next().unwrap_or_default());
    }
    if !head
        .to_ascii_lowercase()
        .contains("content-type: text/plain; version=0.0.4")
    {
        bail!("GET /metrics: not the Prometheus text format:\n{head}");
    }
    Ok(body.to_owned())
}

/// `/metrics` at `addr`, parsed.
pub async fn scrape(addr: SocketAddr) -> anyhow::Result<prometheus_parse::Scrape> {
    let text = metrics_text(addr).await?;
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    prometheus_parse::Scrape::parse(lines).context("not Prometheus text")
}

/// The value of the sample `name` whose labels include `labels` (summed over the rest;
/// 0 when absent). Counters and gauges only.
pub fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}
