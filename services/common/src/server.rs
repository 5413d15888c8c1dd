//! Server assembly: every Switchboard gRPC server is built here, so they all behave alike.
//!
//! Each server gets health (`grpc.health.v1`, including the `liveness` and `readiness`
//! names Kubernetes probes ask for), reflection (`v1` and `v1alpha`, older grpcurl only
//! speaks the latter), gzip and zstd in both directions ([`tune!`](crate::tune)), a request
//! size limit answered with `RESOURCE_EXHAUSTED`, optional TLS, token authentication
//! ([`AuthLayer`]) and graceful shutdown bounded by the configured grace period. At
//! shutdown every health name but `liveness` turns `NOT_SERVING`.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::service::Routes;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tower::{Layer, Service};

use crate::bus::BoxFuture;
use crate::config::{Secret, ServerConfig};
use crate::status::{Reason, Refusal};
use crate::token::Verifier;

/// Applies Switchboard's standard settings to a generated tonic server: accept and send
/// gzip and zstd, and limit decoded request messages to `max_message_bytes`.
#[macro_export]
macro_rules! tune {
    ($server:expr, $config:expr) => {
        $server
            .accept_compressed($crate::proto::tonic::codec::CompressionEncoding::Gzip)
            .accept_compressed($crate::proto::tonic::codec::CompressionEncoding::Zstd)
            .send_compressed($crate::proto::tonic::codec::CompressionEncoding::Gzip)
            .send_compressed($crate::proto::tonic::codec::CompressionEncoding::Zstd)
            .max_decoding_message_size($config.max_message_bytes)
            .max_encoding_message_size(usize::MAX)
    };
}

/// Paths that never need a token: health and reflection.
const ALWAYS_PUBLIC: &[&str] = &[
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
];

/// Requires a valid access token on every call except `public` methods, and hands the
/// verified [`Caller`](crate::token::Caller) to handlers in the request extensions.
///
/// A tower layer rather than a tonic interceptor because verification may need to fetch
/// keys from auth (async), and one layer covers every service of the server.
#[derive(Clone)]
pub struct AuthLayer {
    verifier: Arc<Verifier>,
    public: Arc<[&'static str]>,
    service_token: Option<Arc<Secret>>,
}

/// Metadata key that carries the shared service token on calls between services.
pub const SERVICE_TOKEN_HEADER: &str = "x-switchboard-service-token";

/// Put into request extensions (instead of a [`Caller`](crate::token::Caller)) when another
/// Switchboard service made the call with the shared service token.
#[derive(Debug, Clone, Copy)]
pub struct ServiceCall;

impl AuthLayer {
    /// Authenticates with `verifier`; `public` lists full method paths
    /// (`/package.Service/Method`) that need no token.
    pub fn new(verifier: Arc<Verifier>, public: &[&'static str]) -> Self {
        Self {
            verifier,
            public: public.into(),
            service_token: None,
        }
    }

    /// Also accepts calls from other services that carry `token` in
    /// [`SERVICE_TOKEN_HEADER`]; they get a [`ServiceCall`] extension.
    pub fn accepting_service_token(mut self, token: Option<Secret>) -> Self {
        self.service_token = token.map(Arc::new);
        self
    }
}

/// The verified caller [`AuthLayer`] put into the request (`Missing` if none: a public
/// method, or a service call).
pub fn caller<T>(
    req: &tonic::Request<T>,
) -> Result<crate::token::Caller, crate::token::TokenError> {
    req.extensions()
        .get::<crate::token::Caller>()
        .cloned()
        .ok_or(crate::token::TokenError::Missing)
}

/// Whether `presented` is the service token (constant time).
fn service_token_matches(expected: Option<&Secret>, presented: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    expected.is_some_and(|t| bool::from(t.expose().as_bytes().ct_eq(presented)))
}

impl<S> Layer<S> for AuthLayer {
    type Service = Authenticated<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Authenticated {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service made by [`AuthLayer`].
#[derive(Clone)]
pub struct Authenticated<S> {
    inner: S,
    layer: AuthLayer,
}

impl<S> Service<Request<Body>> for Authenticated<S>
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

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        // The clone is not ready; swap so the ready one serves this call (tower's rule).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let path = req.uri().path();
        let public =
            ALWAYS_PUBLIC.iter().any(|p| path.starts_with(p)) || self.layer.public.contains(&path);
        if public {
            return Box::pin(inner.call(req));
        }
        if let Some(presented) = req.headers().get(SERVICE_TOKEN_HEADER) {
            if service_token_matches(self.layer.service_token.as_deref(), presented.as_bytes()) {
                req.extensions_mut().insert(ServiceCall);
                return Box::pin(inner.call(req));
            }
            let status = Refusal::new(
                Reason::Unauthenticated,
                "service token refused: set the same SERVICE_TOKEN on the calling service and this one",
            )
            .to_status();
            return Box::pin(async move { Ok(status.into_http()) });
        }
        let verifier = self.layer.verifier.clone();
        Box::pin(async move {
            match verifier.verify_headers(req.headers()).await {
                Ok(caller) => {
                    req.extensions_mut().insert(caller);
                    inner.call(req).await
                }
                Err(e) => Ok(tonic::Status::from(e).into_http()),
            }
        })
    }
}

/// Gives the client's own faults in a request their precise status: oversize messages
/// RESOURCE_EXHAUSTED (tonic 0.14 says `OUT_OF_RANGE`), undecodable or wrongly compressed
/// bytes INVALID_ARGUMENT (tonic says `INTERNAL`), each with its reason and a message
/// naming the limit or the problem.
///
/// Unary and server-streaming calls fail before the handler runs, as a trailers-only
/// response whose status sits in the headers; that is what this rewrites. Client
/// streams see the error from their inbound stream and map it with [`client_fault`].
#[derive(Clone, Copy)]
pub struct ClientFaultLayer;

impl<S> Layer<S> for ClientFaultLayer {
    type Service = ClientFault<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ClientFault { inner }
    }
}

/// The service made by [`ClientFaultLayer`].
#[derive(Clone)]
pub struct ClientFault<S> {
    inner: S,
}

/// The precise status for an error tonic met while reading a request, if it is the
/// client's fault (oversize, undecodable, badly compressed); `None` for anything else
/// (a broken connection, a handler's own status).
pub fn client_fault(status: &tonic::Status) -> Option<tonic::Status> {
    use tonic::Code;
    let message = status.message();
    let refusal = match status.code() {
        Code::OutOfRange if message.contains("message length too large") => {
            // tonic's text: "... found {len} bytes, the limit is: {limit} bytes".
            let numbers: Vec<&str> = message
                .split(|c: char| !c.is_ascii_digit())
                .filter(|s| !s.is_empty())
                .collect();
            let text = match numbers.as_slice() {
                [found, limit] => format!(
                    "request message is {found} bytes, over the server's limit of {limit} bytes (MAX_MESSAGE_BYTES)"
                ),
                _ => {
                    "request message is over the server's size limit (MAX_MESSAGE_BYTES)".to_owned()
                }
            };
            Refusal::new(Reason::RequestTooLarge, text)
        }
        Code::ResourceExhausted if message.starts_with("Error decompressing: size limit") => {
            Refusal::new(
                Reason::RequestTooLarge,
                "request message decompresses to more than the server's limit (MAX_MESSAGE_BYTES)",
            )
        }
        Code::Internal
            if message.starts_with("Error decompressing")
                || message.starts_with("protocol error: received message with")
                || message.starts_with("Unexpected EOF decoding stream") =>
        {
            Refusal::new(
                Reason::MalformedRequest,
                format!("request message is not framed or compressed correctly: {message}"),
            )
        }
        Code::InvalidArgument if message.starts_with(switchboard_proto::codec::UNDECODABLE) => {
            Refusal::new(Reason::MalformedRequest, format!("request {message}"))
        }
        _ => return None,
    };
    Some(refusal.to_status())
}

impl<S> Service<Request<Body>> for ClientFault<S>
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
        Box::pin(async move {
            let mut response = inner.call(req).await?;
            if let Some(status) = tonic::Status::from_header_map(response.headers())
                && let Some(rewritten) = client_fault(&status)
            {
                let headers = response.headers_mut();
                headers.remove("grpc-message");
                headers.remove("grpc-status-details-bin");
                if rewritten.add_header(headers).is_err() {
                    tracing::warn!("could not rewrite the status of a faulty request");
                }
            }
            Ok(response)
        })
    }
}

/// Tells a handler that its client **cancelled** the call (RST_STREAM CANCEL: the client
/// dropped the call or its deadline passed) rather than half-closing its request stream.
///
/// tonic reports both as the clean end of the request stream (`Ok(None)`). A presence
/// device must tell them apart: a half-close is a deliberate goodbye (offline at once), a
/// cancel is a client gone without one (linger for the reconnect grace). The flag is set
/// before the stream's end reaches the handler, so checking it there is not a race.
#[derive(Clone, Debug, Default)]
pub struct ClientCancel(Arc<std::sync::atomic::AtomicBool>);

impl ClientCancel {
    /// Whether the request stream ended because the client cancelled the call.
    pub fn cancelled(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// Puts a [`ClientCancel`] into the extensions of calls to the given (streaming) methods.
#[derive(Clone)]
pub struct CancelWatchLayer {
    paths: Arc<[&'static str]>,
}

impl CancelWatchLayer {
    /// Watches calls to `paths` (full method paths).
    pub fn new(paths: &[&'static str]) -> Self {
        Self {
            paths: paths.into(),
        }
    }
}

impl<S> Layer<S> for CancelWatchLayer {
    type Service = CancelWatch<S>;
    fn layer(&self, inner: S) -> Self::Service {
        CancelWatch {
            inner,
            paths: self.paths.clone(),
        }
    }
}

/// The service made by [`CancelWatchLayer`].
#[derive(Clone)]
pub struct CancelWatch<S> {
    inner: S,
    paths: Arc<[&'static str]>,
}

/// A request body that raises its [`ClientCancel`] flag when the client resets the stream.
struct WatchedBody {
    inner: Body,
    flag: ClientCancel,
}

impl http_body::Body for WatchedBody {
    type Data = <Body as http_body::Body>::Data;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Err(status))) = &polled
            && status.code() == tonic::Code::Cancelled
        {
            self.flag
                .0
                .store(true, std::sync::atomic::Ordering::Release);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl<S> Service<Request<Body>> for CancelWatch<S>
where
    S: Service<Request<Body>, Response = Response<Body>>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        if !self.paths.contains(&req.uri().path()) {
            return self.inner.call(req);
        }
        let flag = ClientCancel::default();
        let mut req = req.map(|inner| {
            Body::new(WatchedBody {
                inner,
                flag: flag.clone(),
            })
        });
        req.extensions_mut().insert(flag);
        self.inner.call(req)
    }
}

/// The connections `listener` accepts, as the server serves them: with `TCP_NODELAY`, and
/// closed if they send no HTTP/2 preface within `handshake` ([`HandshakeDeadline`]).
///
/// `TCP_NODELAY` matters because a stream writes small frames back to back: with Nagle's
/// algorithm the second waits for the peer's delayed ACK (~40 ms). tonic sets it only on
/// sockets it accepts itself, and we accept our own (for the handshake deadline).
///
/// [`HandshakeDeadline`]: crate::limits::HandshakeDeadline
pub fn incoming(
    listener: TcpListener,
    handshake: Option<std::time::Duration>,
) -> impl futures::Stream<Item = std::io::Result<crate::limits::HandshakeDeadline<tokio::net::TcpStream>>>
{
    tokio_stream::StreamExt::map(
        tokio_stream::wrappers::TcpListenerStream::new(listener),
        move |accepted| {
            let socket = accepted?;
            if let Err(e) = socket.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY on an accepted socket");
            }
            Ok(crate::limits::HandshakeDeadline::new(socket, handshake))
        },
    )
}

/// What a service hands to [`serve`].
pub struct Assembly {
    /// The service's own gRPC services, already [`tune!`](crate::tune)d.
    pub routes: Routes,
    /// Fully-qualified names of those services, reported by health.
    pub service_names: Vec<&'static str>,
    /// Authenticates every call but the public ones.
    pub auth: AuthLayer,
    /// Full paths of the long-lived streaming methods (their call span ends at set-up).
    pub long_lived: &'static [&'static str],
    /// Full paths of the client-streaming methods whose handlers read [`ClientCancel`];
    /// only their request bodies are watched.
    pub cancel_aware: &'static [&'static str],
    /// Cancelled once health reports `NOT_SERVING` at shutdown: the service's open streams
    /// end with UNAVAILABLE ("reconnect elsewhere") and new ones are refused.
    pub drain: CancellationToken,
}

/// The CORS policy for gRPC-Web from `origins`: POST from those origins only, with the
/// request headers gRPC-Web clients send and the gRPC status headers readable by the page.
/// No origins: no layer at all (a browser then finds no allowed origin, as it would from
/// a policy that allows none), so calls pay for CORS only where a page may call.
fn cors(origins: &[http::HeaderValue]) -> Option<tower_http::cors::CorsLayer> {
    use http::header::{AUTHORIZATION, CONTENT_TYPE, HeaderName};
    if origins.is_empty() {
        return None;
    }
    let layer = tower_http::cors::CorsLayer::new()
        .allow_origin(tower_http::cors::AllowOrigin::list(origins.iter().cloned()))
        .allow_methods([http::Method::POST])
        .allow_headers([
            CONTENT_TYPE,
            AUTHORIZATION,
            HeaderName::from_static("x-grpc-web"),
            HeaderName::from_static("x-user-agent"),
            HeaderName::from_static("grpc-timeout"),
        ])
        .expose_headers([
            HeaderName::from_static("grpc-status"),
            HeaderName::from_static("grpc-message"),
            HeaderName::from_static("grpc-status-details-bin"),
        ])
        .max_age(std::time::Duration::from_secs(600));
    Some(layer)
}

/// Time between health turning `NOT_SERVING` and open streams being ended, so clients and
/// load balancers watching health learn of the drain before their streams end.
const DRAIN_NOTICE: std::time::Duration = std::time::Duration::from_millis(100);

/// Serves `assembly` on `listener` until `shutdown` fires, then drains: health turns
/// `NOT_SERVING`, no new connections are accepted, the service's streams are ended
/// (`assembly.drain`), and open calls get the configured grace period before the server
/// returns.
pub async fn serve(
    config: &ServerConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
    assembly: Assembly,
) -> anyhow::Result<()> {
    let (health, health_service) = tonic_health::server::health_reporter();
    let mut names: Vec<&str> = assembly.service_names.clone();
    // "" is the whole server (what `grpc_health_probe` and Kubernetes ask by default).
    names.extend(["", "liveness", "readiness"]);
    for name in &names {
        health
            .set_service_status(*name, tonic_health::ServingStatus::Serving)
            .await;
    }
    // Reflection lists only what this server serves, though it knows every descriptor
    // (so grpcurl can describe the message types a served service imports).
    let reflection = || {
        let mut builder = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(switchboard_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // google.rpc error details, so `grpcurl -format-error` can print them.
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
            .with_service_name("grpc.health.v1.Health");
        for name in &assembly.service_names {
            builder = builder.with_service_name(*name);
        }
        builder
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    // Browsers: gRPC-Web over HTTP/1.1 or HTTP/2 on the same port, and CORS for the
    // origins allowed (none by default: a page elsewhere cannot call, other clients can).
    let mut builder = Server::builder().accept_http1(true);
    if let Some(tls) = &config.tls {
        builder = builder.tls_config(
            ServerTlsConfig::new().identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem)),
        )?;
    }
    let mut router = builder
        // Detect dead peers on long-lived streams (mobile clients vanish without a FIN).
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
        // tonic's default is no bound at all.
        .max_concurrent_streams(Some(config.limits.max_streams_per_connection))
        // Outermost: CORS answers a browser's preflight and marks allowed responses, then
        // gRPC-Web calls become gRPC calls for everything inside.
        .layer(tower::util::option_layer(cors(
            &config.cors_allowed_origins,
        )))
        .layer(tonic_web::GrpcWebLayer::new())
        // Then one span per call continuing the caller's trace (OpenTelemetry RPC
        // conventions) and the call metrics, so they see every call and its final status.
        .layer(crate::rpc::ServerTraceLayer::new(assembly.long_lived))
        // Then give the client's own faults (oversize, undecodable) their precise status,
        // whoever produced it.
        .layer(ClientFaultLayer)
        // Then shed unary calls over the concurrency limit and end those that run too long,
        // before any work (token checks included) is spent on them.
        .layer(crate::limits::UnaryLimitLayer::new(
            &config.limits,
            assembly.long_lived,
        ))
        // Then authentication, so handlers only ever see verified callers.
        .layer(assembly.auth)
        // Innermost: streams learn whether their client cancelled or half-closed.
        .layer(CancelWatchLayer::new(assembly.cancel_aware))
        .add_routes(assembly.routes);
    router = router
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);

    let incoming = incoming(listener, config.limits.handshake_timeout);
    let drain = assembly.drain.clone();
    let signal = {
        let shutdown = shutdown.clone();
        let health = health.clone();
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let drain = drain.clone();
        async move {
            shutdown.cancelled().await;
            tracing::info!("draining: health NOT_SERVING, ending streams");
            // Liveness stays SERVING until exit: a draining process is not a dead one, and
            // restarting it would cut the drain short. Readiness and the rest drain.
            for name in names.iter().filter(|n| n.as_str() != "liveness") {
                health
                    .set_service_status(name, tonic_health::ServingStatus::NotServing)
                    .await;
            }
            tokio::time::sleep(DRAIN_NOTICE).await;
            drain.cancel();
        }
    };
    let server = router.serve_with_incoming_shutdown(incoming, signal);
    tokio::pin!(server);
    let grace = config.shutdown_grace;
    tokio::select! {
        result = &mut server => result?,
        _ = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(grace_secs = grace.as_secs(), "shutdown grace elapsed; closing remaining calls");
        }
    }
    drain.cancel();
    tracing::info!("drained");
    Ok(())
}

/// The whole life of a service binary after its configuration is validated: telemetry,
/// listen, serve `/metrics`, log both addresses, run until SIGTERM/SIGINT (the drain),
/// flush telemetry, and turn the outcome into an exit code.
pub async fn main<F, Fut>(
    service: &'static str,
    config: &ServerConfig,
    run: F,
) -> std::process::ExitCode
where
    F: FnOnce(TcpListener, CancellationToken) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    use std::process::ExitCode;
    let telemetry = match crate::telemetry::init(service, config.log_format) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("{service}: cannot start telemetry: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let listener = match TcpListener::bind(config.listen_addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(addr = %config.listen_addr, error = %e, "cannot listen");
            return ExitCode::FAILURE;
        }
    };
    if let Some(addr) = config.metrics_addr {
        match crate::metrics::serve(addr).await {
            Ok(Some(bound)) => {
                tracing::info!(metrics_addr = %bound, "metrics at http://{bound}/metrics")
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(error = %e, "cannot serve metrics");
                return ExitCode::FAILURE;
            }
        }
    }
    match listener.local_addr() {
        Ok(addr) => tracing::info!(%addr, "{service} listening"),
        Err(e) => tracing::warn!(error = %e, "listening on an unknown address"),
    }
    let result = run(listener, crate::shutdown::on_signal()).await;
    background_tasks(config.shutdown_grace).await;
    telemetry.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{service} failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Longest the background tasks get after the server has stopped.
pub const BACKGROUND_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// At exit: waits for the process's background tasks (at most `grace`, and at most
/// [`BACKGROUND_GRACE`]) and says how that went.
pub async fn background_tasks(grace: std::time::Duration) {
    match crate::shutdown::finish(grace.min(BACKGROUND_GRACE)).await {
        0 => tracing::info!("background tasks done"),
        left => tracing::warn!(left, "background tasks still running at exit"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_faults_get_precise_statuses() {
        let s = tonic::Status::out_of_range(
            "Error, decoded message length too large: found 2000000 bytes, the limit is: 1048576 bytes",
        );
        let r = client_fault(&s).expect("rewritten");
        assert_eq!(r.code(), tonic::Code::ResourceExhausted);
        assert!(
            r.message().contains("2000000") && r.message().contains("1048576"),
            "{}",
            r.message()
        );
        assert_eq!(
            crate::status::reason_of(&r).as_deref(),
            Some("REQUEST_TOO_LARGE")
        );
        let undecodable = tonic::Status::invalid_argument(format!(
            "{}ConnectRequest: invalid wire type",
            switchboard_proto::codec::UNDECODABLE
        ));
        let r = client_fault(&undecodable).expect("rewritten");
        assert_eq!(r.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            crate::status::reason_of(&r).as_deref(),
            Some("MALFORMED_REQUEST")
        );
        let flag = tonic::Status::internal(
            "protocol error: received message with invalid compression flag: 7 (valid flags are 0 and 1), while sending request",
        );
        assert_eq!(
            client_fault(&flag).map(|s| s.code()),
            Some(tonic::Code::InvalidArgument)
        );
        assert!(client_fault(&tonic::Status::out_of_range("seq out of range")).is_none());
        assert!(client_fault(&tonic::Status::internal("h2 protocol error: broken pipe")).is_none());
        assert!(client_fault(&tonic::Status::invalid_argument("title is required")).is_none());
    }

    proptest::proptest! {
        /// Whatever status tonic produced, the rewrite never panics and never turns
        /// anything into UNKNOWN or INTERNAL.
        #[test]
        fn client_fault_never_panics_or_answers_internal(code in 0i32..17, message in ".{0,200}") {
            let status = tonic::Status::new(tonic::Code::from_i32(code), message);
            if let Some(rewritten) = client_fault(&status) {
                proptest::prop_assert!(!matches!(
                    rewritten.code(),
                    tonic::Code::Unknown | tonic::Code::Internal
                ));
            }
        }
    }
}
