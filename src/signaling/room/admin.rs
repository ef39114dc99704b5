//! The server API's view of the rooms and its operations on them: a room's peers and their
//! state, a user's seats, removing a peer for good, closing a room now.

use std::time::Instant;

use super::frame::Action;
use super::hub::{Hub, Leaving, Peer};
use super::{Hook, RoomError};

/// One room as the server API shows it.
#[derive(Debug, Clone, serde::Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RoomInfo {
    /// Room id.
    pub room: String,
    /// Peers the room admits.
    pub capacity: usize,
    /// Its peers, in join order.
    pub peers: Vec<PeerInfo>,
}

/// One peer as the server API shows it.
#[derive(Debug, Clone, serde::Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PeerInfo {
    /// Peer id within the room.
    pub peer: String,
    /// User id it logged in as.
    pub user: String,
    /// `connected`, or `reconnecting` while within its resume window.
    pub state: &'static str,
}

impl Hub {
    /// Ids of the open rooms.
    pub fn room_ids(&self) -> impl Iterator<Item = &str> {
        self.rooms.keys().map(String::as_str)
    }

    /// A snapshot of `room` for the server API: peers in join order with their state.
    pub fn room_info(&self, room_id: &str) -> Option<RoomInfo> {
        let room = self.rooms.get(room_id)?;
        let mut peers: Vec<(&String, &Peer)> = room.peers.iter().collect();
        peers.sort_by_key(|(_, p)| p.joined_order);
        Some(RoomInfo {
            room: room_id.to_string(),
            capacity: room.capacity,
            peers: peers
                .into_iter()
                .map(|(id, p)| PeerInfo {
                    peer: id.clone(),
                    user: p.user.clone(),
                    state: p.state(),
                })
                .collect(),
        })
    }

    /// Every `(room, peer)` seat of `user`, connected or reconnecting.
    pub fn seats_of_user(&self, user: &str) -> Vec<(String, String)> {
        self.rooms
            .iter()
            .flat_map(|(rid, r)| {
                r.peers
                    .iter()
                    .filter(|(_, p)| p.user == user)
                    .map(move |(pid, _)| (rid.clone(), pid.clone()))
            })
            .collect()
    }

    /// Remove `peer` from `room` for good (server API): it gets an `error` frame with `code`
    /// and its connection is closed with 4005; its resume token is forgotten; the others see
    /// `peer-left` with `reason`.
    pub fn kick(
        &mut self,
        now: Instant,
        room_id: &str,
        peer_id: &str,
        code: &str,
        reason: &str,
        out: &mut Vec<Action>,
    ) -> Result<(), RoomError> {
        let room = self.rooms.get(room_id).ok_or(RoomError::UnknownRoom)?;
        if !room.peers.contains_key(peer_id) {
            return Err(RoomError::UnknownPeer);
        }
        self.leave_room(now, room_id, peer_id, Leaving::Kicked { code, reason }, out);
        Ok(())
    }

    /// Close `room` now (server API): every connected peer gets an `error` frame
    /// (`room_closed`) and `room-closed`, and is closed with 4006; seats, resume tokens and
    /// timers go. Returns the number of peers removed and the room's creator (its quota).
    pub fn close_room(
        &mut self,
        room_id: &str,
        out: &mut Vec<Action>,
    ) -> Result<(usize, String), RoomError> {
        let mut room = self.rooms.remove(room_id).ok_or(RoomError::UnknownRoom)?;
        if let Some(at) = room.close_at.take() {
            self.timers.disarm_close(at, room_id);
        }
        let mut peers: Vec<(String, Peer)> = std::mem::take(&mut room.peers).into_vec();
        peers.sort_by_key(|(_, p)| p.joined_order);
        let n = peers.len();
        for (pid, p) in peers {
            self.forget_seat(room_id, &pid, p, Leaving::RoomClosed, out);
        }
        self.hook(|| Hook::RoomClosed {
            room: room_id.to_string(),
            reason: "closed".into(),
        });
        Ok((n, room.creator))
    }
}
