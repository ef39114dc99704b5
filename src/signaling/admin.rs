//! What the server API may see and do in the rooms of this node: snapshots of rooms and
//! peers, closing a room, kicking a peer, removing every peer of a revoked user. Each
//! operation runs under the owning shard's serialization, like any client request.

use std::time::Instant;

use super::room::RoomError;
pub use super::room::{PeerInfo, RoomInfo};
use super::service::Signaling;
use crate::metrics::Metrics;

impl Signaling {
    /// Every room of this node, sorted by id.
    pub fn rooms(&self) -> Vec<RoomInfo> {
        let mut all = Vec::new();
        self.read_each(|h| {
            let ids: Vec<String> = h.room_ids().map(str::to_string).collect();
            all.extend(ids.iter().filter_map(|id| h.room_info(id)));
        });
        all.sort_by(|a, b| a.room.cmp(&b.room));
        all
    }

    /// One room, if it is open on this node.
    pub fn room(&self, room: &str) -> Option<RoomInfo> {
        self.read(room, |h| h.room_info(room))
    }

    /// Close `room`: every peer gets an `error` (`room_closed`) and `room-closed`, and its
    /// connection is closed with 4006; returns how many peers were removed.
    pub fn close_room(&self, room: &str, metrics: &Metrics) -> Result<usize, RoomError> {
        let (n, creator) = self.apply(metrics, room, |h, out| h.close_room(room, out))?;
        self.release_room(&creator);
        tracing::info!(room, peers = n, "room closed through the server API");
        Ok(n)
    }

    /// Kick `peer` out of `room`: the others see `peer-left {reason:"kicked"}`, its connection
    /// gets an `error` (`kicked`) and is closed with 4005, and its resume token is forgotten.
    pub fn kick_peer(&self, room: &str, peer: &str, metrics: &Metrics) -> Result<(), RoomError> {
        let now = Instant::now();
        self.apply(metrics, room, |h, out| {
            h.kick(now, room, peer, "kicked", "kicked", out)
        })?;
        tracing::info!(room, peer, "peer kicked through the server API");
        Ok(())
    }

    /// Remove every peer of `user` from its room (revocation): like a kick, with
    /// `reason: "revoked"`; returns how many.
    pub fn remove_user(&self, user: &str, metrics: &Metrics) -> usize {
        let now = Instant::now();
        let mut n = 0;
        self.apply_each(metrics, |h, out| {
            for (room, peer) in h.seats_of_user(user) {
                if h.kick(now, &room, &peer, "revoked", "revoked", out).is_ok() {
                    n += 1;
                }
            }
        });
        n
    }
}
