//! Cluster mode with real processes: three switchboard binaries share one redis-server
//! (Debian's, started on a free port with its own directory and killed on drop). Cross-node
//! calls, the owner's death, a drain, a reconnect storm, a Redis outage with an empty restart,
//! an owner cut off from Redis by a black-holing proxy while its room moves and closes, two
//! processes under one node id, the lease scripts themselves, and two Chromium pages, each
//! served by a different node, in one call through the relay.

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

use crate::support::webdriver;

use crate::support::redis::Redis;
use webdriver::free_port;

/// A node's configuration file, in a directory of its own.
fn node_config(
    url: &str,
    id: &str,
    port: u16,
    http: &str,
    turn: &str,
    sig: &str,
) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("switchboard.toml");
    std::fs::write(
        &cfg,
        format!(
            "[http]\nlisten = \"127.0.0.1:{port}\"\n{http}\n[turn]\nlisten = [\"127.0.0.1:0\"]\n{turn}\n\
             [auth]\nsession_keys = [\"cluster-test-session-key-0123456789\"]\n\
             turn_secrets = [\"cluster-test-turn-secret\"]\nlogin_rate_per_minute = 100000\n\
             [signaling]\nmax_connections_per_ip = 5000\n{sig}\n\
             [cluster]\nredis_url = \"{url}\"\nnode_id = \"{id}\"\nlease_ms = 2000\n\
             forward_timeout_ms = 1000\n"
        ),
    )
    .unwrap();
    (dir, cfg)
}

/// A switchboard process, killed on drop.
struct Node {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Node {
    fn start(redis: &Redis, id: &str) -> Node {
        Node::start_with(redis, id, free_port(), "", "")
    }

    /// A node on `port`, with extra keys for its `[http]` and `[turn]` sections.
    fn start_with(redis: &Redis, id: &str, port: u16, http: &str, turn: &str) -> Node {
        Node::start_at(&redis.url(), id, port, http, turn, "")
    }

    /// A node reaching Redis at `url`, with extra keys for its `[http]`, `[turn]` and
    /// `[signaling]` sections.
    fn start_at(url: &str, id: &str, port: u16, http: &str, turn: &str, sig: &str) -> Node {
        let (dir, cfg) = node_config(url, id, port, http, turn, sig);
        let child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .arg("--config")
            .arg(&cfg)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("binary starts");
        Node {
            port,
            child,
            _dir: dir,
        }
    }

    /// SIGTERM: the node drains.
    fn term(&self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    }

    /// Wait for the process to exit by itself.
    async fn exited(&mut self, within: Duration) -> std::process::ExitStatus {
        let t = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(t.elapsed() < within, "node exits within {within:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    async fn readyz(&self) -> Option<String> {
        let r = reqwest::get(format!("http://127.0.0.1:{}/readyz", self.port))
            .await
            .ok()?;
        r.text().await.ok()
    }

    /// Wait until the node is ready and its cluster link is up.
    async fn wait_up(&self) {
        let t = Instant::now();
        loop {
            if self.readyz().await.as_deref() == Some("ready\n") {
                return;
            }
            assert!(t.elapsed() < Duration::from_secs(20), "node becomes ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn metric(&self, series: &str) -> f64 {
        let text = reqwest::get(format!("http://127.0.0.1:{}/metrics", self.port))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn login(node: &Node, user: &str) -> String {
    crate::support::http::login_token(([127, 0, 0, 1], node.port).into(), user).await
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

/// Next JSON frame (pings and ice-servers skipped); `None` when the socket closed.
async fn next(ws: &mut Ws) -> Option<Value> {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a frame within 10 s");
        match m {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["type"] != "ice-servers" {
                    return Some(v);
                }
            }
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
            _ => continue,
        }
    }
}

async fn recv(ws: &mut Ws) -> Value {
    next(ws).await.expect("socket open")
}

async fn hello(node: &Node, token: &str) -> Ws {
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{}/v1/ws", node.port))
            .await
            .expect("ws connects");
    send(&mut ws, json!({"type": "hello", "token": token})).await;
    let w = recv(&mut ws).await;
    assert_eq!(w["type"], "welcome", "{w}");
    ws
}

/// A peer: its socket, resume token, id, and the last seq it saw.
struct Peer {
    ws: Ws,
    token: String,
    resume: String,
    id: String,
    last: u64,
}

impl Peer {
    async fn recv(&mut self) -> Value {
        let v = recv(&mut self.ws).await;
        if let Some(s) = v["seq"].as_u64() {
            assert!(s > self.last, "seq goes up: {s} after {}: {v}", self.last);
            self.last = s;
        }
        v
    }

    async fn recv_type(&mut self, ty: &str) -> Value {
        loop {
            let v = self.recv().await;
            if v["type"] == ty {
                return v;
            }
        }
    }

    /// Resume on `node`, retrying while the cluster answers `cluster_unavailable`.
    async fn resume(&mut self, node: &Node, within: Duration) -> Value {
        let t = Instant::now();
        loop {
            let mut ws = hello(node, &self.token).await;
            send(
                &mut ws,
                json!({"type": "resume", "resumeToken": self.resume, "lastSeq": self.last, "id": "r"}),
            )
            .await;
            let v = next(&mut ws).await;
            match v {
                Some(v) if v["type"] == "resumed" => {
                    assert_eq!(v["id"], "r");
                    assert_eq!(v["peerId"], self.id.as_str());
                    self.ws = ws;
                    return v;
                }
                Some(v) if v["code"] == "cluster_unavailable" => {}
                other => panic!("resume failed: {other:?}"),
            }
            assert!(t.elapsed() < within, "resumed within {within:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Wait until the server closes this socket.
    async fn closed(&mut self) {
        while next(&mut self.ws).await.is_some() {}
    }

    /// Wait until the server closes this socket; its close code.
    async fn close_code(&mut self) -> Option<u16> {
        loop {
            let m = tokio::time::timeout(Duration::from_secs(10), self.ws.next())
                .await
                .expect("closed within 10 s");
            match m {
                Some(Ok(Message::Close(c))) => return c.map(|c| u16::from(c.code)),
                None | Some(Err(_)) => return None,
                _ => {}
            }
        }
    }
}

async fn create(node: &Node, user: &str) -> (Peer, String) {
    let token = login(node, user).await;
    let mut ws = hello(node, &token).await;
    send(&mut ws, json!({"type": "create", "id": "c"})).await;
    let v = recv(&mut ws).await;
    assert_eq!(v["type"], "created", "{v}");
    let room = v["room"].as_str().unwrap().to_string();
    let p = join_ws(ws, token, &room).await;
    (p, room)
}

async fn join_ws(mut ws: Ws, token: String, room: &str) -> Peer {
    send(&mut ws, json!({"type": "join", "room": room, "id": "j"})).await;
    let v = recv(&mut ws).await;
    assert_eq!(v["type"], "joined", "{v}");
    assert_eq!(v["id"], "j");
    Peer {
        ws,
        token,
        resume: v["resumeToken"].as_str().unwrap().to_string(),
        id: v["peerId"].as_str().unwrap().to_string(),
        last: 0,
    }
}

async fn join(node: &Node, user: &str, room: &str) -> (Peer, Value) {
    let token = login(node, user).await;
    let mut ws = hello(node, &token).await;
    send(&mut ws, json!({"type": "join", "room": room, "id": "j"})).await;
    let v = recv(&mut ws).await;
    assert_eq!(v["type"], "joined", "{v}");
    let p = Peer {
        ws,
        token,
        resume: v["resumeToken"].as_str().unwrap().to_string(),
        id: v["peerId"].as_str().unwrap().to_string(),
        last: 0,
    };
    (p, v)
}

/// `n` signals each way, in order, with the right `from`.
async fn exchange(a: &mut Peer, b: &mut Peer, n: u64, tag: &str) {
    for i in 0..n {
        send(
            &mut a.ws,
            json!({"type": "signal", "to": b.id, "data": {"tag": tag, "n": i}}),
        )
        .await;
        send(
            &mut b.ws,
            json!({"type": "signal", "to": a.id, "data": {"tag": tag, "n": i}}),
        )
        .await;
    }
    let (aid, bid) = (a.id.clone(), b.id.clone());
    for (x, from) in [(&mut *a, bid), (&mut *b, aid)] {
        let mut want = 0;
        while want < n {
            let v = x.recv().await;
            if v["type"] != "signal" {
                continue;
            }
            assert_eq!(v["from"], from.as_str(), "{v}");
            assert_eq!(v["data"]["tag"], tag, "{v}");
            assert_eq!(v["data"]["n"], want, "in order, none lost or repeated: {v}");
            want += 1;
        }
    }
}

async fn three_nodes(redis: &Redis) -> Vec<Node> {
    let nodes: Vec<Node> = (1..=3)
        .map(|i| Node::start(redis, &format!("n{i}")))
        .collect();
    for n in &nodes {
        n.wait_up().await;
    }
    nodes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_on_different_nodes_signal_in_order_with_roles() {
    let redis = Redis::start();
    let nodes = three_nodes(&redis).await;
    let (mut a, room) = create(&nodes[0], "alice").await;
    let (mut b, joined) = join(&nodes[1], "bob", &room).await;
    let peers = joined["peers"].as_array().unwrap();
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0]["peerId"], a.id.as_str());
    assert_eq!(peers[0]["polite"], true, "the newcomer is polite");
    let pj = a.recv_type("peer-joined").await;
    assert_eq!(pj["peerId"], b.id.as_str());
    assert_eq!(pj["polite"], false, "the earlier peer is impolite");
    exchange(&mut a, &mut b, 50, "x").await;

    // A third peer on the third node: everyone hears of it, broadcasts reach everyone.
    let (mut c, joined) = join(&nodes[2], "carol", &room).await;
    assert_eq!(joined["peers"].as_array().unwrap().len(), 2);
    a.recv_type("peer-joined").await;
    b.recv_type("peer-joined").await;
    send(
        &mut c.ws,
        json!({"type": "signal", "data": "hi all", "id": 5}),
    )
    .await;
    let ack = c.recv_type("ack").await;
    assert_eq!(ack["id"], 5);
    for p in [&mut a, &mut b] {
        let v = p.recv_type("signal").await;
        assert_eq!(v["from"], c.id.as_str());
        assert_eq!(v["data"], "hi all");
    }
    // Errors from the owner come back typed, with the request id.
    send(
        &mut b.ws,
        json!({"type": "signal", "to": "nobody", "data": 1, "id": "e"}),
    )
    .await;
    let e = b.recv_type("error").await;
    assert_eq!(e["code"], "unknown_peer");
    assert_eq!(e["id"], "e");
    // A room that exists nowhere, asked on a node that is not its owner.
    let t = login(&nodes[2], "dave").await;
    let mut d = hello(&nodes[2], &t).await;
    send(
        &mut d,
        json!({"type": "join", "room": "no-such-room", "id": 1}),
    )
    .await;
    assert_eq!(recv(&mut d).await["code"], "unknown_room");
    // The same name cannot be created on two nodes.
    send(&mut d, json!({"type": "create", "name": room, "id": 2})).await;
    assert_eq!(recv(&mut d).await["code"], "room_exists");

    // Leaving through the edge reaches the owner.
    send(&mut c.ws, json!({"type": "leave", "id": "l"})).await;
    assert_eq!(c.recv_type("left").await["id"], "l");
    let left = a.recv_type("peer-left").await;
    assert_eq!(left["peerId"], c.id.as_str());
    assert_eq!(
        nodes[0].metric("switchboard_cluster_rooms_owned").await,
        1.0
    );
    assert!(
        nodes[1]
            .metric("switchboard_cluster_bus_messages_total{direction=\"publish\"}")
            .await
            >= 50.0
    );
    assert!(
        nodes[1]
            .metric("switchboard_cluster_forward_seconds_count")
            .await
            >= 1.0
    );
    assert_eq!(nodes[0].metric("switchboard_cluster_redis_up").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_killed_peers_resume_on_survivors() {
    let redis = Redis::start();
    let mut nodes = three_nodes(&redis).await;
    let (mut a, room) = create(&nodes[0], "alice").await;
    let (mut b, _) = join(&nodes[1], "bob", &room).await;
    a.recv_type("peer-joined").await;
    exchange(&mut a, &mut b, 10, "before").await;

    let t0 = Instant::now();
    nodes[0].kill();
    // B's node notices that the room's lease ran out and closes B's socket, so B resumes.
    b.closed().await;
    let rb = b.resume(&nodes[1], Duration::from_secs(15)).await;
    // A's socket died with its node; A resumes on the third node.
    let ra = a.resume(&nodes[2], Duration::from_secs(15)).await;
    let took = t0.elapsed();
    eprintln!("owner SIGKILL: both peers resumed after {took:?}");
    for r in [&ra, &rb] {
        assert_eq!(r["room"], room.as_str());
    }
    assert_eq!(
        rb["peers"][0]["peerId"],
        a.id.as_str(),
        "the new owner knows A: {rb}"
    );
    assert_eq!(ra["peers"][0]["peerId"], b.id.as_str());
    exchange(&mut a, &mut b, 10, "after").await;
    assert!(took < Duration::from_secs(15));
    let owned = nodes[1].metric("switchboard_cluster_rooms_owned").await
        + nodes[2].metric("switchboard_cluster_rooms_owned").await;
    assert_eq!(owned, 1.0, "exactly one survivor owns the room");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_keeps_local_rooms_and_cross_node_rooms_recover() {
    let mut redis = Redis::start();
    let nodes = three_nodes(&redis).await;
    // A local room: both peers on node 3.
    let (mut c, local) = create(&nodes[2], "carol").await;
    let (mut d, _) = join(&nodes[2], "dave", &local).await;
    c.recv_type("peer-joined").await;
    // A cross-node room.
    let (mut a, room) = create(&nodes[0], "alice").await;
    let (mut b, _) = join(&nodes[1], "bob", &room).await;
    a.recv_type("peer-joined").await;
    exchange(&mut a, &mut b, 5, "before").await;

    redis.stop();
    // The node notices within a few seconds and says so.
    let t = Instant::now();
    loop {
        let body = nodes[2].readyz().await.unwrap_or_default();
        if body.contains("degraded") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "readyz reports degraded: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(nodes[2].metric("switchboard_cluster_redis_up").await, 0.0);
    // The local room works throughout the outage.
    for round in 0..5 {
        exchange(&mut c, &mut d, 5, &format!("outage{round}")).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The cross-node seat is closed so that B resumes; meanwhile that is refused, typed.
    b.closed().await;
    let mut ws = hello(&nodes[1], &b.token).await;
    send(
        &mut ws,
        json!({"type": "resume", "resumeToken": b.resume, "lastSeq": b.last}),
    )
    .await;
    assert_eq!(recv(&mut ws).await["code"], "cluster_unavailable");
    let mut e = hello(&nodes[1], &b.token).await;
    send(&mut e, json!({"type": "create", "id": 1})).await;
    assert_eq!(recv(&mut e).await["code"], "cluster_unavailable");

    // Redis comes back empty: nodes re-register their rooms, B resumes, the call goes on.
    redis.restart();
    for n in &nodes {
        n.wait_up().await;
    }
    b.resume(&nodes[1], Duration::from_secs(15)).await;
    exchange(&mut a, &mut b, 5, "after").await;
    exchange(&mut c, &mut d, 5, "after").await;
    assert!(
        nodes[0]
            .metric("switchboard_cluster_ownership_changes_total{event=\"reacquired\"}")
            .await
            >= 1.0
    );
    // The re-registered room is reachable from a node that never held it.
    let (_e, j) = join(&nodes[2], "erin", &room).await;
    assert_eq!(j["peers"].as_array().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drained_owner_hands_its_rooms_over() {
    let redis = Redis::start();
    let mut nodes = three_nodes(&redis).await;
    let (mut a, room) = create(&nodes[0], "alice").await;
    let (mut b, _) = join(&nodes[1], "bob", &room).await;
    a.recv_type("peer-joined").await;
    exchange(&mut a, &mut b, 10, "before").await;

    let t0 = Instant::now();
    nodes[0].term();
    // Both sockets are closed with 4004 (the room moved), the owner's own and the remote one.
    assert_eq!(a.close_code().await, Some(4004));
    assert_eq!(b.close_code().await, Some(4004));
    let rb = b.resume(&nodes[1], Duration::from_secs(10)).await;
    let ra = a.resume(&nodes[2], Duration::from_secs(10)).await;
    eprintln!("drain: both peers resumed after {:?}", t0.elapsed());
    assert_eq!(rb["peers"][0]["peerId"], a.id.as_str(), "{rb}");
    assert_eq!(ra["peers"][0]["peerId"], b.id.as_str(), "{ra}");
    assert_eq!(ra["peers"].as_array().unwrap().len(), 1);
    exchange(&mut a, &mut b, 10, "after").await;
    // Handed over, not expired: well inside the lease time plus a resume.
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    let st = nodes[0].exited(Duration::from_secs(15)).await;
    assert!(st.success(), "a drained node exits 0: {st:?}");
    let owned = nodes[1].metric("switchboard_cluster_rooms_owned").await
        + nodes[2].metric("switchboard_cluster_rooms_owned").await;
    assert_eq!(owned, 1.0, "one survivor owns the room");
    assert!(
        nodes[1]
            .metric("switchboard_cluster_ownership_changes_total{event=\"takeover\"}")
            .await
            + nodes[2]
                .metric("switchboard_cluster_ownership_changes_total{event=\"takeover\"}")
                .await
            >= 1.0
    );
}

/// A peer of the storm, checking strictly everything it receives.
struct StormPeer {
    ws: Option<Ws>,
    token: String,
    resume: String,
    id: String,
    /// Last `seq` received.
    last: u64,
    /// Signals sent so far (each carries its number).
    sent: u64,
    /// Next signal number expected from the partner.
    want: u64,
    partner: String,
}

impl StormPeer {
    fn new(p: Peer, partner: String) -> StormPeer {
        StormPeer {
            ws: Some(p.ws),
            token: p.token,
            resume: p.resume,
            id: p.id,
            last: p.last,
            sent: 0,
            want: 0,
            partner,
        }
    }

    fn ws(&mut self) -> &mut Ws {
        self.ws.as_mut().expect("connected")
    }

    /// Next frame: its `seq` must be exactly one more than the last (none lost or repeated);
    /// a signal must be the partner's next one (in order, none lost or repeated).
    async fn recv(&mut self) -> Value {
        let v = recv(self.ws()).await;
        if let Some(s) = v["seq"].as_u64() {
            assert_eq!(s, self.last + 1, "contiguous seq for {}: {v}", self.id);
            self.last = s;
        }
        if v["type"] == "signal" {
            assert_eq!(v["from"], self.partner.as_str(), "{v}");
            assert_eq!(
                v["data"]["n"], self.want,
                "in order, none lost or repeated: {v}"
            );
            self.want += 1;
        }
        assert_ne!(v["type"], "peer-left", "nobody leaves: {v}");
        assert_ne!(v["type"], "error", "{v}");
        v
    }

    /// Send `n` signals to the partner, the last with an id, and read until its ack: the
    /// owner has relayed all of them.
    async fn burst(&mut self, n: u64) {
        for k in 0..n {
            let mut m = json!({"type": "signal", "to": self.partner, "data": {"n": self.sent}});
            if k + 1 == n {
                m["id"] = json!("sync");
            }
            self.sent += 1;
            send(self.ws(), m).await;
        }
        while self.recv().await["type"] != "ack" {}
    }

    /// Read until every signal the partner sent has arrived.
    async fn drain(&mut self, partner_sent: u64) {
        while self.want < partner_sent {
            self.recv().await;
        }
    }

    /// Resume on `node`; the roster must be exactly the partner, and nothing may be missing.
    /// The number of frames replayed.
    async fn resume(&mut self, node: &Node) -> u64 {
        let mut ws = hello(node, &self.token).await;
        send(
            &mut ws,
            json!({"type": "resume", "resumeToken": self.resume, "lastSeq": self.last, "id": "r"}),
        )
        .await;
        self.ws = Some(ws);
        let v = loop {
            let v = recv(self.ws()).await;
            if v["type"] == "resumed" {
                break v;
            }
            assert!(v.get("seq").is_none(), "nothing before resumed: {v}");
        };
        assert_eq!(v["peerId"], self.id.as_str(), "{v}");
        assert_eq!(v["complete"], true, "no frame lost: {v}");
        let peers: Vec<&str> = v["peers"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p["peerId"].as_str())
            .collect();
        assert_eq!(peers, [self.partner.as_str()], "exact roster: {v}");
        v["replayed"].as_u64().unwrap()
    }
}

async fn storm_room(
    nodes: &[Node],
    i: usize,
    owner: usize,
    other: usize,
) -> (StormPeer, StormPeer) {
    let (a, room) = create(&nodes[owner], &format!("sa{i}")).await;
    let (b, _) = join(&nodes[other], &format!("sb{i}"), &room).await;
    let (aid, bid) = (a.id.clone(), b.id.clone());
    let mut a = StormPeer::new(a, bid);
    let b = StormPeer::new(b, aid);
    while a.recv().await["type"] != "peer-joined" {}
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_storm_across_nodes_loses_nothing_and_leaves_no_ghosts() {
    use futures_util::future::join_all;
    use rand::Rng;
    const ROOMS: usize = 200;
    let redis = Redis::start();
    let nodes = three_nodes(&redis).await;
    let t0 = Instant::now();
    let mut rng = rand::rng();
    // Owners spread over the nodes; the second peer on another node in two rooms of three.
    let placement: Vec<(usize, usize)> = (0..ROOMS)
        .map(|i| (i % 3, (i + rng.random_range(0..3)) % 3))
        .collect();
    let mut rooms: Vec<(StormPeer, StormPeer)> = join_all(
        placement
            .iter()
            .enumerate()
            .map(|(i, &(o, e))| storm_room(&nodes, i, o, e)),
    )
    .await;
    // Traffic both ways; then one side of each room sends more that the other has not read
    // when its socket drops, so that the resume must replay it.
    join_all(rooms.iter_mut().enumerate().map(|(i, (a, b))| async move {
        a.burst(10).await;
        b.burst(10).await;
        a.drain(b.sent).await;
        b.drain(a.sent).await;
        let x = if i % 2 == 0 { a } else { b };
        x.burst(8).await;
    }))
    .await;
    eprintln!(
        "storm: {ROOMS} rooms across 3 nodes set up in {:?}",
        t0.elapsed()
    );

    // Every socket drops at once, without a close frame; each peer resumes on a random node.
    let t1 = Instant::now();
    for (a, b) in rooms.iter_mut() {
        drop(a.ws.take());
        drop(b.ws.take());
    }
    let targets: Vec<(usize, usize)> = (0..ROOMS)
        .map(|_| (rng.random_range(0..3), rng.random_range(0..3)))
        .collect();
    let replayed: u64 = join_all(
        rooms
            .iter_mut()
            .zip(&targets)
            .flat_map(|((a, b), &(na, nb))| [a.resume(&nodes[na]), b.resume(&nodes[nb])]),
    )
    .await
    .iter()
    .sum();
    let remote = placement
        .iter()
        .zip(&targets)
        .map(|(&(o, _), &(na, nb))| usize::from(na != o) + usize::from(nb != o))
        .sum::<usize>();
    eprintln!(
        "storm: {} sockets resumed in {:?} ({remote} on a node that does not own the room), \
         {replayed} frames replayed",
        2 * ROOMS,
        t1.elapsed()
    );
    // At least the 8 signals of each room that were never read came back.
    assert!(replayed >= 8 * ROOMS as u64, "{replayed}");

    // The calls go on: everything sent before and after the storm arrives exactly once, in
    // order, with contiguous seq.
    join_all(rooms.iter_mut().map(|(a, b)| async move {
        a.burst(5).await;
        b.burst(5).await;
        a.drain(b.sent).await;
        b.drain(a.sent).await;
    }))
    .await;

    // No ghosts: a newcomer in each room, on a random node, finds exactly the two peers.
    let watchers: Vec<usize> = (0..ROOMS).map(|_| rng.random_range(0..3)).collect();
    let rosters = join_all(
        rooms
            .iter()
            .zip(&watchers)
            .enumerate()
            .map(|(i, ((a, b), &n))| {
                let room = a.resume.rsplit_once('.').unwrap().0.to_string();
                let nodes = &nodes;
                async move {
                    let (_w, j) = join(&nodes[n], &format!("sw{i}"), &room).await;
                    let mut got: Vec<String> = j["peers"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|p| p["peerId"].as_str().unwrap().to_string())
                        .collect();
                    got.sort();
                    let mut want = vec![a.id.clone(), b.id.clone()];
                    want.sort();
                    assert_eq!(got, want, "exact roster in {room}");
                }
            }),
    )
    .await;
    assert_eq!(rosters.len(), ROOMS);
    let owned: f64 = join_all(
        nodes
            .iter()
            .map(|n| n.metric("switchboard_cluster_rooms_owned")),
    )
    .await
    .iter()
    .sum();
    assert_eq!(owned, ROOMS as f64, "every room still has one owner");
    eprintln!("storm: done in {:?}", t0.elapsed());
    assert!(t0.elapsed() < Duration::from_secs(60));
}

/// Poll a page's state until `pred` holds (60 s for slow CI machines).
async fn page_state(b: &webdriver::Browser, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    for _ in 0..240 {
        last = b.js("return window.sbState || {}").await;
        if pred(&last) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("timed out waiting for {what}; last page state: {last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsers_on_different_nodes_call_through_the_relay() {
    let _slot = crate::support::browser_slot().await;
    let redis = Redis::start();
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    // Each page is served by its own node and opens its socket there: every node allows the
    // origins of all of them (as behind one Service with per-node names).
    let origins = ports
        .iter()
        .map(|p| format!("\"http://127.0.0.1:{p}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let http = format!("allowed_origins = [{origins}]");
    // TURN over TCP; the peer of each relay is the other node's relay on loopback.
    let turn = "udp = false\nallow_peers = [\"127.0.0.1/32\"]";
    let nodes: Vec<Node> = ports
        .iter()
        .enumerate()
        .map(|(i, &p)| Node::start_with(&redis, &format!("n{}", i + 1), p, &http, turn))
        .collect();
    for n in &nodes {
        n.wait_up().await;
    }
    let base = |i: usize| format!("http://127.0.0.1:{}", nodes[i].port);
    let d = webdriver::Driver::start().await;
    let (pa, pb) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = d.browser("A", pa.path(), &[]).await;
    a.go(&format!("{}/?name=A&auto=1&relay=1", base(0))).await;
    let st = page_state(&a, "A to create a room on node 1", |v| {
        v["room"].is_string()
    })
    .await;
    let room = st["room"].as_str().unwrap().to_string();
    let b = d.browser("B", pb.path(), &[]).await;
    b.go(&format!("{}/?name=B&auto=1&relay=1&room={room}", base(1)))
        .await;
    for (p, who) in [(&b, "B"), (&a, "A")] {
        let v = page_state(
            p,
            &format!("{who} to decode video through the relay"),
            |v| v["connectionType"] == "relay" && v["framesDecoded"].as_u64().unwrap_or(0) > 0,
        )
        .await;
        assert_eq!(v["error"], Value::Null, "{who}: {v}");
    }
    // The data channel crosses too.
    assert_eq!(
        b.js("return window.sb.sendMessage('hello from B')").await,
        1
    );
    page_state(&a, "A to get B's data-channel message", |v| {
        v["messages"]
            .as_array()
            .is_some_and(|m| m.iter().any(|x| x == "hello from B"))
    })
    .await;
    // Signaling really crossed nodes, and each page relayed through its own node.
    assert!(
        nodes[1]
            .metric("switchboard_cluster_forward_seconds_count")
            .await
            >= 1.0
    );
    assert_eq!(
        nodes[0].metric("switchboard_cluster_rooms_owned").await,
        1.0
    );
    for n in &nodes[..2] {
        assert!(
            n.metric("switchboard_turn_relayed_packets_total{direction=\"to_peer\"}")
                .await
                > 50.0
        );
    }
    a.quit().await;
    b.quit().await;
}

/// A connection to the test's redis-server, as the nodes make theirs.
async fn redis_con(redis: &Redis) -> redis::aio::ConnectionManager {
    let client = redis::Client::open(redis.url()).unwrap();
    redis::aio::ConnectionManager::new(client).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renew_does_not_bring_back_a_lease_taken_over_and_closed_meanwhile() {
    use switchboard::cluster::lease::{epoch_key, lease_key, Acquired, Leases, Renewed};
    let redis = Redis::start();
    let mut con = redis_con(&redis).await;
    let a = Leases::new("a", 2000, 1000);
    let b = Leases::new("b", 2000, 1000);
    let Acquired::Mine { epoch: ea, .. } = a.acquire(&mut con, "r", false).await.unwrap() else {
        panic!("a takes the free lease");
    };
    // A is cut off; its lease runs out, B takes the room over and closes it.
    let _: () = redis::cmd("DEL")
        .arg(lease_key("r"))
        .query_async(&mut con)
        .await
        .unwrap();
    let Acquired::Mine { epoch: eb, .. } = b.acquire(&mut con, "r", true).await.unwrap() else {
        panic!("b takes the expired lease");
    };
    assert!(eb > ea);
    assert!(b.release(&mut con, "r", eb, true).await.unwrap());
    // A's link heals: its renewal must not take the closed room back.
    let r = a.renew(&mut con, &[("r".to_string(), ea)]).await.unwrap();
    assert_eq!(r, vec![Renewed::Lost]);
    let v: Option<String> = redis::cmd("GET")
        .arg(lease_key("r"))
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(v, None, "the closed room has no lease");

    // Expired with nobody taking it over: the holder takes it back, with a newer epoch.
    let Acquired::Mine { epoch: e1, .. } = a.acquire(&mut con, "s", false).await.unwrap() else {
        panic!("a takes s");
    };
    let _: () = redis::cmd("DEL")
        .arg(lease_key("s"))
        .query_async(&mut con)
        .await
        .unwrap();
    let r = a.renew(&mut con, &[("s".to_string(), e1)]).await.unwrap();
    let [Renewed::Again(e2)] = r[..] else {
        panic!("re-taken: {r:?}");
    };
    assert!(e2 > e1);
    let stored: String = redis::cmd("GET")
        .arg(epoch_key("s"))
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(stored, e2.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epochs_keep_growing_after_redis_loses_its_data() {
    use switchboard::cluster::lease::{Acquired, Leases, Renewed};
    let redis = Redis::start();
    let mut con = redis_con(&redis).await;
    let a = Leases::new("a", 2000, 1000);
    let b = Leases::new("b", 2000, 1000);
    // A few owners in turn: the epoch grows with each.
    let mut last = 0;
    for _ in 0..3 {
        let Acquired::Mine { epoch, .. } = a.acquire(&mut con, "r", false).await.unwrap() else {
            panic!("free lease");
        };
        assert!(epoch > last);
        last = epoch;
        assert!(a.release(&mut con, "r", epoch, false).await.unwrap());
    }
    let Acquired::Mine { epoch: held, .. } = a.acquire(&mut con, "t", false).await.unwrap() else {
        panic!("free lease");
    };
    // Redis restarts empty: every epoch it hands out from now on is above the old ones.
    let _: () = redis::cmd("FLUSHALL").query_async(&mut con).await.unwrap();
    let Acquired::Mine { epoch, .. } = b.acquire(&mut con, "r", false).await.unwrap() else {
        panic!("free lease after the flush");
    };
    assert!(epoch > last, "epoch {epoch} after the flush, {last} before");
    let r = a.renew(&mut con, &[("t".to_string(), held)]).await.unwrap();
    let [Renewed::Again(e)] = r[..] else {
        panic!("re-taken after the flush: {r:?}");
    };
    assert!(e > held, "epoch {e} after the flush, {held} before");
}

/// A TCP proxy in front of Redis that can black-hole: while cut, nothing passes (nothing is
/// reset or closed, as when a link goes dark) and new connections wait. Healed, connections
/// that lived across the cut are closed without delivering what was held, as after TCP gave
/// up on them; new ones pass.
struct Blackhole {
    port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Counts cuts; a connection made before the latest one is dead.
    cuts: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Blackhole {
    async fn start(upstream: u16) -> Blackhole {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::Arc;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        async fn open(cut: &AtomicBool) {
            while cut.load(Ordering::Acquire) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        async fn pump(
            mut r: tokio::net::tcp::OwnedReadHalf,
            mut w: tokio::net::tcp::OwnedWriteHalf,
            cut: Arc<AtomicBool>,
            cuts: Arc<AtomicU64>,
            born: u64,
        ) {
            let mut buf = vec![0u8; 16384];
            loop {
                let read = tokio::time::timeout(Duration::from_millis(50), r.read(&mut buf)).await;
                open(&cut).await;
                if cuts.load(Ordering::Acquire) != born {
                    return;
                }
                let n = match read {
                    Err(_) => continue,
                    Ok(Ok(0)) | Ok(Err(_)) => break,
                    Ok(Ok(n)) => n,
                };
                if w.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            let _ = w.shutdown().await;
        }
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let cuts = Arc::new(AtomicU64::new(0));
        let (c, n) = (cut.clone(), cuts.clone());
        let task = tokio::spawn(async move {
            while let Ok((down, _)) = l.accept().await {
                let (cut, cuts) = (c.clone(), n.clone());
                tokio::spawn(async move {
                    open(&cut).await;
                    let born = cuts.load(Ordering::Acquire);
                    let Ok(up) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                        return;
                    };
                    let (dr, dw) = down.into_split();
                    let (ur, uw) = up.into_split();
                    tokio::spawn(pump(dr, uw, cut.clone(), cuts.clone(), born));
                    tokio::spawn(pump(ur, dw, cut, cuts, born));
                });
            }
        });
        Blackhole {
            port,
            cut,
            cuts,
            task,
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn set_cut(&self, cut: bool) {
        use std::sync::atomic::Ordering;
        if cut {
            self.cuts.fetch_add(1, Ordering::AcqRel);
        }
        self.cut.store(cut, Ordering::Release);
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Nothing but pings arrives on `ws` for `d`.
async fn quiet_for(ws: &mut Ws, d: Duration) -> Result<(), Message> {
    let t = Instant::now();
    while let Some(left) = d.checked_sub(t.elapsed()) {
        match tokio::time::timeout(left, ws.next()).await {
            Err(_) => break,
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
            Ok(Some(Ok(m))) => return Err(m),
            Ok(_) => return Err(Message::Close(None)),
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_cut_off_from_redis_does_not_revive_its_room_closed_elsewhere() {
    let redis = Redis::start();
    let hole = Blackhole::start(redis.port).await;
    let sig = "resume_grace_secs = 2\nempty_room_grace_secs = 1\n";
    let old = Node::start_at(&hole.url(), "n1", free_port(), "", "", sig);
    let n2 = Node::start_at(&redis.url(), "n2", free_port(), "", "", sig);
    let n3 = Node::start_at(&redis.url(), "n3", free_port(), "", "", sig);
    for n in [&old, &n2, &n3] {
        n.wait_up().await;
    }
    let (mut a, room) = create(&old, "alice").await;
    let (mut b, _) = join(&n2, "bob", &room).await;
    a.recv_type("peer-joined").await;
    exchange(&mut a, &mut b, 3, "before").await;
    // The seats are mirrored before the link goes dark.
    tokio::time::sleep(Duration::from_millis(300)).await;

    hole.set_cut(true);
    // The old owner's lease runs out; B's node moves B, which resumes there: a takeover.
    b.closed().await;
    let rb = b.resume(&n2, Duration::from_secs(15)).await;
    assert_eq!(rb["room"], room.as_str());
    assert_eq!(rb["peers"][0]["peerId"], a.id.as_str(), "{rb}");
    // B leaves; A never comes back to the new owner: the room closes there.
    send(&mut b.ws, json!({"type": "leave", "id": "l"})).await;
    assert_eq!(b.recv_type("left").await["id"], "l");
    let mut con = redis_con(&redis).await;
    let lease = switchboard::cluster::lease::lease_key(&room);
    let t = Instant::now();
    loop {
        let v: Option<String> = redis::cmd("GET")
            .arg(&lease)
            .query_async(&mut con)
            .await
            .unwrap();
        if v.is_none() && n2.metric("switchboard_cluster_rooms_owned").await == 0.0 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the room closes on n2"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(old.metric("switchboard_cluster_redis_up").await, 0.0);

    // The link heals. The old owner finds the room gone and moves its own peer out.
    hole.set_cut(false);
    let healed = Instant::now();
    assert_eq!(old.metric("switchboard_cluster_rooms_owned").await, 1.0);
    while old.metric("switchboard_cluster_rooms_owned").await != 0.0 {
        assert!(
            healed.elapsed() < Duration::from_secs(10),
            "the old owner does not take the closed room back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "partition healed: the old owner dropped the room after {:?}",
        healed.elapsed()
    );
    a.closed().await;
    // And it stays dropped over the next heartbeats.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(old.metric("switchboard_cluster_rooms_owned").await, 0.0);
    for key in [
        lease.clone(),
        switchboard::cluster::lease::mirror_key(&room),
    ] {
        let v: Option<String> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut con)
            .await
            .unwrap();
        assert_eq!(v, None, "{key} stays gone");
    }
    // The room stays closed for everyone: nobody reaches the old owner through it.
    let t = login(&n3, "carol").await;
    let mut c = hello(&n3, &t).await;
    send(&mut c, json!({"type": "join", "room": room, "id": 1})).await;
    assert_eq!(recv(&mut c).await["code"], "unknown_room");
    let mut ws = hello(&n3, &a.token).await;
    send(
        &mut ws,
        json!({"type": "resume", "resumeToken": a.resume, "lastSeq": a.last, "id": "r"}),
    )
    .await;
    let v = recv(&mut ws).await;
    assert_eq!(v["type"], "error", "{v}");
    quiet_for(&mut b.ws, Duration::from_secs(1))
        .await
        .expect("B hears nothing from the old owner");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_live_process_with_one_node_id_is_refused_and_a_later_clash_is_alerted() {
    let redis = Redis::start();
    let mut n1 = Node::start(&redis, "n1");
    let n2 = Node::start(&redis, "n2");
    n1.wait_up().await;
    n2.wait_up().await;

    // A second process under the same id, while the first lives: exit 2 naming the key.
    let (dir, cfg) = node_config(&redis.url(), "n1", free_port(), "", "", "");
    let log = dir.path().join("stderr");
    let mut twin = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .arg("--config")
        .arg(&cfg)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("binary starts");
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = twin.try_wait().unwrap() {
            break st;
        }
        if t0.elapsed() > Duration::from_secs(15) {
            let _ = twin.kill();
            let _ = twin.wait();
            panic!("the twin still runs after 15 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let err = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("cluster.node_id"), "{err}");
    assert_eq!(n1.metric("switchboard_cluster_node_id_conflict").await, 0.0);

    // The same node restarted after a crash (its claim not given up) starts.
    n1.kill();
    let n1 = Node::start(&redis, "n1");
    n1.wait_up().await;
    let (mut a, room) = create(&n1, "alice").await;
    let (mut b, _) = join(&n2, "bob", &room).await;
    a.recv_type("peer-joined").await;

    // Another process took the id while this one was cut off: this one stops owning rooms
    // and says so; its peers resume on the other node.
    let mut con = redis_con(&redis).await;
    let _: () = redis::cmd("SET")
        .arg("sb:claim:n1")
        .arg("another-instance")
        .arg("PX")
        .arg(60_000)
        .query_async(&mut con)
        .await
        .unwrap();
    a.closed().await;
    assert_eq!(n1.metric("switchboard_cluster_node_id_conflict").await, 1.0);
    let body = n1.readyz().await.unwrap_or_default();
    assert!(body.contains("cluster.node_id"), "{body}");
    assert_eq!(n1.metric("switchboard_cluster_rooms_owned").await, 0.0);
    let t = login(&n1, "carol").await;
    let mut c = hello(&n1, &t).await;
    send(&mut c, json!({"type": "create", "id": 1})).await;
    assert_eq!(recv(&mut c).await["code"], "cluster_unavailable");
    b.closed().await;
    b.resume(&n2, Duration::from_secs(15)).await;
    a.resume(&n2, Duration::from_secs(15)).await;
    exchange(&mut a, &mut b, 3, "after").await;

    // The other process is gone: the id is this node's again.
    let _: () = redis::cmd("DEL")
        .arg("sb:claim:n1")
        .query_async(&mut con)
        .await
        .unwrap();
    let t0 = Instant::now();
    while n1.metric("switchboard_cluster_node_id_conflict").await != 0.0 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the claim comes back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_d, _) = create(&n1, "dave").await;
}
