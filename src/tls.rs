//! TLS for `turns:` and `https:`/`wss:`: one reloadable certificate shared by every TLS
//! listener, modern defaults (TLS 1.2 and 1.3, rustls' safe cipher suites only).

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// Why certificate material could not be used; always names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate file is missing, unreadable or holds no certificate.
    #[error("TLS certificate file {path}: {message}")]
    Cert {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The key file is missing, unreadable, holds no key, or the key does not match.
    #[error("TLS key file {path}: {message}")]
    Key {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Read a PEM chain and key and check that they belong together.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let cert_err = |message: String| TlsError::Cert {
        path: cert.to_path_buf(),
        message,
    };
    let key_err = |message: String| TlsError::Key {
        path: key.to_path_buf(),
        message,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| cert_err(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| cert_err(e.to_string()))?;
    if chain.is_empty() {
        return Err(cert_err("no PEM certificate found".into()));
    }
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| key_err(e.to_string()))?;
    CertifiedKey::from_der(chain, der, &provider()).map_err(|e| {
        key_err(format!(
            "unusable key or key does not match the certificate: {e}"
        ))
    })
}

/// The certificate every TLS listener serves; `reload` swaps it without touching live sessions.
#[derive(Debug)]
pub struct ReloadableCert {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: ArcSwap<CertifiedKey>,
}

impl ReloadableCert {
    /// Load the pair for the first time.
    pub fn load(cert: &Path, key: &Path) -> Result<ReloadableCert, TlsError> {
        let ck = load_certified_key(cert, key)?;
        Ok(ReloadableCert {
            cert_path: cert.to_path_buf(),
            key_path: key.to_path_buf(),
            current: ArcSwap::from_pointee(ck),
        })
    }

    /// Re-read the files; on any error the old certificate stays in service.
    pub fn reload(&self) -> Result<(), TlsError> {
        let ck = load_certified_key(&self.cert_path, &self.key_path)?;
        self.current.store(Arc::new(ck));
        Ok(())
    }

    /// A rustls server config that always serves the current certificate.
    pub fn server_config(self: &Arc<Self>, alpn: &[&[u8]]) -> Result<Arc<ServerConfig>, TlsError> {
        let mut cfg = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(cfg))
    }
}

impl ResolvesServerCert for ReloadableCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// Run one server handshake under a shared cap: the permit is taken only once the client has
/// sent something (a silent socket costs no handshake slot) and given back when the
/// handshake ends. Waiting for a permit and the handshake itself may each take `deadline`;
/// either running out is a `TimedOut` error.
pub async fn bounded_handshake(
    acceptor: &TlsAcceptor,
    stream: TcpStream,
    limit: &tokio::sync::Semaphore,
    in_flight: &prometheus::IntGauge,
    deadline: Duration,
) -> std::io::Result<TlsStream<TcpStream>> {
    let timed_out = || std::io::Error::from(std::io::ErrorKind::TimedOut);
    let _permit = tokio::time::timeout(deadline, async {
        stream.readable().await?;
        limit
            .acquire()
            .await
            .map_err(|_| std::io::Error::other("handshake limiter closed"))
    })
    .await
    .map_err(|_| timed_out())??;
    in_flight.inc();
    let r = tokio::time::timeout(deadline, acceptor.accept(stream)).await;
    in_flight.dec();
    r.map_err(|_| timed_out())?
}

/// Connections a task of their own accepted (and, for TLS, handshook), handed to axum as a
/// listener: the HTTPS listener's and the shared port's HTTPS side.
pub struct Accepted<Io> {
    rx: mpsc::Receiver<(Io, SocketAddr)>,
    local: SocketAddr,
}

impl<Io> Accepted<Io> {
    /// A listener over what the accepting task sends on `rx`, reporting `local`.
    pub fn from_channel(rx: mpsc::Receiver<(Io, SocketAddr)>, local: SocketAddr) -> Accepted<Io> {
        Accepted { rx, local }
    }

    /// The next connection, or `None` once the listener has shut down.
    pub async fn next(&mut self) -> Option<(Io, SocketAddr)> {
        self.rx.recv().await
    }
}

/// Accepts TCP connections and completes TLS handshakes concurrently, so one slow
/// handshake never delays the next client; yields finished streams.
pub type TlsListener = Accepted<TlsStream<TcpStream>>;

impl TlsListener {
    /// Start handshaking connections from `tcp` until `shutdown` resolves, at most
    /// `max_handshakes` at once (see [`bounded_handshake`]), counted in `in_flight`.
    pub fn new(
        tcp: TcpListener,
        config: Arc<ServerConfig>,
        handshake_timeout: Duration,
        max_handshakes: usize,
        in_flight: prometheus::IntGauge,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<TlsListener> {
        let local = tcp.local_addr()?;
        let (tx, rx) = mpsc::channel(256);
        let acceptor = TlsAcceptor::from(config);
        let limit = Arc::new(tokio::sync::Semaphore::new(max_handshakes.max(1)));
        tokio::spawn(async move {
            let mut shutdown = std::pin::pin!(shutdown);
            loop {
                let (stream, peer) = tokio::select! {
                    r = tcp.accept() => match r {
                        Ok(x) => x,
                        Err(e) => {
                            tracing::warn!(error = %e, "TLS accept error");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                    _ = &mut shutdown => break,
                };
                let _ = stream.set_nodelay(true);
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                let in_flight = in_flight.clone();
                let limit = limit.clone();
                tokio::spawn(async move {
                    match bounded_handshake(
                        &acceptor,
                        stream,
                        &limit,
                        &in_flight,
                        handshake_timeout,
                    )
                    .await
                    {
                        Ok(tls) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Err(e) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    }
                });
            }
        });
        Ok(Accepted::from_channel(rx, local))
    }
}

impl<Io> axum::serve::Listener for Accepted<Io>
where
    Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    type Io = Io;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(x) => x,
            // Shut down: never yield again; axum's graceful shutdown ends the server.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_files_are_named() {
        let e = load_certified_key(Path::new("/nonexistent/c.pem"), Path::new("/k.pem"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/c.pem"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let c = dir.path().join("c.pem");
        std::fs::write(&c, "not pem").unwrap();
        let e = load_certified_key(&c, Path::new("/k.pem"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("c.pem") && e.contains("no PEM certificate"),
            "{e}"
        );
    }
}
