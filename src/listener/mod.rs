//! Socket shells for the STUN/TURN port: they read bytes, hand them to the sans-IO
//! cores, and write back what the cores decide. Nothing clever lives here.

pub mod shard;
pub mod tcp;
pub mod tls;
pub mod udp;

/// Every address on this host's interfaces, for the peer policy's "own addresses" rule.
/// Best effort: an enumeration error yields only what the configuration names.
pub fn host_addresses() -> Vec<std::net::IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addrs
        .filter_map(|i| i.address)
        .filter_map(|a| {
            a.as_sockaddr_in()
                .map(|s| std::net::IpAddr::V4(s.ip().into()))
                .or_else(|| a.as_sockaddr_in6().map(|s| std::net::IpAddr::V6(s.ip())))
        })
        .collect()
}

/// What the first bytes of a packet on the STUN/TURN port are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A STUN message (top bits 00 and the magic cookie).
    Stun,
    /// TURN ChannelData (top bits 01).
    ChannelData,
    /// Anything else: dropped.
    Other,
}

/// Demultiplex by the first byte (RFC 7983 style) and the magic cookie.
pub fn classify(buf: &[u8]) -> Kind {
    match buf.first() {
        Some(b) if b & 0xC0 == 0 && crate::stun::codec::looks_like_stun(buf) => Kind::Stun,
        Some(b) if b & 0xC0 == 0x40 && buf.len() >= 4 => Kind::ChannelData,
        _ => Kind::Other,
    }
}

/// Answer a Binding request into `out`, counting the outcome.
pub(crate) fn answer_binding(
    metrics: &crate::metrics::Metrics,
    msg: &crate::stun::Message<'_>,
    src: std::net::SocketAddr,
    local: Option<std::net::SocketAddr>,
    software: &str,
    out: &mut Vec<u8>,
) {
    let o = crate::stun::binding::respond(msg, src, local, software, out);
    if o != crate::stun::binding::Outcome::Ignored {
        metrics.stun_requests.with_label_values(&[o.label()]).inc();
    }
}

/// With `turn.relay = false`, TURN methods are unknown methods (RFC 8489 §6.3.1): 400.
pub(crate) fn refuse_relay_disabled(
    metrics: &crate::metrics::Metrics,
    msg: &crate::stun::Message<'_>,
    out: &mut Vec<u8>,
) {
    use crate::stun::{Class, Encoder};
    if msg.class() != Class::Request {
        return;
    }
    let tid = msg.transaction_id();
    let mut e = Encoder::new(out, msg.method(), Class::Error, &tid);
    e.error_code(400, "Bad Request: TURN relay disabled");
    e.finish();
    metrics.turn_errors.with_label_values(&["400"]).inc();
}
