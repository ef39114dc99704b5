//! The PeerJS server protocol against the in-process server, spoken as the `peerjs` 1.x client
//! speaks it: ids and tokens, session-bound ids, held messages and EXPIRE, bad input, and the
//! HTTP side. The real `peerjs` client in Chromium is in `tests/it/peerjs_browser.rs`.

use futures_util::SinkExt;
use serde_json::{json, Value};
use std::time::Duration;
use switchboard::{Config, RunningServer, Server};
use tokio_tungstenite::tungstenite::Message;

use crate::support::ws::{next_within, recv as next, send, Ws};

const ADMIN: &str = "admin-token-0123456789";

/// `POST` a server API route with the admin token.
async fn admin_post(srv: &RunningServer, path: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("http://{}{path}", srv.http_addr()))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

async fn start(peerjs: &str) -> RunningServer {
    start_with("max_frame_bytes = 4096", peerjs).await
}

async fn start_with(signaling: &str, peerjs: &str) -> RunningServer {
    let text = format!(
        "[http]\nlisten = \"127.0.0.1:0\"\nadmin_api = true\n\
         [turn]\nlisten = [\"127.0.0.1:0\"]\n\
         [auth]\nadmin_tokens = [\"{ADMIN}\"]\n\
         [signaling]\n{signaling}\n[peerjs]\nenabled = true\n{peerjs}\n"
    );
    Server::new(Config::from_toml(&text).expect("valid test config"))
        .start()
        .await
        .expect("server starts")
}

fn session(srv: &RunningServer, user: &str) -> String {
    srv.shared()
        .auth
        .issue_session(user, None, switchboard::auth::unix_now())
        .0
}

async fn connect(srv: &RunningServer, key: &str, id: &str, token: &str) -> Ws {
    let url = format!(
        "ws://{}/peerjs/peerjs?key={key}&id={id}&token={token}&version=1.5.5",
        srv.http_addr()
    );
    tokio_tungstenite::connect_async(url)
        .await
        .expect("ws connects")
        .0
}

/// The socket closes (after any messages, which are returned).
async fn closes(ws: &mut Ws) -> Vec<Value> {
    let mut seen = Vec::new();
    while let Some(v) = next_within(ws, 5).await {
        seen.push(v);
    }
    seen
}

async fn open(srv: &RunningServer, id: &str, token: &str) -> Ws {
    let mut ws = connect(srv, "peerjs", id, token).await;
    assert_eq!(next(&mut ws).await, json!({"type": "OPEN"}), "{id}");
    ws
}

/// Send a message that certainly gets an answer, and return everything up to that answer:
/// proves that nothing else (say, an answer to a HEARTBEAT) was sent before it.
async fn drain_until_error(ws: &mut Ws) -> Vec<Value> {
    send(ws, json!({"type": "NOPE"})).await;
    let mut seen = Vec::new();
    loop {
        let v = next(ws).await;
        let done = v["type"] == "ERROR";
        seen.push(v);
        if done {
            return seen;
        }
    }
}

#[tokio::test]
async fn messages_relay_with_the_servers_src_and_another_token_gets_id_taken() {
    let srv = start("auth = \"open\"").await;
    let mut a = open(&srv, "alice", "tokA").await;
    let mut b = open(&srv, "bob", "tokB").await;
    // HEARTBEAT gets no answer.
    send(&mut a, json!({"type": "HEARTBEAT"})).await;
    let seen = drain_until_error(&mut a).await;
    assert_eq!(seen.len(), 1, "{seen:?}");
    // A forged src is replaced by the sender's id; the payload is relayed as written.
    let payload =
        json!({"sdp": {"type": "offer", "sdp": "v=0\r\n"}, "type": "data", "connectionId": "dc_1"});
    send(
        &mut a,
        json!({"type": "OFFER", "src": "mallory", "dst": "bob", "payload": payload}),
    )
    .await;
    assert_eq!(
        next(&mut b).await,
        json!({"type": "OFFER", "src": "alice", "dst": "bob", "payload": payload})
    );
    for ty in ["ANSWER", "CANDIDATE"] {
        send(
            &mut b,
            json!({"type": ty, "dst": "alice", "payload": {"n": ty}}),
        )
        .await;
        assert_eq!(
            next(&mut a).await,
            json!({"type": ty, "src": "bob", "dst": "alice", "payload": {"n": ty}})
        );
    }
    // The same id with another token: ID-TAKEN, then the socket is closed.
    let mut thief = connect(&srv, "peerjs", "alice", "other").await;
    let seen = closes(&mut thief).await;
    assert_eq!(
        seen,
        vec![json!({"type": "ID-TAKEN", "payload": {"msg": "ID is taken"}})]
    );
    // Alice still holds her id.
    send(&mut b, json!({"type": "LEAVE", "dst": "alice"})).await;
    assert_eq!(
        next(&mut a).await,
        json!({"type": "LEAVE", "src": "bob", "dst": "alice"})
    );
    let m = srv.shared().metrics.render();
    assert!(
        m.contains("switchboard_protocol_connections_active{protocol=\"peerjs\"} 2"),
        "{m}"
    );
    assert!(
        m.contains(
            "switchboard_protocol_messages_total{direction=\"in\",protocol=\"peerjs\",type=\"OFFER\"} 1"
        ),
        "{m}"
    );
}

#[tokio::test]
async fn the_holders_token_takes_its_id_back_even_while_the_old_socket_is_registered() {
    let srv = start("auth = \"open\"").await;
    let mut old = open(&srv, "alice", "tokA").await;
    let mut b = open(&srv, "bob", "tokB").await;
    // reconnect(): the same token while the old socket is still up.
    let mut new = open(&srv, "alice", "tokA").await;
    assert_eq!(closes(&mut old).await, Vec::<Value>::new());
    send(
        &mut b,
        json!({"type": "OFFER", "dst": "alice", "payload": 1}),
    )
    .await;
    assert_eq!(next(&mut new).await["src"], "bob");
    // The old socket's close did not free the id: another token is still refused.
    let mut thief = connect(&srv, "peerjs", "alice", "other").await;
    assert_eq!(closes(&mut thief).await[0]["type"], "ID-TAKEN");
    // Once the holder's socket is gone, the id is free again (open auth, as the PeerJS server).
    drop(new);
    let mut again = None;
    for _ in 0..50 {
        let mut ws = connect(&srv, "peerjs", "alice", "other").await;
        if next(&mut ws).await["type"] == "OPEN" {
            again = Some(ws);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        again.is_some(),
        "the id was not freed after its socket closed"
    );
}

#[tokio::test]
async fn an_unknown_key_or_missing_parameters_are_refused_in_the_peerjs_shape() {
    let srv = start("auth = \"open\"").await;
    let mut ws = connect(&srv, "wrong", "alice", "tok").await;
    assert_eq!(
        closes(&mut ws).await,
        vec![json!({"type": "INVALID-KEY", "payload": {"msg": "Invalid key provided"}})]
    );
    let url = format!("ws://{}/peerjs/peerjs?key=peerjs&id=alice", srv.http_addr());
    let mut ws = tokio_tungstenite::connect_async(url).await.unwrap().0;
    let seen = closes(&mut ws).await;
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0]["type"], "ERROR");
    assert!(seen[0]["payload"]["msg"].is_string());
    // An id the client itself would refuse.
    let mut ws = connect(&srv, "peerjs", "a--b", "tok").await;
    assert_eq!(closes(&mut ws).await[0]["type"], "ERROR");
}

#[tokio::test]
async fn held_messages_reach_a_late_peer_or_expire_once_per_sender_and_target() {
    let srv = start("auth = \"open\"\nexpire_timeout_secs = 1").await;
    let mut a = open(&srv, "alice", "tokA").await;
    let mut c = open(&srv, "carol", "tokC").await;
    // Held for a peer that connects in time, and delivered in order after OPEN.
    send(&mut a, json!({"type": "OFFER", "dst": "bob", "payload": 1})).await;
    send(
        &mut a,
        json!({"type": "CANDIDATE", "dst": "bob", "payload": 2}),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut b = open(&srv, "bob", "tokB").await;
    assert_eq!(next(&mut b).await["payload"], 1);
    assert_eq!(next(&mut b).await["payload"], 2);
    // Three messages from alice and one from carol to a ghost: one EXPIRE each.
    for n in 0..3 {
        send(
            &mut a,
            json!({"type": "CANDIDATE", "dst": "ghost", "payload": n}),
        )
        .await;
    }
    send(
        &mut c,
        json!({"type": "OFFER", "dst": "ghost", "payload": 0}),
    )
    .await;
    let expire = |dst: &str| json!({"type": "EXPIRE", "src": "ghost", "dst": dst});
    assert_eq!(next_within(&mut a, 3).await, Some(expire("alice")));
    assert_eq!(next_within(&mut c, 3).await, Some(expire("carol")));
    // No second EXPIRE follows, and the ghost connecting later gets nothing stale.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(drain_until_error(&mut a).await.len(), 1);
    let mut ghost = open(&srv, "ghost", "tokG").await;
    assert_eq!(drain_until_error(&mut ghost).await.len(), 1);
}

#[tokio::test]
async fn held_messages_are_bounded_and_the_overflow_expires_at_once() {
    let srv = start("auth = \"open\"\nmax_held_per_peer = 2").await;
    let mut a = open(&srv, "alice", "tokA").await;
    for n in 0..3 {
        send(
            &mut a,
            json!({"type": "CANDIDATE", "dst": "ghost", "payload": n}),
        )
        .await;
    }
    // The third does not fit: EXPIRE at once, long before the 5 s hold ends.
    assert_eq!(
        next_within(&mut a, 2).await,
        Some(json!({"type": "EXPIRE", "src": "ghost", "dst": "alice"}))
    );
    // LEAVE and EXPIRE to an absent id are not held (nothing comes back for them).
    send(&mut a, json!({"type": "LEAVE", "dst": "nobody"})).await;
    send(&mut a, json!({"type": "EXPIRE", "dst": "nobody"})).await;
    assert_eq!(drain_until_error(&mut a).await.len(), 1);
}

#[tokio::test]
async fn session_auth_binds_the_id_to_the_user_and_the_same_user_takes_it_back() {
    let srv = start("auth = \"session\"").await;
    let ann = session(&srv, "ann");
    let bob = session(&srv, "bob");
    let a = open(&srv, "desk-1", &ann).await;
    let mut b = open(&srv, "desk-2", &bob).await;
    // Bob cannot take Ann's id, not even with Ann's id and his own valid session.
    let mut t = connect(&srv, "peerjs", "desk-1", &bob).await;
    assert_eq!(closes(&mut t).await[0]["type"], "ID-TAKEN");
    // A token that is not a session is refused.
    let mut t = connect(&srv, "peerjs", "desk-3", "random-peerjs-token").await;
    let seen = closes(&mut t).await;
    assert_eq!(seen[0]["type"], "ERROR", "{seen:?}");
    // Ann's socket drops without a LEAVE; within the resume window Bob still cannot take
    // the id, and Ann (with a fresh login) gets it back.
    drop(a);
    // Wait until the server has seen the drop (only Bob's socket left open).
    let gauge = "switchboard_protocol_connections_active{protocol=\"peerjs\"} 1\n";
    for _ in 0..100 {
        if srv.shared().metrics.render().contains(gauge) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(srv.shared().metrics.render().contains(gauge));
    let mut t = connect(&srv, "peerjs", "desk-1", &bob).await;
    assert_eq!(closes(&mut t).await[0]["type"], "ID-TAKEN");
    let ann2 = session(&srv, "ann");
    let mut a = open(&srv, "desk-1", &ann2).await;
    send(
        &mut b,
        json!({"type": "OFFER", "dst": "desk-1", "payload": "hi"}),
    )
    .await;
    assert_eq!(next(&mut a).await["src"], "desk-2");
    // Revoking Ann through the server API closes her socket at once and frees her id.
    let (code, v) = admin_post(&srv, "/v1/admin/users/ann/revoke").await;
    assert_eq!((code, &v["peersRemoved"]), (200, &json!(1)), "{v}");
    let seen = closes(&mut a).await;
    assert_eq!(seen.last().map(|v| v["type"].clone()), Some(json!("ERROR")));
    // Her old session no longer opens anything; the id is free for Bob now.
    let mut t = connect(&srv, "peerjs", "desk-1", &ann2).await;
    assert_eq!(closes(&mut t).await[0]["type"], "ERROR");
    let mut taken = None;
    for _ in 0..50 {
        let mut ws = connect(&srv, "peerjs", "desk-1", &bob).await;
        if next(&mut ws).await["type"] == "OPEN" {
            taken = Some(ws);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(taken.is_some(), "a revoked user's id stayed reserved");
}

#[tokio::test]
async fn the_server_api_kicks_a_peerjs_id() {
    let srv = start("auth = \"open\"").await;
    let mut a = open(&srv, "alice", "tokA").await;
    let (code, v) = admin_post(&srv, "/v1/admin/peerjs/alice/kick").await;
    assert_eq!(
        (code, v),
        (200, json!({"peerjsId": "alice", "kicked": true}))
    );
    assert!(closes(&mut a).await.is_empty());
    // The id is free at once, for any token.
    let _b = open(&srv, "alice", "someone-else").await;
    let (code, _) = admin_post(&srv, "/v1/admin/peerjs/nobody/kick").await;
    assert_eq!(code, 404);
}

#[tokio::test]
async fn bad_input_gets_the_peerjs_error_shape_and_the_socket_keeps_serving() {
    let srv = start("auth = \"open\"").await;
    let mut a = open(&srv, "alice", "tokA").await;
    let mut b = open(&srv, "bob", "tokB").await;
    let big = "x".repeat(5000);
    for bad in [
        "{not json".to_string(),
        "[1,2,3]".to_string(),
        json!({"type": "SHOUT", "dst": "bob"}).to_string(),
        json!({"type": "OFFER", "payload": 1}).to_string(),
        json!({"type": "OFFER", "dst": "../etc", "payload": 1}).to_string(),
        json!({"type": "OFFER", "dst": "bob", "payload": big}).to_string(),
    ] {
        a.send(Message::Text(bad.clone().into())).await.unwrap();
        let v = next(&mut a).await;
        assert_eq!(v["type"], "ERROR", "{bad:.40}: {v}");
        assert!(v["payload"]["msg"].is_string(), "{v}");
    }
    a.send(Message::Binary(vec![1, 2, 3].into())).await.unwrap();
    assert_eq!(next(&mut a).await["type"], "ERROR");
    // Nothing of that reached bob, and alice's socket still relays.
    send(
        &mut a,
        json!({"type": "OFFER", "dst": "bob", "payload": "ok"}),
    )
    .await;
    assert_eq!(next(&mut b).await["payload"], "ok");
    // A message beyond four times the limit closes that socket only.
    let huge = json!({"type": "OFFER", "dst": "bob", "payload": "y".repeat(20_000)}).to_string();
    let _ = a.send(Message::Text(huge.into())).await;
    assert!(closes(&mut a).await.is_empty());
    let mut c = open(&srv, "carol", "tokC").await;
    send(
        &mut c,
        json!({"type": "OFFER", "dst": "bob", "payload": "still"}),
    )
    .await;
    assert_eq!(next(&mut b).await["payload"], "still");
}

#[tokio::test]
async fn the_http_side_hands_out_ids_and_lists_peers_only_with_discovery() {
    let srv = start("auth = \"open\"").await;
    let base = format!("http://{}/peerjs", srv.http_addr());
    let http = reqwest::Client::new();
    let id = http
        .get(format!("{base}/peerjs/id?ts=123"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(id.len(), 36, "{id}");
    let _ws = open(&srv, &id, "tok").await;
    let r = http.get(format!("{base}/wrong/id")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .get(format!("{base}/peerjs/peers"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    let srv2 = start("auth = \"open\"\nallow_discovery = true").await;
    let _a = open(&srv2, "alice", "tok").await;
    let r = http
        .get(format!("http://{}/peerjs/peerjs/peers", srv2.http_addr()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap(), json!(["alice"]));
}

#[test]
fn the_vendored_client_is_the_npm_packages_build() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let npm =
        std::fs::read_to_string(dir.join("tests/peerjs/node_modules/peerjs/dist/peerjs.min.js"))
            .expect(
                "the peerjs npm package (scripts/install-test-deps.sh runs npm ci in tests/peerjs)",
            );
    let npm: Vec<&str> = npm
        .lines()
        .filter(|l| !l.starts_with("//# sourceMappingURL="))
        .collect();
    let ours = std::fs::read_to_string(dir.join("web/vendor/peerjs.min.js")).unwrap();
    assert_eq!(ours.lines().collect::<Vec<_>>(), npm);
}

/// A webhook endpoint that records every POSTed event.
async fn hook_receiver() -> (String, tokio::sync::mpsc::UnboundedReceiver<Value>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: axum::body::Bytes| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(serde_json::from_slice::<Value>(&body).unwrap_or(Value::Null));
                axum::http::StatusCode::OK
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", l.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    (url, rx)
}

#[tokio::test]
async fn peerjs_ids_are_reported_as_peers_of_the_peerjs_pseudo_room() {
    let (url, mut hooks) = hook_receiver().await;
    let srv = start(&format!(
        "auth = \"session\"\n[webhooks]\nurls = [\"{url}\"]\nsecret = \"hook-secret-0123456789\"\n"
    ))
    .await;
    let mut next_hook = async || {
        let v = tokio::time::timeout(Duration::from_secs(5), hooks.recv())
            .await
            .expect("a webhook within 5 s")
            .unwrap();
        (
            v["type"].clone(),
            v["room"].clone(),
            v["peer"].clone(),
            v["user"].clone(),
            v["reason"].clone(),
        )
    };
    let mut a = open(&srv, "desk-1", &session(&srv, "ann")).await;
    assert_eq!(
        next_hook().await,
        (
            json!("peer.joined"),
            json!("peerjs"),
            json!("desk-1"),
            json!("ann"),
            Value::Null
        )
    );
    // The client's LEAVE without dst frees the id at once.
    send(&mut a, json!({"type": "LEAVE"})).await;
    assert!(closes(&mut a).await.is_empty());
    assert_eq!(
        next_hook().await,
        (
            json!("peer.left"),
            json!("peerjs"),
            json!("desk-1"),
            json!("ann"),
            json!("left")
        )
    );
    let _b = open(&srv, "desk-2", &session(&srv, "bob")).await;
    assert_eq!(next_hook().await.0, json!("peer.joined"));
    assert_eq!(
        admin_post(&srv, "/v1/admin/peerjs/desk-2/kick").await.0,
        200
    );
    assert_eq!(
        next_hook().await,
        (
            json!("peer.left"),
            json!("peerjs"),
            json!("desk-2"),
            json!("bob"),
            json!("kicked")
        )
    );
}

#[tokio::test]
async fn the_signaling_rate_and_per_ip_limits_apply_to_peerjs_sockets() {
    let srv = start_with(
        "rate_per_sec = 1\nrate_burst = 3\nmax_connections_per_ip = 2",
        "auth = \"open\"",
    )
    .await;
    let mut a = open(&srv, "alice", "tokA").await;
    let mut b = open(&srv, "bob", "tokB").await;
    // A third socket from the same address is refused in the PeerJS error shape.
    let mut c = connect(&srv, "peerjs", "carol", "tokC").await;
    let seen = closes(&mut c).await;
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0]["type"], "ERROR");
    // Over the burst: an ERROR, and the over-rate message is not relayed.
    for n in 0..4 {
        send(
            &mut a,
            json!({"type": "CANDIDATE", "dst": "bob", "payload": n}),
        )
        .await;
    }
    let v = next(&mut a).await;
    assert_eq!(v["type"], "ERROR", "{v}");
    for n in 0..3 {
        assert_eq!(next(&mut b).await["payload"], n);
    }
    // The socket keeps serving once the bucket refills.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    send(
        &mut a,
        json!({"type": "CANDIDATE", "dst": "bob", "payload": "later"}),
    )
    .await;
    assert_eq!(next(&mut b).await["payload"], "later");
}

#[test]
fn invalid_peerjs_keys_are_refused_by_name() {
    for (toml, key) in [
        ("path = \"peerjs\"", "peerjs.path"),
        ("path = \"/peerjs/\"", "peerjs.path"),
        ("path = \"/v1/peerjs\"", "peerjs.path"),
        ("key = \"\"", "peerjs.key"),
        ("key = \"a/b\"", "peerjs.key"),
        ("expire_timeout_secs = 0", "peerjs.expire_timeout_secs"),
        ("max_peers = 0", "peerjs.max_peers"),
        ("max_held_per_peer = 0", "peerjs.max_held_per_peer"),
    ] {
        let e = Config::from_toml(&format!("[peerjs]\nenabled = true\n{toml}\n"))
            .expect_err(toml)
            .to_string();
        assert!(e.contains(key), "{toml}: {e}");
    }
    let e = Config::from_toml("[peerjs]\nauth = \"maybe\"\n").expect_err("auth");
    assert!(e.to_string().contains("auth"), "{e}");
    assert!(Config::from_toml("[peerjs]\nenabled = true\npath = \"/a/b-c\"\n").is_ok());
}
