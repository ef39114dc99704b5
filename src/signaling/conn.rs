//! The signaling service shell: one task per WebSocket connection that authenticates,
//! enforces limits, feeds requests to the room core and writes out what the bus delivers.

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify};

use super::bus::{Bus, LocalBus, Outbound};
use super::room::{Action, ConnId, Hub, Limits, Member, RoomError};
use crate::auth::{unix_now, AuthError};
use crate::config::SignalingConfig;
use crate::server::{shutdown_signal, Shared};

/// Frame types counted by name; anything else is counted as `unknown`.
const KNOWN_TYPES: &[&str] = &[
    "hello",
    "welcome",
    "create",
    "created",
    "join",
    "joined",
    "leave",
    "left",
    "signal",
    "resume",
    "resumed",
    "peer-joined",
    "peer-left",
    "peer-reconnecting",
    "peer-resumed",
    "ice-servers",
    "ping",
    "pong",
    "ack",
    "error",
];

fn type_label(t: &str) -> &'static str {
    KNOWN_TYPES
        .iter()
        .find(|k| **k == t)
        .copied()
        .unwrap_or("unknown")
}

/// The node's signaling service: the room core behind a lock, and the bus to connections.
pub struct Signaling {
    hub: Mutex<Hub>,
    bus: Box<dyn Bus>,
    next_conn: AtomicU64,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    wake: Notify,
    cfg: SignalingConfig,
}

impl std::fmt::Debug for Signaling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signaling").finish_non_exhaustive()
    }
}

impl Signaling {
    /// A service with the in-process bus.
    pub fn new(cfg: &SignalingConfig) -> Signaling {
        Signaling {
            hub: Mutex::new(Hub::new(Limits {
                room_capacity: cfg.room_capacity,
                max_rooms: cfg.max_rooms,
                resume_grace: Duration::from_secs(cfg.resume_grace_secs),
                resume_buffer: cfg.resume_buffer_frames.max(1),
                empty_room_grace: Duration::from_secs(cfg.empty_room_grace_secs),
            })),
            bus: Box::new(LocalBus::default()),
            next_conn: AtomicU64::new(1),
            per_ip: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            cfg: cfg.clone(),
        }
    }

    /// Run `f` on the room core, then deliver what it produced and refresh the gauges.
    fn apply<R>(&self, shared: &Shared, f: impl FnOnce(&mut Hub, &mut Vec<Action>) -> R) -> R {
        let mut out = Vec::new();
        let (r, rooms, peers) = {
            let mut hub = match self.hub.lock() {
                Ok(h) => h,
                Err(p) => p.into_inner(),
            };
            let r = f(&mut hub, &mut out);
            (r, hub.room_count(), hub.peer_count())
        };
        let m = &shared.metrics;
        m.rooms_active.set(rooms as i64);
        m.peers_active.set(peers as i64);
        for a in &out {
            if let Action::Send(_, v) = a {
                let t = v.get("type").and_then(Value::as_str).unwrap_or("");
                m.signaling_frames
                    .with_label_values(&["out", type_label(t)])
                    .inc();
            }
        }
        let dropped = self.bus.deliver(out);
        if dropped > 0 {
            m.drops
                .with_label_values(&["ws_outbox_full"])
                .inc_by(dropped as u64);
        }
        self.wake.notify_one();
        r
    }

    /// Drive resume windows and empty-room grace until shutdown.
    pub async fn run_timers(self: Arc<Self>, shared: Arc<Shared>) {
        let mut stop = std::pin::pin!(shutdown_signal(shared.lifecycle.subscribe()));
        loop {
            let next = {
                let hub = match self.hub.lock() {
                    Ok(h) => h,
                    Err(p) => p.into_inner(),
                };
                hub.next_deadline()
            };
            let wait = next
                .map(|d| d.saturating_duration_since(Instant::now()))
                .unwrap_or(Duration::from_secs(3600));
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.wake.notified() => continue,
                _ = &mut stop => return,
            }
            let now = Instant::now();
            let expired = self.apply(&shared, |h, out| h.tick(now, out));
            if expired > 0 {
                shared
                    .metrics
                    .resumes
                    .with_label_values(&["expired"])
                    .inc_by(expired as u64);
            }
        }
    }

    /// Count a new connection from `ip`; `false` when the IP is at its limit.
    pub fn admit(&self, ip: IpAddr) -> bool {
        let mut m = match self.per_ip.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let n = m.entry(ip).or_insert(0);
        if *n >= self.cfg.max_connections_per_ip {
            return false;
        }
        *n += 1;
        true
    }

    fn release(&self, ip: IpAddr) {
        let mut m = match self.per_ip.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if let Some(n) = m.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&ip);
            }
        }
    }
}

fn error_frame(code: &str, message: &str, id: Option<&Value>) -> Value {
    let mut v = json!({"type": "error", "code": code, "message": message});
    if let Some(id) = id {
        v["id"] = id.clone();
    }
    v
}

fn with_id(mut v: Value, id: Option<&Value>) -> Value {
    if let Some(id) = id {
        v["id"] = id.clone();
    }
    v
}

/// Per-connection token bucket for incoming frames.
struct RateLimit {
    tokens: f64,
    rate: f64,
    burst: f64,
    at: Instant,
}

impl RateLimit {
    fn allow(&mut self, now: Instant) -> bool {
        self.tokens = (self.tokens
            + now.saturating_duration_since(self.at).as_secs_f64() * self.rate)
            .min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Everything one connection knows about itself.
struct Conn {
    id: ConnId,
    member: Option<Member>,
    host: Option<String>,
    /// When the next `ice-servers` push is due.
    ice_due: Option<Instant>,
}

/// Serve one upgraded WebSocket until it closes, idles out or is replaced.
pub async fn serve(
    sig: Arc<Signaling>,
    shared: Arc<Shared>,
    mut ws: WebSocket,
    ip: IpAddr,
    token: Option<String>,
    host: Option<String>,
) {
    let m = shared.metrics.clone();
    if !sig.admit(ip) {
        m.drops.with_label_values(&["ws_connections_per_ip"]).inc();
        let f = error_frame(
            "too_many_connections",
            "too many connections from this address",
            None,
        );
        let _ = ws.send(Message::Text(f.to_string().into())).await;
        let _ = ws.send(Message::Close(None)).await;
        return;
    }
    m.ws_connections_active.inc();
    let id = sig.next_conn.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::channel::<Outbound>(512);
    sig.bus.attach(id, tx);
    let mut conn = Conn {
        id,
        member: None,
        host,
        ice_due: None,
    };
    let cfg = &sig.cfg;
    let mut rate = RateLimit {
        tokens: cfg.rate_burst as f64,
        rate: cfg.rate_per_sec as f64,
        burst: cfg.rate_burst.max(1) as f64,
        at: Instant::now(),
    };
    let mut stop = std::pin::pin!(shutdown_signal(shared.lifecycle.subscribe()));
    let mut ping = tokio::time::interval(Duration::from_secs(cfg.ping_interval_secs.max(1)));
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let dead_after = Duration::from_secs(cfg.dead_peer_timeout_secs.max(1));
    let mut last_heard = Instant::now();
    let write_timeout = dead_after;
    let mut left_cleanly = false;

    if let Some(t) = token {
        let replies = hello(&shared, &mut conn, &t, None);
        let fatal = replies.iter().any(|v| v["type"] == "error");
        for r in replies {
            if !send(&mut ws, &m, &r, write_timeout).await {
                break;
            }
        }
        if fatal {
            let _ = ws.send(Message::Close(None)).await;
            finish(&sig, &shared, &conn, ip, false);
            return;
        }
    }

    loop {
        let ice_sleep = conn
            .ice_due
            .map(|d| d.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_secs(86_400));
        tokio::select! {
            incoming = ws.recv() => {
                let Some(Ok(msg)) = incoming else { break };
                last_heard = Instant::now();
                let text = match msg {
                    Message::Text(t) => t,
                    Message::Binary(_) => {
                        let f = error_frame("bad_request", "send JSON text frames", None);
                        if !send(&mut ws, &m, &f, write_timeout).await { break; }
                        continue;
                    }
                    Message::Close(_) => break,
                    _ => continue,
                };
                if text.len() > cfg.max_frame_bytes {
                    m.drops.with_label_values(&["ws_frame_too_large"]).inc();
                    let f = error_frame("too_large", &format!("frames are limited to {} bytes", cfg.max_frame_bytes), None);
                    if !send(&mut ws, &m, &f, write_timeout).await { break; }
                    continue;
                }
                if !rate.allow(last_heard) {
                    m.drops.with_label_values(&["ws_rate_limited"]).inc();
                    let f = error_frame("rate_limited", "too many frames; slow down", None);
                    if !send(&mut ws, &m, &f, write_timeout).await { break; }
                    continue;
                }
                let replies = handle(&sig, &shared, &mut conn, text.as_str(), &mut left_cleanly);
                let mut ok = true;
                for r in replies {
                    if !send(&mut ws, &m, &r, write_timeout).await { ok = false; break; }
                }
                if !ok { break; }
            }
            out = rx.recv() => {
                match out {
                    Some(Outbound::Frame(text)) => {
                        let w = tokio::time::timeout(write_timeout, ws.send(Message::Text(text.into()))).await;
                        if !matches!(w, Ok(Ok(()))) { break; }
                    }
                    None => {
                        // The outbox overflowed (a reader slower than its room): close so the
                        // client resumes and the missed frames are replayed in order.
                        m.drops.with_label_values(&["ws_slow_consumer"]).inc();
                        let _ = ws.send(Message::Close(Some(CloseFrame { code: 4002, reason: "too slow; resume".into() }))).await;
                        break;
                    }
                    Some(Outbound::Close) => {
                        // Replaced by a newer connection: the seat is gone, nothing to resume.
                        left_cleanly = true;
                        let _ = ws.send(Message::Close(Some(CloseFrame { code: 4001, reason: "replaced".into() }))).await;
                        break;
                    }
                }
            }
            _ = ping.tick() => {
                if last_heard.elapsed() >= dead_after {
                    m.drops.with_label_values(&["ws_dead_peer"]).inc();
                    break;
                }
                let w = tokio::time::timeout(write_timeout, ws.send(Message::Ping(Vec::new().into()))).await;
                if !matches!(w, Ok(Ok(()))) { break; }
            }
            _ = tokio::time::sleep(ice_sleep), if conn.ice_due.is_some() => {
                if let Some(f) = ice_frame(&shared, &mut conn) {
                    if !send(&mut ws, &m, &f, write_timeout).await { break; }
                }
            }
            _ = &mut stop => {
                let _ = ws.send(Message::Close(Some(CloseFrame { code: 1001, reason: "server shutting down".into() }))).await;
                break;
            }
        }
    }
    finish(&sig, &shared, &conn, ip, left_cleanly);
}

fn finish(sig: &Signaling, shared: &Shared, conn: &Conn, ip: IpAddr, left_cleanly: bool) {
    let now = Instant::now();
    let id = conn.id;
    if !left_cleanly {
        // An unexpected drop keeps the seat for the resume window.
        sig.apply(shared, |h, out| h.disconnect(now, id, out));
    }
    sig.bus.detach(id);
    sig.release(ip);
    shared.metrics.ws_connections_active.dec();
}

async fn send(
    ws: &mut WebSocket,
    m: &crate::metrics::Metrics,
    v: &Value,
    timeout: Duration,
) -> bool {
    let t = v.get("type").and_then(Value::as_str).unwrap_or("");
    m.signaling_frames
        .with_label_values(&["out", type_label(t)])
        .inc();
    matches!(
        tokio::time::timeout(timeout, ws.send(Message::Text(v.to_string().into()))).await,
        Ok(Ok(()))
    )
}

/// Mint fresh `iceServers` and a fresh session token, and schedule the next push: before the
/// TURN credentials expire, and at half the session-token lifetime so a resume can always
/// authenticate.
fn ice_frame(shared: &Shared, conn: &mut Conn) -> Option<Value> {
    let member = conn.member.as_ref()?;
    let now = unix_now();
    let ice = crate::ice::ice_config(shared, conn.host.as_deref(), &member.user, now);
    let before = shared.config.signaling.ice_refresh_before_secs;
    let in_secs = ice
        .credentials
        .as_ref()
        .map(|c| c.expires_at.saturating_sub(now).saturating_sub(before))
        .unwrap_or(u64::MAX)
        .min(shared.auth.session_ttl() / 2)
        .max(1);
    conn.ice_due = Some(Instant::now() + Duration::from_secs(in_secs));
    let (token, session) =
        shared
            .auth
            .issue_session(&member.user, member.room_limit.as_deref(), now);
    if ice.credentials.is_some() {
        shared
            .metrics
            .turn_credentials_issued
            .with_label_values(&["refresh"])
            .inc();
    }
    Some(json!({
        "type": "ice-servers",
        "iceServers": ice.servers,
        "ttl": ice.credentials.as_ref().map(|c| c.ttl),
        "expiresAt": ice.credentials.as_ref().map(|c| c.expires_at),
        "token": token,
        "tokenExpiresAt": session.expires_at,
    }))
}

fn hello(shared: &Shared, conn: &mut Conn, token: &str, id: Option<&Value>) -> Vec<Value> {
    if conn.member.is_some() {
        return vec![error_frame("bad_request", "already authenticated", id)];
    }
    match shared.auth.verify_session(token, unix_now()) {
        Ok(s) => {
            conn.member = Some(Member {
                user: s.user.clone(),
                room_limit: s.room.clone(),
            });
            let mut out = vec![with_id(
                json!({"type": "welcome", "userId": s.user, "room": s.room, "protocol": "switchboard.v1"}),
                id,
            )];
            out.extend(ice_frame(shared, conn));
            out
        }
        Err(e) => {
            shared
                .metrics
                .auth_failures
                .with_label_values(&[e.reason()])
                .inc();
            let code = if e == AuthError::Expired {
                "expired_token"
            } else {
                "unauthenticated"
            };
            vec![error_frame(
                code,
                &format!("session token refused: {e}"),
                id,
            )]
        }
    }
}

fn room_err(e: &RoomError, id: Option<&Value>) -> Value {
    error_frame(e.code(), &e.to_string(), id)
}

/// One request frame in, reply frames out (room events travel through the bus).
fn handle(
    sig: &Signaling,
    shared: &Shared,
    conn: &mut Conn,
    text: &str,
    left_cleanly: &mut bool,
) -> Vec<Value> {
    let m = &shared.metrics;
    let v: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            m.signaling_frames
                .with_label_values(&["in", "unknown"])
                .inc();
            return vec![error_frame(
                "bad_json",
                &format!("malformed JSON: {e}"),
                None,
            )];
        }
    };
    let id = v.get("id").filter(|i| i.is_string() || i.is_number());
    let Some(t) = v.get("type").and_then(Value::as_str) else {
        m.signaling_frames
            .with_label_values(&["in", "unknown"])
            .inc();
        return vec![error_frame(
            "bad_request",
            "frames are JSON objects with a string `type`",
            id,
        )];
    };
    m.signaling_frames
        .with_label_values(&["in", type_label(t)])
        .inc();
    if t == "hello" {
        let Some(token) = v.get("token").and_then(Value::as_str) else {
            return vec![error_frame("bad_request", "hello needs `token`", id)];
        };
        return hello(shared, conn, token, id);
    }
    if t == "ping" {
        return vec![with_id(json!({"type": "pong"}), id)];
    }
    let Some(member) = conn.member.clone() else {
        return vec![error_frame(
            "unauthenticated",
            "send hello with your session token first",
            id,
        )];
    };
    let now = Instant::now();
    let cid = conn.id;
    let draining = || shared.lifecycle.is_draining();
    match t {
        "create" => {
            if draining() {
                return vec![error_frame(
                    "draining",
                    "server is draining; try another node",
                    id,
                )];
            }
            let name = v.get("name").and_then(Value::as_str);
            let cap = v
                .get("capacity")
                .and_then(Value::as_u64)
                .map(|c| c as usize);
            if member.room_limit.is_some() && name.is_some() && name != member.room_limit.as_deref()
            {
                return vec![room_err(&RoomError::ForbiddenRoom, id)];
            }
            match sig.apply(shared, |h, _| h.create(now, name, cap)) {
                Ok((room, capacity)) => vec![with_id(
                    json!({"type": "created", "room": room, "capacity": capacity}),
                    id,
                )],
                Err(e) => vec![room_err(&e, id)],
            }
        }
        "join" => {
            if draining() {
                return vec![error_frame(
                    "draining",
                    "server is draining; try another node",
                    id,
                )];
            }
            let Some(room) = v.get("room").and_then(Value::as_str) else {
                return vec![error_frame("bad_request", "join needs `room`", id)];
            };
            match sig.apply(shared, |h, out| h.join(cid, &member, room, out)) {
                Ok(j) => {
                    *left_cleanly = false;
                    vec![with_id(j, id)]
                }
                Err(e) => vec![room_err(&e, id)],
            }
        }
        "leave" => match sig.apply(shared, |h, out| h.leave(now, cid, out)) {
            Ok(()) => {
                *left_cleanly = true;
                vec![with_id(json!({"type": "left"}), id)]
            }
            Err(e) => vec![room_err(&e, id)],
        },
        "signal" => {
            let Some(data) = v.get("data").cloned() else {
                return vec![error_frame("bad_request", "signal needs `data`", id)];
            };
            let to = match v.get("to") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.as_str()),
                Some(_) => return vec![error_frame("bad_request", "`to` must be a peer id", id)],
            };
            match sig.apply(shared, |h, out| h.signal(cid, to, data, out)) {
                Ok(()) => id
                    .map(|i| vec![json!({"type": "ack", "id": i})])
                    .unwrap_or_default(),
                Err(e) => vec![room_err(&e, id)],
            }
        }
        "resume" => {
            let (Some(token), last) = (
                v.get("resumeToken").and_then(Value::as_str),
                v.get("lastSeq").and_then(Value::as_u64).unwrap_or(0),
            ) else {
                return vec![error_frame("bad_request", "resume needs `resumeToken`", id)];
            };
            let r = sig.apply(shared, |h, out| {
                h.resume(cid, &member, token, last, id, out)
            });
            let outcome = if r.is_ok() { "resumed" } else { "rejected" };
            m.resumes.with_label_values(&[outcome]).inc();
            match r {
                Ok(()) => {
                    *left_cleanly = false;
                    Vec::new()
                }
                Err(e) => vec![room_err(&e, id)],
            }
        }
        other => vec![error_frame(
            "unknown_type",
            &format!("unknown frame type `{other}`"),
            id,
        )],
    }
}
