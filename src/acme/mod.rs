//! ACME certificates for the TLS listeners (`[tls.acme]`): a thin tokio task around
//! instant-acme that orders with TLS-ALPN-01 on the shared port, renews before expiry without
//! a restart, and keeps the old certificate in service when an order fails. When to order is
//! decided in [`schedule`] (sans-IO); the challenge certificates are answered by the
//! [`crate::tls::ReloadableCert`] resolver. A shell, like `webhooks`.
//!
//! One issuer per cluster: only a node whose `tls.acme.issuer` is true (the default alone, not
//! in cluster mode) orders; the others serve what the issuer writes to the shared `cache_dir`.

mod client;
pub mod schedule;

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use rustls::sign::CertifiedKey;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

use crate::config::AcmeConfig;
use crate::metrics::AcmeMetrics;
use crate::tls::{ReloadableCert, TlsError};
use schedule::{Failures, Policy};

/// Why one order failed; the served certificate stays and the task retries after a backoff.
#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    /// The ACME server or the HTTP exchange failed.
    #[error("ACME: {0}")]
    Protocol(#[from] instant_acme::Error),
    /// The CA offered no TLS-ALPN-01 challenge for a name.
    #[error("ACME: no tls-alpn-01 challenge offered for {0}")]
    NoTlsAlpn(String),
    /// An authorization or the order ended in a state other than valid/ready.
    #[error("ACME: {0}")]
    State(String),
    /// The challenge certificate or the issued certificate could not be built.
    #[error("ACME certificate: {0}")]
    Cert(String),
    /// The cache directory could not be written.
    #[error("ACME cache {path}: {source}")]
    Cache {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

impl AcmeError {
    /// Whether the CA no longer knows the cached account (RFC 8555 `accountDoesNotExist`).
    fn account_unknown(&self) -> bool {
        let AcmeError::Protocol(instant_acme::Error::Api(p)) = self else {
            return false;
        };
        p.r#type.as_deref() == Some("urn:ietf:params:acme:error:accountDoesNotExist")
    }
}

/// The certificate file in the cache: the chain, then its private key (one file, replaced
/// atomically, so a reader never pairs a new chain with an old key).
const CERT_FILE: &str = "certificate.pem";
/// What the cached certificate was ordered for: the directory, then the names, one a line
/// (a certificate from another CA, say staging, or for other names is not served).
const META_FILE: &str = "certificate.meta";
/// The ACME account (key and URL), JSON; one per directory, since an account lives on one CA.
const ACCOUNT_FILE: &str = "account.json";
/// The directory the account in [`ACCOUNT_FILE`] belongs to.
const ACCOUNT_DIRECTORY_FILE: &str = "account.directory";

/// The ACME task of one server.
pub struct Acme {
    config: AcmeConfig,
    orders: bool,
    cert: Arc<ReloadableCert>,
    metrics: AcmeMetrics,
    http: reqwest::Client,
    /// Validity of the certificate served now, `(notBefore, notAfter)`.
    served: Option<(u64, u64)>,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Acme {
    /// Prepare the task and serve a still-valid cached certificate at once, so a restart
    /// neither orders again nor starts without a certificate.
    pub fn new(
        config: &AcmeConfig,
        cluster: bool,
        cert: Arc<ReloadableCert>,
        metrics: AcmeMetrics,
    ) -> Result<Acme, TlsError> {
        let http = crate::https_client::build(
            config.directory_ca_file.as_deref(),
            "tls.acme.directory_ca_file",
            Duration::from_secs(30),
        )
        .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut acme = Acme {
            config: config.clone(),
            orders: config.orders(cluster),
            cert,
            metrics,
            http,
            served: None,
        };
        match acme.load_cached() {
            Ok(true) => tracing::info!(
                dir = %acme.config.cache_dir.display(),
                "ACME: serving the cached certificate"
            ),
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "ACME: cached certificate not used"),
        }
        Ok(acme)
    }

    fn policy(&self) -> Policy {
        Policy {
            renew_before: self.config.renew_before_secs,
            retry_min: self.config.retry_min_secs,
            retry_max: self.config.retry_max_secs,
        }
    }

    /// The contents of [`META_FILE`] for the configured directory and names.
    fn meta(&self) -> String {
        let mut d: Vec<String> = self
            .config
            .domains
            .iter()
            .map(|d| d.to_ascii_lowercase())
            .collect();
        d.sort();
        format!("{}\n{}\n", self.config.directory, d.join("\n"))
    }

    /// Serve the cached certificate when it is for our names, still valid, and not the one
    /// served already: `Ok(true)` when it was swapped in.
    fn load_cached(&mut self) -> Result<bool, AcmeError> {
        let dir = &self.config.cache_dir;
        let read = |f: &str| {
            let path = dir.join(f);
            match std::fs::read(&path) {
                Ok(b) => Ok(Some(b)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(source) => Err(AcmeError::Cache { path, source }),
            }
        };
        let (Some(meta), Some(pem)) = (read(META_FILE)?, read(CERT_FILE)?) else {
            return Ok(false);
        };
        if meta != self.meta().as_bytes() {
            return Err(AcmeError::Cert(
                "the cached certificate is from another directory or for other names".into(),
            ));
        }
        let (ck, validity) = certified(&pem, &pem)?;
        if validity.1 <= now() {
            return Err(AcmeError::Cert("the cached certificate has expired".into()));
        }
        if self.served == Some(validity) {
            return Ok(false);
        }
        self.serve(Arc::new(ck), validity);
        Ok(true)
    }

    fn serve(&mut self, ck: Arc<CertifiedKey>, validity: (u64, u64)) {
        self.cert.store(ck);
        self.served = Some(validity);
        self.metrics
            .cert_expiry
            .set(i64::try_from(validity.1).unwrap_or(i64::MAX));
    }

    /// Order and renew (or, on a node that does not order, follow the cache) until shutdown.
    pub async fn run(mut self, shutdown: watch::Receiver<bool>) {
        let stop = crate::lifecycle::shutdown_signal(shutdown);
        tokio::pin!(stop);
        if !self.orders {
            tracing::info!(
                dir = %self.config.cache_dir.display(),
                "ACME: not the issuer; serving the certificate the issuer writes to the cache"
            );
            let every = Duration::from_secs(self.config.follow_interval_secs.max(1));
            loop {
                tokio::select! {
                    _ = &mut stop => return,
                    _ = tokio::time::sleep(every) => {}
                }
                match self.load_cached() {
                    Ok(true) => tracing::info!("ACME: newer certificate from the cache"),
                    Ok(false) => {}
                    Err(e) => tracing::debug!(error = %e, "ACME: cache not usable yet"),
                }
            }
        }
        let mut account = None;
        let mut failed: Option<Failures> = None;
        let mut last_ok = 0u64;
        loop {
            // A certificate already due when it arrives (a CA issuing near-empty lifetimes,
            // a skewed clock) waits like a failure would, rather than ordering in a loop.
            let at = schedule::next_attempt(self.served, failed, &self.policy())
                .max(last_ok.saturating_add(self.config.retry_min_secs));
            let wait = Duration::from_secs(at.saturating_sub(now()));
            if !wait.is_zero() {
                tracing::debug!(secs = wait.as_secs(), "ACME: next order");
            }
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(wait) => {}
            }
            let r = tokio::select! {
                _ = &mut stop => return,
                r = self.order(&mut account) => r,
            };
            self.cert.clear_challenges();
            match r {
                Ok((ck, validity)) => {
                    tracing::info!(
                        domains = ?self.config.domains,
                        not_after = validity.1,
                        "ACME: new certificate in service"
                    );
                    self.serve(ck, validity);
                    failed = None;
                    last_ok = now();
                    self.metrics.renewals.with_label_values(&["ok"]).inc();
                    self.metrics.renewal_failing.set(0);
                }
                Err(e) => {
                    if e.account_unknown() {
                        // The CA forgot the account (a reset test CA, a deactivated account):
                        // make a new one at the next attempt instead of failing forever.
                        account = None;
                        let _ = std::fs::remove_file(self.config.cache_dir.join(ACCOUNT_FILE));
                    }
                    let count = failed.map_or(0, |f| f.count).saturating_add(1);
                    failed = Some(Failures { count, at: now() });
                    self.metrics.renewals.with_label_values(&["error"]).inc();
                    self.metrics.renewal_failing.set(1);
                    tracing::warn!(
                        error = %e,
                        failures = count,
                        retry_in_secs = schedule::backoff(count, &self.policy()),
                        serving = self.served.is_some(),
                        "ACME: order failed; any served certificate stays, retrying"
                    );
                }
            }
        }
    }

    /// The account from the cache, or a new one written there.
    async fn account(&self) -> Result<Account, AcmeError> {
        let path = self.config.cache_dir.join(ACCOUNT_FILE);
        let http = || Account::builder_with_http(Box::new(client::Client(self.http.clone())));
        let same_ca = std::fs::read(self.config.cache_dir.join(ACCOUNT_DIRECTORY_FILE))
            .is_ok_and(|d| d == self.config.directory.as_bytes());
        if let Some(bytes) = same_ca.then(|| std::fs::read(&path).ok()).flatten() {
            if let Ok(creds) = serde_json::from_slice::<AccountCredentials>(&bytes) {
                return Ok(http().from_credentials(creds).await?);
            }
            tracing::warn!(path = %path.display(), "ACME: unreadable account file; creating a new account");
        }
        let contact: Vec<&str> = self.config.contact.iter().map(String::as_str).collect();
        let (account, creds) = http()
            .create(
                &NewAccount {
                    contact: &contact,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                self.config.directory.clone(),
                None,
            )
            .await?;
        let json = serde_json::to_vec(&creds).map_err(|e| AcmeError::Cert(e.to_string()))?;
        let dir = &self.config.cache_dir;
        write_private(
            dir,
            ACCOUNT_DIRECTORY_FILE,
            self.config.directory.as_bytes(),
        )?;
        write_private(dir, ACCOUNT_FILE, &json)?;
        Ok(account)
    }

    /// One order: TLS-ALPN-01 for every name, finalize, download, cache.
    async fn order(
        &self,
        account: &mut Option<Account>,
    ) -> Result<(Arc<CertifiedKey>, (u64, u64)), AcmeError> {
        let acct = match account {
            Some(a) => a.clone(),
            None => {
                let a = self.account().await?;
                *account = Some(a.clone());
                a
            }
        };
        let ids: Vec<Identifier> = self
            .config
            .domains
            .iter()
            .map(|d| Identifier::Dns(d.clone()))
            .collect();
        let mut order = acct.new_order(&NewOrder::new(&ids)).await?;
        let mut authzs = order.authorizations();
        while let Some(a) = authzs.next().await {
            let mut authz = a?;
            match authz.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                s => return Err(AcmeError::State(format!("authorization is {s:?}"))),
            }
            let mut ch = authz
                .challenge(ChallengeType::TlsAlpn01)
                .ok_or_else(|| AcmeError::NoTlsAlpn(format!("{:?}", self.config.domains)))?;
            let domain = ch.identifier().to_string();
            let ck = challenge_cert(&domain, ch.key_authorization().digest().as_ref())?;
            self.cert.set_challenge(&domain, Arc::new(ck));
            ch.set_ready().await?;
        }
        let retry = RetryPolicy::default().timeout(Duration::from_secs(90));
        let status = order.poll_ready(&retry).await?;
        if status != OrderStatus::Ready {
            return Err(AcmeError::State(format!("order is {status:?}")));
        }
        let key_pem = order.finalize().await?;
        let chain_pem = order.poll_certificate(&retry).await?;
        let (ck, validity) = certified(chain_pem.as_bytes(), key_pem.as_bytes())?;
        let dir = &self.config.cache_dir;
        write_private(dir, META_FILE, self.meta().as_bytes())?;
        write_private(dir, CERT_FILE, format!("{chain_pem}{key_pem}").as_bytes())?;
        Ok((Arc::new(ck), validity))
    }
}

/// Set the expiry gauge from a certificate loaded from files (at start and on SIGHUP), so
/// the same alert covers file and ACME certificates.
pub fn record_expiry(cert: Option<&ReloadableCert>, metrics: &AcmeMetrics) {
    let not_after = cert
        .and_then(ReloadableCert::current)
        .and_then(|ck| ck.cert.first().and_then(|c| crate::tls::validity(c)))
        .map_or(0, |(_, na)| na);
    metrics
        .cert_expiry
        .set(i64::try_from(not_after).unwrap_or(i64::MAX));
}

/// The TLS-ALPN-01 certificate for `domain` (RFC 8737): self-signed, the name as its only
/// SAN, and the critical acmeIdentifier extension holding SHA-256 of the key authorization.
pub fn challenge_cert(domain: &str, digest: &[u8]) -> Result<CertifiedKey, AcmeError> {
    let err = |e: rcgen::Error| AcmeError::Cert(e.to_string());
    let mut params = rcgen::CertificateParams::new(vec![domain.to_string()]).map_err(err)?;
    params
        .custom_extensions
        .push(rcgen::CustomExtension::new_acme_identifier(digest));
    let key = rcgen::KeyPair::generate().map_err(err)?;
    let cert = params.self_signed(&key).map_err(err)?;
    let der = rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    // Not `CertifiedKey::from_der`: its key check parses the certificate with webpki, which
    // refuses the critical acmeIdentifier extension this certificate exists to carry.
    let signer = rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(der)
        .map_err(|e| AcmeError::Cert(e.to_string()))?;
    Ok(CertifiedKey::new(vec![cert.der().clone()], signer))
}

/// Write `name` in `dir` readable by the owner only (0600; the directory 0700), replacing
/// the old file atomically.
/// A certificate chain and key from PEM, with the leaf's validity (notBefore, notAfter): what
/// both the cache and a fresh order are checked by before they are served.
fn certified(chain: &[u8], key: &[u8]) -> Result<(CertifiedKey, (u64, u64)), AcmeError> {
    let ck = crate::tls::certified_key_from_pem(chain, key)
        .map_err(|e| AcmeError::Cert(e.to_string()))?;
    let validity = ck
        .cert
        .first()
        .and_then(|c| crate::tls::validity(c))
        .ok_or_else(|| AcmeError::Cert("unreadable validity".into()))?;
    Ok((ck, validity))
}

fn write_private(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), AcmeError> {
    let path = dir.join(name);
    let cache = |source| AcmeError::Cache {
        path: path.clone(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(cache)?;
    let tmp = dir.join(format!(".{name}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(cache)?;
    f.write_all(bytes).map_err(cache)?;
    f.sync_all().map_err(cache)?;
    std::fs::rename(&tmp, &path).map_err(cache)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_challenge_certificate_names_the_domain_and_carries_the_digest() {
        let digest = [7u8; 32];
        let ck = challenge_cert("turn.example.com", &digest).expect("cert");
        let der = ck.cert[0].as_ref();
        // id-pe-acmeIdentifier (1.3.6.1.5.5.7.1.31), then the digest as an OCTET STRING.
        let oid = [0x06, 0x08, 0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x01, 0x1f];
        let at = der
            .windows(oid.len())
            .position(|w| w == oid)
            .expect("acmeIdentifier extension");
        let mut inner = vec![0x04, 0x20];
        inner.extend_from_slice(&digest);
        assert!(der[at..].windows(inner.len()).any(|w| w == inner));
        assert!(der.windows(16).any(|w| w == b"turn.example.com"));
        assert!(crate::tls::validity(der).is_some());
    }

    fn acme_config(dir: &Path) -> AcmeConfig {
        AcmeConfig {
            domains: vec!["turn.example.com".into()],
            cache_dir: dir.to_path_buf(),
            ..AcmeConfig::default()
        }
    }

    /// A cache as an issuer leaves it, with a certificate valid until `until` (y, m, d).
    fn cache(dir: &Path, names: &str, until: (i32, u8, u8)) {
        let meta = format!("{}\n{names}", crate::config::LETS_ENCRYPT_DIRECTORY);
        let mut p = rcgen::CertificateParams::new(vec!["turn.example.com".into()]).expect("p");
        p.not_after = rcgen::date_time_ymd(until.0, until.1, until.2);
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = p.self_signed(&key).expect("cert");
        let pem = format!("{}{}", cert.pem(), key.serialize_pem());
        write_private(dir, META_FILE, meta.as_bytes()).expect("meta");
        write_private(dir, CERT_FILE, pem.as_bytes()).expect("cert");
    }

    fn start(dir: &Path) -> (Arc<ReloadableCert>, AcmeMetrics, Acme) {
        let cert = Arc::new(ReloadableCert::acme());
        let m = crate::metrics::Metrics::new().acme;
        let acme = Acme::new(&acme_config(dir), false, cert.clone(), m.clone()).expect("acme");
        (cert, m, acme)
    }

    #[test]
    fn a_restart_serves_the_cached_certificate_without_ordering() {
        let dir = tempfile::tempdir().expect("dir");
        cache(dir.path(), "turn.example.com\n", (2090, 1, 1));
        let (cert, m, acme) = start(dir.path());
        assert!(cert.current().is_some());
        // 2090-01-01T00:00:00Z, and nothing due before 2/3 of its life.
        assert_eq!(m.cert_expiry.get(), 3_786_912_000);
        let due = schedule::next_attempt(acme.served, None, &acme.policy());
        assert!(due > now() + 86_400 * 365, "due {due}");
    }

    #[test]
    fn a_cache_for_other_names_or_expired_is_not_served() {
        let dir = tempfile::tempdir().expect("dir");
        cache(dir.path(), "other.example.com\n", (2090, 1, 1));
        assert!(start(dir.path()).0.current().is_none());
        // The right names from another CA (staging, say) are not served either.
        write_private(
            dir.path(),
            META_FILE,
            b"https://acme-staging-v02.api.letsencrypt.org/directory\nturn.example.com\n",
        )
        .expect("meta");
        assert!(start(dir.path()).0.current().is_none());
        cache(dir.path(), "turn.example.com\n", (2001, 1, 1));
        let (cert, m, _) = start(dir.path());
        assert!(cert.current().is_none());
        assert_eq!(m.cert_expiry.get(), 0);
        // No cache at all: nothing served, an order is due at once.
        let (cert, _, acme) = start(&dir.path().join("none"));
        assert!(cert.current().is_none());
        assert_eq!(schedule::next_attempt(acme.served, None, &acme.policy()), 0);
    }

    #[tokio::test]
    async fn a_node_that_does_not_order_follows_the_issuers_cache() {
        let dir = tempfile::tempdir().expect("dir");
        let cert = Arc::new(ReloadableCert::acme());
        let m = crate::metrics::Metrics::new().acme;
        let cfg = AcmeConfig {
            follow_interval_secs: 1,
            ..acme_config(dir.path())
        };
        // Cluster mode and no `issuer`: this node must not order.
        let acme = Acme::new(&cfg, true, cert.clone(), m.clone()).expect("acme");
        assert!(!acme.orders);
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(acme.run(rx));
        let expiry_becomes = |want: i64| {
            let m = m.clone();
            async move {
                for _ in 0..40 {
                    if m.cert_expiry.get() == want {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                panic!("expiry gauge {} never became {want}", m.cert_expiry.get());
            }
        };
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert!(cert.current().is_none());
        // The issuer writes a certificate, then a renewed one: both are picked up.
        cache(dir.path(), "turn.example.com\n", (2090, 1, 1));
        expiry_becomes(3_786_912_000).await;
        assert!(cert.current().is_some());
        cache(dir.path(), "turn.example.com\n", (2091, 1, 1));
        expiry_becomes(3_818_448_000).await;
        // It never ordered anything itself.
        for r in ["ok", "error"] {
            assert_eq!(m.renewals.with_label_values(&[r]).get(), 0);
        }
        let _ = stop.send(true);
        task.await.expect("task ends at shutdown");
    }

    #[test]
    fn only_an_unknown_account_drops_the_cached_one() {
        let problem = |t: &str| {
            let p: instant_acme::Problem =
                serde_json::from_value(serde_json::json!({"type": t, "status": 400}))
                    .expect("problem");
            AcmeError::Protocol(instant_acme::Error::Api(p))
        };
        assert!(problem("urn:ietf:params:acme:error:accountDoesNotExist").account_unknown());
        assert!(!problem("urn:ietf:params:acme:error:rateLimited").account_unknown());
        assert!(!problem("urn:ietf:params:acme:error:unauthorized").account_unknown());
        assert!(!AcmeError::State("order is Invalid".into()).account_unknown());
    }

    #[test]
    fn cache_files_are_private() {
        let dir = tempfile::tempdir().expect("dir");
        let d = dir.path().join("acme");
        write_private(&d, "x", b"one").expect("write");
        write_private(&d, "x", b"two").expect("rewrite");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(d.join("x"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let mode = std::fs::metadata(&d).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        assert_eq!(std::fs::read(d.join("x")).expect("read"), b"two");
    }
}
