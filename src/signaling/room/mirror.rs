//! The cluster mirror of a room: what another node needs to take the room over (its settings
//! and seats, without buffers), how a node opens a room from it, and how a node drops a room
//! that another node owns now.

use std::time::Instant;

use super::hub::{Hub, Leaving, Peer, Peers, Room};
use super::replay::Replay;
use super::{ConnId, RoomError};

/// What another node needs to take a room over: its settings and seats, without buffers.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RoomState {
    /// Room id.
    pub room: String,
    /// Peers allowed.
    pub capacity: usize,
    /// User that created it (quota).
    pub creator: String,
    /// Seats, in join order.
    pub peers: Vec<SeatState>,
}

/// One seat of a `RoomState`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SeatState {
    /// Peer id the others know.
    pub peer: String,
    /// Its user.
    pub user: String,
    /// Its resume token.
    pub token: String,
    /// Join order (roles: the later joiner is polite).
    pub order: u64,
}

impl Hub {
    /// The seats of room `id`, for another node to take it over from.
    pub fn snapshot(&self, id: &str) -> Option<RoomState> {
        let r = self.rooms.get(id)?;
        let mut peers: Vec<SeatState> = r
            .peers
            .iter()
            .map(|(pid, p)| SeatState {
                peer: pid.clone(),
                user: p.user.clone(),
                token: p.resume_token.clone(),
                order: p.joined_order,
            })
            .collect();
        peers.sort_by_key(|p| p.order);
        Some(RoomState {
            room: id.to_string(),
            capacity: r.capacity,
            creator: r.creator.clone(),
            peers,
        })
    }

    /// Open a room taken over from a node that is gone: every seat waits for its peer to
    /// resume within the window, and its numbering follows the `lastSeq` the peer presents.
    pub fn adopt(&mut self, now: Instant, state: &RoomState) -> Result<(), RoomError> {
        if self.rooms.contains_key(&state.room) {
            return Err(RoomError::RoomExists);
        }
        let deadline = now + self.limits.resume_grace;
        let mut peers = Peers::default();
        for s in &state.peers {
            self.order = self.order.max(s.order);
            peers.insert(
                s.peer.clone(),
                Peer {
                    user: s.user.clone(),
                    conn: None,
                    joined_order: s.order,
                    replay: Replay::adopted(),
                    deadline: Some(deadline),
                    resume_token: s.token.clone(),
                },
            );
            self.tokens
                .insert(s.token.clone(), (state.room.clone(), s.peer.clone()));
            self.timers.arm_resume(deadline, &state.room, &s.peer);
            self.peers += 1;
        }
        let close_at = peers.is_empty().then(|| now + self.limits.empty_room_grace);
        if let Some(c) = close_at {
            self.timers.arm_close(c, &state.room);
        }
        self.rooms.insert(
            state.room.clone(),
            Room {
                capacity: state.capacity.max(2),
                creator: state.creator.clone(),
                peers,
                close_at,
            },
        );
        Ok(())
    }

    /// Drop room `id` at once (another node owns it now). Returns its creator (for the
    /// quota) and the connections that were seated, which the shell closes so that their
    /// clients resume where the room lives.
    pub fn evict(&mut self, id: &str) -> Option<(String, Vec<ConnId>)> {
        let room = self.rooms.remove(id)?;
        if let Some(c) = room.close_at {
            self.timers.disarm_close(c, id);
        }
        let mut conns = Vec::new();
        let mut out = Vec::new();
        for (pid, p) in room.peers.into_vec() {
            conns.extend(self.forget_seat(id, &pid, p, Leaving::Evicted, &mut out));
        }
        Some((room.creator, conns))
    }

    /// The connections seated in room `id` (for a node that must hand the room over).
    pub fn conns_in(&self, id: &str) -> Vec<ConnId> {
        self.rooms
            .get(id)
            .map(|r| r.peers.values().filter_map(|p| p.conn).collect())
            .unwrap_or_default()
    }
}
