//! End to end in real browsers: separate headless Chromium instances (Debian's chromium, each
//! with its own profile, driven through chromedriver's W3C WebDriver API) use the demo page as
//! a person would: type a name, start a call, open the shared link, join, hang up.
//!
//! An init script wraps `RTCPeerConnection` so that the tests read the page's real connections
//! through getStats rather than trusting what the page says.
//!
//! Everything stays on 127.0.0.1. Over UDP, Chromium is started with
//! [`webdriver::LOOPBACK_UDP_FLAG`] so that it binds the wildcard address and its packets to the
//! server come from loopback; the tests that do not pass it turn UDP off and reach TURN over
//! TCP or TLS.

use serde_json::{json, Value};
use std::time::Duration;
use switchboard::{Config, RunningServer, Server};

use crate::support::cert;
use crate::support::rtc_stats;
use crate::support::webdriver;
use rtc_stats::{PC_STATS, PC_WRAPPER};
use webdriver::{Browser, Driver, Engine, LOOPBACK_UDP_FLAG};

use crate::support::browser_slot;

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
    // Record every state the page shows from here on.
    b.js("window.__shown = []; new MutationObserver(() => window.__shown.push(document.getElementById('state').textContent)).observe(document.getElementById('state'), {childList: true, characterData: true, subtree: true}); return true").await;
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
    // The page said "reconnecting" while its socket was down, and is back in the call.
    let shown = wait_js(
        &b,
        "B's page to be back in the call",
        "return window.__shown.includes('reconnecting') && document.getElementById('state').textContent === 'in call' && window.__shown",
    )
    .await;
    println!("page B showed, from the drop on: {shown}");
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
    // The page's icon is served (browsers ask for /favicon.ico on every visit).
    for path in ["/favicon.svg", "/favicon.ico"] {
        let r = reqwest::get(format!("{base}{path}")).await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(r.headers()["content-type"], "image/svg+xml", "{path}");
    }
    let p = tempfile::tempdir().unwrap();
    let s = d.browser("C", p.path(), &[]).await;
    // A shared link to a room that does not exist: give a name, press Enter.
    s.go(&format!("{base}/?room=no-such-room")).await;
    s.type_into("#name", "Cleo\u{E007}").await;
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
    s.go(&format!("{base}/?room=pair")).await;
    s.click("#go").await;
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

async fn pc_stats(b: &Browser) -> Value {
    b.js(PC_STATS).await
}

/// A Chromium instance with its own profile and the connection wrapper installed.
async fn person(d: &Driver, label: &str, profile: &tempfile::TempDir, test: Value) -> Browser {
    person_in(d, Engine::Chromium, label, profile, test).await
}

/// A browser of `engine` (Chromium with [`LOOPBACK_UDP_FLAG`], or Firefox with its loopback
/// prefs) with its own profile and the connection wrapper installed.
async fn person_in(
    d: &Driver,
    engine: Engine,
    label: &str,
    profile: &tempfile::TempDir,
    test: Value,
) -> Browser {
    let b = d
        .open_engine(engine, label, profile.path(), &[LOOPBACK_UDP_FLAG])
        .await;
    b.add_init_script(&format!("window.__sbTest = {test};"))
        .await;
    b.add_init_script(PC_WRAPPER).await;
    b
}

/// Media flows: ICE connected, video decoded, and the page says "in call".
fn in_call(v: &Value) -> bool {
    matches!(v["ice"].as_str(), Some("connected" | "completed"))
        && v["frames"].as_u64() > Some(0)
        && v["page"] == "in call"
        && v["pagePath"].is_string()
}

/// The server's own log of TURN allocations ("allocation created", with the client address
/// it saw), captured from `switchboard::turn` at debug level for the whole test binary.
fn turn_log() -> &'static std::sync::Mutex<Vec<u8>> {
    static LOG: std::sync::OnceLock<&'static std::sync::Mutex<Vec<u8>>> =
        std::sync::OnceLock::new();
    LOG.get_or_init(|| {
        let buf: &'static std::sync::Mutex<Vec<u8>> =
            Box::leak(Box::new(std::sync::Mutex::new(Vec::new())));
        struct W(&'static std::sync::Mutex<Vec<u8>>);
        impl std::io::Write for W {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                "switchboard::turn=debug",
            ))
            .with_ansi(false)
            .with_writer(move || W(buf))
            .try_init();
        buf
    })
}

/// Client addresses of the UDP allocations the server logged since `from` (a log offset).
fn udp_allocation_clients(from: usize) -> Vec<String> {
    let log = turn_log().lock().unwrap();
    String::from_utf8_lossy(&log[from.min(log.len())..])
        .lines()
        .filter(|l| l.contains("allocation created") && l.contains("transport=\"udp\""))
        .filter_map(|l| l.split("client=").nth(1))
        .filter_map(|rest| rest.split([' ', '}']).next())
        .map(str::to_string)
        .collect()
}

/// The page may only say "in call" when its connection really is connected.
fn assert_honest(who: &str, v: &Value) {
    if v["page"] == "in call" {
        assert!(
            matches!(v["ice"].as_str(), Some("connected" | "completed")),
            "page {who} says in call while ICE is not connected: {v}"
        );
    }
}

/// Wait until both pages are in a call, checking on every poll that neither page claims more
/// than its connection shows. `Err` carries both pages' last stats.
async fn until_both_in_call(a: &Browser, b: &Browser, budget: Duration) -> Result<(), String> {
    let end = tokio::time::Instant::now() + budget;
    loop {
        let (sa, sb) = tokio::join!(pc_stats(a), pc_stats(b));
        assert_honest("A", &sa);
        assert_honest("B", &sb);
        if in_call(&sa) && in_call(&sb) {
            return Ok(());
        }
        if tokio::time::Instant::now() >= end {
            return Err(format!("A: {sa}\nB: {sb}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A starts a call from the home page by typing a name and clicking; B opens the shared link,
/// types a name and presses Enter. Returns the time from B's Enter until both pages are in the
/// call with video decoded.
async fn ui_call(a: &Browser, b: &Browser, base: &str, query: &str) -> Result<Duration, String> {
    let t0 = ui_start(a, b, base, query).await?;
    until_both_in_call(a, b, Duration::from_secs(20)).await?;
    Ok(t0.elapsed())
}

/// The first part of [`ui_call`]: A starts a call, B opens the link and presses Enter. Returns
/// the moment of B's Enter.
async fn ui_start(
    a: &Browser,
    b: &Browser,
    base: &str,
    query: &str,
) -> Result<std::time::Instant, String> {
    a.go(&format!("{base}/{query}")).await;
    a.type_into("#name", "Ann").await;
    a.click("#go").await;
    let link = match a
        .poll("return window.sbState.link", Duration::from_secs(15))
        .await
    {
        Ok(l) => l,
        Err(v) => {
            return Err(format!(
                "A shows no shared link: {v}; {}",
                pc_stats(a).await
            ))
        }
    };
    let link = link.as_str().unwrap_or_default().to_string();
    b.go(&link).await;
    let button = b.text("#go").await;
    assert_eq!(
        button, "Join the call",
        "a shared link offers one button to join"
    );
    let t0 = std::time::Instant::now();
    b.type_into("#name", "Bob\u{E007}").await;
    Ok(t0)
}

/// Both hang up with the visible button; the camera is released and the page says so.
async fn hang_up(a: &Browser, b: &Browser) {
    for p in [a, b] {
        p.click("#leave").await;
        let v = p
            .poll(
                "return window.sbState.state === 'left the call' && \
                 document.getElementById('local').srcObject === null && window.sb === null",
                Duration::from_secs(5),
            )
            .await;
        assert!(v.is_ok(), "page {} did not hang up: {v:?}", p.label());
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// 20 calls in a row, each between two separate Chromium instances driven through the page:
/// 10 relay-only (TURN over UDP) and 10 default (a direct path). Every one must connect within
/// 20 s with video decoded on both sides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_calls_in_a_row_all_connect() {
    let _slot = browser_slot().await;
    let log_start = turn_log().lock().unwrap().len();
    // TURN over UDP only, so that a relayed call can only take the UDP path.
    let srv = start_with("tcp = false\n", "").await;
    let base = format!("http://{}", srv.http_addr());
    let d = Driver::start().await;
    d.screenshots_on_panic("twenty_calls", async {
        let mut times = Vec::new();
        let mut failures = Vec::new();
        for (batch, query) in [("relay", "?relay=1"), ("default", "")] {
            // A fresh pair of browsers per batch; each call in the batch is a fresh page load.
            let (pa, pb) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
            let a = person(&d, "A", &pa, json!({})).await;
            let b = person(&d, "B", &pb, json!({})).await;
            for i in 1..=10 {
                match ui_call(&a, &b, &base, query).await {
                    Ok(t) => {
                        let (sa, sb) = tokio::join!(pc_stats(&a), pc_stats(&b));
                        println!(
                            "call {batch} {i:2}: connected in {:5} ms; A path {} ({}), B path {} ({})",
                            t.as_millis(),
                            sa["pagePath"],
                            sa["localType"],
                            sb["pagePath"],
                            sb["localType"]
                        );
                        for (who, s) in [("A", &sa), ("B", &sb)] {
                            if batch == "relay" {
                                // TURN over UDP (the server's view of the client is checked
                                // in its log below: Chromium redacts a relay's raddr).
                                assert_eq!(s["localType"], "relay", "{who}: {s}");
                                assert_eq!(s["relayProtocol"], "udp", "{who}: {s}");
                                assert_eq!(s["pagePath"], "relay over UDP", "{who}: {s}");
                            } else {
                                assert_eq!(s["pagePath"], "direct", "{who}: {s}");
                                assert_ne!(s["localType"], "relay", "{who}: {s}");
                            }
                        }
                        times.push(t);
                    }
                    Err(e) => {
                        println!("call {batch} {i:2}: did NOT connect within 20 s\n{e}");
                        d.screenshot_all(&format!("twenty_calls-{batch}-{i}")).await;
                        failures.push(format!("{batch} {i}"));
                    }
                }
                hang_up(&a, &b).await;
            }
            a.quit().await;
            b.quit().await;
        }
        let mut sorted = times.clone();
        sorted.sort();
        if !sorted.is_empty() {
            println!(
                "time to connect over {} calls: p50 {} ms, max {} ms",
                sorted.len(),
                percentile(&sorted, 0.5).as_millis(),
                sorted[sorted.len() - 1].as_millis()
            );
        }
        assert!(failures.is_empty(), "calls that did not connect: {failures:?}");
        // The server saw every browser's UDP allocation come from loopback.
        let clients = udp_allocation_clients(log_start);
        assert!(clients.len() >= 20, "UDP allocations logged: {clients:?}");
        assert!(
            clients.iter().all(|c| c.starts_with("127.0.0.1:")),
            "UDP allocations from outside loopback: {clients:?}"
        );
        println!(
            "server saw {} UDP allocations, all from 127.0.0.1",
            clients.len()
        );
        let m = srv.shared().metrics.render();
        assert!(
            m.lines().any(|l| l
                .starts_with("switchboard_turn_allocations_created_total{transport=\"udp\"}")
                && !l.ends_with(" 0")),
            "{m}"
        );
    })
    .await;
    srv.shutdown();
    srv.wait().await;
}

/// Both pages offer at once at the start of the call (the newcomer does not wait), then both
/// restart ICE at the same moment mid-call: perfect negotiation sorts out both collisions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn glare_both_offer_at_once_and_the_call_connects() {
    let _slot = browser_slot().await;
    let srv = start_with("", "").await;
    let base = format!("http://{}", srv.http_addr());
    let d = Driver::start().await;
    d.screenshots_on_panic("glare", async {
        let (pa, pb) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = person(&d, "A", &pa, json!({})).await;
        let b = person(&d, "B", &pb, json!({})).await;
        let mut glares = 0;
        for i in 1..=3 {
            let t = ui_call(&a, &b, &base, "?relay=1&glare=1")
                .await
                .unwrap_or_else(|e| panic!("glare call {i} did not connect: {e}"));
            let (sa, sb) = tokio::join!(pc_stats(&a), pc_stats(&b));
            // Both made an offer before either saw the other's: a glare. B (polite) went from
            // its own offer to A's (an implicit rollback); A ignored B's offer.
            let first = |v: &Value| v["sdp"][0].as_str().map(str::to_string);
            let glare = first(&sa).as_deref() == Some("local offer")
                && first(&sb).as_deref() == Some("local offer");
            glares += usize::from(glare);
            println!(
                "glare call {i}: connected in {} ms, both offered first: {glare}, signaling A {} B {}, B restarted ICE {} times",
                t.as_millis(),
                sa["sdp"],
                sb["sdp"],
                sb["restarts"]
            );
            if i == 3 {
                // Both restart ICE in the same instant: a real collision mid-call.
                let before = (pc_stats(&a).await["ufrag"].clone(), sb["ufrag"].clone());
                let restart = "for (const p of window.__pcs) if (p.signalingState !== 'closed') p.restartIce(); return true";
                tokio::join!(a.js(restart), b.js(restart));
                let end = tokio::time::Instant::now() + Duration::from_secs(20);
                loop {
                    let (sa, sb) = tokio::join!(pc_stats(&a), pc_stats(&b));
                    if in_call(&sa)
                        && in_call(&sb)
                        && sa["ufrag"] != before.0
                        && sb["ufrag"] != before.1
                        && sa["signaling"] == "stable"
                        && sb["signaling"] == "stable"
                    {
                        break;
                    }
                    assert!(
                        tokio::time::Instant::now() < end,
                        "no call after simultaneous ICE restarts:\nA: {sa}\nB: {sb}"
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            hang_up(&a, &b).await;
        }
        assert!(glares > 0, "no call started with both sides offering");
        a.quit().await;
        b.quit().await;
    })
    .await;
    srv.shutdown();
    srv.wait().await;
}

/// A wrong TURN credential with relay only: the page says in words that the TURN server refused
/// the credentials, gives the camera back, and does not sit in "connecting".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_turn_credential_shows_a_clear_error() {
    let _slot = browser_slot().await;
    let srv = start_with("", "").await;
    let base = format!("http://{}", srv.http_addr());
    let d = Driver::start().await;
    d.screenshots_on_panic("wrong_turn_credential", async {
        let (pa, pb) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = person(&d, "A", &pa, json!({})).await;
        let b = person(&d, "B", &pb, json!({"badTurn": true})).await;
        let r = ui_call(&a, &b, &base, "?relay=1").await;
        assert!(
            r.is_err(),
            "a call with a wrong TURN credential cannot connect"
        );
        let v = b
            .poll(
                "return window.sbState.state === 'error' && window.sbState.error",
                Duration::from_secs(40),
            )
            .await;
        let sb = pc_stats(&b).await;
        assert!(v.is_ok(), "page B shows no error: {sb}");
        let text = b.text("#error").await;
        println!("page B says: {text}");
        assert!(
            text.contains("refused the TURN credentials (401 Unauthorized)"),
            "{text}"
        );
        let cam = b
            .js("return document.getElementById('local').srcObject === null")
            .await;
        assert_eq!(cam, true, "the camera is released after the error");
        a.quit().await;
        b.quit().await;
    })
    .await;
    srv.shutdown();
    srv.wait().await;
}

/// A TCP proxy in front of the server's TURN/TCP listener that the test switches on and off:
/// while off, every connection is closed at once, as a relay that is down would be.
struct RelaySwitch {
    port: u16,
    on: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl RelaySwitch {
    async fn start(target: std::net::SocketAddr, on: bool) -> RelaySwitch {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(on));
        let f = flag.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut c, _)) = l.accept().await {
                if !f.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: the relay is off
                }
                tokio::spawn(async move {
                    if let Ok(mut s) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut c, &mut s).await;
                    }
                });
            }
        });
        RelaySwitch {
            port,
            on: flag,
            task,
        }
    }

    fn set(&self, on: bool) {
        self.on.store(on, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for RelaySwitch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The client's watchdog budget (`GIVE_UP_WITHIN_MS` of clients/js/switchboard.js), read from
/// the page's own module.
async fn give_up_budget(b: &Browser) -> Duration {
    let ms = b
        .js("return (await import('/switchboard.js')).GIVE_UP_WITHIN_MS")
        .await;
    Duration::from_millis(
        ms.as_u64()
            .unwrap_or_else(|| panic!("GIVE_UP_WITHIN_MS: {ms}")),
    )
}

/// A relay-only call with the relay off cannot connect: the watchdogs of both pages restart
/// ICE (both see "no candidate" at the same tick, so both want to restart at once), and both
/// pages must end with the named error within the watchdog's budget, never stuck in
/// "reconnecting" or back at "waiting for a peer".
async fn relay_off_call_ends_with_the_named_error(ea: Engine, eb: Engine) {
    let _slot = browser_slot().await;
    let srv = start_with("udp = false\n", "").await;
    let base = format!("http://{}", srv.http_addr());
    let relay = RelaySwitch::start(srv.bound().tcp[0], false).await;
    let d = Driver::start().await;
    let name = format!("relay_off-{}-{}", ea.name(), eb.name());
    d.screenshots_on_panic(&name, async {
        let (pa, pb) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let test = json!({"turnVia": relay.port});
        let a = person_in(&d, ea, "A", &pa, test.clone()).await;
        let b = person_in(&d, eb, "B", &pb, test).await;
        let t0 = ui_start(&a, &b, &base, "?relay=1")
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let budget = give_up_budget(&a).await;
        let ended = |v: &Value| {
            v["page"] == "error"
                && v["errorText"]
                    .as_str()
                    .is_some_and(|t| t.contains("Could not connect to") && t.contains("ICE restarts"))
        };
        let (mut done_a, mut done_b) = (None, None);
        loop {
            let (sa, sb) = tokio::join!(pc_stats(&a), pc_stats(&b));
            assert_honest("A", &sa);
            assert_honest("B", &sb);
            if done_a.is_none() && ended(&sa) {
                done_a = Some((t0.elapsed(), sa["errorText"].clone()));
            }
            if done_b.is_none() && ended(&sb) {
                done_b = Some((t0.elapsed(), sb["errorText"].clone()));
            }
            if let (Some(ta), Some(tb)) = (&done_a, &done_b) {
                println!("{name}: A ended after {} ms: {}", ta.0.as_millis(), ta.1);
                println!("{name}: B ended after {} ms: {}", tb.0.as_millis(), tb.1);
                break;
            }
            assert!(
                t0.elapsed() < budget,
                "{name}: not both pages ended with the named error within {budget:?}:\nA: {sa}\nB: {sb}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        a.quit().await;
        b.quit().await;
    })
    .await;
    srv.shutdown();
    srv.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_off_chromium_chromium_ends_with_the_named_error() {
    relay_off_call_ends_with_the_named_error(Engine::Chromium, Engine::Chromium).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_off_firefox_chromium_ends_with_the_named_error() {
    relay_off_call_ends_with_the_named_error(Engine::Firefox, Engine::Chromium).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_off_chromium_firefox_ends_with_the_named_error() {
    relay_off_call_ends_with_the_named_error(Engine::Chromium, Engine::Firefox).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_off_firefox_firefox_ends_with_the_named_error() {
    relay_off_call_ends_with_the_named_error(Engine::Firefox, Engine::Firefox).await;
}

/// The relay is down when the call starts and comes back once the watchdog has restarted ICE:
/// the next restart gathers relay candidates and the call connects. (A connection that reached
/// "failed" is replaced by a fresh one rather than ICE-restarted: Firefox's would send no RTP.)
async fn relay_back_during_the_restarts_and_the_call_recovers(ea: Engine, eb: Engine) {
    let _slot = browser_slot().await;
    let srv = start_with("udp = false\n", "").await;
    let base = format!("http://{}", srv.http_addr());
    let relay = RelaySwitch::start(srv.bound().tcp[0], false).await;
    let d = Driver::start().await;
    d.screenshots_on_panic(&format!("relay_back-{}-{}", ea.name(), eb.name()), async {
        let (pa, pb) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let test = json!({"turnVia": relay.port});
        let a = person_in(&d, ea, "A", &pa, test.clone()).await;
        let b = person_in(&d, eb, "B", &pb, test).await;
        let t0 = ui_start(&a, &b, &base, "?relay=1").await.unwrap();
        // Wait for the first ICE restart on either page, then bring the relay back.
        let restarted = "return (window.sbState.restarts || 0) >= 1";
        let end = tokio::time::Instant::now() + Duration::from_secs(30);
        while a.js(restarted).await != true && b.js(restarted).await != true {
            assert!(
                tokio::time::Instant::now() < end,
                "no ICE restart while the relay was off"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        relay.set(true);
        println!("relay back after {} ms", t0.elapsed().as_millis());
        if let Err(e) = until_both_in_call(&a, &b, Duration::from_secs(30)).await {
            let m = srv.shared().metrics.render();
            let turn: Vec<&str> = m
                .lines()
                .filter(|l| l.starts_with("switchboard_turn") && !l.ends_with(" 0"))
                .collect();
            panic!("the call did not recover once the relay was back:\n{e}\nserver: {turn:#?}");
        }
        let (sa, sb) = tokio::join!(pc_stats(&a), pc_stats(&b));
        let made = "return window.__pcs.length";
        let (na, nb) = tokio::join!(a.js(made), b.js(made));
        println!(
            "recovered after {} ms; A {} ({na} connections made) B {} ({nb})",
            t0.elapsed().as_millis(),
            sa["pagePath"],
            sb["pagePath"]
        );
        for s in [&sa, &sb] {
            assert_eq!(s["localType"], "relay", "{s}");
            assert_eq!(s["error"], Value::Null, "{s}");
        }
        a.quit().await;
        b.quit().await;
    })
    .await;
    srv.shutdown();
    srv.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_back_chromium_chromium_recovers() {
    relay_back_during_the_restarts_and_the_call_recovers(Engine::Chromium, Engine::Chromium).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_back_firefox_chromium_recovers() {
    relay_back_during_the_restarts_and_the_call_recovers(Engine::Firefox, Engine::Chromium).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_back_chromium_firefox_recovers() {
    relay_back_during_the_restarts_and_the_call_recovers(Engine::Chromium, Engine::Firefox).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_back_firefox_firefox_recovers() {
    relay_back_during_the_restarts_and_the_call_recovers(Engine::Firefox, Engine::Firefox).await;
}

/// The path the page names, in the words of `clients/js` `path()`, for getStats' selected pair.
fn stats_path(v: &Value) -> String {
    if v["localType"] == "relay" {
        format!(
            "relay over {}",
            v["relayProtocol"].as_str().unwrap_or("udp").to_uppercase()
        )
    } else if v["remoteType"] == "relay" {
        "relay (the other side's)".into()
    } else {
        "direct".into()
    }
}

/// A page's stats once the path it shows agrees with the selected pair (ICE may switch pairs
/// just after connecting, and the page reads its path every 500 ms); at most 5 s.
async fn path_settled(b: &Browser) -> Value {
    let end = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let v = pc_stats(b).await;
        if v["pagePath"] == stats_path(&v) || tokio::time::Instant::now() >= end {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One batch of calls between a browser of engine `.0` (the caller, A) and one of engine `.1`
/// (B), with the page query `.2` ("?relay=1" or ""), `.3` calls in a row.
type Batch = (Engine, Engine, &'static str, usize);

/// Calls in a row through the page, batch by batch, each with a fresh pair of browsers. Every
/// call must connect within 20 s with video decoded on both sides, over the relay with
/// `relay_protocol` when the batch is relay-only, or directly otherwise. Prints the time to
/// connect of each call and the p50 and max.
async fn calls_in_a_row(name: &str, turn: &str, relay_protocol: &str, batches: &[Batch]) {
    let _slot = browser_slot().await;
    let srv = start_with(turn, "").await;
    let base = format!("http://{}", srv.http_addr());
    let d = Driver::start().await;
    let t_all = std::time::Instant::now();
    d.screenshots_on_panic(name, async {
        let mut times = Vec::new();
        let mut failures = Vec::new();
        for &(ea, eb, query, n) in batches {
            let batch = format!(
                "{}->{} {}",
                ea.name(),
                eb.name(),
                if query.is_empty() { "direct" } else { "relay" }
            );
            let (pa, pb) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
            let a = person_in(&d, ea, "A", &pa, json!({})).await;
            let b = person_in(&d, eb, "B", &pb, json!({})).await;
            for i in 1..=n {
                match ui_call(&a, &b, &base, query).await {
                    Ok(t) => {
                        let (sa, sb) = tokio::join!(path_settled(&a), path_settled(&b));
                        println!(
                            "{name} {batch} {i:2}: connected in {:5} ms; A path {} ({}), B path {} ({})",
                            t.as_millis(),
                            sa["pagePath"],
                            sa["localType"],
                            sb["pagePath"],
                            sb["localType"]
                        );
                        for (who, s) in [("A", &sa), ("B", &sb)] {
                            if query.is_empty() {
                                assert_eq!(s["pagePath"], "direct", "{batch} {who}: {s}");
                                assert_ne!(s["localType"], "relay", "{batch} {who}: {s}");
                            } else {
                                assert_eq!(s["localType"], "relay", "{batch} {who}: {s}");
                                assert_eq!(
                                    s["pagePath"],
                                    format!("relay over {}", relay_protocol.to_uppercase()),
                                    "{batch} {who}: {s}"
                                );
                            }
                        }
                        times.push(t);
                    }
                    Err(e) => {
                        println!("{name} {batch} {i:2}: did NOT connect within 20 s\n{e}");
                        d.screenshot_all(&format!("{name}-{i}")).await;
                        failures.push(format!("{batch} {i}"));
                    }
                }
                hang_up(&a, &b).await;
            }
            a.quit().await;
            b.quit().await;
        }
        let mut sorted = times.clone();
        sorted.sort();
        if !sorted.is_empty() {
            println!(
                "{name}: time to connect over {} calls: p50 {} ms, max {} ms; {} s in all",
                sorted.len(),
                percentile(&sorted, 0.5).as_millis(),
                sorted[sorted.len() - 1].as_millis(),
                t_all.elapsed().as_secs()
            );
        }
        assert!(failures.is_empty(), "calls that did not connect: {failures:?}");
    })
    .await;
    srv.shutdown();
    srv.wait().await;
}

/// Firefox ↔ Chromium, both ways round: 10 relay-only calls over TURN/UDP and 10 direct.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firefox_and_chromium_calls_all_connect() {
    use Engine::{Chromium as C, Firefox as F};
    calls_in_a_row(
        "firefox_chromium",
        "tcp = false\n",
        "udp",
        &[
            (F, C, "?relay=1", 5),
            (C, F, "?relay=1", 5),
            (F, C, "", 5),
            (C, F, "", 5),
        ],
    )
    .await;
}

/// Firefox ↔ Firefox: 10 relay-only calls over TURN/UDP and 10 direct.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firefox_and_firefox_calls_all_connect() {
    use Engine::Firefox as F;
    calls_in_a_row(
        "firefox_firefox",
        "tcp = false\n",
        "udp",
        &[(F, F, "?relay=1", 10), (F, F, "", 10)],
    )
    .await;
}

/// Relay-only over `turn:` TCP (the server has no UDP listener): Firefox ↔ Chromium both ways
/// and Firefox ↔ Firefox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firefox_calls_over_turn_tcp() {
    use Engine::{Chromium as C, Firefox as F};
    calls_in_a_row(
        "firefox_tcp",
        "udp = false\n",
        "tcp",
        &[
            (F, C, "?relay=1", 2),
            (C, F, "?relay=1", 2),
            (F, F, "?relay=1", 2),
        ],
    )
    .await;
}

/// The names on a page's tiles and whether each decodes relayed video, e.g.
/// `[["P2#1a2b", true], ...]`, sorted.
const TILES: &str = "return [...document.querySelectorAll('figure.tile')].map((t) => { \
     const s = (window.sbState.tiles || []).find((x) => x.peerId === t.dataset.peer); \
     return [t.querySelector('.name').textContent, \
             !!s && s.framesDecoded > 0 && s.connectionType === 'relay' && s.phase === 'in call', \
             t.querySelector('.path').textContent]; }).sort()";

/// Wait until `page` shows exactly one tile per name in `others`, each decoding relayed video.
async fn until_tiles(page: &Browser, others: &[&str]) -> Value {
    let end = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let v = page.js(TILES).await;
        let tiles = v.as_array().cloned().unwrap_or_default();
        let ok = tiles.len() == others.len()
            && others.iter().all(|n| {
                tiles.iter().any(|t| {
                    t[0].as_str()
                        .is_some_and(|s| s.starts_with(&format!("{n}#")))
                        && t[1] == true
                        && t[2] == "relay over UDP"
                })
            });
        if ok && page.js("return window.sbState.state").await == "in call" {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "page {} does not show {others:?} decoding relayed video: {v}; state {}",
            page.label(),
            page.js("return window.sbState").await
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A group call of four (`?max=4`, relay only), Chromium and Firefox mixed: every page decodes
/// video from the three others, one tile each with the person's name and the path; one person
/// hangs up and every other page drops that tile; a fifth person joins late and everyone sees
/// them. The mute and camera buttons turn the local tracks off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_of_four_mesh_over_the_relay() {
    use Engine::{Chromium as C, Firefox as F};
    let _slot = browser_slot().await;
    let srv = start_with("tcp = false\n", "").await;
    let base = format!("http://{}", srv.http_addr());
    let d = Driver::start().await;
    d.screenshots_on_panic("room_of_four", async {
        let dirs: Vec<_> = (0..5).map(|_| tempfile::tempdir().unwrap()).collect();
        let p1 = person_in(&d, C, "P1", &dirs[0], json!({})).await;
        p1.go(&format!("{base}/?max=4&relay=1&name=P1&auto=1")).await;
        let link = wait_js(&p1, "P1's shared link", "return window.sbState.link").await;
        let link = link.as_str().unwrap().to_string();
        let mut pages = vec![p1];
        for (i, e) in [(2, F), (3, C), (4, F)] {
            let p = person_in(&d, e, &format!("P{i}"), &dirs[i - 1], json!({})).await;
            p.go(&format!("{link}&name=P{i}&auto=1")).await;
            pages.push(p);
        }
        let names = ["P1", "P2", "P3", "P4"];
        for (i, p) in pages.iter().enumerate() {
            let others: Vec<&str> = names.iter().copied().filter(|n| *n != names[i]).collect();
            let v = until_tiles(p, &others).await;
            println!("{} ({}) shows {v}", p.label(), p.engine().name());
        }
        // The toggles: mute and camera off disable the local tracks; on again enables them.
        let p2 = &pages[1];
        p2.click("#mute").await;
        p2.click("#camera").await;
        let off = p2
            .js("const s = document.getElementById('local').srcObject; \
                 return s.getAudioTracks().every((t) => !t.enabled) && s.getVideoTracks().every((t) => !t.enabled) \
                 && document.getElementById('mute').textContent === 'Unmute'")
            .await;
        assert_eq!(off, true, "mute and camera off disable the tracks");
        p2.click("#mute").await;
        p2.click("#camera").await;
        let on = p2
            .js("return document.getElementById('local').srcObject.getTracks().every((t) => t.enabled)")
            .await;
        assert_eq!(on, true, "mute and camera on again enable the tracks");

        // P4 hangs up: the three others drop its tile.
        let p4 = pages.pop().unwrap();
        p4.click("#leave").await;
        wait_js(&p4, "P4 to leave", "return window.sbState.state === 'left the call'").await;
        p4.quit().await;
        for (i, p) in pages.iter().enumerate() {
            let others: Vec<&str> =
                names[..3].iter().copied().filter(|n| *n != names[i]).collect();
            until_tiles(p, &others).await;
        }
        // A fifth person joins late: everyone sees them, and they see everyone.
        let p5 = person_in(&d, F, "P5", &dirs[4], json!({})).await;
        p5.go(&format!("{link}&name=P5&auto=1")).await;
        pages.push(p5);
        let names = ["P1", "P2", "P3", "P5"];
        for (i, p) in pages.iter().enumerate() {
            let others: Vec<&str> = names.iter().copied().filter(|n| *n != names[i]).collect();
            let v = until_tiles(p, &others).await;
            println!("after P4 left and P5 joined, {} shows {v}", p.label());
        }
        for p in pages {
            p.quit().await;
        }
    })
    .await;
    srv.shutdown();
    srv.wait().await;
}
