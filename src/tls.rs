//! TLS for `turns:` and `https:`/`wss:`: one reloadable certificate shared by every TLS
//! listener, modern defaults (TLS 1.2 and 1.3, rustls' safe cipher suites only).

use arc_swap::{ArcSwap, ArcSwapOption};
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

/// Build a [`CertifiedKey`] from PEM bytes (an ACME order's chain and key, or the cache).
pub fn certified_key_from_pem(chain: &[u8], key: &[u8]) -> Result<CertifiedKey, TlsError> {
    let err = |message: String| TlsError::Config(format!("certificate from PEM: {message}"));
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain)
        .collect::<Result<_, _>>()
        .map_err(|e| err(e.to_string()))?;
    if chain.is_empty() {
        return Err(err("no PEM certificate found".into()));
    }
    let der = PrivateKeyDer::from_pem_slice(key).map_err(|e| err(e.to_string()))?;
    CertifiedKey::from_der(chain, der, &provider()).map_err(|e| err(e.to_string()))
}

/// ALPN of an ACME TLS-ALPN-01 validation (RFC 8737).
pub const ALPN_ACME: &[u8] = b"acme-tls/1";

/// Whether a ClientHello is an ACME validation: RFC 8737 has the validator offer
/// `acme-tls/1` and nothing else, so a normal client can never be served a challenge.
pub fn is_acme_hello<'a>(alpn: Option<impl Iterator<Item = &'a [u8]>>) -> bool {
    let Some(mut list) = alpn else {
        return false;
    };
    let mut any = false;
    list.all(|p| {
        any = true;
        p == ALPN_ACME
    }) && any
}

/// Where the served certificate comes from: files (reloaded on SIGHUP) or ACME (swapped by
/// the ACME task).
#[derive(Debug)]
enum Source {
    Files { cert: PathBuf, key: PathBuf },
    Acme,
}

/// The certificate every TLS listener serves; `reload` or `store` swaps it without touching
/// live sessions. With ACME it also answers TLS-ALPN-01 validations while an order runs.
#[derive(Debug)]
pub struct ReloadableCert {
    source: Source,
    current: ArcSwapOption<CertifiedKey>,
    /// Pending TLS-ALPN-01 challenges: (lower-case domain, challenge certificate).
    challenges: ArcSwap<Vec<(String, Arc<CertifiedKey>)>>,
}

impl ReloadableCert {
    /// Load the pair for the first time.
    pub fn load(cert: &Path, key: &Path) -> Result<ReloadableCert, TlsError> {
        let ck = load_certified_key(cert, key)?;
        Ok(ReloadableCert {
            source: Source::Files {
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
            },
            current: ArcSwapOption::from_pointee(ck),
            challenges: ArcSwap::from_pointee(Vec::new()),
        })
    }

    /// A certificate slot the ACME task fills; until then only validations are answered.
    pub fn acme() -> ReloadableCert {
        ReloadableCert {
            source: Source::Acme,
            current: ArcSwapOption::empty(),
            challenges: ArcSwap::from_pointee(Vec::new()),
        }
    }

    /// Whether ACME provides the certificate (the listeners then offer `acme-tls/1`).
    pub fn is_acme(&self) -> bool {
        matches!(self.source, Source::Acme)
    }

    /// Re-read the files; on any error the old certificate stays in service. With ACME the
    /// task owns renewals, so there is nothing to re-read.
    pub fn reload(&self) -> Result<(), TlsError> {
        let Source::Files { cert, key } = &self.source else {
            return Ok(());
        };
        let ck = load_certified_key(cert, key)?;
        self.current.store(Some(Arc::new(ck)));
        Ok(())
    }

    /// Serve `ck` from the next handshake on; sessions already up keep theirs.
    pub fn store(&self, ck: Arc<CertifiedKey>) {
        self.current.store(Some(ck));
    }

    /// The certificate served now, if any.
    pub fn current(&self) -> Option<Arc<CertifiedKey>> {
        self.current.load_full()
    }

    /// Answer validations of `domain` with `ck` until [`ReloadableCert::clear_challenges`].
    pub fn set_challenge(&self, domain: &str, ck: Arc<CertifiedKey>) {
        let domain = domain.to_ascii_lowercase();
        self.challenges.rcu(|list| {
            let mut l: Vec<_> = list.iter().filter(|(d, _)| *d != domain).cloned().collect();
            l.push((domain.clone(), ck.clone()));
            l
        });
    }

    /// Forget every pending challenge (the order ended, either way).
    pub fn clear_challenges(&self) {
        self.challenges.store(Arc::new(Vec::new()));
    }

    /// A rustls server config that always serves the current certificate (and, with ACME,
    /// also offers `acme-tls/1` so validations can complete on listeners that speak ALPN).
    pub fn server_config(self: &Arc<Self>, alpn: &[&[u8]]) -> Result<Arc<ServerConfig>, TlsError> {
        let mut cfg = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        // Only where ALPN is offered at all: a listener without a list (turns:) must not
        // start refusing clients whose ALPN matches none of ours.
        if self.is_acme() && !alpn.is_empty() {
            cfg.alpn_protocols.push(ALPN_ACME.to_vec());
        }
        Ok(Arc::new(cfg))
    }
}

impl ResolvesServerCert for ReloadableCert {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if !is_acme_hello(hello.alpn()) {
            return self.current.load_full();
        }
        // A validation: only the challenge certificate of the name asked for, never the
        // served one (and nothing when no order is running).
        let name = hello.server_name()?.to_ascii_lowercase();
        self.challenges
            .load()
            .iter()
            .find(|(d, _)| *d == name)
            .map(|(_, ck)| ck.clone())
    }
}

/// `(notBefore, notAfter)` of a DER certificate as Unix seconds: read straight from the
/// `validity` field, so the renewal schedule needs no X.509 library.
pub fn validity(der: &[u8]) -> Option<(u64, u64)> {
    /// One DER element at the start of `b`: (tag, contents, rest).
    fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, b) = b.split_first()?;
        let (&l0, mut b) = b.split_first()?;
        let len = if l0 < 0x80 {
            usize::from(l0)
        } else {
            let n = usize::from(l0 & 0x7f);
            if n == 0 || n > 4 || b.len() < n {
                return None;
            }
            let v = b[..n]
                .iter()
                .fold(0usize, |a, &x| (a << 8) | usize::from(x));
            b = &b[n..];
            v
        };
        (b.len() >= len).then(|| (tag, &b[..len], &b[len..]))
    }
    let (0x30, cert, _) = tlv(der)? else {
        return None;
    };
    let (0x30, tbs, _) = tlv(cert)? else {
        return None;
    };
    let mut rest = tbs;
    // [0] version (optional), serial, signature algorithm, issuer, then validity.
    let (tag, _, r) = tlv(rest)?;
    if tag == 0xa0 {
        rest = r;
    }
    for _ in 0..3 {
        rest = tlv(rest)?.2;
    }
    let (0x30, val, _) = tlv(rest)? else {
        return None;
    };
    let (t1, nb, r) = tlv(val)?;
    let (t2, na, _) = tlv(r)?;
    Some((asn1_time(t1, nb)?, asn1_time(t2, na)?))
}

/// UTCTime (`YYMMDDHHMMSSZ`, tag 23) or GeneralizedTime (`YYYYMMDDHHMMSSZ`, tag 24).
fn asn1_time(tag: u8, s: &[u8]) -> Option<u64> {
    let digits = |b: &[u8]| -> Option<u64> {
        b.iter().try_fold(0u64, |a, &c| {
            c.is_ascii_digit().then(|| a * 10 + u64::from(c - b'0'))
        })
    };
    let (year, rest) = match (tag, s.len()) {
        (23, 13) => {
            let y = digits(&s[..2])?;
            (if y >= 50 { 1900 + y } else { 2000 + y }, &s[2..])
        }
        (24, 15) => (digits(&s[..4])?, &s[4..]),
        _ => return None,
    };
    if rest.last() != Some(&b'Z') {
        return None;
    }
    let f = |i: usize| digits(&rest[i..i + 2]);
    let (mo, d, h, mi, se) = (f(0)?, f(2)?, f(4)?, f(6)?, f(8)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    // Days from 1970-01-01 to the civil date (Howard Hinnant's days_from_civil).
    let (y, m) = if mo <= 2 {
        (year - 1, mo + 9)
    } else {
        (year, mo - 3)
    };
    let era = y / 400;
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = (era * 146_097 + doe).checked_sub(719_468)?;
    Some(days * 86_400 + h * 3600 + mi * 60 + se)
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

    /// A self-signed certificate for `name` valid over the given dates, with its key.
    fn self_signed(name: &str, from: (i32, u8, u8), to: (i32, u8, u8)) -> CertifiedKey {
        let mut p = rcgen::CertificateParams::new(vec![name.to_string()]).expect("params");
        p.not_before = rcgen::date_time_ymd(from.0, from.1, from.2);
        p.not_after = rcgen::date_time_ymd(to.0, to.1, to.2);
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = p.self_signed(&key).expect("cert");
        let der = PrivateKeyDer::Pkcs8(key.serialize_der().into());
        CertifiedKey::from_der(vec![cert.der().clone()], der, &provider()).expect("ck")
    }

    #[test]
    fn validity_reads_utc_and_generalized_times() {
        // 2030 is a UTCTime, 2051 a GeneralizedTime (RFC 5280 switches at 2050).
        let ck = self_signed("a.example.com", (2030, 1, 2), (2051, 6, 30));
        assert_eq!(
            validity(ck.cert[0].as_ref()),
            Some((1_893_542_400, 2_571_696_000))
        );
        assert_eq!(validity(b"\x30\x03\x02\x01"), None);
        assert_eq!(validity(&[]), None);
        let der = ck.cert[0].as_ref();
        for cut in [1, 10, 100, der.len() - 1] {
            // Truncated input never panics (it may still hold the validity field).
            let _ = validity(&der[..cut]);
        }
    }

    #[test]
    fn only_a_hello_offering_acme_tls_alone_is_a_validation() {
        let is = |l: Option<&[&[u8]]>| is_acme_hello(l.map(|l| l.iter().copied()));
        assert!(is(Some(&[ALPN_ACME])));
        assert!(!is(None));
        assert!(!is(Some(&[])));
        assert!(!is(Some(&[b"http/1.1"])));
        assert!(!is(Some(&[b"http/1.1", ALPN_ACME])));
        assert!(!is(Some(&[ALPN_ACME, b"stun.turn"])));
    }

    /// Accepts any server certificate: the test looks at which one it got.
    #[derive(Debug)]
    struct AnyCert(Arc<CryptoProvider>);

    impl rustls::client::danger::ServerCertVerifier for AnyCert {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &rustls_pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls_pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }

    /// Handshake in memory with `server`, offering `alpn` for `sni`: the certificate served,
    /// or `None` when the handshake failed.
    fn served(server: &Arc<ServerConfig>, sni: &str, alpn: &[&[u8]]) -> Option<Vec<u8>> {
        let p = provider();
        let mut c = rustls::ClientConfig::builder_with_provider(p.clone())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCert(p)))
            .with_no_client_auth();
        c.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        let name = rustls_pki_types::ServerName::try_from(sni.to_string()).expect("name");
        let mut client = rustls::ClientConnection::new(Arc::new(c), name).expect("client");
        let mut srv = rustls::ServerConnection::new(server.clone()).expect("server");
        for _ in 0..10 {
            let mut buf = Vec::new();
            client.write_tls(&mut buf).ok()?;
            srv.read_tls(&mut buf.as_slice()).ok()?;
            srv.process_new_packets().ok()?;
            let mut buf = Vec::new();
            srv.write_tls(&mut buf).ok()?;
            client.read_tls(&mut buf.as_slice()).ok()?;
            client.process_new_packets().ok()?;
            if !client.is_handshaking() && !srv.is_handshaking() {
                return Some(client.peer_certificates()?[0].as_ref().to_vec());
            }
        }
        None
    }

    #[test]
    fn the_resolver_serves_a_challenge_only_to_a_validation_for_its_name() {
        let cert = Arc::new(ReloadableCert::acme());
        let cfg = cert
            .server_config(&[b"stun.turn", b"http/1.1"])
            .expect("cfg");
        // No certificate yet: normal clients and validations alike are refused.
        assert_eq!(served(&cfg, "turn.example.com", &[b"http/1.1"]), None);
        assert_eq!(served(&cfg, "turn.example.com", &[ALPN_ACME]), None);
        let normal = self_signed("turn.example.com", (2030, 1, 1), (2030, 3, 1));
        let normal_der = normal.cert[0].as_ref().to_vec();
        cert.store(Arc::new(normal));
        let challenge = self_signed("turn.example.com", (2030, 1, 1), (2030, 1, 8));
        let challenge_der = challenge.cert[0].as_ref().to_vec();
        cert.set_challenge("Turn.Example.com", Arc::new(challenge));
        let got = |sni, alpn: &[&[u8]]| served(&cfg, sni, alpn);
        assert_eq!(got("turn.example.com", &[ALPN_ACME]), Some(challenge_der));
        // Every other hello keeps the served certificate, whatever it offers.
        assert_eq!(got("turn.example.com", &[]), Some(normal_der.clone()));
        assert_eq!(
            got("turn.example.com", &[b"http/1.1"]),
            Some(normal_der.clone())
        );
        assert_eq!(
            got("turn.example.com", &[b"http/1.1", ALPN_ACME]),
            Some(normal_der.clone())
        );
        // A validation for a name with no pending challenge gets nothing.
        assert_eq!(got("other.example.com", &[ALPN_ACME]), None);
        cert.clear_challenges();
        assert_eq!(got("turn.example.com", &[ALPN_ACME]), None);
        assert_eq!(got("turn.example.com", &[b"stun.turn"]), Some(normal_der));
    }

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
