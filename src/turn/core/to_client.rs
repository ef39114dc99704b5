//! The one peer→client decision (RFC 8656 §11.4, §12.6): a datagram from a peer plus the
//! allocation's published [`View`] becomes a ChannelData header or a Data indication for the
//! client, or a reason to drop it. Why one pure function: the UDP shards, the stream clients'
//! relays and the fuzz harness then route, cap and frame peer data alike, and only do I/O and
//! counting themselves.

use std::net::SocketAddr;
use std::time::Instant;

use super::allocations::{Bucket, PeerRoute, View};
use crate::turn::wire::{channel_header, data_indication};

/// Bytes a shell keeps in front of a received payload so a ChannelData frame needs no copy.
pub const HEADROOM: usize = 4;

/// A cheap source of Data indication transaction ids (xorshift64): indications need no
/// cryptographic randomness, and drawing one must not allocate or lock per packet.
#[derive(Debug, Clone)]
pub struct Tids(u64);

impl Tids {
    /// A source seeded with `seed` (any value; zero is made odd so the sequence never stalls).
    pub fn new(seed: u64) -> Tids {
        Tids(seed | 1)
    }

    /// The next transaction id.
    pub fn next_tid(&mut self) -> [u8; 12] {
        let mut s = self.0;
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        self.0 = s;
        let mut tid = [0u8; 12];
        tid[..8].copy_from_slice(&s.to_le_bytes());
        tid
    }
}

/// How a peer datagram leaves towards the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// ChannelData: this 4-byte header, then the payload unchanged (the shell places the
    /// header in its headroom or send slot, so the payload is not copied twice).
    Channel([u8; HEADROOM]),
    /// A Data indication, written whole into the caller's `out`.
    Indication,
}

/// A peer datagram that reaches the client: where it goes and how it is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ToClient {
    /// The client's transport address.
    pub client: SocketAddr,
    /// The framing.
    pub frame: Frame,
}

/// Why a peer datagram does not reach the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// The socket is only reserved (EVEN-PORT): no allocation owns it yet.
    Reserved,
    /// No live permission for the peer's IP.
    NoPermission,
    /// Over the allocation's bandwidth cap.
    BandwidthCap,
    /// Too large for a ChannelData or Data indication's 16-bit length.
    Oversized,
}

impl Dropped {
    /// The `drops` metric label, or `None` for what is not counted (a reserved socket's
    /// traffic is discarded silently, as before any allocation owns it).
    pub fn label(self) -> Option<&'static str> {
        match self {
            Dropped::Reserved => None,
            Dropped::NoPermission => Some("no_permission"),
            Dropped::BandwidthCap => Some("bandwidth_cap"),
            Dropped::Oversized => Some("peer_datagram_oversized"),
        }
    }
}

/// Decide what becomes of `payload`, sent by `peer` to the relay whose published view is
/// `view`, at `now`. `bucket` is the relay's bandwidth cap state (created here on first use
/// when the view sets a cap); a Data indication is encoded into `out` (cleared first) with a
/// transaction id from `tids`. Neither allocates once `out` has grown to the largest frame.
pub fn to_client(
    view: &View,
    bucket: &mut Option<Bucket>,
    now: Instant,
    peer: SocketAddr,
    payload: &[u8],
    tids: &mut Tids,
    out: &mut Vec<u8>,
) -> Result<ToClient, Dropped> {
    let Some(client) = view.client else {
        return Err(Dropped::Reserved);
    };
    let route = view.route(peer, now);
    if route == PeerRoute::Denied {
        return Err(Dropped::NoPermission);
    }
    let n = payload.len();
    if view.max_bps > 0 {
        let b = bucket.get_or_insert_with(|| Bucket::new(view.max_bps, now));
        if !b.allow(now, n) {
            return Err(Dropped::BandwidthCap);
        }
    }
    let frame = match route {
        PeerRoute::Channel(ch) => {
            if n > usize::from(u16::MAX) {
                return Err(Dropped::Oversized);
            }
            Frame::Channel(channel_header(ch, n))
        }
        PeerRoute::Denied | PeerRoute::Indication => {
            let tid = tids.next_tid();
            if data_indication(out, &tid, peer, payload).is_err() {
                return Err(Dropped::Oversized);
            }
            Frame::Indication
        }
    };
    Ok(ToClient { client, frame })
}

#[cfg(test)]
#[path = "to_client_tests.rs"]
mod tests;
