//! Signaling frames from several connections through the real handler and the hub, with
//! drops, resumes and clock steps between them. Invariants: every recipient's `seq` goes up by
//! exactly one (a resume continues where the client said it was), no frame reaches a
//! connection outside the room it came from, and once everyone is gone and the timers have
//! run, no room, seat, buffered byte or room quota is left behind.
#![no_main]

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use switchboard::server::Shared;
use switchboard::signaling::bus::Outbound;
use switchboard::signaling::conn::harness::{self, Client};
use switchboard::signaling::conn::Signaling;
use switchboard::signaling::room::Frame;
use switchboard::Config;

const SLOTS: usize = 5;
const ROOMS: [&str; 3] = ["r0", "r1", "r2"];
const MAX_ROOMS: usize = 4;

#[derive(Arbitrary, Debug)]
enum Req<'a> {
    Hello {
        user: u8,
        limit: Option<u8>,
    },
    Create {
        room: Option<u8>,
        capacity: Option<u8>,
    },
    Join {
        room: u8,
    },
    Leave,
    Signal {
        to: Option<u8>,
        data: &'a str,
    },
    /// Resume a seat, claiming `back` frames fewer than it saw (as a client that lost some).
    Resume {
        token: u8,
        back: Option<u8>,
    },
    Ping,
    Raw(&'a str),
}

#[derive(Arbitrary, Debug)]
enum Op<'a> {
    Send {
        slot: u8,
        id: Option<u8>,
        req: Req<'a>,
    },
    /// The socket dies (no `leave`).
    Drop { slot: u8 },
    /// The clock moves on and the room timers run.
    Tick { secs: u8 },
}

fn shared() -> &'static Arc<Shared> {
    static S: OnceLock<Arc<Shared>> = OnceLock::new();
    S.get_or_init(|| {
        let cfg = Config::from_toml(&format!(
            "[http]\nlisten = \"127.0.0.1:0\"\n[auth]\nturn_secrets = [\"t\"]\n\
             [signaling]\nhub_shards = 1\nroom_capacity = 3\nresume_grace_secs = 20\n\
             empty_room_grace_secs = 30\nresume_buffer_frames = 4\nmax_rooms = {MAX_ROOMS}\n\
             max_rooms_per_user = 2\nmax_connections_per_ip = 1000\n"
        ))
        .expect("fuzz config");
        Shared::unbound(cfg).expect("shared state")
    })
}

/// What the signaling handler is given, from the same state.
fn deps() -> &'static switchboard::signaling::Deps {
    static D: OnceLock<switchboard::signaling::Deps> = OnceLock::new();
    D.get_or_init(|| switchboard::http::ws::signaling_deps(shared()))
}

/// What the test knows about one live connection.
struct Conn {
    client: Client,
    /// Last `seq` seen, or where a resume said it stood.
    last_seq: Option<u64>,
    /// After a resume with gaps: any `seq` above this may come first.
    floor: u64,
    /// `lastSeq` of the resume in flight.
    resume_from: u64,
}

struct World {
    sig: Signaling,
    slots: Vec<Option<Conn>>,
    tokens: Vec<(String, String)>,
    /// The last `seq` each seat (peer id) was seen to receive, on whichever connection.
    peer_last: HashMap<String, u64>,
    slot_peer: Vec<Option<String>>,
    peer_room: HashMap<String, String>,
    peer_ids: Vec<String>,
    now: Instant,
    ip: u32,
}

impl World {
    fn ip(&mut self) -> IpAddr {
        self.ip += 1;
        IpAddr::from(self.ip.to_be_bytes())
    }

    fn text(&self, id: Option<u8>, req: &Req<'_>) -> String {
        let sh = shared();
        let mut v = match req {
            Req::Hello { user, limit } => {
                let room = limit.map(|l| ROOMS[l as usize % ROOMS.len()]);
                let (t, _) = sh.auth.issue_session(
                    &format!("u{}", user % 4),
                    room,
                    switchboard::auth::unix_now(),
                );
                json!({"type": "hello", "token": t})
            }
            Req::Create { room, capacity } => {
                let mut v = json!({"type": "create"});
                if let Some(r) = room {
                    v["name"] = ROOMS[*r as usize % ROOMS.len()].into();
                }
                if let Some(c) = capacity {
                    v["capacity"] = (*c % 6).into();
                }
                v
            }
            Req::Join { room } => {
                json!({"type": "join", "room": ROOMS[*room as usize % ROOMS.len()]})
            }
            Req::Leave => json!({"type": "leave"}),
            Req::Signal { to, data } => {
                let data: Value = serde_json::from_str(data).unwrap_or_else(|_| (*data).into());
                let mut v = json!({"type": "signal", "data": data});
                if let (Some(t), false) = (to, self.peer_ids.is_empty()) {
                    v["to"] = self.peer_ids[*t as usize % self.peer_ids.len()]
                        .clone()
                        .into();
                }
                v
            }
            Req::Resume { token, back } => {
                let (t, l) = match self.tokens.get(*token as usize % self.tokens.len().max(1)) {
                    None => ("r0.nope".to_string(), 0),
                    Some((t, p)) => {
                        let seen = self.peer_last.get(p).copied().unwrap_or(0);
                        (
                            t.clone(),
                            back.map_or(0, |b| seen.saturating_sub(u64::from(b % 8))),
                        )
                    }
                };
                let mut v = json!({"type": "resume", "resumeToken": t});
                if back.is_some() {
                    v["lastSeq"] = l.into();
                }
                v
            }
            Req::Ping => json!({"type": "ping"}),
            Req::Raw(s) => return s.to_string(),
        };
        if let Some(i) = id {
            v["id"] = i.into();
        }
        v.to_string()
    }

    /// Check and record a reply or delivered text for slot `s`.
    fn seen(&mut self, s: usize, text: &str, seq: Option<u64>) {
        let v: Value = serde_json::from_str(text).expect("every frame is JSON");
        let ty = v["type"]
            .as_str()
            .expect("every frame has a type")
            .to_string();
        let Some(c) = self.slots[s].as_mut() else {
            return;
        };
        let room = c.client.room().map(str::to_string);
        match ty.as_str() {
            "joined" => {
                c.last_seq = Some(0);
                let r = v["room"].as_str().expect("room").to_string();
                let p = v["peerId"].as_str().expect("peerId").to_string();
                self.tokens.push((
                    v["resumeToken"].as_str().expect("token").to_string(),
                    p.clone(),
                ));
                self.slot_peer[s] = Some(p.clone());
                self.peer_last.insert(p.clone(), 0);
                self.peer_room.insert(p.clone(), r.clone());
                self.peer_ids.push(p);
            }
            "resumed" => {
                self.slot_peer[s] = v["peerId"].as_str().map(str::to_string);
                let from = c.resume_from;
                if v["complete"] == true {
                    c.last_seq = Some(from);
                } else {
                    c.last_seq = None;
                    c.floor = from;
                }
            }
            "peer-joined" => {
                let p = v["peerId"].as_str().expect("peerId").to_string();
                let r = room
                    .clone()
                    .expect("a peer-joined goes to a seated connection");
                self.peer_room.insert(p.clone(), r);
                self.peer_ids.push(p);
            }
            "signal" => {
                let from = v["from"].as_str().expect("from");
                let r = room.clone().expect("a signal goes to a seated connection");
                assert_eq!(
                    self.peer_room.get(from),
                    Some(&r),
                    "signal from {from} reached a connection in {r}"
                );
            }
            _ => {}
        }
        if let Some(seq) = seq {
            assert_eq!(v["seq"].as_u64(), Some(seq), "rendered seq");
            match c.last_seq {
                Some(l) => assert_eq!(seq, l + 1, "seq must go up by one ({ty})"),
                None => assert!(seq > c.floor, "replay starts after lastSeq"),
            }
            c.last_seq = Some(seq);
            if let Some(p) = &self.slot_peer[s] {
                self.peer_last.insert(p.clone(), seq);
            }
        }
    }

    /// Drain every outbox and check what it held.
    fn drain(&mut self) {
        for s in 0..SLOTS {
            let Some(c) = self.slots[s].as_ref() else {
                continue;
            };
            let (items, overflowed) = match c.client.delivered() {
                Ok(v) => (v, false),
                Err(v) => (v, true),
            };
            let mut closed = overflowed;
            for o in items {
                match o {
                    Outbound::Frame(f) => {
                        let seq = match &f {
                            Frame::Event { seq, .. } => Some(*seq),
                            Frame::Text { .. } => None,
                        };
                        self.seen(s, &f.render(), seq);
                    }
                    Outbound::Close(_) | Outbound::Moved => closed = true,
                }
            }
            if closed {
                if let Some(c) = self.slots[s].take() {
                    c.client.close(&self.sig, deps(), self.now);
                    self.slot_peer[s] = None;
                }
            }
        }
    }

    fn tick(&mut self, secs: u64) {
        self.now += Duration::from_secs(secs);
        harness::tick(&self.sig, deps(), ROOMS[0], self.now);
    }
}

fuzz_target!(|ops: Vec<Op<'_>>| {
    let sh = shared();
    let d = deps();
    let mut w = World {
        sig: Signaling::new(&sh.config.signaling),
        slots: (0..SLOTS).map(|_| None).collect(),
        tokens: Vec::new(),
        peer_last: HashMap::new(),
        slot_peer: vec![None; SLOTS],
        peer_room: HashMap::new(),
        peer_ids: Vec::new(),
        now: Instant::now(),
        ip: 0x0a00_0000,
    };
    for op in ops.iter().take(64) {
        match op {
            Op::Send { slot, id, req } => {
                let s = *slot as usize % SLOTS;
                if w.slots[s].is_none() {
                    let ip = w.ip();
                    let client = Client::connect(&w.sig, d, ip).expect("admitted");
                    w.slots[s] = Some(Conn {
                        client,
                        last_seq: None,
                        floor: 0,
                        resume_from: 0,
                    });
                }
                let text = w.text(*id, req);
                if let (Req::Resume { .. }, Some(c)) = (req, w.slots[s].as_mut()) {
                    let v: Value = serde_json::from_str(&text).expect("built JSON");
                    c.resume_from = v["lastSeq"].as_u64().unwrap_or(0);
                }
                let c = w.slots[s].as_mut().expect("slot filled");
                let replies = c
                    .client
                    .frame(&w.sig, d, &text, w.now)
                    .expect("a single node answers at once");
                // Delivered frames first: a `resumed` and its replay come through the bus.
                w.drain();
                for r in replies {
                    w.seen(s, &r, None);
                }
            }
            Op::Drop { slot } => {
                if let Some(c) = w.slots[*slot as usize % SLOTS].take() {
                    c.client.close(&w.sig, d, w.now);
                    w.slot_peer[*slot as usize % SLOTS] = None;
                }
                w.drain();
            }
            Op::Tick { secs } => {
                w.tick(*secs as u64);
                w.drain();
            }
        }
    }
    // Everyone goes away; after the resume grace and the empty-room grace nothing is left.
    for s in 0..SLOTS {
        if let Some(c) = w.slots[s].take() {
            c.client.close(&w.sig, d, w.now);
        }
    }
    w.tick(21);
    w.tick(31);
    assert_eq!(
        harness::counts(&w.sig, d, ROOMS[0]),
        (0, 0),
        "rooms or seats leaked"
    );
    assert_eq!(w.sig.buffered_bytes(), (0, 0), "buffered bytes leaked");
    // The room quota came back in full: MAX_ROOMS users can each create a room now.
    for i in 0..MAX_ROOMS {
        let mut c = Client::connect(&w.sig, d, [192, 0, 2, i as u8].into()).expect("admitted");
        let (t, _) = sh
            .auth
            .issue_session(&format!("q{i}"), None, switchboard::auth::unix_now());
        c.frame(
            &w.sig,
            d,
            &json!({"type": "hello", "token": t}).to_string(),
            w.now,
        )
        .expect("answered");
        let r = c
            .frame(&w.sig, d, r#"{"type":"create"}"#, w.now)
            .expect("answered");
        assert!(r[0].contains("\"created\""), "room quota leaked: {r:?}");
        c.close(&w.sig, d, w.now);
    }
});
