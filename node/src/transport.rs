//! How a node reaches and accepts connections: real TCP, or a simulated network.
//!
//! Everything above this module speaks tonic over a [`Channel`] and serves from an [`Incoming`]
//! stream, so the same node code runs over real sockets and over turmoil's simulated TCP
//! (`maos-chaos` implements [`Transport`] for the simulation).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;
use tonic::transport::{Channel, ClientTlsConfig};

/// A byte stream a server can run a connection on.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// An accepted connection of any transport, with what is known of its peer.
pub struct BoxedIo(pub Box<dyn Io>, pub PeerAddr);

/// A client certificate a TLS handshake verified (its end-entity certificate, DER).
pub type ClientCert = Arc<tokio_rustls::rustls::pki_types::CertificateDer<'static>>;

/// The peer of a request's connection, in its extensions: its address when the transport knows
/// it (the audit's and the rate limit's source) and, over mutual TLS, the certificate it showed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerAddr {
    pub addr: Option<std::net::SocketAddr>,
    pub client_cert: Option<ClientCert>,
}

impl PeerAddr {
    /// A peer at `addr`, without a certificate.
    pub fn at(addr: std::net::SocketAddr) -> Self {
        Self { addr: Some(addr), client_cert: None }
    }

    /// The peer address of a request served from an [`Incoming`] (tonic's own
    /// `Request::remote_addr` knows only its own connection types).
    pub fn of(extensions: &tonic::Extensions) -> Option<std::net::SocketAddr> {
        extensions.get::<PeerAddr>().and_then(|peer| peer.addr)
    }

    /// The client certificate of a request's connection, if it showed one.
    pub fn client_cert(extensions: &tonic::Extensions) -> Option<ClientCert> {
        extensions.get::<PeerAddr>().and_then(|peer| peer.client_cert.clone())
    }
}

impl Connected for BoxedIo {
    type ConnectInfo = PeerAddr;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.1.clone()
    }
}

impl AsyncRead for BoxedIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for BoxedIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

/// A stream of accepted connections.
pub type Incoming = Pin<Box<dyn Stream<Item = io::Result<BoxedIo>> + Send>>;

/// Outgoing channels and listening sockets.
#[tonic::async_trait]
pub trait Transport: Send + Sync + 'static {
    /// A lazily connecting channel to `addr` (`host:port`), over mutual TLS with `tls`.
    fn channel(&self, addr: &str, tls: Option<ClientTlsConfig>) -> Result<Channel, tonic::transport::Error>;
    /// Listen on `addr` (`host:port`).
    async fn listen(&self, addr: &str) -> io::Result<Incoming>;
    /// Whether a connection to `addr` is refused within `within`: nothing listens there. `false`
    /// when it connects, times out, cannot be resolved, or the transport cannot tell.
    async fn refused(&self, _addr: &str, _within: std::time::Duration) -> bool {
        false
    }
}

/// Settings every node-to-node channel uses, on any transport.
///
/// HTTP/2 keep-alive pings find a connection that silently stopped delivering (a partition, a
/// peer frozen or killed without a reset) within `KEEP_ALIVE_TIMEOUT`; the channel then drops it
/// and reconnects on the next call instead of queueing calls on a dead connection.
pub fn peer_endpoint(endpoint: tonic::transport::Endpoint) -> tonic::transport::Endpoint {
    endpoint
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
}

pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
pub const KEEP_ALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
pub const KEEP_ALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Maximum gRPC message size between nodes and from clients: snapshots travel in chunks below it.
pub const MESSAGE_BYTES_MAX: usize = 64 * 1024 * 1024;

/// Real TCP sockets.
#[derive(Debug, Default, Clone, Copy)]
pub struct TcpTransport;

#[tonic::async_trait]
impl Transport for TcpTransport {
    fn channel(&self, addr: &str, tls: Option<ClientTlsConfig>) -> Result<Channel, tonic::transport::Error> {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let endpoint =
            peer_endpoint(tonic::transport::Endpoint::from_shared(format!("{scheme}://{addr}"))?).tcp_nodelay(true);
        let endpoint = match tls {
            Some(tls) => endpoint.tls_config(tls)?,
            None => endpoint,
        };
        Ok(endpoint.connect_lazy())
    }

    async fn listen(&self, addr: &str) -> io::Result<Incoming> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let stream = futures::stream::unfold(listener, |listener| async move {
            let accepted = listener.accept().await.map(|(socket, peer)| {
                let _ = socket.set_nodelay(true);
                BoxedIo(Box::new(socket), PeerAddr::at(peer))
            });
            Some((accepted, listener))
        });
        Ok(Box::pin(stream))
    }

    async fn refused(&self, addr: &str, within: std::time::Duration) -> bool {
        let attempt = tokio::time::timeout(within, tokio::net::TcpStream::connect(addr)).await;
        matches!(attempt, Ok(Err(error)) if error.kind() == io::ErrorKind::ConnectionRefused)
    }
}

/// A shared transport.
pub type SharedTransport = Arc<dyn Transport>;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_closed_port_is_refused_and_a_listening_one_is_not() -> anyhow::Result<()> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let open = listener.local_addr()?.to_string();
        let closed = {
            let gone = std::net::TcpListener::bind("127.0.0.1:0")?;
            gone.local_addr()?.to_string()
        };
        let within = std::time::Duration::from_secs(1);
        assert!(TcpTransport.refused(&closed, within).await, "nothing listens on {closed}");
        assert!(!TcpTransport.refused(&open, within).await, "{open} listens");
        Ok(())
    }
}
