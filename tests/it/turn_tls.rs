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

/// `udp_listen`: the `turn.listen` list (whose UDP sockets run the shards).
fn config_with(cert: &std::path::Path, key: &std::path::Path, udp_listen: &str) -> Config {
    let text = format!(
        "[turn]\nlisten = {udp_listen}\ntls_listen = [\"127.0.0.1:0\"]\n\
         max_allocations_per_user = 100\n\
         [http]\nlisten = \"127.0.0.1:0\"\n\
         [tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n\
         [auth]\nturn_secrets = [\"{SECRET}\"]\n[auth.turn_users]\n{USER} = \"{PASS}\"\n",
        cert.display(),
        key.display()
    );
    Config::from_toml(&text).expect("valid config")
}

/// TLS clients' relay sockets on the UDP shards' event loops; then, with no UDP listener and
/// so no shards, on tasks of their own. One after the other: two uclient runs over TLS at once
/// on a loaded machine can lose a packet to each other whichever path serves them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uclient_over_tls() {
    uclient_over_tls_with("[\"127.0.0.1:0\"]").await;
    uclient_over_tls_with("[]").await;
}

async fn uclient_over_tls_with(udp_listen: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = make_cert(dir.path());
    let server = Server::new(config_with(&cert, &key, udp_listen))
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
    let by_tls =
        "switchboard_turn_relayed_transport_bytes_total{direction=\"to_client\",transport=\"tls\"}";
    assert!(metric_reaches(&server, by_tls, 60 * 120).await >= 60 * 120);
    let text = server.shared().metrics.render();
    assert_eq!(
        metric(
            &text,
            "switchboard_dropped_total{reason=\"client_send_full\"}"
        ),
        0
    );
    server.shutdown();
}
