//! The per-connection task of a PeerJS WebSocket: checks `key`, `id` and `token` (or the
//! session), registers the id in the realm, then relays `OFFER`/`ANSWER`/`CANDIDATE`/`LEAVE`/
//! `EXPIRE` with `src` stamped by the server, under the `[signaling]` byte, rate and
//! dead-peer bounds. Bad input gets the PeerJS error shape and the socket keeps serving.

use crate::signaling::conn::RateLimit;
use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::SinkExt;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::core::Registered;
use super::router::{Claimed, RemoteMsg};
use super::{Deps, Out, PeerJs, PROTOCOL};
use crate::auth::unix_now;
use crate::config::PeerJsAuth;
use crate::lifecycle::shutdown_signal;

/// The query of the WebSocket URL, as the `peerjs` client writes it.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct Params {
    /// The client's `key` option.
    pub key: Option<String>,
    /// The id the client asks for.
    pub id: Option<String>,
    /// The client's random token (open auth) or a session token (session auth).
    pub token: Option<String>,
}

/// Longest id accepted (the client's own rule has no bound; ours keeps maps small).
pub const MAX_ID_LEN: usize = 64;
/// Longest `token` accepted: a session token fits comfortably.
const MAX_TOKEN_LEN: usize = 2048;

/// Whether `id` follows the `peerjs` client's id rule (`^[A-Za-z0-9]+(?:[ _-][A-Za-z0-9]+)*$`),
/// within [`MAX_ID_LEN`] bytes.
pub fn valid_peer_id(id: &str) -> bool {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return false;
    }
    let mut prev_sep = true;
    for b in id.bytes() {
        let sep = matches!(b, b' ' | b'_' | b'-');
        if sep && prev_sep || !sep && !b.is_ascii_alphanumeric() {
            return false;
        }
        prev_sep = sep;
    }
    !prev_sep
}

/// `{"type":<ty>,"payload":{"msg":<msg>}}`, the shape of every PeerJS server notice.
pub fn notice(ty: &str, msg: &str) -> String {
    serde_json::json!({"type": ty, "payload": {"msg": msg}}).to_string()
}

/// A message from the client, parsed once; `payload` stays raw JSON, relayed byte for byte.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Incoming<'a> {
    #[serde(rename = "type", borrow)]
    ty: Option<Cow<'a, str>>,
    #[serde(borrow)]
    dst: Option<Cow<'a, str>>,
    #[serde(borrow)]
    payload: Option<&'a RawValue>,
}

/// The relayed form: `{"type","src","dst","payload"}` with `src` set by the server.
fn relayed(ty: &str, src: &str, dst: &str, payload: Option<&RawValue>) -> String {
    let q = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into());
    let mut t =
        String::with_capacity(48 + src.len() + dst.len() + payload.map_or(0, |p| p.get().len()));
    t.push_str("{\"type\":\"");
    t.push_str(ty);
    t.push_str("\",\"src\":");
    t.push_str(&q(src));
    t.push_str(",\"dst\":");
    t.push_str(&q(dst));
    if let Some(p) = payload {
        t.push_str(",\"payload\":");
        t.push_str(p.get());
    }
    t.push('}');
    t
}

/// What handling one message asks of the task.
enum Step {
    Go,
    Reply(&'static str, String),
    Leave,
}

async fn send(ws: &mut WebSocket, deps: &Deps, kind: &str, text: String, t: Duration) -> bool {
    deps.metrics
        .protocol_messages
        .with_label_values(&[PROTOCOL, "out", kind])
        .inc();
    matches!(
        tokio::time::timeout(t, ws.send(Message::Text(text.into()))).await,
        Ok(Ok(()))
    )
}

async fn close(ws: &mut WebSocket, code: u16, reason: &'static str, t: Duration) {
    let f = Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }));
    let _ = tokio::time::timeout(t, ws.send(f)).await;
}

/// Serve one upgraded PeerJS WebSocket until it closes, idles out, is taken over or kicked.
pub async fn serve(pj: Arc<PeerJs>, deps: Deps, mut ws: WebSocket, params: Params) {
    let m = deps.metrics.clone();
    let gauge = m.protocol_connections_active.with_label_values(&[PROTOCOL]);
    gauge.inc();
    serve_inner(&pj, &deps, &mut ws, params).await;
    gauge.dec();
}

async fn serve_inner(pj: &Arc<PeerJs>, deps: &Deps, ws: &mut WebSocket, p: Params) {
    let lim = &pj.limits;
    let dead_after = Duration::from_secs(lim.dead_peer_timeout_secs.max(1));
    let wt = dead_after;
    let (Some(key), Some(id), Some(token)) = (p.key, p.id, p.token) else {
        let t = notice("ERROR", "No id, token, or key supplied to websocket server");
        send(ws, deps, "ERROR", t, wt).await;
        close(ws, 1008, "missing parameters", wt).await;
        return;
    };
    if key != pj.cfg.key {
        let t = notice("INVALID-KEY", "Invalid key provided");
        send(ws, deps, "INVALID-KEY", t, wt).await;
        close(ws, 1008, "invalid key", wt).await;
        return;
    }
    if !valid_peer_id(&id) || token.is_empty() || token.len() > MAX_TOKEN_LEN {
        let t = notice("ERROR", "Invalid id or token");
        send(ws, deps, "ERROR", t, wt).await;
        close(ws, 1008, "invalid id", wt).await;
        return;
    }
    let session = match pj.cfg.auth {
        PeerJsAuth::Open => None,
        PeerJsAuth::Session => match deps.auth.verify_session(&token, unix_now()) {
            Ok(s) => Some(s),
            Err(e) => {
                m_auth_failure(deps, e.reason());
                let t = notice("ERROR", &format!("session token refused: {e}"));
                send(ws, deps, "ERROR", t, wt).await;
                close(ws, 1008, "unauthenticated", wt).await;
                return;
            }
        },
    };
    let user = session.as_ref().map(|s| s.user.clone());
    pj.ensure_timer(&deps.lifecycle);
    // Cluster mode: the id is claimed cluster-wide first; another holder anywhere gets
    // ID-TAKEN, the same holder takes it over from the node it was on.
    let mut claimed = None;
    if let Some(r) = &pj.router {
        match r.claim(&id, &super::holder(&token, user.as_deref())).await {
            Claimed::Taken => {
                deps.metrics
                    .drops
                    .with_label_values(&["peerjs_id_taken"])
                    .inc();
                send(ws, deps, "ID-TAKEN", notice("ID-TAKEN", "ID is taken"), wt).await;
                close(ws, 1008, "id taken", wt).await;
                return;
            }
            Claimed::Mine { waiting, previous } => claimed = Some((r.clone(), waiting, previous)),
            Claimed::Unavailable => {}
        }
    }
    let (me, outbox) = pj.open();
    let reg = pj.apply(|c| match c.register(&id, &token, user.as_deref(), me) {
        Registered::Open(held) => (Ok((true, None)), held),
        Registered::TakenBack { old, held } => (Ok((false, old)), held),
        Registered::IdTaken => (Err("ID-TAKEN"), Vec::new()),
        Registered::Full => (Err("full"), Vec::new()),
    });
    let old = match reg {
        Ok((fresh, old)) => {
            if fresh {
                pj.joined(&id, user.as_deref());
            }
            old
        }
        Err(why) => {
            pj.forget(me);
            if why == "full" {
                if let Some((r, _, None)) = &claimed {
                    r.release(vec![id.clone()]);
                }
            }
            if why == "ID-TAKEN" {
                deps.metrics
                    .drops
                    .with_label_values(&["peerjs_id_taken"])
                    .inc();
                send(ws, deps, "ID-TAKEN", notice("ID-TAKEN", "ID is taken"), wt).await;
                close(ws, 1008, "id taken", wt).await;
            } else {
                deps.metrics.drops.with_label_values(&["peerjs_full"]).inc();
                let t = notice("ERROR", "Server has reached its concurrent user limit");
                send(ws, deps, "ERROR", t, wt).await;
                close(ws, 1013, "full", wt).await;
            }
            return;
        }
    };
    if let Some(old) = old {
        // The holder came back: its old socket goes, the id stays.
        pj.close_conn(old, 4000, "taken back by the same holder");
    }
    if let Some((r, waiting, previous)) = claimed {
        // The node the holder left closes its socket; nodes holding messages for the id send
        // them here (after the `OPEN` below is queued: they arrive through the outbox).
        if let Some(node) = previous {
            r.send(&node, RemoteMsg::Kick { id: id.clone() });
        }
        for node in waiting {
            r.send(&node, RemoteMsg::Here { id: id.clone() });
        }
    }
    tracing::debug!(peer_id = %id, "peerjs peer registered");
    let mut free = None;
    if send(ws, deps, "OPEN", "{\"type\":\"OPEN\"}".into(), wt).await {
        free = run(pj, deps, ws, &outbox, &id, session.as_ref(), dead_after).await;
    }
    let now = Instant::now();
    if let Some(reason) = free {
        pj.apply(|c| {
            if c.conn_of(&id) == Some(me) {
                c.remove(&id, reason);
            }
            ((), Vec::new())
        });
    } else {
        pj.apply(|c| (c.unregister(now, &id, me), Vec::new()));
    }
    pj.forget(me);
}

fn m_auth_failure(deps: &Deps, reason: &str) {
    deps.metrics
        .auth_failures
        .with_label_values(&[reason])
        .inc();
}

/// The connected loop; returns why the id is to be freed at once (`left`: `LEAVE` without
/// `dst`; `revoked`), or `None` when the socket just went (a session user's id stays reserved).
async fn run(
    pj: &Arc<PeerJs>,
    deps: &Deps,
    ws: &mut WebSocket,
    outbox: &super::Outbox,
    id: &str,
    session: Option<&crate::auth::Session>,
    dead_after: Duration,
) -> Option<&'static str> {
    let lim = &pj.limits;
    let m = &deps.metrics;
    let wt = dead_after;
    let mut bucket = RateLimit::new(lim.rate_per_sec, lim.rate_burst, Instant::now());
    let every = Duration::from_secs(lim.ping_interval_secs.max(1));
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stop = std::pin::pin!(shutdown_signal(deps.lifecycle.subscribe()));
    let mut last_heard = Instant::now();
    loop {
        tokio::select! {
            incoming = ws.recv() => {
                let msg = match incoming {
                    Some(Ok(msg)) => msg,
                    Some(Err(e)) => {
                        let big = e.into_inner().downcast_ref::<tungstenite::Error>()
                            .is_some_and(|e| matches!(e, tungstenite::Error::Capacity(_)));
                        if big {
                            m.drops.with_label_values(&["peerjs_frame_too_large"]).inc();
                            close(ws, 1009, "message too large", wt).await;
                        }
                        return None;
                    }
                    None => return None,
                };
                last_heard = Instant::now();
                let text = match msg {
                    Message::Text(t) => t,
                    Message::Binary(_) => {
                        let t = notice("ERROR", "Invalid message: send JSON text");
                        if !send(ws, deps, "ERROR", t, wt).await { return None; }
                        continue;
                    }
                    Message::Close(_) => return None,
                    _ => continue,
                };
                let step = if text.len() > lim.max_frame_bytes {
                    m.drops.with_label_values(&["peerjs_frame_too_large"]).inc();
                    Step::Reply("ERROR", notice("ERROR", &format!("Message too large: the limit is {} bytes", lim.max_frame_bytes)))
                } else if !bucket.allow(last_heard) {
                    m.drops.with_label_values(&["peerjs_rate_limited"]).inc();
                    Step::Reply("ERROR", notice("ERROR", "Too many messages; slow down"))
                } else {
                    handle(pj, deps, id, text.as_str()).await
                };
                match step {
                    Step::Go => {}
                    Step::Reply(kind, t) => {
                        if !send(ws, deps, kind, t, wt).await { return None; }
                    }
                    Step::Leave => {
                        close(ws, 1000, "left", wt).await;
                        return Some("left");
                    }
                }
            }
            out = outbox.recv() => {
                match out {
                    Some(Out::Text(t)) => {
                        m.protocol_messages.with_label_values(&[PROTOCOL, "out", "relay"]).inc();
                        let mut ok = tokio::time::timeout(wt, ws.feed(Message::Text(t.into()))).await.is_ok_and(|r| r.is_ok());
                        // Write what else is queued, then flush once.
                        let mut n = 1;
                        while ok && n < 64 {
                            let Some(t) = outbox.try_recv_text() else { break };
                            m.protocol_messages.with_label_values(&[PROTOCOL, "out", "relay"]).inc();
                            ok = tokio::time::timeout(wt, ws.feed(Message::Text(t.into()))).await.is_ok_and(|r| r.is_ok());
                            n += 1;
                        }
                        ok = ok && tokio::time::timeout(wt, ws.flush()).await.is_ok_and(|r| r.is_ok());
                        if !ok { return None; }
                    }
                    Some(Out::Close(code, why)) => {
                        if code == 4005 {
                            send(ws, deps, "ERROR", notice("ERROR", "The user was revoked"), wt).await;
                        }
                        close(ws, code, why, wt).await;
                        // Taken over or kicked: the id is not this socket's to free. Revoked:
                        // freed at once, with no reservation.
                        return (code == 4005).then_some("revoked");
                    }
                    None => {
                        m.drops.with_label_values(&["peerjs_slow_consumer"]).inc();
                        close(ws, 4002, "too slow", wt).await;
                        return None;
                    }
                }
            }
            _ = tick.tick() => {
                if let Some(s) = session {
                    if deps.auth.is_revoked(&s.user, Some(deps.auth.login_time(s))) {
                        send(ws, deps, "ERROR", notice("ERROR", "The user was revoked"), wt).await;
                        close(ws, 4005, "revoked", wt).await;
                        // A revoked user keeps no reservation.
                        return Some("revoked");
                    }
                }
                if last_heard.elapsed() >= dead_after {
                    m.drops.with_label_values(&["peerjs_dead_peer"]).inc();
                    return None;
                }
                let w = tokio::time::timeout(wt, ws.send(Message::Ping(Vec::new().into()))).await;
                if !matches!(w, Ok(Ok(()))) { return None; }
            }
            _ = &mut stop => {
                close(ws, 1001, "server shutting down", wt).await;
                return None;
            }
        }
    }
}

/// One text message from `src`.
async fn handle(pj: &PeerJs, deps: &Deps, src: &str, text: &str) -> Step {
    let count = |ty: &str| {
        deps.metrics
            .protocol_messages
            .with_label_values(&[PROTOCOL, "in", ty])
            .inc()
    };
    let Ok(msg) = serde_json::from_str::<Incoming<'_>>(text) else {
        count("invalid");
        return Step::Reply(
            "ERROR",
            notice("ERROR", "Invalid message: not a JSON object"),
        );
    };
    let ty: &'static str = match msg.ty.as_deref() {
        Some("HEARTBEAT") => {
            count("HEARTBEAT");
            return Step::Go;
        }
        Some("OFFER") => "OFFER",
        Some("ANSWER") => "ANSWER",
        Some("CANDIDATE") => "CANDIDATE",
        Some("LEAVE") => "LEAVE",
        Some("EXPIRE") => "EXPIRE",
        _ => {
            count("unknown");
            return Step::Reply("ERROR", notice("ERROR", "Unknown message type"));
        }
    };
    count(ty);
    let Some(dst) = msg.dst.as_deref() else {
        if ty == "LEAVE" {
            // The client leaves the server: its id is freed at once.
            return Step::Leave;
        }
        return Step::Reply("ERROR", notice("ERROR", "Missing dst"));
    };
    if !valid_peer_id(dst) {
        return Step::Reply("ERROR", notice("ERROR", "Invalid dst"));
    }
    let t = relayed(ty, src, dst, msg.payload);
    pj.relay(&deps.metrics, src, ty, dst, t).await;
    Step::Go
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_the_client_rule() {
        for ok in [
            "a",
            "abc-def",
            "a b_c-1",
            "0f8fad5b-d9cb-469f-a165-70867728950e",
        ] {
            assert!(valid_peer_id(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "a--b", "a/b", "ä", "a\"", &"x".repeat(65)] {
            assert!(!valid_peer_id(bad), "{bad}");
        }
    }

    #[test]
    fn relayed_messages_carry_the_servers_src_and_the_raw_payload() {
        let p: Box<RawValue> = serde_json::from_str(r#"{"sdp":"v=0\r\n","n":[1,2]}"#).unwrap();
        let t = relayed("OFFER", "a\"b", "c", Some(&p));
        let v: serde_json::Value = serde_json::from_str(&t).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type":"OFFER","src":"a\"b","dst":"c","payload":{"sdp":"v=0\r\n","n":[1,2]}})
        );
        let v: serde_json::Value = serde_json::from_str(&relayed("LEAVE", "a", "c", None)).unwrap();
        assert_eq!(v, serde_json::json!({"type":"LEAVE","src":"a","dst":"c"}));
    }
}
