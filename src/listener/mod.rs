//! Socket shells for the STUN/TURN port: they read bytes, hand them to the sans-IO
//! cores, and write back what the cores decide. Nothing clever lives here.

pub mod tcp;
pub mod tls;
pub mod udp;

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
