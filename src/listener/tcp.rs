//! The TCP shell of the STUN/TURN port: stream framing (RFC 8489 §6.2.2 / RFC 8656 §12.5),
//! one task per connection, idle timeouts so slow or silent clients cannot pile up.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::Deps;
use super::{dispatch_stun, forward_events, relay_channel_data, PeerCounts, PortCtx, SendToPeer};
use crate::lifecycle::shutdown_signal;
use crate::stun::codec::{method, Class, Encoder};
use crate::stun::Message;
use crate::turn::core::Outcome;
use crate::turn::core::{DeleteReason, Env, Table};
use crate::turn::relay::{AnyRelay, ClientSink, StreamSink};

/// A TCP/TLS client's relay: a UDP relay socket on a shard's event loop (or, when no UDP
/// shard runs, one with its own task), or an RFC 6062 TCP relay.
pub enum StreamRelay {
    /// A UDP relay socket served by a shard.
    Hosted(super::shard::HostedRelay),
    /// A relay this connection's side serves: RFC 6062, or UDP without shards.
    Own(AnyRelay),
}

impl StreamRelay {
    /// Open a relay of `kind` on `addr`, on a shard when one runs.
    fn bind(
        addr: SocketAddr,
        kind: crate::turn::core::RelayKind,
        deps: &Deps,
    ) -> std::io::Result<StreamRelay> {
        if kind == crate::turn::core::RelayKind::Udp {
            if let Some(r) = deps.turn.stream_hosts.bind(addr) {
                return r.map(StreamRelay::Hosted);
            }
        }
        AnyRelay::bind(addr, kind, &deps.metrics, &deps.turn.conns).map(StreamRelay::Own)
    }
}

impl crate::turn::core::Relay for StreamRelay {
    type Sink = ClientSink;
    fn local_addr(&self) -> SocketAddr {
        match self {
            StreamRelay::Hosted(r) => r.local_addr(),
            StreamRelay::Own(r) => r.local_addr(),
        }
    }
    fn attach(&self, sink: &ClientSink) {
        match self {
            StreamRelay::Hosted(r) => r.attach(sink),
            StreamRelay::Own(r) => r.attach(sink),
        }
    }
    fn publish(&self, view: Arc<crate::turn::core::View>) {
        match self {
            StreamRelay::Hosted(r) => r.publish(view),
            StreamRelay::Own(r) => r.publish(view),
        }
    }
    fn set_dont_fragment(&self) -> std::io::Result<()> {
        match self {
            StreamRelay::Hosted(r) => r.set_dont_fragment(),
            StreamRelay::Own(r) => r.set_dont_fragment(),
        }
    }
}

impl SendToPeer for StreamRelay {
    fn send_to_peer(&self, payload: &[u8], peer: SocketAddr) -> bool {
        match self {
            StreamRelay::Hosted(r) => r.send_to_peer(payload, peer),
            StreamRelay::Own(r) => r.send_to_peer(payload, peer),
        }
    }
}

/// Bind a TCP listener with SO_REUSEADDR so restarts do not wait for TIME_WAIT.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.set_reuse_address(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    TcpListener::from_std(sock.into())
}

/// One frame on a STUN/TURN stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// A STUN message of this many bytes.
    Stun(usize),
    /// ChannelData: total bytes to consume (header, payload and padding to 4).
    ChannelData {
        /// Bytes to consume.
        consumed: usize,
        /// Header plus payload, without padding.
        len: usize,
    },
}

/// Why a stream cannot be framed; the connection is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The first byte is neither STUN nor ChannelData.
    #[error("stream does not carry STUN or ChannelData")]
    Garbage,
}

/// Find the next frame at the start of `buf`: `Ok(None)` means more bytes are needed.
pub fn next_frame(buf: &[u8]) -> Result<Option<Frame>, FrameError> {
    let Some(&b0) = buf.first() else {
        return Ok(None);
    };
    match b0 & 0xC0 {
        0x00 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            let len = 20 + u16::from_be_bytes([buf[2], buf[3]]) as usize;
            if buf.len() >= 8 && buf[4..8] != crate::stun::codec::MAGIC_COOKIE.to_be_bytes() {
                return Err(FrameError::Garbage);
            }
            Ok((buf.len() >= len).then_some(Frame::Stun(len)))
        }
        0x40 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            let len = 4 + u16::from_be_bytes([buf[2], buf[3]]) as usize;
            let consumed = (len + 3) & !3;
            Ok((buf.len() >= consumed).then_some(Frame::ChannelData { consumed, len }))
        }
        _ => Err(FrameError::Garbage),
    }
}

/// Admission control for TCP and TLS connections on the STUN/TURN ports: a global cap and a
/// per-IP cap, so idle strangers cannot hold unbounded sockets and tasks.
///
/// The global slot is taken *before* `accept` (the mini-redis shape): at the cap the server
/// stops accepting and the kernel's backlog absorbs the rest, instead of accepting and closing
/// in a tight loop. The per-IP check happens right after `accept`, since only then is the
/// address known; the per-IP table holds only addresses with a connection open, so its size
/// is bounded by the global cap.
#[derive(Debug)]
pub struct StreamLimits {
    global: Arc<Semaphore>,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    max_per_ip: usize,
}

/// A global slot taken before `accept`, not yet tied to an address.
#[derive(Debug)]
pub struct StreamSlot {
    _permit: OwnedSemaphorePermit,
}

/// One admitted stream connection; dropping it frees its global and per-IP places.
#[derive(Debug)]
pub struct StreamPermit {
    _slot: StreamSlot,
    key: IpAddr,
    limits: Arc<StreamLimits>,
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        let mut map = self.limits.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.key);
            }
        }
    }
}

impl StreamLimits {
    /// Allow `max` connections in all and `max_per_ip` from one address.
    pub fn new(max: usize, max_per_ip: usize) -> Arc<StreamLimits> {
        Arc::new(StreamLimits {
            global: Arc::new(Semaphore::new(max.clamp(1, Semaphore::MAX_PERMITS))),
            per_ip: Mutex::new(HashMap::new()),
            max_per_ip: max_per_ip.max(1),
        })
    }

    /// Take a global slot without waiting, if one is free.
    pub fn try_slot(&self) -> Option<StreamSlot> {
        self.global
            .clone()
            .try_acquire_owned()
            .ok()
            .map(|p| StreamSlot { _permit: p })
    }

    /// Wait for a global slot.
    pub async fn slot(&self) -> StreamSlot {
        match self.global.clone().acquire_owned().await {
            Ok(p) => StreamSlot { _permit: p },
            // The semaphore is never closed; wait forever rather than admit past the cap.
            Err(_) => std::future::pending().await,
        }
    }

    /// Tie a slot to a client address, or refuse when that address is at its cap.
    pub fn admit(self: &Arc<Self>, slot: StreamSlot, ip: IpAddr) -> Option<StreamPermit> {
        let key = crate::net::ip_key(ip);
        let mut map = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(key).or_insert(0);
        if *n >= self.max_per_ip {
            return None;
        }
        *n += 1;
        Some(StreamPermit {
            _slot: slot,
            key,
            limits: self.clone(),
        })
    }

    /// Connections open now (for tests and metrics).
    pub fn open(&self) -> usize {
        let map = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        map.values().sum()
    }
}

/// Take a global slot, counting the time the cap was hit; `None` on shutdown.
async fn take_slot(
    deps: &Deps,
    shutdown: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) -> Option<StreamSlot> {
    if let Some(s) = deps.streams.try_slot() {
        return Some(s);
    }
    deps.metrics
        .drops
        .with_label_values(&["stream_global_limit"])
        .inc();
    tokio::select! {
        s = deps.streams.slot() => Some(s),
        _ = shutdown.as_mut() => None,
    }
}

/// The next connection that fits under the global and per-IP caps (a global slot is taken
/// before `accept`, so at the cap the kernel's backlog holds the rest); `None` on shutdown.
pub(crate) async fn accept_admitted(
    deps: &Deps,
    listener: &TcpListener,
    shutdown: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) -> Option<(tokio::net::TcpStream, SocketAddr, StreamPermit)> {
    loop {
        let slot = take_slot(deps, shutdown).await?;
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "stream accept error");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.as_mut() => return None,
        };
        let Some(permit) = deps.streams.admit(slot, peer.ip()) else {
            deps.metrics
                .drops
                .with_label_values(&["stream_per_ip_limit"])
                .inc();
            // Dropping the stream closes it; the slot goes back with it.
            continue;
        };
        let _ = stream.set_nodelay(true);
        return Some((stream, peer, permit));
    }
}

/// Accept connections until shutdown.
pub async fn serve(deps: Arc<Deps>, listener: TcpListener) {
    let mut shutdown = std::pin::pin!(shutdown_signal(deps.lifecycle.subscribe()));
    while let Some((stream, peer, permit)) = accept_admitted(&deps, &listener, &mut shutdown).await
    {
        let local = stream.local_addr().ok();
        let deps = deps.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _open = OpenGuard::new(&deps.metrics, "tcp");
            let started = tokio::time::Instant::now();
            // Relayed peer frames may be sent to this socket from a shard (StreamSink).
            let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
            serve_stream_with(deps, stream, peer, local, "tcp", started, Some(fd)).await;
        });
    }
}

/// Keeps `turn_stream_connections_active{transport}` in step with live connection tasks.
pub(crate) struct OpenGuard(prometheus::IntGauge);

impl OpenGuard {
    pub(crate) fn new(m: &crate::metrics::Metrics, transport: &str) -> OpenGuard {
        let g = m.stream_connections_active.with_label_values(&[transport]);
        g.inc();
        OpenGuard(g)
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Largest first message read before the connection has sent one valid STUN message: an
/// Allocate with every attribute fits easily, and a stranger cannot make us buffer 64 KiB.
pub const FIRST_MESSAGE_MAX: usize = 4096;

/// Bytes to reserve before the next read: exactly what the pending frame still needs while
/// the connection is unproven (so an idle stranger costs a few bytes), generous once it has
/// spoken STUN.
fn read_reserve(buf: &[u8], proven: bool) -> usize {
    if proven {
        return 16 * 1024;
    }
    let need = match buf.len() {
        0..=3 => 20,
        _ => 20 + u16::from_be_bytes([buf[2], buf[3]]) as usize,
    };
    need.saturating_sub(buf.len()).clamp(1, FIRST_MESSAGE_MAX)
}

/// The parts of a stream connection that exist only once it has sent valid STUN: the
/// bounded writer and the allocation table. Strangers that never speak STUN never get them.
struct Session {
    sink: Arc<StreamSink>,
    writer: tokio::task::JoinHandle<Option<tokio::io::WriteHalf<Box<dyn Stream>>>>,
    table: Option<Table<StreamRelay>>,
}

impl Drop for Session {
    /// The sink is closed before the connection's socket can be, even when the task is
    /// dropped mid-way (runtime shutdown): a shard may otherwise send to its descriptor.
    fn drop(&mut self) {
        self.sink.close();
    }
}

/// A byte stream the STUN/TURN port can serve (TCP or TLS), boxed so sessions have one type.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Serve STUN and TURN over one framed stream (TCP or TLS) until it closes, idles out or errs.
///
/// The connection carries at most one allocation (its 5-tuple), which dies with it. Reads are
/// handled here; every write (responses and relayed peer data) goes through a bounded
/// [`StreamSink`] drained by a writer task, so a client that stops reading only loses its own
/// packets.
///
/// Deadlines: the first valid STUN message must arrive within
/// `turn.stream_first_message_timeout_secs` of the start; afterwards a connection without an
/// allocation must send a complete STUN message at least every `turn.tcp_idle_timeout_secs`.
/// Stray bytes never move a deadline, so trickling one byte at a time keeps nothing alive.
///
/// `started` is when the first-message deadline began: the accept for the dedicated ports; on
/// the shared port it has already spent part of it reading the bytes that told it this is STUN.
pub async fn serve_stream<S>(
    deps: Arc<Deps>,
    stream: S,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    transport: &'static str,
    started: tokio::time::Instant,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    serve_stream_with(deps, stream, peer, local, transport, started, None).await;
}

/// [`serve_stream`] where `direct` is the socket under a plain TCP `stream`: relayed peer
/// frames may be sent to it straight from the shard serving the relay (see [`StreamSink`]).
async fn serve_stream_with<S>(
    deps: Arc<Deps>,
    stream: S,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    transport: &'static str,
    started: tokio::time::Instant,
    direct: Option<std::os::fd::RawFd>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let boxed: Box<dyn Stream> = Box::new(stream);
    let (mut rd, wr) = tokio::io::split(boxed);
    let mut wr = Some(wr);
    // Boxed: the table is large, and an idle stranger's task should hold only a pointer.
    let mut session: Option<Box<Session>> = None;
    let idle = Duration::from_secs(deps.config.tcp_idle_timeout_secs.max(1));
    let first = Duration::from_secs(deps.config.stream_first_message_timeout_secs.max(1));
    let mut idle_at = started + first;
    let mut shutdown = std::pin::pin!(shutdown_signal(deps.lifecycle.subscribe()));
    let software = deps.config.software.clone();
    let m = deps.metrics.clone();
    let send_full = m.drops.with_label_values(&["client_send_full"]);
    let mut counts = PeerCounts::default();
    let mut revoked = deps.auth.revocations();
    // RFC 6062 Connect results come back from connect tasks; a successful ConnectionBind
    // turns this connection into a raw data pipe to `data_peer`.
    let (connect_tx, mut connect_rx) = tokio::sync::mpsc::channel::<Option<u32>>(4);
    let mut data_peer: Option<(tokio::net::TcpStream, crate::turn::relay::PipeOwner)> = None;
    let env = |deps: &Deps| Env {
        now: Instant::now(),
        unix: crate::auth::unix_now(),
        draining: deps.lifecycle.is_draining(),
        // The accepted socket's own address: what a wildcard listener's client reached.
        local: local.map(|a| a.ip()),
    };
    let far = || tokio::time::Instant::now() + Duration::from_secs(86_400);
    let mut timer = std::pin::pin!(tokio::time::sleep_until(far()));
    let mut idle_timer = std::pin::pin!(tokio::time::sleep_until(idle_at));
    let mut armed: Option<Instant> = None;
    // Buffers grow only as bytes arrive (see `read_reserve`).
    let mut buf: Vec<u8> = Vec::new();
    let mut out = Vec::new();
    'conn: loop {
        // Handle every complete frame already buffered.
        let mut off = 0;
        let now = Instant::now();
        loop {
            let frame = match next_frame(&buf[off..]) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    m.drops.with_label_values(&["stream_garbage"]).inc();
                    tracing::debug!(%peer, error = %e, "closing stream");
                    break 'conn;
                }
            };
            match frame {
                Frame::Stun(len) => {
                    let pkt = &buf[off..off + len];
                    off += len;
                    let msg = match Message::parse(pkt) {
                        Ok(msg) => msg,
                        Err(_) => {
                            m.stun_requests.with_label_values(&["malformed"]).inc();
                            continue;
                        }
                    };
                    idle_at = tokio::time::Instant::now() + idle;
                    let s = session.get_or_insert_with(|| {
                        let cap = deps.config.tcp_send_buffer_bytes;
                        let sink = Arc::new(match direct {
                            Some(fd) => StreamSink::with_socket(cap, fd),
                            None => StreamSink::new(cap),
                        });
                        let writer = {
                            let sink = sink.clone();
                            let wr = wr.take();
                            tokio::spawn(async move {
                                match wr {
                                    Some(wr) => sink.run_writer(wr).await,
                                    None => None,
                                }
                            })
                        };
                        let table = deps.config.relay.then(|| {
                            let mut t = Table::new(
                                deps.turn.settings.clone(),
                                deps.auth.clone(),
                                m.clone(),
                                deps.turn.pool.clone(),
                                transport,
                                ClientSink::Stream(sink.clone()),
                            );
                            t.set_stream();
                            t
                        });
                        Box::new(Session {
                            sink,
                            writer,
                            table,
                        })
                    });
                    let sink = &s.sink;
                    let table = &mut s.table;
                    out.clear();
                    let ctx = PortCtx {
                        metrics: &m,
                        software: &software,
                        mapped_address: deps.config.mapped_address,
                        local,
                    };
                    let mut outcome = dispatch_stun(
                        &ctx,
                        table.as_mut(),
                        || env(&deps),
                        now,
                        peer,
                        &msg,
                        &mut out,
                        &mut counts,
                    );
                    if let Some(t) = table.as_mut() {
                        // The table asks for relay sockets; this task opens them and answers.
                        while let Some(Outcome::Bind(b)) = outcome {
                            let r = StreamRelay::bind(b.addr, b.kind, &deps);
                            outcome = Some(t.bound(env(&deps), b.id, r, &mut out));
                        }
                        forward_events(t, &deps.webhooks);
                        match outcome {
                            Some(Outcome::Connect(to)) => {
                                let tx = connect_tx.clone();
                                let conns = deps.turn.conns.clone();
                                let owner = match t.relay(peer) {
                                    Some(StreamRelay::Own(AnyRelay::Tcp(r))) => r.owner(),
                                    _ => None,
                                };
                                let over_cap = m
                                    .drops
                                    .with_label_values(&["peer_connections_per_allocation"]);
                                tokio::spawn(async move {
                                    let c = tokio::time::timeout(
                                        Duration::from_secs(10),
                                        tokio::net::TcpStream::connect(to),
                                    )
                                    .await;
                                    let id = match (c, owner) {
                                        (Ok(Ok(s)), Some(o)) => {
                                            let id = conns.insert(s, o);
                                            if id.is_none() {
                                                over_cap.inc();
                                            }
                                            id
                                        }
                                        _ => None,
                                    };
                                    let _ = tx.send(id).await;
                                });
                            }
                            Some(Outcome::ConnectionBind(id)) => {
                                let user = t.bind_user().unwrap_or_default();
                                match deps.turn.conns.take(id, user) {
                                    Ok(claimed) => {
                                        data_peer = Some(claimed);
                                        if !sink.push(&out) {
                                            send_full.inc();
                                        }
                                        buf.drain(..off);
                                        break 'conn;
                                    }
                                    Err(e) => {
                                        // One guess per connection: answer, then close.
                                        tracing::debug!(%peer, error = %e, "ConnectionBind refused");
                                        out.clear();
                                        let tid = msg.transaction_id();
                                        let mut enc = Encoder::new(
                                            &mut out,
                                            method::CONNECTION_BIND,
                                            Class::Error,
                                            &tid,
                                        );
                                        enc.error_code(400, "Bad Request: unknown CONNECTION-ID");
                                        enc.finish();
                                        m.turn_errors.with_label_values(&["400"]).inc();
                                        m.drops
                                            .with_label_values(&["connection_bind_refused"])
                                            .inc();
                                        if !sink.push(&out) {
                                            send_full.inc();
                                        }
                                        break 'conn;
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                    if !out.is_empty() && !sink.push(&out) {
                        send_full.inc();
                    }
                }
                Frame::ChannelData { consumed, len } => {
                    let pkt = &buf[off..off + len];
                    off += consumed;
                    let table = session.as_mut().and_then(|s| s.table.as_mut());
                    relay_channel_data(table, now, peer, pkt, &mut counts);
                }
            }
        }
        buf.drain(..off);
        counts.flush(&m, transport);
        let table = session.as_mut().and_then(|s| s.table.as_mut());
        let want = table.as_ref().and_then(|t| t.next_deadline());
        if want != armed {
            armed = want;
            timer
                .as_mut()
                .reset(want.map(tokio::time::Instant::from_std).unwrap_or_else(far));
        }
        // Connections without an allocation idle out; an allocation keeps its connection.
        let has_alloc = table.as_ref().is_some_and(|t| !t.is_empty());
        if idle_timer.deadline() != idle_at {
            idle_timer.as_mut().reset(idle_at);
        }
        let proven = session.is_some();
        if !proven && buf.len() >= FIRST_MESSAGE_MAX {
            m.drops.with_label_values(&["stream_garbage"]).inc();
            break;
        }
        buf.reserve(read_reserve(&buf, proven));
        tokio::select! {
            r = rd.read_buf(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            },
            _ = &mut idle_timer, if !has_alloc => {
                let reason = if proven { "stream_idle" } else { "stream_first_message_timeout" };
                m.drops.with_label_values(&[reason]).inc();
                break;
            }
            Some(id) = connect_rx.recv() => {
                if let Some(s) = session.as_mut() {
                    if let Some(t) = s.table.as_mut() {
                        out.clear();
                        t.connect_done(peer, id, &mut out);
                        if !out.is_empty() && !s.sink.push(&out) {
                            send_full.inc();
                        }
                    }
                }
                continue;
            }
            _ = &mut timer, if armed.is_some() => {
                if let Some(t) = session.as_mut().and_then(|s| s.table.as_mut()) {
                    t.handle_timeout(env(&deps));
                    forward_events(t, &deps.webhooks);
                }
                armed = None;
                continue;
            }
            Ok(()) = revoked.changed() => {
                if let Some(t) = session.as_mut().and_then(|s| s.table.as_mut()) {
                    let swept = t.sweep_revoked();
                    forward_events(t, &deps.webhooks);
                    if swept > 0 {
                        // The connection carried the revoked allocation: close it too.
                        break;
                    }
                }
                continue;
            }
            _ = &mut shutdown => break,
        };
        if buf.len() > 2 * 65_536 + 8 {
            // More than two maximal frames unparsed: framing is broken.
            break;
        }
    }
    let wr = match session {
        Some(mut s) => {
            if let Some(mut t) = s.table.take() {
                t.clear(DeleteReason::Closed);
                forward_events(&mut t, &deps.webhooks);
            }
            s.sink.close();
            match (&mut s.writer).await.ok().flatten() {
                Some(wr) => wr,
                None => return,
            }
        }
        None => match wr {
            Some(wr) => wr,
            None => return,
        },
    };
    if let Some((mut to_peer, owner)) = data_peer {
        // RFC 6062 data connection: bytes after ConnectionBind are application data, under
        // the allocation's bandwidth cap, idle timeout and lifetime.
        use tokio::io::AsyncWriteExt;
        let client = rd.unsplit(wr);
        if !buf.is_empty() && to_peer.write_all(&buf).await.is_err() {
            return;
        }
        let idle = Duration::from_secs(deps.config.data_connection_idle_timeout_secs.max(1));
        let ended = tokio::select! {
            // Boxed: its state is needed only by data connections, not by every stream task.
            r = Box::pin(crate::turn::relay::data_pipe(client, to_peer, owner, idle, &m)) => r,
            _ = &mut shutdown => return,
        };
        if let Some(reason) = ended {
            m.drops.with_label_values(&[reason]).inc();
        }
    } else {
        use tokio::io::AsyncWriteExt;
        let _ = rd.unsplit(wr).shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing() {
        assert_eq!(next_frame(&[]), Ok(None));
        assert_eq!(next_frame(&[0x00, 0x01, 0x00]), Ok(None));
        let mut req = Vec::new();
        crate::stun::binding::request(&[1; 12], false, &mut req);
        assert_eq!(next_frame(&req), Ok(Some(Frame::Stun(20))));
        assert_eq!(next_frame(&req[..10]), Ok(None));
        // ChannelData of 5 payload bytes is padded to 12 on streams.
        let cd = [0x40, 0x00, 0x00, 0x05, 1, 2, 3, 4, 5, 0, 0, 0];
        assert_eq!(
            next_frame(&cd),
            Ok(Some(Frame::ChannelData {
                consumed: 12,
                len: 9
            }))
        );
        assert_eq!(next_frame(&cd[..9]), Ok(None));
        assert_eq!(next_frame(b"\x80 not stun"), Err(FrameError::Garbage));
        // RFC 5766 channel numbers up to 0x7FFF are framed too (coturn's clients use them).
        assert_eq!(
            next_frame(b"\x7f\x00\x00\x04abcd"),
            Ok(Some(Frame::ChannelData {
                consumed: 8,
                len: 8
            }))
        );
        // A TLS ClientHello on the plain port: 0x16 0x03 looks like STUN until the cookie.
        assert_eq!(
            next_frame(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"),
            Err(FrameError::Garbage)
        );
        let mut bad_cookie = req.clone();
        bad_cookie[5] ^= 0xff;
        assert_eq!(next_frame(&bad_cookie), Err(FrameError::Garbage));
    }
}
