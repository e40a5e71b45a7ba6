//! [`maos_node::transport::Transport`] over turmoil's simulated TCP.

use std::io;

use hyper_util::rt::TokioIo;
use maos_node::transport::{peer_endpoint, BoxedIo, Incoming, PeerAddr, Transport};
use tonic::transport::{Channel, Endpoint, Uri};

/// Connections inside a turmoil simulation.
#[derive(Debug, Default, Clone, Copy)]
pub struct SimTransport;

/// A lazily connecting channel to `addr` over the simulated network.
pub fn sim_channel(addr: &str) -> Result<Channel, tonic::transport::Error> {
    let target = addr.to_string();
    let connector = tower::service_fn(move |_: Uri| {
        let target = target.clone();
        async move { turmoil::net::TcpStream::connect(target).await.map(TokioIo::new) }
    });
    Ok(peer_endpoint(Endpoint::from_shared(format!("http://{addr}"))?).connect_with_connector_lazy(connector))
}

#[tonic::async_trait]
impl Transport for SimTransport {
    /// The simulation has no TLS: `security.peer_tls` is never set in it.
    fn channel(
        &self,
        addr: &str,
        _tls: Option<tonic::transport::ClientTlsConfig>,
    ) -> Result<Channel, tonic::transport::Error> {
        sim_channel(addr)
    }

    async fn listen(&self, addr: &str) -> io::Result<Incoming> {
        let listener = turmoil::net::TcpListener::bind(addr).await?;
        let stream = futures::stream::unfold(listener, |listener| async move {
            let accepted = listener.accept().await.map(|(socket, peer)| BoxedIo(Box::new(socket), PeerAddr::at(peer)));
            Some((accepted, listener))
        });
        Ok(Box::pin(stream))
    }

    async fn refused(&self, addr: &str, within: std::time::Duration) -> bool {
        let attempt = tokio::time::timeout(within, turmoil::net::TcpStream::connect(addr)).await;
        matches!(attempt, Ok(Err(error)) if error.kind() == io::ErrorKind::ConnectionRefused)
    }
}
