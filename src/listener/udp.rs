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
    crate::net::bind_std(actual)
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
        let sib = crate::net::bind_std(addr).unwrap();
        assert_eq!(sib.local_addr().unwrap(), addr);
        // ...but another server on the same port fails as with a plain bind.
        assert!(bind(addr).is_err());
        // And a plain socket holding a port keeps us out.
        let other = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert!(bind(other.local_addr().unwrap()).is_err());
    }
}
