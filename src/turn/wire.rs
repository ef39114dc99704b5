//! TURN framing of peer data towards a client (RFC 8656): the ChannelData header and the Data
//! indication. Shared by every relay driver (UDP shards and stream clients' relays).

use std::net::SocketAddr;

use crate::stun::codec::{attr, method, Class, Encoder};

/// The 4-byte ChannelData header (RFC 8656 §12.4) in front of `len` bytes of peer data; `len`
/// is at most the largest UDP payload, so it fits the 16-bit length.
pub fn channel_header(channel: u16, len: usize) -> [u8; 4] {
    let [a, b] = channel.to_be_bytes();
    let [c, d] = (len as u16).to_be_bytes();
    [a, b, c, d]
}

/// Encode a Data indication carrying a peer datagram; a payload too large for the message's
/// 16-bit length is an error and leaves `out` empty.
pub fn data_indication(
    out: &mut Vec<u8>,
    tid: &[u8; 12],
    peer: SocketAddr,
    payload: &[u8],
) -> Result<(), crate::stun::codec::EncodeError> {
    out.clear();
    let mut e = Encoder::new(out, method::DATA, Class::Indication, tid);
    e.xor_address(attr::XOR_PEER_ADDRESS, peer);
    e.attr(attr::DATA, payload);
    e.try_finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_datagrams_too_large_for_a_data_indication_are_refused() {
        let mut out = Vec::new();
        let tid = [3u8; 12];
        let v4: SocketAddr = "192.0.2.7:4000".parse().unwrap();
        let v6: SocketAddr = "[2001:db8::7]:4000".parse().unwrap();
        // The largest IPv4 UDP payload fits (12-byte address attribute).
        assert!(data_indication(&mut out, &tid, v4, &vec![0u8; 65_507]).is_ok());
        assert_eq!(out.len(), 20 + 12 + 4 + 65_508);
        // The largest IPv6 one does not (24-byte address attribute): refused, nothing left.
        assert!(data_indication(&mut out, &tid, v6, &vec![0u8; 65_527]).is_err());
        assert!(out.is_empty());
        assert!(data_indication(&mut out, &tid, v6, &[1, 2, 3]).is_ok());
    }
}
