//! RPC spans and W3C trace-context propagation, on both ends of every gRPC call.
//!
//! - [`ServerTraceLayer`] wraps every server: it continues the caller's trace from the
//!   `traceparent` metadata, opens one span per call following the OpenTelemetry RPC
//!   conventions (`rpc.system`, `rpc.service`, `rpc.method`, `rpc.grpc.status_code`),
//!   and counts calls and durations ([`crate::metrics`]).
//! - [`Traced`] wraps the channels one service uses to call another (keys from auth,
//!   presence for the desk): a client span, with its context injected into the request.
//! - [`trace_map`] / [`context_from_map`] carry the context inside payloads that cross
//!   Redis, so work on another instance joins the trace that caused it.
//!
//! Long-lived streams (Connect, Watch) would make endless spans: their call span ends once
//! the stream is set up, and what happens on the stream gets short spans of its own.
//! Health checks and reflection are not traced (probes would bury everything else).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http::{HeaderMap, Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use opentelemetry::propagation::{Extractor, Injector};
use tonic::body::Body;
use tower::{Layer, Service};
use tracing::{Instrument, Span, field::Empty};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::bus::BoxFuture;
use crate::metrics as m;

/// Paths that get neither spans nor call metrics.
const UNTRACED: &[&str] = &[
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
];

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::header::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// The trace context a caller sent in `headers` (empty if none).
pub fn extract(headers: &HeaderMap) -> opentelemetry::Context {
    opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(headers)))
}

/// Writes `span`'s trace context into `headers`.
pub fn inject(span: &Span, headers: &mut HeaderMap) {
    let cx = span.context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut HeaderInjector(headers))
    });
}

/// The current span's trace context as a map (`traceparent`, `tracestate`), for payloads
/// that cross Redis. Empty when tracing is off.
pub fn trace_map() -> HashMap<String, String> {
    let mut map = HashMap::new();
    let cx = Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut map));
    map
}

/// The trace context carried in a payload's map.
pub fn context_from_map(map: &HashMap<String, String>) -> opentelemetry::Context {
    opentelemetry::global::get_text_map_propagator(|p| p.extract(map))
}

/// Makes `span` a child of the trace context carried in a payload's map (no-op if empty or
/// tracing is off).
pub fn continue_from(span: &Span, map: &HashMap<String, String>) {
    if !map.is_empty() {
        let _ = span.set_parent(context_from_map(map));
    }
}

/// A span to link to after it has ended (a stream's set-up span, from its frames' spans).
#[derive(Clone, Debug, Default)]
pub struct SpanLink(Option<opentelemetry::trace::SpanContext>);

impl SpanLink {
    /// A link to the current span (none when tracing is off).
    pub fn to_current() -> Self {
        use opentelemetry::trace::TraceContextExt;
        let cx = Span::current().context();
        let sc = cx.span().span_context().clone();
        Self(sc.is_valid().then_some(sc))
    }

    /// Adds this link to `span`.
    pub fn attach(&self, span: &Span) {
        if let Some(sc) = &self.0 {
            span.add_link(sc.clone());
        }
    }
}

/// The gRPC status code's canonical name, as metrics label it.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Which end of the call a span stands for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Server,
    Client,
}

/// One call's span and what is recorded when it ends.
struct Call {
    span: Span,
    side: Side,
    service: String,
    method: String,
    started: Instant,
    long_lived: bool,
}

impl Call {
    fn start(
        side: Side,
        path: &str,
        long_lived: bool,
        parent: Option<opentelemetry::Context>,
    ) -> Self {
        let (service, method) = path
            .trim_start_matches('/')
            .split_once('/')
            .unwrap_or((path, ""));
        let name = path.trim_start_matches('/');
        let kind = match side {
            Side::Server => "server",
            Side::Client => "client",
        };
        let span = tracing::info_span!(
            "rpc",
            otel.name = %name,
            otel.kind = kind,
            otel.status_code = Empty,
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %method,
            rpc.grpc.status_code = Empty,
        );
        if let Some(parent) = parent {
            // Fails only when no OpenTelemetry layer is installed; nothing to continue then.
            let _ = span.set_parent(parent);
        }
        let call = Self {
            span,
            side,
            service: service.to_owned(),
            method: method.to_owned(),
            started: Instant::now(),
            long_lived,
        };
        if side == Side::Server && long_lived {
            ::metrics::gauge!(m::STREAMS_ACTIVE, &call.labels()).increment(1.0);
        }
        call
    }

    /// The `service` and `method` labels of the call's metrics.
    fn labels(&self) -> [(&'static str, String); 2] {
        [
            ("service", self.service.clone()),
            ("method", self.method.clone()),
        ]
    }

    /// Records the status on the span (if still open) and, for servers, in the metrics.
    fn finish(&mut self, code: tonic::Code) {
        let failed = match self.side {
            // Server spans fail only on the server's own faults (semantic conventions).
            Side::Server => matches!(
                code,
                tonic::Code::Unknown
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::Unimplemented
                    | tonic::Code::Internal
                    | tonic::Code::Unavailable
                    | tonic::Code::DataLoss
            ),
            Side::Client => code != tonic::Code::Ok,
        };
        self.span.record("rpc.grpc.status_code", code as i64);
        if failed {
            self.span.record("otel.status_code", "ERROR");
        }
        self.span = Span::none();
        if self.side == Side::Server {
            let labels = self.labels();
            let [service, method] = labels.clone();
            let with_code = [service, method, ("code", code_name(code).to_owned())];
            ::metrics::counter!(m::GRPC_REQUESTS, &with_code).increment(1);
            if self.long_lived {
                ::metrics::gauge!(m::STREAMS_ACTIVE, &labels).decrement(1.0);
            } else {
                ::metrics::histogram!(m::GRPC_DURATION, &labels)
                    .record(self.started.elapsed().as_secs_f64());
            }
        }
    }

    /// The stream is set up: its span ends here, the call goes on.
    fn set_up(&mut self) {
        self.span
            .record("rpc.grpc.status_code", tonic::Code::Ok as i64);
        self.span = Span::none();
    }
}

/// A response body that finishes its call's span and metrics when the trailers pass (or,
/// if the peer goes away first, when it is dropped: `CANCELLED`).
pub struct TracedBody {
    inner: Body,
    call: Option<Call>,
}

impl TracedBody {
    fn end(&mut self, code: tonic::Code) {
        if let Some(mut call) = self.call.take() {
            call.finish(code);
        }
    }
}

impl Drop for TracedBody {
    fn drop(&mut self) {
        self.end(tonic::Code::Cancelled);
    }
}

impl HttpBody for TracedBody {
    type Data = <Body as HttpBody>::Data;
    type Error = <Body as HttpBody>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    let code = status_of(trailers).unwrap_or(tonic::Code::Ok);
                    self.end(code);
                }
            }
            Poll::Ready(Some(Err(_))) => self.end(tonic::Code::Internal),
            Poll::Ready(None) => self.end(tonic::Code::Ok),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn status_of(headers: &HeaderMap) -> Option<tonic::Code> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(tonic::Code::from_i32)
}

/// What happens to a call once its response head is back.
fn on_head(mut call: Call, response: Response<Body>) -> Response<Body> {
    if let Some(code) = status_of(response.headers()) {
        // Trailers-only: the call is over.
        call.finish(code);
        return response;
    }
    if call.long_lived {
        call.set_up();
    }
    response.map(|inner| {
        Body::new(TracedBody {
            inner,
            call: Some(call),
        })
    })
}

/// Traces every call a server answers; see the module docs.
#[derive(Clone)]
pub struct ServerTraceLayer {
    long_lived: Arc<[&'static str]>,
}

impl ServerTraceLayer {
    /// `long_lived` lists the full paths (`/package.Service/Method`) of streaming methods
    /// whose call span ends once the stream is set up.
    pub fn new(long_lived: &[&'static str]) -> Self {
        Self {
            long_lived: long_lived.into(),
        }
    }
}

impl<S> Layer<S> for ServerTraceLayer {
    type Service = ServerTrace<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ServerTrace {
            inner,
            long_lived: self.long_lived.clone(),
        }
    }
}

/// The service made by [`ServerTraceLayer`].
#[derive(Clone)]
pub struct ServerTrace<S> {
    inner: S,
    long_lived: Arc<[&'static str]>,
}

impl<S> Service<Request<Body>> for ServerTrace<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let path = req.uri().path();
        if UNTRACED.iter().any(|p| path.starts_with(p)) {
            return Box::pin(inner.call(req));
        }
        let long_lived = self.long_lived.contains(&path);
        let call = Call::start(Side::Server, path, long_lived, Some(extract(req.headers())));
        let span = call.span.clone();
        Box::pin(async move {
            let response = inner.call(req).instrument(span).await?;
            Ok(on_head(call, response))
        })
    }
}

/// A lazily connected channel to another service at `url`, as every service-to-service
/// client uses: 3 s to connect, `TCP_NODELAY` (small frames leave at once, never held for
/// the peer's delayed ACK), and `request_timeout` on each call if given.
pub fn lazy_channel(
    url: &str,
    request_timeout: Option<std::time::Duration>,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let mut endpoint = tonic::transport::Endpoint::from_shared(url.to_owned())?
        .connect_timeout(std::time::Duration::from_secs(3))
        .tcp_nodelay(true);
    if let Some(limit) = request_timeout {
        endpoint = endpoint.timeout(limit);
    }
    Ok(endpoint.connect_lazy())
}

/// A channel (or any gRPC transport) whose calls get client spans and carry the trace
/// context to the server.
#[derive(Clone)]
pub struct Traced<T> {
    inner: T,
    long_lived: Arc<[&'static str]>,
}

impl<T> Traced<T> {
    /// Wraps `inner`; `long_lived` as for [`ServerTraceLayer::new`].
    pub fn new(inner: T, long_lived: &[&'static str]) -> Self {
        Self {
            inner,
            long_lived: long_lived.into(),
        }
    }
}

impl<T> Service<Request<Body>> for Traced<T>
where
    T: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    T::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = T::Error;
    type Future = BoxFuture<'static, Result<Response<Body>, T::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let path = req.uri().path();
        let long_lived = self.long_lived.contains(&path);
        let call = Call::start(Side::Client, path, long_lived, None);
        inject(&call.span, req.headers_mut());
        let span = call.span.clone();
        Box::pin(async move {
            let response = inner.call(req).instrument(span).await;
            match response {
                Ok(response) => Ok(on_head(call, response)),
                Err(e) => {
                    let mut call = call;
                    call.finish(tonic::Code::Unavailable);
                    Err(e)
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_names_are_canonical() {
        assert_eq!(code_name(tonic::Code::Ok), "OK");
        assert_eq!(
            code_name(tonic::Code::FailedPrecondition),
            "FAILED_PRECONDITION"
        );
        assert_eq!(code_name(tonic::Code::Unauthenticated), "UNAUTHENTICATED");
    }

    #[test]
    fn status_is_read_from_trailers_only_headers() {
        let mut h = HeaderMap::new();
        assert_eq!(status_of(&h), None);
        h.insert("grpc-status", http::HeaderValue::from_static("5"));
        assert_eq!(status_of(&h), Some(tonic::Code::NotFound));
    }
}
