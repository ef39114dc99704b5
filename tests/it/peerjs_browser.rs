//! The real `peerjs` npm client (1.5.5, vendored in `web/vendor/peerjs.min.js`) in two
//! headless Chromium instances, through switchboard's PeerJS protocol with session auth: a
//! data connection with 200 messages each way in order, a video call with frames decoded, a
//! relay-only call with the login's TURN credentials, and `reconnect()` after a dropped
//! socket keeping the id.

use serde_json::Value;
use switchboard::{Config, RunningServer, Server};

use crate::support::peerjs_page;
use crate::support::webdriver;
use peerjs_page::{exchange_in_order, wait_js};
use webdriver::{Browser, Driver, LOOPBACK_UDP_FLAG};

use crate::support::browser_slot;

async fn start(turn: &str) -> RunningServer {
    let cfg = Config::from_toml(&format!(
        "[http]\nlisten = \"127.0.0.1:0\"\n[turn]\nlisten = [\"127.0.0.1:0\"]\n{turn}\n\
         [peerjs]\nenabled = true\nauth = \"session\"\n"
    ))
    .expect("valid config");
    Server::new(cfg).start().await.expect("server starts")
}

/// The page as a named person with a fixed PeerJS id; waits for `open`.
async fn page(
    d: &Driver,
    base: &str,
    name: &str,
    id: &str,
    query: &str,
    p: &tempfile::TempDir,
    extra: &[&str],
) -> Browser {
    let b = d.browser(name, p.path(), extra).await;
    b.go(&format!("{base}/peerjs.html?name={name}&id={id}{query}"))
        .await;
    wait_js(
        &b,
        "the peer to open",
        "const s = window.pjState; if (s && s.errors.length) return s.errors; return s && s.open && s.id",
    )
    .await;
    let st = b.js("return window.pjState").await;
    assert_eq!(st["id"], id, "{st}");
    assert_eq!(st["errors"], serde_json::json!([]), "{st}");
    b
}

fn metric(srv: &RunningServer, series: &str) -> f64 {
    srv.shared()
        .metrics
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn frames_decoded(b: &Browser) -> Value {
    wait_js(
        b,
        "decoded video frames",
        "return window.pj.stats('call').then(s => s && s.frames > 0 && s)",
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_chromium_peerjs_clients_exchange_200_messages_each_way_in_order_and_call() {
    let _slot = browser_slot().await;
    let srv = start("udp = true").await;
    let base = format!("http://{}", srv.http_addr());
    let d = Driver::start().await;
    let (pa, pb) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = page(&d, &base, "ann", "alice", "", &pa, &[LOOPBACK_UDP_FLAG]).await;
    let b = page(&d, &base, "bob", "bob", "", &pb, &[LOOPBACK_UDP_FLAG]).await;

    exchange_in_order(&a, &b, "alice", 200).await;
    // The offer, answer and candidates went through switchboard, stamped with src.
    assert!(
        metric(&srv, "switchboard_protocol_messages_total{direction=\"in\",protocol=\"peerjs\",type=\"OFFER\"}") >= 1.0
    );
    assert!(
        metric(&srv, "switchboard_protocol_messages_total{direction=\"in\",protocol=\"peerjs\",type=\"ANSWER\"}") >= 1.0
    );

    // A video call: frames decoded on both sides.
    b.js("return window.pj.call('alice')").await;
    for x in [&a, &b] {
        let s = frames_decoded(x).await;
        assert!(s["frames"].as_u64() > Some(0), "{s}");
    }

    // peer.reconnect() after the signaling socket drops keeps the id (same session user).
    a.js("window.pjPeer.socket._socket.close(); return true")
        .await;
    wait_js(
        &a,
        "the drop to be seen",
        "return window.pjState.open === false",
    )
    .await;
    a.js("window.pjPeer.reconnect(); return true").await;
    wait_js(
        &a,
        "the reconnect",
        "return window.pjState.open === true && window.pjState.id",
    )
    .await;
    assert_eq!(a.js("return window.pjPeer.id").await, "alice");
    // Still reachable under that id: a new data connection from bob opens.
    b.js("return window.pj.connect('alice')").await;
    wait_js(
        &a,
        "a second data connection",
        "return window.pjState.connections >= 2 && window.pjState.dataOpen",
    )
    .await;
    a.quit().await;
    b.quit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_only_peerjs_call_uses_the_logins_turn_credentials() {
    let _slot = browser_slot().await;
    // TURN over TCP only: the browsers' UDP is off, so relaying is the only path.
    let srv = start("udp = false").await;
    let base = format!("http://{}", srv.http_addr());
    let d = Driver::start().await;
    let (pa, pb) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = page(&d, &base, "ann", "alice", "&relay=1", &pa, &[]).await;
    let b = page(&d, &base, "bob", "bob", "&relay=1", &pb, &[]).await;
    b.js("return window.pj.call('alice')").await;
    for x in [&a, &b] {
        let s = frames_decoded(x).await;
        assert_eq!(s["local"], "relay", "{}: {s}", x.label());
    }
    assert!(
        metric(
            &srv,
            "switchboard_turn_allocations_created_total{transport=\"tcp\"}"
        ) >= 2.0
    );
    assert!(
        metric(
            &srv,
            "switchboard_turn_relayed_packets_total{direction=\"to_peer\"}"
        ) > 50.0
    );
    a.quit().await;
    b.quit().await;
}
