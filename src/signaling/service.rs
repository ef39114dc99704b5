//! The node's signaling service: the room core sharded by room id, each shard behind its own
//! lock with its own deadline task, the room quota, and the bus to connections.

use prometheus::{IntCounter, IntGauge};
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

use super::bus::{Bus, LocalBus, Outbox};
use super::room::{Action, Budget, ConnId, Hub, Limits, RoomError, RoomQuota};
use crate::config::SignalingConfig;
use crate::lifecycle::shutdown_signal;
use crate::metrics::Metrics;

/// Frame types counted by name; anything else is counted as `unknown`.
pub(crate) const KNOWN_TYPES: &[&str] = &[
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
    "room-closed",
    "unknown",
];

/// Metric handles resolved once, so counting a frame is one atomic add.
pub(crate) struct Counters {
    frames_in: Vec<IntCounter>,
    frames_out: Vec<IntCounter>,
    pub(crate) outbox_full: IntCounter,
    pub(crate) outbox_total: IntCounter,
    pub(crate) resume_evicted: IntCounter,
    pub(crate) hello_timeout: IntCounter,
    pub(crate) rooms_per_user: IntCounter,
    pub(crate) rooms_active: IntGauge,
    pub(crate) peers_active: IntGauge,
}

/// The static name of a frame type (`unknown` for anything else), for frames rendered on
/// another node.
pub(crate) fn static_kind(t: &str) -> &'static str {
    KNOWN_TYPES[type_index(t)]
}

fn type_index(t: &str) -> usize {
    KNOWN_TYPES
        .iter()
        .position(|k| *k == t)
        .unwrap_or(KNOWN_TYPES.len() - 1)
}

impl Counters {
    fn new(m: &Metrics) -> Counters {
        let per = |dir: &str| {
            KNOWN_TYPES
                .iter()
                .map(|t| m.signaling_frames.with_label_values(&[dir, t]))
                .collect()
        };
        let drop = |r: &str| m.drops.with_label_values(&[r]);
        Counters {
            frames_in: per("in"),
            frames_out: per("out"),
            outbox_full: drop("ws_outbox_full"),
            outbox_total: drop("ws_outbox_total"),
            resume_evicted: drop("ws_resume_evicted"),
            hello_timeout: drop("ws_hello_timeout"),
            rooms_per_user: drop("ws_rooms_per_user"),
            rooms_active: m.rooms_active.clone(),
            peers_active: m.peers_active.clone(),
        }
    }

    /// Count one incoming frame of type `t`.
    pub(crate) fn count_in(&self, t: &str) {
        self.frames_in[type_index(t)].inc();
    }

    /// Count one outgoing frame of type `t`.
    pub(crate) fn count_out(&self, t: &str) {
        self.frames_out[type_index(t)].inc();
    }
}

struct Shard {
    hub: Mutex<Hub>,
    /// Woken when an operation puts a deadline before the one the timer sleeps towards.
    wake: Notify,
}

/// The node's signaling service.
pub struct Signaling {
    shards: Vec<Shard>,
    hasher: std::collections::hash_map::RandomState,
    quota: Mutex<RoomQuota>,
    pub(crate) bus: Box<dyn Bus>,
    next_conn: AtomicU64,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    pub(crate) cfg: SignalingConfig,
    outbox_total: Arc<Budget>,
    resume_total: Arc<Budget>,
    counters: OnceLock<Counters>,
    /// Where room and peer events go; unset (or a no-op handle) without webhook URLs.
    webhooks: OnceLock<crate::webhooks::Webhooks>,
}

impl std::fmt::Debug for Signaling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signaling")
            .field("shards", &self.shards.len())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl Signaling {
    /// A service with the in-process bus.
    pub fn new(cfg: &SignalingConfig) -> Signaling {
        Self::with_bus(cfg, Box::new(LocalBus::default()))
    }

    /// A service whose room output goes through `bus` (the cluster bus in cluster mode).
    pub fn with_bus(cfg: &SignalingConfig, bus: Box<dyn Bus>) -> Signaling {
        let resume_total = Arc::new(Budget::new(cfg.resume_total_bytes));
        let limits = Limits {
            room_capacity: cfg.room_capacity,
            resume_grace: Duration::from_secs(cfg.resume_grace_secs),
            resume_buffer_frames: cfg.resume_buffer_frames.max(1),
            resume_buffer_bytes: cfg.resume_buffer_bytes,
            resume_total: resume_total.clone(),
            empty_room_grace: Duration::from_secs(cfg.empty_room_grace_secs),
        };
        let n = match cfg.hub_shards {
            0 => std::thread::available_parallelism().map_or(4, |n| n.get() * 4),
            n => n,
        };
        Signaling {
            shards: (0..n)
                .map(|_| Shard {
                    hub: Mutex::new(Hub::new(limits.clone())),
                    wake: Notify::new(),
                })
                .collect(),
            hasher: Default::default(),
            quota: Mutex::new(RoomQuota::new(cfg.max_rooms, cfg.max_rooms_per_user)),
            bus,
            next_conn: AtomicU64::new(1),
            per_ip: Mutex::new(HashMap::new()),
            cfg: cfg.clone(),
            outbox_total: Arc::new(Budget::new(cfg.outbox_total_bytes)),
            resume_total,
            counters: OnceLock::new(),
            webhooks: OnceLock::new(),
        }
    }

    /// Report room and peer events to `webhooks` from now on (set once, at start-up).
    pub fn set_webhooks(&self, webhooks: crate::webhooks::Webhooks) {
        if webhooks.enabled() {
            for s in &self.shards {
                lock(&s.hub).enable_hooks();
            }
        }
        let _ = self.webhooks.set(webhooks);
    }

    /// Run `f` on every shard in turn (server API: a user's seats may be anywhere).
    pub(crate) fn apply_each(
        &self,
        metrics: &Metrics,
        mut f: impl FnMut(&mut Hub, &mut Vec<Action>),
    ) {
        for i in 0..self.shards.len() {
            self.apply_shard(metrics, i, &mut f);
        }
    }

    /// Read every shard in turn (server API listings); holds one shard lock at a time.
    pub(crate) fn read_each(&self, mut f: impl FnMut(&Hub)) {
        for s in &self.shards {
            f(&lock(&s.hub));
        }
    }

    /// Read the shard that owns `room`.
    pub(crate) fn read<R>(&self, room: &str, f: impl FnOnce(&Hub) -> R) -> R {
        f(&lock(&self.shards[self.shard_of(room)].hub))
    }

    pub(crate) fn counters(&self, m: &Metrics) -> &Counters {
        self.counters.get_or_init(|| Counters::new(m))
    }

    /// Bytes queued in every outbox, and held in every resume buffer, of the node.
    pub fn buffered_bytes(&self) -> (usize, usize) {
        (self.outbox_total.used(), self.resume_total.used())
    }

    /// A new connection's id and outbox, attached to the bus.
    pub(crate) fn open(&self) -> (ConnId, Arc<Outbox>) {
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let ob = Arc::new(Outbox::new(
            self.cfg.outbox_frames,
            self.cfg.outbox_bytes,
            self.outbox_total.clone(),
        ));
        self.bus.attach(id, ob.clone());
        (id, ob)
    }

    /// A fresh connection id without an outbox (a connection of another node seated here).
    pub(crate) fn new_conn_id(&self) -> ConnId {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// Read the shard of `room` without changing it.
    pub(crate) fn peek<R>(&self, room: &str, f: impl FnOnce(&Hub) -> R) -> R {
        f(&lock(&self.shards[self.shard_of(room)].hub))
    }

    fn shard_of(&self, room: &str) -> usize {
        (self.hasher.hash_one(room) % self.shards.len() as u64) as usize
    }

    /// Run `f` on the shard that owns `room`, and deliver what it produced *before* releasing
    /// the shard: `seq` assignment and the push into each recipient's outbox happen under the
    /// same serialization, so every recipient's frames enter its outbox in `seq` order.
    pub(crate) fn apply<R>(
        &self,
        metrics: &Metrics,
        room: &str,
        f: impl FnOnce(&mut Hub, &mut Vec<Action>) -> R,
    ) -> R {
        self.apply_shard(metrics, self.shard_of(room), f)
    }

    /// Reserve a room for `user` in the node's quota.
    pub(crate) fn take_room(&self, metrics: &Metrics, user: &str) -> Result<(), RoomError> {
        let r = lock(&self.quota).take(user);
        if r == Err(RoomError::TooManyRoomsForUser) {
            self.counters(metrics).rooms_per_user.inc();
        }
        r
    }

    /// Give back a room reservation.
    pub(crate) fn release_room(&self, user: &str) {
        lock(&self.quota).release(user);
    }

    /// Drive resume windows and empty-room grace until shutdown: one task per shard sleeps
    /// until the head of its deadline queue.
    pub async fn run_timers(self: Arc<Self>, deps: super::Deps) {
        let loops = (0..self.shards.len()).map(|i| self.clone().shard_timer(deps.clone(), i));
        futures_util::future::join_all(loops).await;
    }

    async fn shard_timer(self: Arc<Self>, deps: super::Deps, i: usize) {
        let mut stop = std::pin::pin!(shutdown_signal(deps.lifecycle.subscribe()));
        let shard = &self.shards[i];
        loop {
            let next = lock(&shard.hub).next_deadline();
            let wait = next
                .map(|d| d.saturating_duration_since(Instant::now()))
                .unwrap_or(Duration::from_secs(3600));
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shard.wake.notified() => continue,
                _ = &mut stop => return,
            }
            let now = Instant::now();
            // Route by shard index: every room of this shard hashes here.
            let done = self.apply_shard(&deps.metrics, i, |h, out| h.tick(now, out));
            if done.expired > 0 {
                deps.metrics
                    .resumes
                    .with_label_values(&["expired"])
                    .inc_by(done.expired as u64);
            }
            for creator in done.closed {
                self.release_room(&creator);
            }
            if let Some(cl) = &deps.cluster {
                // Expired seats leave the mirror too, so a takeover does not bring them back.
                for room in &done.shrunk_rooms {
                    cl.mirror(room);
                }
                for room in &done.closed_rooms {
                    cl.closed(room);
                }
            }
        }
    }

    fn apply_shard<R>(
        &self,
        metrics: &Metrics,
        i: usize,
        f: impl FnOnce(&mut Hub, &mut Vec<Action>) -> R,
    ) -> R {
        let c = self.counters(metrics);
        let shard = &self.shards[i];
        let mut out = Vec::new();
        let mut hub = lock(&shard.hub);
        let (rooms0, peers0, due0, ev0) = (
            hub.room_count(),
            hub.peer_count(),
            hub.next_deadline(),
            hub.evicted(),
        );
        let r = f(&mut hub, &mut out);
        // Webhook events leave under the shard's serialization, so a room's stay in order;
        // emitting never waits (a full queue drops and counts).
        if let Some(w) = self.webhooks.get() {
            for e in hub.take_hooks() {
                let key = e.key().to_string();
                w.emit(&key, e);
            }
        }
        for a in &out {
            if let Action::Send(_, fr) = a {
                c.count_out(fr.kind());
            }
        }
        let d = self.bus.deliver(out);
        let (rooms1, peers1, due1, ev1) = (
            hub.room_count(),
            hub.peer_count(),
            hub.next_deadline(),
            hub.evicted(),
        );
        drop(hub);
        c.rooms_active.add(rooms1 as i64 - rooms0 as i64);
        c.peers_active.add(peers1 as i64 - peers0 as i64);
        c.outbox_full.inc_by(d.full as u64);
        c.outbox_total.inc_by(d.total as u64);
        c.resume_evicted.inc_by(ev1 - ev0);
        if due1.is_some() && (due0.is_none() || due1 < due0) {
            shard.wake.notify_one();
        }
        r
    }

    /// Count a new connection from `ip`; `false` when the IP is at its limit.
    pub fn admit(&self, ip: IpAddr) -> bool {
        let mut m = lock(&self.per_ip);
        let n = m.entry(ip).or_insert(0);
        if *n >= self.cfg.max_connections_per_ip {
            return false;
        }
        *n += 1;
        true
    }

    /// Forget a connection from `ip`.
    pub(crate) fn release(&self, ip: IpAddr) {
        let mut m = lock(&self.per_ip);
        if let Some(n) = m.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&ip);
            }
        }
    }
}
