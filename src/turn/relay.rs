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
    /// The shared UDP listener socket the client talks to.
    Udp(Arc<UdpSocket>),
}

/// A bound relay socket and the task serving it; dropping it closes the socket.
pub struct UdpRelay {
    addr: SocketAddr,
    sock: Arc<UdpSocket>,
    view: Arc<ArcSwap<View>>,
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
    fn local_addr(&self) -> SocketAddr {
        self.addr
    }
    fn publish(&self, view: Arc<View>) {
        self.view.store(view);
    }
}

impl UdpRelay {
    /// Bind a relay socket on `addr` and start its peer-to-client task. Must run inside a
    /// tokio runtime.
    pub fn bind(
        addr: SocketAddr,
        sink: ClientSink,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<UdpRelay> {
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
        let span = tracing::debug_span!("relay", relay = %local);
        let task = tokio::spawn(
            peer_to_client(sock.clone(), sink, view.clone(), metrics).instrument(span),
        )
        .abort_handle();
        Ok(UdpRelay {
            addr: local,
            sock,
            view,
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
    sink: ClientSink,
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
        let Some(client) = v.client else {
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
            let sent = match &sink {
                ClientSink::Udp(s) => s.try_send_to(frame, client).is_ok(),
            };
            if sent {
                pkts += 1;
                bytes += n as u64;
            } else {
                full += 1;
            }
        }
        drop(v);
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
