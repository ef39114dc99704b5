//! Relay drivers for the allocations of TCP/TLS clients and the RFC 6062 TCP relays (UDP
//! relays live on the shard event loops, `listener::shard`, TCP/TLS clients' too whenever a
//! UDP listener runs shards), split by concern:
//! - `sink`: where peer data for a client goes (`ClientSink`, the bounded `StreamSink`, which
//!   a shard fills a receive batch at a time);
//! - `udp`: a UDP relay socket with its own task moving peer datagrams to the client, for
//!   TCP/TLS clients of a server with no UDP listener (so no shards);
//! - `rfc6062`: TCP relays, their peer connections waiting for ConnectionBind, and the
//!   capped data pipes;
//! - this file: `AnyRelay`, either kind as the allocation table holds it.
//!
//! Neither direction allocates or takes a shared lock per packet: permissions are read from an
//! `ArcSwap` snapshot, counters are batched.

mod rfc6062;
mod sink;
mod udp;

pub use rfc6062::{data_pipe, BindError, Conns, PipeBuckets, PipeOwner, TcpRelay};
pub use sink::{ClientSink, SinkBatch, StreamSink};
pub use udp::UdpRelay;

use std::net::SocketAddr;
use std::sync::Arc;

use crate::metrics::Metrics;
use crate::turn::core::{Relay, View};

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
                TcpRelay::bind(addr, conns.clone(), metrics.clone()).map(AnyRelay::Tcp)
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
    fn set_dont_fragment(&self) -> std::io::Result<()> {
        match self {
            AnyRelay::Udp(u) => u.set_dont_fragment(),
            // Allocate refuses DONT-FRAGMENT with a TCP transport before binding.
            AnyRelay::Tcp(_) => Err(std::io::ErrorKind::Unsupported.into()),
        }
    }
}
