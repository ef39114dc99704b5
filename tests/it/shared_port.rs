//! The shared port (`shared_port.listen`, 443 in production) against the real in-process
//! server: coturn's `turnutils_uclient` relays over plain TCP on it, a Rust TURN client over
//! rustls relays over TLS on it (by ALPN `stun.turn` and by first bytes without ALPN; coturn's
//! `turnutils_uclient -S` loses replies under load on the dedicated `turns:` port too, see
//! tests/it/turn_tls.rs), the login and a
//! WSS signaling socket work over TLS on the same port, the login lists the 443 URIs, plain
//! HTTP is redirected to https, and garbage is closed.

use crate::support::stream_turn::StreamTurn;
use crate::support::turn_common;

use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls_pki_types::pem::PemObject;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use switchboard::stun::codec::{attr, method, Class};
use switchboard::stun::{binding, Message};
use switchboard::{Config, RunningServer, Server};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use turn_common::*;

use crate::support::cert;

async fn start_shared(dir: &std::path::Path, extra: &str) -> RunningServer {
    Server::new(shared_config(dir, extra))
        .start()
        .await
        .expect("server starts")
}

/// The test config, with a fresh certificate written to `dir/shared.{crt,key}`.
fn shared_config(dir: &std::path::Path, extra: &str) -> Config {
    let (c, k) = cert::make_cert(dir, "shared");
    let text = format!(
        "[http]\nlisten = \"127.0.0.1:0\"\n\
         [turn]\nlisten = [\"127.0.0.1:0\"]\nmax_allocations_per_user = 100\n\
         stream_first_message_timeout_secs = 2\n\
         [shared_port]\nlisten = [\"127.0.0.1:0\"]\n{extra}\n\
         [tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n\
         [auth]\nturn_secrets = [\"{SECRET}\"]\n[auth.turn_users]\n{USER} = \"{PASS}\"\n",
        c.display(),
        k.display()
    );
    Config::from_toml(&text).expect("valid config")
}

fn shared_addr(srv: &RunningServer) -> SocketAddr {
    srv.bound().shared[0]
}

async fn tls_connect(
    dir: &std::path::Path,
    to: SocketAddr,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(dir.join("shared.crt")).expect("cert file") {
        roots.add(c.expect("pem")).expect("root");
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(to).await.expect("connect");
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("TLS handshake")
}

async fn binding_over<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> SocketAddr {
    let mut req = Vec::new();
    binding::request(&rand::random::<[u8; 12]>(), true, &mut req);
    s.write_all(&req).await.expect("send binding");
    let mut all = vec![0u8; 20];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut all))
        .await
        .expect("binding answered in time")
        .expect("binding answered");
    let len = u16::from_be_bytes([all[2], all[3]]) as usize;
    all.resize(20 + len, 0);
    s.read_exact(&mut all[20..]).await.expect("whole answer");
    let m = Message::parse(&all).expect("valid response");
    assert_eq!(m.transaction_id(), req[8..20]);
    m.xor_address(switchboard::stun::codec::attr::XOR_MAPPED_ADDRESS)
        .expect("XOR-MAPPED-ADDRESS")
        .expect("valid address")
}

/// One HTTP/1.1 request with `Connection: close`; the whole answer as text.
async fn http<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    method: &str,
    path: &str,
    body: &str,
) -> String {
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("send request");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn json_body(answer: &str) -> Value {
    let (_, body) = answer.split_once("\r\n\r\n").expect("a body");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {answer}"))
}

/// What the shared-port tests add to the stream TURN client: a UDP allocation, one channel,
/// ChannelData both ways.
impl<S: AsyncRead + AsyncWrite + Unpin> StreamTurn<S> {
    /// Allocate, bind channel 0x4000 to `peer`, and relay `n` datagrams through it.
    async fn relay(&mut self, peer: SocketAddr, n: usize) -> usize {
        self.open(peer).await;
        self.burst(n).await
    }

    /// Allocate and bind channel 0x4000 to `peer`.
    async fn open(&mut self, peer: SocketAddr) {
        let r = self
            .authed(
                method::ALLOCATE,
                &[(attr::REQUESTED_TRANSPORT, vec![17, 0, 0, 0])],
                None,
            )
            .await;
        assert_eq!(
            Message::parse(&r).unwrap().class(),
            Class::Success,
            "allocate"
        );
        let r = self
            .authed(
                method::CHANNEL_BIND,
                &[(attr::CHANNEL_NUMBER, vec![0x40, 0x00, 0, 0])],
                Some(peer),
            )
            .await;
        assert_eq!(
            Message::parse(&r).unwrap().class(),
            Class::Success,
            "channel bind"
        );
    }

    /// Relay `n` distinct datagrams on channel 0x4000 at once (as a media stream sends);
    /// how many came back.
    async fn burst(&mut self, n: usize) -> usize {
        // All at once (a burst, as a media stream sends), then count what comes back.
        let mut burst = Vec::new();
        for i in 0..n {
            burst.extend_from_slice(&[0x40, 0x00, 0x00, 100]);
            burst.extend_from_slice(&[i as u8; 100]);
        }
        self.s.write_all(&burst).await.expect("send ChannelData");
        let mut seen = vec![false; n];
        let _ = tokio::time::timeout(Duration::from_secs(3), async {
            while seen.iter().any(|s| !s) {
                let f = self.read_frame().await;
                if f[0] == 0x40 && f.len() >= 104 && f[4..104].iter().all(|b| *b == f[4]) {
                    if let Some(s) = seen.get_mut(f[4] as usize) {
                        *s = true;
                    }
                }
            }
        })
        .await;
        seen.iter().filter(|s| **s).count()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rust_turn_client_relays_over_tls_on_the_shared_port_with_and_without_alpn() {
    let dir = tempfile::tempdir().expect("tempdir");
    let srv = start_shared(dir.path(), "").await;
    let peer = echo_peer().await;
    for alpn in [&[&b"stun.turn"[..]][..], &[]] {
        let tls = tls_connect(dir.path(), shared_addr(&srv), alpn).await;
        let mut t = StreamTurn::new(tls);
        assert_eq!(t.relay(peer, 50).await, 50, "ALPN {alpn:?}");
    }
    let text = srv.shared().metrics.render();
    assert_eq!(
        metric(
            &text,
            "switchboard_turn_allocations_created_total{transport=\"tls\"}"
        ),
        2
    );
    srv.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uclient_relays_over_plain_tcp_on_the_shared_port() {
    let dir = tempfile::tempdir().expect("tempdir");
    let srv = start_shared(dir.path(), "").await;
    let peer = start_peer().await;
    let r = uclient(
        shared_addr(&srv),
        peer.port,
        &["-t", "-W", SECRET, "-n", "25", "-l", "120", "-z", "5"],
    )
    .await;
    assert_eq!(r.sent, 50, "{}", r.output);
    assert_eq!(r.received, 50, "{}", r.output);
    assert_eq!(r.lost, 0, "{}", r.output);
    let text = srv.shared().metrics.render();
    assert!(
        metric(
            &text,
            "switchboard_turn_allocations_created_total{transport=\"tcp\"}"
        ) >= 2
    );
    srv.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_routed_by_alpn_or_by_first_bytes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let srv = start_shared(dir.path(), "").await;
    let to = shared_addr(&srv);

    let mut turn = tls_connect(dir.path(), to, &[b"stun.turn"]).await;
    assert_eq!(turn.get_ref().1.alpn_protocol(), Some(&b"stun.turn"[..]));
    let mapped = binding_over(&mut turn).await;
    assert_eq!(mapped, turn.get_ref().0.local_addr().unwrap());

    // No ALPN: a STUN header goes to TURN, an HTTP request to HTTP.
    let mut bare = tls_connect(dir.path(), to, &[]).await;
    assert_eq!(bare.get_ref().1.alpn_protocol(), None);
    binding_over(&mut bare).await;
    let mut bare_http = tls_connect(dir.path(), to, &[]).await;
    let a = http(&mut bare_http, "GET", "/livez", "").await;
    assert!(a.starts_with("HTTP/1.1 200"), "{a}");
    assert!(a.ends_with("ok\n"), "{a}");

    // ALPN http/1.1 never reaches TURN, even when the bytes are STUN.
    let mut h1 = tls_connect(dir.path(), to, &[b"http/1.1"]).await;
    let mut req = Vec::new();
    binding::request(&[3; 12], true, &mut req);
    h1.write_all(&req).await.unwrap();
    let mut b = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), h1.read(&mut b))
        .await
        .expect("answered or closed")
        .unwrap_or(0);
    assert!(n == 0 || b.starts_with(b"HTTP/1.1 400"), "{:?}", &b[..n]);
    let text = srv.shared().metrics.render();
    assert_eq!(
        metric(
            &text,
            "switchboard_stream_connections_active{transport=\"shared\"}"
        ),
        2,
        "the two TURN connections hold their places; HTTP ones do not"
    );
    srv.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_and_wss_on_the_shared_port_list_the_443_uris() {
    let dir = tempfile::tempdir().expect("tempdir");
    let srv = start_shared(dir.path(), "").await;
    let to = shared_addr(&srv);
    let port = to.port();

    let mut s = tls_connect(dir.path(), to, &[b"http/1.1"]).await;
    let a = http(&mut s, "POST", "/v1/login", r#"{"name":"Ann"}"#).await;
    assert!(a.starts_with("HTTP/1.1 200"), "{a}");
    let v = json_body(&a);
    assert_eq!(v["signalingUrl"], "wss://localhost/v1/ws", "{v}");
    let urls: Vec<String> = v["iceServers"]
        .as_array()
        .expect("iceServers")
        .iter()
        .flat_map(|s| s["urls"].as_array().cloned().unwrap_or_default())
        .map(|u| u.as_str().unwrap_or_default().to_string())
        .collect();
    let turn_port = srv.bound().udp[0].port();
    // UDP first, then the shared port: TLS, then plain TCP; the dedicated TCP port is cut.
    assert_eq!(
        urls,
        vec![
            format!("stun:127.0.0.1:{turn_port}"),
            format!("turn:127.0.0.1:{turn_port}?transport=udp"),
            format!("turns:127.0.0.1:{port}?transport=tcp"),
            format!("turn:127.0.0.1:{port}?transport=tcp"),
        ]
    );

    // WSS signaling on the same port, with the login's token.
    let tls = tls_connect(dir.path(), to, &[b"http/1.1"]).await;
    let (mut ws, _) = tokio_tungstenite::client_async("wss://localhost/v1/ws", tls)
        .await
        .expect("WebSocket upgrade over TLS on the shared port");
    let hello = json!({"type": "hello", "token": v["token"], "id": 1}).to_string();
    ws.send(tokio_tungstenite::tungstenite::Message::Text(hello.into()))
        .await
        .unwrap();
    let welcome = loop {
        let m = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("a frame")
            .expect("open")
            .expect("frame");
        if let tokio_tungstenite::tungstenite::Message::Text(t) = m {
            break serde_json::from_str::<Value>(&t).unwrap();
        }
    };
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    srv.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_is_redirected_and_garbage_closed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let srv = start_shared(dir.path(), "public_port = 443").await;
    let to = shared_addr(&srv);
    let mut s = TcpStream::connect(to).await.unwrap();
    let a = http(&mut s, "GET", "/v1/info?x=1", "").await;
    assert!(a.starts_with("HTTP/1.1 308 "), "{a}");
    assert!(
        a.contains("Location: https://localhost/v1/info?x=1\r\n"),
        "{a}"
    );

    let mut g = TcpStream::connect(to).await.unwrap();
    g.write_all(b"\xff\xfe\xfd garbage").await.unwrap();
    let mut b = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(3), g.read(&mut b))
        .await
        .expect("closed at once");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    let text = srv.shared().metrics.render();
    assert!(
        metric(
            &text,
            "switchboard_dropped_total{reason=\"stream_garbage\"}"
        ) >= 1
    );
    assert_eq!(
        metric(
            &text,
            "switchboard_dropped_total{reason=\"shared_plain_http\"}"
        ),
        1
    );
    srv.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_turn_can_be_switched_off() {
    let dir = tempfile::tempdir().expect("tempdir");
    let srv = start_shared(dir.path(), "plain_turn = false").await;
    let to = shared_addr(&srv);
    let mut s = TcpStream::connect(to).await.unwrap();
    let mut req = Vec::new();
    binding::request(&[5; 12], true, &mut req);
    s.write_all(&req).await.unwrap();
    let mut b = [0u8; 32];
    let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut b))
        .await
        .expect("closed at once");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    // TURN over TLS still works, and the login no longer lists turn: on the shared port.
    let mut t = tls_connect(dir.path(), to, &[b"stun.turn"]).await;
    binding_over(&mut t).await;
    let mut h = tls_connect(dir.path(), to, &[b"http/1.1"]).await;
    let v = json_body(&http(&mut h, "POST", "/v1/login", r#"{"name":"Bo"}"#).await);
    let all = v["iceServers"].to_string();
    assert!(
        all.contains(&format!("turns:127.0.0.1:{}?", to.port())),
        "{all}"
    );
    assert!(
        !all.contains(&format!("\"turn:127.0.0.1:{}?", to.port())),
        "{all}"
    );
    srv.shutdown();
}

#[test]
fn the_shared_port_needs_a_certificate_and_a_positive_public_port() {
    let base = "[http]\nlisten = \"127.0.0.1:0\"\n[turn]\nlisten = [\"127.0.0.1:0\"]\n\
                [shared_port]\nlisten = [\"127.0.0.1:0\"]\n";
    let e = Config::from_toml(base)
        .expect_err("no certificate")
        .to_string();
    assert!(e.contains("tls.cert_file"), "{e}");
    let e = Config::from_toml(&format!(
        "{base}public_port = 0\n[tls]\ncert_file = \"/c\"\nkey_file = \"/k\"\n"
    ))
    .expect_err("port 0")
    .to_string();
    assert!(e.contains("shared_port.public_port"), "{e}");
    // A 443-only deployment: no UDP or TCP on turn.listen, STUN/TURN only on the shared port.
    Config::from_toml(
        "[turn]\nlisten = [\"127.0.0.1:3478\"]\nudp = false\ntcp = false\n\
         [shared_port]\nlisten = [\"127.0.0.1:0\"]\n[tls]\ncert_file = \"/c\"\nkey_file = \"/k\"\n",
    )
    .expect("valid");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_reload_keeps_turn_over_tls_and_wss_on_the_shared_port() {
    let dir = tempfile::tempdir().expect("tempdir");
    let srv = start_shared(dir.path(), "").await;
    let to = shared_addr(&srv);
    let peer = echo_peer().await;
    let old_tls = tls_connect(dir.path(), to, &[b"stun.turn"]).await;
    let old_cert = old_tls.get_ref().1.peer_certificates().expect("cert")[0].clone();
    let mut turn = StreamTurn::new(old_tls);
    assert_eq!(turn.relay(peer, 20).await, 20);
    let mut h = tls_connect(dir.path(), to, &[b"http/1.1"]).await;
    let v = json_body(&http(&mut h, "POST", "/v1/login", r#"{"name":"Cy"}"#).await);
    let tls = tls_connect(dir.path(), to, &[b"http/1.1"]).await;
    let (mut ws, _) = tokio_tungstenite::client_async("wss://localhost/v1/ws", tls)
        .await
        .expect("wss");
    let text = |v: Value| tokio_tungstenite::tungstenite::Message::Text(v.to_string().into());
    ws.send(text(json!({"type": "hello", "token": v["token"], "id": 1})))
        .await
        .unwrap();
    async fn next_json(
        ws: &mut tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>,
        want: &str,
    ) -> Value {
        loop {
            let m = tokio::time::timeout(Duration::from_secs(5), ws.next())
                .await
                .expect("a frame")
                .expect("open")
                .expect("frame");
            if let tokio_tungstenite::tungstenite::Message::Text(t) = m {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["type"] == want {
                    return v;
                }
            }
        }
    }
    next_json(&mut ws, "welcome").await;

    // A new certificate and key in the same files, then the reload SIGHUP does.
    let config = shared_config(dir.path(), "");
    srv.shared().reload(&config).expect("reload");
    let fresh = tls_connect(dir.path(), to, &[b"stun.turn"]).await;
    let new_cert = fresh.get_ref().1.peer_certificates().expect("cert")[0].clone();
    assert_ne!(
        old_cert, new_cert,
        "new connections get the new certificate"
    );
    // The allocation made before the swap still relays, and the WSS socket still answers.
    assert_eq!(turn.burst(20).await, 20);
    ws.send(text(json!({"type": "create", "id": "c"})))
        .await
        .unwrap();
    next_json(&mut ws, "created").await;
    srv.shutdown();
}
