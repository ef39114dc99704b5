//! Webhooks: signed JSON POSTs that tell the app backend what happens in rooms and relays.
//!
//! Producers (signaling, the TURN tables) call [`Webhooks::emit`], which never waits: the
//! event goes into a bounded per-URL queue with `try_send`, and a full queue drops the event
//! and counts it (`switchboard_dropped_total{reason="webhook_queue_full"}`). Each URL has a few
//! delivery lanes; an event's ordering key (its room, or its allocation) always picks the same
//! lane, and a lane delivers one event at a time, retrying with exponential backoff, so events
//! of one room arrive in the order they happened. A slow or dead receiver stalls only its own
//! lanes and, once their queues are full, loses events; it never slows signaling or the relay.
//!
//! At shutdown [`Webhooks::flush`] lets the lanes deliver what is queued (the
//! `allocation.ended {reason:"shutdown"}` events among it) until a deadline, and counts what is
//! still undelivered then (`switchboard_dropped_total{reason="webhook_shutdown"}`). The signing
//! secret is swapped on SIGHUP ([`Webhooks::set_secret`]); URLs and lanes are fixed at start.
//!
//! Signature (documented with a receiver example in docs/http-api.md): the header
//! `Switchboard-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>`.

use serde::Serialize;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::crypto::hex;
use crate::turn::core::Usage;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

use crate::config::WebhooksConfig;
use crate::metrics::Metrics;

/// Delivery lanes per URL: events of different rooms go out in parallel up to this many.
pub const LANES: usize = 4;
/// Header carrying the timestamp and signature.
pub const SIGNATURE_HEADER: &str = "switchboard-signature";
/// Header naming the event type, so a receiver can route before parsing.
pub const EVENT_HEADER: &str = "switchboard-event";
/// Header carrying the event id, the same on every retry, for de-duplication.
pub const DELIVERY_HEADER: &str = "switchboard-delivery";

/// One thing that happened, as the receiver sees it (the `type` field names it).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all_fields = "camelCase")]
pub enum Event {
    /// A room was created (`create`).
    #[serde(rename = "room.created")]
    RoomCreated {
        /// Room id.
        room: String,
    },
    /// A room ended: it stayed empty past its grace period, or the server API closed it.
    #[serde(rename = "room.closed")]
    RoomClosed {
        /// Room id.
        room: String,
        /// `empty` (its grace ran out) or `closed` (server API).
        reason: String,
    },
    /// A peer joined a room.
    #[serde(rename = "peer.joined")]
    PeerJoined {
        /// Room id.
        room: String,
        /// Peer id within the room.
        peer: String,
        /// The user id the peer logged in as.
        user: String,
    },
    /// A peer left a room for good.
    #[serde(rename = "peer.left")]
    PeerLeft {
        /// Room id.
        room: String,
        /// Peer id.
        peer: String,
        /// User id.
        user: String,
        /// `left`, `timeout`, `kicked`, `revoked`, `room-closed` or `replaced`.
        reason: String,
    },
    /// A peer's connection dropped; it may resume within the grace window.
    #[serde(rename = "peer.reconnecting")]
    PeerReconnecting {
        /// Room id.
        room: String,
        /// Peer id.
        peer: String,
        /// User id.
        user: String,
    },
    /// A dropped peer came back with its resume token.
    #[serde(rename = "peer.resumed")]
    PeerResumed {
        /// Room id.
        room: String,
        /// Peer id.
        peer: String,
        /// User id.
        user: String,
    },
    /// A TURN allocation was created.
    #[serde(rename = "allocation.created")]
    AllocationCreated {
        /// Allocation id, unique within this process.
        allocation: String,
        /// User part of the TURN username.
        user: String,
        /// How the client reaches the server: `udp`, `tcp` or `tls`.
        transport: String,
        /// The relay socket's protocol: `udp`, or `tcp` (RFC 6062).
        relay_transport: String,
    },
    /// A TURN allocation ended; the usage figures cover its whole life.
    #[serde(rename = "allocation.ended")]
    AllocationEnded {
        /// Allocation id.
        allocation: String,
        /// User part of the TURN username.
        user: String,
        /// `udp`, `tcp` or `tls`.
        transport: String,
        /// `udp` or `tcp`.
        relay_transport: String,
        /// `expired`, `refreshed_zero`, `closed`, `shutdown` or `revoked`.
        reason: String,
        /// Milliseconds from creation to end.
        duration_ms: u64,
        /// Payload bytes relayed from the client to peers.
        bytes_to_peer: u64,
        /// Payload bytes relayed from peers to the client.
        bytes_to_client: u64,
        /// Packets relayed from the client to peers.
        packets_to_peer: u64,
        /// Packets relayed from peers to the client.
        packets_to_client: u64,
    },
}

impl Event {
    /// The ordering key: the room, or the allocation.
    pub fn key(&self) -> &str {
        match self {
            Event::RoomCreated { room }
            | Event::RoomClosed { room, .. }
            | Event::PeerJoined { room, .. }
            | Event::PeerLeft { room, .. }
            | Event::PeerReconnecting { room, .. }
            | Event::PeerResumed { room, .. } => room,
            Event::AllocationCreated { allocation, .. }
            | Event::AllocationEnded { allocation, .. } => allocation,
        }
    }

    /// The `type` string, also sent in the `Switchboard-Event` header.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::RoomCreated { .. } => "room.created",
            Event::RoomClosed { .. } => "room.closed",
            Event::PeerJoined { .. } => "peer.joined",
            Event::PeerLeft { .. } => "peer.left",
            Event::PeerReconnecting { .. } => "peer.reconnecting",
            Event::PeerResumed { .. } => "peer.resumed",
            Event::AllocationCreated { .. } => "allocation.created",
            Event::AllocationEnded { .. } => "allocation.ended",
        }
    }
}

/// The JSON body of one delivery: the event plus id, sequence number and time.
#[derive(Debug, Clone, Serialize)]
pub struct Envelope {
    /// Unique id of the event (the same on every retry).
    pub id: String,
    /// Increases with every event this process emits; per room it is strictly increasing.
    pub seq: u64,
    /// When it happened, Unix milliseconds.
    pub time: u64,
    /// The event itself, flattened (`type` and its fields).
    #[serde(flatten)]
    pub event: Event,
}

/// What the TURN table knows about an allocation that has just ended.
#[derive(Debug)]
pub struct AllocationEnd<'a> {
    /// Allocation id.
    pub allocation: &'a str,
    /// User part of the TURN username.
    pub user: &'a str,
    /// `udp`, `tcp` or `tls`.
    pub transport: &'static str,
    /// `udp` or `tcp`.
    pub relay_transport: &'static str,
    /// Delete reason label.
    pub reason: &'static str,
    /// When the allocation was created.
    pub created: Instant,
    /// Its relay usage.
    pub usage: &'a Usage,
}

/// Why webhooks could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// The signing secret or CA file could not be read.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The HTTP client could not be built.
    #[error("webhook HTTP client: {0}")]
    Client(String),
}

/// The handle producers hold; cheap to clone; a no-op when no URL is configured.
#[derive(Clone, Default)]
pub struct Webhooks {
    inner: Option<Arc<Inner>>,
}

impl std::fmt::Debug for Webhooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhooks")
            .field("enabled", &self.inner.is_some())
            .finish()
    }
}

struct Inner {
    /// For each URL, its lanes.
    targets: Vec<Vec<mpsc::Sender<Arc<Envelope>>>>,
    seq: AtomicU64,
    /// Random per process, so event ids from two processes never collide.
    prefix: String,
    queue_full: prometheus::IntCounter,
    /// Events queued or being delivered, over every lane; what a flush that runs out of time
    /// reports as dropped.
    pending: Arc<AtomicU64>,
    /// Set by [`Webhooks::flush`]: lanes empty their queues, then end.
    closing: tokio::sync::watch::Sender<bool>,
    /// The lane tasks, taken by the flush that waits for them.
    lanes: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// The signing secret, shared by every lane; swapped on SIGHUP.
    secret: Arc<arc_swap::ArcSwap<Vec<u8>>>,
    shutdown_dropped: prometheus::IntCounter,
}

/// Settings a delivery lane needs.
struct LaneConfig {
    client: reqwest::Client,
    url: reqwest::Url,
    secret: Arc<arc_swap::ArcSwap<Vec<u8>>>,
    max_attempts: u32,
    retry_initial: Duration,
    retry_max: Duration,
    delivered: prometheus::IntCounter,
    retried: prometheus::IntCounter,
    failed: prometheus::IntCounter,
    latency: prometheus::Histogram,
}

impl Webhooks {
    /// A handle that drops every event (no URL configured), for tests and embedders.
    pub fn disabled() -> Webhooks {
        Webhooks { inner: None }
    }

    /// Start delivery lanes for `cfg` on the current tokio runtime; disabled without URLs.
    pub fn start(cfg: &WebhooksConfig, metrics: &Metrics) -> Result<Webhooks, WebhookError> {
        if cfg.urls.is_empty() {
            return Ok(Webhooks::disabled());
        }
        let secret = Arc::new(arc_swap::ArcSwap::from_pointee(signing_secret(cfg)?));
        let pending = Arc::new(AtomicU64::new(0));
        let (closing, closing_rx) = tokio::sync::watch::channel(false);
        let mut handles = Vec::new();
        let client = http_client(cfg)?;
        let per_lane = (cfg.queue_size / LANES).max(1);
        let out = |o: &str| metrics.webhook_deliveries.with_label_values(&[o]);
        let mut targets = Vec::new();
        for (i, u) in cfg.urls.iter().enumerate() {
            let url = reqwest::Url::parse(u).map_err(|e| crate::config::ConfigError::Key {
                key: format!("webhooks.urls[{i}]"),
                message: e.to_string(),
            })?;
            let mut lanes = Vec::with_capacity(LANES);
            for _ in 0..LANES {
                let (tx, rx) = mpsc::channel(per_lane);
                let lc = LaneConfig {
                    client: client.clone(),
                    url: url.clone(),
                    secret: secret.clone(),
                    max_attempts: cfg.max_attempts.max(1),
                    retry_initial: Duration::from_millis(cfg.retry_initial_ms),
                    retry_max: Duration::from_secs(cfg.retry_max_secs),
                    delivered: out("delivered"),
                    retried: out("retried"),
                    failed: out("failed"),
                    latency: metrics.webhook_latency.clone(),
                };
                handles.push(tokio::spawn(lane(
                    rx,
                    lc,
                    closing_rx.clone(),
                    pending.clone(),
                )));
                lanes.push(tx);
            }
            targets.push(lanes);
        }
        let p: [u8; 6] = rand::random();
        Ok(Webhooks {
            inner: Some(Arc::new(Inner {
                targets,
                seq: AtomicU64::new(0),
                prefix: hex(&p),
                queue_full: metrics.drops.with_label_values(&["webhook_queue_full"]),
                pending,
                closing,
                lanes: std::sync::Mutex::new(handles),
                secret,
                shutdown_dropped: metrics.drops.with_label_values(&["webhook_shutdown"]),
            })),
        })
    }

    /// Sign from now on with the secret of `cfg` (read by [`signing_secret`] beforehand, so a
    /// bad file refuses the whole reload); events already being retried switch too.
    pub fn set_secret(&self, secret: Vec<u8>) {
        if let Some(inner) = &self.inner {
            inner.secret.store(Arc::new(secret));
        }
    }

    /// At shutdown: let every lane deliver what it has queued (retries included) until
    /// `deadline`, then count what is still undelivered as dropped
    /// (`switchboard_dropped_total{reason="webhook_shutdown"}`) and return that count.
    /// Events emitted after the flush began are delivered only if a lane is still working.
    /// A second call does nothing and returns 0.
    pub async fn flush(&self, deadline: tokio::time::Instant) -> u64 {
        let Some(inner) = &self.inner else {
            return 0;
        };
        if inner.closing.send_replace(true) {
            // Flushed already: its count stands, later events count as they are emitted.
            return 0;
        }
        let handles = match inner.lanes.lock() {
            Ok(mut l) => std::mem::take(&mut *l),
            Err(p) => std::mem::take(&mut *p.into_inner()),
        };
        let all = futures_util::future::join_all(handles);
        let _ = tokio::time::timeout_at(deadline, all).await;
        let left = inner.pending.load(Ordering::Acquire);
        inner.shutdown_dropped.inc_by(left);
        left
    }

    /// Whether any URL is configured (callers may skip building events otherwise).
    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Queue `event` for every URL without waiting; `key` (room or allocation id) keeps the
    /// order of events that share it. A full queue drops the event and counts the drop.
    pub fn emit(&self, key: &str, event: Event) {
        let Some(inner) = &self.inner else {
            return;
        };
        let seq = inner.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let env = Arc::new(Envelope {
            id: format!("{}-{seq}", inner.prefix),
            seq,
            time: unix_ms(),
            event,
        });
        let mut h = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut h);
        let lane = (h.finish() % LANES as u64) as usize;
        for lanes in &inner.targets {
            if let Some(tx) = lanes.get(lane) {
                // Counted before the send, so a lane never finishes an event not yet counted.
                inner.pending.fetch_add(1, Ordering::AcqRel);
                match tx.try_send(env.clone()) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        inner.pending.fetch_sub(1, Ordering::AcqRel);
                        inner.queue_full.inc();
                    }
                    // The lane ended: the flush at shutdown is over.
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        inner.pending.fetch_sub(1, Ordering::AcqRel);
                        inner.shutdown_dropped.inc();
                    }
                }
            }
        }
    }

    /// Emit `allocation.ended` with the usage of `end`, its duration measured now.
    pub fn allocation_ended(&self, end: AllocationEnd<'_>) {
        if !self.enabled() {
            return;
        }
        let u = end.usage;
        self.emit(
            end.allocation,
            Event::AllocationEnded {
                allocation: end.allocation.to_string(),
                user: end.user.to_string(),
                transport: end.transport.to_string(),
                relay_transport: end.relay_transport.to_string(),
                reason: end.reason.to_string(),
                duration_ms: end.created.elapsed().as_millis() as u64,
                bytes_to_peer: u.bytes_to_peer.load(Ordering::Relaxed),
                bytes_to_client: u.bytes_to_client.load(Ordering::Relaxed),
                packets_to_peer: u.packets_to_peer.load(Ordering::Relaxed),
                packets_to_client: u.packets_to_client.load(Ordering::Relaxed),
            },
        );
    }
}

/// The HTTP client: the shared shape, with `webhooks.ca_file` and `webhooks.timeout_secs`.
fn http_client(cfg: &WebhooksConfig) -> Result<reqwest::Client, WebhookError> {
    crate::https_client::build(
        cfg.ca_file.as_deref(),
        "webhooks.ca_file",
        Duration::from_secs(cfg.timeout_secs.max(1)),
    )
    .map_err(|e| match e {
        crate::https_client::ClientError::Config(c) => WebhookError::Config(c),
        crate::https_client::ClientError::Client(m) => WebhookError::Client(m),
    })
}

/// What one attempt came to.
enum Attempt {
    Delivered,
    /// Worth retrying: network error, timeout, 408, 429 or 5xx.
    Retry(String),
    /// The receiver refused the event itself (another 4xx): retrying would not help.
    Refused(u16),
}

/// The signing secret of `cfg`: `webhooks.secret`, or the content of `webhooks.secret_file`
/// (read now: at start and on every SIGHUP).
pub fn signing_secret(cfg: &WebhooksConfig) -> Result<Vec<u8>, crate::config::ConfigError> {
    let secret = match (&cfg.secret, &cfg.secret_file) {
        (Some(s), _) => s.clone(),
        (None, Some(p)) => {
            crate::secret::read_one(p).map_err(|e| crate::config::ConfigError::Key {
                key: "webhooks.secret_file".into(),
                message: e.to_string(),
            })?
        }
        (None, None) => {
            return Err(crate::config::ConfigError::Key {
                key: "webhooks.secret".into(),
                message: "required when webhooks.urls is set".into(),
            })
        }
    };
    Ok(secret.expose().as_bytes().to_vec())
}

/// One delivery lane: events in order, one at a time, until the flush at shutdown has
/// emptied its queue.
async fn lane(
    mut rx: mpsc::Receiver<Arc<Envelope>>,
    lc: LaneConfig,
    mut closing: tokio::sync::watch::Receiver<bool>,
    pending: Arc<AtomicU64>,
) {
    loop {
        let env = tokio::select! {
            biased;
            e = rx.recv() => e,
            // Closing: take what is queued without waiting; an empty queue ends the lane.
            _ = closing.wait_for(|c| *c) => rx.try_recv().ok(),
        };
        let Some(env) = env else {
            return;
        };
        deliver(&lc, &env).await;
        pending.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Deliver one event: retried with backoff until delivered, refused or given up.
async fn deliver(lc: &LaneConfig, env: &Envelope) {
    let body = match serde_json::to_vec(env) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "cannot encode webhook event");
            lc.failed.inc();
            return;
        }
    };
    let mut attempt = 1u32;
    loop {
        let started = Instant::now();
        let r = post(lc, env, &body).await;
        lc.latency.observe(started.elapsed().as_secs_f64());
        match r {
            Attempt::Delivered => {
                lc.delivered.inc();
                break;
            }
            Attempt::Refused(code) => {
                tracing::warn!(url = %lc.url, event = env.event.kind(), id = %env.id, code, "webhook refused by the receiver; not retried");
                lc.failed.inc();
                break;
            }
            Attempt::Retry(why) if attempt < lc.max_attempts => {
                let wait = backoff(lc.retry_initial, lc.retry_max, attempt);
                tracing::debug!(url = %lc.url, event = env.event.kind(), attempt, error = %why, ?wait, "webhook delivery failed; retrying");
                lc.retried.inc();
                tokio::time::sleep(wait).await;
                attempt += 1;
            }
            Attempt::Retry(why) => {
                tracing::warn!(url = %lc.url, event = env.event.kind(), id = %env.id, attempts = attempt, error = %why, "webhook given up");
                lc.failed.inc();
                break;
            }
        }
    }
}

async fn post(lc: &LaneConfig, env: &Envelope, body: &[u8]) -> Attempt {
    let t = crate::crypto::unix_now();
    let sig = signature(&lc.secret.load(), t, body);
    let r = lc
        .client
        .post(lc.url.clone())
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(SIGNATURE_HEADER, sig)
        .header(EVENT_HEADER, env.event.kind())
        .header(DELIVERY_HEADER, env.id.as_str())
        .body(body.to_vec())
        .send()
        .await;
    match r {
        Ok(resp) => {
            let s = resp.status();
            if s.is_success() {
                Attempt::Delivered
            } else if s.is_server_error() || s.as_u16() == 408 || s.as_u16() == 429 {
                Attempt::Retry(format!("status {s}"))
            } else {
                Attempt::Refused(s.as_u16())
            }
        }
        Err(e) => Attempt::Retry(e.to_string()),
    }
}

/// Wait before retry number `attempt` (1-based): `initial * 2^(attempt-1)`, at most `max`,
/// less up to a quarter at random so that many lanes do not retry in step.
pub fn backoff(initial: Duration, max: Duration, attempt: u32) -> Duration {
    let exp = initial.saturating_mul(1u32 << (attempt.saturating_sub(1)).min(20));
    let d = exp.min(max);
    let jitter = rand::random::<f64>() * 0.25;
    d.mul_f64(1.0 - jitter)
}

/// The `Switchboard-Signature` header value for `body` sent at Unix second `t`.
pub fn signature(secret: &[u8], t: u64, body: &[u8]) -> String {
    let mut msg = Vec::with_capacity(body.len() + 12);
    msg.extend_from_slice(t.to_string().as_bytes());
    msg.push(b'.');
    msg.extend_from_slice(body);
    format!(
        "t={t},v1={}",
        hex(&crate::crypto::hmac_sha256(secret, &msg))
    )
}

/// Check a `Switchboard-Signature` header against `body`: the MAC must match (constant
/// time) and `t` be within `tolerance_secs` of `now_unix`. The receiver side, for tests and
/// for Rust receivers.
pub fn verify(
    secret: &[u8],
    header: &str,
    body: &[u8],
    now_unix: u64,
    tolerance_secs: u64,
) -> bool {
    let mut t = None;
    let mut v1 = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = v.parse::<u64>().ok(),
            Some(("v1", v)) => v1.push(v.to_string()),
            _ => {}
        }
    }
    let Some(t) = t else {
        return false;
    };
    if t.abs_diff(now_unix) > tolerance_secs {
        return false;
    }
    let want = signature(secret, t, body);
    let want = want.rsplit_once("v1=").map(|(_, m)| m).unwrap_or("");
    v1.iter()
        .any(|m| crate::crypto::secret_eq(m.as_bytes(), want.as_bytes()))
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_verifies_and_rejects_tampering_and_replay() {
        let body = br#"{"type":"room.created","room":"r"}"#;
        let h = signature(b"0123456789abcdef", 1_700_000_000, body);
        assert!(h.starts_with("t=1700000000,v1="));
        assert!(verify(b"0123456789abcdef", &h, body, 1_700_000_010, 300));
        assert!(!verify(b"0123456789abcdef", &h, b"{}", 1_700_000_010, 300));
        assert!(!verify(b"another-secret-xx", &h, body, 1_700_000_010, 300));
        assert!(!verify(b"0123456789abcdef", &h, body, 1_700_001_000, 300));
        assert!(!verify(
            b"0123456789abcdef",
            "v1=00",
            body,
            1_700_000_000,
            300
        ));
    }

    #[test]
    fn known_vector() {
        // printf '%s' '1700000000.{}' | openssl dgst -sha256 -hmac 0123456789abcdef
        assert_eq!(
            signature(b"0123456789abcdef", 1_700_000_000, b"{}"),
            "t=1700000000,v1=e4f8e2ecae2295b2ddb2f0b5584c8275e226c0ebe9b3b819e70156bb67122e3e"
        );
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let i = Duration::from_millis(100);
        let m = Duration::from_secs(1);
        let b1 = backoff(i, m, 1);
        assert!(b1 <= i && b1 >= i.mul_f64(0.75));
        let b3 = backoff(i, m, 3);
        assert!(b3 <= Duration::from_millis(400) && b3 >= Duration::from_millis(300));
        assert!(backoff(i, m, 30) <= m);
    }

    #[test]
    fn envelope_is_flat_camel_case_json() {
        let e = Envelope {
            id: "x-1".into(),
            seq: 1,
            time: 5,
            event: Event::AllocationEnded {
                allocation: "a".into(),
                user: "u".into(),
                transport: "udp".into(),
                relay_transport: "udp".into(),
                reason: "expired".into(),
                duration_ms: 7,
                bytes_to_peer: 1,
                bytes_to_client: 2,
                packets_to_peer: 3,
                packets_to_client: 4,
            },
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["type"], "allocation.ended");
        assert_eq!(v["relayTransport"], "udp");
        assert_eq!(v["bytesToClient"], 2);
        assert_eq!(v["seq"], 1);
    }

    #[tokio::test]
    async fn disabled_and_full_queues_never_wait() {
        let m = Metrics::new();
        let w = Webhooks::start(&WebhooksConfig::default(), &m).unwrap();
        assert!(!w.enabled());
        w.emit("r", Event::RoomCreated { room: "r".into() });
        // A receiver that never answers: the queue fills and the rest is dropped, at once.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let cfg = WebhooksConfig {
            urls: vec![format!("http://{}/hook", l.local_addr().unwrap())],
            secret: Some("0123456789abcdef".into()),
            queue_size: 8,
            ..Default::default()
        };
        let w = Webhooks::start(&cfg, &m).unwrap();
        let t = Instant::now();
        for _ in 0..1000 {
            w.emit("same-room", Event::RoomCreated { room: "r".into() });
        }
        assert!(t.elapsed() < Duration::from_millis(200));
        let dropped = m.drops.with_label_values(&["webhook_queue_full"]).get();
        assert!(dropped >= 1000 - 8, "{dropped}");
    }
}
