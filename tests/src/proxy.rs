//! A loopback TCP proxy whose connections can be cut at once, like a network loss: the
//! server sees its connection end without the client ever closing its streams.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// Forwards `addr` to a target until dropped.
pub struct Proxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    cut: Arc<Notify>,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// A proxy on a free loopback port forwarding to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let cut = Arc::new(Notify::new());
        let notify = cut.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let notify = notify.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = notify.notified() => {}
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                    }
                });
            }
        });
        Ok(Self { addr, cut, accept })
    }

    /// Drops every connection through the proxy now (new ones still work).
    pub fn cut(&self) {
        self.cut.notify_waiters();
    }

    /// A channel to the target through the proxy.
    pub fn channel(&self) -> tonic::transport::Channel {
        crate::instance::channel(self.addr)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}
