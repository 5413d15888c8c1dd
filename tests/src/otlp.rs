//! A real OTLP trace receiver for tests: the `opentelemetry.proto.collector.trace.v1`
//! TraceService over gRPC on a free loopback port, keeping every span it is sent with the
//! `service.name` and `service.instance.id` of the process that sent it.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value::Value};
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use tokio_util::task::AbortOnDropHandle;

/// One received span and who sent it.
#[derive(Debug, Clone)]
pub struct Received {
    /// `service.name` of the sender.
    pub service: String,
    /// `service.instance.id` of the sender.
    pub instance: String,
    /// The span as sent.
    pub span: Span,
}

fn value(v: &KeyValue) -> Option<String> {
    match v.value.as_ref()?.value.as_ref()? {
        Value::StringValue(s) => Some(s.clone()),
        Value::IntValue(i) => Some(i.to_string()),
        Value::BoolValue(b) => Some(b.to_string()),
        Value::DoubleValue(d) => Some(d.to_string()),
        _ => None,
    }
}

impl Received {
    /// An attribute's value as text.
    pub fn attr(&self, key: &str) -> Option<String> {
        self.span
            .attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(value)
    }

    /// The trace id (hex).
    pub fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }

    /// The span id (hex).
    pub fn span_id(&self) -> String {
        hex(&self.span.span_id)
    }

    /// The parent span id (hex; empty for a root).
    pub fn parent_id(&self) -> String {
        hex(&self.span.parent_span_id)
    }

    /// Span ids this span links to.
    pub fn links(&self) -> Vec<String> {
        self.span.links.iter().map(|l| hex(&l.span_id)).collect()
    }

    /// The span kind.
    pub fn kind(&self) -> SpanKind {
        SpanKind::try_from(self.span.kind).unwrap_or(SpanKind::Unspecified)
    }

    /// Every text the span carries: name, attribute values, event names and attributes.
    pub fn texts(&self) -> Vec<String> {
        let mut out = vec![self.span.name.clone()];
        out.extend(self.span.attributes.iter().filter_map(value));
        for e in &self.span.events {
            out.push(e.name.clone());
            out.extend(e.attributes.iter().filter_map(value));
        }
        out
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<Received>>>);

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = Vec::new();
        for rs in request.into_inner().resource_spans {
            let attrs = rs.resource.map(|r| r.attributes).unwrap_or_default();
            let find = |k: &str| {
                attrs
                    .iter()
                    .find(|kv| kv.key == k)
                    .and_then(value)
                    .unwrap_or_default()
            };
            let (service, instance) = (find("service.name"), find("service.instance.id"));
            for ss in rs.scope_spans {
                for span in ss.spans {
                    received.push(Received {
                        service: service.clone(),
                        instance: instance.clone(),
                        span,
                    });
                }
            }
        }
        if let Ok(mut spans) = self.0.lock() {
            spans.extend(received);
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// The receiver; stops when dropped.
pub struct Receiver {
    /// Where it listens.
    pub addr: SocketAddr,
    sink: Sink,
    _server: AbortOnDropHandle<()>,
}

impl Receiver {
    /// Starts a receiver on a free loopback port.
    pub async fn start() -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let sink = Sink::default();
        let service = TraceServiceServer::new(sink.clone());
        let server = tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming)
                .await;
        });
        Ok(Self {
            addr,
            sink,
            _server: AbortOnDropHandle::new(server),
        })
    }

    /// The environment that makes a service export its spans here, quickly.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("http://{}", self.addr),
            ),
            ("OTEL_BSP_SCHEDULE_DELAY", "100".into()),
            ("OTEL_TRACES_SAMPLER", "always_on".into()),
        ]
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Received> {
        self.sink.0.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Waits up to `limit` until `check` finds what it wants in the spans received.
    pub async fn wait_for<T>(
        &self,
        limit: Duration,
        mut check: impl FnMut(&[Received]) -> Option<T>,
    ) -> Option<T> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(found) = check(&self.spans()) {
                return Some(found);
            }
            if tokio::time::Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
