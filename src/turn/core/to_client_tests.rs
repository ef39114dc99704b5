use super::*;
use crate::stun::codec::{attr, method, Class, Message};
use std::net::IpAddr;
use std::time::Duration;

fn client() -> SocketAddr {
    "198.51.100.1:5000".parse().unwrap()
}

fn peer() -> SocketAddr {
    "192.0.2.7:4000".parse().unwrap()
}

fn view(now: Instant) -> View {
    View {
        client: Some(client()),
        perms: vec![(peer().ip(), now + Duration::from_secs(300))],
        ..View::default()
    }
}

#[test]
fn a_channel_bound_peer_gets_a_channeldata_header_and_nothing_in_out() {
    let now = Instant::now();
    let mut v = view(now);
    v.channels = vec![(peer(), 0x4001, now + Duration::from_secs(600))];
    let (mut b, mut t, mut out) = (None, Tids::new(1), Vec::new());
    let r = to_client(&v, &mut b, now, peer(), &[1, 2, 3], &mut t, &mut out).unwrap();
    assert_eq!(r.client, client());
    assert_eq!(r.frame, Frame::Channel([0x40, 0x01, 0, 3]));
    assert!(out.is_empty());
    // No cap set: no bucket is made.
    assert!(b.is_none());
}

#[test]
fn a_permitted_peer_without_a_channel_gets_a_data_indication() {
    let now = Instant::now();
    let v = view(now);
    let (mut b, mut t, mut out) = (None, Tids::new(1), vec![9u8; 7]);
    let r = to_client(&v, &mut b, now, peer(), b"hello", &mut t, &mut out).unwrap();
    assert_eq!(r.frame, Frame::Indication);
    let m = Message::parse(&out).unwrap();
    assert_eq!(m.method(), method::DATA);
    assert_eq!(m.class(), Class::Indication);
    assert_eq!(m.get(attr::DATA), Some(&b"hello"[..]));
    assert_eq!(m.xor_address(attr::XOR_PEER_ADDRESS), Some(Ok(peer())));
    // Another indication gets another transaction id.
    let first = m.transaction_id();
    to_client(&v, &mut b, now, peer(), b"again", &mut t, &mut out).unwrap();
    assert_ne!(Message::parse(&out).unwrap().transaction_id(), first);
}

#[test]
fn a_channel_bound_to_another_port_of_the_peer_ip_is_not_used() {
    let now = Instant::now();
    let mut v = view(now);
    let other: SocketAddr = "192.0.2.7:4001".parse().unwrap();
    v.channels = vec![(other, 0x4001, now + Duration::from_secs(600))];
    let (mut b, mut t, mut out) = (None, Tids::new(1), Vec::new());
    let r = to_client(&v, &mut b, now, peer(), b"x", &mut t, &mut out).unwrap();
    assert_eq!(r.frame, Frame::Indication);
}

#[test]
fn no_live_permission_drops() {
    let now = Instant::now();
    let v = view(now);
    let (mut b, mut t, mut out) = (None, Tids::new(1), Vec::new());
    let stranger: SocketAddr = "192.0.2.8:4000".parse().unwrap();
    assert_eq!(
        to_client(&v, &mut b, now, stranger, b"x", &mut t, &mut out),
        Err(Dropped::NoPermission)
    );
    // The permission expires at its instant.
    let later = now + Duration::from_secs(300);
    assert_eq!(
        to_client(&v, &mut b, later, peer(), b"x", &mut t, &mut out),
        Err(Dropped::NoPermission)
    );
    assert_eq!(Dropped::NoPermission.label(), Some("no_permission"));
}

#[test]
fn a_reserved_socket_drops_silently() {
    let now = Instant::now();
    let v = View {
        perms: vec![(IpAddr::from([192, 0, 2, 7]), now + Duration::from_secs(300))],
        ..View::default()
    };
    let (mut b, mut t, mut out) = (None, Tids::new(1), Vec::new());
    assert_eq!(
        to_client(&v, &mut b, now, peer(), b"x", &mut t, &mut out),
        Err(Dropped::Reserved)
    );
    assert_eq!(Dropped::Reserved.label(), None);
}

#[test]
fn the_bandwidth_cap_drops_over_budget_and_refills() {
    let now = Instant::now();
    let mut v = view(now);
    v.max_bps = 1000;
    let (mut b, mut t, mut out) = (None, Tids::new(1), Vec::new());
    let data = [0u8; 600];
    assert!(to_client(&v, &mut b, now, peer(), &data, &mut t, &mut out).is_ok());
    assert_eq!(b.as_ref().map(Bucket::rate), Some(1000));
    assert_eq!(
        to_client(&v, &mut b, now, peer(), &data, &mut t, &mut out),
        Err(Dropped::BandwidthCap)
    );
    // Half a second refills 500 bytes: 400 + 500 >= 600.
    let later = now + Duration::from_millis(500);
    assert!(to_client(&v, &mut b, later, peer(), &data, &mut t, &mut out).is_ok());
    // A denied datagram takes nothing from the budget.
    let stranger: SocketAddr = "192.0.2.8:4000".parse().unwrap();
    assert_eq!(
        to_client(&v, &mut b, later, stranger, &[0; 300], &mut t, &mut out),
        Err(Dropped::NoPermission)
    );
    assert!(to_client(&v, &mut b, later, peer(), &[0; 300], &mut t, &mut out).is_ok());
}

#[test]
fn datagrams_too_large_to_frame_are_dropped_whole() {
    let now = Instant::now();
    let v6: SocketAddr = "[2001:db8::7]:4000".parse().unwrap();
    let mut v = view(now);
    v.perms.push((v6.ip(), now + Duration::from_secs(300)));
    let (mut b, mut t, mut out) = (None, Tids::new(1), Vec::new());
    // The largest IPv6 UDP payload does not fit a Data indication.
    assert_eq!(
        to_client(&v, &mut b, now, v6, &vec![0u8; 65_527], &mut t, &mut out),
        Err(Dropped::Oversized)
    );
    assert!(out.is_empty());
    // Nor does anything over 16 bits fit ChannelData.
    v.channels = vec![(v6, 0x4000, now + Duration::from_secs(600))];
    assert_eq!(
        to_client(&v, &mut b, now, v6, &vec![0u8; 65_536], &mut t, &mut out),
        Err(Dropped::Oversized)
    );
    assert!(to_client(&v, &mut b, now, v6, &vec![0u8; 65_535], &mut t, &mut out).is_ok());
    assert_eq!(Dropped::Oversized.label(), Some("peer_datagram_oversized"));
}
