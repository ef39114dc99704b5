//! The UDP relay driver: one task per allocation owns its relay socket and moves peer
//! datagrams to the client; the client-to-peer direction is a `try_send_to` on the same
//! socket from the listener task. Neither direction allocates or takes a shared lock per
//! packet: permissions are read from an `ArcSwap` snapshot, counters are batched.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use tokio::net::UdpSocket;
use tracing::Instrument;

use crate::metrics::Metrics;
use crate::stun::codec::{attr, method, Class, Encoder};
use crate::turn::core::{Bucket, PeerRoute, Relay, View};
use crate::turn::wire::{channel_header, data_indication};

/// Room kept in front of a received payload for the ChannelData header.
const HEADROOM: usize = 4;
/// Largest datagram a relay socket reads.
const MAX_PAYLOAD: usize = 65_535;
/// Datagrams handled per wake-up before yielding, so one busy allocation cannot starve others.
const BATCH: usize = 64;

/// Where peer data for an allocation is delivered (the client's transport).
#[derive(Clone)]
pub enum ClientSink {
    /// The shared UDP listener socket the client talks to; `true` when it is a wildcard
    /// bind, so frames leave from the address the client sent to (IP_PKTINFO).
    Udp(Arc<UdpSocket>, bool),
    /// The bounded outgoing buffer of the client's TCP/TLS connection.
    Stream(Arc<StreamSink>),
}

impl ClientSink {
    /// Deliver one frame (STUN message or ChannelData) to `client`, from `local` on a
    /// wildcard UDP listener; false when dropped.
    fn deliver(&self, frame: &[u8], client: SocketAddr, local: Option<std::net::IpAddr>) -> bool {
        match self {
            ClientSink::Udp(s, true) => {
                crate::net::pktinfo::try_send(s, frame, client, local).is_ok()
            }
            ClientSink::Udp(s, false) => s.try_send_to(frame, client).is_ok(),
            ClientSink::Stream(s) => s.push(frame),
        }
    }
}

/// The outgoing byte buffer of one stream connection, shared by its relay task (producer)
/// and its writer task (consumer). It is bounded: when a client stops reading, frames are
/// dropped here instead of piling up, so a stalled client costs only its own packets. The
/// lock is per connection and held for a `memcpy`; buffers are swapped, never reallocated
/// once grown.
#[derive(Debug)]
pub struct StreamSink {
    buf: std::sync::Mutex<Vec<u8>>,
    cap: usize,
    notify: tokio::sync::Notify,
    closed: std::sync::atomic::AtomicBool,
}

impl StreamSink {
    /// A sink holding at most `cap` unsent bytes.
    pub fn new(cap: usize) -> StreamSink {
        StreamSink {
            buf: std::sync::Mutex::new(Vec::with_capacity(cap.min(64 * 1024))),
            cap: cap.max(4096),
            notify: tokio::sync::Notify::new(),
            closed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Queue a frame, padded to 4 bytes as streams require (RFC 8656 §12.5); false if the
    /// buffer is full or the connection is gone.
    pub fn push(&self, frame: &[u8]) -> bool {
        if self.closed.load(std::sync::atomic::Ordering::Relaxed) {
            return false;
        }
        let pad = (4 - frame.len() % 4) % 4;
        {
            let mut b = self.buf.lock().unwrap_or_else(|p| p.into_inner());
            if b.len() + frame.len() + pad > self.cap {
                return false;
            }
            b.extend_from_slice(frame);
            b.extend_from_slice(&[0u8; 3][..pad]);
        }
        self.notify.notify_one();
        true
    }

    /// Mark the connection gone; later pushes fail and the writer stops.
    pub fn close(&self) {
        self.closed
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.notify.notify_one();
    }

    /// Write queued bytes to `w` until the sink is closed or a write fails; gives the writer
    /// back after a clean close (an RFC 6062 data connection then takes the raw stream).
    pub async fn run_writer<W: tokio::io::AsyncWrite + Unpin>(&self, mut w: W) -> Option<W> {
        use tokio::io::AsyncWriteExt;
        let mut local: Vec<u8> = Vec::with_capacity(64 * 1024);
        loop {
            {
                let mut b = self.buf.lock().unwrap_or_else(|p| p.into_inner());
                std::mem::swap(&mut *b, &mut local);
            }
            if local.is_empty() {
                if self.closed.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                self.notify.notified().await;
                continue;
            }
            if w.write_all(&local).await.is_err() {
                self.close();
                return None;
            }
            local.clear();
        }
        Some(w)
    }
}

/// A bound relay socket and the task serving it; dropping it closes the socket.
pub struct UdpRelay {
    addr: SocketAddr,
    sock: Arc<UdpSocket>,
    view: Arc<ArcSwap<View>>,
    sink: Arc<arc_swap::ArcSwapOption<ClientSink>>,
    task: tokio::task::AbortHandle,
}

impl std::fmt::Debug for UdpRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpRelay")
            .field("addr", &self.addr)
            .finish()
    }
}

impl Drop for UdpRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Relay for UdpRelay {
    type Sink = ClientSink;
    fn local_addr(&self) -> SocketAddr {
        self.addr
    }
    fn attach(&self, sink: &ClientSink) {
        self.sink.store(Some(Arc::new(sink.clone())));
    }
    fn publish(&self, view: Arc<View>) {
        self.view.store(view);
    }
}

impl UdpRelay {
    /// Bind a relay socket on `addr` and start its peer-to-client task. Must run inside a
    /// tokio runtime.
    pub fn bind(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<UdpRelay> {
        use socket2::{Domain, Protocol, Socket, Type};
        let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
        if addr.is_ipv6() {
            s.set_only_v6(true)?;
        }
        let _ = s.set_recv_buffer_size(1 << 20);
        s.set_nonblocking(true)?;
        s.bind(&addr.into())?;
        let sock = Arc::new(UdpSocket::from_std(s.into())?);
        let local = sock.local_addr()?;
        let view = Arc::new(ArcSwap::from_pointee(View::default()));
        let sink = Arc::new(arc_swap::ArcSwapOption::<ClientSink>::empty());
        let span = tracing::debug_span!("relay", relay = %local);
        let task = tokio::spawn(
            peer_to_client(sock.clone(), sink.clone(), view.clone(), metrics).instrument(span),
        )
        .abort_handle();
        Ok(UdpRelay {
            addr: local,
            sock,
            view,
            sink,
            task,
        })
    }

    /// Send a client's payload to a peer; a full socket buffer drops the datagram.
    pub fn send_to_peer(&self, payload: &[u8], peer: SocketAddr) -> bool {
        self.sock.try_send_to(payload, peer).is_ok()
    }

    /// Send with the DF bit and never fragment locally (DONT-FRAGMENT, RFC 8656 §7.2).
    pub fn set_dont_fragment(&self) -> std::io::Result<()> {
        crate::net::dont_fragment::set(&*self.sock, self.addr.is_ipv6())
    }
}

async fn peer_to_client(
    sock: Arc<UdpSocket>,
    sink: Arc<arc_swap::ArcSwapOption<ClientSink>>,
    view: Arc<ArcSwap<View>>,
    metrics: Arc<Metrics>,
) {
    let no_perm = metrics.drops.with_label_values(&["no_permission"]);
    let over_cap = metrics.drops.with_label_values(&["bandwidth_cap"]);
    let send_full = metrics.drops.with_label_values(&["client_send_full"]);
    let oversized = metrics
        .drops
        .with_label_values(&["peer_datagram_oversized"]);
    let mut buf = vec![0u8; HEADROOM + MAX_PAYLOAD + 4];
    let mut out: Vec<u8> = Vec::with_capacity(2048);
    let mut bucket: Option<Bucket> = None;
    let mut tid_state: u64 = rand::random::<u64>() | 1;
    loop {
        if sock.readable().await.is_err() {
            return;
        }
        let now = Instant::now();
        let v = view.load();
        let s = sink.load();
        let (Some(client), Some(sink)) = (v.client, s.as_deref()) else {
            // Reserved (EVEN-PORT) socket: nothing may be relayed yet; discard.
            while sock.try_recv_from(&mut buf).is_ok() {}
            continue;
        };
        if v.max_bps > 0 && bucket.is_none() {
            bucket = Some(Bucket::new(v.max_bps, now));
        }
        let (mut pkts, mut bytes) = (0u64, 0u64);
        let (mut denied, mut capped, mut full, mut big) = (0u64, 0u64, 0u64, 0u64);
        let mut drained = false;
        for _ in 0..BATCH {
            let (n, peer) = match sock.try_recv_from(&mut buf[HEADROOM..HEADROOM + MAX_PAYLOAD]) {
                Ok(x) => x,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    drained = true;
                    break;
                }
                Err(_) => continue,
            };
            let route = v.route(peer, now);
            if route == PeerRoute::Denied {
                denied += 1;
                continue;
            }
            if let Some(b) = bucket.as_mut() {
                if !b.allow(now, n) {
                    capped += 1;
                    continue;
                }
            }
            let frame: &[u8] = match route {
                PeerRoute::Channel(ch) => {
                    buf[..HEADROOM].copy_from_slice(&channel_header(ch, n));
                    &buf[..HEADROOM + n]
                }
                PeerRoute::Denied | PeerRoute::Indication => {
                    out.clear();
                    tid_state ^= tid_state << 13;
                    tid_state ^= tid_state >> 7;
                    tid_state ^= tid_state << 17;
                    let mut tid = [0u8; 12];
                    tid[..8].copy_from_slice(&tid_state.to_le_bytes());
                    if data_indication(&mut out, &tid, peer, &buf[HEADROOM..HEADROOM + n]).is_err()
                    {
                        // Too large for a Data indication's 16-bit length: dropped whole.
                        big += 1;
                        continue;
                    }
                    &out
                }
            };
            let sent = sink.deliver(frame, client, v.local);
            if sent {
                pkts += 1;
                bytes += n as u64;
            } else {
                full += 1;
            }
        }
        if pkts > 0 {
            metrics.relay_packets_to_client.inc_by(pkts);
            metrics.relay_bytes_to_client.inc_by(bytes);
            metrics
                .relay_bytes_by_transport
                .to_client(v.transport)
                .inc_by(bytes);
            v.usage.to_client(pkts, bytes);
        }
        drop(v);
        drop(s);
        if denied > 0 {
            no_perm.inc_by(denied);
        }
        if capped > 0 {
            over_cap.inc_by(capped);
        }
        if full > 0 {
            send_full.inc_by(full);
        }
        if big > 0 {
            oversized.inc_by(big);
        }
        if !drained {
            tokio::task::yield_now().await;
        }
    }
}

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
    pub usage: Arc<crate::webhooks::Usage>,
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
    addr: SocketAddr,
    view: Arc<ArcSwap<View>>,
    sink: Arc<arc_swap::ArcSwapOption<ClientSink>>,
    task: tokio::task::AbortHandle,
    /// Dropped with the relay: parked and piped peer connections see the allocation end.
    alive: tokio::sync::watch::Sender<()>,
    buckets: Arc<std::sync::OnceLock<Option<PipeBuckets>>>,
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

/// Either kind of relay socket, as the allocation table holds it.
pub enum AnyRelay {
    /// UDP relay (RFC 8656).
    Udp(UdpRelay),
    /// TCP relay (RFC 6062).
    Tcp(TcpRelay),
}

impl AnyRelay {
    /// Open a relay of `kind` on `addr`.
    pub fn bind(
        addr: SocketAddr,
        kind: crate::turn::core::RelayKind,
        metrics: &Arc<Metrics>,
        conns: &Arc<Conns>,
    ) -> std::io::Result<AnyRelay> {
        match kind {
            crate::turn::core::RelayKind::Udp => {
                UdpRelay::bind(addr, metrics.clone()).map(AnyRelay::Udp)
            }
            crate::turn::core::RelayKind::Tcp => {
                TcpRelay::bind(addr, conns.clone(), metrics.clone()).map(AnyRelay::Tcp)
            }
        }
    }

    /// Client-to-peer datagram; TCP relays carry data on data connections, not here.
    pub fn send_to_peer(&self, payload: &[u8], peer: SocketAddr) -> bool {
        match self {
            AnyRelay::Udp(u) => u.send_to_peer(payload, peer),
            AnyRelay::Tcp(_) => false,
        }
    }
}

impl Relay for AnyRelay {
    type Sink = ClientSink;
    fn local_addr(&self) -> SocketAddr {
        match self {
            AnyRelay::Udp(u) => u.addr,
            AnyRelay::Tcp(t) => t.addr,
        }
    }
    fn attach(&self, sink: &ClientSink) {
        let s = Some(Arc::new(sink.clone()));
        match self {
            AnyRelay::Udp(u) => u.sink.store(s),
            AnyRelay::Tcp(t) => t.sink.store(s),
        }
    }
    fn publish(&self, view: Arc<View>) {
        match self {
            AnyRelay::Udp(u) => u.view.store(view),
            AnyRelay::Tcp(t) => t.view.store(view),
        }
    }
    fn set_dont_fragment(&self) -> std::io::Result<()> {
        match self {
            AnyRelay::Udp(u) => u.set_dont_fragment(),
            // Allocate refuses DONT-FRAGMENT with a TCP transport before binding.
            AnyRelay::Tcp(_) => Err(std::io::ErrorKind::Unsupported.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(any(target_os = "linux", target_os = "android"))]
    #[allow(unsafe_code)]
    #[tokio::test]
    async fn dont_fragment_sets_pmtudisc_do() {
        use nix::libc;
        use std::os::fd::AsRawFd;
        let m = Arc::new(Metrics::new());
        let r = UdpRelay::bind("127.0.0.1:0".parse().unwrap(), m).unwrap();
        let get = |sock: &UdpSocket| {
            let mut v: libc::c_int = -1;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: the socket is open while borrowed; `v` and `len` are live locals of
            // the sizes passed, which getsockopt writes.
            let rc = unsafe {
                libc::getsockopt(
                    sock.as_raw_fd(),
                    libc::IPPROTO_IP,
                    libc::IP_MTU_DISCOVER,
                    (&mut v as *mut libc::c_int).cast(),
                    &mut len,
                )
            };
            assert_eq!(rc, 0);
            v
        };
        assert_ne!(get(&r.sock), libc::IP_PMTUDISC_DO);
        r.set_dont_fragment().unwrap();
        assert_eq!(get(&r.sock), libc::IP_PMTUDISC_DO);
    }
}
