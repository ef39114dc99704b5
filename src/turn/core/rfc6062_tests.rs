//! TCP relays (RFC 6062): Connect and ConnectionBind, through the dispatcher.

use super::super::test_support::*;

#[test]
fn tcp_relays_only_over_streams_and_connect_flow() {
    let mut h = harness(cfg());
    let c = rest(&h, 3600);
    h.challenge(client(1));
    let tcp = vec![(attr::REQUESTED_TRANSPORT, vec![6, 0, 0, 0])];
    let r = h.send(client(1), method::ALLOCATE, [1; 12], Some(&c), &tcp, &[]);
    assert_eq!(r.code(), Some(442), "TCP relay over UDP");
    let r = h.send(
        client(1),
        method::CONNECT,
        [2; 12],
        Some(&c),
        &[],
        &[peer(5)],
    );
    assert_eq!(
        r.code(),
        Some(400),
        "Connect is unknown on a datagram transport"
    );
    h.t.set_stream();
    let mut bad = tcp.clone();
    bad.push((attr::EVEN_PORT, vec![0]));
    let r = h.send(client(1), method::ALLOCATE, [3; 12], Some(&c), &bad, &[]);
    assert_eq!(r.code(), Some(400), "EVEN-PORT with a TCP relay");
    let r = h.send(client(1), method::ALLOCATE, [4; 12], Some(&c), &tcp, &[]);
    assert_eq!(r.outcome, Outcome::Success, "{:?}", r.code());
    let r = h.send(
        client(1),
        method::CONNECT,
        [5; 12],
        Some(&c),
        &[],
        &[SocketAddr::from(([10, 0, 0, 1], 80))],
    );
    assert_eq!(r.code(), Some(403));
    let r = h.send(client(1), method::CONNECT, [6; 12], Some(&c), &[], &[]);
    assert_eq!(r.code(), Some(400), "no XOR-PEER-ADDRESS");
    let r = h.send(
        client(1),
        method::CHANNEL_BIND,
        [20; 12],
        Some(&c),
        &chan_attr(0x4000),
        &[peer(5)],
    );
    assert_eq!(r.code(), Some(400), "no channels on a TCP relay");
    let r = h.send(
        client(1),
        method::CONNECT,
        [7; 12],
        Some(&c),
        &[],
        &[peer(5)],
    );
    assert_eq!(r.outcome, Outcome::Connect(peer(5)));
    assert!(r.raw.is_empty());
    assert!(
        h.view().permits(peer(5).ip(), h.env.now),
        "Connect installs a permission"
    );
    let r = h.send(
        client(1),
        method::CONNECT,
        [8; 12],
        Some(&c),
        &[],
        &[peer(6)],
    );
    assert_eq!(r.code(), Some(446), "one Connect at a time");
    let mut out = Vec::new();
    assert_eq!(
        h.t.connect_done(client(1), Some(77), &mut out),
        Outcome::Success
    );
    let m = Message::parse(&out).unwrap();
    assert_eq!(m.transaction_id(), [7; 12]);
    assert_eq!(decode_u32(m.get(attr::CONNECTION_ID).unwrap()).unwrap(), 77);
    assert!(m.verify_integrity(&long_term_key(&c.user, REALM, &c.pass)));
    h.send(
        client(1),
        method::CONNECT,
        [9; 12],
        Some(&c),
        &[],
        &[peer(6)],
    );
    let mut out = Vec::new();
    assert_eq!(
        h.t.connect_done(client(1), None, &mut out),
        Outcome::Error(447)
    );
    assert_eq!(
        h.t.connect_done(client(1), None, &mut out),
        Outcome::Ignored
    );
    // ConnectionBind comes on a fresh connection (a table without allocation).
    let cid = vec![(attr::CONNECTION_ID, 77u32.to_be_bytes().to_vec())];
    let r = h.send(
        client(1),
        method::CONNECTION_BIND,
        [10; 12],
        Some(&c),
        &cid,
        &[],
    );
    assert_eq!(
        r.code(),
        Some(400),
        "the control connection cannot become a data one"
    );
    let mut fresh = harness(cfg());
    fresh.t.set_stream();
    fresh.challenge(client(2));
    let r = fresh.send(
        client(2),
        method::CONNECTION_BIND,
        [11; 12],
        Some(&c),
        &[],
        &[],
    );
    assert_eq!(r.code(), Some(400), "missing CONNECTION-ID");
    let r = fresh.send(
        client(2),
        method::CONNECTION_BIND,
        [12; 12],
        Some(&c),
        &cid,
        &[],
    );
    assert_eq!(r.outcome, Outcome::ConnectionBind(77));
    assert_eq!(r.msg().class(), Class::Success);
    let r = fresh.send(
        client(2),
        method::CONNECTION_BIND,
        [13; 12],
        None,
        &cid,
        &[],
    );
    assert_eq!(r.code(), Some(401));
}
