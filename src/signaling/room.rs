//! The sans-IO room state: rooms, peers, perfect-negotiation roles, per-peer sequence numbers
//! and resume buffers. Requests and `now` go in; frames addressed to connections come out.

use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

/// A WebSocket connection, as the shell numbers them.
pub type ConnId = u64;

/// Something the shell must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send a JSON frame on a connection.
    Send(ConnId, Value),
    /// Close a connection after sending what was queued.
    Close(ConnId),
}

/// Limits and timers of the room core.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Peers per room unless `create` asks for fewer.
    pub room_capacity: usize,
    /// Rooms open at once.
    pub max_rooms: usize,
    /// How long a dropped peer may resume.
    pub resume_grace: Duration,
    /// Frames kept per peer for replay.
    pub resume_buffer: usize,
    /// How long an empty room stays open.
    pub empty_room_grace: Duration,
}

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
    /// Too many rooms open.
    #[error("too many rooms")]
    TooManyRooms,
    /// The session is limited to another room.
    #[error("this session may not join that room")]
    ForbiddenRoom,
    /// Resume token unknown or its window closed.
    #[error("cannot resume: unknown or expired resume token")]
    BadResume,
    /// A malformed field.
    #[error("{0}")]
    BadRequest(String),
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
            RoomError::TooManyRooms => "too_many_rooms",
            RoomError::ForbiddenRoom => "forbidden_room",
            RoomError::BadResume => "bad_resume",
            RoomError::BadRequest(_) => "bad_request",
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

#[derive(Debug)]
struct Peer {
    user: String,
    conn: Option<ConnId>,
    joined_order: u64,
    /// Next sequence number to stamp.
    next_seq: u64,
    /// Recent frames for replay: (seq, frame).
    buffer: VecDeque<(u64, Value)>,
    /// Set while disconnected within the resume window.
    dropped_at: Option<Instant>,
    resume_token: String,
}

#[derive(Debug)]
struct Room {
    capacity: usize,
    peers: BTreeMap<String, Peer>,
    empty_since: Option<Instant>,
}

/// All rooms of one node.
#[derive(Debug)]
pub struct Hub {
    limits: Limits,
    rooms: HashMap<String, Room>,
    /// conn → (room, peer id)
    seats: HashMap<ConnId, (String, String)>,
    /// resume token → (room, peer id)
    tokens: HashMap<String, (String, String)>,
    order: u64,
}

fn random_id(bytes: usize) -> String {
    use base64::Engine;
    let v: Vec<u8> = (0..bytes).map(|_| rand::random::<u8>()).collect();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v)
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl Hub {
    /// An empty hub.
    pub fn new(limits: Limits) -> Hub {
        Hub {
            limits,
            rooms: HashMap::new(),
            seats: HashMap::new(),
            tokens: HashMap::new(),
            order: 0,
        }
    }

    /// Open rooms.
    pub fn room_count(&self) -> usize {
        self.rooms.len()
    }

    /// Peers in rooms, connected or within their resume window.
    pub fn peer_count(&self) -> usize {
        self.rooms.values().map(|r| r.peers.len()).sum()
    }

    /// Whether a connection holds a seat.
    pub fn is_seated(&self, conn: ConnId) -> bool {
        self.seats.contains_key(&conn)
    }

    /// `create`: open a room (named, or with an unguessable id).
    pub fn create(
        &mut self,
        now: Instant,
        name: Option<&str>,
        capacity: Option<usize>,
    ) -> Result<(String, usize), RoomError> {
        if self.rooms.len() >= self.limits.max_rooms {
            return Err(RoomError::TooManyRooms);
        }
        let id = match name {
            Some(n) if !valid_name(n) => {
                return Err(RoomError::BadRequest(
                    "room names are 1 to 64 of A-Z a-z 0-9 - _ .".into(),
                ))
            }
            Some(n) if self.rooms.contains_key(n) => return Err(RoomError::RoomExists),
            Some(n) => n.to_string(),
            None => random_id(12),
        };
        let capacity = match capacity {
            None => self.limits.room_capacity,
            Some(c) if (2..=self.limits.room_capacity).contains(&c) => c,
            Some(_) => {
                return Err(RoomError::BadRequest(format!(
                    "capacity must be between 2 and {}",
                    self.limits.room_capacity
                )))
            }
        };
        self.rooms.insert(
            id.clone(),
            Room {
                capacity,
                peers: BTreeMap::new(),
                empty_since: Some(now),
            },
        );
        Ok((id, capacity))
    }

    /// Stamp a frame with the recipient's next sequence number, keep it for replay, send it if
    /// the recipient is connected.
    fn deliver(limits: &Limits, peer: &mut Peer, mut frame: Value, out: &mut Vec<Action>) {
        let seq = peer.next_seq;
        peer.next_seq += 1;
        frame["seq"] = json!(seq);
        if peer.buffer.len() >= limits.resume_buffer {
            peer.buffer.pop_front();
        }
        peer.buffer.push_back((seq, frame.clone()));
        if let Some(c) = peer.conn {
            out.push(Action::Send(c, frame));
        }
    }

    fn roster(room: &Room, me: &str) -> Vec<Value> {
        let my_order = room.peers.get(me).map(|p| p.joined_order).unwrap_or(0);
        room.peers
            .iter()
            .filter(|(id, _)| id.as_str() != me)
            .map(|(id, p)| {
                json!({
                    "peerId": id,
                    "userId": p.user,
                    // Perfect negotiation: the later joiner of each pair is polite.
                    "polite": my_order > p.joined_order,
                    "state": if p.conn.is_some() { "connected" } else { "reconnecting" },
                })
            })
            .collect()
    }

    /// `join`: take a seat; others see `peer-joined`. A seat held by the same user is replaced.
    pub fn join(
        &mut self,
        conn: ConnId,
        member: &Member,
        room_id: &str,
        out: &mut Vec<Action>,
    ) -> Result<Value, RoomError> {
        if self.seats.contains_key(&conn) {
            return Err(RoomError::AlreadyInRoom);
        }
        if member.room_limit.as_deref().is_some_and(|r| r != room_id) {
            return Err(RoomError::ForbiddenRoom);
        }
        let room = self.rooms.get_mut(room_id).ok_or(RoomError::UnknownRoom)?;
        // Same identity already here (connected or reconnecting): replace it.
        let old = room
            .peers
            .iter()
            .find(|(_, p)| p.user == member.user)
            .map(|(id, _)| id.clone());
        if old.is_none() && room.peers.len() >= room.capacity {
            return Err(RoomError::RoomFull);
        }
        if let Some(old_id) = old {
            if let Some(p) = room.peers.remove(&old_id) {
                self.tokens.remove(&p.resume_token);
                if let Some(c) = p.conn {
                    self.seats.remove(&c);
                    out.push(Action::Send(
                        c,
                        json!({"type": "peer-left", "peerId": old_id, "reason": "replaced"}),
                    ));
                    out.push(Action::Close(c));
                }
            }
            for p in room.peers.values_mut() {
                Self::deliver(
                    &self.limits,
                    p,
                    json!({"type": "peer-left", "peerId": old_id, "reason": "replaced"}),
                    out,
                );
            }
        }
        self.order += 1;
        let peer_id = random_id(6);
        let token = random_id(18);
        let newcomer = Peer {
            user: member.user.clone(),
            conn: Some(conn),
            joined_order: self.order,
            next_seq: 1,
            buffer: VecDeque::new(),
            dropped_at: None,
            resume_token: token.clone(),
        };
        for p in room.peers.values_mut() {
            Self::deliver(
                &self.limits,
                p,
                json!({
                    "type": "peer-joined",
                    "peerId": peer_id,
                    "userId": member.user,
                    // Existing peers joined earlier: impolite towards the newcomer.
                    "polite": false,
                }),
                out,
            );
        }
        room.peers.insert(peer_id.clone(), newcomer);
        room.empty_since = None;
        self.seats
            .insert(conn, (room_id.to_string(), peer_id.clone()));
        self.tokens
            .insert(token.clone(), (room_id.to_string(), peer_id.clone()));
        Ok(json!({
            "type": "joined",
            "room": room_id,
            "peerId": peer_id,
            "resumeToken": token,
            "peers": Self::roster(room, &peer_id),
            "seq": 0,
        }))
    }

    /// `leave` or a kick: free the seat, tell the others.
    pub fn leave(
        &mut self,
        now: Instant,
        conn: ConnId,
        out: &mut Vec<Action>,
    ) -> Result<(), RoomError> {
        let (room_id, peer_id) = self.seats.remove(&conn).ok_or(RoomError::NotInRoom)?;
        self.remove_peer(now, &room_id, &peer_id, "left", out);
        Ok(())
    }

    fn remove_peer(
        &mut self,
        now: Instant,
        room_id: &str,
        peer_id: &str,
        reason: &str,
        out: &mut Vec<Action>,
    ) {
        let Some(room) = self.rooms.get_mut(room_id) else {
            return;
        };
        if let Some(p) = room.peers.remove(peer_id) {
            self.tokens.remove(&p.resume_token);
        }
        for p in room.peers.values_mut() {
            Self::deliver(
                &self.limits,
                p,
                json!({"type": "peer-left", "peerId": peer_id, "reason": reason}),
                out,
            );
        }
        if room.peers.is_empty() {
            room.empty_since = Some(now);
        }
    }

    /// `signal`: relay opaque `data` from the sender to one peer or all others.
    pub fn signal(
        &mut self,
        conn: ConnId,
        to: Option<&str>,
        data: Value,
        out: &mut Vec<Action>,
    ) -> Result<(), RoomError> {
        let (room_id, from) = self.seats.get(&conn).ok_or(RoomError::NotInRoom)?;
        let room = self.rooms.get_mut(room_id).ok_or(RoomError::NotInRoom)?;
        let frame = json!({"type": "signal", "from": from, "data": data});
        match to {
            Some(t) if t == from => Err(RoomError::UnknownPeer),
            Some(t) => {
                let p = room.peers.get_mut(t).ok_or(RoomError::UnknownPeer)?;
                Self::deliver(&self.limits, p, frame, out);
                Ok(())
            }
            None => {
                let from = from.clone();
                for (id, p) in room.peers.iter_mut() {
                    if *id != from {
                        Self::deliver(&self.limits, p, frame.clone(), out);
                    }
                }
                Ok(())
            }
        }
    }

    /// The connection dropped: keep the seat for the resume window, tell the others.
    pub fn disconnect(&mut self, now: Instant, conn: ConnId, out: &mut Vec<Action>) {
        let Some((room_id, peer_id)) = self.seats.remove(&conn) else {
            return;
        };
        let Some(room) = self.rooms.get_mut(&room_id) else {
            return;
        };
        if let Some(p) = room.peers.get_mut(&peer_id) {
            p.conn = None;
            p.dropped_at = Some(now);
        }
        for (id, p) in room.peers.iter_mut() {
            if *id != peer_id {
                Self::deliver(
                    &self.limits,
                    p,
                    json!({"type": "peer-reconnecting", "peerId": peer_id}),
                    out,
                );
            }
        }
    }

    /// `resume`: a dropped peer takes its seat back and gets every frame after `last_seq`.
    pub fn resume(
        &mut self,
        conn: ConnId,
        member: &Member,
        token: &str,
        last_seq: u64,
        reply_id: Option<&Value>,
        out: &mut Vec<Action>,
    ) -> Result<(), RoomError> {
        if self.seats.contains_key(&conn) {
            return Err(RoomError::AlreadyInRoom);
        }
        let (room_id, peer_id) = self
            .tokens
            .get(token)
            .cloned()
            .ok_or(RoomError::BadResume)?;
        let room = self.rooms.get_mut(&room_id).ok_or(RoomError::BadResume)?;
        let me = room.peers.get_mut(&peer_id).ok_or(RoomError::BadResume)?;
        if me.user != member.user {
            return Err(RoomError::BadResume);
        }
        // A live connection for this seat (half-open socket) is taken over.
        if let Some(old) = me.conn.take() {
            self.seats.remove(&old);
            out.push(Action::Close(old));
        }
        me.conn = Some(conn);
        me.dropped_at = None;
        let missed: Vec<Value> = me
            .buffer
            .iter()
            .filter(|(s, _)| *s > last_seq)
            .map(|(_, f)| f.clone())
            .collect();
        let first_kept = me.buffer.front().map(|(s, _)| *s).unwrap_or(me.next_seq);
        let complete = last_seq + 1 >= first_kept;
        let roster = Self::roster(room, &peer_id);
        let mut resumed = json!({
            "type": "resumed",
            "room": room_id,
            "peerId": peer_id,
            "peers": roster,
            "replayed": missed.len(),
            "complete": complete,
        });
        if let Some(id) = reply_id {
            resumed["id"] = id.clone();
        }
        out.push(Action::Send(conn, resumed));
        for f in missed {
            out.push(Action::Send(conn, f));
        }
        for (id, p) in room.peers.iter_mut() {
            if *id != peer_id {
                Self::deliver(
                    &self.limits,
                    p,
                    json!({"type": "peer-resumed", "peerId": peer_id}),
                    out,
                );
            }
        }
        self.seats.insert(conn, (room_id, peer_id));
        Ok(())
    }

    /// Expire resume windows (`peer-left timeout`) and close rooms empty past their grace;
    /// returns how many dropped peers never came back.
    pub fn tick(&mut self, now: Instant, out: &mut Vec<Action>) -> usize {
        let mut expired = Vec::new();
        for (rid, room) in &self.rooms {
            for (pid, p) in &room.peers {
                if p.dropped_at
                    .is_some_and(|t| now.saturating_duration_since(t) >= self.limits.resume_grace)
                {
                    expired.push((rid.clone(), pid.clone()));
                }
            }
        }
        let n = expired.len();
        for (rid, pid) in expired {
            self.remove_peer(now, &rid, &pid, "timeout", out);
        }
        let grace = self.limits.empty_room_grace;
        self.rooms.retain(|_, r| {
            !(r.peers.is_empty()
                && r.empty_since
                    .is_some_and(|t| now.saturating_duration_since(t) >= grace))
        });
        n
    }

    /// When `tick` next has work.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.rooms
            .values()
            .flat_map(|r| {
                let peers = r
                    .peers
                    .values()
                    .filter_map(|p| p.dropped_at.map(|t| t + self.limits.resume_grace));
                let empty = r
                    .peers
                    .is_empty()
                    .then_some(r.empty_since)
                    .flatten()
                    .map(|t| t + self.limits.empty_room_grace);
                peers.chain(empty)
            })
            .min()
    }

    /// Drop every seat of a connection that will not come back (closed by policy).
    pub fn kick(&mut self, now: Instant, conn: ConnId, out: &mut Vec<Action>) {
        if let Some((room_id, peer_id)) = self.seats.remove(&conn) {
            self.remove_peer(now, &room_id, &peer_id, "kicked", out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub() -> Hub {
        Hub::new(Limits {
            room_capacity: 3,
            max_rooms: 2,
            resume_grace: Duration::from_secs(10),
            resume_buffer: 4,
            empty_room_grace: Duration::from_secs(5),
        })
    }

    fn m(u: &str) -> Member {
        Member {
            user: u.into(),
            room_limit: None,
        }
    }

    fn sent_to(out: &[Action], c: ConnId) -> Vec<&Value> {
        out.iter()
            .filter_map(|a| match a {
                Action::Send(x, v) if *x == c => Some(v),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn join_assigns_exactly_one_polite_side_and_announces() {
        let mut h = hub();
        let t = Instant::now();
        let (room, _) = h.create(t, Some("r1"), None).unwrap();
        let mut out = Vec::new();
        let a = h.join(1, &m("a"), &room, &mut out).unwrap();
        assert_eq!(a["peers"].as_array().unwrap().len(), 0);
        let b = h.join(2, &m("b"), &room, &mut out).unwrap();
        let peers = b["peers"].as_array().unwrap();
        assert_eq!(peers.len(), 1);
        assert_eq!(peers[0]["polite"], true, "the newcomer is polite");
        let to_a = sent_to(&out, 1);
        assert_eq!(to_a[0]["type"], "peer-joined");
        assert_eq!(to_a[0]["polite"], false, "the earlier peer is impolite");
        assert_eq!(to_a[0]["peerId"], b["peerId"]);
        assert_eq!(to_a[0]["seq"], 1);
    }

    #[test]
    fn signal_stamps_from_preserves_order_and_checks_target() {
        let mut h = hub();
        let t = Instant::now();
        let (room, _) = h.create(t, None, None).unwrap();
        let mut out = Vec::new();
        let a = h.join(1, &m("a"), &room, &mut out).unwrap();
        let b = h.join(2, &m("b"), &room, &mut out).unwrap();
        out.clear();
        let bid = b["peerId"].as_str().unwrap();
        for i in 0..3 {
            h.signal(1, Some(bid), json!({"n": i}), &mut out).unwrap();
        }
        let got = sent_to(&out, 2);
        assert_eq!(got.len(), 3);
        for (i, f) in got.iter().enumerate() {
            assert_eq!(f["from"], a["peerId"]);
            assert_eq!(f["data"]["n"], i);
        }
        assert!(sent_to(&out, 1).is_empty());
        assert_eq!(
            h.signal(1, Some("nobody"), json!(1), &mut out),
            Err(RoomError::UnknownPeer)
        );
        assert_eq!(
            h.signal(9, None, json!(1), &mut out),
            Err(RoomError::NotInRoom)
        );
    }

    #[test]
    fn capacity_rooms_and_limits() {
        let mut h = hub();
        let t = Instant::now();
        let (room, cap) = h.create(t, Some("x"), Some(2)).unwrap();
        assert_eq!(cap, 2);
        assert_eq!(h.create(t, Some("x"), None), Err(RoomError::RoomExists));
        assert!(matches!(
            h.create(t, Some("bad name!"), None),
            Err(RoomError::BadRequest(_))
        ));
        assert!(matches!(
            h.create(t, None, Some(9)),
            Err(RoomError::BadRequest(_))
        ));
        h.create(t, None, None).unwrap();
        assert_eq!(h.create(t, None, None), Err(RoomError::TooManyRooms));
        let mut out = Vec::new();
        h.join(1, &m("a"), &room, &mut out).unwrap();
        h.join(2, &m("b"), &room, &mut out).unwrap();
        assert_eq!(
            h.join(3, &m("c"), &room, &mut out),
            Err(RoomError::RoomFull)
        );
        assert_eq!(
            h.join(3, &m("c"), "nope", &mut out),
            Err(RoomError::UnknownRoom)
        );
        assert_eq!(
            h.join(1, &m("a"), &room, &mut out),
            Err(RoomError::AlreadyInRoom)
        );
        let limited = Member {
            user: "d".into(),
            room_limit: Some("other".into()),
        };
        assert_eq!(
            h.join(4, &limited, &room, &mut out),
            Err(RoomError::ForbiddenRoom)
        );
    }

    #[test]
    fn drop_resume_replays_missed_frames_in_order() {
        let mut h = hub();
        let t = Instant::now();
        let (room, _) = h.create(t, None, None).unwrap();
        let mut out = Vec::new();
        h.join(1, &m("a"), &room, &mut out).unwrap();
        let b = h.join(2, &m("b"), &room, &mut out).unwrap();
        let bid = b["peerId"].as_str().unwrap().to_string();
        out.clear();
        h.disconnect(t, 2, &mut out);
        assert_eq!(sent_to(&out, 1)[0]["type"], "peer-reconnecting");
        h.signal(1, Some(&bid), json!("x1"), &mut out).unwrap();
        h.signal(1, Some(&bid), json!("x2"), &mut out).unwrap();
        assert!(
            sent_to(&out, 2).is_empty(),
            "nothing sent to a dropped connection"
        );
        out.clear();
        let tok = b["resumeToken"].as_str().unwrap();
        assert_eq!(
            h.resume(5, &m("mallory"), tok, 0, None, &mut out),
            Err(RoomError::BadResume)
        );
        h.resume(3, &m("b"), tok, 0, None, &mut out).unwrap();
        let got = sent_to(&out, 3);
        assert_eq!(got[0]["type"], "resumed");
        assert_eq!(got[0]["peerId"], bid.as_str());
        assert_eq!(got[1]["data"], "x1");
        assert_eq!(got[2]["data"], "x2");
        assert!(got[1]["seq"].as_u64() < got[2]["seq"].as_u64());
        assert_eq!(sent_to(&out, 1)[0]["type"], "peer-resumed");
        // After resuming, new frames flow to the new connection.
        out.clear();
        h.signal(1, Some(&bid), json!("x3"), &mut out).unwrap();
        assert_eq!(sent_to(&out, 3)[0]["data"], "x3");
    }

    #[test]
    fn resume_window_expiry_and_empty_room_grace() {
        let mut h = hub();
        let t = Instant::now();
        let (room, _) = h.create(t, None, None).unwrap();
        let mut out = Vec::new();
        h.join(1, &m("a"), &room, &mut out).unwrap();
        let b = h.join(2, &m("b"), &room, &mut out).unwrap();
        out.clear();
        h.disconnect(t, 2, &mut out);
        assert_eq!(h.next_deadline(), Some(t + Duration::from_secs(10)));
        h.tick(t + Duration::from_secs(9), &mut out);
        assert_eq!(h.peer_count(), 2);
        out.clear();
        h.tick(t + Duration::from_secs(10), &mut out);
        let left = sent_to(&out, 1);
        assert_eq!(left[0]["type"], "peer-left");
        assert_eq!(left[0]["reason"], "timeout");
        assert_eq!(h.peer_count(), 1);
        let tok = b["resumeToken"].as_str().unwrap();
        assert_eq!(
            h.resume(3, &m("b"), tok, 0, None, &mut out),
            Err(RoomError::BadResume)
        );
        // Last peer leaves: the room lingers for its grace, then closes.
        let t2 = t + Duration::from_secs(20);
        h.leave(t2, 1, &mut out).unwrap();
        assert_eq!(h.room_count(), 1);
        h.tick(t2 + Duration::from_secs(4), &mut out);
        assert_eq!(h.room_count(), 1);
        h.tick(t2 + Duration::from_secs(5), &mut out);
        assert_eq!(h.room_count(), 0);
        assert_eq!(h.next_deadline(), None);
    }

    #[test]
    fn same_identity_replaces_and_buffer_is_bounded() {
        let mut h = hub();
        let t = Instant::now();
        let (room, _) = h.create(t, None, None).unwrap();
        let mut out = Vec::new();
        h.join(1, &m("a"), &room, &mut out).unwrap();
        let b1 = h.join(2, &m("b"), &room, &mut out).unwrap();
        out.clear();
        let b2 = h.join(3, &m("b"), &room, &mut out).unwrap();
        assert_ne!(b1["peerId"], b2["peerId"]);
        assert!(out.contains(&Action::Close(2)));
        let to_a = sent_to(&out, 1);
        assert_eq!(to_a[0]["type"], "peer-left");
        assert_eq!(to_a[0]["reason"], "replaced");
        assert_eq!(to_a[1]["type"], "peer-joined");
        assert_eq!(h.peer_count(), 2, "no ghost peer");
        // Resume buffer keeps only the newest frames.
        let aid = h.seats[&1].1.clone();
        h.disconnect(t, 1, &mut out);
        for i in 0..10 {
            h.signal(3, Some(&aid), json!(i), &mut out).unwrap();
        }
        let mut o2 = Vec::new();
        let a_tok = h.rooms[&room].peers[&aid].resume_token.clone();
        h.resume(4, &m("a"), &a_tok, 0, None, &mut o2).unwrap();
        let got = sent_to(&o2, 4);
        assert_eq!(got[0]["complete"], false);
        assert_eq!(got.len(), 1 + 4);
    }
}
