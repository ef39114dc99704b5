//! Room signaling over real WebSockets (tokio-tungstenite) against the in-process server:
//! every message, every error, resume with replay, replacement and the room-close grace.

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::time::Duration;
use switchboard::{Config, RunningServer, Server};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::MaybeTlsStream;

use crate::support::ws;
use ws::{connect, recv, recv_type, send, Ws};

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

/// The value of one metric series, 0 when absent.
fn metric(srv: &RunningServer, series: &str) -> f64 {
    srv.shared()
        .metrics
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
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
        // The middle one is a broadcast (no `to`): buffered and replayed like the others.
        let f = if i == 1 {
            json!({"type": "signal", "data": {"missed": i}})
        } else {
            json!({"type": "signal", "to": jb["peerId"], "data": {"missed": i}})
        };
        send(&mut a, f).await;
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
    let e = recv(&mut eve).await;
    assert_eq!(e["code"], "bad_resume");
    // The message names the real cause, not "unknown or expired".
    assert!(
        e["message"].as_str().unwrap_or("").contains("another user"),
        "{e}"
    );
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
         resume_buffer_bytes = 67108864\ndead_peer_timeout_secs = 120\nping_interval_secs = 60\n\
         outbox_bytes = 262144\n",
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
        metric(srv, "switchboard_dropped_total{reason=\"ws_outbox_full\"}") > 0.0
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
    let (mut next, mut last_seq) = (0u64, 0u64);
    let closed = read_signals_until_close(&mut a, &mut next, &mut last_seq, sent).await;
    assert_eq!(closed, Some(4002));
    assert!(next < sent, "the close came before the gap");
    // A replay larger than the outbox is cut the same way (4002 after what fits): the client
    // resumes again from its last seq until it has everything, and never sees a gap.
    let mut resumes = 0;
    while next < sent {
        resumes += 1;
        assert!(
            resumes <= 20,
            "the replay never completed ({next} of {sent})"
        );
        let mut a2 = hello(&srv, "a").await;
        send(
            &mut a2,
            json!({"type": "resume", "resumeToken": ja["resumeToken"], "lastSeq": last_seq}),
        )
        .await;
        let r = recv_type(&mut a2, "resumed").await;
        assert_eq!(r["complete"], true, "{r}");
        let closed = read_signals_until_close(&mut a2, &mut next, &mut last_seq, sent).await;
        assert!(matches!(closed, None | Some(4002)), "{closed:?}");
    }
    eprintln!("{sent} frames, {resumes} resumes");
    srv.shutdown();
    srv.wait().await;
}

/// Read `signal` frames numbered `next..sent` in order (each exactly once), tracking the last
/// `seq`, until all have arrived (`None`) or the socket closes (`Some(code)`).
async fn read_signals_until_close(
    ws: &mut Ws,
    next: &mut u64,
    last_seq: &mut u64,
    sent: u64,
) -> Option<u16> {
    while *next < sent {
        let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("frames or a close")
            .expect("socket open")
            .expect("frame ok");
        match m {
            Message::Text(t) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["type"] == "signal" {
                    assert_eq!(v["data"]["n"], *next, "no frame skipped or repeated");
                    *next += 1;
                    *last_seq = v["seq"].as_u64().unwrap();
                }
            }
            Message::Close(f) => return Some(f.map_or(1005, |f| u16::from(f.code))),
            _ => {}
        }
    }
    None
}

/// Limits that let the ordering tests push thousands of frames without hitting a bound.
const UNBOUNDED: &str = "rate_per_sec = 1000000\nrate_burst = 1000000\n\
    resume_buffer_frames = 1000000\nresume_buffer_bytes = 1073741824\n\
    resume_total_bytes = 1073741824\noutbox_frames = 1000000\noutbox_bytes = 1073741824\n\
    outbox_total_bytes = 2147483648\n";

type Tx = futures_util::stream::SplitSink<Ws, Message>;
type Rx = futures_util::stream::SplitStream<Ws>;

/// Read room events until `signals` signal frames arrived; checks that `seq` goes up by exactly
/// 1 from `last_seq`. Returns every (seq, frame) seen, or stops early after `stop_after`
/// signals (to simulate a drop).
async fn read_in_order(
    rx: &mut Rx,
    mut last_seq: u64,
    signals: usize,
    stop_after: Option<usize>,
) -> Vec<(u64, Value)> {
    let mut seen = Vec::new();
    let mut n = 0;
    while n < signals && stop_after.is_none_or(|s| n < s) {
        let m = tokio::time::timeout(Duration::from_secs(20), rx.next())
            .await
            .expect("frames keep coming")
            .expect("socket open")
            .expect("frame ok");
        let Message::Text(t) = m else { continue };
        let v: Value = serde_json::from_str(&t).unwrap();
        let Some(seq) = v["seq"].as_u64() else {
            continue;
        };
        assert_eq!(seq, last_seq + 1, "seq must go up by exactly 1: {v}");
        last_seq = seq;
        if v["type"] == "signal" {
            n += 1;
        }
        seen.push((seq, v));
    }
    seen
}

/// Every sender's frames arrive complete and in its own order.
fn check_per_sender(frames: &[(u64, Value)], senders: usize, per_sender: u64) {
    let mut next: std::collections::HashMap<String, u64> = Default::default();
    for (_, v) in frames.iter().filter(|(_, v)| v["type"] == "signal") {
        let from = v["data"]["u"].as_str().unwrap().to_string();
        let i = v["data"]["i"].as_u64().unwrap();
        let e = next.entry(from).or_insert(0);
        assert_eq!(i, *e, "per-sender order");
        *e += 1;
    }
    assert_eq!(next.len(), senders);
    assert!(next.values().all(|n| *n == per_sender), "{next:?}");
}

async fn send_round(txs: Vec<(String, Tx)>, round: u64, k: u64) -> Vec<(String, Tx)> {
    let tasks: Vec<_> = txs
        .into_iter()
        .map(|(u, mut tx)| {
            tokio::spawn(async move {
                for i in 0..k {
                    let f = json!({"type": "signal", "data": {"u": u, "i": round * k + i}});
                    tx.send(Message::Text(f.to_string().into())).await.unwrap();
                }
                (u, tx)
            })
        })
        .collect();
    let mut back = Vec::new();
    for t in tasks {
        back.push(t.await.unwrap());
    }
    back
}

/// Several peers broadcast at once from separate tasks: every recipient still sees `seq`
/// strictly increasing by 1 on the wire (frames enter each outbox in `seq` order).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_broadcasts_reach_every_recipient_in_seq_order() {
    let srv = start(UNBOUNDED, "").await;
    const PEERS: usize = 4;
    const K: u64 = 800;
    const ROUNDS: u64 = 3;
    let mut first = hello(&srv, "u0").await;
    let room = create(&mut first, None).await;
    let mut socks = vec![first];
    for i in 1..PEERS {
        socks.push(hello(&srv, &format!("u{i}")).await);
    }
    for s in socks.iter_mut() {
        join(s, &room).await;
    }
    let mut txs = Vec::new();
    let mut readers = Vec::new();
    for (i, s) in socks.into_iter().enumerate() {
        let (tx, mut rx) = s.split();
        txs.push((format!("u{i}"), tx));
        let expect = (PEERS - 1) * (K * ROUNDS) as usize;
        readers.push(tokio::spawn(async move {
            read_in_order(&mut rx, 0, expect, None).await
        }));
    }
    for round in 0..ROUNDS {
        txs = send_round(txs, round, K).await;
    }
    for r in readers {
        let frames = r.await.expect("reader saw every frame in seq order");
        check_per_sender(&frames, PEERS - 1, K * ROUNDS);
    }
    srv.shutdown();
    srv.wait().await;
}

/// The same with a recipient that drops in the middle and resumes: the frames it got before
/// the drop plus the replayed and later frames are exactly 1..N, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_recipient_that_drops_mid_stream_resumes_with_each_frame_exactly_once() {
    let srv = start(&format!("{UNBOUNDED}resume_grace_secs = 60\n"), "").await;
    const SENDERS: usize = 3;
    const K: u64 = 1000;
    const ROUNDS: u64 = 3;
    let mut first = hello(&srv, "u0").await;
    let room = create(&mut first, None).await;
    let mut socks = vec![first];
    for i in 1..SENDERS {
        socks.push(hello(&srv, &format!("u{i}")).await);
    }
    for s in socks.iter_mut() {
        join(s, &room).await;
    }
    let mut d = hello(&srv, "dropper").await;
    let jd = join(&mut d, &room).await;
    let mut txs = Vec::new();
    for (i, s) in socks.into_iter().enumerate() {
        let (tx, mut rx) = s.split();
        txs.push((format!("u{i}"), tx));
        // Senders' own readers must keep up (and check order) so their outboxes drain.
        tokio::spawn(async move {
            loop {
                if rx.next().await.is_none() {
                    break;
                }
            }
        });
    }
    let total = SENDERS * (K * ROUNDS) as usize;
    let srv_addr = srv.http_addr();
    let tok = token(&srv, "dropper", None);
    let dropper = tokio::spawn(async move {
        let (dtx, mut drx) = d.split();
        let before = read_in_order(&mut drx, 0, total, Some(total / 3)).await;
        // The network dies: no close frame.
        drop(dtx);
        drop(drx);
        let last = before.last().map(|(s, _)| *s).unwrap_or(0);
        let url = format!("ws://{srv_addr}/v1/ws");
        let (mut d2, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        send(&mut d2, json!({"type": "hello", "token": tok})).await;
        recv_type(&mut d2, "ice-servers").await;
        send(
            &mut d2,
            json!({"type": "resume", "resumeToken": jd["resumeToken"], "lastSeq": last}),
        )
        .await;
        let (_tx2, mut rx2) = d2.split();
        // Skip to `resumed`; everything after it is seq-checked from `last`.
        loop {
            let m = rx2.next().await.unwrap().unwrap();
            if let Message::Text(t) = m {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["type"] == "resumed" {
                    assert_eq!(v["complete"], true, "{v}");
                    break;
                }
            }
        }
        let got_before = before.iter().filter(|(_, v)| v["type"] == "signal").count();
        let after = read_in_order(&mut rx2, last, total - got_before, None).await;
        (before, after)
    });
    for round in 0..ROUNDS {
        txs = send_round(txs, round, K).await;
    }
    let (before, after) = dropper
        .await
        .expect("dropper saw every frame once, in order");
    let all: Vec<(u64, Value)> = before.into_iter().chain(after).collect();
    let seqs: Vec<u64> = all.iter().map(|(s, _)| *s).collect();
    let n = seqs.len() as u64;
    assert_eq!(seqs, (1..=n).collect::<Vec<_>>(), "exactly 1..N once each");
    check_per_sender(&all, SENDERS, K * ROUNDS);
    drop(txs);
    srv.shutdown();
    srv.wait().await;
}

/// `data` is relayed byte for byte: big integers, exact decimals and key order survive.
#[tokio::test]
async fn signal_data_is_relayed_untouched() {
    let srv = start("", "").await;
    let mut a = hello(&srv, "a").await;
    let room = create(&mut a, None).await;
    join(&mut a, &room).await;
    let mut b = hello(&srv, "b").await;
    join(&mut b, &room).await;
    let data = r#"{"z":123456789012345678901234567890,"a":1e-400,"m":0.1000000000000000000001,"k":[{"y":1,"b":2}]}"#;
    let frame = format!(r#"{{"type":"signal","data":{data},"id":98765432109876543210}}"#);
    a.send(Message::Text(frame.into())).await.unwrap();
    let ack = loop {
        let m = a.next().await.unwrap().unwrap();
        if let Message::Text(t) = m {
            if t.contains("\"ack\"") {
                break t.to_string();
            }
        }
    };
    assert!(ack.contains(r#""id":98765432109876543210"#), "{ack}");
    let got = loop {
        let m = b.next().await.unwrap().unwrap();
        if let Message::Text(t) = m {
            if t.contains("\"signal\"") {
                break t.to_string();
            }
        }
    };
    assert!(got.contains(&format!(r#""data":{data}"#)), "{got}");
    srv.shutdown();
    srv.wait().await;
}

/// The deviations a client written from docs/protocol.md found: field types, the 1009 close,
/// and `id` on `too_large` and `rate_limited`.
#[tokio::test]
async fn protocol_edges_match_the_document() {
    let srv = start(
        "max_frame_bytes = 1024\nrate_per_sec = 1\nrate_burst = 3\n",
        "",
    )
    .await;
    let mut a = hello(&srv, "a").await;
    for (req, what) in [
        (json!({"type": "create", "name": 5, "id": "n"}), "name"),
        (
            json!({"type": "create", "capacity": 2.5, "id": "n"}),
            "capacity",
        ),
    ] {
        send(&mut a, req).await;
        let e = recv(&mut a).await;
        assert_eq!(e["code"], "bad_request", "{e}");
        assert_eq!(e["id"], "n");
        assert!(e["message"].as_str().unwrap().contains(what), "{e}");
    }
    // Between the limit and 4x: a typed error that echoes the id, and the socket stays open.
    let pad = "x".repeat(2000);
    send(&mut a, json!({"type": "ping", "id": "big", "pad": pad})).await;
    let e = recv(&mut a).await;
    assert_eq!(
        (e["code"].as_str(), e["id"].as_str()),
        (Some("too_large"), Some("big"))
    );
    // The bucket is empty now: the next request is rate limited, with its id.
    send(&mut a, json!({"type": "ping", "id": 77})).await;
    let e = recv(&mut a).await;
    assert_eq!(e["code"], "rate_limited", "{e}");
    assert_eq!(e["id"], 77);
    // Over 4x the limit: a real close frame with 1009.
    let huge = "y".repeat(4 * 1024 + 1);
    a.send(Message::Text(huge.into())).await.unwrap();
    let code = loop {
        match tokio::time::timeout(Duration::from_secs(5), a.next())
            .await
            .expect("a close within 5 s")
        {
            Some(Ok(Message::Close(f))) => break f.map(|f| u16::from(f.code)),
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(code, Some(1009));
    srv.shutdown();
    srv.wait().await;
}

/// Sockets that never send `hello` are closed at the deadline; a client that authenticated
/// is served throughout.
#[tokio::test]
async fn connections_without_hello_are_closed_at_the_deadline() {
    let srv = start("hello_timeout_secs = 1\n", "").await;
    let mut idle = Vec::new();
    for _ in 0..20 {
        idle.push(connect(&srv).await);
    }
    let mut a = hello(&srv, "a").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for mut s in idle {
        let e = recv(&mut s).await;
        assert_eq!(e["code"], "unauthenticated", "{e}");
        let end = tokio::time::timeout(Duration::from_secs(5), s.next())
            .await
            .unwrap();
        assert!(
            matches!(end, Some(Ok(Message::Close(Some(ref f)))) if u16::from(f.code) == 1008),
            "{end:?}"
        );
    }
    send(&mut a, json!({"type": "ping", "id": 1})).await;
    assert_eq!(recv(&mut a).await["type"], "pong");
    assert_eq!(
        metric(
            &srv,
            "switchboard_dropped_total{reason=\"ws_hello_timeout\"}"
        ),
        20.0
    );
    srv.shutdown();
    srv.wait().await;
}

/// One user cannot fill the node with rooms; others still create, and a closed room frees
/// its creator's quota.
#[tokio::test]
async fn rooms_per_user_are_capped() {
    let srv = start("max_rooms_per_user = 3\nempty_room_grace_secs = 1\n", "").await;
    let mut m = hello(&srv, "mallory").await;
    for _ in 0..3 {
        create(&mut m, None).await;
    }
    send(&mut m, json!({"type": "create", "id": 4})).await;
    let e = recv(&mut m).await;
    assert_eq!(
        (e["code"].as_str(), e["id"].as_u64()),
        (Some("too_many_rooms"), Some(4))
    );
    let mut a = hello(&srv, "alice").await;
    create(&mut a, Some("alices")).await;
    assert_eq!(
        metric(
            &srv,
            "switchboard_dropped_total{reason=\"ws_rooms_per_user\"}"
        ),
        1.0
    );
    // The empty rooms close after their grace, which frees mallory's quota.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    create(&mut m, None).await;
    srv.shutdown();
    srv.wait().await;
}

/// A flood at a dropped peer is held to the per-peer and node-wide resume byte bounds; a
/// flood at readers that do not read is held to the per-connection and node-wide outbox
/// bounds. Another pair keeps relaying meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_and_outbox_bytes_are_bounded_under_a_flood() {
    let srv = start(
        "max_frame_bytes = 16384\nrate_per_sec = 100000\nrate_burst = 100000\n\
         resume_buffer_frames = 100000\nresume_buffer_bytes = 65536\nresume_total_bytes = 131072\n\
         outbox_bytes = 65536\noutbox_total_bytes = 98304\nmax_connections_per_ip = 64\n\
         resume_grace_secs = 60\n",
        "",
    )
    .await;
    let pad = "p".repeat(8000);
    let (resume_max, outbox_max) = (131_072 + 16_384, 98_304);
    // Three rooms: an attacker and a victim that dropped (its frames go to the resume buffer).
    let mut attackers = Vec::new();
    for i in 0..3 {
        let mut x = hello(&srv, &format!("x{i}")).await;
        let room = create(&mut x, None).await;
        join(&mut x, &room).await;
        let mut v = hello(&srv, &format!("v{i}")).await;
        let jv = join(&mut v, &room).await;
        drop(v);
        recv_type(&mut x, "peer-reconnecting").await;
        attackers.push((x, jv["peerId"].clone()));
    }
    // Three rooms where the victim is connected but never reads, with a tiny receive window.
    for i in 0..3 {
        let mut x = hello(&srv, &format!("y{i}")).await;
        let room = create(&mut x, None).await;
        join(&mut x, &room).await;
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        let tcp = sock.connect(srv.http_addr()).await.unwrap();
        let url = format!("ws://{}/v1/ws", srv.http_addr());
        let (mut v, _) = tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(tcp))
            .await
            .unwrap();
        send(
            &mut v,
            json!({"type": "hello", "token": token(&srv, &format!("w{i}"), None)}),
        )
        .await;
        recv_type(&mut v, "ice-servers").await;
        let jv = join(&mut v, &room).await;
        recv_type(&mut x, "peer-joined").await;
        attackers.push((x, jv["peerId"].clone()));
        // `v` is kept open and never read.
        std::mem::forget(v);
    }
    let mut a = hello(&srv, "alice").await;
    let room = create(&mut a, None).await;
    join(&mut a, &room).await;
    let mut b = hello(&srv, "bob").await;
    join(&mut b, &room).await;
    recv_type(&mut a, "peer-joined").await;
    for round in 0..40 {
        for (x, to) in attackers.iter_mut() {
            for _ in 0..5 {
                send(x, json!({"type": "signal", "to": to, "data": pad})).await;
            }
        }
        let (outbox, resume) = srv.shared().signaling.buffered_bytes();
        assert!(resume <= resume_max, "resume bytes {resume}");
        assert!(outbox <= outbox_max, "outbox bytes {outbox}");
        send(&mut a, json!({"type": "signal", "data": {"round": round}})).await;
        let s = recv_type(&mut b, "signal").await;
        assert_eq!(s["data"]["round"], round, "the legitimate pair is served");
    }
    assert!(
        metric(
            &srv,
            "switchboard_dropped_total{reason=\"ws_resume_evicted\"}"
        ) > 0.0
    );
    let refused = metric(&srv, "switchboard_dropped_total{reason=\"ws_outbox_full\"}")
        + metric(
            &srv,
            "switchboard_dropped_total{reason=\"ws_outbox_total\"}",
        );
    assert!(refused > 0.0);
    srv.shutdown();
    srv.wait().await;
}

#[tokio::test]
async fn renewals_stop_at_the_maximum_login_age_and_the_socket_closes() {
    // Renewed every second (half the 2 s session TTL); the login may last 4 s in all.
    let srv = start(
        "",
        "[auth]\nsession_ttl_secs = 2\nmax_session_age_secs = 4\n\
         turn_credential_ttl_secs = 3600\n",
    )
    .await;
    let login = switchboard::auth::unix_now();
    let mut ws = connect(&srv).await;
    send(
        &mut ws,
        json!({"type": "hello", "token": token(&srv, "stays-forever", None)}),
    )
    .await;
    recv_type(&mut ws, "welcome").await;
    let mut pushes = 0;
    let closed_with = loop {
        let m = tokio::time::timeout(Duration::from_secs(8), ws.next())
            .await
            .expect("a frame or the close within 8 s")
            .expect("socket open")
            .expect("frame ok");
        match m {
            Message::Text(t) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["type"] == "ice-servers" {
                    pushes += 1;
                    // Neither the session token nor the TURN credential reaches past the
                    // login's end, although the TURN TTL is an hour.
                    assert!(v["tokenExpiresAt"].as_u64().unwrap() <= login + 5, "{v}");
                    assert!(v["expiresAt"].as_u64().unwrap() <= login + 5, "{v}");
                    // The renewed token itself is refused once the login is too old.
                    let tok = v["token"].as_str().unwrap();
                    let s = srv.shared().auth.verify_session(tok, login + 5);
                    assert!(s.is_err(), "{s:?}");
                } else {
                    assert_eq!(v["type"], "error", "{v}");
                    assert_eq!(v["code"], "expired_token", "{v}");
                }
            }
            Message::Close(Some(f)) => break u16::from(f.code),
            Message::Close(None) => panic!("closed without a code"),
            _ => {}
        }
    };
    assert_eq!(closed_with, 4003);
    assert!(pushes >= 3, "renewed while the login was young: {pushes}");
    let elapsed = switchboard::auth::unix_now() - login;
    assert!((3..=6).contains(&elapsed), "closed after {elapsed} s");
    assert!(metric(&srv, "switchboard_auth_failures_total{reason=\"too_old\"}") >= 1.0);
    // A fresh login is served at once.
    let _ws = hello(&srv, "stays-forever").await;
    srv.shutdown();
    srv.wait().await;
}
