//! Raw gRPC over HTTP/2 for what a generated client never sends: bytes that are not a
//! protobuf message, a wrong compression flag, and a call reset with RST_STREAM(CANCEL)
//! while its request stream is still open.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::{BufMut, Bytes, BytesMut};
use tokio::net::TcpStream;

/// One open call: its request stream and, once the server answered, its response.
pub struct RawCall {
    send: h2::SendStream<Bytes>,
    response: Option<h2::client::ResponseFuture>,
    head: Option<http::response::Parts>,
    body: Option<h2::RecvStream>,
    buffer: BytesMut,
    _conn: tokio::task::JoinHandle<()>,
}

/// A gRPC message frame: compressed flag, length, payload.
pub fn frame(payload: &[u8], compressed: bool) -> Bytes {
    let mut b = BytesMut::with_capacity(payload.len() + 5);
    b.put_u8(u8::from(compressed));
    b.put_u32(payload.len() as u32);
    b.put_slice(payload);
    b.freeze()
}

impl RawCall {
    /// Opens a call to `path` (`/package.Service/Method`) on `addr`, with `token` if given
    /// and `encoding` as `grpc-encoding` if given.
    pub async fn open(
        addr: SocketAddr,
        path: &str,
        token: Option<&str>,
        encoding: Option<&str>,
    ) -> anyhow::Result<Self> {
        let tcp = TcpStream::connect(addr).await?;
        let (client, conn) = h2::client::handshake(tcp).await?;
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut client = client.ready().await?;
        let mut req = http::Request::builder()
            .method("POST")
            .uri(format!("http://{addr}{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        if let Some(token) = token {
            req = req.header("authorization", format!("Bearer {token}"));
        }
        if let Some(encoding) = encoding {
            req = req.header("grpc-encoding", encoding);
        }
        let (response, send) = client.send_request(req.body(())?, false)?;
        Ok(Self {
            send,
            response: Some(response),
            head: None,
            body: None,
            buffer: BytesMut::new(),
            _conn: conn,
        })
    }

    /// Sends one frame's bytes (see [`frame`]); `end` half-closes the request stream.
    pub fn send(&mut self, bytes: Bytes, end: bool) -> anyhow::Result<()> {
        self.send.reserve_capacity(bytes.len());
        self.send.send_data(bytes, end)?;
        Ok(())
    }

    /// Resets the call with RST_STREAM(CANCEL), as a client that gives up does.
    pub fn cancel(&mut self) {
        self.send.send_reset(h2::Reason::CANCEL);
    }

    async fn head(&mut self) -> anyhow::Result<()> {
        if let Some(response) = self.response.take() {
            let (head, body) = response.await?.into_parts();
            self.head = Some(head);
            self.body = Some(body);
        }
        Ok(())
    }

    /// The next response message, or `None` once the response body ended.
    pub async fn message(&mut self, limit: Duration) -> anyhow::Result<Option<Bytes>> {
        tokio::time::timeout(limit, async {
            self.head().await?;
            loop {
                if self.buffer.len() >= 5 {
                    let len = u32::from_be_bytes([
                        self.buffer[1],
                        self.buffer[2],
                        self.buffer[3],
                        self.buffer[4],
                    ]) as usize;
                    if self.buffer.len() >= 5 + len {
                        let mut message = self.buffer.split_to(5 + len);
                        return Ok(Some(message.split_off(5).freeze()));
                    }
                }
                let body = self.body.as_mut().context("no body")?;
                match body.data().await {
                    Some(Ok(chunk)) => {
                        let _ = body.flow_control().release_capacity(chunk.len());
                        self.buffer.extend_from_slice(&chunk);
                    }
                    Some(Err(e)) => bail!("response body: {e}"),
                    None => return Ok(None),
                }
            }
        })
        .await
        .context("no response message in time")?
    }

    /// Reads to the end and returns the status the call ended with (from the trailers, or
    /// from the headers of a trailers-only answer).
    pub async fn status(&mut self, limit: Duration) -> anyhow::Result<tonic::Status> {
        tokio::time::timeout(limit, async {
            self.head().await?;
            if let Some(status) = self
                .head
                .as_ref()
                .and_then(|h| tonic::Status::from_header_map(&h.headers))
            {
                return Ok(status);
            }
            while self.message(limit).await?.is_some() {}
            let body = self.body.as_mut().context("no body")?;
            let trailers = body.trailers().await?.context("no trailers")?;
            tonic::Status::from_header_map(&trailers).context("trailers without grpc-status")
        })
        .await
        .context("no status in time")?
    }
}

/// The SETTINGS_MAX_CONCURRENT_STREAMS the server at `addr` announces to a new connection.
pub async fn announced_max_streams(addr: SocketAddr, limit: Duration) -> anyhow::Result<usize> {
    let tcp = TcpStream::connect(addr).await?;
    let (_client, mut conn): (h2::client::SendRequest<Bytes>, _) =
        h2::client::handshake(tcp).await?;
    let mut ping = conn.ping_pong().context("ping_pong taken")?;
    // The server's SETTINGS come first; once a ping has come back, they have been applied.
    tokio::time::timeout(limit, async {
        tokio::select! {
            r = &mut conn => r.map_err(anyhow::Error::from).and_then(|()| bail!("connection closed")),
            r = ping.ping(h2::Ping::opaque()) => r.map_err(anyhow::Error::from),
        }
    })
    .await
    .context("no ping answer")??;
    Ok(conn.max_concurrent_send_streams())
}
