//! The one outgoing HTTP client shape switchboard uses (webhook delivery, JWKS fetches):
//! HTTP/1.1, no redirects, a timeout per request, TLS with ring and either a configured CA
//! file or the system bundle. A leaf module, so that `auth` and `webhooks` share it without
//! importing each other.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Why the client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The CA file cannot be read (`key` names the configuration key).
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The TLS or HTTP client could not be set up.
    #[error("HTTP client: {0}")]
    Client(String),
}

/// Build a client trusting `ca_file` (named `ca_key` in errors), or the system roots
/// without one; each request may take `timeout`, connect included.
pub fn build(
    ca_file: Option<&Path>,
    ca_key: &str,
    timeout: Duration,
) -> Result<reqwest::Client, ClientError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    let files: Vec<std::path::PathBuf> = match ca_file {
        Some(p) => vec![p.to_path_buf()],
        None => [
            "/etc/ssl/certs/ca-certificates.crt",
            "/etc/pki/tls/certs/ca-bundle.crt",
            "/etc/ssl/cert.pem",
        ]
        .iter()
        .map(std::path::PathBuf::from)
        .filter(|p| p.exists())
        .take(1)
        .collect(),
    };
    for f in &files {
        let certs =
            CertificateDer::pem_file_iter(f).map_err(|e| crate::config::ConfigError::Key {
                key: ca_key.into(),
                message: format!("cannot read {}: {e}", f.display()),
            })?;
        for c in certs.flatten() {
            // A bundle may hold a certificate rustls cannot use; the others still count.
            let _ = roots.add(c);
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| ClientError::Client(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let timeout = timeout.max(Duration::from_secs(1));
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(timeout)
        .connect_timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("switchboard/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| ClientError::Client(e.to_string()))
}
