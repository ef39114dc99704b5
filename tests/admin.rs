//! The server API (`/v1/admin/…`) and webhooks, end to end: an in-test HTTP receiver checks
//! every event, its signature and its order; the API refuses missing and wrong tokens; a
//! revoked user's TURN allocation stops relaying within a second; a hanging receiver does not
//! slow signaling.

mod turn_common;

use axum::body::Bytes;
use axum::http::HeaderMap;
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchboard::stun::codec::{attr, method, Class};
use switchboard::{Config, RunningServer, Server};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use turn_common::Raw;

const ADMIN: &str = "admin-token-0123456789";
const HOOK_SECRET: &str = "hook-secret-0123456789";

/// One POST the receiver got.
struct Hook {
    headers: HeaderMap,
    body: Bytes,
}

impl Hook {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("webhook body is JSON")
    }
}

/// An in-test webhook endpoint: records every POST, or hangs while `hang` is set.
struct Receiver {
    addr: SocketAddr,
    rx: mpsc::UnboundedReceiver<Hook>,
    hang: Arc<AtomicBool>,
}

impl Receiver {
    async fn start() -> Receiver {
        let (tx, rx) = mpsc::unbounded_channel();
        let hang = Arc::new(AtomicBool::new(false));
        let h = hang.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: Bytes| {
                let tx = tx.clone();
                let h = h.clone();
                async move {
                    if h.load(Ordering::SeqCst) {
                        std::future::pending::<()>().await;
                    }
                    let _ = tx.send(Hook { headers, body });
                    "ok"
                }
            }),
        );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(l, app).await;
        });
        Receiver { addr, rx, hang }
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// The next event, its signature checked; panics after 5 s.
    async fn next(&mut self) -> Value {
        let h = tokio::time::timeout(Duration::from_secs(5), self.rx.recv())
            .await
            .expect("a webhook within 5 s")
            .expect("receiver open");
        let sig = h
            .headers
            .get("switchboard-signature")
            .and_then(|v| v.to_str().ok())
            .expect("signature header");
        assert!(
            switchboard::webhooks::verify(
                HOOK_SECRET.as_bytes(),
                sig,
                &h.body,
                switchboard::auth::unix_now(),
                300
            ),
            "signature verifies"
        );
        // Tampered body or another secret must fail.
        assert!(!switchboard::webhooks::verify(
            b"not-the-secret-000000",
            sig,
            &h.body,
            switchboard::auth::unix_now(),
            300
        ));
        let v = h.json();
        assert_eq!(
            h.headers.get("switchboard-event").and_then(|v| v.to_str().ok()),
            v["type"].as_str()
        );
        assert_eq!(
            h.headers
                .get("switchboard-delivery")
                .and_then(|v| v.to_str().ok()),
            v["id"].as_str()
        );
        v
    }

    /// The next event of type `ty` (skipping others, which are returned too).
    async fn until(&mut self, ty: &str) -> (Value, Vec<Value>) {
        let mut skipped = Vec::new();
        loop {
            let v = self.next().await;
            if v["type"] == ty {
                return (v, skipped);
            }
            skipped.push(v);
        }
    }
}

async fn start(hook_url: &str, extra: &str) -> RunningServer {
    let text = format!(
        "[http]\nlisten = \"127.0.0.1:0\"\nadmin_api = true\n\
         [turn]\nlisten = [\"127.0.0.1:0\"]\n\
         [auth]\nadmin_tokens = [\"{ADMIN}\"]\nturn_secrets = [\"{}\"]\n\
         [webhooks]\nurls = [\"{hook_url}\"]\nsecret = \"{HOOK_SECRET}\"\n\
         retry_initial_ms = 50\ntimeout_secs = 1\n{extra}",
        turn_common::SECRET
    );
    Server::new(Config::from_toml(&text).expect("valid test config"))
        .start()
        .await
        .expect("server starts")
}

fn admin_url(srv: &RunningServer, path: &str) -> String {
    format!("http://{}/v1/admin{path}", srv.http_addr())
}

async fn admin_post(srv: &RunningServer, path: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(admin_url(srv, path))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    let code = r.status().as_u16();
    (code, r.json().await.unwrap_or(Value::Null))
}

async fn admin_get(srv: &RunningServer, path: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .get(admin_url(srv, path))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    let code = r.status().as_u16();
    (code, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn admin_api_refuses_missing_and_wrong_tokens() {
    let hooks = Receiver::start().await;
    let srv = start(&hooks.url(), "").await;
    let c = reqwest::Client::new();
    for path in ["/rooms", "/rooms/x"] {
        let r = c.get(admin_url(&srv, path)).send().await.unwrap();
        assert_eq!(r.status(), 401, "no token on {path}");
        assert_eq!(r.headers()["www-authenticate"], "Bearer");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "unauthorized");
        let r = c
            .get(admin_url(&srv, path))
            .bearer_auth("admin-token-0123456780")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "wrong token on {path}");
        let r = c
            .get(admin_url(&srv, path))
            .header("authorization", format!("Basic {ADMIN}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "not a bearer token on {path}");
    }
    for path in [
        "/rooms/x/close",
        "/rooms/x/peers/p/kick",
        "/users/mallory/revoke",
    ] {
        let r = c.post(admin_url(&srv, path)).send().await.unwrap();
        assert_eq!(r.status(), 401, "no token on {path}");
        let r = c
            .post(admin_url(&srv, path))
            .bearer_auth("wrong")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "wrong token on {path}");
    }
    // Nothing was revoked by the refused requests.
    assert!(!srv.shared().auth.is_revoked("mallory", Some(0)));
    let (code, v) = admin_get(&srv, "/rooms").await;
    assert_eq!(code, 200);
    assert_eq!(v["rooms"], serde_json::json!([]));
    let (code, v) = admin_get(&srv, "/rooms/nope").await;
    assert_eq!(code, 404);
    assert_eq!(v["error"]["code"], "unknown_room");
    let text = srv.shared().metrics.render();
    assert!(
        turn_common::metric(
            &text,
            "switchboard_admin_requests_total{result=\"unauthorized\"}"
        ) >= 12
    );
    srv.shutdown();
}

#[tokio::test]
async fn admin_api_is_absent_unless_enabled() {
    let text = "[http]\nlisten = \"127.0.0.1:0\"\n[turn]\nlisten = [\"127.0.0.1:0\"]\n";
    let srv = Server::new(Config::from_toml(text).unwrap())
        .start()
        .await
        .unwrap();
    let r = reqwest::Client::new()
        .get(admin_url(&srv, "/rooms"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    srv.shutdown();
}

/// A UDP echo peer on loopback.
async fn echo_peer() -> SocketAddr {
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let a = s.local_addr().unwrap();
    tokio::spawn(async move {
        let mut b = vec![0u8; 2048];
        while let Ok((n, from)) = s.recv_from(&mut b).await {
            let _ = s.send_to(&b[..n], from).await;
        }
    });
    a
}

fn channel_data(ch: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = ch.to_be_bytes().to_vec();
    v.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

#[tokio::test]
async fn revoked_users_allocation_stops_relaying_within_a_second_and_usage_is_reported() {
    let mut hooks = Receiver::start().await;
    let srv = start(&hooks.url(), "").await;
    let peer = echo_peer().await;
    let auth = srv.shared().auth.clone();
    let creds = auth.turn_credentials(Some("mallory"), switchboard::auth::unix_now());
    let mut c = Raw::new(turn_common::udp_addr(&srv)).await;
    let r = c.allocate(&creds.username, &creds.password).await;
    assert_eq!(r.msg().class(), Class::Success, "allocate");
    let ch = 0x4001u16;
    let r = c
        .request(
            method::CHANNEL_BIND,
            &[(attr::CHANNEL_NUMBER, vec![0x40, 0x01, 0, 0])],
            &[peer],
            Some((&creds.username, &creds.password)),
        )
        .await;
    assert_eq!(r.msg().class(), Class::Success, "channel bind");
    let (created, _) = hooks.until("allocation.created").await;
    assert_eq!(created["user"], "mallory");
    assert_eq!(created["transport"], "udp");
    assert_eq!(created["relayTransport"], "udp");
    let alloc_id = created["allocation"].as_str().unwrap().to_string();

    // Relay works: 10 packets of 100 bytes each way.
    let mut buf = vec![0u8; 2048];
    let mut echoed = 0;
    for i in 0..10u8 {
        c.sock
            .send_to(&channel_data(ch, &[i; 100]), c.server)
            .await
            .unwrap();
        if let Ok(Ok((n, _))) =
            tokio::time::timeout(Duration::from_secs(2), c.sock.recv_from(&mut buf)).await
        {
            if n == 104 && buf[..2] == ch.to_be_bytes() {
                echoed += 1;
            }
        }
    }
    assert_eq!(echoed, 10, "relayed before the revocation");

    // Revoke, then keep sending: nothing may come back later than a second after.
    let (code, v) = admin_post(&srv, "/users/mallory/revoke").await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["user"], "mallory");
    let revoked = Instant::now();
    let mut last_echo = None;
    while revoked.elapsed() < Duration::from_millis(1500) {
        c.sock
            .send_to(&channel_data(ch, &[0xee; 100]), c.server)
            .await
            .unwrap();
        if let Ok(Ok((n, _))) =
            tokio::time::timeout(Duration::from_millis(20), c.sock.recv_from(&mut buf)).await
        {
            if n == 104 && buf[..2] == ch.to_be_bytes() {
                last_echo = Some(revoked.elapsed());
            }
        }
    }
    if let Some(t) = last_echo {
        assert!(t < Duration::from_secs(1), "relayed {t:?} after the revocation");
    }
    let (ended, _) = hooks.until("allocation.ended").await;
    assert_eq!(ended["allocation"], alloc_id.as_str());
    assert_eq!(ended["user"], "mallory");
    assert_eq!(ended["reason"], "revoked");
    assert_eq!(ended["transport"], "udp");
    assert!(ended["seq"].as_u64() > created["seq"].as_u64());
    // The ten echoed packets at least, plus any sent in the instant before the revocation.
    let to_peer = ended["packetsToPeer"].as_u64().unwrap();
    let to_client = ended["packetsToClient"].as_u64().unwrap();
    assert!((10..=12).contains(&to_peer), "{ended}");
    assert!((10..=12).contains(&to_client), "{ended}");
    assert_eq!(ended["bytesToPeer"].as_u64().unwrap(), to_peer * 100);
    assert_eq!(ended["bytesToClient"].as_u64().unwrap(), to_client * 100);
    assert!(ended["durationMs"].as_u64().unwrap() >= 1);

    // The revoked credential cannot allocate again; a fresh one (next second) can.
    let mut again = Raw::new(turn_common::udp_addr(&srv)).await;
    let r = again.allocate(&creds.username, &creds.password).await;
    assert_eq!(r.code(), Some(401), "revoked credential refused");
    let text = srv.shared().metrics.render();
    assert!(
        turn_common::metric(
            &text,
            "switchboard_turn_allocations_deleted_total{reason=\"revoked\"}"
        ) == 1
    );
    assert!(
        turn_common::metric(
            &text,
            "switchboard_turn_relayed_transport_bytes_total{direction=\"to_peer\",transport=\"udp\"}"
        ) >= 1000
    );
    assert!(turn_common::metric(&text, "switchboard_auth_failures_total{reason=\"revoked\"}") >= 1);
    // Per-user usage never becomes a label.
    assert!(!text.contains("mallory"));
    srv.shutdown();
}
