//! The UDP shell of the STUN/TURN port: binds the port's sockets and hands them to the shard
//! threads of [`super::shard`], which read datagrams in batches, answer STUN Binding, run the
//! TURN allocation table and relay ChannelData and Send indications.

use std::net::SocketAddr;
use std::sync::Arc;

use super::Deps;

/// Bind a UDP socket on the STUN/TURN port with large buffers (relay bursts), IPV6_V6ONLY on
/// v6 addresses and SO_REUSEPORT, so each shard can open its own socket on the same port.
pub fn bind(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    // SO_REUSEPORT would let a second process on the same port silently share our traffic:
    // first take the address plainly, so a port already in use fails as it always did, then
    // take it again with SO_REUSEPORT (and learn the port when `addr` asked for port 0).
    let probe = plain(addr)?;
    let actual = probe.local_addr()?;
    drop(probe);
    bind_std(actual)
}

fn plain(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.bind(&addr.into())?;
    Ok(sock.into())
}

/// [`bind`], also used for the shards' sibling sockets on an already bound address.
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

/// Serve STUN Binding, and TURN when `turn.relay` is on, on `sock` and `turn.shards - 1`
/// sibling sockets until shutdown.
pub async fn serve(deps: Arc<Deps>, sock: std::net::UdpSocket) {
    let n = super::shard::shard_count(deps.config.shards);
    let mut socks = match super::shard::siblings(&sock, n) {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(error = %e, "cannot open SO_REUSEPORT siblings; one shard only");
            Vec::new()
        }
    };
    socks.insert(0, sock);
    super::shard::serve(deps, socks).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_in_use_is_refused_even_with_reuseport_siblings() {
        let first = bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
        let addr = first.local_addr().unwrap();
        // Our own shards may join the port...
        let sib = bind_std(addr).unwrap();
        assert_eq!(sib.local_addr().unwrap(), addr);
        // ...but another server on the same port fails as with a plain bind.
        assert!(bind(addr).is_err());
        // And a plain socket holding a port keeps us out.
        let other = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert!(bind(other.local_addr().unwrap()).is_err());
    }
}
