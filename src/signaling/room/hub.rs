//! The hub state machine: the rooms of one shard and the client operations on them (create,
//! join, signal, leave, disconnect, resume) plus `tick`, which runs the deadline queue. Every
//! way a seat leaves for good goes through `seat`; replay buffers live in `replay`.

use serde_json::value::RawValue;
use serde_json::{json, Value};
use std::collections::{BTreeSet, HashMap};
use std::time::Instant;

use super::frame::{Action, CloseReason, Event, Frame};
use super::limits::Limits;
use super::replay::Replay;
use super::{random_id, valid_name, ConnId, Hook, Member, RoomError};

/// One seat of a room.
#[derive(Debug)]
pub(super) struct Peer {
    pub(super) user: String,
    pub(super) conn: Option<ConnId>,
    pub(super) joined_order: u64,
    /// Its numbering and replay buffer.
    pub(super) replay: Replay,
    /// When the resume window closes, while disconnected.
    pub(super) deadline: Option<Instant>,
    pub(super) resume_token: String,
}

impl Peer {
    /// `connected`, or `reconnecting` within its resume window (rosters, server API).
    pub(super) fn state(&self) -> &'static str {
        if self.conn.is_some() {
            "connected"
        } else {
            "reconnecting"
        }
    }
}

/// The seats of one room, sorted by peer id (the order in which events reach them). A sorted
/// vector, allocated to its exact length: rooms are small, and a `BTreeMap`'s first node holds
/// room for eleven seats, most of an idle connection's memory in a room of two.
#[derive(Debug, Default)]
pub(super) struct Peers(Vec<(String, Peer)>);

impl Peers {
    fn find(&self, id: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(k, _)| k.as_str().cmp(id))
    }

    pub(super) fn get(&self, id: &str) -> Option<&Peer> {
        self.find(id).ok().map(|i| &self.0[i].1)
    }

    pub(super) fn get_mut(&mut self, id: &str) -> Option<&mut Peer> {
        self.find(id).ok().map(|i| &mut self.0[i].1)
    }

    pub(super) fn contains_key(&self, id: &str) -> bool {
        self.find(id).is_ok()
    }

    /// Seat `p` as `id` (a new peer id; an existing one is replaced).
    pub(super) fn insert(&mut self, id: String, p: Peer) {
        match self.find(&id) {
            Ok(i) => self.0[i].1 = p,
            Err(i) => {
                self.0.reserve_exact(1);
                self.0.insert(i, (id, p));
            }
        }
    }

    pub(super) fn remove(&mut self, id: &str) -> Option<Peer> {
        let i = self.find(id).ok()?;
        let (_, p) = self.0.remove(i);
        self.0.shrink_to_fit();
        Some(p)
    }

    pub(super) fn len(&self) -> usize {
        self.0.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (&String, &Peer)> {
        self.0.iter().map(|(k, p)| (k, p))
    }

    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = (&String, &mut Peer)> {
        self.0.iter_mut().map(|(k, p)| (&*k, p))
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &Peer> {
        self.0.iter().map(|(_, p)| p)
    }

    /// Every seat, by value, in peer id order.
    pub(super) fn into_vec(self) -> Vec<(String, Peer)> {
        self.0
    }
}

/// One open room.
#[derive(Debug)]
pub(super) struct Room {
    pub(super) capacity: usize,
    pub(super) creator: String,
    pub(super) peers: Peers,
    /// When the room closes, while empty.
    pub(super) close_at: Option<Instant>,
}

/// What a deadline in the queue is for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    /// A dropped peer's resume window.
    Resume { room: String, peer: String },
    /// An empty room's grace.
    Close { room: String },
}

/// Every pending deadline, soonest first: no operation scans the rooms.
#[derive(Debug, Default)]
pub(super) struct Timers(BTreeSet<(Instant, Timer)>);

impl Timers {
    /// Start `peer`'s resume window, closing at `at`.
    pub(super) fn arm_resume(&mut self, at: Instant, room: &str, peer: &str) {
        self.0.insert((
            at,
            Timer::Resume {
                room: room.into(),
                peer: peer.into(),
            },
        ));
    }

    /// Cancel the resume window armed for `at`.
    pub(super) fn disarm_resume(&mut self, at: Instant, room: &str, peer: &str) {
        self.0.remove(&(
            at,
            Timer::Resume {
                room: room.into(),
                peer: peer.into(),
            },
        ));
    }

    /// Close `room` at `at` if it is still empty then.
    pub(super) fn arm_close(&mut self, at: Instant, room: &str) {
        self.0.insert((at, Timer::Close { room: room.into() }));
    }

    /// Cancel the empty-room grace armed for `at`.
    pub(super) fn disarm_close(&mut self, at: Instant, room: &str) {
        self.0.remove(&(at, Timer::Close { room: room.into() }));
    }
}

/// Why a seat leaves: each way says goodbye to the connection in its own words.
#[derive(Debug, Clone, Copy)]
pub(super) enum Leaving<'a> {
    /// The peer sent `leave`.
    Left,
    /// Its resume window closed.
    Timeout,
    /// A newer connection of the same user took its place.
    Replaced,
    /// Removed through the server API (kick, revocation): `code` is the `error` frame's code,
    /// `reason` the `peer-left` reason.
    Kicked {
        /// The `error.code` the removed connection gets.
        code: &'a str,
        /// The `peer-left` reason the others see.
        reason: &'a str,
    },
    /// Its room was closed through the server API.
    RoomClosed,
    /// Its room moved to another node: no goodbye and no webhook; the shell closes the
    /// connection so that the client resumes there.
    Evicted,
}

impl Leaving<'_> {
    /// The `reason` of `peer-left` and of the `peer.left` webhook.
    pub(super) fn reason(&self) -> &str {
        match self {
            Leaving::Left => "left",
            Leaving::Timeout => "timeout",
            Leaving::Replaced => "replaced",
            Leaving::Kicked { reason, .. } => reason,
            Leaving::RoomClosed => "room-closed",
            Leaving::Evicted => "evicted",
        }
    }
}

/// What `tick` did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Tick {
    /// Dropped peers whose window closed.
    pub expired: usize,
    /// Creators of the rooms that closed (to release their quota).
    pub closed: Vec<String>,
    /// Ids of the rooms that closed.
    pub closed_rooms: Vec<String>,
    /// Ids of the rooms, still open, that lost a seat whose window closed (once each), so
    /// that a cluster owner rewrites their mirror.
    pub shrunk_rooms: Vec<String>,
}

/// The rooms of one shard. The shell routes each room to one shard by its id, and runs every
/// operation of a shard under one serialization, so a recipient's frames are produced (and
/// delivered) in `seq` order.
#[derive(Debug)]
pub struct Hub {
    pub(super) limits: Limits,
    pub(super) rooms: HashMap<String, Room>,
    /// conn → (room, peer id)
    pub(super) seats: HashMap<ConnId, (String, String)>,
    /// resume token → (room, peer id)
    pub(super) tokens: HashMap<String, (String, String)>,
    pub(super) timers: Timers,
    pub(super) peers: usize,
    pub(super) order: u64,
    /// Frames evicted from resume buffers by a byte or frame bound.
    evicted: u64,
    /// Record room and peer events for webhooks (the shell drains them after each operation).
    hooks_on: bool,
    hooks: Vec<Hook>,
}

/// Which peer event a webhook reports.
#[derive(Clone, Copy)]
pub(super) enum PeerHook<'a> {
    Joined,
    Reconnecting,
    Resumed,
    Left(&'a str),
}

impl Hub {
    /// An empty hub.
    pub fn new(limits: Limits) -> Hub {
        Hub {
            limits,
            rooms: HashMap::new(),
            seats: HashMap::new(),
            tokens: HashMap::new(),
            timers: Timers::default(),
            peers: 0,
            order: 0,
            evicted: 0,
            hooks_on: false,
            hooks: Vec::new(),
        }
    }

    /// Record webhook events from now on.
    pub fn enable_hooks(&mut self) {
        self.hooks_on = true;
    }

    /// The webhook events of the operations since the last call, in order.
    pub fn take_hooks(&mut self) -> Vec<Hook> {
        std::mem::take(&mut self.hooks)
    }

    pub(super) fn hook(&mut self, make: impl FnOnce() -> Hook) {
        if self.hooks_on {
            self.hooks.push(make());
        }
    }

    pub(super) fn peer_hook(&mut self, room: &str, peer: &str, user: &str, kind: PeerHook<'_>) {
        self.hook(|| {
            let (room, peer, user) = (room.to_string(), peer.to_string(), user.to_string());
            match kind {
                PeerHook::Joined => Hook::PeerJoined { room, peer, user },
                PeerHook::Reconnecting => Hook::PeerReconnecting { room, peer, user },
                PeerHook::Resumed => Hook::PeerResumed { room, peer, user },
                PeerHook::Left(reason) => Hook::PeerLeft {
                    room,
                    peer,
                    user,
                    reason: reason.to_string(),
                },
            }
        });
    }

    /// Open rooms.
    pub fn room_count(&self) -> usize {
        self.rooms.len()
    }

    /// Peers in rooms, connected or within their resume window.
    pub fn peer_count(&self) -> usize {
        self.peers
    }

    /// Frames evicted from resume buffers so far.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Whether a connection holds a seat.
    pub fn is_seated(&self, conn: ConnId) -> bool {
        self.seats.contains_key(&conn)
    }

    /// Whether room `id` is open here.
    pub fn has_room(&self, id: &str) -> bool {
        self.rooms.contains_key(id)
    }

    /// When `tick` next has work: the head of the deadline queue.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.timers.0.first().map(|(t, _)| *t)
    }

    /// An empty room stays open for its grace from `now`.
    pub(super) fn close_when_idle(&mut self, now: Instant, room_id: &str) {
        let close_at = now + self.limits.empty_room_grace;
        if let Some(room) = self.rooms.get_mut(room_id) {
            room.close_at = Some(close_at);
            self.timers.arm_close(close_at, room_id);
        }
    }

    /// `create`: open room `id` (a validated client name or `new_room_id()`); the caller has
    /// already reserved it in the `RoomQuota` for `creator`.
    pub fn create(
        &mut self,
        now: Instant,
        creator: &str,
        id: &str,
        capacity: Option<u64>,
    ) -> Result<(String, usize), RoomError> {
        if !valid_name(id) {
            return Err(RoomError::BadRequest(
                "room names are 1 to 64 of A-Z a-z 0-9 - _ .".into(),
            ));
        }
        if self.rooms.contains_key(id) {
            return Err(RoomError::RoomExists);
        }
        let max = self.limits.room_capacity;
        let capacity = match capacity {
            None => max,
            Some(c) if (2..=max as u64).contains(&c) => c as usize,
            Some(_) => {
                return Err(RoomError::BadRequest(format!(
                    "capacity must be an integer between 2 and {max}"
                )))
            }
        };
        self.rooms.insert(
            id.to_string(),
            Room {
                capacity,
                creator: creator.to_string(),
                peers: Peers::default(),
                close_at: None,
            },
        );
        self.close_when_idle(now, id);
        self.hook(|| Hook::RoomCreated { room: id.into() });
        Ok((id.to_string(), capacity))
    }

    /// Stamp an event with the recipient's next sequence number, keep it for replay within
    /// the byte and frame bounds, and send it if the recipient is connected.
    fn deliver(
        limits: &Limits,
        evicted: &mut u64,
        peer: &mut Peer,
        event: &Event,
        out: &mut Vec<Action>,
    ) {
        let seq = peer.replay.push(limits, evicted, event);
        if let Some(c) = peer.conn {
            out.push(Action::Send(
                c,
                Frame::Event {
                    seq,
                    event: event.clone(),
                },
            ));
        }
    }

    /// Deliver one event to every peer of `room` except `except`.
    pub(super) fn broadcast(
        &mut self,
        room_id: &str,
        except: &str,
        event: &Event,
        out: &mut Vec<Action>,
    ) {
        let Some(room) = self.rooms.get_mut(room_id) else {
            return;
        };
        for (id, p) in room.peers.iter_mut() {
            if id != except {
                Self::deliver(&self.limits, &mut self.evicted, p, event, out);
            }
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
                    "state": p.state(),
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
        if let Some(close_at) = room.close_at.take() {
            self.timers.disarm_close(close_at, room_id);
        }
        if let Some(old_id) = old {
            // The newcomer takes the seat at once: an emptied room starts no grace.
            self.remove_peer(room_id, &old_id, Leaving::Replaced, out);
        }
        self.order += 1;
        let peer_id = random_id(6);
        let token = format!("{room_id}.{}", random_id(18));
        let joined_ev = Event::from_value(
            "peer-joined",
            &json!({
                "type": "peer-joined",
                "peerId": peer_id,
                "userId": member.user,
                // Existing peers joined earlier: impolite towards the newcomer.
                "polite": false,
            }),
        );
        self.broadcast(room_id, "", &joined_ev, out);
        let room = self.rooms.get_mut(room_id).ok_or(RoomError::UnknownRoom)?;
        room.peers.insert(
            peer_id.clone(),
            Peer {
                user: member.user.clone(),
                conn: Some(conn),
                joined_order: self.order,
                replay: Replay::new(),
                deadline: None,
                resume_token: token.clone(),
            },
        );
        self.peers += 1;
        let roster = Self::roster(room, &peer_id);
        self.seats
            .insert(conn, (room_id.to_string(), peer_id.clone()));
        self.tokens
            .insert(token.clone(), (room_id.to_string(), peer_id.clone()));
        self.peer_hook(room_id, &peer_id, &member.user, PeerHook::Joined);
        Ok(json!({
            "type": "joined",
            "room": room_id,
            "peerId": peer_id,
            "resumeToken": token,
            "peers": roster,
            "seq": 0,
        }))
    }

    /// `leave`: give up the seat; others see `peer-left`.
    pub fn leave(
        &mut self,
        now: Instant,
        conn: ConnId,
        out: &mut Vec<Action>,
    ) -> Result<(), RoomError> {
        let (room_id, peer_id) = self.seats.remove(&conn).ok_or(RoomError::NotInRoom)?;
        self.leave_room(now, &room_id, &peer_id, Leaving::Left, out);
        Ok(())
    }

    /// `signal`: relay opaque `data` from the sender to one peer or all others. The event is
    /// serialized once and shared by every recipient.
    pub fn signal(
        &mut self,
        conn: ConnId,
        to: Option<&str>,
        data: &RawValue,
        out: &mut Vec<Action>,
    ) -> Result<(), RoomError> {
        let (room_id, from) = self.seats.get(&conn).ok_or(RoomError::NotInRoom)?;
        let room = self.rooms.get_mut(room_id).ok_or(RoomError::NotInRoom)?;
        match to {
            Some(t) if t == from => Err(RoomError::UnknownPeer),
            Some(t) => {
                let p = room.peers.get_mut(t).ok_or(RoomError::UnknownPeer)?;
                let ev = Event::signal(from, data);
                Self::deliver(&self.limits, &mut self.evicted, p, &ev, out);
                Ok(())
            }
            None => {
                let ev = Event::signal(from, data);
                for (id, p) in room.peers.iter_mut() {
                    if id != from {
                        Self::deliver(&self.limits, &mut self.evicted, p, &ev, out);
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
        let user = room.peers.get(&peer_id).map(|p| p.user.clone());
        if let Some(p) = room.peers.get_mut(&peer_id) {
            p.conn = None;
            let d = now + self.limits.resume_grace;
            if let Some(old) = p.deadline.replace(d) {
                self.timers.disarm_resume(old, &room_id, &peer_id);
            }
            self.timers.arm_resume(d, &room_id, &peer_id);
        }
        if let Some(u) = user {
            self.peer_hook(&room_id, &peer_id, &u, PeerHook::Reconnecting);
        }
        let ev = Event::from_value(
            "peer-reconnecting",
            &json!({"type": "peer-reconnecting", "peerId": peer_id}),
        );
        self.broadcast(&room_id, &peer_id, &ev, out);
    }

    /// `resume`: a dropped peer takes its seat back and gets every frame after `last_seq`.
    /// `reply` builds the `resumed` frame text (the shell adds the request `id` there).
    pub fn resume(
        &mut self,
        conn: ConnId,
        member: &Member,
        token: &str,
        last_seq: u64,
        reply: impl FnOnce(Value) -> String,
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
            return Err(RoomError::ResumeOtherUser);
        }
        // A live connection for this seat (half-open socket) is taken over: the seat stays.
        if let Some(old) = me.conn.take() {
            self.seats.remove(&old);
            out.push(Action::Close(old, CloseReason::Replaced));
        }
        me.conn = Some(conn);
        if let Some(d) = me.deadline.take() {
            self.timers.disarm_resume(d, &room_id, &peer_id);
        }
        let (missed, complete) = me.replay.resume_after(last_seq);
        let roster = Self::roster(room, &peer_id);
        let resumed = reply(json!({
            "type": "resumed",
            "room": room_id,
            "peerId": peer_id,
            "peers": roster,
            "replayed": missed.len(),
            "complete": complete,
        }));
        out.push(Action::Send(
            conn,
            Frame::Text {
                kind: "resumed",
                text: resumed.into(),
            },
        ));
        for f in missed {
            out.push(Action::Send(conn, f));
        }
        self.peer_hook(&room_id, &peer_id, &member.user, PeerHook::Resumed);
        let ev = Event::from_value(
            "peer-resumed",
            &json!({"type": "peer-resumed", "peerId": peer_id}),
        );
        self.broadcast(&room_id, &peer_id, &ev, out);
        self.seats.insert(conn, (room_id, peer_id));
        Ok(())
    }

    /// Run every deadline due at `now`: close resume windows (`peer-left timeout`) and rooms
    /// empty past their grace. Only due entries of the queue are touched.
    pub fn tick(&mut self, now: Instant, out: &mut Vec<Action>) -> Tick {
        let mut done = Tick::default();
        while let Some((at, _)) = self.timers.0.first() {
            if *at > now {
                break;
            }
            let Some((_, timer)) = self.timers.0.pop_first() else {
                break;
            };
            match timer {
                Timer::Resume { room, peer } => {
                    let Some(p) = self
                        .rooms
                        .get_mut(&room)
                        .and_then(|r| r.peers.get_mut(&peer))
                        .filter(|p| p.conn.is_none() && p.deadline.is_some())
                    else {
                        continue;
                    };
                    // Popped already: nothing left to disarm.
                    p.deadline = None;
                    done.expired += 1;
                    self.leave_room(now, &room, &peer, Leaving::Timeout, out);
                    if !done.shrunk_rooms.contains(&room) {
                        done.shrunk_rooms.push(room);
                    }
                }
                Timer::Close { room } => {
                    if self.rooms.get(&room).is_some_and(|r| r.peers.is_empty()) {
                        if let Some(r) = self.rooms.remove(&room) {
                            done.closed.push(r.creator);
                            done.closed_rooms.push(room.clone());
                            self.hook(|| Hook::RoomClosed {
                                room,
                                reason: "empty".into(),
                            });
                        }
                    }
                }
            }
        }
        done
    }
}
