//! `turns:`: TURN over TLS (rustls) with a certificate the test makes with openssl;
//! coturn's `turnutils_uclient -S` relays with no loss. Certificate errors and reload are
//! covered by tests/it/tls.rs.

use crate::support::turn_common;
use std::process::Command;

use switchboard::{Config, Server};
use turn_common::*;

fn make_cert(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    let st = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args([
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl is installed");
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    (cert, key)
}

fn config(cert: &std::path::Path, key: &std::path::Path) -> Config {
    let text = format!(
        "[turn]\nlisten = [\"127.0.0.1:0\"]\ntls_listen = [\"127.0.0.1:0\"]\n\
         max_allocations_per_user = 100\n\
         [http]\nlisten = \"127.0.0.1:0\"\n\
         [tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n\
         [auth]\nturn_secrets = [\"{SECRET}\"]\n[auth.turn_users]\n{USER} = \"{PASS}\"\n",
        cert.display(),
        key.display()
    );
    Config::from_toml(&text).expect("valid config")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uclient_over_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = make_cert(dir.path());
    let server = Server::new(config(&cert, &key))
        .start()
        .await
        .expect("server starts");
    let tls = server.bound().tls[0];
    let peer = start_peer().await;
    let r = uclient(
        tls,
        peer.port,
        &["-t", "-S", "-W", SECRET, "-n", "30", "-l", "120", "-z", "5"],
    )
    .await;
    assert_eq!(r.sent, 60, "{}", r.output);
    assert_eq!(r.received, 60, "{}", r.output);
    assert_eq!(r.lost, 0, "{}", r.output);
    let text = server.shared().metrics.render();
    assert!(
        metric(
            &text,
            "switchboard_turn_allocations_created_total{transport=\"tls\"}"
        ) >= 2
    );
    server.shutdown();
}
