//! The server API (`/v1/admin/…`) and webhooks, end to end: an in-test HTTP receiver checks
//! every event, its signature and its order; the API refuses missing and wrong tokens; a
//! revoked user's TURN allocation stops relaying within a second; a hanging receiver does not
//! slow signaling.

use crate::support::turn_common;

use axum::body::Bytes;
use axum::http::HeaderMap;
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchboard::stun::codec::{attr, method, Class};
use switchboard::{Config, RunningServer, Server};
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
    /// Answer this many POSTs with 503 before accepting.
    fail: Arc<std::sync::atomic::AtomicUsize>,
}

impl Receiver {
    async fn start() -> Receiver {
        let (tx, rx) = mpsc::unbounded_channel();
        let hang = Arc::new(AtomicBool::new(false));
        let fail = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let h = hang.clone();
        let f = fail.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: Bytes| {
                let tx = tx.clone();
                let h = h.clone();
                let f = f.clone();
                async move {
                    if h.load(Ordering::SeqCst) {
                        std::future::pending::<()>().await;
                    }
                    let failing = f
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok();
                    if failing {
                        return axum::http::StatusCode::SERVICE_UNAVAILABLE;
                    }
                    let _ = tx.send(Hook { headers, body });
                    axum::http::StatusCode::OK
                }
            }),
        );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(l, app).await;
        });
        Receiver {
            addr,
            rx,
            hang,
            fail,
        }
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
            h.headers
                .get("switchboard-event")
                .and_then(|v| v.to_str().ok()),
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
async fn failed_deliveries_are_retried_with_backoff_in_order() {
    use switchboard::webhooks::Event;
    let mut hooks = Receiver::start().await;
    hooks.fail.store(2, Ordering::SeqCst);
    let srv = start(&hooks.url(), "").await;
    let w = &srv.shared().webhooks;
    let t = Instant::now();
    for i in 0..3 {
        w.emit(
            "r",
            Event::PeerJoined {
                room: "r".into(),
                peer: format!("p{i}"),
                user: "u".into(),
            },
        );
    }
    assert!(t.elapsed() < Duration::from_millis(50), "emit never waits");
    let mut last = 0;
    for i in 0..3 {
        let v = hooks.next().await;
        assert_eq!(v["peer"], format!("p{i}"), "order kept through retries");
        assert!(v["seq"].as_u64().unwrap() > last);
        last = v["seq"].as_u64().unwrap();
    }
    // Two 503s, each retried after 50 ms then 100 ms (less jitter).
    assert!(
        t.elapsed() >= Duration::from_millis(100),
        "{:?}",
        t.elapsed()
    );
    // The lane counts a delivery once the response is read, just after the receiver saw it.
    turn_common::metric_reaches(
        &srv,
        "switchboard_webhook_events_total{outcome=\"delivered\"}",
        3,
    )
    .await;
    let text = srv.shared().metrics.render();
    let m = |o: &str| {
        turn_common::metric(
            &text,
            &format!("switchboard_webhook_events_total{{outcome=\"{o}\"}}"),
        )
    };
    assert_eq!((m("delivered"), m("retried"), m("failed")), (3, 2, 0));
    srv.shutdown();
}

#[tokio::test]
async fn admin_tokens_rotate_on_reload() {
    let hooks = Receiver::start().await;
    let srv = start(&hooks.url(), "").await;
    let mut cfg = (*srv.shared().config).clone();
    cfg.auth.admin_tokens = vec!["next-admin-token-000000".into()];
    srv.shared().reload(&cfg).unwrap();
    assert_eq!(
        admin_get(&srv, "/rooms").await.0,
        401,
        "the old token is gone"
    );
    let r = reqwest::Client::new()
        .get(admin_url(&srv, "/rooms"))
        .bearer_auth("next-admin-token-000000")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // A token file that cannot be read refuses the whole reload.
    cfg.auth.admin_tokens_file = Some("/nonexistent/admin-tokens".into());
    let e = srv.shared().reload(&cfg).unwrap_err().to_string();
    assert!(e.contains("auth.admin_tokens_file"), "{e}");
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

/// Without admin tokens (allowed on loopback only) the API serves local processes, but not a
/// request that a reverse proxy on the same host relays for someone else; and a reload cannot
/// turn the API off (or on): the routes are fixed at start.
#[tokio::test]
async fn a_tokenless_api_serves_only_local_unrelayed_clients_and_admin_api_is_fixed() {
    let text = "[http]\nlisten = \"127.0.0.1:0\"\nadmin_api = true\n\
                [turn]\nlisten = [\"127.0.0.1:0\"]\n";
    let srv = Server::new(Config::from_toml(text).unwrap())
        .start()
        .await
        .unwrap();
    let c = reqwest::Client::new();
    let r = c.get(admin_url(&srv, "/rooms")).send().await.unwrap();
    assert_eq!(r.status(), 200, "a local process");
    for h in ["x-forwarded-for", "forwarded", "x-real-ip"] {
        let v = if h == "forwarded" {
            "for=203.0.113.30"
        } else {
            "203.0.113.30"
        };
        let r = c
            .get(admin_url(&srv, "/rooms"))
            .header(h, v)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "relayed by a local proxy ({h})");
    }
    let mut cfg = (*srv.shared().config).clone();
    cfg.http.admin_api = false;
    let e = srv.shared().reload(&cfg).unwrap_err().to_string();
    assert!(e.contains("http.admin_api"), "{e}");
    let mut cfg = (*srv.shared().config).clone();
    cfg.http.listen = "127.0.0.1:1".parse().unwrap();
    let e = srv.shared().reload(&cfg).unwrap_err().to_string();
    assert!(e.contains("http.listen"), "{e}");
    srv.shutdown();
}

/// SIGHUP reloads the webhook signing secret like the other secrets: events after the reload
/// are signed with the new one only, and an unreadable secret file refuses the reload and
/// keeps the running secret.
#[tokio::test]
async fn the_webhook_secret_is_reloaded() {
    use switchboard::webhooks::{verify, Event};
    let mut hooks = Receiver::start().await;
    let srv = start(&hooks.url(), "").await;
    const NEXT: &str = "next-hook-secret-0123456789";
    let mut cfg = (*srv.shared().config).clone();
    cfg.webhooks.secret = Some(NEXT.into());
    srv.shared().reload(&cfg).unwrap();
    let signed_with = |hooks: &mut Receiver| {
        let h = hooks.rx.try_recv().expect("a webhook");
        let sig = h.headers["switchboard-signature"]
            .to_str()
            .unwrap()
            .to_string();
        let now = switchboard::auth::unix_now();
        (
            verify(NEXT.as_bytes(), &sig, &h.body, now, 300),
            verify(HOOK_SECRET.as_bytes(), &sig, &h.body, now, 300),
        )
    };
    let w = srv.shared().webhooks.clone();
    w.emit("r", Event::RoomCreated { room: "r".into() });
    tokio::time::timeout(Duration::from_secs(5), async {
        while hooks.rx.is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("delivered");
    assert_eq!(signed_with(&mut hooks), (true, false), "new secret only");

    cfg.webhooks.secret = None;
    cfg.webhooks.secret_file = Some("/nonexistent/hook-secret".into());
    let e = srv.shared().reload(&cfg).unwrap_err().to_string();
    assert!(e.contains("webhooks.secret_file"), "{e}");
    w.emit("r", Event::RoomCreated { room: "r".into() });
    tokio::time::timeout(Duration::from_secs(5), async {
        while hooks.rx.is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("delivered");
    assert_eq!(
        signed_with(&mut hooks),
        (true, false),
        "kept after a bad reload"
    );
    srv.shutdown();
}

/// The flush at shutdown waits for the queued events to be delivered, and counts the ones a
/// hanging receiver never took (`dropped_total{reason="webhook_shutdown"}`), as well as
/// events emitted once the lanes have ended.
#[tokio::test]
async fn the_shutdown_flush_delivers_the_queues_and_counts_what_is_left() {
    use switchboard::webhooks::Event;
    let mut hooks = Receiver::start().await;
    let srv = start(&hooks.url(), "").await;
    let w = srv.shared().webhooks.clone();
    for i in 0..8 {
        w.emit(
            &format!("r{i}"),
            Event::RoomCreated {
                room: format!("r{i}"),
            },
        );
    }
    let left = w
        .flush(tokio::time::Instant::now() + Duration::from_secs(5))
        .await;
    assert_eq!(left, 0);
    let mut got = 0;
    while hooks.rx.try_recv().is_ok() {
        got += 1;
    }
    assert_eq!(
        got, 8,
        "every queued event was delivered when flush returned"
    );
    w.emit(
        "late",
        Event::RoomCreated {
            room: "late".into(),
        },
    );
    let dropped = |srv: &RunningServer| {
        turn_common::metric(
            &srv.shared().metrics.render(),
            "switchboard_dropped_total{reason=\"webhook_shutdown\"}",
        )
    };
    assert_eq!(dropped(&srv), 1, "emitted after the flush");
    srv.shutdown();

    let hooks = Receiver::start().await;
    hooks.hang.store(true, Ordering::SeqCst);
    let srv = start(&hooks.url(), "").await;
    let w = srv.shared().webhooks.clone();
    for i in 0..6 {
        w.emit(
            &format!("r{i}"),
            Event::RoomCreated {
                room: format!("r{i}"),
            },
        );
    }
    let t = Instant::now();
    let left = w
        .flush(tokio::time::Instant::now() + Duration::from_millis(300))
        .await;
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "the deadline bounds it"
    );
    assert_eq!(left, 6);
    assert_eq!(dropped(&srv), 6);
    let again = w.flush(tokio::time::Instant::now()).await;
    assert_eq!(
        (again, dropped(&srv)),
        (0, 6),
        "a second flush counts nothing twice"
    );
    srv.shutdown();
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
    let peer = turn_common::echo_peer().await;
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
        assert!(
            t < Duration::from_secs(1),
            "relayed {t:?} after the revocation"
        );
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

// ---- signaling ----

use futures_util::StreamExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::support::ws;
use ws::{connect, recv, recv_type, send, Ws};

/// Frames until the close frame; returns them and the close code.
async fn until_close(ws: &mut Ws) -> (Vec<Value>, Option<u16>) {
    let mut frames = Vec::new();
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("closed within 5 s");
        match m {
            Some(Ok(Message::Text(t))) => frames.push(serde_json::from_str(&t).unwrap()),
            Some(Ok(Message::Close(c))) => return (frames, c.map(|c| u16::from(c.code))),
            Some(Ok(_)) => continue,
            _ => return (frames, None),
        }
    }
}

async fn hello(srv: &RunningServer, user: &str) -> Ws {
    let mut ws = connect(srv).await;
    let token = srv
        .shared()
        .auth
        .issue_session(user, None, switchboard::auth::unix_now())
        .0;
    send(&mut ws, json!({"type": "hello", "token": token})).await;
    assert_eq!(recv(&mut ws).await["type"], "welcome");
    ws
}

async fn join(ws: &mut Ws, room: &str) -> Value {
    send(ws, json!({"type": "join", "room": room, "id": "j"})).await;
    let v = recv_type(ws, "joined").await;
    assert_eq!(v["id"], "j");
    v
}

#[tokio::test]
async fn room_events_in_order_kick_cannot_resume_and_close_room() {
    let mut hooks = Receiver::start().await;
    let srv = start(&hooks.url(), "[signaling]\nresume_grace_secs = 30\n").await;
    let mut a = hello(&srv, "ann").await;
    send(&mut a, json!({"type": "create", "name": "standup"})).await;
    assert_eq!(recv_type(&mut a, "created").await["room"], "standup");
    let ja = join(&mut a, "standup").await;
    let mut b = hello(&srv, "bob").await;
    let jb = join(&mut b, "standup").await;
    recv_type(&mut a, "peer-joined").await;
    let (pa, pb) = (ja["peerId"].clone(), jb["peerId"].clone());

    let (code, rooms) = admin_get(&srv, "/rooms").await;
    assert_eq!(code, 200);
    let r = &rooms["rooms"][0];
    assert_eq!(r["room"], "standup");
    assert_eq!(r["peers"][0]["peer"], pa);
    assert_eq!(r["peers"][0]["user"], "ann");
    assert_eq!(r["peers"][1]["user"], "bob");
    assert_eq!(r["peers"][1]["state"], "connected");

    // B's network drops: reconnecting, visible in the API; then it resumes.
    drop(b);
    recv_type(&mut a, "peer-reconnecting").await;
    let (_, one) = admin_get(&srv, "/rooms/standup").await;
    assert_eq!(one["peers"][1]["state"], "reconnecting", "{one}");
    let mut b2 = hello(&srv, "bob").await;
    send(
        &mut b2,
        json!({"type": "resume", "resumeToken": jb["resumeToken"]}),
    )
    .await;
    recv_type(&mut b2, "resumed").await;
    recv_type(&mut a, "peer-resumed").await;

    // Kick B: A sees peer-left kicked; B gets a typed error and close 4005; no resume.
    let (code, v) = admin_post(
        &srv,
        &format!("/rooms/standup/peers/{}/kick", pb.as_str().unwrap()),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    let l = recv_type(&mut a, "peer-left").await;
    assert_eq!(
        (l["peerId"].clone(), l["reason"].clone()),
        (pb.clone(), json!("kicked"))
    );
    let (frames, close) = until_close(&mut b2).await;
    assert!(
        frames
            .iter()
            .any(|f| f["type"] == "error" && f["code"] == "kicked"),
        "{frames:?}"
    );
    assert_eq!(close, Some(4005));
    let mut b3 = hello(&srv, "bob").await;
    send(
        &mut b3,
        json!({"type": "resume", "resumeToken": jb["resumeToken"]}),
    )
    .await;
    let e = recv_type(&mut b3, "error").await;
    assert_eq!(e["code"], "bad_resume", "a kicked peer cannot resume");
    let (code, _) = admin_post(
        &srv,
        &format!("/rooms/standup/peers/{}/kick", pb.as_str().unwrap()),
    )
    .await;
    assert_eq!(code, 404, "already gone");

    // Close the room: A gets a typed error, room-closed, close 4006; the room is gone.
    let (code, v) = admin_post(&srv, "/rooms/standup/close").await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["peersRemoved"], 1);
    let (frames, close) = until_close(&mut a).await;
    assert!(
        frames
            .iter()
            .any(|f| f["type"] == "error" && f["code"] == "room_closed"),
        "{frames:?}"
    );
    assert!(
        frames.iter().any(|f| f["type"] == "room-closed"),
        "{frames:?}"
    );
    assert_eq!(close, Some(4006));
    assert_eq!(admin_get(&srv, "/rooms/standup").await.0, 404);
    assert_eq!(admin_post(&srv, "/rooms/standup/close").await.0, 404);

    // Every event of the room, signed, in order.
    let want = [
        ("room.created", None, None),
        ("peer.joined", Some(&pa), None),
        ("peer.joined", Some(&pb), None),
        ("peer.reconnecting", Some(&pb), None),
        ("peer.resumed", Some(&pb), None),
        ("peer.left", Some(&pb), Some("kicked")),
        ("peer.left", Some(&pa), Some("room-closed")),
        ("room.closed", None, Some("closed")),
    ];
    let mut last_seq = 0;
    for (ty, peer, reason) in want {
        let v = hooks.next().await;
        assert_eq!(v["type"], ty, "{v}");
        assert_eq!(v["room"], "standup");
        if let Some(p) = peer {
            assert_eq!(&v["peer"], p, "{v}");
            assert_eq!(v["user"], if *p == pa { "ann" } else { "bob" });
        }
        if let Some(r) = reason {
            assert_eq!(v["reason"], r, "{v}");
        }
        let seq = v["seq"].as_u64().unwrap();
        assert!(seq > last_seq, "seq increases within a room: {v}");
        last_seq = seq;
    }
    srv.shutdown();
}

#[tokio::test]
async fn revoking_a_user_removes_its_peers_and_refuses_its_session_tokens() {
    let hooks = Receiver::start().await;
    let srv = start(&hooks.url(), "").await;
    let mut a = hello(&srv, "ann").await;
    send(&mut a, json!({"type": "create", "name": "r1"})).await;
    recv_type(&mut a, "created").await;
    let ja = join(&mut a, "r1").await;
    let mut m = hello(&srv, "mallory").await;
    let jm = join(&mut m, "r1").await;
    recv_type(&mut a, "peer-joined").await;
    let old = srv
        .shared()
        .auth
        .issue_session("mallory", None, switchboard::auth::unix_now())
        .0;
    let (code, v) = admin_post(&srv, "/users/mallory/revoke").await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["peersRemoved"], 1);
    let l = recv_type(&mut a, "peer-left").await;
    assert_eq!(
        (l["peerId"].clone(), l["reason"].clone()),
        (jm["peerId"].clone(), json!("revoked"))
    );
    let (_, close) = until_close(&mut m).await;
    assert_eq!(close, Some(4005));
    // The token issued before the revocation no longer opens a session.
    let mut again = connect(&srv).await;
    send(&mut again, json!({"type": "hello", "token": old})).await;
    let e = recv(&mut again).await;
    assert_eq!(e["type"], "error", "{e}");
    let _ = ja;
    srv.shutdown();
}

/// Median and 99th percentile of signal latencies A → B over `n` signals, while another
/// connection joins and leaves rooms as fast as it can (every join/leave is a webhook event).
async fn signal_latency(srv: &RunningServer, n: usize) -> (Duration, Duration) {
    let mut a = hello(srv, "ann").await;
    send(&mut a, json!({"type": "create", "name": "lat"})).await;
    recv_type(&mut a, "created").await;
    send(&mut a, json!({"type": "create", "name": "churn"})).await;
    recv_type(&mut a, "created").await;
    let ja = join(&mut a, "lat").await;
    let mut b = hello(srv, "bob").await;
    join(&mut b, "lat").await;
    recv_type(&mut a, "peer-joined").await;
    let stop = Arc::new(AtomicBool::new(false));
    let churn = {
        let mut c = hello(srv, "carol").await;
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                join(&mut c, "churn").await;
                send(&mut c, json!({"type": "leave"})).await;
                recv_type(&mut c, "left").await;
                i += 1;
                // Within the signaling rate limit.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            i
        })
    };
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        send(
            &mut b,
            json!({"type": "signal", "to": ja["peerId"], "data": {"n": i}}),
        )
        .await;
        let s = recv_type(&mut a, "signal").await;
        assert_eq!(s["data"]["n"], i);
        lat.push(t.elapsed());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let churned = churn.await.unwrap();
    assert!(
        churned > 10,
        "the churn produced events ({churned} join/leave pairs)"
    );
    lat.sort();
    (lat[n / 2], lat[n * 99 / 100])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_webhook_receiver_does_not_slow_signaling() {
    // Baseline: the same server without webhooks.
    let limits = "[signaling]\nrate_per_sec = 2000\nrate_burst = 2000\n";
    let text =
        format!("[http]\nlisten = \"127.0.0.1:0\"\n[turn]\nlisten = [\"127.0.0.1:0\"]\n{limits}");
    let plain = Server::new(Config::from_toml(&text).unwrap())
        .start()
        .await
        .unwrap();
    let (base50, base99) = signal_latency(&plain, 300).await;
    plain.shutdown();

    let hooks = Receiver::start().await;
    hooks.hang.store(true, Ordering::SeqCst);
    let srv = start(&hooks.url(), &format!("queue_size = 64\n{limits}")).await;
    let (hang50, hang99) = signal_latency(&srv, 300).await;
    let dropped = turn_common::metric(
        &srv.shared().metrics.render(),
        "switchboard_dropped_total{reason=\"webhook_queue_full\"}",
    );
    println!(
        "signal latency p50/p99: no webhooks {base50:?}/{base99:?}; hanging receiver \
         {hang50:?}/{hang99:?}; webhook events dropped {dropped}"
    );
    assert!(dropped > 0, "the receiver's queue filled up");
    assert!(
        hang50 < base50 * 3 + Duration::from_millis(5),
        "median {hang50:?} vs {base50:?}"
    );
    assert!(hang99 < Duration::from_millis(100), "p99 {hang99:?}");
    srv.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_allocations_report_usage_when_the_connection_closes() {
    let mut hooks = Receiver::start().await;
    let srv = start(&hooks.url(), "").await;
    let peer = turn_common::start_peer().await;
    let tcp = srv.bound().tcp[0];
    let r = turn_common::uclient(
        tcp,
        peer.port,
        &[
            "-t",
            "-W",
            turn_common::SECRET,
            "-u",
            "carol",
            "-n",
            "20",
            "-l",
            "120",
            "-z",
            "5",
        ],
    )
    .await;
    assert!(r.received > 0, "{}", r.output);
    // uclient allocates an RTP and an RTCP relay (and may probe first); every allocation ends
    // when its connection closes.
    let mut created = Vec::new();
    let mut ended = Vec::new();
    while ended.len() < 2 || ended.len() < created.len() {
        let v = hooks.next().await;
        match v["type"].as_str() {
            Some("allocation.created") => created.push(v),
            Some("allocation.ended") => ended.push(v),
            _ => {}
        }
    }
    assert!(created.len() >= 2);
    for e in &ended {
        assert_eq!(e["transport"], "tcp", "{e}");
        assert_eq!(e["relayTransport"], "udp", "{e}");
        // uclient deletes its allocations (Refresh 0) before it closes the connection.
        assert!(
            e["reason"] == "refreshed_zero" || e["reason"] == "closed",
            "{e}"
        );
        assert!(e["user"].as_str().unwrap().ends_with("carol"), "{e}");
        assert!(created.iter().any(|c| c["allocation"] == e["allocation"]));
    }
    let sum = |k: &str| ended.iter().map(|e| e[k].as_u64().unwrap()).sum::<u64>();
    assert!(
        sum("packetsToClient") >= r.received,
        "{ended:?} vs {}",
        r.received
    );
    assert!(sum("packetsToPeer") >= sum("packetsToClient"));
    assert!(sum("bytesToClient") >= r.received * 120);
    let text = srv.shared().metrics.render();
    let by_transport = turn_common::metric(
        &text,
        "switchboard_turn_relayed_transport_bytes_total{direction=\"to_client\",transport=\"tcp\"}",
    );
    assert_eq!(
        by_transport,
        sum("bytesToClient"),
        "metric and webhooks agree"
    );
    srv.shutdown();
}

/// An app backend may call the server API with a short-lived JWT carrying `admin: true`,
/// signed with a key of the `jwt` login backend; a user's login token (no admin claim), an
/// expired one or one signed with another key is refused.
#[tokio::test]
async fn a_backend_jwt_with_the_admin_claim_is_accepted() {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    let hooks = Receiver::start().await;
    let srv = start(
        &hooks.url(),
        "[auth.jwt]\nhs256_secret = \"app-backend-secret-0123\"\n",
    )
    .await;
    // `start` names no backend list; the jwt one is added here.
    let mut cfg = (*srv.shared().config).clone();
    cfg.auth.backends = vec![
        switchboard::config::Backend::Open,
        switchboard::config::Backend::Jwt,
    ];
    srv.shared().reload(&cfg).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let token = |key: &str, admin: Option<bool>, exp: u64| {
        let mut claims = serde_json::json!({"sub": "app-backend", "exp": exp});
        if let Some(a) = admin {
            claims["admin"] = a.into();
        }
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(key.as_bytes()),
        )
        .unwrap()
    };
    let get = |t: String| {
        let url = admin_url(&srv, "/rooms");
        async move {
            reqwest::Client::new()
                .get(url)
                .bearer_auth(t)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    let key = "app-backend-secret-0123";
    assert_eq!(get(token(key, Some(true), now + 60)).await, 200);
    assert_eq!(get(token(key, None, now + 60)).await, 401, "no admin claim");
    assert_eq!(get(token(key, Some(false), now + 60)).await, 401);
    assert_eq!(get(token(key, Some(true), now - 120)).await, 401, "expired");
    assert_eq!(
        get(token("another-secret-0123456", Some(true), now + 60)).await,
        401,
        "signed with another key"
    );
    // The static token still works beside it.
    assert_eq!(admin_get(&srv, "/rooms").await.0, 200);
    srv.shutdown();
}
