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
/// A wildcard bind also asks for IP_PKTINFO / IPV6_RECVPKTINFO, so each datagram says which
/// local address it reached.
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
    if addr.ip().is_unspecified() {
        pktinfo::enable(&sock, addr.is_ipv6())?;
    }
    UdpSocket::from_std(sock.into())
}

/// Receiving and sending with the local address (IP_PKTINFO), for wildcard listeners: a
/// multi-homed host must answer from the address the client sent to, and relays bind it.
pub mod pktinfo {
    use nix::sys::socket::{
        recvmsg, sendmsg, setsockopt, sockopt, ControlMessage, ControlMessageOwned, MsgFlags,
        SockaddrIn, SockaddrIn6, SockaddrStorage,
    };
    use std::io::{IoSlice, IoSliceMut};
    use std::net::{IpAddr, SocketAddr};
    use std::os::fd::{AsFd, AsRawFd};
    use tokio::io::Interest;
    use tokio::net::UdpSocket;

    /// Ask the kernel to report each datagram's destination address.
    pub fn enable(sock: &impl AsFd, v6: bool) -> std::io::Result<()> {
        let fd = sock.as_fd().as_raw_fd();
        let r = if v6 {
            setsockopt(fd, sockopt::Ipv6RecvPacketInfo, &true)
        } else {
            setsockopt(fd, sockopt::Ipv4PacketInfo, &true)
        };
        r.map_err(std::io::Error::from)
    }

    /// Control buffer large enough for one IPv4 or IPv6 packet-info message.
    pub fn control_buffer() -> Vec<u8> {
        nix::cmsg_space!(nix::libc::in6_pktinfo, nix::libc::in_pktinfo)
    }

    /// Non-blocking receive: `(length, source, local address it reached)`. The local address
    /// is `None` when the socket did not ask for it (a listener bound to one address).
    pub fn try_recv(
        sock: &UdpSocket,
        buf: &mut [u8],
        control: &mut Vec<u8>,
    ) -> std::io::Result<(usize, SocketAddr, Option<IpAddr>)> {
        sock.try_io(Interest::READABLE, || {
            let mut iov = [IoSliceMut::new(buf)];
            let m = recvmsg::<SockaddrStorage>(
                sock.as_raw_fd(),
                &mut iov,
                Some(control),
                MsgFlags::empty(),
            )
            .map_err(std::io::Error::from)?;
            let mut local = None;
            for c in m.cmsgs() {
                match c {
                    ControlMessageOwned::Ipv4PacketInfo(pi) => {
                        local = Some(IpAddr::from(u32::from_be(pi.ipi_addr.s_addr).to_be_bytes()));
                    }
                    ControlMessageOwned::Ipv6PacketInfo(pi) => {
                        local = Some(IpAddr::from(pi.ipi6_addr.s6_addr));
                    }
                    _ => {}
                }
            }
            let src = m
                .address
                .and_then(|a| {
                    a.as_sockaddr_in()
                        .map(|s| SocketAddr::V4((*s).into()))
                        .or_else(|| a.as_sockaddr_in6().map(|s| SocketAddr::V6((*s).into())))
                })
                .ok_or_else(|| std::io::Error::other("datagram without a source address"))?;
            Ok((m.bytes, src, local))
        })
    }

    /// Non-blocking send to `to`, from `from` when given (the address the client used).
    pub fn try_send(
        sock: &UdpSocket,
        buf: &[u8],
        to: SocketAddr,
        from: Option<IpAddr>,
    ) -> std::io::Result<usize> {
        let Some(from) = from else {
            return sock.try_send_to(buf, to);
        };
        sock.try_io(Interest::WRITABLE, || {
            let iov = [IoSlice::new(buf)];
            let fd = sock.as_raw_fd();
            let r = match (to, from) {
                (SocketAddr::V4(to), IpAddr::V4(from)) => {
                    let pi = nix::libc::in_pktinfo {
                        ipi_ifindex: 0,
                        ipi_spec_dst: nix::libc::in_addr {
                            s_addr: u32::from(from).to_be(),
                        },
                        ipi_addr: nix::libc::in_addr { s_addr: 0 },
                    };
                    let cm = [ControlMessage::Ipv4PacketInfo(&pi)];
                    sendmsg(
                        fd,
                        &iov,
                        &cm,
                        MsgFlags::empty(),
                        Some(&SockaddrIn::from(to)),
                    )
                }
                (SocketAddr::V6(to), IpAddr::V6(from)) => {
                    let pi = nix::libc::in6_pktinfo {
                        ipi6_addr: nix::libc::in6_addr {
                            s6_addr: from.octets(),
                        },
                        ipi6_ifindex: 0,
                    };
                    let cm = [ControlMessage::Ipv6PacketInfo(&pi)];
                    sendmsg(
                        fd,
                        &iov,
                        &cm,
                        MsgFlags::empty(),
                        Some(&SockaddrIn6::from(to)),
                    )
                }
                _ => return sock.try_send_to(buf, to),
            };
            r.map_err(std::io::Error::from)
        })
    }
}

/// Serve STUN Binding, and TURN when `turn.relay` is on, on `sock` until shutdown.
pub async fn serve(shared: Arc<Shared>, sock: UdpSocket) {
    let sock = Arc::new(sock);
    let bound = sock.local_addr().ok();
    // On a wildcard bind each datagram carries the address it reached (IP_PKTINFO).
    let wildcard = bound.is_some_and(|a| a.ip().is_unspecified());
    let mut control = pktinfo::control_buffer();
    let mut shutdown = std::pin::pin!(shutdown_signal(shared.lifecycle.subscribe()));
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut out = Vec::with_capacity(1500);
    let software = shared.config.turn.software.clone();
    let m = shared.metrics.clone();
    let malformed = m.stun_requests.with_label_values(&["malformed"]);
    let not_stun = m.drops.with_label_values(&["not_stun"]);
    let no_route = m.drops.with_label_values(&["no_permission"]);
    let mut table: Option<Table<AnyRelay>> = shared.config.turn.relay.then(|| {
        let mut t = Table::new(
            shared.turn.settings.clone(),
            shared.auth.clone(),
            m.clone(),
            shared.turn.pool.clone(),
            "udp",
            ClientSink::Udp(sock.clone(), wildcard),
        );
        t.set_events(shared.webhooks.clone());
        t
    });
    let mut revoked = shared.auth.revocations();
    let far = || tokio::time::Instant::now() + Duration::from_secs(86_400);
    let mut timer = std::pin::pin!(tokio::time::sleep_until(far()));
    let mut armed: Option<Instant> = None;
    let env = |shared: &Shared, local: Option<std::net::IpAddr>| Env {
        now: Instant::now(),
        unix: crate::auth::unix_now(),
        draining: shared.lifecycle.is_draining(),
        local,
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
                    t.handle_timeout(env(&shared, None));
                }
                armed = None;
                continue;
            }
            Ok(()) = revoked.changed() => {
                if let Some(t) = table.as_mut() {
                    t.sweep_revoked();
                }
                continue;
            }
            _ = &mut shutdown => break,
        }
        let (mut pkts, mut bytes, mut dropped) = (0u64, 0u64, 0u64);
        let now = Instant::now();
        for _ in 0..BATCH {
            let got = if wildcard {
                pktinfo::try_recv(&sock, &mut buf, &mut control)
            } else {
                sock.try_recv_from(&mut buf).map(|(n, src)| (n, src, None))
            };
            let (n, src, to) = match got {
                Ok((n, src, to)) => (n, src, to.or(bound.map(|b| b.ip()))),
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
                        let local = bound.map(|b| SocketAddr::new(to.unwrap_or(b.ip()), b.port()));
                        super::answer_binding(&m, &msg, src, local, &software, &mut out);
                    } else if let Some(t) = table.as_mut() {
                        let conns = shared.turn.conns.clone();
                        let mut bind = |a, kind| AnyRelay::bind(a, kind, &m, &conns);
                        t.handle_request(env(&shared, to), src, &msg, &mut out, &mut bind);
                    } else {
                        super::refuse_relay_disabled(&m, &msg, &mut out);
                    }
                    if !out.is_empty() {
                        let from = if wildcard { to } else { None };
                        if let Err(e) = pktinfo::try_send(&sock, &out, src, from) {
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
            m.relay_bytes_by_transport.to_peer("udp").inc_by(bytes);
        }
        if dropped > 0 {
            no_route.inc_by(dropped);
        }
    }
    if let Some(mut t) = table.take() {
        t.clear(crate::turn::core::DeleteReason::Shutdown);
    }
}
