//! The real binary as a child process: SIGTERM drains (readiness off, new allocations and joins
//! refused, live work continues, exit 0 when idle or at the drain timeout), a second SIGTERM
//! stops at once, and SIGHUP reloads secrets while a bad reload keeps the old config.

use crate::support::http::{login_token, post_login};
use crate::support::proc::Proc;
use crate::support::turn_common;
use crate::support::ws;

use crate::support::cert;

use futures_util::SinkExt;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use switchboard::auth::{rest_password, unix_now};
use tokio_tungstenite::tungstenite::Message;
use turn_common::Raw;

fn write_config(dir: &Path, extra: &str) -> std::path::PathBuf {
    let p = dir.join("switchboard.toml");
    std::fs::write(
        &p,
        format!("[http]\nlisten = \"127.0.0.1:0\"\n[turn]\nlisten = [\"127.0.0.1:0\"]\n{extra}"),
    )
    .unwrap();
    p
}

async fn ws_hello(http: SocketAddr, token: &str) -> ws::Ws {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{http}/v1/ws"))
        .await
        .expect("ws connects");
    ws.send(Message::Text(
        json!({"type": "hello", "token": token}).to_string().into(),
    ))
    .await
    .unwrap();
    assert_eq!(ws::recv(&mut ws).await["type"], "welcome");
    ws
}

async fn login(http: SocketAddr) -> String {
    login_token(http, "drainer").await
}

async fn readyz(http: SocketAddr) -> (u16, String) {
    let r = reqwest::get(format!("http://{http}/readyz")).await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

fn rest_creds(secret: &str) -> (String, String) {
    let user = format!("{}:lifecycle", unix_now() + 600);
    let pw = rest_password(secret.as_bytes(), &user);
    (user, pw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_live_work_then_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        "[server]\ndrain_timeout_secs = 60\n[auth]\nturn_secrets = [\"s1\"]\n",
    );
    let mut p = Proc::start(&cfg);
    assert_eq!(readyz(p.http).await.0, 200);
    let token = login(p.http).await;
    let mut ws = ws_hello(p.http, &token).await;
    ws.send(Message::Text(
        json!({"type": "create", "name": "r"}).to_string().into(),
    ))
    .await
    .unwrap();
    ws::recv_type(&mut ws, "created").await;
    // A live allocation made before the drain.
    let (u, pw) = rest_creds("s1");
    let mut live = Raw::new(p.udp).await;
    assert_eq!(live.allocate(&u, &pw).await.code(), None);

    p.signal("-TERM");
    p.next_log("draining");
    let (code, body) = readyz(p.http).await;
    assert_eq!((code, body.trim()), (503, "draining"));
    let live_ok = reqwest::get(format!("http://{}/livez", p.http))
        .await
        .unwrap();
    assert_eq!(live_ok.status(), 200);
    // New allocations are refused with 508; the live one still refreshes.
    let mut fresh = Raw::new(p.udp).await;
    assert_eq!(fresh.allocate(&u, &pw).await.code(), Some(508));
    let refresh = live
        .request(
            switchboard::stun::codec::method::REFRESH,
            &[(
                switchboard::stun::codec::attr::LIFETIME,
                600u32.to_be_bytes().to_vec(),
            )],
            &[],
            Some((&u, &pw)),
        )
        .await;
    assert_eq!(refresh.code(), None, "existing allocation keeps working");
    // New joins are refused; the open socket still works.
    ws.send(Message::Text(
        json!({"type": "join", "room": "r"}).to_string().into(),
    ))
    .await
    .unwrap();
    assert_eq!(ws::recv_type(&mut ws, "error").await["code"], "draining");
    ws.send(Message::Text(json!({"type": "ping"}).to_string().into()))
        .await
        .unwrap();
    ws::recv_type(&mut ws, "pong").await;
    // The last work ends: the allocation is released and the socket closes.
    let gone = live
        .request(
            switchboard::stun::codec::method::REFRESH,
            &[(
                switchboard::stun::codec::attr::LIFETIME,
                0u32.to_be_bytes().to_vec(),
            )],
            &[],
            Some((&u, &pw)),
        )
        .await;
    assert_eq!(gone.code(), None);
    ws.close(None).await.unwrap();
    drop(ws);
    let exit = p.wait_exit(Duration::from_secs(20));
    let (code, took) = (exit.code, exit.took);
    assert_eq!(code, Some(0));
    assert!(
        took < Duration::from_secs(20),
        "exits when idle, not at the 60 s timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_timeout_and_second_sigterm_end_the_process() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "[server]\ndrain_timeout_secs = 1\n");
    let mut p = Proc::start(&cfg);
    let token = login(p.http).await;
    let _ws = ws_hello(p.http, &token).await;
    p.signal("-TERM");
    let code = p.wait_exit(Duration::from_secs(15)).code;
    assert_eq!(
        code,
        Some(0),
        "exits 0 at the drain timeout with work still open"
    );
    drop(p);

    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "[server]\ndrain_timeout_secs = 600\n");
    let mut p = Proc::start(&cfg);
    let token = login(p.http).await;
    let _ws = ws_hello(p.http, &token).await;
    p.signal("-TERM");
    p.next_log("draining");
    p.signal("-TERM");
    let code = p.wait_exit(Duration::from_secs(15)).code;
    assert_eq!(code, Some(0));
    assert!(p.log_text().contains("draining"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_turn_secrets_and_keeps_the_old_config_on_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "[auth]\nturn_secrets = [\"one\"]\n");
    let mut p = Proc::start(&cfg);
    let (u2, pw2) = rest_creds("two");
    assert_eq!(
        Raw::new(p.udp).await.allocate(&u2, &pw2).await.code(),
        Some(401)
    );

    std::fs::write(
        &cfg,
        "[http]\nlisten = \"127.0.0.1:0\"\n[turn]\nlisten = [\"127.0.0.1:0\"]\n\
         [auth]\nturn_secrets = [\"two\", \"one\"]\n",
    )
    .unwrap();
    p.signal("-HUP");
    p.next_log("SIGHUP: reloaded");
    assert_eq!(Raw::new(p.udp).await.allocate(&u2, &pw2).await.code(), None);
    let (u1, pw1) = rest_creds("one");
    assert_eq!(
        Raw::new(p.udp).await.allocate(&u1, &pw1).await.code(),
        None,
        "old secret still verifies during rotation"
    );

    std::fs::write(&cfg, "[turn]\nrelay_port_min = 99999\n").unwrap();
    p.signal("-HUP");
    let l = p.next_log("reload refused");
    assert!(l.contains("turn.relay_port_min"), "{l}");
    let (u2, pw2) = rest_creds("two");
    assert_eq!(
        Raw::new(p.udp).await.allocate(&u2, &pw2).await.code(),
        None,
        "old config still in force"
    );
    assert_eq!(readyz(p.http).await.0, 200);
}

fn tls_client(ca: &Path) -> tokio_rustls::TlsConnector {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
}

async fn tls_binding(
    ca: &Path,
    addr: SocketAddr,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, std::io::Error> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut s = tls_client(ca).connect(name, tcp).await?;
    assert_binding(&mut s).await;
    Ok(s)
}

async fn assert_binding(s: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut req = Vec::new();
    switchboard::stun::binding::request(&[7; 12], false, &mut req);
    s.write_all(&req).await.unwrap();
    let mut hdr = [0u8; 20];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut hdr))
        .await
        .expect("answer in time")
        .unwrap();
    assert_eq!(hdr[8..20], [7; 12]);
    let mut body = vec![0u8; u16::from_be_bytes([hdr[2], hdr[3]]) as usize];
    s.read_exact(&mut body).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_tls_certificate_without_harming_live_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = cert::make_cert(dir.path(), "served");
    let old_ca = dir.path().join("old-ca.crt");
    std::fs::copy(&cert, &old_ca).unwrap();
    let cfg = write_config(
        dir.path(),
        &format!(
            "tls_listen = [\"127.0.0.1:0\"]\n[tls]\ncert_file = {:?}\nkey_file = {:?}\n",
            cert.display().to_string(),
            key.display().to_string()
        ),
    );
    let mut p = Proc::start(&cfg);
    let tls = p.tls.expect("TLS listener bound");
    let mut live = tls_binding(&old_ca, tls)
        .await
        .expect("old certificate served");

    let (new_cert, new_key) = cert::make_cert(dir.path(), "next");
    std::fs::copy(&new_cert, &cert).unwrap();
    std::fs::copy(&new_key, &key).unwrap();
    p.signal("-HUP");
    p.next_log("SIGHUP: reloaded");
    assert!(
        tls_binding(&old_ca, tls).await.is_err(),
        "new clients no longer get the old certificate"
    );
    tls_binding(&new_cert, tls)
        .await
        .expect("new clients get the new certificate");
    assert_binding(&mut live).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_keeps_random_secrets_and_reloads_login_users() {
    let dir = tempfile::tempdir().unwrap();
    let ann = switchboard::auth::login::hash_password("ann-pass").unwrap();
    let bob = switchboard::auth::login::hash_password("bob-pass").unwrap();
    let users = |name: &str, hash: &str| {
        format!(
            "[http]\nlisten = \"127.0.0.1:0\"\n[turn]\nlisten = [\"127.0.0.1:0\"]\n\
             [auth]\nbackends = [\"users\"]\n[[auth.users]]\nname = \"{name}\"\npassword_hash = \"{hash}\"\n"
        )
    };
    let cfg = dir.path().join("switchboard.toml");
    std::fs::write(&cfg, users("ann", &ann)).unwrap();
    let mut p = Proc::start(&cfg);
    let http = p.http;
    let post = |u: &'static str, pw: &'static str| async move {
        post_login(http, &json!({"username": u, "password": pw})).await
    };
    let (s, v) = post("ann", "ann-pass").await;
    assert_eq!(s, 200, "{v}");
    let token = v["token"].as_str().unwrap().to_string();
    let turn = v["iceServers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s.get("username").is_some())
        .unwrap()
        .clone();
    assert_eq!(post("bob", "bob-pass").await.0, 401);

    // No secrets are configured: the random ones made at start must survive the reload.
    std::fs::write(&cfg, users("bob", &bob)).unwrap();
    p.signal("-HUP");
    p.next_log("SIGHUP: reloaded");
    let r = reqwest::Client::new()
        .get(format!("http://{}/v1/ice-servers", p.http))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the session survives the reload");
    assert_eq!(
        Raw::new(p.udp)
            .await
            .allocate(
                turn["username"].as_str().unwrap(),
                turn["credential"].as_str().unwrap()
            )
            .await
            .code(),
        None,
        "TURN credentials handed out before the reload still work"
    );
    // The user list was reloaded.
    assert_eq!(post("bob", "bob-pass").await.0, 200);
    assert_eq!(post("ann", "ann-pass").await.0, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_files_are_read_at_start_and_on_sighup_and_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("turn_secrets");
    let key_file = dir.path().join("api_keys");
    std::fs::write(&secret_file, "file-secret-one\n").unwrap();
    std::fs::write(&key_file, "file-api-key-1\n").unwrap();
    let cfg = write_config(
        dir.path(),
        &format!(
            "[auth]\nturn_secrets_file = {secret_file:?}\napi_keys_file = {key_file:?}\n\
             session_keys = [\"inline-session-key-0123\"]\n"
        ),
    );

    // --print-config: file keys shown, no secret (file or inline or environment).
    let out = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .arg("--config")
        .arg(&cfg)
        .arg("--print-config")
        .env("SWITCHBOARD_AUTH__TURN_USERS__ALICE", "env-turn-password")
        .output()
        .unwrap();
    assert!(out.status.success());
    let printed = String::from_utf8(out.stdout).unwrap();
    for s in [
        "file-secret-one",
        "file-api-key-1",
        "inline-session-key-0123",
        "env-turn-password",
    ] {
        assert!(!printed.contains(s), "--print-config shows {s}:\n{printed}");
    }
    assert!(printed.contains("turn_secrets_file"), "{printed}");
    assert!(printed.contains("[redacted]"), "{printed}");

    // An unreadable secret file at start: exit 2, the key named.
    let bad_dir = dir.path().join("bad");
    std::fs::create_dir(&bad_dir).unwrap();
    let bad = write_config(
        &bad_dir,
        "[auth]\nsession_keys_file = \"/nonexistent/switchboard-keys\"\n",
    );
    let out = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .arg("--config")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("auth.session_keys_file"), "{err}");

    let mut p = Proc::start(&cfg);
    let (u1, pw1) = rest_creds("file-secret-one");
    assert_eq!(Raw::new(p.udp).await.allocate(&u1, &pw1).await.code(), None);
    let http = p.http;
    let rest = |key: &'static str| async move {
        reqwest::get(format!("http://{http}/v1/turn-credentials?key={key}"))
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(rest("file-api-key-1").await, 200);

    // Rotate both files (as a Kubernetes Secret update does), then SIGHUP.
    std::fs::write(&secret_file, "file-secret-two\nfile-secret-one\n").unwrap();
    std::fs::write(&key_file, "file-api-key-2\n").unwrap();
    p.signal("-HUP");
    p.next_log("SIGHUP: reloaded");
    let (u2, pw2) = rest_creds("file-secret-two");
    assert_eq!(Raw::new(p.udp).await.allocate(&u2, &pw2).await.code(), None);
    assert_eq!(rest("file-api-key-2").await, 200);
    assert_eq!(rest("file-api-key-1").await, 401, "old API key dropped");

    // A file that vanished: the reload is refused naming the key, the old secrets stay.
    std::fs::remove_file(&key_file).unwrap();
    p.signal("-HUP");
    let l = p.next_log("reload refused");
    assert!(l.contains("auth.api_keys_file"), "{l}");
    assert_eq!(rest("file-api-key-2").await, 200);

    // Nothing logged so far carries a secret.
    let log = p.log_text();
    for s in ["file-secret", "file-api-key", "inline-session-key"] {
        assert!(!log.contains(s), "log shows {s}:\n{log}");
    }
}

/// Webhook events queued when the process stops are delivered before it exits (issue #28):
/// allocations still alive when the drain times out end with `allocation.ended
/// {reason:"shutdown"}`, and each of those reaches a receiver that takes 100 ms per POST.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_webhooks_are_flushed_at_exit() {
    use std::sync::{Arc, Mutex};
    let got: Arc<Mutex<Vec<Value>>> = Arc::default();
    let g = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: axum::body::Bytes| {
            let g = g.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if let Ok(v) = serde_json::from_slice::<Value>(&body) {
                    g.lock().unwrap().push(v);
                }
                "ok"
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = l.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &format!(
            "[server]\ndrain_timeout_secs = 1\n[auth]\nturn_secrets = [\"s1\"]\n\
             [webhooks]\nurls = [\"http://{hook}/hook\"]\nsecret = \"hook-secret-0123456789\"\n"
        ),
    );
    let mut p = Proc::start(&cfg);
    const N: usize = 8;
    let mut clients = Vec::new();
    for _ in 0..N {
        let (u, pw) = rest_creds("s1");
        let mut c = Raw::new(p.udp).await;
        assert_eq!(c.allocate(&u, &pw).await.code(), None);
        clients.push(c);
    }
    p.signal("-TERM");
    let code = tokio::task::spawn_blocking(move || {
        let r = p.wait_exit(Duration::from_secs(15)).code;
        drop(p);
        r
    })
    .await
    .unwrap();
    assert_eq!(code, Some(0));
    let got = got.lock().unwrap();
    let ended = got
        .iter()
        .filter(|v| v["type"] == "allocation.ended" && v["reason"] == "shutdown")
        .count();
    assert_eq!(
        ended, N,
        "every allocation.ended(shutdown) arrived before exit: {got:?}"
    );
}
