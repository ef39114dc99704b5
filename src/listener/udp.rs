//! The UDP shell of the STUN/TURN port: reads datagrams, hands STUN to the Binding responder
//! or the TURN allocation table, relays ChannelData and Send indications, and drives the
//! table's timers. This task exclusively owns its table, so the table needs no lock.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;

use super::{classify, Kind};
use crate::server::{shutdown_signal, Shared};
use crate::stun::codec::{method, Class};
use crate::stun::Message;
use crate::turn::core::{Env, Table};
use crate::turn::relay::{AnyRelay, ClientSink};

/// Largest datagram we read; bigger ones are truncated by the kernel and then fail to parse.
pub const MAX_DATAGRAM: usize = 65_536;
/// Datagrams handled per wake-up before timers and shutdown are looked at again.
const BATCH: usize = 64;

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

/// Serve STUN Binding, and TURN when `turn.relay` is on, on `sock` until shutdown.
pub async fn serve(shared: Arc<Shared>, sock: UdpSocket) {
    let sock = Arc::new(sock);
    let local = sock.local_addr().ok();
    let mut shutdown = std::pin::pin!(shutdown_signal(shared.lifecycle.subscribe()));
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut out = Vec::with_capacity(1500);
    let software = shared.config.turn.software.clone();
    let m = shared.metrics.clone();
    let malformed = m.stun_requests.with_label_values(&["malformed"]);
    let not_stun = m.drops.with_label_values(&["not_stun"]);
    let no_route = m.drops.with_label_values(&["no_permission"]);
    let mut table: Option<Table<AnyRelay>> = shared.config.turn.relay.then(|| {
        Table::new(
            shared.turn.settings.clone(),
            shared.auth.clone(),
            m.clone(),
            shared.turn.pool.clone(),
            "udp",
            ClientSink::Udp(sock.clone()),
        )
    });
    let far = || tokio::time::Instant::now() + Duration::from_secs(86_400);
    let mut timer = std::pin::pin!(tokio::time::sleep_until(far()));
    let mut armed: Option<Instant> = None;
    let env = |shared: &Shared| Env {
        now: Instant::now(),
        unix: crate::auth::unix_now(),
        draining: shared.lifecycle.is_draining(),
    };
    loop {
        let want = table.as_ref().and_then(|t| t.next_deadline());
        if want != armed {
            armed = want;
            let at = want.map(tokio::time::Instant::from_std).unwrap_or_else(far);
            timer.as_mut().reset(at);
        }
        tokio::select! {
            r = sock.readable() => {
                if r.is_err() {
                    continue;
                }
            }
            _ = &mut timer, if armed.is_some() => {
                if let Some(t) = table.as_mut() {
                    t.handle_timeout(env(&shared));
                }
                armed = None;
                continue;
            }
            _ = &mut shutdown => break,
        }
        let (mut pkts, mut bytes, mut dropped) = (0u64, 0u64, 0u64);
        let now = Instant::now();
        for _ in 0..BATCH {
            let (n, src) = match sock.try_recv_from(&mut buf) {
                Ok(x) => x,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    // ICMP port unreachable and friends surface here on some platforms.
                    tracing::debug!(error = %e, "udp recv error");
                    continue;
                }
            };
            let pkt = &buf[..n];
            match classify(pkt) {
                Kind::ChannelData => {
                    let sent = table
                        .as_mut()
                        .and_then(|t| t.channel_data(now, src, pkt))
                        .map(|(relay, peer, data)| (relay.send_to_peer(data, peer), data.len()));
                    match sent {
                        Some((true, len)) => {
                            pkts += 1;
                            bytes += len as u64;
                        }
                        _ => dropped += 1,
                    }
                }
                Kind::Stun => {
                    let msg = match Message::parse(pkt) {
                        Ok(msg) => msg,
                        Err(e) => {
                            malformed.inc();
                            tracing::trace!(%src, error = %e, "malformed STUN datagram");
                            continue;
                        }
                    };
                    if msg.method() == method::SEND && msg.class() == Class::Indication {
                        let sent = table
                            .as_mut()
                            .and_then(|t| t.send_indication(now, src, &msg))
                            .map(|(relay, peer, data)| {
                                (relay.send_to_peer(data, peer), data.len())
                            });
                        match sent {
                            Some((true, len)) => {
                                pkts += 1;
                                bytes += len as u64;
                            }
                            _ => dropped += 1,
                        }
                        continue;
                    }
                    out.clear();
                    if msg.method() == method::BINDING {
                        super::answer_binding(&m, &msg, src, local, &software, &mut out);
                    } else if let Some(t) = table.as_mut() {
                        let conns = shared.turn.conns.clone();
                        let mut bind = |a, kind| AnyRelay::bind(a, kind, &m, &conns);
                        t.handle_request(env(&shared), src, &msg, &mut out, &mut bind);
                    } else {
                        super::refuse_relay_disabled(&m, &msg, &mut out);
                    }
                    if !out.is_empty() {
                        if let Err(e) = sock.try_send_to(&out, src) {
                            tracing::debug!(%src, error = %e, "udp send error");
                        }
                    }
                }
                Kind::Other => not_stun.inc(),
            }
        }
        if pkts > 0 {
            m.relay_packets_to_peer.inc_by(pkts);
            m.relay_bytes_to_peer.inc_by(bytes);
        }
        if dropped > 0 {
            no_route.inc_by(dropped);
        }
    }
    if let Some(mut t) = table.take() {
        t.clear(crate::turn::core::DeleteReason::Shutdown);
    }
}
