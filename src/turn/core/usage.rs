//! What an allocation has relayed, and its id: the table creates both, the relays count into
//! the first, and the shell reports both (webhooks, admin), so they live with the table.

use std::sync::atomic::{AtomicU64, Ordering};

/// Per-allocation relay usage, shared by the table (client to peer) and the relay task
/// (peer to client); plain atomic adds, batched by the callers.
#[derive(Debug, Default)]
pub struct Usage {
    /// Bytes client to peer.
    pub bytes_to_peer: AtomicU64,
    /// Bytes peer to client.
    pub bytes_to_client: AtomicU64,
    /// Packets client to peer.
    pub packets_to_peer: AtomicU64,
    /// Packets peer to client.
    pub packets_to_client: AtomicU64,
}

impl Usage {
    /// Count relayed client-to-peer traffic.
    pub fn to_peer(&self, packets: u64, bytes: u64) {
        self.packets_to_peer.fetch_add(packets, Ordering::Relaxed);
        self.bytes_to_peer.fetch_add(bytes, Ordering::Relaxed);
    }
    /// Count relayed peer-to-client traffic.
    pub fn to_client(&self, packets: u64, bytes: u64) {
        self.packets_to_client.fetch_add(packets, Ordering::Relaxed);
        self.bytes_to_client.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// A process-unique allocation id (hex), so webhook events and the admin API can name an
/// allocation without its 5-tuple.
pub fn allocation_id() -> String {
    let b: [u8; 8] = rand::random();
    crate::crypto::hex(&b)
}
