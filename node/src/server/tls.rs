//! TLS on the API port (8000): gRPC and HTTP/1.1 on one listener, told apart by ALPN (`h2`,
//! `http/1.1`), so REST, `/metrics`, `/ready` and Prometheus work over TLS as gRPC does; and
//! mutual TLS on the Raft port (7000) between members (`security.peer_tls`), whose client side
//! is [`peer_client`]'s configuration in the node's peer channels.
//!
//! - TLS is terminated here, on the [`Incoming`] stream of any transport, before tonic sees the
//!   connection; tonic's own server TLS advertises only `h2` and cannot reload.
//! - Each handshake runs in its own task with [`HANDSHAKE_TIMEOUT`], at most [`HANDSHAKES_MAX`]
//!   at once, so a client that stalls its handshake holds up no other.
//! - `security.tls.{cert_file,key_file,client_ca_file,crl_file}` are read again when one of them changes
//!   (checked every [`RELOAD_CHECK`]) or on SIGHUP. A new connection uses the new files, an open
//!   one keeps its session. A reload that fails (a half-written file) keeps the configuration
//!   in use and logs why; the next change tries again.
//! - With `client_ca_file`, a client must present a certificate one of those CAs signed, and one
//!   that `crl_file` lists is refused; on the Raft port always (`security.peer_tls.ca_file`,
//!   `crl_file`).

use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use futures::StreamExt;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

use crate::config::{PeerTlsSection, TlsSection};
use crate::transport::{BoxedIo, Incoming};

/// How long a client may take to finish its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes under way at once; further connections wait to be accepted.
pub const HANDSHAKES_MAX: usize = 512;
/// How often the files are checked for a change.
pub const RELOAD_CHECK: Duration = Duration::from_secs(2);

/// Which port a [`ServerTls`] serves, for its configuration keys and its protocols.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    /// Port 8000: `security.tls`, gRPC and HTTP/1.1.
    Api,
    /// Port 7000: `security.peer_tls`, gRPC between members, a client certificate required.
    Raft,
}

impl Port {
    fn section(self) -> &'static str {
        match self {
            Port::Api => "security.tls",
            Port::Raft => "security.peer_tls",
        }
    }

    fn ca_key(self) -> &'static str {
        match self {
            Port::Api => "security.tls.client_ca_file",
            Port::Raft => "security.peer_tls.ca_file",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Port::Api => "API",
            Port::Raft => "Raft",
        }
    }
}

/// A port's TLS configuration, replaced whole on a reload.
pub struct ServerTls {
    port: Port,
    files: TlsSection,
    current: ArcSwap<rustls::ServerConfig>,
    /// The files' modification times when `current` was read.
    stamps: Mutex<Vec<Option<SystemTime>>>,
}

impl ServerTls {
    /// Read the files `files` names, for the API port; the error names the key and the fix.
    pub fn load(files: &TlsSection) -> Result<Self, String> {
        Self::load_for(Port::Api, files.clone())
    }

    /// Read `security.peer_tls`'s files, for the Raft port.
    pub fn for_peers(peer: &PeerTlsSection) -> Result<Self, String> {
        let files = TlsSection {
            cert_file: peer.cert_file.clone(),
            key_file: peer.key_file.clone(),
            client_ca_file: peer.ca_file.clone(),
            client_principals: Vec::new(),
            ca_file: None,
            crl_file: peer.crl_file.clone(),
        };
        Self::load_for(Port::Raft, files)
    }

    fn load_for(port: Port, files: TlsSection) -> Result<Self, String> {
        let stamps = stamps(&files);
        let config = read(port, &files)?;
        Ok(Self { port, files, current: ArcSwap::from_pointee(config), stamps: Mutex::new(stamps) })
    }

    /// Read the files again if one changed since the last read (or if `forced`): whether a new
    /// configuration is in use.
    pub fn reload(&self, forced: bool) -> Result<bool, String> {
        let now = stamps(&self.files);
        let mut seen = self.stamps.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if !forced && *seen == now {
            return Ok(false);
        }
        // Remembered even when the read fails: the next change, not every check, tries again.
        *seen = now;
        let config = read(self.port, &self.files)?;
        self.current.store(Arc::new(config));
        Ok(true)
    }

    /// `incoming` with TLS: each connection comes out once its handshake is done.
    pub fn wrap(self: Arc<Self>, mut incoming: Incoming) -> Incoming {
        let (accepted_tx, accepted_rx) = mpsc::channel::<io::Result<BoxedIo>>(64);
        let port = self.port.name();
        tokio::spawn(async move {
            let handshakes = Arc::new(Semaphore::new(HANDSHAKES_MAX));
            loop {
                let next = tokio::select! {
                    next = incoming.next() => next,
                    // The server stopped: let the listener go.
                    _ = accepted_tx.closed() => return,
                };
                let socket = match next {
                    None => return,
                    Some(Ok(socket)) => socket,
                    Some(Err(error)) => {
                        if accepted_tx.send(Err(error)).await.is_err() {
                            return;
                        }
                        continue;
                    }
                };
                let Ok(permit) = handshakes.clone().acquire_owned().await else { return };
                let acceptor = tokio_rustls::TlsAcceptor::from(self.current.load_full());
                let accepted_tx = accepted_tx.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    let BoxedIo(socket, mut peer) = socket;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(socket)).await {
                        Ok(Ok(stream)) => {
                            // Verified against the client CAs in the handshake, when they are set.
                            let shown = stream.get_ref().1.peer_certificates().and_then(|chain| chain.first());
                            peer.client_cert = shown.map(|cert| Arc::new(cert.clone().into_owned()));
                            let _ = accepted_tx.send(Ok(BoxedIo(Box::new(stream), peer))).await;
                        }
                        // A client's mistake (plain text, an unknown CA, no certificate): its
                        // connection closes; nothing else is affected.
                        Ok(Err(error)) => tracing::debug!(%error, ?peer, "a TLS handshake on the {port} port failed"),
                        Err(_) => tracing::debug!(?peer, "a TLS handshake on the {port} port timed out"),
                    }
                });
            }
        });
        Box::pin(tokio_stream::wrappers::ReceiverStream::new(accepted_rx))
    }
}

/// Reload `tls` when its files change or the process gets SIGHUP, until `stopped`; after each
/// reload that succeeds, `then()` (the Raft port's: the peer channels' client side).
pub async fn watch_files(
    tls: Arc<ServerTls>,
    then: impl Fn() -> Result<(), String>,
    mut stopped: watch::Receiver<bool>,
) {
    let port = tls.port.name();
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(
            |error| tracing::warn!(%error, "SIGHUP cannot reload the {port} port's TLS files; file changes still do"),
        )
        .ok();
    loop {
        let forced = tokio::select! {
            _ = tokio::time::sleep(RELOAD_CHECK) => false,
            Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => None } } => true,
            _ = stopped.wait_for(|stop| *stop) => return,
        };
        match tls.reload(forced).and_then(|read| if read { then().map(|()| true) } else { Ok(false) }) {
            Ok(true) => tracing::info!("the {port} port's TLS files were read again; new connections use them"),
            Ok(false) => {}
            Err(error) => {
                tracing::warn!(%error, "the {port} port's TLS files could not be read again; the ones in use stay")
            }
        }
    }
}

/// The client side of `security.peer_tls`, for the node's calls to its peers: its certificate
/// and the members' CAs (the server name checked is the host of the address dialled).
pub fn peer_client(peer: &PeerTlsSection) -> Result<tonic::transport::ClientTlsConfig, String> {
    let (Some(cert_file), Some(key_file), Some(ca_file)) = (&peer.cert_file, &peer.key_file, &peer.ca_file) else {
        return Err("security.peer_tls.cert_file, key_file and ca_file must all be set".into());
    };
    // Parsed first, so a bad file is refused here with its key's name, not at the first call.
    certificates("security.peer_tls.cert_file", cert_file)?;
    certificates("security.peer_tls.ca_file", ca_file)?;
    private_key("security.peer_tls.key_file", key_file)?;
    let bytes = |key: &str, path: &Path| std::fs::read(path).map_err(|e| format!("{key}: {}: {e}", path.display()));
    let identity = tonic::transport::Identity::from_pem(
        bytes("security.peer_tls.cert_file", cert_file)?,
        bytes("security.peer_tls.key_file", key_file)?,
    );
    Ok(tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(bytes("security.peer_tls.ca_file", ca_file)?))
        .identity(identity))
}

fn stamps(files: &TlsSection) -> Vec<Option<SystemTime>> {
    [&files.cert_file, &files.key_file, &files.client_ca_file, &files.crl_file]
        .into_iter()
        .map(|path| path.as_deref().and_then(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok()))
        .collect()
}

fn read(port: Port, files: &TlsSection) -> Result<rustls::ServerConfig, String> {
    let section = port.section();
    let (Some(cert_file), Some(key_file)) = (&files.cert_file, &files.key_file) else {
        return Err(format!("{section}.cert_file and {section}.key_file must both be set"));
    };
    let chain = certificates(&format!("{section}.cert_file"), cert_file)?;
    let key = private_key(&format!("{section}.key_file"), key_file)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let builder = match &files.client_ca_file {
        None if port == Port::Raft => return Err(format!("{}: must be set (the members' CA)", port.ca_key())),
        None => builder.with_no_client_auth(),
        Some(ca_file) => {
            let ca_key = port.ca_key();
            let mut roots = rustls::RootCertStore::empty();
            for ca in certificates(ca_key, ca_file)? {
                roots.add(ca).map_err(|e| format!("{ca_key}: {}: {e}", ca_file.display()))?;
            }
            let mut verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            if let Some(crl_file) = &files.crl_file {
                verifier = verifier.with_crls(revocation_lists(&format!("{section}.crl_file"), crl_file)?);
            }
            let verifier = verifier.build().map_err(|e| format!("{ca_key}: {}: {e}", ca_file.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| {
        format!(
            "{section}.cert_file and key_file: {} and {} do not make a usable certificate: {e}",
            cert_file.display(),
            key_file.display()
        )
    })?;
    config.alpn_protocols = match port {
        Port::Api => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        Port::Raft => vec![b"h2".to_vec()],
    };
    Ok(config)
}

/// Every certificate revocation list in the PEM file at `path` (none is allowed: nothing revoked).
fn revocation_lists(key: &str, path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, String> {
    CertificateRevocationListDer::pem_file_iter(path)
        .and_then(|lists| lists.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{key}: cannot read PEM revocation lists (X509 CRL) from {}: {e}", path.display()))
}

fn private_key(key: &str, path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        format!(
            "{key}: cannot read a PEM private key from {}: {e}; give the key of the certificate (PKCS#8, PKCS#1 or SEC1)",
            path.display()
        )
    })
}

/// Every certificate in the PEM file at `path` (at least one).
fn certificates(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let cannot =
        |e: &dyn std::fmt::Display| format!("{key}: cannot read PEM certificates from {}: {e}", path.display());
    let chain = CertificateDer::pem_file_iter(path)
        .map_err(|e| cannot(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cannot(&e))?;
    if chain.is_empty() {
        return Err(cannot(&"the file holds no CERTIFICATE block"));
    }
    Ok(chain)
}
