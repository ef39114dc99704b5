//! The room core's unit tests: every rule exercised through the hub's public operations.

use super::hub::Hub;
use super::*;
use serde_json::value::RawValue;
use serde_json::Value;
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    let a_tok = h.rooms[&room].peers.get(&aid).unwrap().resume_token.clone();
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
    let p = h.rooms[&room].peers.get(&bid).unwrap();
    assert!(
        p.replay.bytes <= 400 && p.replay.buffer.len() == 2,
        "{}",
        p.replay.bytes
    );
    assert!(total.used() <= 1000);
    assert!(h.evicted() > 0);
    h.leave(t, 2, &mut out).unwrap();
    h.leave(t, 1, &mut out).unwrap();
    assert_eq!(total.used(), 0, "removing a peer returns its bytes");
}

#[test]
fn every_way_a_seat_leaves_forgets_its_token_buffer_and_timer() {
    let t = Instant::now();
    // Each way, on a room of a (connected) and b (dropped, with buffered frames).
    for way in ["leave", "timeout", "replaced", "kick", "close", "evict"] {
        let total = Arc::new(Budget::new(1 << 20));
        let mut h = Hub::new(Limits {
            resume_total: total.clone(),
            ..limits(16, 1 << 20, 0)
        });
        let mut out = Vec::new();
        h.create(t, "a", "r", None).unwrap();
        let a = h.join(1, &m("a"), "r", &mut out).unwrap();
        let b = h.join(2, &m("b"), "r", &mut out).unwrap();
        let (aid, bid) = (
            a["peerId"].as_str().unwrap().to_string(),
            b["peerId"].as_str().unwrap().to_string(),
        );
        let btok = b["resumeToken"].as_str().unwrap().to_string();
        h.disconnect(t, 2, &mut out);
        h.signal(1, Some(&bid), &raw("\"x\""), &mut out).unwrap();
        assert!(total.used() > 0);
        out.clear();
        match way {
            "leave" => {
                h.leave(t, 1, &mut out).unwrap();
                h.kick(t, "r", &bid, "kicked", "kicked", &mut out).unwrap();
            }
            "timeout" => {
                h.leave(t, 1, &mut out).unwrap();
                h.tick(t + Duration::from_secs(10), &mut out);
            }
            "replaced" => {
                h.join(3, &m("b"), "r", &mut out).unwrap();
                h.join(4, &m("a"), "r", &mut out).unwrap();
                assert!(out.contains(&Action::Close(1, CloseReason::Replaced)));
                assert_eq!(h.peer_count(), 2);
                assert_eq!(h.next_deadline(), None, "a replaced seat leaves no timer");
                h.leave(t, 3, &mut out).unwrap();
                h.leave(t, 4, &mut out).unwrap();
            }
            "kick" => {
                h.kick(t, "r", &aid, "kicked", "kicked", &mut out).unwrap();
                h.kick(t, "r", &bid, "kicked", "kicked", &mut out).unwrap();
                assert!(out.contains(&Action::Close(1, CloseReason::Kicked)));
            }
            "close" => {
                assert_eq!(h.close_room("r", &mut out).unwrap().0, 2);
                assert!(out.contains(&Action::Close(1, CloseReason::RoomClosed)));
            }
            "evict" => {
                let (creator, conns) = h.evict("r").unwrap();
                assert_eq!((creator.as_str(), conns), ("a", vec![1]));
                assert!(out.is_empty(), "an evicted seat gets no goodbye");
            }
            _ => unreachable!(),
        }
        assert_eq!(h.peer_count(), 0, "{way}");
        assert!(h.tokens.is_empty() && h.seats.is_empty(), "{way}");
        assert_eq!(total.used(), 0, "{way}: the buffer's bytes are back");
        assert_eq!(
            h.resume(9, &m("b"), &btok, 0, plain, &mut out),
            Err(RoomError::BadResume),
            "{way}"
        );
        // Only an emptied room's grace may remain, never a resume window.
        h.tick(t + Duration::from_secs(60), &mut out);
        assert_eq!((h.room_count(), h.next_deadline()), (0, None), "{way}");
    }
}

/// What a seat costs in the hub, printed (`--nocapture`) and bounded: an idle room of two holds
/// two seats allocated to their exact count, each with a replay buffer of one event.
#[test]
fn a_seat_in_an_idle_room_stays_small() {
    let seat = std::mem::size_of::<(String, super::hub::Peer)>();
    let mut h = hub();
    let t = Instant::now();
    let mut out = Vec::new();
    h.create(t, "a", "r", None).unwrap();
    h.join(1, &m("a"), "r", &mut out).unwrap();
    h.join(2, &m("b"), "r", &mut out).unwrap();
    let room = &h.rooms["r"];
    let capacities: Vec<usize> = room
        .peers
        .values()
        .map(|p| p.replay.buffer.capacity())
        .collect();
    println!("a seat {seat} B inline; replay buffer capacities {capacities:?}");
    assert!(seat <= 192, "{seat}");
    assert_eq!(room.peers.len(), 2);
    assert!(capacities.iter().all(|c| *c <= 1), "{capacities:?}");
}
