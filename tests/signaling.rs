//! Room signaling over real WebSockets (tokio-tungstenite) against the in-process server:
//! every message, every error, resume with replay, replacement and the room-close grace.

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::time::Duration;
use switchboard::{Config, RunningServer, Server};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

async fn start(sig: &str, extra: &str) -> RunningServer {
    let text = format!(
        "[http]\nlisten = \"127.0.0.1:0\"\n[turn]\nlisten = [\"127.0.0.1:0\"]\n\
         [signaling]\n{sig}\n{extra}"
    );
    Server::new(Config::from_toml(&text).expect("valid test config"))
        .start()
        .await
        .expect("server starts")
}

fn token(srv: &RunningServer, user: &str, room: Option<&str>) -> String {
    srv.shared()
        .auth
        .issue_session(user, room, switchboard::auth::unix_now())
        .0
}

async fn connect(srv: &RunningServer) -> Ws {
    let url = format!("ws://{}/v1/ws", srv.http_addr());
    tokio_tungstenite::connect_async(url)
        .await
        .expect("ws connects")
        .0
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

/// Next JSON frame, skipping pings; panics after 5 s.
async fn recv(ws: &mut Ws) -> Value {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("a frame within 5 s")
            .expect("socket open")
            .expect("frame ok");
        match m {
            Message::Text(t) => return serde_json::from_str(&t).unwrap(),
            Message::Close(_) => panic!("closed while waiting for a frame"),
            _ => continue,
        }
    }
}

/// Next frame of `ty`, skipping others (e.g. ice-servers).
async fn recv_type(ws: &mut Ws, ty: &str) -> Value {
    loop {
        let v = recv(ws).await;
        if v["type"] == ty {
            return v;
        }
    }
}

async fn hello(srv: &RunningServer, user: &str) -> Ws {
    let mut ws = connect(srv).await;
    send(
        &mut ws,
        json!({"type": "hello", "token": token(srv, user, None), "id": 1}),
    )
    .await;
    let w = recv(&mut ws).await;
    assert_eq!(w["type"], "welcome", "{w}");
    assert_eq!(w["id"], 1);
    let ice = recv(&mut ws).await;
    assert_eq!(ice["type"], "ice-servers");
    ws
}

async fn create(ws: &mut Ws, name: Option<&str>) -> String {
    let mut req = json!({"type": "create", "id": "c"});
    if let Some(n) = name {
        req["name"] = json!(n);
    }
    send(ws, req).await;
    let v = recv(ws).await;
    assert_eq!(v["type"], "created", "{v}");
    v["room"].as_str().unwrap().to_string()
}

async fn join(ws: &mut Ws, room: &str) -> Value {
    send(ws, json!({"type": "join", "room": room, "id": "j"})).await;
    let v = recv(ws).await;
    assert_eq!(v["type"], "joined", "{v}");
    assert_eq!(v["id"], "j");
    v
}

#[tokio::test]
async fn two_peers_join_get_roles_and_relay_in_order() {
    let srv = start("", "").await;
    let mut a = hello(&srv, "alice").await;
    let room = create(&mut a, None).await;
    assert!(room.len() >= 16, "generated ids are unguessable: {room}");
    let ja = join(&mut a, &room).await;
    let mut b = hello(&srv, "bob").await;
    let jb = join(&mut b, &room).await;
    let peers = jb["peers"].as_array().unwrap();
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0]["peerId"], ja["peerId"]);
    assert_eq!(peers[0]["polite"], true);
    let pj = recv_type(&mut a, "peer-joined").await;
    assert_eq!(pj["peerId"], jb["peerId"]);
    assert_eq!(pj["userId"], "bob");
    assert_eq!(
        pj["polite"], false,
        "exactly one side of the pair is polite"
    );

    // B's offer and candidates reach A in order, stamped with B's verified id.
    for i in 0..20 {
        send(
            &mut b,
            json!({"type": "signal", "to": ja["peerId"], "data": {"n": i}}),
        )
        .await;
    }
    for i in 0..20 {
        let s = recv_type(&mut a, "signal").await;
        assert_eq!(s["from"], jb["peerId"]);
        assert_eq!(s["data"]["n"], i);
    }
    // `to` omitted: everyone else; an id gets an ack.
    send(&mut a, json!({"type": "signal", "data": "answer", "id": 7})).await;
    assert_eq!(recv_type(&mut a, "ack").await["id"], 7);
    let s = recv_type(&mut b, "signal").await;
    assert_eq!(
        (s["from"].clone(), s["data"].clone()),
        (ja["peerId"].clone(), json!("answer"))
    );

    send(&mut b, json!({"type": "leave"})).await;
    assert_eq!(recv_type(&mut b, "left").await["type"], "left");
    let l = recv_type(&mut a, "peer-left").await;
    assert_eq!(
        (l["peerId"].clone(), l["reason"].clone()),
        (jb["peerId"].clone(), json!("left"))
    );
    let m = srv.shared().metrics.render();
    assert!(
        m.contains("switchboard_signaling_frames_total{direction=\"in\",type=\"signal\"} 21"),
        "{m}"
    );
    srv.shutdown();
    srv.wait().await;
}

#[tokio::test]
async fn every_error_is_a_typed_frame_and_the_socket_keeps_serving() {
    let srv = start("room_capacity = 2\nmax_frame_bytes = 1024\n", "").await;
    let mut ws = connect(&srv).await;
    send(&mut ws, json!({"type": "join", "room": "x", "id": 1})).await;
    let e = recv(&mut ws).await;
    assert_eq!(
        (e["code"].clone(), e["id"].clone()),
        (json!("unauthenticated"), json!(1))
    );
    ws.send(Message::Text("{nope".into())).await.unwrap();
    assert_eq!(recv(&mut ws).await["code"], "bad_json");
    send(&mut ws, json!({"type": "hello", "token": "sb1.forged.sig"})).await;
    assert_eq!(recv(&mut ws).await["code"], "unauthenticated");

    let mut a = hello(&srv, "a").await;
    send(&mut a, json!({"type": "teleport", "id": 2})).await;
    let e = recv(&mut a).await;
    assert_eq!(
        (e["code"].clone(), e["id"].clone()),
        (json!("unknown_type"), json!(2))
    );
    send(&mut a, json!({"type": "join", "room": "missing"})).await;
    assert_eq!(recv(&mut a).await["code"], "unknown_room");
    send(&mut a, json!({"type": "signal", "data": 1})).await;
    assert_eq!(recv(&mut a).await["code"], "not_in_room");
    let room = create(&mut a, Some("small")).await;
    send(&mut a, json!({"type": "create", "name": "small"})).await;
    assert_eq!(recv(&mut a).await["code"], "room_exists");
    join(&mut a, &room).await;
    send(&mut a, json!({"type": "signal", "to": "ghost", "data": 1})).await;
    assert_eq!(recv(&mut a).await["code"], "unknown_peer");
    let big = "x".repeat(2000);
    send(&mut a, json!({"type": "signal", "data": big})).await;
    assert_eq!(recv(&mut a).await["code"], "too_large");
    let mut b = hello(&srv, "b").await;
    join(&mut b, &room).await;
    let mut c = hello(&srv, "c").await;
    send(&mut c, json!({"type": "join", "room": room})).await;
    assert_eq!(recv(&mut c).await["code"], "room_full");
    // The room is unharmed by all of that.
    send(&mut b, json!({"type": "signal", "data": "still here"})).await;
    assert_eq!(recv_type(&mut a, "signal").await["data"], "still here");
    srv.shutdown();
    srv.wait().await;
}

#[tokio::test]
async fn expired_and_room_limited_tokens() {
    let srv = start("", "").await;
    let auth = &srv.shared().auth;
    let (old, _) = auth.issue_session("x", None, switchboard::auth::unix_now() - 100_000);
    let mut ws = connect(&srv).await;
    send(&mut ws, json!({"type": "hello", "token": old})).await;
    assert_eq!(recv(&mut ws).await["code"], "expired_token");

    let mut ws = connect(&srv).await;
    send(
        &mut ws,
        json!({"type": "hello", "token": token(&srv, "lim", Some("only-this"))}),
    )
    .await;
    assert_eq!(recv(&mut ws).await["room"], "only-this");
    send(&mut ws, json!({"type": "create", "name": "other"})).await;
    assert_eq!(recv_type(&mut ws, "error").await["code"], "forbidden_room");
    send(&mut ws, json!({"type": "create", "name": "only-this"})).await;
    assert_eq!(recv_type(&mut ws, "created").await["room"], "only-this");
    srv.shutdown();
    srv.wait().await;
}

#[tokio::test]
async fn token_in_subprotocol_header_and_origin_check() {
    let srv = start("", "").await;
    let url = format!("ws://{}/v1/ws", srv.http_addr());
    let mut req = url.clone().into_client_request().unwrap();
    req.headers_mut().insert(
        "sec-websocket-protocol",
        format!("switchboard.v1, {}", token(&srv, "sp", None))
            .parse()
            .unwrap(),
    );
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(resp.headers()["sec-websocket-protocol"], "switchboard.v1");
    assert_eq!(recv(&mut ws).await["userId"], "sp");
    srv.shutdown();
    srv.wait().await;

    let srv = Server::new(
        Config::from_toml(
            "[http]\nlisten = \"127.0.0.1:0\"\nallowed_origins = [\"https://app.example.com\"]\n\
             [turn]\nlisten = [\"127.0.0.1:0\"]\n",
        )
        .unwrap(),
    )
    .start()
    .await
    .unwrap();
    let mut req = format!("ws://{}/v1/ws", srv.http_addr())
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("origin", "https://evil.example.net".parse().unwrap());
    let err = tokio_tungstenite::connect_async(req).await.unwrap_err();
    assert!(err.to_string().contains("403"), "{err}");
    // An Origin that is not text is refused, not mistaken for a non-browser client.
    let mut req = format!("ws://{}/v1/ws", srv.http_addr())
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "origin",
        tokio_tungstenite::tungstenite::http::HeaderValue::from_bytes(
            b"https://app.example.com\xff",
        )
        .unwrap(),
    );
    let err = tokio_tungstenite::connect_async(req).await.unwrap_err();
    assert!(err.to_string().contains("403"), "{err}");
    let mut req = format!("ws://{}/v1/ws", srv.http_addr())
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("origin", "https://app.example.com".parse().unwrap());
    assert!(tokio_tungstenite::connect_async(req).await.is_ok());
    srv.shutdown();
    srv.wait().await;
}

#[tokio::test]
async fn dropped_peer_resumes_and_gets_missed_frames_replayed() {
    let srv = start("resume_grace_secs = 30\n", "").await;
    let mut a = hello(&srv, "a").await;
    let room = create(&mut a, None).await;
    join(&mut a, &room).await;
    let mut b = hello(&srv, "b").await;
    let jb = join(&mut b, &room).await;
    recv_type(&mut a, "peer-joined").await;
    send(
        &mut a,
        json!({"type": "signal", "to": jb["peerId"], "data": "seen"}),
    )
    .await;
    let seen = recv_type(&mut b, "signal").await;
    let last_seq = seen["seq"].as_u64().unwrap();
    // B's network dies: no close frame, the TCP connection just goes away.
    drop(b);
    let r = recv_type(&mut a, "peer-reconnecting").await;
    assert_eq!(r["peerId"], jb["peerId"]);
    for i in 0..3 {
        send(
            &mut a,
            json!({"type": "signal", "to": jb["peerId"], "data": {"missed": i}}),
        )
        .await;
    }
    let mut b2 = hello(&srv, "b").await;
    send(
        &mut b2,
        json!({"type": "resume", "resumeToken": jb["resumeToken"], "lastSeq": last_seq}),
    )
    .await;
    let res = recv_type(&mut b2, "resumed").await;
    assert_eq!(res["peerId"], jb["peerId"]);
    assert_eq!(res["complete"], true);
    for i in 0..3 {
        let s = recv(&mut b2).await;
        assert_eq!(s["data"]["missed"], i, "{s}");
        assert!(s["seq"].as_u64().unwrap() > last_seq);
    }
    assert_eq!(
        recv_type(&mut a, "peer-resumed").await["peerId"],
        jb["peerId"]
    );
    send(&mut b2, json!({"type": "signal", "data": "back"})).await;
    assert_eq!(recv_type(&mut a, "signal").await["from"], jb["peerId"]);
    // Someone else cannot steal the seat with the token.
    let mut eve = hello(&srv, "eve").await;
    send(
        &mut eve,
        json!({"type": "resume", "resumeToken": jb["resumeToken"]}),
    )
    .await;
    assert_eq!(recv(&mut eve).await["code"], "bad_resume");
    let m = srv.shared().metrics.render();
    assert!(
        m.contains("switchboard_resumes_total{outcome=\"resumed\"} 1"),
        "{m}"
    );
    srv.shutdown();
    srv.wait().await;
}

#[tokio::test]
async fn resume_window_closes_with_peer_left_timeout_and_empty_room_closes() {
    let srv = start("resume_grace_secs = 1\nempty_room_grace_secs = 1\n", "").await;
    let mut a = hello(&srv, "a").await;
    let room = create(&mut a, Some("brief")).await;
    join(&mut a, &room).await;
    let mut b = hello(&srv, "b").await;
    let jb = join(&mut b, &room).await;
    drop(b);
    assert_eq!(
        recv_type(&mut a, "peer-reconnecting").await["peerId"],
        jb["peerId"]
    );
    let left = recv_type(&mut a, "peer-left").await;
    assert_eq!(
        (left["peerId"].clone(), left["reason"].clone()),
        (jb["peerId"].clone(), json!("timeout"))
    );
    send(&mut a, json!({"type": "leave"})).await;
    recv_type(&mut a, "left").await;
    // The empty room lingers for its grace (a name clash shows it), then closes.
    send(&mut a, json!({"type": "create", "name": "brief"})).await;
    assert_eq!(recv(&mut a).await["code"], "room_exists");
    let mut gone = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        send(&mut a, json!({"type": "join", "room": room})).await;
        let v = recv(&mut a).await;
        if v["code"] == "unknown_room" {
            gone = true;
            break;
        }
        assert_eq!(v["type"], "joined", "{v}");
        // Leaving again restarts the grace; wait it out without rejoining.
        send(&mut a, json!({"type": "leave"})).await;
        recv_type(&mut a, "left").await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    assert!(gone, "the empty room closed after its grace");
    srv.shutdown();
    srv.wait().await;
}

#[tokio::test]
async fn second_connection_of_the_same_identity_replaces_the_first() {
    let srv = start("", "").await;
    let mut a = hello(&srv, "a").await;
    let room = create(&mut a, None).await;
    join(&mut a, &room).await;
    let mut b1 = hello(&srv, "b").await;
    let j1 = join(&mut b1, &room).await;
    recv_type(&mut a, "peer-joined").await;
    let mut b2 = hello(&srv, "b").await;
    let j2 = join(&mut b2, &room).await;
    assert_eq!(
        j2["peers"].as_array().unwrap().len(),
        1,
        "no ghost of b1: {j2}"
    );
    let l = recv_type(&mut b1, "peer-left").await;
    assert_eq!(l["reason"], "replaced");
    let l = recv_type(&mut a, "peer-left").await;
    assert_eq!(
        (l["peerId"].clone(), l["reason"].clone()),
        (j1["peerId"].clone(), json!("replaced"))
    );
    assert_eq!(
        recv_type(&mut a, "peer-joined").await["peerId"],
        j2["peerId"]
    );
    srv.shutdown();
    srv.wait().await;
}

#[tokio::test]
async fn limits_rate_connections_per_ip_and_draining() {
    let srv = start(
        "rate_per_sec = 1\nrate_burst = 3\nmax_connections_per_ip = 2\n",
        "",
    )
    .await;
    let mut a = hello(&srv, "a").await;
    let mut limited = 0;
    for _ in 0..6 {
        send(&mut a, json!({"type": "ping"})).await;
    }
    for _ in 0..6 {
        let v = recv(&mut a).await;
        if v["code"] == "rate_limited" {
            limited += 1;
        }
    }
    assert!(
        limited >= 2,
        "frames beyond the burst are refused ({limited})"
    );
    let _b = hello(&srv, "b").await;
    let mut c = connect(&srv).await;
    let e = recv(&mut c).await;
    assert_eq!(e["code"], "too_many_connections");
    srv.shutdown();
    srv.wait().await;

    let srv = start("", "").await;
    let mut a = hello(&srv, "a").await;
    let room = create(&mut a, None).await;
    srv.shared().lifecycle.begin_drain();
    send(&mut a, json!({"type": "join", "room": room})).await;
    assert_eq!(recv(&mut a).await["code"], "draining");
    srv.shutdown();
    srv.wait().await;
}

#[tokio::test]
async fn fresh_ice_servers_are_pushed_before_credentials_expire() {
    let srv = start(
        "ice_refresh_before_secs = 2\n",
        "[auth]\nturn_credential_ttl_secs = 3\n",
    )
    .await;
    let mut ws = connect(&srv).await;
    send(
        &mut ws,
        json!({"type": "hello", "token": token(&srv, "long-call", None)}),
    )
    .await;
    recv_type(&mut ws, "welcome").await;
    let first = recv_type(&mut ws, "ice-servers").await;
    let second = recv_type(&mut ws, "ice-servers").await;
    let user = |v: &Value| v["iceServers"][1]["username"].as_str().unwrap().to_string();
    assert!(user(&first).ends_with(":long-call"));
    assert!(second["expiresAt"].as_u64() >= first["expiresAt"].as_u64());
    assert_eq!(second["ttl"], 3);
    srv.shutdown();
    srv.wait().await;
}

#[tokio::test]
async fn request_errors_not_covered_elsewhere_and_ping_pong() {
    let srv = start("max_rooms = 1\nroom_capacity = 3\n", "").await;
    let mut a = hello(&srv, "a").await;
    send(&mut a, json!({"type": "ping", "id": "p"})).await;
    let p = recv(&mut a).await;
    assert_eq!(
        (p["type"].clone(), p["id"].clone()),
        (json!("pong"), json!("p"))
    );
    send(
        &mut a,
        json!({"type": "hello", "token": token(&srv, "a", None)}),
    )
    .await;
    assert_eq!(recv(&mut a).await["code"], "bad_request");
    send(&mut a, json!({"type": "join", "id": 3})).await;
    let e = recv(&mut a).await;
    assert_eq!(
        (e["code"].clone(), e["id"].clone()),
        (json!("bad_request"), json!(3))
    );
    send(&mut a, json!({"type": "create", "capacity": 4})).await;
    assert_eq!(recv(&mut a).await["code"], "bad_request");
    a.send(Message::Binary(vec![1, 2, 3].into())).await.unwrap();
    assert_eq!(recv(&mut a).await["code"], "bad_request");
    send(&mut a, json!({"type": "leave", "id": 4})).await;
    assert_eq!(recv(&mut a).await["code"], "not_in_room");

    let room = create(&mut a, Some("only")).await;
    send(&mut a, json!({"type": "create", "name": "second"})).await;
    assert_eq!(recv(&mut a).await["code"], "too_many_rooms");
    join(&mut a, &room).await;
    send(&mut a, json!({"type": "join", "room": room})).await;
    assert_eq!(recv(&mut a).await["code"], "already_in_room");
    // Still a working member after all of that.
    let mut b = hello(&srv, "b").await;
    let jb = join(&mut b, &room).await;
    assert_eq!(jb["peers"].as_array().map(Vec::len), Some(1));
    send(&mut a, json!({"type": "signal", "data": "hi"})).await;
    assert_eq!(recv_type(&mut b, "signal").await["data"], "hi");
    srv.shutdown();
    srv.wait().await;
}

#[tokio::test]
async fn a_silent_peer_is_dropped_after_the_dead_peer_timeout_and_then_times_out() {
    let srv = start(
        "ping_interval_secs = 1\ndead_peer_timeout_secs = 2\nresume_grace_secs = 1\n",
        "",
    )
    .await;
    let mut a = hello(&srv, "a").await;
    let room = create(&mut a, None).await;
    join(&mut a, &room).await;
    let mut b = hello(&srv, "b").await;
    let jb = join(&mut b, &room).await;
    recv_type(&mut a, "peer-joined").await;
    // B stops reading: it answers no pings and sends nothing, but its TCP connection stays open.
    let r = recv_type(&mut a, "peer-reconnecting").await;
    assert_eq!(r["peerId"], jb["peerId"]);
    let l = recv_type(&mut a, "peer-left").await;
    assert_eq!(
        (l["peerId"].clone(), l["reason"].clone()),
        (jb["peerId"].clone(), json!("timeout"))
    );
    let m = srv.shared().metrics.render();
    assert!(
        m.contains("switchboard_dropped_total{reason=\"ws_dead_peer\"} 1"),
        "{m}"
    );
    drop(b);
    srv.shutdown();
    srv.wait().await;
}

#[tokio::test]
async fn a_reader_that_falls_behind_is_closed_and_resumes_without_a_gap() {
    let srv = start(
        "rate_per_sec = 100000\nrate_burst = 100000\nresume_buffer_frames = 20000\n\
         dead_peer_timeout_secs = 120\nping_interval_secs = 60\n",
        "",
    )
    .await;
    let mut a = hello(&srv, "a").await;
    let room = create(&mut a, None).await;
    let ja = join(&mut a, &room).await;
    let mut b = hello(&srv, "b").await;
    join(&mut b, &room).await;
    recv_type(&mut a, "peer-joined").await;
    // A stops reading; B keeps writing until A's outbox overflows.
    let pad = "p".repeat(16 * 1024);
    let overflowed = |srv: &RunningServer| {
        srv.shared()
            .metrics
            .render()
            .lines()
            .any(|l| l.starts_with("switchboard_dropped_total{reason=\"ws_outbox_full\"}"))
    };
    let mut sent = 0u64;
    while !overflowed(&srv) {
        assert!(sent < 20_000, "the outbox never filled");
        for _ in 0..50 {
            send(
                &mut b,
                json!({"type": "signal", "to": ja["peerId"], "data": {"n": sent, "pad": pad}}),
            )
            .await;
            sent += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A reads on: every frame in order up to the close, then resumes and gets the rest.
    let mut next = 0u64;
    let mut last_seq = 0u64;
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), a.next())
            .await
            .expect("A gets frames or a close")
            .expect("socket open")
            .expect("frame ok");
        match m {
            Message::Text(t) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["type"] == "signal" {
                    assert_eq!(v["data"]["n"], next, "no frame skipped");
                    next += 1;
                    last_seq = v["seq"].as_u64().unwrap();
                }
            }
            Message::Close(f) => {
                assert_eq!(f.map(|f| u16::from(f.code)), Some(4002));
                break;
            }
            _ => {}
        }
    }
    assert!(next < sent, "the close came before the gap");
    let mut a2 = hello(&srv, "a").await;
    send(
        &mut a2,
        json!({"type": "resume", "resumeToken": ja["resumeToken"], "lastSeq": last_seq}),
    )
    .await;
    let r = recv_type(&mut a2, "resumed").await;
    assert_eq!(r["complete"], true, "{r}");
    while next < sent {
        let v = recv_type(&mut a2, "signal").await;
        assert_eq!(v["data"]["n"], next);
        next += 1;
    }
    srv.shutdown();
    srv.wait().await;
}
