//! Chromium follows a draining node's 300 Try Alternate (libwebrtc `TurnPort::OnTryAlternate`)
//! in the cluster lab of tests/support/lab/cluster.rs: headless Chromium in a NATed home is given only
//! the draining node's `turn:` URI, relay-only, and gathers a relay candidate on another node.

use crate::support::lab;
use crate::support::webdriver;

use lab::cluster::{metric, Cluster, PUBLIC};
use lab::Host;
use serde_json::json;
use std::time::Duration;
use webdriver::Driver;

/// Gather relay candidates through the TURN server in `arguments[0]`, relay only.
const GATHER: &str = r#"
const [urls, username, credential] = arguments;
window.cands = [];
window.gathered = false;
const pc = new RTCPeerConnection({
  iceServers: [{ urls, username, credential }],
  iceTransportPolicy: "relay",
});
pc.onicecandidate = (e) => {
  if (e.candidate) window.cands.push(e.candidate.candidate);
  else window.gathered = true;
};
pc.onicecandidateerror = (e) => { window.lastError = `${e.errorCode} ${e.errorText} ${e.url}`; };
pc.createDataChannel("probe");
pc.createOffer().then((o) => pc.setLocalDescription(o));
window.pc = pc;
return true;
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chromium_follows_a_draining_nodes_300_to_a_ready_node() {
    let _slot = crate::support::browser_slot().await;
    let Some(mut c) = Cluster::start("cluster_turn_chromium_redirect", "") else {
        return;
    };
    // Node 1 drains, kept running by one allocation of its own.
    let (_, ku, kp) = c.login(1, "keep");
    let mut keep = c.client(PUBLIC[0], &ku, &kp);
    assert_eq!(keep.allocate().await.code(), None);
    c.lab.signal("node1", nix::sys::signal::Signal::SIGTERM);
    c.until(Duration::from_secs(3), "node-1 draining", |c| {
        c.nodes(1)
            .iter()
            .any(|n| n["node"] == "node-1" && n["state"] == "draining")
    });

    let (_, user, pass) = c.login(1, "chromium");
    c.lab.spawn(
        Host::Home1,
        "chromedriver",
        "chromedriver",
        &["--port=9515"],
    );
    let local = c.lab.forward_tcp(Host::Home1, 9515);
    let driver = Driver::attach(&format!("http://{local}")).await;
    let profile = tempfile::tempdir().unwrap();
    let b = driver.browser("home1", profile.path(), &[]).await;
    b.go(&format!("http://{}:8080/livez", PUBLIC[1])).await;
    let urls = json!([format!("turn:{}:3478?transport=udp", PUBLIC[0])]);
    b.js_args(GATHER, json!([urls, user, pass])).await;
    let cand = match b
        .poll(
            "return window.cands.find((c) => c.includes(' typ relay')) || null",
            Duration::from_secs(15),
        )
        .await
    {
        Ok(v) => v.as_str().unwrap_or_default().to_string(),
        Err(_) => {
            let state = b
                .js("return {cands: window.cands, gathered: window.gathered, err: window.lastError || null}")
                .await;
            panic!("Chromium gathered no relay candidate: {state}");
        }
    };
    // candidate:… 1 udp PRIORITY ADDRESS PORT typ relay raddr … rport …
    let addr = cand
        .split_whitespace()
        .nth(4)
        .unwrap_or_default()
        .to_string();
    assert!(
        addr == PUBLIC[1] || addr == PUBLIC[2],
        "relay candidate on a ready node, not the draining one: {cand}"
    );
    let m = c.metrics(0);
    assert!(
        metric(&m, "switchboard_turn_redirects_total{reason=\"draining\"}") >= 1.0,
        "node-1 redirected Chromium: {m}"
    );
    b.quit().await;
}
