//! Overload protection every server shares: what one instance does when clients ask for
//! more than it should give.
//!
//! - [`UnaryLimitLayer`]: at most `MAX_CONCURRENT_REQUESTS` unary calls at once, the next
//!   one shed at once with RESOURCE_EXHAUSTED (reason OVERLOADED, RetryInfo) rather than
//!   queued without bound; and each unary call ends after `UNARY_TIMEOUT_MS` with
//!   DEADLINE_EXCEEDED (reason TIMEOUT). Streams and health checks are not counted: a
//!   probe must answer under load, and streams have their own per-user cap.
//! - [`HandshakeDeadline`]: a connection that has not sent its first 24 bytes (the HTTP/2
//!   preface, or a TLS hello) within `HANDSHAKE_TIMEOUT_MS` is closed, so idle sockets
//!   cannot pile up.
//! - [`PerUser`]: at most N open streams per user on one instance
//!   (`MESSAGING_MAX_STREAMS_PER_USER`, `PRESENCE_MAX_STREAMS_PER_USER`).
//!
//! Why not tower's `GlobalConcurrencyLimit` + `LoadShed` + `Timeout`: they answer with
//! errors tonic turns into a bare UNAVAILABLE or CANCELLED, without reason or RetryInfo,
//! and they cannot exempt health checks; the limit here is one shared semaphore and a
//! `try_acquire`, and the answer is a [`Refusal`].

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Semaphore;
use tonic::body::Body;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tower::{Layer, Service};

use crate::bus::BoxFuture;
use crate::config::ServerLimits;
use crate::status::{Reason, Refusal};

/// Paths never shed nor timed: health probes must answer even under load.
const EXEMPT: &[&str] = &["/grpc.health.v1.Health/"];

/// When a shed client should try again.
pub const SHED_RETRY: Duration = Duration::from_millis(200);

/// Bytes a connection must send before [`HandshakeDeadline`] lets it be: the length of the
/// HTTP/2 client preface.
pub const PREFACE_BYTES: usize = 24;

/// Sheds unary calls over the concurrency limit and ends those that run too long.
#[derive(Clone)]
pub struct UnaryLimitLayer {
    /// The permits, shared by every connection, and how many there are.
    permits: Option<(Arc<Semaphore>, usize)>,
    timeout: Option<Duration>,
    long_lived: Arc<[&'static str]>,
}

impl UnaryLimitLayer {
    /// The limits of `limits`; calls to `long_lived` paths (streams) are not limited.
    pub fn new(limits: &ServerLimits, long_lived: &[&'static str]) -> Self {
        Self {
            permits: limits
                .max_concurrent_requests
                .map(|n| (Arc::new(Semaphore::new(n)), n)),
            timeout: limits.unary_timeout,
            long_lived: long_lived.into(),
        }
    }
}

impl<S> Layer<S> for UnaryLimitLayer {
    type Service = UnaryLimit<S>;
    fn layer(&self, inner: S) -> Self::Service {
        UnaryLimit {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service made by [`UnaryLimitLayer`].
#[derive(Clone)]
pub struct UnaryLimit<S> {
    inner: S,
    layer: UnaryLimitLayer,
}

impl<S> Service<Request<Body>> for UnaryLimit<S>
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
        if self.layer.long_lived.contains(&path) || EXEMPT.iter().any(|p| path.starts_with(p)) {
            return Box::pin(inner.call(req));
        }
        let permit = match &self.layer.permits {
            None => None,
            Some((permits, limit)) => match permits.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    crate::metrics::shed();
                    let status = Refusal::new(
                        Reason::Overloaded,
                        format!(
                            "server is at its limit of {limit} concurrent calls (MAX_CONCURRENT_REQUESTS); retry shortly"
                        ),
                    )
                    .retry_after(SHED_RETRY)
                    .to_status();
                    return Box::pin(async move { Ok(status.into_http()) });
                }
            },
        };
        let timeout = self.layer.timeout;
        Box::pin(async move {
            let _permit = permit;
            match timeout {
                None => inner.call(req).await,
                Some(limit) => match tokio::time::timeout(limit, inner.call(req)).await {
                    Ok(done) => done,
                    Err(_) => Ok(Refusal::new(
                        Reason::Timeout,
                        format!(
                            "call ran longer than the server's limit of {} ms (UNARY_TIMEOUT_MS)",
                            limit.as_millis()
                        ),
                    )
                    .to_status()
                    .into_http()),
                },
            }
        })
    }
}

/// An accepted connection that is closed (a read error) if it has not sent
/// [`PREFACE_BYTES`] within its deadline.
pub struct HandshakeDeadline<T> {
    inner: T,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    seen: usize,
}

impl<T> HandshakeDeadline<T> {
    /// Watches `inner`; `None`: no deadline.
    pub fn new(inner: T, limit: Option<Duration>) -> Self {
        Self {
            inner,
            deadline: limit.map(|d| Box::pin(tokio::time::sleep(d))),
            seen: 0,
        }
    }

    /// The connection inside.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for HandshakeDeadline<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                self.seen += buf.filled().len() - before;
                if self.seen >= PREFACE_BYTES {
                    self.deadline = None;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                let expired = self
                    .deadline
                    .as_mut()
                    .is_some_and(|d| d.as_mut().poll(cx).is_ready());
                if expired {
                    crate::metrics::handshake_timeout();
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "connection sent no HTTP/2 preface within HANDSHAKE_TIMEOUT_MS",
                    )));
                }
                Poll::Pending
            }
            other => other,
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for HandshakeDeadline<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<T: Connected<ConnectInfo = TcpConnectInfo>> Connected for HandshakeDeadline<T> {
    type ConnectInfo = TcpConnectInfo;
    fn connect_info(&self) -> TcpConnectInfo {
        self.inner.connect_info()
    }
}

/// Open streams per user on this instance, with a cap.
#[derive(Debug)]
pub struct PerUser {
    max: Option<usize>,
    open: Mutex<HashMap<String, usize>>,
}

/// One open stream of a user; dropping it frees the place.
#[derive(Debug)]
pub struct StreamSlot {
    owner: Arc<PerUser>,
    user: String,
}

impl PerUser {
    /// At most `max` streams per user (`None`: no cap, only counting).
    pub fn new(max: Option<usize>) -> Arc<Self> {
        Arc::new(Self {
            max,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A place for one more stream of `user`, or `Err(limit)` when the user has that many.
    pub fn open(self: &Arc<Self>, user: &str) -> Result<StreamSlot, usize> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(user.to_owned()).or_insert(0);
        if let Some(max) = self.max
            && *n >= max
        {
            return Err(max);
        }
        *n += 1;
        Ok(StreamSlot {
            owner: self.clone(),
            user: user.to_owned(),
        })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.owner.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.user) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.user);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_per_user_are_capped_and_freed() {
        let per_user = PerUser::new(Some(2));
        let a1 = per_user.open("a").expect("first");
        let _a2 = per_user.open("a").expect("second");
        assert_eq!(per_user.open("a").err(), Some(2));
        assert!(per_user.open("b").is_ok(), "per user");
        drop(a1);
        assert!(
            per_user.open("a").is_ok(),
            "a closed stream frees its place"
        );
        let unlimited = PerUser::new(None);
        let slots: Vec<_> = (0..1000).map(|_| unlimited.open("a")).collect();
        assert!(slots.iter().all(Result::is_ok));
    }
}
