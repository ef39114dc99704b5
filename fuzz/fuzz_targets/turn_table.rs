//! STUN/TURN requests, ChannelData and Send indications from several clients through the
//! port's one dispatch into two allocation tables (shards) that share a quota and port pool,
//! with a fake clock. Requests are raw bytes, structured Allocate/Refresh/CreatePermission/
//! ChannelBind/Send with valid long-term credentials (REST or static, MD5 or SHA-256), or
//! structured ones with bytes flipped.
//!
//! Invariants beyond no panic: every response parses, answers the request's method and
//! transaction, and carries an ERROR-CODE in 300..=699 when it is an error; no allocation,
//! permission or channel outlives its lifetime (checked against the lifetimes the responses
//! announced, and by the table's own clock after every step); per-user and total quotas hold;
//! the shared pool, the relay sockets and the gauges match the allocations that exist; data
//! reaches a peer only through a permission (and a channel) the client was granted, unchanged;
//! and once every lifetime has passed, the tables, the pool and the port range are empty.
#![no_main]

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};
use switchboard::listener::harness::{
    Limits, PeerMiss, Sent, Transport, TurnPort, REALM, STATIC_USER,
};
use switchboard::stun::codec::{
    decode_error_code, decode_u32, long_term_key, long_term_key_sha256,
};
use switchboard::stun::{attr, method, Class, Encoder, Message};
use switchboard::turn::core::{Dropped, Outcome};

const CLIENTS: usize = 8;
const PEERS: usize = 8;
const UNIX0: u64 = 1_800_000_000;

/// Clients 0..=4 send datagrams over IPv4, 5 over IPv6; 6 and 7 are TCP connections, each
/// with its own table that may hold an RFC 6062 TCP relay.
fn client(i: u8) -> SocketAddr {
    match usize::from(i) % CLIENTS {
        5 => "[2001:db8:2::1]:40005".parse().unwrap(),
        i @ (6 | 7) => SocketAddr::from(([192, 0, 2, 9], 41000 + i as u16)),
        i => SocketAddr::from(([192, 0, 2, 1 + (i as u8 / 2)], 40000 + i as u16)),
    }
}

fn transport(cl: SocketAddr) -> Transport {
    if cl.ip() == IpAddr::from([192, 0, 2, 9]) {
        Transport::Stream
    } else {
        Transport::Udp
    }
}

fn peer(i: u8) -> SocketAddr {
    match usize::from(i) % PEERS {
        6 => "10.0.0.1:5000".parse().unwrap(),
        7 => "[2001:db8:1::1]:5000".parse().unwrap(),
        n => SocketAddr::from(([198, 51, 100, 1 + (n as u8 / 2)], 5000 + (n as u16 % 2))),
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Who {
    /// REST credentials of user `n % 3`, expiring `ttl` seconds from now (negative: expired).
    Rest { n: u8, ttl: i16, sha256: bool },
    /// The static user.
    Static { sha256: bool },
    /// The credentials of the client's allocation (or the static user without one).
    Mine,
    /// No credentials at all.
    None,
}

#[derive(Arbitrary, Debug, Clone)]
struct Common {
    client: u8,
    tid: u8,
    who: Who,
    fingerprint: bool,
    /// Send a stale made-up nonce instead of the last one the server gave.
    bad_nonce: bool,
}

#[derive(Arbitrary, Debug, Clone)]
enum Op {
    Allocate {
        c: Common,
        lifetime: Option<u32>,
        transport: Option<u8>,
        family: Option<u8>,
        even_port: Option<bool>,
        token: Option<u8>,
        dont_fragment: bool,
    },
    Refresh {
        c: Common,
        lifetime: Option<u32>,
        family: Option<u8>,
    },
    CreatePermission {
        c: Common,
        peers: Vec<u8>,
    },
    ChannelBind {
        c: Common,
        chan: u16,
        peer: u8,
    },
    Send {
        client: u8,
        peer: u8,
        data: Vec<u8>,
        fingerprint: bool,
    },
    ChannelData {
        client: u8,
        chan: u16,
        data: Vec<u8>,
        /// Claim another length than the payload has.
        len: Option<u16>,
        pad: u8,
    },
    Binding {
        client: u8,
        tid: u8,
    },
    /// A peer sends a datagram to a relay address: one of the allocations' (`relay` < 192)
    /// or any port of the range.
    FromPeer {
        relay: u8,
        v6: bool,
        peer: u8,
        data: Vec<u8>,
    },
    Raw {
        client: u8,
        bytes: Vec<u8>,
    },
    /// RFC 6062 Connect to a peer (meaningful from a stream client with a TCP relay).
    Connect {
        c: Common,
        peer: u8,
    },
    /// The shell's TCP connect for a pending Connect finishes (or fails).
    ConnectDone {
        client: u8,
        ok: bool,
    },
    /// RFC 6062 ConnectionBind with some CONNECTION-ID.
    ConnectionBind {
        c: Common,
        id: u32,
    },
    /// A stream client's connection closes.
    CloseStream {
        client: u8,
    },
    /// A structured message with some bytes changed.
    Mutated {
        op: Box<Op>,
        flips: Vec<(u16, u8)>,
    },
    Advance {
        secs: u16,
        millis: u16,
    },
    /// The wall clock steps (NTP), the monotonic one does not.
    JumpUnix {
        secs: i32,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    /// Start from a warmed-up port: bit 0, client 0 holds a UDP allocation with permissions
    /// for peers 0..=2 and channel 0x4000 to peer 0; bit 1, stream client 6 holds a TCP
    /// relay, and with bit 2 also a Connect to peer 1 under way. The operations then start deep in the state space instead of having to find
    /// the nonce handshake first.
    warm: u8,
    max_per_user: u8,
    max_total: u8,
    ports: u8,
    max_lifetime: u16,
    max_age: u16,
    ops: Vec<Op>,
}

#[derive(Clone)]
struct Cred {
    user: String,
    pass: String,
    sha256: bool,
}

#[derive(Default)]
struct Model {
    /// Latest instant by which the allocation must be gone, from the lifetimes answered.
    until: Option<Instant>,
    cred: Option<Cred>,
    perms: HashMap<IpAddr, Instant>,
    chans: HashMap<u16, (SocketAddr, Instant)>,
    /// Transaction of the RFC 6062 Connect whose TCP connect is under way.
    pending: Option<[u8; 12]>,
}

struct Fuzz {
    port: TurnPort,
    nonce: Vec<u8>,
    tokens: Vec<Vec<u8>>,
    model: HashMap<SocketAddr, Model>,
}

impl Fuzz {
    fn cred(&self, who: Who, cl: SocketAddr) -> Option<Cred> {
        match who {
            Who::Rest { n, ttl, sha256 } => {
                let exp = self.port.unix().saturating_add_signed(i64::from(ttl));
                let (user, pass) = self.port.rest_credentials(&format!("u{}", n % 3), exp);
                Some(Cred { user, pass, sha256 })
            }
            Who::Static { sha256 } => Some(Cred {
                user: STATIC_USER.0.into(),
                pass: STATIC_USER.1.into(),
                sha256,
            }),
            Who::Mine => self
                .model
                .get(&cl)
                .and_then(|m| m.cred.clone())
                .or(Some(Cred {
                    user: STATIC_USER.0.into(),
                    pass: STATIC_USER.1.into(),
                    sha256: false,
                })),
            Who::None => None,
        }
    }

    fn request(
        &self,
        m: u16,
        c: &Common,
        attrs: &[(u16, Vec<u8>)],
        peers: &[SocketAddr],
    ) -> (SocketAddr, Vec<u8>) {
        let cl = client(c.client);
        let tid = [c.tid; 12];
        let mut buf = Vec::new();
        let mut e = Encoder::new(&mut buf, m, Class::Request, &tid);
        for (t, v) in attrs {
            e.attr(*t, v);
        }
        for p in peers {
            e.xor_address(attr::XOR_PEER_ADDRESS, *p);
        }
        if let Some(cr) = self.cred(c.who, cl) {
            e.attr(attr::USERNAME, cr.user.as_bytes());
            e.attr(attr::REALM, REALM.as_bytes());
            if c.bad_nonce {
                e.attr(
                    attr::NONCE,
                    b"obMatJos2gAAA0000000000000000000000000000000000000",
                );
            } else {
                e.attr(attr::NONCE, &self.nonce);
            }
            if cr.sha256 {
                e.attr(attr::PASSWORD_ALGORITHM, &[0, 2, 0, 0]);
                e.integrity_sha256(&long_term_key_sha256(&cr.user, REALM, &cr.pass));
            } else {
                e.integrity(&long_term_key(&cr.user, REALM, &cr.pass));
            }
        }
        if c.fingerprint {
            e.finish_with_fingerprint();
        } else {
            e.finish();
        }
        (cl, buf)
    }

    /// The datagram an operation sends, and from whom; `None` for clock operations.
    fn build(&self, op: &Op) -> Option<(SocketAddr, Vec<u8>)> {
        Some(match op {
            Op::Allocate {
                c,
                lifetime,
                transport,
                family,
                even_port,
                token,
                dont_fragment,
            } => {
                let mut a = vec![(
                    attr::REQUESTED_TRANSPORT,
                    vec![transport.unwrap_or(17), 0, 0, 0],
                )];
                if let Some(l) = lifetime {
                    a.push((attr::LIFETIME, l.to_be_bytes().to_vec()));
                }
                if let Some(f) = family {
                    a.push((attr::REQUESTED_ADDRESS_FAMILY, vec![*f, 0, 0, 0]));
                }
                if let Some(r) = even_port {
                    a.push((attr::EVEN_PORT, vec![if *r { 0x80 } else { 0 }]));
                }
                if let Some(t) = token {
                    let v = self
                        .tokens
                        .get(usize::from(*t) % self.tokens.len().max(1))
                        .cloned()
                        .unwrap_or_else(|| vec![*t; 8]);
                    a.push((attr::RESERVATION_TOKEN, v));
                }
                if *dont_fragment {
                    a.push((attr::DONT_FRAGMENT, Vec::new()));
                }
                self.request(method::ALLOCATE, c, &a, &[])
            }
            Op::Refresh {
                c,
                lifetime,
                family,
            } => {
                let mut a = Vec::new();
                if let Some(l) = lifetime {
                    a.push((attr::LIFETIME, l.to_be_bytes().to_vec()));
                }
                if let Some(f) = family {
                    a.push((attr::REQUESTED_ADDRESS_FAMILY, vec![*f, 0, 0, 0]));
                }
                self.request(method::REFRESH, c, &a, &[])
            }
            Op::CreatePermission { c, peers } => {
                let p: Vec<SocketAddr> = peers.iter().take(4).map(|p| peer(*p)).collect();
                self.request(method::CREATE_PERMISSION, c, &[], &p)
            }
            Op::ChannelBind { c, chan, peer: p } => self.request(
                method::CHANNEL_BIND,
                c,
                &[(attr::CHANNEL_NUMBER, [chan.to_be_bytes(), [0, 0]].concat())],
                &[peer(*p)],
            ),
            Op::Send {
                client: cl,
                peer: p,
                data,
                fingerprint,
            } => {
                let mut buf = Vec::new();
                let mut e = Encoder::new(&mut buf, method::SEND, Class::Indication, &[7; 12]);
                e.xor_address(attr::XOR_PEER_ADDRESS, peer(*p));
                e.attr(attr::DATA, data);
                if *fingerprint {
                    e.finish_with_fingerprint();
                } else {
                    e.finish();
                }
                (client(*cl), buf)
            }
            Op::ChannelData {
                client: cl,
                chan,
                data,
                len,
                pad,
            } => {
                let n = 0x4000 | (chan & 0x3fff);
                let l = len.unwrap_or(data.len() as u16);
                let mut buf = [n.to_be_bytes(), l.to_be_bytes()].concat();
                buf.extend_from_slice(data);
                buf.extend(std::iter::repeat_n(0, usize::from(*pad % 4)));
                (client(*cl), buf)
            }
            Op::Binding { client: cl, tid } => {
                let mut buf = Vec::new();
                Encoder::new(&mut buf, method::BINDING, Class::Request, &[*tid; 12]).finish();
                (client(*cl), buf)
            }
            Op::Raw { client: cl, bytes } => (client(*cl), bytes.clone()),
            Op::Mutated { op, flips } => {
                let (cl, mut buf) = self.build(op)?;
                for (at, x) in flips.iter().take(8) {
                    if !buf.is_empty() {
                        let i = usize::from(*at) % buf.len();
                        buf[i] ^= x;
                    }
                }
                (cl, buf)
            }
            Op::Connect { c, peer: p } => self.request(method::CONNECT, c, &[], &[peer(*p)]),
            Op::ConnectionBind { c, id } => self.request(
                method::CONNECTION_BIND,
                c,
                &[(attr::CONNECTION_ID, id.to_be_bytes().to_vec())],
                &[],
            ),
            Op::Advance { .. }
            | Op::JumpUnix { .. }
            | Op::FromPeer { .. }
            | Op::ConnectDone { .. }
            | Op::CloseStream { .. } => return None,
        })
    }

    fn step(&mut self, op: &Op) {
        match op {
            Op::Advance { secs, millis } => {
                self.port.advance(
                    Duration::from_secs(u64::from(*secs))
                        + Duration::from_millis(u64::from(*millis % 1000)),
                );
            }
            Op::JumpUnix { secs } => self.port.jump_unix(i64::from(*secs)),
            Op::FromPeer {
                relay,
                v6,
                peer: p,
                data,
            } => self.from_peer(*relay, *v6, peer(*p), data),
            Op::ConnectDone { client: cl, ok } => self.connect_done(client(*cl), *ok),
            Op::CloseStream { client: cl } => {
                let cl = client(*cl);
                if transport(cl) == Transport::Stream {
                    self.port.close_stream(cl);
                    self.model.remove(&cl);
                }
            }
            _ => {
                let Some((cl, pkt)) = self.build(op) else {
                    return;
                };
                let (out, outcome, sent) = self.port.input_on(transport(cl), cl, &pkt);
                self.observe(cl, &pkt, &out, outcome, &sent);
            }
        }
        if let Err(e) = self.port.check() {
            panic!("invariant after {op:?}: {e}");
        }
        self.check_model();
    }

    /// A finished TCP connect answers the pending Connect exactly once, with its transaction:
    /// a CONNECTION-ID on success, 447 on failure; with nothing pending, nothing is sent.
    fn connect_done(&mut self, cl: SocketAddr, ok: bool) {
        let alive = self.port.allocations().iter().any(|a| a.client == cl);
        let (out, outcome) = self.port.connect_done(cl, ok);
        let pending = self
            .model
            .get_mut(&cl)
            .and_then(|m| if alive { m.pending.take() } else { None });
        let Some(tid) = pending else {
            assert!(out.is_empty(), "Connect answered with none pending");
            assert_eq!(outcome, Outcome::Ignored);
            return;
        };
        let resp = Message::parse(&out).expect("Connect response parses");
        assert_eq!(resp.method(), method::CONNECT);
        assert_eq!(resp.transaction_id(), tid, "answers another Connect");
        if ok {
            assert_eq!(resp.class(), Class::Success);
            assert!(resp.get(attr::CONNECTION_ID).is_some(), "no CONNECTION-ID");
            assert_eq!(outcome, Outcome::Success);
        } else {
            assert_eq!(resp.class(), Class::Error);
            let (code, _) = decode_error_code(resp.get(attr::ERROR_CODE).expect("ERROR-CODE"))
                .expect("ERROR-CODE decodes");
            assert_eq!(code, 447);
            assert_eq!(outcome, Outcome::Error(447));
        }
    }

    /// A peer datagram reaches the allocation's client only through a live permission for the
    /// peer's IP: as ChannelData on the live channel bound to exactly that peer, otherwise as
    /// a Data indication naming the peer; the payload arrives unchanged.
    fn from_peer(&mut self, relay: u8, v6: bool, p: SocketAddr, data: &[u8]) {
        let allocs = self.port.allocations();
        let relay = match allocs.get(usize::from(relay)) {
            Some(a) if relay < 192 => a.relay,
            _ => {
                let ip: IpAddr = if v6 {
                    switchboard::listener::harness::SERVER_V6.into()
                } else {
                    switchboard::listener::harness::SERVER_V4.into()
                };
                let ports = self.port.limits().ports.max(1);
                SocketAddr::new(
                    ip,
                    switchboard::listener::harness::PORT_MIN + u16::from(relay) % ports,
                )
            }
        };
        let now = self.port.now();
        let got = self.port.peer_input(relay, p, data);
        if self.port.is_tcp_relay(relay) {
            assert_eq!(
                got,
                Err(PeerMiss::TcpRelay),
                "a datagram through the TCP relay {relay}"
            );
            return;
        }
        let Some(owner) = allocs.iter().find(|a| a.relay == relay) else {
            // No socket there, or one only reserved (EVEN-PORT) and dropped silently.
            assert!(
                matches!(
                    got,
                    Err(PeerMiss::NoSocket | PeerMiss::Dropped(Dropped::Reserved))
                ),
                "peer data through {relay}, which no allocation holds: {got:?}"
            );
            return;
        };
        let m = self
            .model
            .get(&owner.client)
            .expect("allocation never answered");
        let permitted = m.perms.get(&p.ip()).is_some_and(|e| *e > now);
        let got = match got {
            Ok(got) => got,
            Err(why) => {
                // The harness sets no bandwidth cap, so the only reasons left for an
                // allocation's socket are a missing permission and a payload too large to frame.
                assert!(
                    why == PeerMiss::Dropped(Dropped::NoPermission)
                        || (why == PeerMiss::Dropped(Dropped::Oversized) && data.len() > 65_000),
                    "peer data from {p} dropped: {why:?}"
                );
                assert!(
                    !permitted,
                    "peer data from {p} dropped despite a permission"
                );
                return;
            }
        };
        assert!(permitted, "peer data from {p} relayed without a permission");
        assert_eq!(got.client, owner.client, "peer data to another client");
        let chan = m
            .chans
            .iter()
            .find(|(_, (cp, e))| *cp == p && *e > now)
            .map(|(n, _)| *n);
        match chan {
            Some(n) => {
                assert_eq!(&got.frame[..2], &n.to_be_bytes(), "wrong channel");
                assert_eq!(
                    usize::from(u16::from_be_bytes([got.frame[2], got.frame[3]])),
                    data.len()
                );
                assert_eq!(&got.frame[4..], data, "ChannelData payload changed");
            }
            None => {
                let ind = Message::parse(&got.frame).expect("Data indication parses");
                assert_eq!(ind.method(), method::DATA);
                assert_eq!(ind.class(), Class::Indication);
                assert_eq!(
                    ind.xor_address(attr::XOR_PEER_ADDRESS).and_then(Result::ok),
                    Some(p)
                );
                assert_eq!(ind.get(attr::DATA), Some(data), "DATA payload changed");
            }
        }
    }

    /// Check the response and what was relayed, and learn the lifetimes, permissions and
    /// channels the server granted.
    fn observe(
        &mut self,
        cl: SocketAddr,
        pkt: &[u8],
        out: &[u8],
        outcome: Option<switchboard::turn::core::Outcome>,
        sent: &[Sent],
    ) {
        let now = self.port.now();
        let req = Message::parse(pkt).ok();
        match outcome {
            Some(Outcome::Connect(p)) => {
                let req = req.as_ref().expect("Connect from a STUN message");
                assert_eq!(req.method(), method::CONNECT);
                assert_eq!(
                    transport(cl),
                    Transport::Stream,
                    "Connect over UDP accepted"
                );
                assert!(
                    out.is_empty(),
                    "Connect answered before the connect finished"
                );
                assert_eq!(
                    req.xor_address(attr::XOR_PEER_ADDRESS).and_then(Result::ok),
                    Some(p)
                );
                let m = self
                    .model
                    .get_mut(&cl)
                    .expect("Connect without an allocation");
                assert!(m.pending.is_none(), "a second Connect while one is pending");
                m.pending = Some(req.transaction_id());
                m.perms.insert(p.ip(), now + Duration::from_secs(300));
            }
            Some(Outcome::ConnectionBind(_)) => {
                assert_eq!(transport(cl), Transport::Stream);
                assert!(
                    !self.port.allocations().iter().any(|a| a.client == cl),
                    "ConnectionBind accepted on a connection with an allocation"
                );
                // The shell turns the connection into a data pipe (or closes it): no more
                // STUN on it.
                self.port.close_stream(cl);
                self.model.remove(&cl);
            }
            _ => {}
        }
        if !out.is_empty() {
            let req = req.as_ref().expect("a response only to a STUN message");
            let resp = Message::parse(out).expect("response parses");
            assert_eq!(
                req.class(),
                Class::Request,
                "responses answer requests only"
            );
            assert_eq!(resp.transaction_id(), req.transaction_id());
            assert_eq!(resp.method(), req.method());
            match resp.class() {
                Class::Error => {
                    let v = resp
                        .get(attr::ERROR_CODE)
                        .expect("error carries ERROR-CODE");
                    let (code, _) = decode_error_code(v).expect("ERROR-CODE decodes");
                    assert!((300..=699).contains(&code), "error code {code}");
                }
                Class::Success => {}
                c => panic!("response of class {c:?}"),
            }
            if let Some(n) = resp.get(attr::NONCE) {
                self.nonce = n.to_vec();
            }
            if let Some(t) = resp.get(attr::RESERVATION_TOKEN) {
                self.tokens.push(t.to_vec());
            }
            if resp.class() == Class::Success {
                self.learn(cl, req, &resp, outcome, now);
            }
        }
        for s in sent {
            assert_eq!(s.client, cl);
            let m = self
                .model
                .get(&cl)
                .expect("relayed for a client with no allocation");
            let mine = self
                .port
                .allocations()
                .into_iter()
                .find(|a| a.client == cl)
                .expect("relayed without an allocation");
            assert_eq!(
                mine.relay, s.relay,
                "relayed from another allocation's socket"
            );
            assert!(
                m.perms.get(&s.peer.ip()).is_some_and(|e| *e > now),
                "relayed to {} without a permission",
                s.peer
            );
            match &req {
                Some(r) => {
                    assert_eq!(r.method(), method::SEND);
                    assert_eq!(
                        r.xor_address(attr::XOR_PEER_ADDRESS).and_then(Result::ok),
                        Some(s.peer)
                    );
                    assert_eq!(r.get(attr::DATA), Some(&s.data[..]));
                }
                None => {
                    let num = u16::from_be_bytes([pkt[0], pkt[1]]);
                    let len = usize::from(u16::from_be_bytes([pkt[2], pkt[3]]));
                    assert_eq!(&pkt[4..4 + len], &s.data[..], "ChannelData payload changed");
                    let (p, e) = m.chans.get(&num).expect("relayed on a channel never bound");
                    assert!(
                        *p == s.peer && *e > now,
                        "channel {num:#x} went to {}",
                        s.peer
                    );
                }
            }
        }
    }

    fn learn(
        &mut self,
        cl: SocketAddr,
        req: &Message<'_>,
        resp: &Message<'_>,
        outcome: Option<switchboard::turn::core::Outcome>,
        now: Instant,
    ) {
        let lifetime = || {
            let v = resp.get(attr::LIFETIME).expect("success carries LIFETIME");
            Duration::from_secs(u64::from(decode_u32(v).expect("LIFETIME decodes")))
        };
        match req.method() {
            method::ALLOCATE if outcome != Some(switchboard::turn::core::Outcome::Retransmit) => {
                let relayed = resp
                    .xor_address(attr::XOR_RELAYED_ADDRESS)
                    .expect("success carries XOR-RELAYED-ADDRESS")
                    .expect("XOR-RELAYED-ADDRESS decodes");
                let l = self.port.limits();
                assert!(
                    (switchboard::listener::harness::PORT_MIN
                        ..switchboard::listener::harness::PORT_MIN + l.ports.max(1))
                        .contains(&relayed.port()),
                    "relay port {relayed}"
                );
                let user = String::from_utf8_lossy(req.get(attr::USERNAME).unwrap_or_default())
                    .into_owned();
                let sha256 = req.has_integrity_sha256();
                let pass = if user == STATIC_USER.0 {
                    STATIC_USER.1.to_string()
                } else {
                    // Recompute the REST password from the username's expiry.
                    let exp: u64 = user
                        .split(':')
                        .next()
                        .and_then(|e| e.parse().ok())
                        .unwrap_or(0);
                    let name = user.split_once(':').map(|(_, u)| u).unwrap_or("");
                    let (u, p) = self.port.rest_credentials(name, exp);
                    if u == user {
                        p
                    } else {
                        String::new()
                    }
                };
                self.model.insert(
                    cl,
                    Model {
                        until: Some(now + lifetime()),
                        cred: Some(Cred { user, pass, sha256 }),
                        ..Default::default()
                    },
                );
            }
            method::REFRESH => {
                let m = self
                    .model
                    .get_mut(&cl)
                    .expect("refresh of an unknown allocation");
                m.until = Some(now + lifetime());
            }
            method::CREATE_PERMISSION => {
                let m = self
                    .model
                    .get_mut(&cl)
                    .expect("permission on an unknown allocation");
                for p in req.xor_addresses(attr::XOR_PEER_ADDRESS).flatten() {
                    m.perms.insert(p.ip(), now + Duration::from_secs(300));
                }
            }
            method::CHANNEL_BIND => {
                let m = self
                    .model
                    .get_mut(&cl)
                    .expect("channel on an unknown allocation");
                let p = req
                    .xor_address(attr::XOR_PEER_ADDRESS)
                    .and_then(Result::ok)
                    .expect("bound without a peer");
                let num = u16::from_be_bytes(
                    req.get(attr::CHANNEL_NUMBER)
                        .expect("bound without a number")[..2]
                        .try_into()
                        .unwrap(),
                );
                m.perms.insert(p.ip(), now + Duration::from_secs(300));
                m.chans.insert(num, (p, now + Duration::from_secs(600)));
            }
            _ => {}
        }
    }

    /// The warm-up sequence `Input::warm` asks for, through the same steps and checks.
    fn warm_up(&mut self, warm: u8) {
        let c = |client: u8, tid: u8| Common {
            client,
            tid,
            who: Who::Static { sha256: false },
            fingerprint: false,
            bad_nonce: false,
        };
        let alloc = |client: u8, tid: u8, transport: Option<u8>| Op::Allocate {
            c: Common {
                // The stream client under another user, so a per-user quota of 1 lets both in.
                who: if client == 0 {
                    Who::Static { sha256: false }
                } else {
                    Who::Rest {
                        n: 1,
                        ttl: 3600,
                        sha256: false,
                    }
                },
                ..c(client, tid)
            },
            lifetime: None,
            transport,
            family: None,
            even_port: None,
            token: None,
            dont_fragment: false,
        };
        let mut ops = Vec::new();
        if warm & 1 != 0 {
            // The first Allocate learns the nonce (401), the second succeeds.
            ops.push(alloc(0, 1, None));
            ops.push(alloc(0, 2, None));
            ops.push(Op::CreatePermission {
                c: c(0, 3),
                peers: vec![0, 1, 2],
            });
            ops.push(Op::ChannelBind {
                c: c(0, 4),
                chan: 0x4000,
                peer: 0,
            });
        }
        if warm & 2 != 0 {
            ops.push(alloc(6, 5, Some(6)));
            ops.push(alloc(6, 6, Some(6)));
            if warm & 4 != 0 {
                ops.push(Op::Connect {
                    c: Common {
                        who: Who::Mine,
                        ..c(6, 7)
                    },
                    peer: 1,
                });
            }
        }
        for op in &ops {
            self.step(op);
        }
    }

    /// Every allocation was announced, and none outlives the lifetime it was last given.
    fn check_model(&self) {
        for a in self.port.allocations() {
            let until = self
                .model
                .get(&a.client)
                .and_then(|m| m.until)
                .unwrap_or_else(|| panic!("allocation of {} was never answered", a.client));
            assert!(
                a.expires <= until,
                "{} lives past the lifetime it was told",
                a.client
            );
            assert!(
                until > self.port.now(),
                "{} outlived its lifetime",
                a.client
            );
        }
    }
}

fuzz_target!(|input: Input| {
    let limits = Limits {
        max_per_user: u32::from(input.max_per_user % 4 + 1),
        max_total: u32::from(input.max_total % 8 + 1),
        ports: u16::from(input.ports % 12 + 1),
        max_lifetime: u32::from(input.max_lifetime % 7200 + 1),
        // 0: a maximum age past what an `Instant` can hold (no cap).
        max_age: match input.max_age {
            0 => u64::MAX,
            a => u64::from(a % 14400) + 1,
        },
    };
    let mut f = Fuzz {
        port: TurnPort::new(limits, UNIX0),
        nonce: Vec::new(),
        tokens: Vec::new(),
        model: HashMap::new(),
    };
    f.warm_up(input.warm);
    for op in input.ops.iter().take(64) {
        f.step(op);
    }
    let wait = f.port.everything_expires();
    f.port.advance(wait);
    f.check_model();
    if let Err(e) = f.port.check_empty() {
        panic!("after every lifetime passed: {e}");
    }
});
