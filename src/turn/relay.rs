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
use crate::turn::core::{Bucket, Relay, View};

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
                crate::listener::udp::pktinfo::try_send(s, frame, client, local).is_ok()
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
        let (mut denied, mut capped, mut full) = (0u64, 0u64, 0u64);
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
            if !v.permits(peer.ip(), now) {
                denied += 1;
                continue;
            }
            if let Some(b) = bucket.as_mut() {
                if !b.allow(now, n) {
                    capped += 1;
                    continue;
                }
            }
            let frame: &[u8] = match v.channel_for(peer, now) {
                Some(ch) => {
                    buf[0..2].copy_from_slice(&ch.to_be_bytes());
                    buf[2..4].copy_from_slice(&(n as u16).to_be_bytes());
                    &buf[..HEADROOM + n]
                }
                None => {
                    out.clear();
                    tid_state ^= tid_state << 13;
                    tid_state ^= tid_state >> 7;
                    tid_state ^= tid_state << 17;
                    let mut tid = [0u8; 12];
                    tid[..8].copy_from_slice(&tid_state.to_le_bytes());
                    let mut e = Encoder::new(&mut out, method::DATA, Class::Indication, &tid);
                    e.xor_address(attr::XOR_PEER_ADDRESS, peer);
                    e.attr(attr::DATA, &buf[HEADROOM..HEADROOM + n]);
                    e.finish();
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
        drop(v);
        drop(s);
        if pkts > 0 {
            metrics.relay_packets_to_client.inc_by(pkts);
            metrics.relay_bytes_to_client.inc_by(bytes);
        }
        if denied > 0 {
            no_perm.inc_by(denied);
        }
        if capped > 0 {
            over_cap.inc_by(capped);
        }
        if full > 0 {
            send_full.inc_by(full);
        }
        if !drained {
            tokio::task::yield_now().await;
        }
    }
}

/// Peer TCP connections waiting for the client's ConnectionBind (RFC 6062), by connection id.
/// Shared by every listener because the client binds on a new connection. Control path only.
#[derive(Debug, Default)]
pub struct Conns {
    map: std::sync::Mutex<std::collections::HashMap<u32, (tokio::net::TcpStream, Instant)>>,
}

/// How long a peer connection waits for its ConnectionBind (RFC 6062 §5.3: 30 seconds).
const CONNECTION_BIND_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

impl Conns {
    /// Park a peer connection and return its new CONNECTION-ID; stale entries are dropped.
    pub fn insert(&self, s: tokio::net::TcpStream) -> u32 {
        let now = Instant::now();
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|_, (_, t)| now.duration_since(*t) < CONNECTION_BIND_WAIT);
        loop {
            let id: u32 = rand::random();
            if id != 0 && !m.contains_key(&id) {
                m.insert(id, (s, now));
                return id;
            }
        }
    }
    /// Take the peer connection for `id`, if it is still waiting.
    pub fn take(&self, id: u32) -> Option<tokio::net::TcpStream> {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        m.remove(&id)
            .filter(|(_, t)| t.elapsed() < CONNECTION_BIND_WAIT)
            .map(|(s, _)| s)
    }
}

/// An RFC 6062 TCP relay: a listening socket whose accepted peer connections are announced to
/// the client with ConnectionAttempt. Dropping it stops listening.
pub struct TcpRelay {
    addr: SocketAddr,
    view: Arc<ArcSwap<View>>,
    sink: Arc<arc_swap::ArcSwapOption<ClientSink>>,
    task: tokio::task::AbortHandle,
}

impl Drop for TcpRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TcpRelay {
    /// Listen on `addr` and announce permitted incoming peers. Must run inside tokio.
    pub fn bind(addr: SocketAddr, conns: Arc<Conns>) -> std::io::Result<TcpRelay> {
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
                    let id = conns.insert(stream);
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
                TcpRelay::bind(addr, conns.clone()).map(AnyRelay::Tcp)
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
}
