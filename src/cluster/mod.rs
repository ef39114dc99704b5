//! Cluster mode: several nodes share rooms through Redis. Each room has one owner node (a
//! lease with an epoch, `lease`), which runs the room core for it; connections live on any
//! node, whose requests travel to the owner and whose frames come back over pub/sub (`wire`,
//! `bus`, `link`). Without `cluster.redis_url` none of this runs.

pub mod bus;
pub mod claim;
pub mod lease;
pub mod link;
pub mod members;
pub mod owner;
pub mod peerjs;
pub mod wire;

use futures_util::future::BoxFuture;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, Notify};

use self::bus::{ClusterBus, Out, Queue, Remote};
use self::lease::{Acquired, Leases, Owner};
use self::wire::{Who, Wire};
use crate::config::Config;
use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;
use crate::signaling::bus::{LocalBus, Outbound};
use crate::signaling::conn::Signaling;
use crate::signaling::room::{ConnId, Member, RoomError};

/// Why cluster mode could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The Redis URL does not parse.
    #[error("cluster.redis_url: {0}")]
    Url(String),
    /// Another live process claims this node id (see `claim`).
    #[error(
        "cluster.node_id: `{0}` is in use by another live process (its claim in Redis is still \
         refreshed); give every node its own id"
    )]
    NodeIdInUse(String),
}

pub use crate::signaling::router::{Answer, ResumeRequest, Route};

/// A forwarded request waiting for its answer.
#[derive(Debug)]
struct Pending {
    tx: oneshot::Sender<(u64, Answer)>,
    /// For `join` and `resume`: the connection and room to seat when the owner says yes. The
    /// seat is recorded as the answer arrives, before the frames that follow it on the bus.
    seat: Option<(ConnId, String)>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// The host name, for `cluster.node_id` when none is configured.
pub fn host_name() -> String {
    let h = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let h: String = h
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .take(64)
        .collect();
    if h.is_empty() {
        format!("node-{}", rand::random::<u32>())
    } else {
        h
    }
}

/// The handles cluster mode uses besides the configuration it is built from, and nothing
/// else: the metrics it reports and the lifecycle that tells it to hand its rooms over and stop.
#[derive(Debug, Clone)]
pub struct Deps {
    /// The metrics registry.
    pub metrics: Arc<Metrics>,
    /// Draining and shutdown.
    pub lifecycle: Arc<Lifecycle>,
}

/// One node's part of the cluster.
pub struct Cluster {
    node: Arc<str>,
    client: redis::Client,
    con: ConnectionManager,
    leases: Leases,
    remote: Arc<Remote>,
    local: Arc<LocalBus>,
    sig: Arc<Signaling>,
    metrics: Arc<Metrics>,
    lifecycle: Arc<Lifecycle>,
    up: AtomicBool,
    forward_timeout: Duration,
    lease_ttl: Duration,
    /// Rooms whose lease this node holds, with its epoch.
    owned: Mutex<HashMap<String, u64>>,
    /// Connections of this node seated in rooms owned elsewhere: (room, owner).
    seats: Mutex<HashMap<ConnId, (String, Owner)>>,
    pending: Mutex<HashMap<u64, Pending>>,
    next_req: AtomicU64,
    queue: Mutex<Option<Queue>>,
    /// Wakes the heartbeat at once (Redis came back).
    beat: Notify,
    handed_over: AtomicBool,
    /// This process's claim on the node id, and whether another live process holds it.
    claim: claim::Claim,
    clash: AtomicBool,
    /// The cluster-wide PeerJS id registry.
    pj: peerjs::PjCluster,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// The signaling service with the cluster bus, and the cluster around it. Nothing connects
    /// yet: Redis may be away at start, and local rooms work without it.
    pub fn build(
        config: &Config,
        deps: Deps,
    ) -> Result<(Arc<Signaling>, Arc<Cluster>), ClusterError> {
        let k = &config.cluster;
        let client = redis::Client::open(k.redis_url.as_str())
            .map_err(|e| ClusterError::Url(e.to_string()))?;
        let node: Arc<str> = if k.node_id.is_empty() {
            host_name().into()
        } else {
            k.node_id.as_str().into()
        };
        let rto = Duration::from_millis((k.lease_ms / 4).clamp(250, 1000));
        let mcfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(rto))
            .set_response_timeout(Some(rto))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let con = ConnectionManager::new_lazy_with_config(client.clone(), mcfg)
            .map_err(|e| ClusterError::Url(e.to_string()))?;
        let local = Arc::new(LocalBus::default());
        let (remote, queue) = Remote::new(
            k.publish_queue_bytes,
            deps.metrics
                .drops
                .with_label_values(&["cluster_queue_full"]),
        );
        let sig = Arc::new(Signaling::with_bus(
            &config.signaling,
            Box::new(ClusterBus {
                local: local.clone(),
                remote: remote.clone(),
            }),
        ));
        let grace = config.signaling.resume_grace_secs * 1000;
        let cl = Arc::new(Cluster {
            leases: Leases::new(&node, k.lease_ms, grace),
            claim: claim::Claim::new(&node, k.lease_ms),
            pj: peerjs::PjCluster::new(
                Duration::from_millis(k.lease_ms),
                Duration::from_secs(config.peerjs.expire_timeout_secs),
            ),
            clash: AtomicBool::new(false),
            node,
            client,
            con,
            remote,
            local,
            sig: sig.clone(),
            metrics: deps.metrics,
            lifecycle: deps.lifecycle,
            up: AtomicBool::new(false),
            forward_timeout: Duration::from_millis(k.forward_timeout_ms),
            lease_ttl: Duration::from_millis(k.lease_ms),
            owned: Mutex::default(),
            seats: Mutex::default(),
            pending: Mutex::default(),
            next_req: AtomicU64::new(1),
            queue: Mutex::new(Some(queue)),
            beat: Notify::new(),
            handed_over: AtomicBool::new(false),
        });
        tracing::info!(node = %cl.node, "cluster mode: rooms are shared through Redis");
        Ok((sig, cl))
    }

    /// This node's id.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Whether Redis answers, this node's subscription delivers and no other live process
    /// claims this node's id.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire) && !self.clash.load(Ordering::Acquire)
    }

    /// Rooms this node owns.
    pub fn rooms_owned(&self) -> usize {
        lock(&self.owned).len()
    }

    fn con(&self) -> ConnectionManager {
        self.con.clone()
    }

    fn has_room(&self, room: &str) -> bool {
        self.sig.peek(room, |h| h.has_room(room))
    }

    fn set_owned(&self, room: &str, epoch: Option<u64>) {
        let mut o = lock(&self.owned);
        match epoch {
            Some(e) => {
                o.insert(room.to_string(), e);
            }
            None => {
                o.remove(room);
            }
        }
        self.metrics.cluster_rooms_owned.set(o.len() as i64);
    }

    fn change(&self, event: &str) {
        self.metrics
            .cluster_ownership_changes
            .with_label_values(&[event])
            .inc();
    }

    /// Before `create`: take the room's lease for this node.
    pub async fn claim(&self, room: &str) -> Result<(), RoomError> {
        if !self.is_up() {
            return Err(RoomError::ClusterUnavailable);
        }
        match self.leases.acquire(&mut self.con(), room, false).await {
            Ok(Acquired::Mine { epoch, fresh, .. }) => {
                if !fresh && self.has_room(room) {
                    return Err(RoomError::RoomExists);
                }
                self.set_owned(room, Some(epoch));
                self.change("acquired");
                Ok(())
            }
            Ok(Acquired::Theirs(_)) => Err(RoomError::RoomExists),
            Err(e) => {
                tracing::warn!(error = %e, "cluster: cannot claim a room");
                Err(RoomError::ClusterUnavailable)
            }
        }
    }

    /// A claimed room was not created after all: give its lease back.
    pub fn unclaim(&self, room: &str) {
        let e = lock(&self.owned).get(room).copied();
        if let Some(e) = e {
            self.set_owned(room, None);
            self.remote.send(Out::Release(room.to_string(), e, true));
            self.change("released");
        }
    }

    /// A room owned here closed (empty past its grace).
    pub fn closed(&self, room: &str) {
        self.unclaim(room);
    }

    /// After a seat changed in a room owned here: mirror its seats for a node that may have to
    /// take it over.
    pub fn mirror(&self, room: &str) {
        let Some(epoch) = lock(&self.owned).get(room).copied() else {
            return;
        };
        let snap = self.sig.peek(room, |h| h.snapshot(room));
        self.remote.send(Out::Mirror(room.to_string(), epoch, snap));
    }

    async fn owner_of(&self, room: &str) -> Result<Option<Owner>, RoomError> {
        let mut con = self.con();
        let v: Option<String> = redis::cmd("GET")
            .arg(lease::lease_key(room))
            .query_async(&mut con)
            .await
            .map_err(|_| RoomError::ClusterUnavailable)?;
        Ok(v.as_deref().and_then(Owner::parse))
    }

    /// Send a request to `owner` and wait for its answer.
    async fn forward(
        &self,
        owner: &Owner,
        seat: Option<(ConnId, &str)>,
        make: impl FnOnce(u64) -> Wire,
    ) -> Result<(u64, Answer), RoomError> {
        if !self.is_up() {
            return Err(RoomError::ClusterUnavailable);
        }
        let req = self.next_req.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let seat = seat.map(|(c, r)| (c, r.to_string()));
        lock(&self.pending).insert(req, Pending { tx, seat });
        let t0 = Instant::now();
        let node: Arc<str> = owner.node.as_str().into();
        self.remote.publish(&node, make(req));
        let r = tokio::time::timeout(self.forward_timeout, rx).await;
        lock(&self.pending).remove(&req);
        match r {
            Ok(Ok(a)) => {
                self.metrics
                    .cluster_forward_seconds
                    .observe(t0.elapsed().as_secs_f64());
                Ok(a)
            }
            _ => {
                self.metrics
                    .drops
                    .with_label_values(&["cluster_unavailable"])
                    .inc();
                Err(RoomError::ClusterUnavailable)
            }
        }
    }

    fn who(m: &Member) -> Who {
        Who {
            user: m.user.clone(),
            limit: m.room_limit.clone(),
        }
    }

    /// `join` from a connection of this node: local when the room lives here, else forwarded
    /// to its owner.
    pub async fn join(
        &self,
        conn: ConnId,
        member: &Member,
        room: &str,
    ) -> Result<Route, RoomError> {
        let find = move || async move {
            match self.owner_of(room).await? {
                Some(owner) if owner.node != *self.node => Ok(Some(owner)),
                _ => Err(RoomError::UnknownRoom),
            }
        };
        self.to_owner(conn, room, find, |req| Wire::Join {
            req,
            conn,
            who: Self::who(member),
            room: room.to_string(),
        })
        .await
    }

    /// `resume` from a connection of this node: local when the room lives here; forwarded to
    /// its owner; or, when no node holds the room any more, taken over here from its mirror and
    /// what the resuming peer presents.
    pub async fn resume(
        &self,
        conn: ConnId,
        member: &Member,
        room: &str,
        r: ResumeRequest<'_>,
    ) -> Result<Route, RoomError> {
        let find = move || async move {
            match self.owner_of(room).await? {
                Some(o) if o.node != *self.node => Ok(Some(o)),
                _ if self.lifecycle.is_draining() => Err(RoomError::ClusterUnavailable),
                // `None`: taken over here, the room is local now.
                _ => self.take_over(room).await,
            }
        };
        self.to_owner(conn, room, find, |req| Wire::Resume {
            req,
            conn,
            who: Self::who(member),
            token: r.token.to_string(),
            last: r.last,
            id: r.id.clone(),
        })
        .await
    }

    /// What `join` and `resume` share: local when the room lives here, else forwarded to the
    /// owner that `find` names (`None`: the room is local now), retried with backoff while its
    /// lease changes hands (the owner answers `not_owner`).
    async fn to_owner<F, Fut>(
        &self,
        conn: ConnId,
        room: &str,
        mut find: F,
        make: impl Fn(u64) -> Wire,
    ) -> Result<Route, RoomError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<Option<Owner>, RoomError>>,
    {
        for attempt in 0..5u32 {
            if self.has_room(room) {
                return Ok(Route::Local);
            }
            if !self.is_up() {
                return Err(RoomError::ClusterUnavailable);
            }
            let Some(owner) = find().await? else {
                return Ok(Route::Local);
            };
            let (_, a) = self.forward(&owner, Some((conn, room)), &make).await?;
            match a {
                Answer::Err(code, _) if code == "not_owner" => {
                    tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
                }
                a => return Ok(Route::Remote(a)),
            }
        }
        Err(RoomError::ClusterUnavailable)
    }

    /// Take a room over from its mirror; `Some(owner)` when another node won the race.
    async fn take_over(&self, room: &str) -> Result<Option<Owner>, RoomError> {
        let got = self
            .leases
            .acquire(&mut self.con(), room, true)
            .await
            .map_err(|_| RoomError::ClusterUnavailable)?;
        let (epoch, mirror) = match got {
            Acquired::Theirs(o) => return Ok(Some(o)),
            Acquired::Mine { epoch, mirror, .. } => (epoch, mirror),
        };
        // Ours already (this node restarted under the same id): read the mirror itself.
        let mirror = match mirror {
            Some(m) => Some(m),
            None => {
                let v: Option<String> = redis::cmd("GET")
                    .arg(lease::mirror_key(room))
                    .query_async(&mut self.con())
                    .await
                    .map_err(|_| RoomError::ClusterUnavailable)?;
                v.and_then(|s| serde_json::from_str(&s).ok())
            }
        };
        let Some(state) = mirror.filter(|s: &crate::signaling::room::RoomState| s.room == room)
        else {
            let _ = self
                .leases
                .release(&mut self.con(), room, epoch, true)
                .await;
            return Err(RoomError::BadResume);
        };
        let now = Instant::now();
        let adopted = self
            .sig
            .apply(&self.metrics, room, |h, _| h.adopt(now, &state));
        if adopted.is_ok() {
            let _ = self.sig.take_room(&self.metrics, &state.creator);
        }
        self.set_owned(room, Some(epoch));
        self.change("takeover");
        tracing::info!(
            room_peers = state.peers.len(),
            epoch,
            "cluster: took a room over"
        );
        Ok(None)
    }

    /// Whether a connection of this node is seated through another node.
    pub fn is_remote(&self, conn: ConnId) -> bool {
        lock(&self.seats).contains_key(&conn)
    }

    fn owner_of_seat(&self, conn: ConnId) -> Option<(Arc<str>, u64)> {
        lock(&self.seats)
            .get(&conn)
            .map(|(_, o)| (Arc::from(o.node.as_str()), o.epoch))
    }

    /// `signal` from a remote-seated connection: forwarded; the owner answers with `ack` or
    /// `error` frames through the same ordered stream.
    pub fn signal(
        &self,
        conn: ConnId,
        to: Option<&str>,
        data: &str,
        id: Option<&str>,
    ) -> Result<(), RoomError> {
        if !self.is_up() {
            return Err(RoomError::ClusterUnavailable);
        }
        let (node, epoch) = self
            .owner_of_seat(conn)
            .ok_or(RoomError::ClusterUnavailable)?;
        self.remote.publish(
            &node,
            Wire::Signal {
                conn,
                epoch,
                to: to.map(str::to_string),
                data: data.to_string(),
                id: id.map(str::to_string),
            },
        );
        Ok(())
    }

    /// `leave` from a remote-seated connection.
    pub async fn leave(&self, conn: ConnId) -> Result<Answer, RoomError> {
        let Some((_, owner)) = lock(&self.seats).get(&conn).cloned() else {
            return Err(RoomError::NotInRoom);
        };
        let r = self
            .forward(&owner, None, |req| Wire::Leave { req, conn })
            .await;
        lock(&self.seats).remove(&conn);
        r.map(|(_, a)| a)
    }

    /// A connection of this node ended: a remote seat is kept for the resume window unless it
    /// left cleanly.
    pub fn gone(&self, conn: ConnId, cleanly: bool) {
        let Some((_, owner)) = lock(&self.seats).remove(&conn) else {
            return;
        };
        if !cleanly {
            let node: Arc<str> = owner.node.as_str().into();
            self.remote.publish(&node, Wire::Disconnect { conn });
        }
    }

    fn push(&self, conn: ConnId, item: Outbound) {
        if let Some(ob) = self.local.outbox(conn) {
            let _ = ob.push(item);
        }
    }

    /// Close connections so that their clients resume where their room lives now.
    fn moved(&self, room: &str) {
        let Some((creator, conns)) = self.sig.apply(&self.metrics, room, |h, _| h.evict(room))
        else {
            return;
        };
        self.sig.release_room(&creator);
        for c in conns {
            match self.remote.remove_proxy(c) {
                Some(p) => {
                    self.remote.publish(
                        &p.node,
                        Wire::Moved {
                            conn: p.conn,
                            epoch: p.epoch,
                        },
                    );
                }
                None => self.push(c, Outbound::Moved),
            }
        }
    }
}

/// The signaling part reaches the cluster through this trait, so signaling never imports
/// the cluster (which drives signaling's hub for the rooms this node owns).
impl crate::signaling::router::RoomRouter for Cluster {
    fn is_remote(&self, conn: ConnId) -> bool {
        Cluster::is_remote(self, conn)
    }
    fn claim<'a>(&'a self, room: &'a str) -> BoxFuture<'a, Result<(), RoomError>> {
        Box::pin(Cluster::claim(self, room))
    }
    fn unclaim(&self, room: &str) {
        Cluster::unclaim(self, room)
    }
    fn closed(&self, room: &str) {
        Cluster::closed(self, room)
    }
    fn mirror(&self, room: &str) {
        Cluster::mirror(self, room)
    }
    fn join<'a>(
        &'a self,
        conn: ConnId,
        member: &'a Member,
        room: &'a str,
    ) -> BoxFuture<'a, Result<Route, RoomError>> {
        Box::pin(Cluster::join(self, conn, member, room))
    }
    fn resume<'a>(
        &'a self,
        conn: ConnId,
        member: &'a Member,
        room: &'a str,
        r: ResumeRequest<'a>,
    ) -> BoxFuture<'a, Result<Route, RoomError>> {
        Box::pin(Cluster::resume(self, conn, member, room, r))
    }
    fn signal(
        &self,
        conn: ConnId,
        to: Option<&str>,
        data: &str,
        id: Option<&str>,
    ) -> Result<(), RoomError> {
        Cluster::signal(self, conn, to, data, id)
    }
    fn leave(&self, conn: ConnId) -> BoxFuture<'_, Result<Answer, RoomError>> {
        Box::pin(Cluster::leave(self, conn))
    }
    fn gone(&self, conn: ConnId, cleanly: bool) {
        Cluster::gone(self, conn, cleanly)
    }
}
