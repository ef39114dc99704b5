//! End to end in real browsers: two headless Chromium pages (Debian's chromium, driven through
//! chromedriver's W3C WebDriver API) run the demo page, log in, meet in a room and send video
//! to each other through switchboard's TURN relay, then survive a signaling drop.
//!
//! The server listens on loopback with UDP off, so Chromium reaches TURN over
//! `turn:…?transport=tcp` and every packet stays on 127.0.0.1.

use serde_json::{json, Value};
use std::time::Duration;
use switchboard::{Config, RunningServer, Server};

#[path = "support/cert.rs"]
mod cert;
#[path = "support/webdriver.rs"]
mod webdriver;
use webdriver::{Browser, Driver};

/// One browser pair at a time: six Chromium instances encoding video would starve two cores.
static BROWSERS: std::sync::OnceLock<tokio::sync::Mutex<()>> = std::sync::OnceLock::new();

async fn browser_slot() -> tokio::sync::MutexGuard<'static, ()> {
    BROWSERS
        .get_or_init(|| tokio::sync::Mutex::new(()))
        .lock()
        .await
}

/// Poll the page state until `pred` holds (60 s budget for slow CI machines).
async fn wait_for(b: &Browser, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    for _ in 0..240 {
        last = state(b).await;
        if pred(&last) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("timed out waiting for {what}; last page state: {last}");
}

/// [`wait_for`], and on timeout also show the other page's state.
async fn wait_for_or_show(
    b: &Browser,
    other: &Browser,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    for _ in 0..240 {
        let v = state(b).await;
        if pred(&v) {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (mine, theirs) = (state(b).await, state(other).await);
    panic!("timed out waiting for {what}; this page: {mine}; the other: {theirs}");
}

async fn state(b: &Browser) -> Value {
    b.js("return window.sbState || {}").await
}

/// Poll `script` until it returns something other than null or false.
async fn wait_js(b: &Browser, what: &str, script: &str) -> Value {
    b.poll(script, Duration::from_secs(60))
        .await
        .unwrap_or_else(|last| panic!("timed out waiting for {what}; last value: {last}"))
}

async fn start_server() -> RunningServer {
    start_with("udp = false\n", "").await
}

async fn start_with(turn: &str, extra: &str) -> RunningServer {
    let cfg = Config::from_toml(&format!(
        "[http]\nlisten = \"127.0.0.1:0\"\n[turn]\nlisten = [\"127.0.0.1:0\"]\n{turn}\n{extra}"
    ))
    .expect("valid config");
    Server::new(cfg).start().await.expect("server starts")
}

/// Two pages meet in a room with `?relay=1` and wait for relayed video both ways.
/// Returns both browsers and the profile directories, which must outlive the browsers.
async fn relayed_call(
    d: &Driver,
    base: &str,
    extra: &[&str],
) -> (Browser, Browser, [tempfile::TempDir; 2]) {
    let pa = tempfile::tempdir().unwrap();
    let pb = tempfile::tempdir().unwrap();
    let a = d.browser("A", pa.path(), extra).await;
    a.go(&format!("{base}/?name=A&auto=1&relay=1")).await;
    let st = wait_for(&a, "A to create a room", |v| v["room"].is_string()).await;
    let room = st["room"].as_str().unwrap().to_string();
    let b = d.browser("B", pb.path(), extra).await;
    b.go(&format!("{base}/?name=B&auto=1&relay=1&room={room}"))
        .await;
    for (s, other) in [(&a, &b), (&b, &a)] {
        let v = wait_for_or_show(s, other, "relayed video", |v| {
            v["connectionType"] == "relay" && frames(v) > 0
        })
        .await;
        assert_eq!(v["error"], Value::Null);
    }
    (a, b, [pa, pb])
}

fn frames(v: &Value) -> u64 {
    v["framesDecoded"].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_browsers_call_through_the_turn_relay_and_survive_a_signaling_drop() {
    let _slot = browser_slot().await;
    let srv = start_server().await;
    let base = format!("http://{}", srv.http_addr());
    let d = Driver::start().await;
    let pa = tempfile::tempdir().unwrap();
    let pb = tempfile::tempdir().unwrap();

    let a = d.browser("A", pa.path(), &[]).await;
    a.go(&format!("{base}/?name=A&auto=1&relay=1")).await;
    let st = wait_for(&a, "A to create a room", |v| v["room"].is_string()).await;
    let room = st["room"].as_str().unwrap().to_string();

    let b = d.browser("B", pb.path(), &[]).await;
    b.go(&format!("{base}/?name=B&auto=1&relay=1&room={room}"))
        .await;
    let sb = wait_for(&b, "B to decode video through the relay", |v| {
        v["connectionType"] == "relay" && frames(v) > 0
    })
    .await;
    assert_eq!(sb["error"], Value::Null);
    let sa = wait_for(&a, "A to decode B's video", |v| frames(v) > 0).await;
    assert_eq!(sa["connectionType"], "relay");

    // The data channel crosses the relay too.
    let sent = b.js("return window.sb.sendMessage('hello from B')").await;
    assert_eq!(sent, 1);
    wait_for(&a, "A to get B's data-channel message", |v| {
        v["messages"]
            .as_array()
            .is_some_and(|m| m.iter().any(|x| x == "hello from B"))
    })
    .await;

    // The relay really carried it: TURN allocations over TCP and relayed packets both ways.
    let m = srv.shared().metrics.render();
    let metric = |name: &str| -> f64 {
        m.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    };
    assert!(
        metric("switchboard_turn_allocations_created_total{transport=\"tcp\"}") >= 2.0,
        "{m}"
    );
    assert!(
        metric("switchboard_turn_relayed_packets_total{direction=\"to_peer\"}") > 50.0,
        "{m}"
    );
    assert!(
        metric("switchboard_turn_relayed_packets_total{direction=\"to_client\"}") > 50.0,
        "{m}"
    );

    // B's signaling socket drops mid-call, and B restarts ICE while it is down: it resumes,
    // the offer made during the drop still reaches A, and the call goes on.
    let before = frames(&state(&b).await);
    let ufrag = "const [st] = window.sb.peers.values(); \
                 const d = st && st.pc.currentRemoteDescription; \
                 return d ? d.sdp.match(/a=ice-ufrag:(\\S+)/)[1] : null;";
    let old_ufrag = b.js(ufrag).await;
    assert!(old_ufrag.is_string(), "{old_ufrag}");
    b.js("window.sb.dropSocket(); for (const st of window.sb.peers.values()) st.pc.restartIce(); return true",
    )
    .await;
    wait_for(&b, "B to resume its seat", |v| {
        v["resumes"].as_u64() >= Some(1)
    })
    .await;
    wait_js(&b,
        "A's answer to the ICE restart offered during the drop",
        &format!(
            "const [st] = window.sb.peers.values(); \
             const d = st.pc.currentRemoteDescription; \
             return st.pc.signalingState === 'stable' && !d.sdp.includes('a=ice-ufrag:' + {old_ufrag} + '\\r');"
        ),
    )
    .await;
    wait_for(&b, "video to keep flowing after the resume", |v| {
        frames(v) > before + 30 && v["connectionType"] == "relay"
    })
    .await;
    let after = state(&a).await;
    assert_eq!(after["error"], Value::Null, "{after}");
    let m = srv.shared().metrics.render();
    assert!(
        m.contains("switchboard_resumes_total{outcome=\"resumed\"} 1"),
        "{m}"
    );

    a.quit().await;
    b.quit().await;
    srv.shutdown();
    srv.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_page_shows_clear_errors_for_unknown_and_full_rooms() {
    let _slot = browser_slot().await;
    let srv = start_server().await;
    let base = format!("http://{}", srv.http_addr());
    let d = Driver::start().await;
    let p = tempfile::tempdir().unwrap();
    let s = d.browser("C", p.path(), &[]).await;
    s.go(&format!("{base}/?name=C&auto=1&room=no-such-room"))
        .await;
    let st = wait_for(&s, "an error", |v| v["error"].is_string()).await;
    assert_eq!(st["error"], "unknown_room");
    let text = s
        .js("return document.getElementById('error').textContent")
        .await;
    assert!(text.as_str().unwrap().contains("No such room"), "{text}");
    s.quit().await;

    // Fill a two-seat room with two signaling clients; the page must say it is full.
    let _seats = fill_room(&srv, "pair").await;
    let p2 = tempfile::tempdir().unwrap();
    let s = d.browser("2", p2.path(), &[]).await;
    s.go(&format!("{base}/?name=D&auto=1&room=pair")).await;
    let st = wait_for(&s, "an error", |v| v["error"].is_string()).await;
    assert_eq!(st["error"], "room_full");
    let text = s
        .js("return document.getElementById('error').textContent")
        .await;
    assert!(text.as_str().unwrap().contains("full"), "{text}");
    s.quit().await;
    srv.shutdown();
    srv.wait().await;
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Create room `name` with two seats and occupy both with WebSocket clients.
async fn fill_room(srv: &RunningServer, name: &str) -> Vec<Ws> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let mut seats = Vec::new();
    for (i, user) in ["x", "y"].iter().enumerate() {
        let (tok, _) = srv
            .shared()
            .auth
            .issue_session(user, None, switchboard::auth::unix_now());
        let url = format!("ws://{}/v1/ws", srv.http_addr());
        let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        let mut frames = vec![json!({"type": "hello", "token": tok})];
        if i == 0 {
            frames.push(json!({"type": "create", "name": name, "capacity": 2}));
        }
        frames.push(json!({"type": "join", "room": name, "id": "j"}));
        for f in frames {
            ws.send(Message::Text(f.to_string().into())).await.unwrap();
        }
        loop {
            let m = ws.next().await.unwrap().unwrap();
            if let Message::Text(t) = m {
                let v: Value = serde_json::from_str(&t).unwrap();
                assert_ne!(v["type"], "error", "{v}");
                if v["type"] == "joined" {
                    break;
                }
            }
        }
        seats.push(ws);
    }
    seats
}

/// `turns:` only: Chromium reaches the relay over TLS. It must be told to accept the test's
/// self-signed certificate (`--ignore-certificate-errors`); with the flag off it refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsers_call_over_turns_tls() {
    let _slot = browser_slot().await;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = cert::make_cert(dir.path(), "localhost");
    let srv = start_with(
        "udp = false\ntcp = false\ntls_listen = [\"127.0.0.1:0\"]\n",
        &format!(
            "[tls]\ncert_file = {:?}\nkey_file = {:?}\n",
            cert.display().to_string(),
            key.display().to_string()
        ),
    )
    .await;
    let base = format!("http://{}", srv.http_addr());
    let d = Driver::start().await;
    let (a, b, _profiles) = relayed_call(&d, &base, &["--ignore-certificate-errors"]).await;
    let m = srv.shared().metrics.render();
    assert!(
        m.lines().any(|l| l
            .starts_with("switchboard_turn_allocations_created_total{transport=\"tls\"}")
            && !l.ends_with(" 0")),
        "{m}"
    );
    a.quit().await;
    b.quit().await;
    srv.shutdown();
    srv.wait().await;
}
