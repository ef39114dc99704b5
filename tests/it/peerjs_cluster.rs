//! PeerJS in cluster mode with real processes: two or three switchboard binaries share one
//! redis-server (started on a free port, killed on drop). An id is unique across the nodes,
//! messages between ids on different nodes arrive in order with the server's `src`, `LEAVE`
//! crosses nodes, the holder's token takes an id over on another node (and a sender that knew
//! the old node still reaches it), held messages reach an id that connects on another node, and
//! with Redis away a cross-node message gets `EXPIRE` while local relaying goes on; session ids
//! stay bound to their user across nodes. Last, the
//! real `peerjs` client in two Chromium instances, each served by a different node.

use serde_json::{json, Value};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::ws::{next_within, recv as next, send, Ws};

use crate::support::peerjs_page;
use crate::support::webdriver;
use peerjs_page::{exchange_in_order, wait_js};

use crate::support::redis::Redis;
use webdriver::{free_port, Browser, Driver, LOOPBACK_UDP_FLAG};

/// A switchboard process with PeerJS on, killed on drop.
struct Node {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Node {
    async fn start(redis: &Redis, id: &str) -> Node {
        Node::start_auth(redis, id, "open").await
    }

    /// A node whose `peerjs.auth` is `auth`.
    async fn start_auth(redis: &Redis, id: &str, auth: &str) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("switchboard.toml");
        let port = free_port();
        std::fs::write(
            &cfg,
            format!(
                "[http]\nlisten = \"127.0.0.1:{port}\"\n[turn]\nlisten = [\"127.0.0.1:0\"]\n\
                 [auth]\nsession_keys = [\"cluster-test-session-key-0123456789\"]\n\
                 turn_secrets = [\"cluster-test-turn-secret\"]\n\
                 [signaling]\nmax_connections_per_ip = 5000\nrate_per_sec = 10000\n\
                 rate_burst = 10000\n\
                 [peerjs]\nenabled = true\nauth = \"{auth}\"\nexpire_timeout_secs = 2\n\
                 [cluster]\nredis_url = \"redis://127.0.0.1:{}\"\nnode_id = \"{id}\"\n\
                 lease_ms = 2000\nforward_timeout_ms = 1000\n",
                redis.port
            ),
        )
        .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .arg("--config")
            .arg(&cfg)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("binary starts");
        let n = Node {
            port,
            child,
            _dir: dir,
        };
        let t = Instant::now();
        loop {
            let r = reqwest::get(format!("http://127.0.0.1:{port}/readyz")).await;
            if let Ok(r) = r {
                if r.text().await.ok().as_deref() == Some("ready\n") {
                    return n;
                }
            }
            assert!(t.elapsed() < Duration::from_secs(20), "node becomes ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn connect(&self, id: &str, token: &str) -> Ws {
        let url = format!(
            "ws://127.0.0.1:{}/peerjs/peerjs?key=peerjs&id={id}&token={token}&version=1.5.5",
            self.port
        );
        tokio_tungstenite::connect_async(url)
            .await
            .expect("ws connects")
            .0
    }

    async fn open(&self, id: &str, token: &str) -> Ws {
        let mut ws = self.connect(id, token).await;
        assert_eq!(next(&mut ws).await, json!({"type": "OPEN"}), "{id}");
        ws
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A session token for `user`, signed with the nodes' shared `auth.session_keys` (so any node
/// accepts it), as an app backend holding the key would mint it.
fn session(user: &str) -> String {
    let cfg = switchboard::Config::from_toml(
        "[auth]\nsession_keys = [\"cluster-test-session-key-0123456789\"]\n",
    )
    .expect("valid config");
    switchboard::auth::Auth::new(&cfg.auth)
        .issue_session(user, None, switchboard::auth::unix_now())
        .0
}

fn offer(dst: &str, n: usize) -> Value {
    json!({"type": "OFFER", "dst": dst, "payload": {"n": n, "sdp": "v=0"}})
}

#[tokio::test]
async fn ids_are_unique_across_nodes_and_messages_cross_nodes_in_order() {
    let redis = Redis::start();
    let n1 = Node::start(&redis, "pj1").await;
    let n2 = Node::start(&redis, "pj2").await;
    let mut a = n1.open("alice", "tokA").await;
    // Another token on the other node gets ID-TAKEN.
    let mut x = n2.connect("alice", "tokX").await;
    assert_eq!(next(&mut x).await["type"], "ID-TAKEN");
    assert!(next_within(&mut x, 5).await.is_none(), "ID-TAKEN closes");
    let mut b = n2.open("bob", "tokB").await;

    let t0 = Instant::now();
    for i in 0..200 {
        send(&mut a, offer("bob", i)).await;
    }
    for i in 0..200 {
        let v = next(&mut b).await;
        assert_eq!(v["type"], "OFFER");
        assert_eq!(v["src"], "alice", "the server stamps src");
        assert_eq!(v["dst"], "bob");
        assert_eq!(v["payload"]["n"], i, "in order");
    }
    eprintln!("200 cross-node messages in {:?}", t0.elapsed());
    send(
        &mut b,
        json!({"type": "ANSWER", "dst": "alice", "src": "mallory", "payload": {"sdp": "v=0"}}),
    )
    .await;
    let v = next(&mut a).await;
    assert_eq!((&v["type"], &v["src"]), (&json!("ANSWER"), &json!("bob")));
    // LEAVE crosses nodes too.
    send(&mut a, json!({"type": "LEAVE", "dst": "bob"})).await;
    assert_eq!(
        next(&mut b).await,
        json!({"type": "LEAVE", "src": "alice", "dst": "bob"})
    );
    // Once alice leaves the server, her id is free on the other node.
    send(&mut a, json!({"type": "LEAVE"})).await;
    assert!(next_within(&mut a, 5).await.is_none());
    let t = Instant::now();
    loop {
        let mut y = n2.connect("alice", "tokY").await;
        if next(&mut y).await == json!({"type": "OPEN"}) {
            break;
        }
        // Released at once: well before the claim's lifetime (`lease_ms` = 2 s) runs out.
        assert!(
            t.elapsed() < Duration::from_millis(1000),
            "the id is released"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_holders_token_takes_the_id_over_on_another_node() {
    let redis = Redis::start();
    let n1 = Node::start(&redis, "pj1").await;
    let n2 = Node::start(&redis, "pj2").await;
    let n3 = Node::start(&redis, "pj3").await;
    let mut a1 = n1.open("alice", "tokA").await;
    let mut b = n3.open("bob", "tokB").await;
    // bob's node learns that alice is on node 1.
    send(&mut b, offer("alice", 1)).await;
    assert_eq!(next(&mut a1).await["payload"]["n"], 1);
    // alice reconnects on node 2 with her token: the id moves, node 1 drops her old socket.
    let mut a2 = n2.open("alice", "tokA").await;
    assert!(
        next_within(&mut a1, 5).await.is_none(),
        "the old node closes the socket"
    );
    // bob's node still names node 1: it answers that alice is not there, and the messages
    // reach node 2, in order.
    for i in 2..12 {
        send(&mut b, offer("alice", i)).await;
    }
    for i in 2..12 {
        let v = next(&mut a2).await;
        assert_eq!((&v["src"], &v["payload"]["n"]), (&json!("bob"), &json!(i)));
    }
    // The old socket closing freed nothing, and node 2 refreshes its claim past its lifetime
    // (`lease_ms` = 2 s): another token still gets ID-TAKEN anywhere.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for n in [&n1, &n2, &n3] {
        let mut x = n.connect("alice", "tokX").await;
        assert_eq!(next(&mut x).await["type"], "ID-TAKEN");
    }
}

#[tokio::test]
async fn held_messages_reach_an_id_that_connects_on_another_node_or_expire() {
    let redis = Redis::start();
    let n1 = Node::start(&redis, "pj1").await;
    let n2 = Node::start(&redis, "pj2").await;
    let mut a = n1.open("alice", "tokA").await;
    send(&mut a, offer("carol", 1)).await;
    send(&mut a, offer("carol", 2)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut c = n2.open("carol", "tokC").await;
    for i in 1..=2 {
        let v = next(&mut c).await;
        assert_eq!(
            (&v["src"], &v["payload"]["n"]),
            (&json!("alice"), &json!(i))
        );
    }
    // And afterwards, directly.
    send(&mut a, offer("carol", 3)).await;
    assert_eq!(next(&mut c).await["payload"]["n"], 3);
    // An id that never connects: one EXPIRE after expire_timeout_secs (2 s).
    let t = Instant::now();
    send(&mut a, offer("zed", 1)).await;
    assert_eq!(
        next(&mut a).await,
        json!({"type": "EXPIRE", "src": "zed", "dst": "alice"})
    );
    assert!(
        t.elapsed() >= Duration::from_millis(1900),
        "{:?}",
        t.elapsed()
    );
}

#[tokio::test]
async fn without_redis_local_relaying_goes_on_and_cross_node_messages_expire() {
    let mut redis = Redis::start();
    let n1 = Node::start(&redis, "pj1").await;
    let n2 = Node::start(&redis, "pj2").await;
    let mut a = n1.open("alice", "tokA").await;
    let mut b = n2.open("bob", "tokB").await;
    let mut c = n1.open("carol", "tokC").await;
    send(&mut a, offer("bob", 1)).await;
    assert_eq!(next(&mut b).await["payload"]["n"], 1);
    redis.stop();
    // The nodes notice within their probe's silence bound (2 s).
    tokio::time::sleep(Duration::from_millis(3000)).await;
    send(&mut a, offer("bob", 2)).await;
    assert_eq!(
        next(&mut a).await,
        json!({"type": "EXPIRE", "src": "bob", "dst": "alice"})
    );
    // Local ids still talk, and new ids still register on a node.
    send(&mut a, offer("carol", 3)).await;
    assert_eq!(next(&mut c).await["payload"]["n"], 3);
    let mut d = n1.open("dave", "tokD").await;
    send(&mut d, offer("carol", 4)).await;
    let v = next(&mut c).await;
    assert_eq!((&v["src"], &v["payload"]["n"]), (&json!("dave"), &json!(4)));
}

#[tokio::test]
async fn session_ids_are_bound_to_their_user_across_nodes() {
    let redis = Redis::start();
    let n1 = Node::start_auth(&redis, "pj1", "session").await;
    let n2 = Node::start_auth(&redis, "pj2", "session").await;
    let ann1 = session("ann");
    let mut a1 = n1.open("ann-phone", &ann1).await;
    // Another user, on the other node: ID-TAKEN.
    let bob = session("bob");
    let mut x = n2.connect("ann-phone", &bob).await;
    assert_eq!(next(&mut x).await["type"], "ID-TAKEN");
    // Ann with another session token, on the other node: takes it over.
    let ann2 = session("ann");
    let mut a2 = n2.open("ann-phone", &ann2).await;
    assert!(
        next_within(&mut a1, 5).await.is_none(),
        "node 1 drops ann's old socket"
    );
    // Ann's socket drops: the id stays reserved for her, on every node.
    a2.close(None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let bob1 = session("bob");
    let mut y = n1.connect("ann-phone", &bob1).await;
    assert_eq!(next(&mut y).await["type"], "ID-TAKEN");
    let ann3 = session("ann");
    let _a3 = n1.open("ann-phone", &ann3).await;
}

/// The PeerJS demo page of `node` as `name` with the fixed id `id`; waits for `open`.
async fn page(d: &Driver, node: &Node, name: &str, id: &str, p: &tempfile::TempDir) -> Browser {
    let b = d.browser(name, p.path(), &[LOOPBACK_UDP_FLAG]).await;
    b.go(&format!(
        "http://127.0.0.1:{}/peerjs.html?name={name}&id={id}",
        node.port
    ))
    .await;
    wait_js(
        &b,
        "the peer to open",
        "const s = window.pjState; if (s && s.errors.length) return s.errors; return s && s.open && s.id",
    )
    .await;
    assert_eq!(b.js("return window.pjState.id").await, id);
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_chromium_peerjs_clients_on_different_nodes_connect_and_exchange_messages() {
    let _slot = crate::support::browser_slot().await;
    let redis = Redis::start();
    let n1 = Node::start_auth(&redis, "pj1", "session").await;
    let n2 = Node::start_auth(&redis, "pj2", "session").await;
    let d = Driver::start().await;
    let (pa, pb) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = page(&d, &n1, "ann", "alice", &pa).await;
    let b = page(&d, &n2, "bob", "bob", &pb).await;
    // bob (node 2) opens a data connection to alice (node 1): the offer, answer and
    // candidates cross the nodes through Redis.
    exchange_in_order(&a, &b, "alice", 200).await;
    a.quit().await;
    b.quit().await;
}
