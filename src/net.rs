//! Socket options the STUN/TURN port and the relays share: the port's UDP socket setup,
//! receiving and sending with the local address (IP_PKTINFO), and DF on relay sockets. A leaf:
//! it knows no protocol, so the listener shells and the TURN relay drivers both use it.

use std::net::{IpAddr, SocketAddr};

/// The key per-source limits count under (stream caps, login attempts, the reflector budget):
/// the address for IPv4 (IPv4-mapped IPv6 included), the /64 for IPv6 (one subscriber's prefix).
pub fn ip_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
}

/// A UDP socket with large buffers (relay bursts), IPV6_V6ONLY on v6 and SO_REUSEPORT, for the
/// STUN/TURN port (`listener::udp::bind`) and the shards' sibling sockets on a bound address.
pub fn bind_std(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    // Best effort: the kernel caps these at net.core.[rw]mem_max.
    let _ = sock.set_recv_buffer_size(4 << 20);
    let _ = sock.set_send_buffer_size(4 << 20);
    sock.set_reuse_port(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    Ok(sock.into())
}

/// The one relay socket bind, for the UDP shards' and the stream clients' relays alike: a
/// nonblocking UDP socket on `addr` with IPV6_V6ONLY on v6, a 1 MiB receive buffer (peer
/// bursts) and fragmentation allowed (a TURN server sets DF only when the client asks, RFC
/// 8656 §14). No SO_REUSEPORT: a relay port belongs to one allocation.
pub fn bind_relay(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    // Best effort: the kernel caps it at net.core.rmem_max.
    let _ = s.set_recv_buffer_size(1 << 20);
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    let sock: std::net::UdpSocket = s.into();
    crate::udp_batch::allow_fragmentation(&sock, addr.is_ipv6());
    Ok(sock)
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

/// `IP_MTU_DISCOVER` / `IPV6_MTU_DISCOVER` = `*_PMTUDISC_DO`: the kernel sets DF and
/// refuses (EMSGSIZE) what exceeds the path MTU rather than fragmenting it.
#[cfg(any(target_os = "linux", target_os = "android"))]
#[allow(unsafe_code)]
pub mod dont_fragment {
    use nix::libc;
    use std::os::fd::AsRawFd;

    /// Set the option on `sock`'s descriptor.
    pub fn set(sock: &impl AsRawFd, v6: bool) -> std::io::Result<()> {
        let (level, name, val) = if v6 {
            (
                libc::IPPROTO_IPV6,
                libc::IPV6_MTU_DISCOVER,
                libc::IPV6_PMTUDISC_DO,
            )
        } else {
            (
                libc::IPPROTO_IP,
                libc::IP_MTU_DISCOVER,
                libc::IP_PMTUDISC_DO,
            )
        };
        let v: libc::c_int = val;
        // SAFETY: the descriptor is open for the lifetime of `sock`, which the caller
        // borrows; the option value points to a live `c_int` whose exact size is passed,
        // and setsockopt only reads it.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                level,
                name,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub mod dont_fragment {
    /// Not available here: DONT-FRAGMENT is answered with 420.
    pub fn set<T>(_sock: &T, _v6: bool) -> std::io::Result<()> {
        Err(std::io::ErrorKind::Unsupported.into())
    }
}
