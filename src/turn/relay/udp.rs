//! The UDP relay socket of a TCP/TLS client's allocation when no UDP shard runs (a server with
//! only TCP/TLS listeners; otherwise `listener::shard::HostedRelay` serves it): one task per
//! allocation owns the socket and moves peer datagrams to the client; the client-to-peer
//! direction is a `try_send_to` on the same socket from the listener task.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use tokio::net::UdpSocket;
use tracing::Instrument;

use super::ClientSink;
use crate::metrics::Metrics;
use crate::turn::core::{to_client, Bucket, Dropped, Frame, Relay, Tids, View, HEADROOM};
/// Largest datagram a relay socket reads.
const MAX_PAYLOAD: usize = 65_535;
/// Datagrams handled per wake-up before yielding, so one busy allocation cannot starve others.
const BATCH: usize = 64;

/// A bound relay socket and the task serving it; dropping it closes the socket.
pub struct UdpRelay {
    pub(super) addr: SocketAddr,
    pub(super) sock: Arc<UdpSocket>,
    pub(super) view: Arc<ArcSwap<View>>,
    pub(super) sink: Arc<arc_swap::ArcSwapOption<ClientSink>>,
    pub(super) task: tokio::task::AbortHandle,
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
        let sock = Arc::new(UdpSocket::from_std(crate::net::bind_relay(addr)?)?);
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
    let mut tids = Tids::new(rand::random());
    loop {
        if sock.readable().await.is_err() {
            return;
        }
        let now = Instant::now();
        let v = view.load();
        let s = sink.load();
        let Some(sink) = s.as_deref() else {
            // No allocation owns the socket yet: nothing may be relayed; discard.
            while sock.try_recv_from(&mut buf).is_ok() {}
            continue;
        };
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
            let payload = &buf[HEADROOM..HEADROOM + n];
            let d = match to_client(&v, &mut bucket, now, peer, payload, &mut tids, &mut out) {
                Ok(d) => d,
                Err(why) => {
                    match why {
                        Dropped::Reserved => {}
                        Dropped::NoPermission => denied += 1,
                        Dropped::BandwidthCap => capped += 1,
                        Dropped::Oversized => big += 1,
                    }
                    continue;
                }
            };
            let frame: &[u8] = match d.frame {
                Frame::Channel(header) => {
                    buf[..HEADROOM].copy_from_slice(&header);
                    &buf[..HEADROOM + n]
                }
                Frame::Indication => &out,
            };
            if sink.deliver(frame, d.client, v.local) {
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
