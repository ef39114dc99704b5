//! RFC 6062 TCP relays: a listening socket per allocation, peer connections parked until the
//! client's ConnectionBind, and the data pipes with the allocation's bandwidth cap.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use tracing::Instrument;

use super::ClientSink;
use crate::metrics::Metrics;
use crate::stun::codec::{attr, method, Class, Encoder};
use crate::turn::core::{Bucket, View};

/// Bandwidth buckets of one TCP allocation's data connections: client-to-peer, peer-to-client.
pub type PipeBuckets = Arc<[std::sync::Mutex<Bucket>; 2]>;

/// What an RFC 6062 peer connection inherits from its allocation: who may claim it, the
/// allocation's bandwidth cap, and a signal that fires when the allocation is deleted.
#[derive(Clone)]
pub struct PipeOwner {
    /// Username of the credential the allocation was made with.
    pub user: Arc<str>,
    /// The allocation's relay address: one per allocation, so it keys the pending cap.
    pub relay: SocketAddr,
    /// Closed (the sender dropped) when the allocation's relay socket is dropped.
    pub alive: tokio::sync::watch::Receiver<()>,
    /// Buckets shared by every data connection of the allocation: client-to-peer and back.
    pub buckets: Option<PipeBuckets>,
    /// The allocation's usage, so data connection bytes reach its `allocation.ended` webhook.
    pub usage: Arc<crate::turn::core::Usage>,
    /// The allocation's client transport, for the relayed-bytes-by-transport metric.
    pub transport: &'static str,
}

impl std::fmt::Debug for PipeOwner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PipeOwner")
            .field("relay", &self.relay)
            .finish_non_exhaustive()
    }
}

struct Parked {
    stream: tokio::net::TcpStream,
    at: Instant,
    owner: PipeOwner,
}

#[derive(Default)]
struct ConnsInner {
    parked: std::collections::HashMap<u32, Parked>,
    per_relay: std::collections::HashMap<SocketAddr, usize>,
}

impl ConnsInner {
    fn remove(&mut self, id: u32) -> Option<Parked> {
        let p = self.parked.remove(&id)?;
        if let Some(n) = self.per_relay.get_mut(&p.owner.relay) {
            *n -= 1;
            if *n == 0 {
                self.per_relay.remove(&p.owner.relay);
            }
        }
        Some(p)
    }
}

/// Peer TCP connections waiting for the client's ConnectionBind (RFC 6062), by connection id.
/// Shared by every listener because the client binds on a new connection. Control path only.
pub struct Conns {
    inner: std::sync::Mutex<ConnsInner>,
    max_per_relay: usize,
}

impl std::fmt::Debug for Conns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conns")
            .field("max_per_relay", &self.max_per_relay)
            .finish_non_exhaustive()
    }
}

/// How long a peer connection waits for its ConnectionBind (RFC 6062 §5.3: 30 seconds).
const CONNECTION_BIND_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Why a ConnectionBind could not claim a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BindError {
    /// No connection waits under that id (never did, taken, timed out, or its allocation
    /// is gone).
    #[error("unknown CONNECTION-ID")]
    Unknown,
    /// The connection belongs to an allocation of another user.
    #[error("CONNECTION-ID of another allocation")]
    NotOwner,
}

impl Conns {
    /// An empty table allowing `max_per_relay` waiting connections per allocation.
    pub fn new(max_per_relay: usize) -> Conns {
        Conns {
            inner: std::sync::Mutex::new(ConnsInner::default()),
            max_per_relay: max_per_relay.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ConnsInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Park a peer connection for its allocation and return its new CONNECTION-ID; `None`
    /// (the stream is dropped) when that allocation already has its cap of waiting ones.
    /// Stale entries, and those of deleted allocations, are dropped first.
    pub fn insert(&self, s: tokio::net::TcpStream, owner: PipeOwner) -> Option<u32> {
        let now = Instant::now();
        let mut m = self.lock();
        let stale: Vec<u32> = m
            .parked
            .iter()
            .filter(|(_, p)| {
                now.duration_since(p.at) >= CONNECTION_BIND_WAIT
                    || p.owner.alive.has_changed().is_err()
            })
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            m.remove(id);
        }
        if m.per_relay.get(&owner.relay).copied().unwrap_or(0) >= self.max_per_relay {
            return None;
        }
        *m.per_relay.entry(owner.relay).or_insert(0) += 1;
        loop {
            let id: u32 = rand::random();
            if id != 0 && !m.parked.contains_key(&id) {
                m.parked.insert(
                    id,
                    Parked {
                        stream: s,
                        at: now,
                        owner,
                    },
                );
                return Some(id);
            }
        }
    }

    /// Claim the peer connection `id` for a ConnectionBind authenticated as `user`.
    ///
    /// A connection of another user's allocation stays parked for its owner; the caller
    /// closes the client connection that asked, so each guess costs a new connection.
    pub fn take(
        &self,
        id: u32,
        user: &str,
    ) -> Result<(tokio::net::TcpStream, PipeOwner), BindError> {
        let mut m = self.lock();
        let p = m.parked.get(&id).ok_or(BindError::Unknown)?;
        if p.at.elapsed() >= CONNECTION_BIND_WAIT || p.owner.alive.has_changed().is_err() {
            m.remove(id);
            return Err(BindError::Unknown);
        }
        if &*p.owner.user != user {
            return Err(BindError::NotOwner);
        }
        let p = m.remove(id).ok_or(BindError::Unknown)?;
        Ok((p.stream, p.owner))
    }

    /// Connections waiting now (all allocations).
    pub fn len(&self) -> usize {
        self.lock().parked.len()
    }

    /// Whether no connection waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Relay an RFC 6062 data connection with its allocation's limits: the shared bandwidth
/// buckets, an idle timeout, and an end when the allocation is deleted. Returns why it was
/// cut as a metrics label, or `None` when a side closed.
pub async fn data_pipe<C, P>(
    client: C,
    peer: P,
    owner: PipeOwner,
    idle: std::time::Duration,
    metrics: &Metrics,
) -> Option<&'static str>
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    P: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use std::sync::atomic::{AtomicU64, Ordering};
    let start = tokio::time::Instant::now();
    let last = AtomicU64::new(0);
    let (mut crd, mut cwr) = tokio::io::split(client);
    let (mut prd, mut pwr) = tokio::io::split(peer);
    let touch = || last.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
    // Byte streams have no packets: per-allocation usage counts their bytes only.
    let count_up = |n: u64| {
        metrics.relay_bytes_to_peer.inc_by(n);
        metrics
            .relay_bytes_by_transport
            .to_peer(owner.transport)
            .inc_by(n);
        owner.usage.to_peer(0, n);
    };
    let count_down = |n: u64| {
        metrics.relay_bytes_to_client.inc_by(n);
        metrics
            .relay_bytes_by_transport
            .to_client(owner.transport)
            .inc_by(n);
        owner.usage.to_client(0, n);
    };
    let up = copy_capped(
        &mut crd,
        &mut pwr,
        owner.buckets.as_ref().map(|b| &b[0]),
        &touch,
        &count_up,
    );
    let down = copy_capped(
        &mut prd,
        &mut cwr,
        owner.buckets.as_ref().map(|b| &b[1]),
        &touch,
        &count_down,
    );
    let idle_out = async {
        loop {
            let at = start + std::time::Duration::from_millis(last.load(Ordering::Relaxed)) + idle;
            if tokio::time::Instant::now() >= at {
                return;
            }
            tokio::time::sleep_until(at).await;
        }
    };
    let mut alive = owner.alive.clone();
    tokio::select! {
        _ = async { tokio::join!(up, down) } => None,
        _ = idle_out => Some("data_connection_idle"),
        _ = alive.changed() => Some("data_connection_allocation_gone"),
    }
}

/// Copy one direction, at most the bucket's rate, marking activity; on EOF the write side
/// is shut down so the other end sees the half-close.
async fn copy_capped<R, W>(
    rd: &mut R,
    wr: &mut W,
    bucket: Option<&std::sync::Mutex<Bucket>>,
    touch: &impl Fn(),
    count: &impl Fn(u64),
) where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    // A read never asks for more than one second's budget, so the bucket can always pay.
    let chunk = bucket
        .map(|b| b.lock().unwrap_or_else(|p| p.into_inner()).rate())
        .filter(|r| *r > 0)
        .map_or(buf.len(), |r| (r as usize).clamp(1, buf.len()));
    loop {
        let n = match rd.read(&mut buf[..chunk]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        touch();
        if let Some(b) = bucket {
            loop {
                let ok = b
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .allow(Instant::now(), n);
                if ok {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
        if wr.write_all(&buf[..n]).await.is_err() {
            break;
        }
        count(n as u64);
    }
    let _ = wr.shutdown().await;
}

/// An RFC 6062 TCP relay: a listening socket whose accepted peer connections are announced to
/// the client with ConnectionAttempt. Dropping it stops listening.
pub struct TcpRelay {
    pub(super) addr: SocketAddr,
    pub(super) view: Arc<ArcSwap<View>>,
    pub(super) sink: Arc<arc_swap::ArcSwapOption<ClientSink>>,
    pub(super) task: tokio::task::AbortHandle,
    /// Dropped with the relay: parked and piped peer connections see the allocation end.
    pub(super) alive: tokio::sync::watch::Sender<()>,
    pub(super) buckets: Arc<std::sync::OnceLock<Option<PipeBuckets>>>,
}

/// The owner record for a TCP relay's peer connections, from its published view.
fn pipe_owner(
    addr: SocketAddr,
    view: &View,
    alive: &tokio::sync::watch::Sender<()>,
    buckets: &std::sync::OnceLock<Option<PipeBuckets>>,
) -> Option<PipeOwner> {
    let user = view.owner.clone()?;
    let buckets = buckets
        .get_or_init(|| {
            (view.max_bps > 0).then(|| {
                let now = Instant::now();
                Arc::new([
                    std::sync::Mutex::new(Bucket::new(view.max_bps, now)),
                    std::sync::Mutex::new(Bucket::new(view.max_bps, now)),
                ])
            })
        })
        .clone();
    Some(PipeOwner {
        user,
        relay: addr,
        alive: alive.subscribe(),
        buckets,
        usage: view.usage.clone(),
        transport: view.transport,
    })
}

impl Drop for TcpRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TcpRelay {
    /// Who may claim this allocation's peer connections, and with what limits; `None`
    /// until the allocation has published its view.
    pub fn owner(&self) -> Option<PipeOwner> {
        pipe_owner(self.addr, &self.view.load(), &self.alive, &self.buckets)
    }

    /// Listen on `addr` and announce permitted incoming peers. Must run inside tokio.
    pub fn bind(
        addr: SocketAddr,
        conns: Arc<Conns>,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<TcpRelay> {
        use socket2::{Domain, Protocol, Socket, Type};
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        if addr.is_ipv6() {
            s.set_only_v6(true)?;
        }
        s.set_reuse_address(true)?;
        s.set_nonblocking(true)?;
        s.bind(&addr.into())?;
        s.listen(64)?;
        let l = tokio::net::TcpListener::from_std(s.into())?;
        let local = l.local_addr()?;
        let view = Arc::new(ArcSwap::from_pointee(View::default()));
        let sink = Arc::new(arc_swap::ArcSwapOption::<ClientSink>::empty());
        let (v, k) = (view.clone(), sink.clone());
        let alive = tokio::sync::watch::channel(()).0;
        let buckets = Arc::new(std::sync::OnceLock::new());
        let (alive2, buckets2) = (alive.clone(), buckets.clone());
        let over_cap = metrics
            .drops
            .with_label_values(&["peer_connections_per_allocation"]);
        let span = tracing::debug_span!("tcp_relay", relay = %local);
        let task = tokio::spawn(
            async move {
                loop {
                    let (stream, peer) = match l.accept().await {
                        Ok(x) => x,
                        Err(_) => {
                            // EMFILE and friends: back off instead of spinning.
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let view = v.load();
                    let sink = k.load();
                    let (Some(client), Some(sink)) = (view.client, sink.as_deref()) else {
                        continue;
                    };
                    if !view.permits(peer.ip(), Instant::now()) {
                        tracing::debug!(%peer, "peer connection without permission refused");
                        continue;
                    }
                    let Some(owner) = pipe_owner(local, &view, &alive2, &buckets2) else {
                        continue;
                    };
                    let Some(id) = conns.insert(stream, owner) else {
                        over_cap.inc();
                        tracing::debug!(%peer, "peer connection over the per-allocation cap closed");
                        continue;
                    };
                    let mut out = Vec::with_capacity(64);
                    let tid: [u8; 12] = rand::random();
                    let mut e = Encoder::new(
                        &mut out,
                        method::CONNECTION_ATTEMPT,
                        Class::Indication,
                        &tid,
                    );
                    e.xor_address(attr::XOR_PEER_ADDRESS, peer);
                    e.u32_attr(attr::CONNECTION_ID, id);
                    e.finish();
                    sink.deliver(&out, client, view.local);
                }
            }
            .instrument(span),
        )
        .abort_handle();
        Ok(TcpRelay {
            addr: local,
            view,
            sink,
            task,
            alive,
            buckets,
        })
    }
}
