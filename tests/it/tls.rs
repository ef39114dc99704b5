//! TLS listeners: STUN over `turns:`-style TLS, HTTPS on the HTTP listener, certificate
//! errors at start, and certificate reload without harming live sessions.

use rustls::pki_types::{CertificateDer, ServerName};
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use switchboard::stun::{attr, binding, Message};
use switchboard::{Config, Server};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::support::cert;
use cert::make_cert;

fn connector(ca: &Path) -> TlsConnector {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    TlsConnector::from(Arc::new(cfg))
}

async fn tls_connect(ca: &Path, addr: SocketAddr) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    tokio::time::timeout(Duration::from_secs(5), connector(ca).connect(name, tcp))
        .await
        .expect("handshake in time")
        .expect("handshake verifies against the test CA")
}

async fn binding_over<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> SocketAddr {
    let mut req = Vec::new();
    binding::request(&rand_tid(), true, &mut req);
    s.write_all(&req).await.unwrap();
    let mut hdr = [0u8; 20];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut hdr))
        .await
        .expect("answer in time")
        .unwrap();
    let len = u16::from_be_bytes([hdr[2], hdr[3]]) as usize;
    let mut all = hdr.to_vec();
    all.resize(20 + len, 0);
    s.read_exact(&mut all[20..]).await.unwrap();
    let m = Message::parse(&all).expect("valid response");
    assert_eq!(m.transaction_id(), req[8..20]);
    m.xor_address(attr::XOR_MAPPED_ADDRESS).unwrap().unwrap()
}

fn rand_tid() -> [u8; 12] {
    let mut t = [0u8; 12];
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
        .to_be_bytes();
    t.copy_from_slice(&n[4..16]);
    t
}

fn tls_config(cert: &Path, key: &Path) -> Config {
    Config::from_toml(&format!(
        "[http]\nlisten = \"127.0.0.1:0\"\ntls = true\n\
         [turn]\nlisten = [\"127.0.0.1:0\"]\ntls_listen = [\"127.0.0.1:0\"]\n\
         [tls]\ncert_file = {:?}\nkey_file = {:?}\n",
        cert.display().to_string(),
        key.display().to_string()
    ))
    .unwrap()
}

#[tokio::test]
async fn stun_over_tls_and_https_work_with_the_configured_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = make_cert(dir.path(), "one");
    let srv = Server::new(tls_config(&cert, &key)).start().await.unwrap();
    let b = srv.bound();
    let mut s = tls_connect(&cert, b.tls[0]).await;
    let (_, conn) = s.get_ref();
    assert!(matches!(
        conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3 | rustls::ProtocolVersion::TLSv1_2)
    ));
    let local = s.get_ref().0.local_addr().unwrap();
    assert_eq!(binding_over(&mut s).await, local);

    let mut h = tls_connect(&cert, srv.http_addr()).await;
    h.write_all(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut resp = String::new();
    h.read_to_string(&mut resp).await.unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.ends_with("ready\n"), "{resp}");
    srv.shutdown();
    srv.wait().await;
}

#[tokio::test]
async fn reload_swaps_certificate_for_new_clients_only() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = make_cert(dir.path(), "old");
    let srv = Server::new(tls_config(&cert, &key)).start().await.unwrap();
    let addr = srv.bound().tls[0];
    let mut live = tls_connect(&cert, addr).await;
    binding_over(&mut live).await;

    // A broken file at reload keeps the old certificate.
    let saved = std::fs::read(&cert).unwrap();
    std::fs::write(&cert, b"garbage").unwrap();
    let tls = srv.shared().tls.clone().unwrap();
    let e = tls.reload().unwrap_err().to_string();
    assert!(e.contains("old.crt"), "{e}");
    std::fs::write(&cert, &saved).unwrap();
    tls_connect(&cert, addr).await;

    // Replace the files with a new pair and reload.
    let (new_cert, new_key) = make_cert(dir.path(), "new");
    std::fs::copy(&new_cert, &cert).unwrap();
    std::fs::copy(&new_key, &key).unwrap();
    tls.reload().unwrap();
    // New clients see the new certificate: trusting only the old one now fails.
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let old_ca = dir.path().join("old-ca.crt");
    std::fs::write(&old_ca, &saved).unwrap();
    assert!(connector(&old_ca).connect(name, tcp).await.is_err());
    let mut fresh = tls_connect(&new_cert, addr).await;
    binding_over(&mut fresh).await;
    // The session opened before the reload is unharmed.
    binding_over(&mut live).await;
    srv.shutdown();
    srv.wait().await;
}

#[test]
fn bad_certificate_at_start_exits_2_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, _key) = make_cert(dir.path(), "c");
    let cfg = dir.path().join("sb.toml");
    let missing_key = dir.path().join("missing.key");
    std::fs::write(
        &cfg,
        format!(
            "[turn]\nlisten = [\"127.0.0.1:0\"]\ntls_listen = [\"127.0.0.1:0\"]\n\
             [http]\nlisten = \"127.0.0.1:0\"\n\
             [tls]\ncert_file = {:?}\nkey_file = {:?}\n",
            cert.display().to_string(),
            missing_key.display().to_string()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("missing.key"), "{err}");
}
