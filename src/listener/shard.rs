//! The UDP data plane of the STUN/TURN port: N shard threads, each with its own SO_REUSEPORT
//! socket on the port, its own allocation table and the relay sockets of the allocations it
//! created, all driven by one event loop with batched syscalls.
//!
//! Why this shape (quinn's endpoint → connection, see docs/performance.md):
//! - the kernel hashes each datagram's 4-tuple to one of the port's sockets, so a client's
//!   5-tuple always reaches the same shard while the socket set is fixed; the shard that got
//!   the Allocate owns the allocation, and nothing per packet is shared between cores;
//! - reads are `recvmmsg` batches (quinn-udp, with each datagram's destination address), and
//!   every turn's packets towards clients leave in one `sendmmsg`;
//! - a relay socket costs an entry in the shard's poll set, not a task and a wake-up per packet.
//!
//! The UDP relay sockets of TCP/TLS clients live here too ([`StreamHosts`]): the connection
//! task binds one and hands it to a shard (round-robin) through the shard's [`Inbox`]; the
//! shard reads it with the same receive batches and appends each batch's frames to the
//! connection's [`StreamSink`] under one lock and one wake-up of its writer (for plain TCP, a
//! batch that finds nothing queued is sent to the client's socket from here).
//!
//! Control (auth, Allocate/Refresh/CreatePermission/ChannelBind, timers) stays in the sans-IO
//! [`Table`]; it publishes each allocation's permissions and channels as an immutable [`View`]
//! that the peer-to-client path reads without a lock.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use mio::{Events, Interest, Poll, Token, Waker};

use super::Deps;
use super::{dispatch, forward_events, PeerCounts, PortCtx, SendToPeer};
use crate::metrics::Metrics;
use crate::stun::reflect::ReflectLimiter;
use crate::turn::core::{
    to_client, Bucket, DeleteReason, Dropped, Env, Frame, Outcome, Relay, RelayKind, Table, Tids,
    View, HEADROOM,
};
use crate::turn::offload::ChannelSync;
use crate::turn::relay::{ClientSink, StreamSink};
use crate::udp_batch::{PeerSendQueue, RecvBatch, SendQueue, UdpSocketState, RECV_BATCH};

/// Largest datagram read from any socket.
const MAX_DATAGRAM: usize = 65_536;
/// Slot size of the client-to-peer queue: media datagrams fit; a larger one is sent at once.
/// Small slots keep the queue in a few pages (128 KiB) instead of 64 KiB per datagram.
const PEER_SLOT: usize = 2048;
/// Smallest per-shard burst of the reflector limit: one answer of any size the port sends
/// unauthenticated always fits.
const MIN_REFLECT_BURST: u64 = 1500;
/// Receive batches read from one socket per turn before the others get their go.
const TURN_BUDGET: usize = 8;
const TOKEN_LISTEN: Token = Token(0);
const TOKEN_WAKER: Token = Token(1);
/// Relay sockets use tokens from here on: token = FIRST_RELAY + slab index.
const FIRST_RELAY: usize = 2;
/// A stream client's relay socket not (yet) in a shard's poll set.
const NO_TOKEN: usize = usize::MAX;

thread_local! {
    /// The running shard's client-to-peer datagrams of this turn, sent per relay socket (GSO)
    /// when the turn ends; `None` on threads that are not shards.
    static TO_PEERS: std::cell::RefCell<Option<PeerSendQueue<Arc<RelaySock>>>> =
        const { std::cell::RefCell::new(None) };
}

/// Relay sockets released by their allocation (possibly on another shard, for an EVEN-PORT
/// reservation redeemed elsewhere) and not yet closed by the shard polling them.
#[derive(Debug)]
struct Released {
    any: AtomicBool,
    tokens: Mutex<Vec<usize>>,
    /// The shard thread; a drop there needs no wake-up, it looks after every turn.
    owner: std::thread::ThreadId,
}

/// One relay socket: the state the data path reads on every peer datagram.
struct RelaySock {
    sock: mio::net::UdpSocket,
    addr: SocketAddr,
    view: ArcSwap<View>,
    /// A TCP/TLS client's connection buffer, once its allocation takes the socket; empty for
    /// UDP clients' relays, whose frames go out of the shard's own socket.
    sink: arc_swap::ArcSwapOption<StreamSink>,
    /// The poll token of a stream client's relay, set by the shard that adopted it.
    token: AtomicUsize,
}

/// A relay socket in the shard's poll set, with the state only the shard touches.
struct Slot {
    relay: Arc<RelaySock>,
    /// Bandwidth cap state, made on the first datagram when the view sets a cap; the shard
    /// owns it outright, so taking it needs no lock.
    bucket: Option<Bucket>,
    /// A TCP/TLS client's relay: frames go to its [`StreamSink`].
    stream: bool,
}

/// A stream client's relay socket handed to a shard, or handed back, in order.
enum Handoff {
    Add(Arc<RelaySock>),
    Remove(Arc<RelaySock>),
}

/// A shard's mailbox for the relay sockets of TCP/TLS clients, so they share the shard's
/// event loop and receive batches instead of costing a task each.
pub struct Inbox {
    any: AtomicBool,
    msgs: Mutex<Vec<Handoff>>,
    waker: Arc<Waker>,
}

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox").finish_non_exhaustive()
    }
}

impl Inbox {
    fn send(&self, m: Handoff) {
        self.msgs.lock().unwrap_or_else(|p| p.into_inner()).push(m);
        self.any.store(true, Ordering::Release);
        let _ = self.waker.wake();
    }
}

/// The running shards that host TCP/TLS clients' relay sockets, so the stream listeners can
/// place a relay without knowing the shards (empty when no UDP listener runs shards).
#[derive(Debug, Default)]
pub struct StreamHosts {
    shards: Mutex<Vec<Arc<Inbox>>>,
    next: AtomicUsize,
}

impl StreamHosts {
    /// Bind a relay socket on `addr` and hand it to the next shard, round-robin; `None` when
    /// no shard runs (the caller then serves the socket itself).
    pub fn bind(&self, addr: SocketAddr) -> Option<io::Result<HostedRelay>> {
        let inbox = {
            let v = self.shards.lock().unwrap_or_else(|p| p.into_inner());
            if v.is_empty() {
                return None;
            }
            v[self.next.fetch_add(1, Ordering::Relaxed) % v.len()].clone()
        };
        Some(HostedRelay::open(addr, inbox))
    }

    fn join(&self, inbox: Arc<Inbox>) {
        self.shards
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(inbox);
    }

    fn leave(&self, inbox: &Arc<Inbox>) {
        self.shards
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|i| !Arc::ptr_eq(i, inbox));
    }
}

/// A TCP/TLS client's UDP relay socket, served by a shard's event loop; dropping it hands the
/// socket back to that shard, which closes it.
pub struct HostedRelay {
    inner: Arc<RelaySock>,
    inbox: Arc<Inbox>,
}

impl std::fmt::Debug for HostedRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostedRelay")
            .field("addr", &self.inner.addr)
            .finish()
    }
}

impl HostedRelay {
    fn open(addr: SocketAddr, inbox: Arc<Inbox>) -> io::Result<HostedRelay> {
        let std_sock = crate::net::bind_relay(addr)?;
        // The shard's receive batch splits a GRO read, as for UDP clients' relays.
        crate::udp_batch::set_gro(&std_sock, true);
        let local = std_sock.local_addr()?;
        let inner = Arc::new(RelaySock {
            sock: mio::net::UdpSocket::from_std(std_sock),
            addr: local,
            view: ArcSwap::from_pointee(View::default()),
            sink: arc_swap::ArcSwapOption::empty(),
            token: AtomicUsize::new(NO_TOKEN),
        });
        inbox.send(Handoff::Add(inner.clone()));
        Ok(HostedRelay { inner, inbox })
    }

    /// Client-to-peer datagram, sent at once from the connection's task; a full socket
    /// buffer drops it, as UDP would.
    pub fn send_to_peer(&self, payload: &[u8], peer: SocketAddr) -> bool {
        self.inner.sock.send_to(payload, peer).is_ok()
    }
}

impl Drop for HostedRelay {
    fn drop(&mut self) {
        self.inbox.send(Handoff::Remove(self.inner.clone()));
    }
}

impl Relay for HostedRelay {
    type Sink = ClientSink;
    fn local_addr(&self) -> SocketAddr {
        self.inner.addr
    }
    fn attach(&self, sink: &ClientSink) {
        if let ClientSink::Stream(s) = sink {
            self.inner.sink.store(Some(s.clone()));
        }
    }
    fn publish(&self, view: Arc<View>) {
        self.inner.view.store(view);
    }
    fn set_dont_fragment(&self) -> io::Result<()> {
        crate::net::dont_fragment::set(&self.inner.sock, self.inner.addr.is_ipv6())
    }
}

/// A relay socket as the allocation table holds it. Dropping it hands the socket back to the
/// shard polling it, which closes it.
pub struct ShardRelay {
    inner: Arc<RelaySock>,
    /// Mirrors the published views into the kernel fast path, when it is on; dropped (every
    /// route taken back) with the allocation.
    sync: Option<ChannelSync>,
    token: usize,
    released: Arc<Released>,
    waker: Arc<Waker>,
}

impl std::fmt::Debug for ShardRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardRelay")
            .field("addr", &self.inner.addr)
            .finish()
    }
}

impl Drop for ShardRelay {
    fn drop(&mut self) {
        self.released
            .tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(self.token);
        self.released.any.store(true, Ordering::Release);
        // Another shard (EVEN-PORT redemption) may own the poll; make it look now.
        if std::thread::current().id() != self.released.owner {
            let _ = self.waker.wake();
        }
    }
}

impl Relay for ShardRelay {
    type Sink = ();
    fn local_addr(&self) -> SocketAddr {
        self.inner.addr
    }
    fn attach(&self, _: &()) {}
    fn publish(&self, view: Arc<View>) {
        if let Some(sync) = &self.sync {
            // Expiries in the view are judged against the clock now; the table republishes
            // when a permission or channel runs out, which takes its route back.
            sync.publish(&view, Instant::now());
        }
        self.inner.view.store(view);
    }
    fn retire(&self) {
        if let Some(sync) = &self.sync {
            sync.clear();
        }
    }
    fn set_dont_fragment(&self) -> io::Result<()> {
        crate::net::dont_fragment::set(&self.inner.sock, self.inner.addr.is_ipv6())
    }
}

impl std::os::fd::AsFd for RelaySock {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

impl SendToPeer for ShardRelay {
    /// Client-to-peer datagram, queued for the end of the shard's turn; a full socket buffer
    /// drops it, as UDP would.
    fn send_to_peer(&self, payload: &[u8], peer: SocketAddr) -> bool {
        let queued = TO_PEERS.with(|q| match q.try_borrow_mut() {
            Ok(mut q) => q
                .as_mut()
                .is_some_and(|q| q.push(&self.inner, payload, peer)),
            Err(_) => false,
        });
        queued || self.inner.sock.send_to(payload, peer).is_ok()
    }
}

/// How many shards to run: the configured number, or one per core.
pub fn shard_count(configured: usize) -> usize {
    if configured > 0 {
        configured
    } else {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    }
}

/// Open `n - 1` more SO_REUSEPORT sockets on the address of `first`.
pub fn siblings(first: &std::net::UdpSocket, n: usize) -> io::Result<Vec<std::net::UdpSocket>> {
    let addr = first.local_addr()?;
    let mut v = Vec::with_capacity(n.saturating_sub(1));
    for _ in 1..n {
        v.push(crate::net::bind_std(addr)?);
    }
    Ok(v)
}

/// Serve STUN and TURN on `socks` (one per shard, all bound to the same address with
/// SO_REUSEPORT) until shutdown; returns when every shard thread has ended.
pub async fn serve(deps: Arc<Deps>, socks: Vec<std::net::UdpSocket>) {
    let stop = Arc::new(AtomicBool::new(false));
    // Bumped when credentials are revoked; each shard sweeps its table when it sees a change.
    let revoked_gen = Arc::new(AtomicU64::new(0));
    let mut wakers = Vec::new();
    let mut threads = Vec::new();
    let shards = socks.len();
    for (i, sock) in socks.into_iter().enumerate() {
        let poll = match Poll::new() {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "cannot create a poll for a TURN shard");
                continue;
            }
        };
        let waker = match Waker::new(poll.registry(), TOKEN_WAKER) {
            Ok(w) => Arc::new(w),
            Err(e) => {
                tracing::error!(error = %e, "cannot create a waker for a TURN shard");
                continue;
            }
        };
        wakers.push(waker.clone());
        let inbox = Arc::new(Inbox {
            any: AtomicBool::new(false),
            msgs: Mutex::new(Vec::new()),
            waker: waker.clone(),
        });
        let (sh, st, rg) = (deps.clone(), stop.clone(), revoked_gen.clone());
        let t = std::thread::Builder::new()
            .name(format!("turn-shard-{i}"))
            .spawn(move || {
                let hosts = sh.turn.stream_hosts.clone();
                let r = Shard::new(sh, sock, poll, waker, inbox.clone(), shards).and_then(|s| {
                    if s.table.is_some() {
                        hosts.join(inbox.clone());
                    }
                    s.run(&st, &rg)
                });
                hosts.leave(&inbox);
                if let Err(e) = r {
                    tracing::error!(shard = i, error = %e, "TURN shard stopped");
                }
            });
        match t {
            Ok(t) => threads.push(t),
            Err(e) => tracing::error!(error = %e, "cannot start a TURN shard thread"),
        }
    }
    let mut revoked = deps.auth.revocations();
    let mut shutdown = std::pin::pin!(crate::lifecycle::shutdown_signal(
        deps.lifecycle.subscribe()
    ));
    loop {
        tokio::select! {
            Ok(()) = revoked.changed() => {
                revoked_gen.fetch_add(1, Ordering::AcqRel);
                for w in &wakers {
                    let _ = w.wake();
                }
            }
            _ = &mut shutdown => break,
        }
    }
    stop.store(true, Ordering::Release);
    for w in &wakers {
        let _ = w.wake();
    }
    let _ = tokio::task::spawn_blocking(move || {
        for t in threads {
            let _ = t.join();
        }
    })
    .await;
}

/// Per-turn counters, flushed to the registry once per turn instead of once per packet.
#[derive(Default)]
struct Counts {
    to_client: u64,
    to_client_bytes: u64,
    no_perm: u64,
    capped: u64,
    send_full: u64,
    /// Unauthenticated answers dropped by the reflector limit.
    reflect: u64,
    oversized: u64,
}

impl Counts {
    /// Count a peer datagram the peer→client decision dropped.
    fn dropped(&mut self, why: Dropped) {
        match why {
            Dropped::Reserved => {}
            Dropped::NoPermission => self.no_perm += 1,
            Dropped::BandwidthCap => self.capped += 1,
            Dropped::Oversized => self.oversized += 1,
        }
    }
}

struct Shard {
    deps: Arc<Deps>,
    metrics: Arc<Metrics>,
    sock: mio::net::UdpSocket,
    local: SocketAddr,
    wildcard: bool,
    state: UdpSocketState,
    poll: Poll,
    waker: Arc<Waker>,
    table: Option<Table<ShardRelay>>,
    relays: Vec<Option<Slot>>,
    free: Vec<usize>,
    released: Arc<Released>,
    /// TCP/TLS clients' relay sockets handed to this shard.
    inbox: Arc<Inbox>,
    tx: SendQueue,
    out: Vec<u8>,
    counts: Counts,
    peer_counts: PeerCounts,
    tids: Tids,
    /// This shard's share of the per-source budget for unauthenticated answers.
    reflect: ReflectLimiter,
}

impl Shard {
    fn new(
        deps: Arc<Deps>,
        sock: std::net::UdpSocket,
        poll: Poll,
        waker: Arc<Waker>,
        inbox: Arc<Inbox>,
        shards: usize,
    ) -> io::Result<Shard> {
        let state = UdpSocketState::new((&sock).into())?;
        let local = sock.local_addr()?;
        crate::udp_batch::allow_fragmentation(&sock, local.is_ipv6());
        let mut sock = mio::net::UdpSocket::from_std(sock);
        poll.registry()
            .register(&mut sock, TOKEN_LISTEN, Interest::READABLE)?;
        let metrics = deps.metrics.clone();
        let table = deps.config.relay.then(|| {
            Table::new(
                deps.turn.settings.clone(),
                deps.auth.clone(),
                metrics.clone(),
                deps.turn.pool.clone(),
                "udp",
                (),
            )
        });
        Ok(Shard {
            metrics,
            local,
            wildcard: local.ip().is_unspecified(),
            sock,
            state,
            poll,
            waker,
            table,
            relays: Vec::new(),
            free: Vec::new(),
            released: Arc::new(Released {
                any: AtomicBool::new(false),
                tokens: Mutex::new(Vec::new()),
                owner: std::thread::current().id(),
            }),
            inbox,
            tx: SendQueue::new(MAX_DATAGRAM + HEADROOM),
            out: Vec::with_capacity(1500),
            counts: Counts::default(),
            peer_counts: PeerCounts::default(),
            tids: Tids::new(rand::random()),
            reflect: ReflectLimiter::for_shard(
                deps.config.unauthenticated_bytes_per_second,
                deps.config.unauthenticated_burst_bytes,
                shards,
                MIN_REFLECT_BURST,
            ),
            deps,
        })
    }

    fn run(mut self, stop: &AtomicBool, revoked_gen: &AtomicU64) -> io::Result<()> {
        let mut revoked_seen = revoked_gen.load(Ordering::Acquire);
        let mut events = Events::with_capacity(1024);
        // Sockets that still had data when their budget ran out: served again next turn.
        let mut pending: Vec<Token> = Vec::new();
        let mut ready: Vec<Token> = Vec::with_capacity(1024);
        let mut rx = RecvBatch::new(MAX_DATAGRAM);
        TO_PEERS.with(|q| *q.borrow_mut() = Some(PeerSendQueue::new(PEER_SLOT)));
        while !stop.load(Ordering::Acquire) {
            let timeout = if !pending.is_empty() {
                Some(Duration::ZERO)
            } else {
                self.table
                    .as_ref()
                    .and_then(|t| t.next_deadline())
                    .map(|d| d.saturating_duration_since(Instant::now()))
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            // Before the events: a socket handed over is in the slab before its first
            // readiness is looked at, and a released one is gone.
            self.adopt();
            ready.clear();
            ready.append(&mut pending);
            ready.extend(events.iter().map(|e| e.token()));
            let now = Instant::now();
            for &t in &ready {
                let more = match t {
                    TOKEN_LISTEN => self.serve_listener(&mut rx, now),
                    TOKEN_WAKER => false,
                    Token(n) => self.serve_relay(&mut rx, n - FIRST_RELAY, now),
                };
                if more && !pending.contains(&t) {
                    pending.push(t);
                }
            }
            self.flush();
            if let Some(t) = self.table.as_mut() {
                if t.next_deadline().is_some_and(|d| d <= now) {
                    let env = Env {
                        now,
                        unix: crate::auth::unix_now(),
                        draining: self.deps.lifecycle.is_draining(),
                        local: None,
                    };
                    t.handle_timeout(env);
                    forward_events(t, &self.deps.webhooks);
                }
            }
            let gen = revoked_gen.load(Ordering::Acquire);
            if gen != revoked_seen {
                revoked_seen = gen;
                if let Some(t) = self.table.as_mut() {
                    t.sweep_revoked();
                    forward_events(t, &self.deps.webhooks);
                }
            }
            self.close_released();
            self.count();
        }
        TO_PEERS.with(|q| q.borrow_mut().take());
        self.adopt();
        if let Some(mut t) = self.table.take() {
            t.clear(DeleteReason::Shutdown);
            forward_events(&mut t, &self.deps.webhooks);
        }
        self.close_released();
        Ok(())
    }

    fn flush(&mut self) {
        let f = self.tx.flush(&self.sock);
        self.counts.send_full += f.dropped as u64;
        let f = TO_PEERS.with(|q| q.borrow_mut().as_mut().map(PeerSendQueue::flush));
        // Counted as a failed direct send was.
        self.peer_counts.no_route += f.map_or(0, |f| f.dropped as u64);
    }

    /// Queue a datagram towards a client, flushing first if the batch is full.
    fn queue(&mut self, bytes: &[u8], to: SocketAddr, from: Option<IpAddr>) -> bool {
        if self.tx.is_full() {
            self.flush();
        }
        self.tx.push(bytes, to, from)
    }

    /// Read the shared STUN/TURN socket; true when its budget ran out with data left.
    fn serve_listener(&mut self, rx: &mut RecvBatch, now: Instant) -> bool {
        for _ in 0..TURN_BUDGET {
            let n = match rx.recv(&self.state, &self.sock) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) => {
                    // ICMP errors surface here; the socket is still fine.
                    tracing::debug!(error = %e, "udp recv error");
                    continue;
                }
            };
            for (pkt, src, dst) in rx.iter() {
                self.handle_datagram(now, pkt, src, dst);
            }
            if n < RECV_BATCH {
                return false;
            }
        }
        true
    }

    /// One datagram from a client; `dst` is the local address it reached (IP_PKTINFO).
    fn handle_datagram(&mut self, now: Instant, pkt: &[u8], src: SocketAddr, dst: Option<IpAddr>) {
        // On a wildcard listener, answer from the address the client used; relays bind it.
        let from = if self.wildcard { dst } else { None };
        let to = dst.unwrap_or(self.local.ip());
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        let local = Some(match from {
            Some(ip) => SocketAddr::new(ip, self.local.port()),
            None => self.local,
        });
        let shared_local = self.local;
        let Shard {
            deps,
            metrics,
            table,
            poll,
            relays,
            free,
            released,
            waker,
            peer_counts,
            ..
        } = self;
        let ctx = PortCtx {
            metrics,
            software: &deps.config.software,
            mapped_address: deps.config.mapped_address,
            local,
        };
        let env = || Env {
            now,
            unix: crate::auth::unix_now(),
            draining: deps.lifecycle.is_draining(),
            local: Some(to),
        };
        let mut bind = |addr: SocketAddr, kind: RelayKind| -> io::Result<ShardRelay> {
            if kind != RelayKind::Udp {
                return Err(io::Error::from(io::ErrorKind::Unsupported));
            }
            let mut r = open_relay(addr, poll, relays, free, released, waker)?;
            // One sync per UDP allocation's relay: its bound channels go to the kernel.
            r.sync = deps.offload.as_ref().map(|o| {
                ChannelSync::new(o.clone(), Some(metrics.clone()), r.inner.addr, shared_local)
            });
            Ok(r)
        };
        let mut outcome = dispatch(
            &ctx,
            table.as_mut(),
            env,
            now,
            src,
            pkt,
            &mut out,
            peer_counts,
        );
        if let Some(t) = table.as_mut() {
            // The table asks for relay sockets; the shard opens them and answers.
            while let Some(Outcome::Bind(b)) = outcome {
                let r = bind(b.addr, b.kind);
                outcome = Some(t.bound(env(), b.id, r, &mut out));
            }
            forward_events(t, &deps.webhooks);
        }
        // The reflector limit: an answer a stranger can provoke without credentials, from
        // any source address he claims, is sent only within that source's budget.
        if !out.is_empty()
            && crate::stun::reflect::is_unauthenticated(&out)
            && !self.reflect.allow(now, src.ip(), out.len())
        {
            self.counts.reflect += 1;
        } else if !out.is_empty() {
            self.queue(&out, src, from);
        }
        self.out = out;
    }

    /// Read one relay socket and queue what its permissions allow towards the client; true
    /// when its budget ran out with data left.
    fn serve_relay(&mut self, rx: &mut RecvBatch, slot: usize, now: Instant) -> bool {
        let Shard {
            metrics,
            relays,
            state,
            tx,
            sock,
            out,
            counts,
            tids,
            wildcard,
            ..
        } = self;
        let Some(Some(Slot {
            relay,
            bucket,
            stream,
        })) = relays.get_mut(slot)
        else {
            return false;
        };
        if *stream {
            return serve_stream_relay(metrics, rx, state, relay, bucket, counts, tids, out, now);
        }
        let view = relay.view.load();
        // On a wildcard listener, peer data leaves from the address the client sends to.
        let from = if *wildcard { view.local } else { None };
        for _ in 0..TURN_BUDGET {
            let n = match rx.recv(state, &relay.sock) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(_) => continue,
            };
            let (p0, b0) = (counts.to_client, counts.to_client_bytes);
            for (data, peer, _) in rx.iter() {
                let d = match to_client(&view, bucket, now, peer, data, tids, out) {
                    Ok(d) => d,
                    Err(why) => {
                        counts.dropped(why);
                        continue;
                    }
                };
                if tx.is_full() {
                    counts.send_full += tx.flush(sock).dropped as u64;
                }
                let n = data.len();
                let ok = match d.frame {
                    Frame::Channel(header) => match tx.slot_mut() {
                        Some(s) if s.len() >= HEADROOM + n => {
                            s[..HEADROOM].copy_from_slice(&header);
                            s[HEADROOM..HEADROOM + n].copy_from_slice(data);
                            tx.commit(HEADROOM + n, d.client, from);
                            true
                        }
                        _ => false,
                    },
                    Frame::Indication => tx.push(out, d.client, from),
                };
                if ok {
                    counts.to_client += 1;
                    counts.to_client_bytes += n as u64;
                } else {
                    counts.send_full += 1;
                }
            }
            let (p, b) = (counts.to_client - p0, counts.to_client_bytes - b0);
            if p > 0 {
                view.usage.to_client(p, b);
            }
            if n < RECV_BATCH {
                return false;
            }
        }
        true
    }

    /// Take in the stream clients' relay sockets handed to this shard, and close those
    /// handed back.
    fn adopt(&mut self) {
        if !self.inbox.any.swap(false, Ordering::AcqRel) {
            return;
        }
        let msgs = std::mem::take(&mut *self.inbox.msgs.lock().unwrap_or_else(|p| p.into_inner()));
        for m in msgs {
            match m {
                Handoff::Add(relay) => {
                    let slot = self.free.pop().unwrap_or_else(|| {
                        self.relays.push(None);
                        self.relays.len() - 1
                    });
                    let token = slot + FIRST_RELAY;
                    let fd = std::os::fd::AsRawFd::as_raw_fd(&relay.sock);
                    if let Err(e) = self.poll.registry().register(
                        &mut mio::unix::SourceFd(&fd),
                        Token(token),
                        Interest::READABLE,
                    ) {
                        // The allocation keeps a socket that relays nothing to its client.
                        tracing::warn!(error = %e, relay = %relay.addr, "cannot poll a stream client's relay socket");
                        self.free.push(slot);
                        continue;
                    }
                    relay.token.store(token, Ordering::Relaxed);
                    self.relays[slot] = Some(Slot {
                        relay,
                        bucket: None,
                        stream: true,
                    });
                }
                Handoff::Remove(relay) => {
                    let token = relay.token.load(Ordering::Relaxed);
                    let Some(slot) = token.checked_sub(FIRST_RELAY) else {
                        continue;
                    };
                    let ours = self
                        .relays
                        .get(slot)
                        .and_then(Option::as_ref)
                        .is_some_and(|s| Arc::ptr_eq(&s.relay, &relay));
                    if ours {
                        let fd = std::os::fd::AsRawFd::as_raw_fd(&relay.sock);
                        let _ = self
                            .poll
                            .registry()
                            .deregister(&mut mio::unix::SourceFd(&fd));
                        self.relays[slot] = None;
                        self.free.push(slot);
                    }
                }
            }
        }
    }

    /// Close relay sockets whose allocation is gone.
    fn close_released(&mut self) {
        if !self.released.any.swap(false, Ordering::AcqRel) {
            return;
        }
        let gone: Vec<usize> = std::mem::take(
            &mut *self
                .released
                .tokens
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        for t in gone {
            let slot = t - FIRST_RELAY;
            if let Some(r) = self.relays.get_mut(slot).and_then(Option::take) {
                if let Ok(mut r) = Arc::try_unwrap(r.relay) {
                    let _ = self.poll.registry().deregister(&mut r.sock);
                }
                self.free.push(slot);
            }
        }
    }

    fn count(&mut self) {
        let c = std::mem::take(&mut self.counts);
        let m = &self.metrics;
        self.peer_counts.flush(m, "udp");
        if c.to_client > 0 {
            m.relay_packets_to_client.inc_by(c.to_client);
            m.relay_bytes_to_client.inc_by(c.to_client_bytes);
            m.relay_bytes_by_transport
                .to_client("udp")
                .inc_by(c.to_client_bytes);
        }
        for (label, n) in [
            ("no_permission", c.no_perm),
            ("bandwidth_cap", c.capped),
            ("client_send_full", c.send_full),
            ("peer_datagram_oversized", c.oversized),
            ("unauthenticated_rate", c.reflect),
        ] {
            if n > 0 {
                m.drops.with_label_values(&[label]).inc_by(n);
            }
        }
    }
}

/// Bind a relay socket on `addr` and add it to this shard's poll set.
fn open_relay(
    addr: SocketAddr,
    poll: &Poll,
    relays: &mut Vec<Option<Slot>>,
    free: &mut Vec<usize>,
    released: &Arc<Released>,
    waker: &Arc<Waker>,
) -> io::Result<ShardRelay> {
    let std_sock = crate::net::bind_relay(addr)?;
    // A peer's burst (a video frame) is read in one go and split by the receive batch. Only
    // here: the stream relays' read buffers would truncate a GRO read.
    crate::udp_batch::set_gro(&std_sock, true);
    let local = std_sock.local_addr()?;
    let mut sock = mio::net::UdpSocket::from_std(std_sock);
    let slot = free.pop().unwrap_or_else(|| {
        relays.push(None);
        relays.len() - 1
    });
    let token = slot + FIRST_RELAY;
    if let Err(e) = poll
        .registry()
        .register(&mut sock, Token(token), Interest::READABLE)
    {
        free.push(slot);
        return Err(e);
    }
    let inner = Arc::new(RelaySock {
        sock,
        addr: local,
        view: ArcSwap::from_pointee(View::default()),
        sink: arc_swap::ArcSwapOption::empty(),
        token: AtomicUsize::new(token),
    });
    relays[slot] = Some(Slot {
        relay: inner.clone(),
        bucket: None,
        stream: false,
    });
    Ok(ShardRelay {
        inner,
        sync: None,
        token,
        released: released.clone(),
        waker: waker.clone(),
    })
}

/// Read a TCP/TLS client's relay socket and append what its permissions allow to the
/// client's connection buffer: one lock and one writer wake-up per receive batch; true when
/// its budget ran out with data left.
#[allow(clippy::too_many_arguments)]
fn serve_stream_relay(
    metrics: &Metrics,
    rx: &mut RecvBatch,
    state: &UdpSocketState,
    relay: &RelaySock,
    bucket: &mut Option<Bucket>,
    counts: &mut Counts,
    tids: &mut Tids,
    out: &mut Vec<u8>,
    now: Instant,
) -> bool {
    let view = relay.view.load();
    let sink = relay.sink.load();
    let (mut pkts, mut bytes) = (0u64, 0u64);
    let mut more = true;
    for _ in 0..TURN_BUDGET {
        let n = match rx.recv(state, &relay.sock) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                more = false;
                break;
            }
            Err(_) => continue,
        };
        // No allocation owns the socket yet, or its connection is gone: nothing may be
        // relayed; the batch is discarded.
        let mut batch = sink.as_deref().and_then(StreamSink::batch);
        for (data, peer, _) in rx.iter() {
            let Some(b) = batch.as_mut() else {
                break;
            };
            let d = match to_client(&view, bucket, now, peer, data, tids, out) {
                Ok(d) => d,
                Err(why) => {
                    counts.dropped(why);
                    continue;
                }
            };
            let ok = match d.frame {
                Frame::Channel(header) => b.push(&header, data),
                Frame::Indication => b.push(&[], out),
            };
            if ok {
                pkts += 1;
                bytes += data.len() as u64;
            } else {
                counts.send_full += 1;
            }
        }
        drop(batch);
        if n < RECV_BATCH {
            more = false;
            break;
        }
    }
    if pkts > 0 {
        // Counted per call with the client's transport; the shard's per-turn counts are the
        // UDP clients'.
        metrics.relay_packets_to_client.inc_by(pkts);
        metrics.relay_bytes_to_client.inc_by(bytes);
        metrics
            .relay_bytes_by_transport
            .to_client(view.transport)
            .inc_by(bytes);
        view.usage.to_client(pkts, bytes);
    }
    more
}
