//! The PeerJS server protocol (docs/peerjs.md): a sans-IO core of ids, tokens and held
//! messages (`core`), the service that owns it with the outboxes of connected sockets and
//! its expiry timer (here), and the per-connection WebSocket task (`conn`).

pub mod conn;
pub mod core;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify};

use self::core::{ConnKey, Core, Deliver, Limits};
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

struct State {
    core: Core,
    outboxes: HashMap<ConnKey, mpsc::Sender<Out>>,
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
}

impl std::fmt::Debug for PeerJs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerJs").field("cfg", &self.cfg).finish()
    }
}

impl PeerJs {
    /// An empty realm with the configured bounds.
    pub fn new(cfg: &PeerJsConfig, limits: &SignalingConfig, webhooks: Webhooks) -> PeerJs {
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
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new connection handle and its outbox (bounded by `signaling.outbox_frames`).
    fn open(&self) -> (ConnKey, mpsc::Receiver<Out>) {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(self.limits.outbox_frames.max(1));
        self.lock().outboxes.insert(key, tx);
        (key, rx)
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

    /// Start the one task that expires held messages and reservations, once per realm.
    fn ensure_timer(self: &Arc<Self>, lifecycle: &crate::lifecycle::Lifecycle) {
        if self.timer_started.swap(true, Ordering::AcqRel) {
            return;
        }
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

/// Hand deliveries to their outboxes. A full outbox loses its sender: its task writes what
/// is queued, then sees the outbox end and closes (too slow).
fn deliver(st: &mut State, out: Vec<Deliver>) {
    for d in out {
        push(st, d.conn, Out::Text(d.text));
    }
}

fn push(st: &mut State, conn: ConnKey, item: Out) {
    if let Some(tx) = st.outboxes.get(&conn) {
        if tx.try_send(item).is_err() {
            st.outboxes.remove(&conn);
        }
    }
}
