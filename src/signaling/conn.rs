//! The per-connection WebSocket task: authenticates, enforces limits, parses each request
//! once, feeds it to the room core and writes out what the bus delivers.

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use std::borrow::Cow;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};

use super::bus::Outbound;
use super::room::{new_room_id, token_room, valid_name, ConnId, Member, RoomError};
use super::service::Counters;
pub use super::service::Signaling;
use super::socket::{Error as WsError, Message, Socket};
use super::Deps;
use crate::auth::{unix_now, AuthError};
use crate::signaling::router::{Answer, ResumeRequest, Route};

#[doc(hidden)]
#[cfg(any(test, feature = "testing"))]
pub mod harness;

/// Outbox frames written per flush: bounds one connection's turn on the runtime.
const WRITE_BATCH: usize = 64;

/// One request frame, parsed once. `data` stays raw JSON, relayed byte for byte.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Request<'a> {
    #[serde(rename = "type", borrow)]
    ty: Option<Cow<'a, str>>,
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    token: Option<Cow<'a, str>>,
    #[serde(borrow)]
    name: Option<Cow<'a, str>>,
    capacity: Option<u64>,
    #[serde(borrow)]
    room: Option<Cow<'a, str>>,
    #[serde(borrow)]
    to: Option<Cow<'a, str>>,
    #[serde(borrow, deserialize_with = "raw_keep_null")]
    data: Option<&'a RawValue>,
    #[serde(rename = "resumeToken", borrow)]
    resume_token: Option<Cow<'a, str>>,
    #[serde(rename = "lastSeq")]
    last_seq: Option<u64>,
}

/// `data: null` is data (relayed as `null`), not a missing field.
fn raw_keep_null<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// Only the request `id`, for answering a frame that is not processed (too large, rate
/// limited, malformed fields).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct IdOnly<'a> {
    #[serde(borrow)]
    id: Option<&'a RawValue>,
}

/// A request `id` is echoed only when it is a string or a number.
fn valid_id(id: Option<&RawValue>) -> Option<&RawValue> {
    id.filter(|r| {
        r.get()
            .as_bytes()
            .first()
            .is_some_and(|b| *b == b'"' || *b == b'-' || b.is_ascii_digit())
    })
}

fn request_id(text: &str) -> Option<&RawValue> {
    valid_id(serde_json::from_str::<IdOnly<'_>>(text).ok()?.id)
}

/// A frame to write, with its type for metrics.
struct Reply {
    kind: &'static str,
    text: String,
}

/// Serialize `v` and add the request `id` exactly as the client wrote it.
pub(crate) fn with_id_text(v: &Value, id: Option<&RawValue>) -> String {
    let mut s = v.to_string();
    if let Some(id) = id {
        s.pop();
        s.push_str(",\"id\":");
        s.push_str(id.get());
        s.push('}');
    }
    s
}

fn reply(kind: &'static str, v: Value, id: Option<&RawValue>) -> Reply {
    Reply {
        kind,
        text: with_id_text(&v, id),
    }
}

fn error_frame(code: &str, message: &str, id: Option<&RawValue>) -> Reply {
    reply(
        "error",
        json!({"type": "error", "code": code, "message": message}),
        id,
    )
}

fn room_err(e: &RoomError, id: Option<&RawValue>) -> Reply {
    error_frame(e.code(), &e.to_string(), id)
}

/// Per-connection token bucket for incoming frames (`signaling.rate_per_sec`/`rate_burst`);
/// the PeerJS socket counts its messages with it too.
pub(crate) struct RateLimit {
    tokens: f64,
    rate: f64,
    burst: f64,
    at: Instant,
}

impl RateLimit {
    /// A full bucket of `burst` frames, refilled at `per_sec`.
    pub(crate) fn new(per_sec: u32, burst: u32, now: Instant) -> RateLimit {
        RateLimit {
            tokens: f64::from(burst),
            rate: f64::from(per_sec),
            burst: f64::from(burst.max(1)),
            at: now,
        }
    }

    /// Whether one more frame may pass at `now`.
    pub(crate) fn allow(&mut self, now: Instant) -> bool {
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
    host: Option<String>,
    /// The room this connection holds a seat in, which names the hub shard to ask.
    room: Option<String>,
    /// When the next `ice-servers` push is due.
    ice_due: Option<Instant>,
    /// The session this connection authenticated with, renewed on each `ice-servers` push;
    /// it carries the login time that `auth.max_session_age_secs` counts from.
    session: Option<crate::auth::Session>,
}

impl Conn {
    /// Whether `hello` (or the header token) authenticated this connection.
    fn authenticated(&self) -> bool {
        self.session.is_some()
    }

    /// Who the room core sees, from the session (renewals keep its user and room), so that an
    /// idle connection does not hold a second copy.
    fn member(&self) -> Option<Member> {
        self.session.as_ref().map(|s| Member {
            user: s.user.clone(),
            room_limit: s.room.clone(),
        })
    }

    /// Whether the server API revoked this connection's user after its login.
    fn revoked(&self, deps: &Deps) -> bool {
        self.session
            .as_ref()
            .is_some_and(|s| deps.auth.is_revoked(&s.user, Some(deps.auth.login_time(s))))
    }
}

/// The socket a connection task serves: an upgraded HTTP connection in production, any byte
/// stream in tests.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The rare, larger awaits of a connection are boxed: a task's size is that of its largest
/// await, and an idle connection should not carry the state of a write it is not doing.
fn close<'a, S: Io>(
    ws: &'a mut Socket<S>,
    code: u16,
    reason: &'static str,
    timeout: Duration,
) -> Pin<Box<impl Future<Output = ()> + Send + 'a>> {
    Box::pin(close_now(ws, code, reason, timeout))
}

async fn close_now<S: Io>(ws: &mut Socket<S>, code: u16, reason: &'static str, timeout: Duration) {
    let f = Message::Close(Some((code, reason.into())));
    let _ = tokio::time::timeout(timeout, ws.send(f)).await;
}

/// Serve one upgraded WebSocket until it closes, idles out or is replaced.
pub async fn serve<S: Io>(
    sig: Arc<Signaling>,
    deps: Deps,
    mut ws: Socket<S>,
    ip: IpAddr,
    token: Option<String>,
    host: Option<String>,
) {
    let m = deps.metrics.clone();
    let c = sig.counters(&m);
    let cfg = &sig.cfg;
    let dead_after = Duration::from_secs(cfg.dead_peer_timeout_secs.max(1));
    let write_timeout = dead_after;
    if !sig.admit(ip) {
        m.drops.with_label_values(&["ws_connections_per_ip"]).inc();
        let f = error_frame(
            "too_many_connections",
            "too many connections from this address",
            None,
        );
        let _ = send(&mut ws, c, f, write_timeout).await;
        close(&mut ws, 1008, "too many connections", write_timeout).await;
        return;
    }
    m.ws_connections_active.inc();
    let (id, outbox) = sig.open();
    let mut conn = Conn {
        id,
        host,
        room: None,
        ice_due: None,
        session: None,
    };
    let mut rate = RateLimit::new(cfg.rate_per_sec, cfg.rate_burst, Instant::now());
    // The receiver, not a pinned `shutdown_signal` future: the task stays smaller.
    let mut stop = deps.lifecycle.subscribe();
    // One timer for the three deadlines (ping, hello, the next `ice-servers` push): each
    // timer an idle connection holds is a timer entry and ~100 bytes of its task.
    let ping_every = Duration::from_secs(cfg.ping_interval_secs.max(1));
    let mut next_ping = Instant::now() + ping_every;
    let mut last_heard = Instant::now();
    let mut left_cleanly = false;
    // A token not offered in the header must arrive in `hello` within the deadline.
    let hello_timeout = Duration::from_secs(cfg.hello_timeout_secs.max(1));
    let hello_at = Instant::now() + hello_timeout;
    let mut ice_at: Option<Instant> = None;
    let mut timer = std::pin::pin!(tokio::time::sleep_until(next_ping.min(hello_at).into()));

    if let Some(t) = token {
        let replies = hello(&sig, &deps, &mut conn, &t, None);
        let fatal = replies.iter().any(|r| r.kind == "error");
        for r in replies {
            if !send(&mut ws, c, r, write_timeout).await {
                break;
            }
        }
        if fatal {
            close(&mut ws, 1008, "unauthenticated", write_timeout).await;
            finish(&sig, &deps, &conn, ip, true, Instant::now());
            return;
        }
    }

    loop {
        if *stop.borrow() {
            // Shutdown began before this connection's first wait.
            close(&mut ws, 1001, "server shutting down", write_timeout).await;
            break;
        }
        if let Some(due) = conn.ice_due.take() {
            ice_at = Some(due);
        }
        let due = match (conn.authenticated(), ice_at) {
            (false, _) => next_ping.min(hello_at),
            (true, Some(ice)) => next_ping.min(ice),
            (true, None) => next_ping,
        };
        if timer.deadline() != due.into() {
            timer.as_mut().reset(due.into());
        }
        tokio::select! {
            incoming = ws.recv() => {
                let msg = match incoming {
                    Some(Ok(msg)) => msg,
                    Some(Err(e)) => {
                        if matches!(e, WsError::TooBig) {
                            m.drops.with_label_values(&["ws_frame_too_large"]).inc();
                            close(&mut ws, 1009, "frame too large", write_timeout).await;
                        }
                        break;
                    }
                    None => break,
                };
                last_heard = Instant::now();
                let text = match msg {
                    Message::Text(t) => t,
                    Message::Binary(_) => {
                        c.count_in("unknown");
                        let f = error_frame("bad_request", "send JSON text frames", None);
                        if !send(&mut ws, c, f, write_timeout).await { break; }
                        continue;
                    }
                    Message::Close(_) => break,
                    _ => continue,
                };
                if text.len() > cfg.max_frame_bytes {
                    m.drops.with_label_values(&["ws_frame_too_large"]).inc();
                    let f = error_frame(
                        "too_large",
                        &format!("frames are limited to {} bytes", cfg.max_frame_bytes),
                        request_id(text.as_str()),
                    );
                    if !send(&mut ws, c, f, write_timeout).await { break; }
                    continue;
                }
                if !rate.allow(last_heard) {
                    m.drops.with_label_values(&["ws_rate_limited"]).inc();
                    let f = error_frame(
                        "rate_limited",
                        "too many frames; slow down",
                        request_id(text.as_str()),
                    );
                    if !send(&mut ws, c, f, write_timeout).await { break; }
                    continue;
                }
                // Boxed: the request handler's state is large and lives only while a frame is
                // handled, so the idle task does not carry it.
                let replies = Box::pin(handle(&sig, &deps, c, &mut conn, text.as_str(), &mut left_cleanly, Instant::now())).await;
                let mut ok = true;
                for r in replies {
                    if !send(&mut ws, c, r, write_timeout).await { ok = false; break; }
                }
                if !ok { break; }
            }
            out = outbox.recv() => {
                let Some(first) = out else {
                    // The outbox overflowed (a reader slower than its room): close so the
                    // client resumes and the missed frames are replayed in order.
                    m.drops.with_label_values(&["ws_slow_consumer"]).inc();
                    close(&mut ws, 4002, "too slow; resume", write_timeout).await;
                    break;
                };
                match write_batch(&mut ws, &outbox, first, write_timeout).await {
                    Batch::Written => {}
                    Batch::Failed => break,
                    Batch::Moved => {
                        // The room moved to another node: the client resumes there.
                        close(&mut ws, 4004, "room moved; resume", write_timeout).await;
                        break;
                    }
                    Batch::Closed(why) => {
                        // Replaced, kicked or its room closed: the seat is gone, nothing to
                        // resume; the close code says which.
                        left_cleanly = true;
                        close(&mut ws, why.code(), why.text(), write_timeout).await;
                        break;
                    }
                }
            }
            _ = &mut timer => {
                let now = Instant::now();
                if !conn.authenticated() && now >= hello_at {
                    c.hello_timeout.inc();
                    let f = error_frame(
                        "unauthenticated",
                        &format!("no hello within {} s", hello_timeout.as_secs()),
                        None,
                    );
                    let _ = send(&mut ws, c, f, write_timeout).await;
                    close(&mut ws, 1008, "no hello", write_timeout).await;
                    break;
                }
                if conn.authenticated() && ice_at.is_some_and(|at| now >= at) {
                    ice_at = None;
                    match ice_frame(&sig, &deps, &mut conn) {
                        Ok(Some(f)) => {
                            if !send(&mut ws, c, f, write_timeout).await { break; }
                        }
                        Ok(None) => {}
                        Err(f) => {
                            // The login reached auth.max_session_age_secs: no more renewals.
                            let _ = send(&mut ws, c, f, write_timeout).await;
                            close(&mut ws, 4003, "login expired", write_timeout).await;
                            break;
                        }
                    }
                }
                if now >= next_ping {
                    next_ping = now + ping_every;
                    if conn.revoked(&deps) {
                        // Seated peers were removed at once; this catches the others.
                        let f = error_frame("revoked", "the user was revoked", None);
                        let _ = send(&mut ws, c, f, write_timeout).await;
                        left_cleanly = true;
                        close(&mut ws, 4005, "revoked", write_timeout).await;
                        break;
                    }
                    if last_heard.elapsed() >= dead_after {
                        m.drops.with_label_values(&["ws_dead_peer"]).inc();
                        break;
                    }
                    let w = Box::pin(tokio::time::timeout(write_timeout, ws.send(Message::Ping(Vec::new())))).await;
                    if !matches!(w, Ok(Ok(()))) { break; }
                }
            }
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    close(&mut ws, 1001, "server shutting down", write_timeout).await;
                    break;
                }
            }
        }
    }
    finish(&sig, &deps, &conn, ip, left_cleanly, Instant::now());
}

enum Batch {
    Written,
    Failed,
    Moved,
    Closed(super::room::CloseReason),
}

/// Write `first` and whatever else is queued (up to a batch), then flush once.
fn write_batch<'a, S: Io>(
    ws: &'a mut Socket<S>,
    outbox: &'a super::bus::Outbox,
    first: Outbound,
    timeout: Duration,
) -> Pin<Box<impl Future<Output = Batch> + Send + 'a>> {
    Box::pin(write_batch_now(ws, outbox, first, timeout))
}

async fn write_batch_now<S: Io>(
    ws: &mut Socket<S>,
    outbox: &super::bus::Outbox,
    first: Outbound,
    timeout: Duration,
) -> Batch {
    let mut item = Some(first);
    let mut n = 0;
    let mut moved = false;
    let mut closed = None;
    let w = tokio::time::timeout(timeout, async {
        while let Some(it) = item.take() {
            match it {
                Outbound::Frame(f) => {
                    ws.feed(Message::Text(f.render())).await?;
                    n += 1;
                }
                Outbound::Close(why) => {
                    closed = Some(why);
                    break;
                }
                Outbound::Moved => {
                    moved = true;
                    break;
                }
            }
            if n < WRITE_BATCH {
                item = outbox.try_pop().ok().flatten();
            }
        }
        ws.flush().await
    })
    .await;
    match w {
        Ok(Ok(())) if moved => Batch::Moved,
        Ok(Ok(())) => match closed {
            Some(why) => Batch::Closed(why),
            None => Batch::Written,
        },
        _ => Batch::Failed,
    }
}

/// The connection is gone at `now`: a clean leave frees the seat at once, a drop keeps it for
/// the resume window.
fn finish(sig: &Signaling, deps: &Deps, conn: &Conn, ip: IpAddr, left_cleanly: bool, now: Instant) {
    let id = conn.id;
    if let Some(cl) = deps.cluster.as_ref().filter(|cl| cl.is_remote(id)) {
        cl.gone(id, left_cleanly);
    } else if let (false, Some(room)) = (left_cleanly, conn.room.as_deref()) {
        // An unexpected drop keeps the seat for the resume window.
        sig.apply(&deps.metrics, room, |h, out| h.disconnect(now, id, out));
    }
    sig.bus.detach(id);
    sig.release(ip);
    deps.metrics.ws_connections_active.dec();
}

fn send<'a, S: Io>(
    ws: &'a mut Socket<S>,
    c: &'a Counters,
    r: Reply,
    timeout: Duration,
) -> Pin<Box<impl Future<Output = bool> + Send + 'a>> {
    Box::pin(send_now(ws, c, r, timeout))
}

async fn send_now<S: Io>(ws: &mut Socket<S>, c: &Counters, r: Reply, timeout: Duration) -> bool {
    c.count_out(r.kind);
    matches!(
        tokio::time::timeout(timeout, ws.send(Message::Text(r.text))).await,
        Ok(Ok(()))
    )
}

/// Mint fresh `iceServers` and a renewed session token, and schedule the next push: before
/// the TURN credentials expire, and at half the session-token lifetime so a resume can always
/// authenticate. Renewal keeps the original login time, so neither the token nor the TURN
/// credentials reach past `auth.max_session_age_secs`; once there, the error frame to send
/// before closing comes back instead.
fn ice_frame(sig: &Signaling, deps: &Deps, conn: &mut Conn) -> Result<Option<Reply>, Reply> {
    let Some(old) = conn.session.as_ref() else {
        return Ok(None);
    };
    if conn.revoked(deps) {
        // No renewal for a revoked user; the next ping closes the socket.
        return Ok(None);
    }
    let now = unix_now();
    let (token, session) = match deps.auth.renew_session(old, now) {
        Ok(x) => x,
        Err(e) => {
            deps.metrics
                .auth_failures
                .with_label_values(&[e.reason()])
                .inc();
            return Err(error_frame(
                "expired_token",
                "login older than auth.max_session_age_secs; log in again",
                None,
            ));
        }
    };
    let end = deps.auth.session_end(&session);
    let ice = deps
        .ice
        .ice_servers(conn.host.as_deref(), &session.user, now, end);
    let before = sig.cfg.ice_refresh_before_secs;
    let in_secs = ice
        .credentials
        .as_ref()
        .map(|c| c.expires_at.saturating_sub(now).saturating_sub(before))
        .unwrap_or(u64::MAX)
        .min(deps.auth.session_ttl() / 2)
        .min(end.saturating_sub(now))
        .max(1);
    conn.ice_due = Some(Instant::now() + Duration::from_secs(in_secs));
    conn.session = Some(session.clone());
    if ice.credentials.is_some() {
        deps.metrics
            .turn_credentials_issued
            .with_label_values(&["refresh"])
            .inc();
    }
    Ok(Some(reply(
        "ice-servers",
        json!({
            "type": "ice-servers",
            "iceServers": ice.servers,
            "ttl": ice.credentials.as_ref().map(|c| c.ttl),
            "expiresAt": ice.credentials.as_ref().map(|c| c.expires_at),
            "token": token,
            "tokenExpiresAt": session.expires_at,
        }),
        None,
    )))
}

fn hello(
    sig: &Signaling,
    deps: &Deps,
    conn: &mut Conn,
    token: &str,
    id: Option<&RawValue>,
) -> Vec<Reply> {
    if conn.authenticated() {
        return vec![error_frame("bad_request", "already authenticated", id)];
    }
    match deps.auth.verify_session(token, unix_now()) {
        Ok(s) => {
            conn.session = Some(s.clone());
            let mut out = vec![reply(
                "welcome",
                json!({"type": "welcome", "userId": s.user, "room": s.room, "protocol": "switchboard.v1"}),
                id,
            )];
            match ice_frame(sig, deps, conn) {
                Ok(f) => out.extend(f),
                Err(f) => out.push(f),
            }
            out
        }
        Err(e) => {
            deps.metrics
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

/// Parse a request frame once. A syntax error is `bad_json`; valid JSON of the wrong shape
/// (not an object, a field of the wrong type, a duplicate field) is `bad_request`.
fn parse(text: &str) -> Result<Request<'_>, Reply> {
    let mut de = serde_json::Deserializer::from_str(text);
    let r: Result<Request<'_>, _> = serde_path_to_error::deserialize(&mut de);
    let req = r.map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        match inner.classify() {
            serde_json::error::Category::Data => {
                let id = request_id(text);
                if path.is_empty() || path == "." {
                    error_frame(
                        "bad_request",
                        "frames are JSON objects with a string `type`",
                        id,
                    )
                } else {
                    error_frame("bad_request", &format!("`{path}`: {inner}"), id)
                }
            }
            _ => error_frame("bad_json", &format!("malformed JSON: {inner}"), None),
        }
    })?;
    de.end()
        .map_err(|e| error_frame("bad_json", &format!("malformed JSON: {e}"), None))?;
    Ok(req)
}

/// One request frame in at `now`, reply frames out (room events travel through the bus). In
/// cluster mode a request for a room owned by another node waits for that node's answer.
async fn handle(
    sig: &Signaling,
    deps: &Deps,
    c: &Counters,
    conn: &mut Conn,
    text: &str,
    left_cleanly: &mut bool,
    now: Instant,
) -> Vec<Reply> {
    let req = match parse(text) {
        Ok(r) => r,
        Err(e) => {
            c.count_in("unknown");
            return vec![e];
        }
    };
    let id = valid_id(req.id);
    let Some(t) = req.ty.as_deref() else {
        c.count_in("unknown");
        return vec![error_frame(
            "bad_request",
            "frames are JSON objects with a string `type`",
            id,
        )];
    };
    c.count_in(t);
    if t == "hello" {
        let Some(token) = req.token.as_deref() else {
            return vec![error_frame("bad_request", "hello needs `token`", id)];
        };
        return hello(sig, deps, conn, token, id);
    }
    if t == "ping" {
        return vec![reply("pong", json!({"type": "pong"}), id)];
    }
    let Some(member) = conn.member() else {
        return vec![error_frame(
            "unauthenticated",
            "send hello with your session token first",
            id,
        )];
    };
    let cid = conn.id;
    let draining = || deps.lifecycle.is_draining();
    match t {
        "create" => {
            if draining() {
                return vec![error_frame(
                    "draining",
                    "server is draining; try another node",
                    id,
                )];
            }
            let name = req.name.as_deref();
            if member.room_limit.is_some() && name.is_some() && name != member.room_limit.as_deref()
            {
                return vec![room_err(&RoomError::ForbiddenRoom, id)];
            }
            let room = match name {
                Some(n) if !valid_name(n) => {
                    return vec![room_err(
                        &RoomError::BadRequest(
                            "room names are 1 to 64 of A-Z a-z 0-9 - _ .".into(),
                        ),
                        id,
                    )]
                }
                Some(n) => n.to_string(),
                None => new_room_id(),
            };
            if let Err(e) = sig.take_room(&deps.metrics, &member.user) {
                return vec![room_err(&e, id)];
            }
            if let Some(cl) = &deps.cluster {
                if let Err(e) = cl.claim(&room).await {
                    sig.release_room(&member.user);
                    return vec![room_err(&e, id)];
                }
            }
            let r = sig.apply(&deps.metrics, &room, |h, _| {
                h.create(now, &member.user, &room, req.capacity)
            });
            if let (Err(_), Some(cl)) = (&r, &deps.cluster) {
                cl.unclaim(&room);
            }
            match r {
                Ok((room, capacity)) => vec![reply(
                    "created",
                    json!({"type": "created", "room": room, "capacity": capacity}),
                    id,
                )],
                Err(e) => {
                    sig.release_room(&member.user);
                    vec![room_err(&e, id)]
                }
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
            let Some(room) = req.room.as_deref() else {
                return vec![error_frame("bad_request", "join needs `room`", id)];
            };
            if conn.room.is_some() {
                return vec![room_err(&RoomError::AlreadyInRoom, id)];
            }
            if let Some(cl) = &deps.cluster {
                match cl.join(cid, &member, room).await {
                    Err(e) => return vec![room_err(&e, id)],
                    Ok(Route::Remote(Answer::Ok(j))) => {
                        conn.room = Some(room.to_string());
                        *left_cleanly = false;
                        return vec![reply("joined", j, id)];
                    }
                    Ok(Route::Remote(Answer::Err(code, msg))) => {
                        return vec![error_frame(&code, &msg, id)]
                    }
                    Ok(Route::Local) => {}
                }
            }
            match sig.apply(&deps.metrics, room, |h, out| {
                h.join(cid, &member, room, out)
            }) {
                Ok(j) => {
                    conn.room = Some(room.to_string());
                    *left_cleanly = false;
                    if let Some(cl) = &deps.cluster {
                        cl.mirror(room);
                    }
                    vec![reply("joined", j, id)]
                }
                Err(e) => vec![room_err(&e, id)],
            }
        }
        "leave" => {
            let Some(room) = conn.room.take() else {
                return vec![room_err(&RoomError::NotInRoom, id)];
            };
            if let Some(cl) = deps.cluster.as_ref().filter(|cl| cl.is_remote(cid)) {
                *left_cleanly = true;
                return match cl.leave(cid).await {
                    Ok(Answer::Ok(_)) => vec![reply("left", json!({"type": "left"}), id)],
                    Ok(Answer::Err(code, msg)) => vec![error_frame(&code, &msg, id)],
                    Err(e) => vec![room_err(&e, id)],
                };
            }
            match sig.apply(&deps.metrics, &room, |h, out| h.leave(now, cid, out)) {
                Ok(()) => {
                    *left_cleanly = true;
                    if let Some(cl) = &deps.cluster {
                        cl.mirror(&room);
                    }
                    vec![reply("left", json!({"type": "left"}), id)]
                }
                Err(e) => vec![room_err(&e, id)],
            }
        }
        "signal" => {
            let Some(data) = req.data else {
                return vec![error_frame("bad_request", "signal needs `data`", id)];
            };
            let Some(room) = conn.room.as_deref() else {
                return vec![room_err(&RoomError::NotInRoom, id)];
            };
            let to = req.to.as_deref();
            if let Some(cl) = deps.cluster.as_ref().filter(|cl| cl.is_remote(cid)) {
                return match cl.signal(cid, to, data.get(), id.map(|i| i.get())) {
                    Ok(()) => Vec::new(),
                    Err(e) => vec![room_err(&e, id)],
                };
            }
            match sig.apply(&deps.metrics, room, |h, out| h.signal(cid, to, data, out)) {
                Ok(()) => id
                    .map(|i| vec![reply("ack", json!({"type": "ack"}), Some(i))])
                    .unwrap_or_default(),
                Err(e) => vec![room_err(&e, id)],
            }
        }
        "resume" => {
            let Some(token) = req.resume_token.as_deref() else {
                return vec![error_frame("bad_request", "resume needs `resumeToken`", id)];
            };
            let last = req.last_seq.unwrap_or(0);
            let r = if conn.room.is_some() {
                Err(RoomError::AlreadyInRoom)
            } else if let Some(room) = token_room(token) {
                let route = match &deps.cluster {
                    Some(cl) => {
                        let rid = id.map(|i| i.get().to_string());
                        let r = ResumeRequest {
                            token,
                            last,
                            id: rid,
                        };
                        cl.resume(cid, &member, room, r).await
                    }
                    None => Ok(Route::Local),
                };
                match route {
                    Err(e) => Err(e),
                    Ok(Route::Remote(Answer::Ok(_))) => {
                        deps.metrics.resumes.with_label_values(&["resumed"]).inc();
                        conn.room = Some(room.to_string());
                        *left_cleanly = false;
                        return Vec::new();
                    }
                    Ok(Route::Remote(Answer::Err(code, msg))) => {
                        deps.metrics.resumes.with_label_values(&["rejected"]).inc();
                        return vec![error_frame(&code, &msg, id)];
                    }
                    Ok(Route::Local) => sig
                        .apply(&deps.metrics, room, |h, out| {
                            h.resume(cid, &member, token, last, |v| with_id_text(&v, id), out)
                        })
                        .map(|()| room.to_string()),
                }
            } else {
                Err(RoomError::BadResume)
            };
            let outcome = if r.is_ok() { "resumed" } else { "rejected" };
            deps.metrics.resumes.with_label_values(&[outcome]).inc();
            match r {
                Ok(room) => {
                    conn.room = Some(room);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of what `f` returns, without calling it.
    fn returns<A, B, C, D, E, G, F>(_f: fn(A, B, C, D, E, G) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    fn returns4<A, B, C, D, F>(_f: fn(A, B, C, D) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// What an idle connection's task holds inline, printed (`--nocapture`) and bounded so
    /// that growth fails here: the `serve` future (a test build; a release build is smaller),
    /// with the rare large awaits boxed.
    #[test]
    fn an_idle_connection_task_stays_small() {
        type S = tokio::io::DuplexStream;
        let task = returns(serve::<S>);
        let socket = std::mem::size_of::<Socket<S>>();
        let conn = std::mem::size_of::<Conn>();
        let lifecycle = crate::lifecycle::Lifecycle::new();
        let mut rx = lifecycle.subscribe();
        let stop = std::mem::size_of_val(&rx.changed());
        let timer = std::mem::size_of::<tokio::time::Sleep>();
        let boxed = [
            returns4(write_batch::<S>),
            returns4(send::<S>),
            returns4(close::<S>),
        ];
        println!(
            "serve future {task} B; inside it: socket {socket} B, conn {conn} B, shutdown \
             signal {stop} B, the one timer {timer} B; boxed awaits {boxed:?} B"
        );
        assert!(boxed.iter().all(|b| *b <= 16), "{boxed:?}");
        assert!(task <= 1664, "the connection future grew: {task} B");
    }

    #[test]
    fn parse_keeps_data_raw_and_types_fields() {
        let t = r#"{"type":"signal","data":{"z":123456789012345678901234567890,"a":1e-400},"id":12345678901234567890123}"#;
        let r = parse(t).map_err(|e| e.text).unwrap();
        assert_eq!(
            r.data.unwrap().get(),
            r#"{"z":123456789012345678901234567890,"a":1e-400}"#
        );
        assert_eq!(valid_id(r.id).unwrap().get(), "12345678901234567890123");
        let r = parse(r#"{"type":"signal","data":null}"#)
            .map_err(|e| e.text)
            .unwrap();
        assert_eq!(r.data.unwrap().get(), "null");
        for (bad, code) in [
            (r#"{"type":"create","name":5,"id":"x"}"#, "bad_request"),
            (r#"{"type":"create","capacity":2.5}"#, "bad_request"),
            (r#"{"type":"create","capacity":"3"}"#, "bad_request"),
            (r#"[1,2]"#, "bad_request"),
            (r#"{"type":"ping"} x"#, "bad_json"),
            (r#"{"type":"#, "bad_json"),
        ] {
            let e = parse(bad)
                .err()
                .unwrap_or_else(|| panic!("{bad} must fail"));
            let v: Value = serde_json::from_str(&e.text).unwrap();
            assert_eq!(v["code"], code, "{bad}: {v}");
        }
        let e = parse(r#"{"type":"create","name":5,"id":"x"}"#)
            .err()
            .unwrap();
        let v: Value = serde_json::from_str(&e.text).unwrap();
        assert_eq!(v["id"], "x");
        assert!(v["message"].as_str().unwrap().contains("name"), "{v}");
    }

    #[test]
    fn ids_are_echoed_byte_for_byte_and_only_strings_or_numbers() {
        let raw = RawValue::from_string("1e400".into()).unwrap();
        let s = with_id_text(&json!({"type": "ack"}), valid_id(Some(&raw)));
        assert_eq!(s, r#"{"type":"ack","id":1e400}"#);
        let obj = RawValue::from_string("{}".into()).unwrap();
        assert!(valid_id(Some(&obj)).is_none());
        assert_eq!(
            request_id(r#"{"id":"q","data":[1,2,3]}"#).map(|r| r.get()),
            Some("\"q\"")
        );
    }
}
