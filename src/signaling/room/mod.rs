//! The sans-IO room core: rooms, peers, perfect-negotiation roles, per-peer sequence numbers,
//! resume buffers and a deadline queue. Requests and `now` go in; frames addressed to
//! connections come out, already serialized once and shared by every recipient.
//!
//! One file per concern, so that a change to one does not mean reading the others:
//! - `frame`: the events, frames and actions the core hands the shell;
//! - `limits`: byte budgets, the core's limits and timers, the per-node room quota;
//! - `hub`: the state machine (create, join, signal, leave, disconnect, resume, tick);
//! - `replay`: one seat's numbering and resume buffer;
//! - `seat`: `forget_seat`, the one path by which a seat leaves its room for good;
//! - `mirror`: what another node needs to take a room over (snapshot, adopt, evict);
//! - `admin`: the server API's view and operations (room info, kick, close).

mod admin;
mod frame;
mod hub;
mod limits;
mod mirror;
mod replay;
mod seat;
#[cfg(test)]
mod tests;

pub use admin::{PeerInfo, RoomInfo};
pub use frame::{Action, CloseReason, Event, Frame};
pub use hub::{Hub, Tick};
pub use limits::{Budget, Limits, RoomQuota};
pub use mirror::{RoomState, SeatState};

/// A WebSocket connection, as the shell numbers them.
pub type ConnId = u64;

/// A room or peer event for webhooks.
pub type Hook = crate::webhooks::Event;

/// Why a request was refused; `code()` is the `error.code` clients switch on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoomError {
    /// No such room.
    #[error("unknown room")]
    UnknownRoom,
    /// The room is at capacity.
    #[error("room is full")]
    RoomFull,
    /// `create` named a room that exists.
    #[error("room already exists")]
    RoomExists,
    /// `signal.to` names nobody in the room.
    #[error("unknown peer")]
    UnknownPeer,
    /// The connection is not in a room.
    #[error("not in a room")]
    NotInRoom,
    /// The connection is already in a room.
    #[error("already in a room; leave first")]
    AlreadyInRoom,
    /// Too many rooms open on the node.
    #[error("too many rooms")]
    TooManyRooms,
    /// This user has created as many open rooms as it may.
    #[error("too many rooms created by this user")]
    TooManyRoomsForUser,
    /// The session is limited to another room.
    #[error("this session may not join that room")]
    ForbiddenRoom,
    /// Resume token unknown or its window closed.
    #[error("cannot resume: unknown or expired resume token")]
    BadResume,
    /// The resume token is live but its seat belongs to another user: the client
    /// authenticated as someone else (a fresh `open` login gets a new user id). Same code as
    /// [`RoomError::BadResume`], its own message so the cause is visible.
    #[error(
        "cannot resume: the resume token belongs to another user; authenticate with the session \
         token of the user that joined (the newest one from ice-servers)"
    )]
    ResumeOtherUser,
    /// A malformed field.
    #[error("{0}")]
    BadRequest(String),
    /// The room lives on another node and the cluster cannot reach it right now.
    #[error("the room's node cannot be reached right now; retry")]
    ClusterUnavailable,
}

impl RoomError {
    /// Stable error code.
    pub fn code(&self) -> &'static str {
        match self {
            RoomError::UnknownRoom => "unknown_room",
            RoomError::RoomFull => "room_full",
            RoomError::RoomExists => "room_exists",
            RoomError::UnknownPeer => "unknown_peer",
            RoomError::NotInRoom => "not_in_room",
            RoomError::AlreadyInRoom => "already_in_room",
            RoomError::TooManyRooms | RoomError::TooManyRoomsForUser => "too_many_rooms",
            RoomError::ForbiddenRoom => "forbidden_room",
            RoomError::BadResume | RoomError::ResumeOtherUser => "bad_resume",
            RoomError::BadRequest(_) => "bad_request",
            RoomError::ClusterUnavailable => "cluster_unavailable",
        }
    }
}

/// Who a connection is, from its verified session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// User id from the session.
    pub user: String,
    /// Room the session is limited to.
    pub room_limit: Option<String>,
}

fn random_id(bytes: usize) -> String {
    use base64::Engine;
    let v: Vec<u8> = (0..bytes).map(|_| rand::random::<u8>()).collect();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v)
}

/// An unguessable room id (also a valid room name).
pub fn new_room_id() -> String {
    random_id(12)
}

/// Whether a client-chosen room name is acceptable.
pub fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// The room a resume token belongs to (tokens are `<room>.<random>`), so the shell can route
/// a `resume` to the room's shard without a node-wide table.
pub fn token_room(token: &str) -> Option<&str> {
    token.rsplit_once('.').map(|(room, _)| room)
}
