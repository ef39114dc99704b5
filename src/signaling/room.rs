//! The sans-IO room state: rooms, peers, perfect-negotiation roles, per-peer sequence numbers,
//! resume buffers and a deadline queue. Requests and `now` go in; frames addressed to
//! connections come out, already serialized once and shared by every recipient.

use serde_json::value::RawValue;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A WebSocket connection, as the shell numbers them.
pub type ConnId = u64;

/// A room event serialized once and shared by every recipient and buffer that holds it.
///
/// The text is a JSON object without its closing brace, so that each recipient's own `seq` is
/// appended when the frame is written: `{"type":"signal","from":"…","data":…`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    kind: &'static str,
    body: Arc<str>,
}

impl Event {
    /// Serialize a server-built event object (rare events: joins, leaves, reconnects).
    fn from_value(kind: &'static str, v: &Value) -> Event {
        let mut s = v.to_string();
        // `v` is always an object built by this module, so the last byte is `}`.
        s.pop();
        Event {
            kind,
            body: s.into(),
        }
    }

    /// The relayed `signal`: `data` is copied byte for byte, never re-encoded.
    fn signal(from: &str, data: &RawValue) -> Event {
        let from = Value::from(from).to_string();
        let mut s = String::with_capacity(34 + from.len() + data.get().len());
        s.push_str("{\"type\":\"signal\",\"from\":");
        s.push_str(&from);
        s.push_str(",\"data\":");
        s.push_str(data.get());
        Event {
            kind: "signal",
            body: s.into(),
        }
    }

    /// The frame `type`, for metrics.
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// Bytes this event occupies in a buffer (shared, so counted once per holder at most).
    pub fn len(&self) -> usize {
        self.body.len()
    }

    /// Whether the serialized body is empty (never, for a built event).
    pub fn is_empty(&self) -> bool {
        self.body.is_empty()
    }

    /// The text one recipient gets: the shared body with its `seq` appended.
    pub fn render(&self, seq: u64) -> String {
        let mut s = String::with_capacity(self.body.len() + 28);
        s.push_str(&self.body);
        s.push_str(",\"seq\":");
        s.push_str(itoa(seq).as_str());
        s.push('}');
        s
    }
}

fn itoa(n: u64) -> String {
    n.to_string()
}

/// One frame for one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A room event with the recipient's sequence number.
    Event {
        /// Per-recipient sequence number.
        seq: u64,
        /// The shared serialized event.
        event: Event,
    },
    /// A complete frame addressed to one connection (the `resumed` reply).
    Text {
        /// The frame `type`, for metrics.
        kind: &'static str,
        /// The whole JSON text.
        text: Arc<str>,
    },
}

impl Frame {
    /// The frame `type`, for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Frame::Event { event, .. } => event.kind,
            Frame::Text { kind, .. } => kind,
        }
    }

    /// Bytes counted against outbox budgets.
    pub fn len(&self) -> usize {
        match self {
            Frame::Event { event, .. } => event.len() + 24,
            Frame::Text { text, .. } => text.len(),
        }
    }

    /// Whether the frame is empty (never, for a built frame).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The wire text.
    pub fn render(&self) -> String {
        match self {
            Frame::Event { seq, event } => event.render(*seq),
            Frame::Text { text, .. } => text.to_string(),
        }
    }
}

/// Something the shell must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send a frame on a connection.
    Send(ConnId, Frame),
    /// Close a connection after sending what was queued; its seat is gone, so it must not
    /// resume.
    Close(ConnId, CloseReason),
}

/// Why the server ends a connection whose seat is gone; each has its own close code, so a
/// client knows not to resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// A newer connection of the same identity took the seat (4001).
    Replaced,
    /// Removed through the server API, or its user was revoked (4005).
    Kicked,
    /// Its room was closed through the server API (4006).
    RoomClosed,
}

impl CloseReason {
    /// WebSocket close code.
    pub fn code(self) -> u16 {
        match self {
            CloseReason::Replaced => 4001,
            CloseReason::Kicked => 4005,
            CloseReason::RoomClosed => 4006,
        }
    }

    /// The reason a close code stands for (across the cluster bus).
    pub fn from_code(code: u16) -> Option<CloseReason> {
        [
            CloseReason::Replaced,
            CloseReason::Kicked,
            CloseReason::RoomClosed,
        ]
        .into_iter()
        .find(|r| r.code() == code)
    }

    /// Close frame reason text.
    pub fn text(self) -> &'static str {
        match self {
            CloseReason::Replaced => "replaced",
            CloseReason::Kicked => "kicked",
            CloseReason::RoomClosed => "room closed",
        }
    }
}

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

/// A byte budget shared by many buffers, so that their total stays bounded.
#[derive(Debug, Default)]
pub struct Budget {
    used: AtomicUsize,
    max: usize,
}

impl Budget {
    /// A budget of `max` bytes.
    pub fn new(max: usize) -> Budget {
        Budget {
            used: AtomicUsize::new(0),
            max,
        }
    }

    /// Take `n` bytes; `false` (and nothing taken) when that would pass the maximum.
    pub fn try_take(&self, n: usize) -> bool {
        let prev = self.used.fetch_add(n, Ordering::Relaxed);
        if prev.saturating_add(n) > self.max {
            self.used.fetch_sub(n, Ordering::Relaxed);
            false
        } else {
            true
        }
    }

    /// Take `n` bytes even past the maximum (the caller evicts until back under it).
    pub fn take(&self, n: usize) {
        self.used.fetch_add(n, Ordering::Relaxed);
    }

    /// Return `n` bytes.
    pub fn give(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::Relaxed);
    }

    /// Whether the budget is overdrawn.
    pub fn over(&self) -> bool {
        self.used.load(Ordering::Relaxed) > self.max
    }

    /// Bytes in use.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

/// Limits and timers of the room core.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Peers per room unless `create` asks for fewer.
    pub room_capacity: usize,
    /// How long a dropped peer may resume.
    pub resume_grace: Duration,
    /// Frames kept per peer for replay.
    pub resume_buffer_frames: usize,
    /// Bytes kept per peer for replay.
    pub resume_buffer_bytes: usize,
    /// All resume buffers of the node together (shared by every shard).
    pub resume_total: Arc<Budget>,
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

/// Rooms open on the node, in total and per creating user: a stranger cannot fill the node.
#[derive(Debug)]
pub struct RoomQuota {
    max_rooms: usize,
    max_per_user: usize,
    open: usize,
    per_user: HashMap<String, usize>,
}

impl RoomQuota {
    /// A quota of `max_rooms` open rooms, at most `max_per_user` created by one user.
    pub fn new(max_rooms: usize, max_per_user: usize) -> RoomQuota {
        RoomQuota {
            max_rooms,
            max_per_user,
            open: 0,
            per_user: HashMap::new(),
        }
    }

    /// Reserve a room for `user`.
    pub fn take(&mut self, user: &str) -> Result<(), RoomError> {
        if self.open >= self.max_rooms {
            return Err(RoomError::TooManyRooms);
        }
        let n = self.per_user.get(user).copied().unwrap_or(0);
        if n >= self.max_per_user {
            return Err(RoomError::TooManyRoomsForUser);
        }
        self.per_user.insert(user.to_string(), n + 1);
        self.open += 1;
        Ok(())
    }

    /// A room of `user` closed (or its creation failed).
    pub fn release(&mut self, user: &str) {
        self.open = self.open.saturating_sub(1);
        if let Some(n) = self.per_user.get_mut(user) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_user.remove(user);
            }
        }
    }

    /// Rooms reserved.
    pub fn open(&self) -> usize {
        self.open
    }
}

#[derive(Debug)]
struct Peer {
    user: String,
    conn: Option<ConnId>,
    joined_order: u64,
    /// Next sequence number to stamp.
    next_seq: u64,
    /// Recent frames for replay: (seq, shared event).
    buffer: VecDeque<(u64, Event)>,
    buffer_bytes: usize,
    /// When the resume window closes, while disconnected.
    deadline: Option<Instant>,
    resume_token: String,
    /// Adopted from another node's mirror: the client's `lastSeq` at resume sets the numbering
    /// (frames buffered meanwhile are renumbered after it).
    seq_unknown: bool,
}

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

#[derive(Debug)]
struct Room {
    capacity: usize,
    creator: String,
    peers: BTreeMap<String, Peer>,
    /// When the room closes, while empty.
    close_at: Option<Instant>,
}

/// What a deadline in the queue is for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    /// A dropped peer's resume window.
    Resume { room: String, peer: String },
    /// An empty room's grace.
    Close { room: String },
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
    limits: Limits,
    rooms: HashMap<String, Room>,
    /// conn → (room, peer id)
    seats: HashMap<ConnId, (String, String)>,
    /// resume token → (room, peer id)
    tokens: HashMap<String, (String, String)>,
    /// Every pending deadline, soonest first: no operation scans the rooms.
    timers: BTreeSet<(Instant, Timer)>,
    peers: usize,
    order: u64,
    /// Frames evicted from resume buffers by a byte or frame bound.
    evicted: u64,
    /// Record room and peer events for webhooks (the shell drains them after each operation).
    hooks_on: bool,
    hooks: Vec<Hook>,
}

/// A room or peer event for webhooks.
pub type Hook = crate::webhooks::Event;

fn random_id(bytes: usize) -> String {
    use base64::Engine;
    let v: Vec<u8> = (0..bytes).map(|_| rand::random::<u8>()).collect();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v)
}

/// A complete frame for one connection, outside the room's sequence (it will not resume).
fn direct(kind: &'static str, v: &Value) -> Frame {
    Frame::Text {
        kind,
        text: v.to_string().into(),
    }
}

#[derive(Clone, Copy)]
enum PeerHook<'a> {
    Joined,
    Reconnecting,
    Resumed,
    Left(&'a str),
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

impl Hub {
    /// An empty hub.
    pub fn new(limits: Limits) -> Hub {
        Hub {
            limits,
            rooms: HashMap::new(),
            seats: HashMap::new(),
            tokens: HashMap::new(),
            timers: BTreeSet::new(),
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

    fn hook(&mut self, make: impl FnOnce() -> Hook) {
        if self.hooks_on {
            self.hooks.push(make());
        }
    }

    fn peer_hook(&mut self, room: &str, peer: &str, user: &str, kind: PeerHook<'_>) {
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
                    state: if p.conn.is_some() {
                        "connected"
                    } else {
                        "reconnecting"
                    },
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
        let p = room.peers.get(peer_id).ok_or(RoomError::UnknownPeer)?;
        if let Some(c) = p.conn {
            self.seats.remove(&c);
            out.push(Action::Send(
                c,
                direct(
                    "error",
                    &json!({"type": "error", "code": code, "message": format!("removed from the room ({reason})")}),
                ),
            ));
            out.push(Action::Close(c, CloseReason::Kicked));
        }
        self.remove_peer(now, room_id, peer_id, reason, out);
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
            self.timers.remove(&(
                at,
                Timer::Close {
                    room: room_id.into(),
                },
            ));
        }
        let mut peers: Vec<(String, Peer)> = std::mem::take(&mut room.peers).into_iter().collect();
        peers.sort_by_key(|(_, p)| p.joined_order);
        let n = peers.len();
        for (pid, mut p) in peers {
            Self::forget_seat(
                &self.limits,
                &mut self.tokens,
                &mut self.timers,
                &mut self.peers,
                room_id,
                &pid,
                &mut p,
            );
            if let Some(c) = p.conn {
                self.seats.remove(&c);
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
            self.peer_hook(room_id, &pid, &p.user, PeerHook::Left("room-closed"));
        }
        self.hook(|| Hook::RoomClosed {
            room: room_id.to_string(),
            reason: "closed".into(),
        });
        Ok((n, room.creator))
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
        let close_at = now + self.limits.empty_room_grace;
        self.timers
            .insert((close_at, Timer::Close { room: id.into() }));
        self.rooms.insert(
            id.to_string(),
            Room {
                capacity,
                creator: creator.to_string(),
                peers: BTreeMap::new(),
                close_at: Some(close_at),
            },
        );
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
        let seq = peer.next_seq;
        peer.next_seq += 1;
        let n = event.len();
        limits.resume_total.take(n);
        peer.buffer_bytes += n;
        peer.buffer.push_back((seq, event.clone()));
        while peer.buffer.len() > 1
            && (peer.buffer.len() > limits.resume_buffer_frames
                || peer.buffer_bytes > limits.resume_buffer_bytes
                || limits.resume_total.over())
        {
            if let Some((_, old)) = peer.buffer.pop_front() {
                peer.buffer_bytes -= old.len();
                limits.resume_total.give(old.len());
                *evicted += 1;
            }
        }
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
    fn broadcast(&mut self, room_id: &str, except: &str, event: &Event, out: &mut Vec<Action>) {
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
                    "state": if p.conn.is_some() { "connected" } else { "reconnecting" },
                })
            })
            .collect()
    }

    /// The bookkeeping of a seat that leaves the room for good: the node's peer count, its
    /// resume token, its replay buffer and its resume deadline. Takes the fields it touches
    /// rather than `&mut self`, so callers may hold a room borrowed from `self.rooms`.
    fn forget_seat(
        limits: &Limits,
        tokens: &mut HashMap<String, (String, String)>,
        timers: &mut BTreeSet<(Instant, Timer)>,
        peers: &mut usize,
        room_id: &str,
        peer_id: &str,
        p: &mut Peer,
    ) {
        *peers -= 1;
        tokens.remove(&p.resume_token);
        Self::drop_buffer(limits, p);
        if let Some(d) = p.deadline {
            timers.remove(&(
                d,
                Timer::Resume {
                    room: room_id.into(),
                    peer: peer_id.into(),
                },
            ));
        }
    }

    fn drop_buffer(limits: &Limits, p: &mut Peer) {
        limits.resume_total.give(p.buffer_bytes);
        p.buffer_bytes = 0;
        p.buffer.clear();
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
            self.timers.remove(&(
                close_at,
                Timer::Close {
                    room: room_id.into(),
                },
            ));
        }
        if let Some(old_id) = old {
            if let Some(mut p) = room.peers.remove(&old_id) {
                Self::forget_seat(
                    &self.limits,
                    &mut self.tokens,
                    &mut self.timers,
                    &mut self.peers,
                    room_id,
                    &old_id,
                    &mut p,
                );
                if let Some(c) = p.conn {
                    self.seats.remove(&c);
                    let ev = Event::from_value(
                        "peer-left",
                        &json!({"type": "peer-left", "peerId": old_id, "reason": "replaced"}),
                    );
                    out.push(Action::Send(
                        c,
                        Frame::Event {
                            seq: p.next_seq,
                            event: ev,
                        },
                    ));
                    out.push(Action::Close(c, CloseReason::Replaced));
                }
                let user = p.user.clone();
                self.peer_hook(room_id, &old_id, &user, PeerHook::Left("replaced"));
            }
            let ev = Event::from_value(
                "peer-left",
                &json!({"type": "peer-left", "peerId": old_id, "reason": "replaced"}),
            );
            self.broadcast(room_id, "", &ev, out);
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
                next_seq: 1,
                buffer: VecDeque::new(),
                buffer_bytes: 0,
                deadline: None,
                resume_token: token.clone(),
                seq_unknown: false,
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
        let Some(mut p) = room.peers.remove(peer_id) else {
            return;
        };
        let user = std::mem::take(&mut p.user);
        Self::forget_seat(
            &self.limits,
            &mut self.tokens,
            &mut self.timers,
            &mut self.peers,
            room_id,
            peer_id,
            &mut p,
        );
        if room.peers.is_empty() {
            let close_at = now + self.limits.empty_room_grace;
            room.close_at = Some(close_at);
            self.timers.insert((
                close_at,
                Timer::Close {
                    room: room_id.into(),
                },
            ));
            self.peer_hook(room_id, peer_id, &user, PeerHook::Left(reason));
            return;
        }
        self.peer_hook(room_id, peer_id, &user, PeerHook::Left(reason));
        let ev = Event::from_value(
            "peer-left",
            &json!({"type": "peer-left", "peerId": peer_id, "reason": reason}),
        );
        self.broadcast(room_id, "", &ev, out);
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
                self.timers.remove(&(
                    old,
                    Timer::Resume {
                        room: room_id.clone(),
                        peer: peer_id.clone(),
                    },
                ));
            }
            self.timers.insert((
                d,
                Timer::Resume {
                    room: room_id.clone(),
                    peer: peer_id.clone(),
                },
            ));
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
        // A live connection for this seat (half-open socket) is taken over.
        if let Some(old) = me.conn.take() {
            self.seats.remove(&old);
            out.push(Action::Close(old, CloseReason::Replaced));
        }
        me.conn = Some(conn);
        if let Some(d) = me.deadline.take() {
            self.timers.remove(&(
                d,
                Timer::Resume {
                    room: room_id.clone(),
                    peer: peer_id.clone(),
                },
            ));
        }
        let adopted = std::mem::take(&mut me.seq_unknown);
        if adopted {
            // Frames the previous owner sent after `last_seq` are lost; what this node buffered
            // since it took the room over follows the client's numbering.
            let mut seq = last_seq;
            for (s, _) in me.buffer.iter_mut() {
                seq += 1;
                *s = seq;
            }
            me.next_seq = seq + 1;
        }
        let missed: Vec<Frame> = me
            .buffer
            .iter()
            .filter(|(s, _)| *s > last_seq)
            .map(|(seq, event)| Frame::Event {
                seq: *seq,
                event: event.clone(),
            })
            .collect();
        let first_kept = me.buffer.front().map(|(s, _)| *s).unwrap_or(me.next_seq);
        let complete = !adopted && last_seq + 1 >= first_kept;
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
        while let Some((at, _)) = self.timers.first() {
            if *at > now {
                break;
            }
            let Some((_, timer)) = self.timers.pop_first() else {
                break;
            };
            match timer {
                Timer::Resume { room, peer } => {
                    let due = self
                        .rooms
                        .get(&room)
                        .and_then(|r| r.peers.get(&peer))
                        .is_some_and(|p| p.conn.is_none() && p.deadline.is_some());
                    if due {
                        if let Some(p) = self
                            .rooms
                            .get_mut(&room)
                            .and_then(|r| r.peers.get_mut(&peer))
                        {
                            p.deadline = None;
                        }
                        done.expired += 1;
                        self.remove_peer(now, &room, &peer, "timeout", out);
                        if !done.shrunk_rooms.contains(&room) {
                            done.shrunk_rooms.push(room);
                        }
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

    /// Whether room `id` is open here.
    pub fn has_room(&self, id: &str) -> bool {
        self.rooms.contains_key(id)
    }

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
        let mut peers = BTreeMap::new();
        for s in &state.peers {
            self.order = self.order.max(s.order);
            peers.insert(
                s.peer.clone(),
                Peer {
                    user: s.user.clone(),
                    conn: None,
                    joined_order: s.order,
                    next_seq: 1,
                    buffer: VecDeque::new(),
                    buffer_bytes: 0,
                    deadline: Some(deadline),
                    resume_token: s.token.clone(),
                    seq_unknown: true,
                },
            );
            self.tokens
                .insert(s.token.clone(), (state.room.clone(), s.peer.clone()));
            self.timers.insert((
                deadline,
                Timer::Resume {
                    room: state.room.clone(),
                    peer: s.peer.clone(),
                },
            ));
            self.peers += 1;
        }
        let close_at = peers.is_empty().then(|| now + self.limits.empty_room_grace);
        if let Some(c) = close_at {
            self.timers.insert((
                c,
                Timer::Close {
                    room: state.room.clone(),
                },
            ));
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
            self.timers.remove(&(c, Timer::Close { room: id.into() }));
        }
        let mut conns = Vec::new();
        for (pid, mut p) in room.peers {
            Self::forget_seat(
                &self.limits,
                &mut self.tokens,
                &mut self.timers,
                &mut self.peers,
                id,
                &pid,
                &mut p,
            );
            if let Some(c) = p.conn {
                self.seats.remove(&c);
                conns.push(c);
            }
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

    /// When `tick` next has work: the head of the deadline queue.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.timers.first().map(|(t, _)| *t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(frames: usize, bytes: usize, total: usize) -> Limits {
        Limits {
            room_capacity: 3,
            resume_grace: Duration::from_secs(10),
            resume_buffer_frames: frames,
            resume_buffer_bytes: bytes,
            resume_total: Arc::new(Budget::new(total)),
            empty_room_grace: Duration::from_secs(5),
        }
    }

    fn hub() -> Hub {
        Hub::new(limits(4, 1 << 20, 1 << 30))
    }

    fn m(u: &str) -> Member {
        Member {
            user: u.into(),
            room_limit: None,
        }
    }

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_string()).unwrap()
    }

    fn sent_to(out: &[Action], c: ConnId) -> Vec<Value> {
        out.iter()
            .filter_map(|a| match a {
                Action::Send(x, f) if *x == c => Some(serde_json::from_str(&f.render()).unwrap()),
                _ => None,
            })
            .collect()
    }

    fn plain(v: Value) -> String {
        v.to_string()
    }

    #[test]
    fn hooks_follow_the_room_and_kick_and_close_end_seats_for_good() {
        let mut h = hub();
        h.enable_hooks();
        let t = Instant::now();
        let mut out = Vec::new();
        h.create(t, "a", "r", None).unwrap();
        let ja = h.join(1, &m("a"), "r", &mut out).unwrap();
        let jb = h.join(2, &m("b"), "r", &mut out).unwrap();
        let (pa, pb) = (
            ja["peerId"].as_str().unwrap().to_string(),
            jb["peerId"].as_str().unwrap().to_string(),
        );
        h.disconnect(t, 2, &mut out);
        let token = jb["resumeToken"].as_str().unwrap();
        h.resume(3, &m("b"), token, 0, plain, &mut out).unwrap();
        out.clear();
        h.kick(t, "r", &pb, "kicked", "kicked", &mut out).unwrap();
        assert!(out.contains(&Action::Close(3, CloseReason::Kicked)));
        assert_eq!(sent_to(&out, 3)[0]["code"], "kicked");
        let to_a = sent_to(&out, 1);
        assert_eq!(
            (to_a[0]["type"].as_str(), to_a[0]["reason"].as_str()),
            (Some("peer-left"), Some("kicked"))
        );
        assert_eq!(
            h.resume(4, &m("b"), token, 0, plain, &mut out),
            Err(RoomError::BadResume),
            "a kicked peer cannot resume"
        );
        assert_eq!(
            h.kick(t, "r", &pb, "kicked", "kicked", &mut out),
            Err(RoomError::UnknownPeer)
        );
        let info = h.room_info("r").unwrap();
        assert_eq!(info.peers.len(), 1);
        assert_eq!(
            (info.peers[0].user.as_str(), info.peers[0].state),
            ("a", "connected")
        );
        out.clear();
        let (n, creator) = h.close_room("r", &mut out).unwrap();
        assert_eq!((n, creator.as_str()), (1, "a"));
        let to_a = sent_to(&out, 1);
        assert_eq!(to_a[0]["code"], "room_closed");
        assert_eq!(to_a[1]["type"], "room-closed");
        assert!(out.contains(&Action::Close(1, CloseReason::RoomClosed)));
        assert_eq!(h.room_count(), 0);
        assert_eq!(h.peer_count(), 0);
        assert_eq!(h.next_deadline(), None, "no timer left behind");
        assert_eq!(h.close_room("r", &mut out), Err(RoomError::UnknownRoom));
        // A room that empties and runs out its grace closes with reason `empty`.
        h.create(t, "a", "e", None).unwrap();
        h.tick(t + Duration::from_secs(6), &mut out);
        let kinds: Vec<(String, Option<String>, Option<String>)> = h
            .take_hooks()
            .into_iter()
            .map(|e| {
                let v = serde_json::to_value(&e).unwrap();
                (
                    v["type"].as_str().unwrap().to_string(),
                    v["peer"].as_str().map(str::to_string),
                    v["reason"].as_str().map(str::to_string),
                )
            })
            .collect();
        let k = |t: &str, p: Option<&str>, r: Option<&str>| {
            (t.to_string(), p.map(str::to_string), r.map(str::to_string))
        };
        assert_eq!(
            kinds,
            vec![
                k("room.created", None, None),
                k("peer.joined", Some(&pa), None),
                k("peer.joined", Some(&pb), None),
                k("peer.reconnecting", Some(&pb), None),
                k("peer.resumed", Some(&pb), None),
                k("peer.left", Some(&pb), Some("kicked")),
                k("peer.left", Some(&pa), Some("room-closed")),
                k("room.closed", None, Some("closed")),
                k("room.created", None, None),
                k("room.closed", None, Some("empty")),
            ]
        );
        assert!(h.take_hooks().is_empty());
    }

    #[test]
    fn hooks_are_not_recorded_unless_enabled() {
        let mut h = hub();
        let mut out = Vec::new();
        h.create(Instant::now(), "a", "r", None).unwrap();
        h.join(1, &m("a"), "r", &mut out).unwrap();
        assert!(h.take_hooks().is_empty());
    }

    #[test]
    fn join_assigns_exactly_one_polite_side_and_announces() {
        let mut h = hub();
        let t = Instant::now();
        let (room, _) = h.create(t, "a", "r1", None).unwrap();
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
        assert_eq!(token_room(b["resumeToken"].as_str().unwrap()), Some("r1"));
    }

    #[test]
    fn signal_data_is_relayed_byte_for_byte_and_shared() {
        let mut h = hub();
        let t = Instant::now();
        let (room, _) = h.create(t, "a", &new_room_id(), None).unwrap();
        let mut out = Vec::new();
        h.join(1, &m("a"), &room, &mut out).unwrap();
        h.join(2, &m("b"), &room, &mut out).unwrap();
        h.join(3, &m("c"), &room, &mut out).unwrap();
        out.clear();
        let data = r#"{"z":123456789012345678901234567890,"a":1e-400,"m":0.10000000000000000001}"#;
        h.signal(1, None, &raw(data), &mut out).unwrap();
        let frames: Vec<&Frame> = out
            .iter()
            .filter_map(|a| match a {
                Action::Send(_, f) => Some(f),
                _ => None,
            })
            .collect();
        assert_eq!(frames.len(), 2);
        for f in &frames {
            let text = f.render();
            assert!(text.contains(&format!("\"data\":{data}")), "{text}");
        }
        // One serialization shared by both recipients.
        match (frames[0], frames[1]) {
            (Frame::Event { event: e1, .. }, Frame::Event { event: e2, .. }) => {
                assert!(Arc::ptr_eq(&e1.body, &e2.body))
            }
            _ => panic!("events expected"),
        }
    }

    #[test]
    fn signal_preserves_order_and_checks_target() {
        let mut h = hub();
        let t = Instant::now();
        let (room, _) = h.create(t, "a", "r", None).unwrap();
        let mut out = Vec::new();
        let a = h.join(1, &m("a"), &room, &mut out).unwrap();
        let b = h.join(2, &m("b"), &room, &mut out).unwrap();
        out.clear();
        let bid = b["peerId"].as_str().unwrap();
        for i in 0..3 {
            h.signal(1, Some(bid), &raw(&format!("{{\"n\":{i}}}")), &mut out)
                .unwrap();
        }
        let got = sent_to(&out, 2);
        assert_eq!(got.len(), 3);
        for (i, f) in got.iter().enumerate() {
            assert_eq!(f["from"], a["peerId"]);
            assert_eq!(f["data"]["n"], i);
        }
        assert!(sent_to(&out, 1).is_empty());
        assert_eq!(
            h.signal(1, Some("nobody"), &raw("1"), &mut out),
            Err(RoomError::UnknownPeer)
        );
        assert_eq!(
            h.signal(9, None, &raw("1"), &mut out),
            Err(RoomError::NotInRoom)
        );
    }

    #[test]
    fn capacity_names_and_quota() {
        let mut h = hub();
        let t = Instant::now();
        let (room, cap) = h.create(t, "a", "x", Some(2)).unwrap();
        assert_eq!(cap, 2);
        assert_eq!(h.create(t, "a", "x", None), Err(RoomError::RoomExists));
        assert!(matches!(
            h.create(t, "a", "bad name!", None),
            Err(RoomError::BadRequest(_))
        ));
        assert!(matches!(
            h.create(t, "a", "y", Some(9)),
            Err(RoomError::BadRequest(_))
        ));
        let mut q = RoomQuota::new(3, 2);
        q.take("a").unwrap();
        q.take("a").unwrap();
        assert_eq!(q.take("a"), Err(RoomError::TooManyRoomsForUser));
        q.take("b").unwrap();
        assert_eq!(q.take("c"), Err(RoomError::TooManyRooms));
        q.release("a");
        q.take("c").unwrap();
        assert_eq!(q.open(), 3);
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
        let (room, _) = h.create(t, "a", "r", None).unwrap();
        let mut out = Vec::new();
        h.join(1, &m("a"), &room, &mut out).unwrap();
        let b = h.join(2, &m("b"), &room, &mut out).unwrap();
        let bid = b["peerId"].as_str().unwrap().to_string();
        out.clear();
        h.disconnect(t, 2, &mut out);
        assert_eq!(sent_to(&out, 1)[0]["type"], "peer-reconnecting");
        h.signal(1, Some(&bid), &raw("\"x1\""), &mut out).unwrap();
        h.signal(1, Some(&bid), &raw("\"x2\""), &mut out).unwrap();
        assert!(
            sent_to(&out, 2).is_empty(),
            "nothing sent to a dropped connection"
        );
        out.clear();
        let tok = b["resumeToken"].as_str().unwrap();
        let e = h
            .resume(5, &m("mallory"), tok, 0, plain, &mut out)
            .unwrap_err();
        assert_eq!(e, RoomError::ResumeOtherUser);
        assert_eq!(e.code(), "bad_resume", "the code stays");
        assert!(e.to_string().contains("another user"), "{e}");
        h.resume(3, &m("b"), tok, 0, plain, &mut out).unwrap();
        let got = sent_to(&out, 3);
        assert_eq!(got[0]["type"], "resumed");
        assert_eq!(got[0]["peerId"], bid.as_str());
        assert_eq!(got[1]["data"], "x1");
        assert_eq!(got[2]["data"], "x2");
        assert!(got[1]["seq"].as_u64() < got[2]["seq"].as_u64());
        assert_eq!(sent_to(&out, 1)[0]["type"], "peer-resumed");
        assert_eq!(h.next_deadline(), None, "the resume window is cancelled");
        out.clear();
        h.signal(1, Some(&bid), &raw("\"x3\""), &mut out).unwrap();
        assert_eq!(sent_to(&out, 3)[0]["data"], "x3");
    }

    #[test]
    fn resume_window_expiry_and_empty_room_grace_run_from_the_queue() {
        let mut h = hub();
        let t = Instant::now();
        let (room, _) = h.create(t, "a", "r", None).unwrap();
        assert_eq!(h.next_deadline(), Some(t + Duration::from_secs(5)));
        let mut out = Vec::new();
        h.join(1, &m("a"), &room, &mut out).unwrap();
        assert_eq!(h.next_deadline(), None, "an occupied room has no timer");
        let b = h.join(2, &m("b"), &room, &mut out).unwrap();
        out.clear();
        h.disconnect(t, 2, &mut out);
        assert_eq!(h.next_deadline(), Some(t + Duration::from_secs(10)));
        h.tick(t + Duration::from_secs(9), &mut out);
        assert_eq!(h.peer_count(), 2);
        out.clear();
        let done = h.tick(t + Duration::from_secs(10), &mut out);
        assert_eq!(done.expired, 1);
        assert_eq!(
            done.shrunk_rooms,
            std::slice::from_ref(&room),
            "its mirror is rewritten"
        );
        let left = sent_to(&out, 1);
        assert_eq!(left[0]["type"], "peer-left");
        assert_eq!(left[0]["reason"], "timeout");
        assert_eq!(h.peer_count(), 1);
        let tok = b["resumeToken"].as_str().unwrap();
        assert_eq!(
            h.resume(3, &m("b"), tok, 0, plain, &mut out),
            Err(RoomError::BadResume)
        );
        let t2 = t + Duration::from_secs(20);
        h.leave(t2, 1, &mut out).unwrap();
        assert_eq!(h.room_count(), 1);
        h.tick(t2 + Duration::from_secs(4), &mut out);
        assert_eq!(h.room_count(), 1);
        let done = h.tick(t2 + Duration::from_secs(5), &mut out);
        assert_eq!(done.closed, vec!["a".to_string()]);
        assert_eq!(h.room_count(), 0);
        assert_eq!(h.next_deadline(), None);
    }

    #[test]
    fn same_identity_replaces_and_buffers_are_bounded_in_frames_and_bytes() {
        let mut h = hub();
        let t = Instant::now();
        let (room, _) = h.create(t, "a", "r", None).unwrap();
        let mut out = Vec::new();
        h.join(1, &m("a"), &room, &mut out).unwrap();
        let b1 = h.join(2, &m("b"), &room, &mut out).unwrap();
        out.clear();
        let b2 = h.join(3, &m("b"), &room, &mut out).unwrap();
        assert_ne!(b1["peerId"], b2["peerId"]);
        assert!(out.contains(&Action::Close(2, CloseReason::Replaced)));
        let to_a = sent_to(&out, 1);
        assert_eq!(to_a[0]["type"], "peer-left");
        assert_eq!(to_a[0]["reason"], "replaced");
        assert_eq!(to_a[1]["type"], "peer-joined");
        assert_eq!(h.peer_count(), 2, "no ghost peer");
        let aid = h.seats[&1].1.clone();
        h.disconnect(t, 1, &mut out);
        for i in 0..10 {
            h.signal(3, Some(&aid), &raw(&i.to_string()), &mut out)
                .unwrap();
        }
        let mut o2 = Vec::new();
        let a_tok = h.rooms[&room].peers[&aid].resume_token.clone();
        h.resume(4, &m("a"), &a_tok, 0, plain, &mut o2).unwrap();
        let got = sent_to(&o2, 4);
        assert_eq!(got[0]["complete"], false);
        assert_eq!(got.len(), 1 + 4, "frame bound");

        // Byte bounds: per peer, and the node-wide total.
        let total = Arc::new(Budget::new(1000));
        let mut h = Hub::new(Limits {
            resume_total: total.clone(),
            ..limits(1000, 400, 0)
        });
        let (room, _) = h.create(t, "a", "r", None).unwrap();
        h.join(1, &m("a"), &room, &mut out).unwrap();
        let b = h.join(2, &m("b"), &room, &mut out).unwrap();
        let bid = b["peerId"].as_str().unwrap().to_string();
        let pad = format!("\"{}\"", "p".repeat(100));
        for _ in 0..20 {
            h.signal(1, Some(&bid), &raw(&pad), &mut out).unwrap();
        }
        let p = &h.rooms[&room].peers[&bid];
        assert!(
            p.buffer_bytes <= 400 && p.buffer.len() == 2,
            "{}",
            p.buffer_bytes
        );
        assert!(total.used() <= 1000);
        assert!(h.evicted() > 0);
        h.leave(t, 2, &mut out).unwrap();
        h.leave(t, 1, &mut out).unwrap();
        assert_eq!(total.used(), 0, "removing a peer returns its bytes");
    }
}
