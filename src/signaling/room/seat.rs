//! The one path by which a seat leaves its room for good (`leave`, a closed resume window,
//! a replacement, a kick or revocation, a closed room, a room moved to another node): the
//! node's peer count, the resume token, the replay buffer, the resume deadline, the
//! connection's seat, its goodbye frames and the webhook event are all handled here.

use serde_json::json;
use std::time::Instant;

use super::frame::{direct, Action, CloseReason, Event, Frame};
use super::hub::{Hub, Leaving, Peer, PeerHook};
use super::ConnId;

impl Hub {
    /// Forget seat `peer_id` of `room_id`, already taken out of its room: everything the hub
    /// keeps for it goes, its connection (if any) is unseated and sent what `how` says, and
    /// the webhook hears of it. Returns the connection it had.
    pub(super) fn forget_seat(
        &mut self,
        room_id: &str,
        peer_id: &str,
        mut p: Peer,
        how: Leaving<'_>,
        out: &mut Vec<Action>,
    ) -> Option<ConnId> {
        self.peers -= 1;
        self.tokens.remove(&p.resume_token);
        p.replay.clear(&self.limits);
        if let Some(d) = p.deadline {
            self.timers.disarm_resume(d, room_id, peer_id);
        }
        if let Some(c) = p.conn {
            self.seats.remove(&c);
            match how {
                Leaving::Replaced => {
                    let ev = Event::from_value(
                        "peer-left",
                        &json!({"type": "peer-left", "peerId": peer_id, "reason": "replaced"}),
                    );
                    out.push(Action::Send(
                        c,
                        Frame::Event {
                            seq: p.replay.next_seq,
                            event: ev,
                        },
                    ));
                    out.push(Action::Close(c, CloseReason::Replaced));
                }
                Leaving::Kicked { code, reason } => {
                    out.push(Action::Send(
                        c,
                        direct(
                            "error",
                            &json!({"type": "error", "code": code, "message": format!("removed from the room ({reason})")}),
                        ),
                    ));
                    out.push(Action::Close(c, CloseReason::Kicked));
                }
                Leaving::RoomClosed => {
                    out.push(Action::Send(
                        c,
                        direct(
                            "error",
                            &json!({"type": "error", "code": "room_closed", "message": "the room was closed"}),
                        ),
                    ));
                    out.push(Action::Send(
                        c,
                        direct(
                            "room-closed",
                            &json!({"type": "room-closed", "room": room_id}),
                        ),
                    ));
                    out.push(Action::Close(c, CloseReason::RoomClosed));
                }
                Leaving::Left | Leaving::Timeout | Leaving::Evicted => {}
            }
        }
        if !matches!(how, Leaving::Evicted) {
            self.peer_hook(room_id, peer_id, &p.user, PeerHook::Left(how.reason()));
        }
        p.conn
    }

    /// Take seat `peer_id` out of `room_id` for good and tell the peers that stay
    /// (`peer-left` with the reason). Returns whether the room is empty now (the caller
    /// starts its grace, unless a newcomer takes the seat at once); `None` if there was no
    /// such seat.
    pub(super) fn remove_peer(
        &mut self,
        room_id: &str,
        peer_id: &str,
        how: Leaving<'_>,
        out: &mut Vec<Action>,
    ) -> Option<bool> {
        let p = self.rooms.get_mut(room_id)?.peers.remove(peer_id)?;
        self.forget_seat(room_id, peer_id, p, how, out);
        if self.rooms.get(room_id)?.peers.is_empty() {
            return Some(true);
        }
        let ev = Event::from_value(
            "peer-left",
            &json!({"type": "peer-left", "peerId": peer_id, "reason": how.reason()}),
        );
        self.broadcast(room_id, "", &ev, out);
        Some(false)
    }

    /// [`Hub::remove_peer`], then an emptied room starts its grace at `now`.
    pub(super) fn leave_room(
        &mut self,
        now: Instant,
        room_id: &str,
        peer_id: &str,
        how: Leaving<'_>,
        out: &mut Vec<Action>,
    ) {
        if self.remove_peer(room_id, peer_id, how, out) == Some(true) {
            self.close_when_idle(now, room_id);
        }
    }
}
