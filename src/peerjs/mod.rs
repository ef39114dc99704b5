//! The PeerJS server protocol (docs/peerjs.md): a sans-IO core of ids, tokens and held
//! messages (`core`), the service that owns it with the outboxes of connected sockets and
//! its expiry timer (here), and the per-connection WebSocket task (`conn`).

pub mod conn;
pub mod core;
pub mod router;

use std::collections::HashMap;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

use self::core::{ConnKey, Core, Deliver, Limits, Relayed};
use self::router::{Located, PeerjsRouter, RemoteMsg};
use crate::config::{PeerJsConfig, SignalingConfig};
use crate::webhooks::{Event, Webhooks};

/// The metric label of this wire protocol.
pub const PROTOCOL: &str = "peerjs";

/// The pseudo-room of `peer.joined`/`peer.left` webhooks for PeerJS ids (docs/peerjs.md).
pub const WEBHOOK_ROOM: &str = "peerjs";

/// The handles a PeerJS connection uses, and nothing else (built by the app layer).
#[derive(Debug, Clone)]
pub struct Deps {
    /// Session tokens and revocations.
    pub auth: Arc<crate::auth::Auth>,
    /// The metrics registry.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Draining and shutdown.
    pub lifecycle: Arc<crate::lifecycle::Lifecycle>,
}

/// What a connection task is told to do.
#[derive(Debug)]
pub enum Out {
    /// Send this text frame.
    Text(String),
    /// Close: the id was taken back by its holder, kicked or revoked.
    Close(u16, &'static str),
}

/// A connection's queue of frames, bounded in frames. An idle connection holds an empty
/// `VecDeque` (no preallocated channel block), which keeps idle sockets small.
#[derive(Debug)]
pub struct Outbox {
    q: Mutex<(VecDeque<Out>, bool)>,
    ready: Notify,
    max: usize,
}

impl Outbox {
    fn lock(&self) -> MutexGuard<'_, (VecDeque<Out>, bool)> {
        self.q.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queue `item`; `false` once the outbox is full (it then ends) or ended.
    fn push(&self, item: Out) -> bool {
        let mut q = self.lock();
        if q.1 {
            return false;
        }
        let ok = q.0.len() < self.max;
        if ok {
            q.0.push_back(item);
        } else {
            q.1 = true;
        }
        drop(q);
        self.ready.notify_one();
        ok
    }

    /// The next item without waiting, if it is a text frame (a close stays queued).
    pub fn try_recv_text(&self) -> Option<String> {
        let mut q = self.lock();
        match q.0.pop_front() {
            Some(Out::Text(t)) => Some(t),
            Some(other) => {
                q.0.push_front(other);
                None
            }
            None => None,
        }
    }

    /// The next item; `None` once the outbox ended (it overflowed) and is drained.
    pub async fn recv(&self) -> Option<Out> {
        loop {
            {
                let mut q = self.lock();
                if let Some(x) = q.0.pop_front() {
                    return Some(x);
                }
                if q.1 {
                    return None;
                }
            }
            self.ready.notified().await;
        }
    }
}

struct State {
    core: Core,
    outboxes: HashMap<ConnKey, Arc<Outbox>>,
}

/// One node's PeerJS realm: shared by every PeerJS connection of the server.
pub struct PeerJs {
    /// The `[peerjs]` settings.
    pub cfg: PeerJsConfig,
    /// The `[signaling]` limits that PeerJS connections share with `/v1/ws`.
    pub limits: SignalingConfig,
    state: Mutex<State>,
    next: AtomicU64,
    timer: Notify,
    timer_started: AtomicBool,
    webhooks: Webhooks,
    /// The cluster, in cluster mode: ids are claimed cluster-wide and relayed between nodes.
    router: Option<Arc<dyn PeerjsRouter>>,
}

/// Who holds an id in the cluster-wide registry: the session user, or (open auth) a hash of
/// the token, so that Redis never stores a token that takes the id back.
pub fn holder(token: &str, user: Option<&str>) -> String {
    use sha2::Digest;
    match user {
        Some(u) => format!("u:{u}"),
        None => {
            let h = sha2::Sha256::digest(token.as_bytes());
            let hex: String = h.iter().map(|b| format!("{b:02x}")).collect();
            format!("t:{hex}")
        }
    }
}

impl std::fmt::Debug for PeerJs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerJs").field("cfg", &self.cfg).finish()
    }
}

impl PeerJs {
    /// An empty realm with the configured bounds.
    pub fn new(
        cfg: &PeerJsConfig,
        limits: &SignalingConfig,
        webhooks: Webhooks,
        router: Option<Arc<dyn PeerjsRouter>>,
    ) -> PeerJs {
        let core = Core::new(Limits {
            max_peers: cfg.max_peers,
            expire_after: Duration::from_secs(cfg.expire_timeout_secs),
            max_held_per_peer: cfg.max_held_per_peer,
            max_held_bytes: cfg.max_held_bytes,
            resume_window: Duration::from_secs(limits.resume_grace_secs),
        });
        PeerJs {
            cfg: cfg.clone(),
            limits: limits.clone(),
            state: Mutex::new(State {
                core,
                outboxes: HashMap::new(),
            }),
            next: AtomicU64::new(1),
            timer: Notify::new(),
            timer_started: AtomicBool::new(false),
            webhooks,
            router,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new connection handle and its outbox (bounded by `signaling.outbox_frames`).
    fn open(&self) -> (ConnKey, Arc<Outbox>) {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        let ob = Arc::new(Outbox {
            q: Mutex::new((VecDeque::new(), false)),
            ready: Notify::new(),
            max: self.limits.outbox_frames.max(1),
        });
        self.lock().outboxes.insert(key, ob.clone());
        (key, ob)
    }

    /// Run `f` on the core, then hand its deliveries to the outboxes and wake the timer
    /// when the earliest deadline moved earlier.
    fn apply<T>(&self, f: impl FnOnce(&mut Core) -> (T, Vec<Deliver>)) -> T {
        let mut st = self.lock();
        let before = st.core.poll_timeout();
        let (t, out) = f(&mut st.core);
        let after = st.core.poll_timeout();
        let freed = st.core.drain_freed();
        deliver(&mut st, out);
        drop(st);
        if let Some(r) = &self.router {
            if !freed.is_empty() {
                r.release(freed.iter().map(|f| f.id.clone()).collect());
            }
        }
        for f in freed {
            self.webhooks.emit(
                WEBHOOK_ROOM,
                Event::PeerLeft {
                    room: WEBHOOK_ROOM.into(),
                    peer: f.id,
                    user: f.user.unwrap_or_default(),
                    reason: f.reason.into(),
                },
            );
        }
        if after.is_some() && (before.is_none() || after < before) {
            self.timer.notify_one();
        }
        t
    }

    /// Drop the outbox of a finished connection.
    fn forget(&self, conn: ConnKey) {
        self.lock().outboxes.remove(&conn);
    }

    /// Tell `conn` to close with `code`.
    fn close_conn(&self, conn: ConnKey, code: u16, why: &'static str) {
        push(&mut self.lock(), conn, Out::Close(code, why));
    }

    /// Report a newly registered id to the webhooks.
    fn joined(&self, id: &str, user: Option<&str>) {
        self.webhooks.emit(
            WEBHOOK_ROOM,
            Event::PeerJoined {
                room: WEBHOOK_ROOM.into(),
                peer: id.into(),
                user: user.unwrap_or_default().into(),
            },
        );
    }

    /// Connected ids (for `allow_discovery`).
    pub fn ids(&self) -> Vec<String> {
        self.lock().core.ids()
    }

    /// Close the connection holding `id` and free the id; whether one was connected.
    pub fn kick(&self, id: &str) -> bool {
        self.apply(|c| {
            let conn = c.remove(id, "kicked");
            (conn, Vec::new())
        })
        .map(|conn| self.close_conn(conn, 4001, "kicked"))
        .is_some()
    }

    /// Close every connection of `user` (the server API's revocation) and free their ids.
    pub fn revoke_user(&self, user: &str) -> usize {
        let mut st = self.lock();
        let conns = st.core.conns_of_user(user);
        for c in &conns {
            push(&mut st, *c, Out::Close(4005, "revoked"));
        }
        conns.len()
    }

    /// Relay `text` (stamped with `src`) of type `ty` from `src` to `dst`: to a local socket,
    /// to the node holding `dst` (located in the cluster first when unknown), or held. Awaited
    /// by the sender's task, so one sender's messages keep their order.
    async fn relay(
        &self,
        metrics: &crate::metrics::Metrics,
        src: &str,
        ty: &str,
        dst: &str,
        text: String,
    ) {
        let droppable = ty == "LEAVE" || ty == "EXPIRE";
        if let Some(r) = &self.router {
            if self.lock().core.needs_lookup(dst) {
                if let Located::On(node) = r.locate(dst).await {
                    self.lock().core.set_remote(dst, &node);
                }
                // `Nowhere`: held here, and this node is told when it connects. `Unavailable`
                // (Redis away): held here as in single-node mode.
            }
        }
        let now = Instant::now();
        let mut st = self.lock();
        let out = match st.core.relay(now, src, ty, dst, text) {
            Relayed::Deliver(d) => vec![d],
            Relayed::Refused(d) => {
                metrics.drops.with_label_values(&["peerjs_held_full"]).inc();
                vec![d]
            }
            Relayed::Remote { node, text } => {
                let msg = RemoteMsg::Relay {
                    src: src.to_string(),
                    dst: dst.to_string(),
                    droppable,
                    text,
                };
                // Sent under the lock, so a hand-over of held messages cannot overtake it.
                let sent = self.router.as_ref().is_some_and(|r| r.send(&node, msg));
                match (sent, st.core.conn_of(src)) {
                    (false, Some(conn)) if !droppable => {
                        metrics
                            .drops
                            .with_label_values(&["peerjs_cluster_unavailable"])
                            .inc();
                        vec![Deliver {
                            conn,
                            text: core::expire_text(dst, src),
                        }]
                    }
                    _ => Vec::new(),
                }
            }
            Relayed::Held | Relayed::Dropped => Vec::new(),
        };
        let timer = st.core.poll_timeout();
        deliver(&mut st, out);
        drop(st);
        if timer.is_some() {
            self.timer.notify_one();
        }
    }

    /// A PeerJS message from node `from` (cluster mode).
    pub fn on_remote(self: &Arc<Self>, from: &str, msg: RemoteMsg) {
        let Some(r) = self.router.clone() else { return };
        match msg {
            RemoteMsg::Relay {
                src,
                dst,
                droppable,
                text,
            } => {
                let mut st = self.lock();
                match st.core.conn_of(&dst) {
                    Some(conn) => push(&mut st, conn, Out::Text(text)),
                    // A session user's id reserved here for its resume window: held here.
                    None if st.core.is_registered(&dst) => {
                        let ty = if droppable { "LEAVE" } else { "OFFER" };
                        let _ = st.core.relay(Instant::now(), &src, ty, &dst, text);
                        drop(st);
                        self.timer.notify_one();
                    }
                    None => {
                        drop(st);
                        r.send(
                            from,
                            RemoteMsg::Miss {
                                src,
                                dst,
                                droppable,
                                text,
                            },
                        );
                    }
                }
            }
            RemoteMsg::Miss {
                src,
                dst,
                droppable,
                text,
            } => {
                // The target left that node: hold the message here as for an id that is
                // nowhere, and locate the id again.
                let ty = if droppable { "LEAVE" } else { "OFFER" };
                let held = self.apply(|c| {
                    c.forget_remote(&dst);
                    match c.relay(Instant::now(), &src, ty, &dst, text) {
                        Relayed::Held => (true, Vec::new()),
                        Relayed::Refused(d) => (false, vec![d]),
                        Relayed::Deliver(d) => (false, vec![d]),
                        Relayed::Remote { .. } | Relayed::Dropped => (false, Vec::new()),
                    }
                });
                if held {
                    let me = self.clone();
                    let from = from.to_string();
                    tokio::spawn(async move {
                        // The node that missed may still name itself until its release lands.
                        for _ in 0..20 {
                            match r.locate(&dst).await {
                                Located::On(node) if node == from => {
                                    tokio::time::sleep(Duration::from_millis(100)).await;
                                }
                                Located::On(node) => return me.hand_over(&dst, &node),
                                _ => return,
                            }
                        }
                    });
                }
            }
            RemoteMsg::Here { id } => self.hand_over(&id, from),
            RemoteMsg::Kick { id } => {
                // The holder reconnected on `from`: this socket goes, the claim is theirs.
                if let Some(conn) = self.apply(|c| (c.remove(&id, "moved"), Vec::new())) {
                    self.close_conn(conn, 4000, "taken back by the same holder");
                }
            }
        }
    }

    /// `id` connected on `node`: send what is held for it there, in order, under the lock.
    fn hand_over(&self, id: &str, node: &str) {
        let Some(r) = &self.router else { return };
        let mut st = self.lock();
        for h in st.core.arrived_remote(id, node) {
            r.send(
                node,
                RemoteMsg::Relay {
                    src: h.src,
                    dst: id.to_string(),
                    droppable: false,
                    text: h.text,
                },
            );
        }
    }

    /// Keep this node's cluster-wide claims alive; an id another node claimed meanwhile (this
    /// node was cut off from Redis) is closed here.
    fn start_refresh(self: &Arc<Self>, lifecycle: &crate::lifecycle::Lifecycle) {
        let Some(r) = self.router.clone() else { return };
        let weak: Weak<PeerJs> = Arc::downgrade(self);
        let stop = crate::lifecycle::shutdown_signal(lifecycle.subscribe());
        tokio::spawn(async move {
            let mut stop = std::pin::pin!(stop);
            let mut tick = tokio::time::interval(r.refresh_every());
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = &mut stop => return,
                }
                let Some(me) = weak.upgrade() else { return };
                let ids: Vec<(String, String)> = me
                    .lock()
                    .core
                    .claims()
                    .into_iter()
                    .map(|(id, token, user)| {
                        let h = holder(&token, user.as_deref());
                        (id, h)
                    })
                    .collect();
                drop(me);
                if ids.is_empty() {
                    continue;
                }
                let lost = r.refresh(ids).await;
                let Some(me) = weak.upgrade() else { return };
                for id in lost {
                    tracing::warn!("peerjs: an id of this node is claimed by another node");
                    if let Some(conn) = me.apply(|c| (c.remove(&id, "moved"), Vec::new())) {
                        me.close_conn(conn, 4000, "taken back by the same holder");
                    }
                }
            }
        });
    }

    /// Start the one task that expires held messages and reservations, once per realm.
    fn ensure_timer(self: &Arc<Self>, lifecycle: &crate::lifecycle::Lifecycle) {
        if self.timer_started.swap(true, Ordering::AcqRel) {
            return;
        }
        self.start_refresh(lifecycle);
        let weak: Weak<PeerJs> = Arc::downgrade(self);
        let stop = crate::lifecycle::shutdown_signal(lifecycle.subscribe());
        tokio::spawn(async move {
            let mut stop = std::pin::pin!(stop);
            loop {
                let Some(me) = weak.upgrade() else { return };
                let next = me.lock().core.poll_timeout();
                let wake = me.timer.notified();
                let sleep = async {
                    match next {
                        Some(at) => tokio::time::sleep_until(at.into()).await,
                        None => std::future::pending().await,
                    }
                };
                // Hold no strong reference while sleeping, so a dropped realm ends the task.
                let me = Arc::downgrade(&me);
                tokio::select! {
                    _ = sleep => {}
                    _ = wake => {}
                    _ = &mut stop => return,
                }
                let Some(me) = me.upgrade() else { return };
                me.apply(|c| ((), c.handle_timeout(Instant::now())));
            }
        });
    }
}

/// Hand deliveries to their outboxes. A full outbox ends and leaves the map: its task writes
/// what is queued, then sees the end and closes (too slow).
fn deliver(st: &mut State, out: Vec<Deliver>) {
    for d in out {
        push(st, d.conn, Out::Text(d.text));
    }
}

fn push(st: &mut State, conn: ConnKey, item: Out) {
    if let Some(ob) = st.outboxes.get(&conn) {
        if !ob.push(item) {
            st.outboxes.remove(&conn);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_outbox_is_bounded_ends_on_overflow_and_keeps_a_close_queued() {
        let ob = Outbox {
            q: Mutex::new((VecDeque::new(), false)),
            ready: Notify::new(),
            max: 2,
        };
        assert!(ob.push(Out::Text("a".into())));
        assert!(ob.push(Out::Close(4001, "kicked")));
        // A batch of text stops at the close, which stays queued.
        assert_eq!(ob.try_recv_text().as_deref(), Some("a"));
        assert_eq!(ob.try_recv_text(), None);
        assert!(matches!(ob.recv().await, Some(Out::Close(4001, _))));
        assert!(ob.push(Out::Text("b".into())));
        assert!(ob.push(Out::Text("c".into())));
        // Full: the outbox ends; what was queued is still delivered, then None.
        assert!(!ob.push(Out::Text("d".into())));
        assert!(!ob.push(Out::Text("e".into())));
        assert!(matches!(ob.recv().await, Some(Out::Text(t)) if t == "b"));
        assert!(matches!(ob.recv().await, Some(Out::Text(t)) if t == "c"));
        assert!(ob.recv().await.is_none());
    }
}
