//! The UDP shell of the STUN/TURN port.

use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::UdpSocket;

use super::{classify, Kind};
use crate::server::{shutdown_signal, Shared};
use crate::stun::{binding, Message};

/// Largest datagram we read; bigger ones are truncated by the kernel and then fail to parse.
pub const MAX_DATAGRAM: usize = 65_536;

/// Bind a UDP socket with large buffers (relay bursts) and IPV6_V6ONLY on v6 addresses.
pub fn bind(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    // Best effort: the kernel caps these at net.core.[rw]mem_max.
    let _ = sock.set_recv_buffer_size(4 << 20);
    let _ = sock.set_send_buffer_size(4 << 20);
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    UdpSocket::from_std(sock.into())
}

/// Serve STUN Binding on `sock` until shutdown.
pub async fn serve(shared: Arc<Shared>, sock: UdpSocket) {
    let local = sock.local_addr().ok();
    let mut shutdown = std::pin::pin!(shutdown_signal(shared.lifecycle.subscribe()));
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut out = Vec::with_capacity(1500);
    let software = shared.config.turn.software.clone();
    let m = &shared.metrics;
    let malformed = m.stun_requests.with_label_values(&["malformed"]);
    loop {
        let (n, src) = tokio::select! {
            r = sock.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    // ICMP port unreachable and friends surface here on some platforms.
                    tracing::debug!(error = %e, "udp recv error");
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let pkt = &buf[..n];
        match classify(pkt) {
            Kind::Stun => {
                let msg = match Message::parse(pkt) {
                    Ok(msg) => msg,
                    Err(e) => {
                        malformed.inc();
                        tracing::trace!(%src, error = %e, "malformed STUN datagram");
                        continue;
                    }
                };
                out.clear();
                let outcome = binding::respond(&msg, src, local, &software, &mut out);
                if outcome != binding::Outcome::Ignored {
                    m.stun_requests.with_label_values(&[outcome.label()]).inc();
                }
                if !out.is_empty() {
                    if let Err(e) = sock.send_to(&out, src).await {
                        tracing::debug!(%src, error = %e, "udp send error");
                    }
                }
            }
            Kind::ChannelData | Kind::Other => {
                m.drops.with_label_values(&["not_stun"]).inc();
            }
        }
    }
}
