//! Method dispatch and dropping the table.

use super::test_support::*;

#[test]
fn unknown_method_and_non_requests() {
    let mut h = harness(cfg());
    let r = h.send(client(1), 0x0123, [1; 12], None, &[], &[]);
    assert_eq!(r.code(), Some(400));
    let mut buf = Vec::new();
    Encoder::new(&mut buf, method::ALLOCATE, Class::Success, &[1; 12]).finish();
    let m = Message::parse(&buf).unwrap();
    let mut out = Vec::new();
    assert_eq!(h.request(client(1), &m, &mut out), Outcome::Ignored);
    assert!(out.is_empty());
}

#[test]
fn dropping_the_table_frees_everything() {
    let mut h = harness(cfg());
    let c = rest(&h, 3600);
    h.allocate(client(1), &c, 1);
    h.permit(client(1), &c, 2, peer(1));
    let open = h.open.clone();
    let metrics = h.metrics.clone();
    drop(h);
    assert!(open.lock().unwrap().is_empty());
    let text = metrics.render();
    assert!(text.contains("switchboard_turn_allocations_deleted_total{reason=\"shutdown\"} 1"));
    assert!(text.contains("switchboard_turn_permissions_active 0"));
}

/// An Allocate step by step, as a shell drives it: the request and the table's Binds.
fn allocate_request(h: &mut H, from: SocketAddr, c: &Creds, attrs: &[(u16, Vec<u8>)]) -> Vec<u8> {
    h.challenge(from);
    let mut a = udp();
    a.extend_from_slice(attrs);
    h.encode(method::ALLOCATE, [7; 12], Some(c), &a, &[])
}

#[test]
fn allocate_asks_the_shell_for_a_socket_and_answers_when_it_comes() {
    let mut h = harness(cfg());
    let c = rest(&h, 3600);
    let buf = allocate_request(&mut h, client(1), &c, &[]);
    let msg = Message::parse(&buf).unwrap();
    let mut out = Vec::new();
    let Outcome::Bind(b) = h.t.handle_request(h.env, client(1), &msg, &mut out) else {
        panic!("no Bind");
    };
    // Nothing is answered, nothing allocated, before the socket is there.
    assert!(out.is_empty());
    assert!(h.t.is_empty());
    assert!(h.t.poll_event().is_none());
    assert_eq!(b.kind, RelayKind::Udp);
    assert!((50000..=50009).contains(&b.addr.port()));
    // A stale id is ignored and leaves the Allocate pending.
    let mut bind = h.bind();
    let env = h.env;
    assert_eq!(
        h.t.bound(env, b.id + 1, bind(b.addr, b.kind), &mut out),
        Outcome::Ignored
    );
    assert!(out.is_empty());
    // The bind fails (another process holds the port): the table asks for another port.
    let busy = Err(std::io::ErrorKind::AddrInUse.into());
    let Outcome::Bind(b2) = h.t.bound(env, b.id, busy, &mut out) else {
        panic!("no second Bind");
    };
    assert!(out.is_empty());
    assert_eq!(b2.id, b.id);
    assert_eq!(
        h.t.bound(env, b2.id, bind(b2.addr, b2.kind), &mut out),
        Outcome::Success
    );
    let r = Message::parse(&out).unwrap();
    assert_eq!(r.class(), Class::Success);
    assert_eq!(
        r.xor_address(attr::XOR_RELAYED_ADDRESS)
            .map(|a| a.unwrap().port()),
        Some(b2.addr.port())
    );
    // Created is queued for the shell, once.
    let Some(Event::Created {
        allocation,
        user,
        transport,
        relay,
    }) = h.t.poll_event()
    else {
        panic!("no Created event");
    };
    assert_eq!(
        (user.as_str(), transport, relay),
        ("bob", "udp", RelayKind::Udp)
    );
    assert!(h.t.poll_event().is_none());
    // Deleting queues Ended with the same id and the reason.
    assert!(h.t.delete(client(1), DeleteReason::Closed));
    match h.t.poll_event() {
        Some(Event::Ended {
            allocation: a,
            reason,
            ..
        }) => {
            assert_eq!(a, allocation);
            assert_eq!(reason, DeleteReason::Closed);
        }
        other => panic!("expected Ended, got {other:?}"),
    }
}

#[test]
fn an_allocate_whose_binds_all_fail_gets_508_and_gives_everything_back() {
    let mut h = harness(cfg());
    let c = rest(&h, 3600);
    let buf = allocate_request(&mut h, client(1), &c, &[]);
    let msg = Message::parse(&buf).unwrap();
    let mut out = Vec::new();
    let env = h.env;
    let mut o = h.t.handle_request(env, client(1), &msg, &mut out);
    let mut tries = 0;
    while let Outcome::Bind(b) = o {
        tries += 1;
        o = h.t.bound(
            env,
            b.id,
            Err(std::io::ErrorKind::AddrInUse.into()),
            &mut out,
        );
    }
    assert_eq!(o, Outcome::Error(508));
    assert_eq!(tries, 32);
    assert!(h.t.poll_event().is_none());
    let p = h.t.pool.audit();
    assert_eq!((p.total, p.ports.len()), (0, 0));
}

#[test]
fn even_port_with_the_r_bit_asks_for_two_adjacent_sockets() {
    let mut h = harness(cfg());
    let c = rest(&h, 3600);
    let buf = allocate_request(&mut h, client(1), &c, &[(attr::EVEN_PORT, vec![0x80])]);
    let msg = Message::parse(&buf).unwrap();
    let mut out = Vec::new();
    let env = h.env;
    let mut bind = h.bind();
    let Outcome::Bind(first) = h.t.handle_request(env, client(1), &msg, &mut out) else {
        panic!("no Bind");
    };
    assert_eq!(first.addr.port() % 2, 0);
    let Outcome::Bind(second) =
        h.t.bound(env, first.id, bind(first.addr, first.kind), &mut out)
    else {
        panic!("no second Bind");
    };
    assert_eq!(second.addr.port(), first.addr.port() + 1);
    assert!(out.is_empty());
    let o =
        h.t.bound(env, second.id, bind(second.addr, second.kind), &mut out);
    assert_eq!(o, Outcome::Success);
    let r = Message::parse(&out).unwrap();
    assert!(r.get(attr::RESERVATION_TOKEN).is_some());
    assert_eq!(h.open.lock().unwrap().len(), 2);
}

#[test]
fn a_bind_never_answered_is_given_back_by_the_next_request() {
    let mut h = harness(cfg());
    let c = rest(&h, 3600);
    let buf = allocate_request(&mut h, client(1), &c, &[]);
    let msg = Message::parse(&buf).unwrap();
    let mut out = Vec::new();
    let env = h.env;
    assert!(matches!(
        h.t.handle_request(env, client(1), &msg, &mut out),
        Outcome::Bind(_)
    ));
    assert_eq!(h.t.pool.audit().total, 1);
    // The shell never answers; the next request (here a new Allocate) starts clean.
    let r = h.allocate(client(2), &c, 3);
    assert_eq!(r.outcome, Outcome::Success);
    let p = h.t.pool.audit();
    assert_eq!((p.total, p.ports.len()), (1, 1));
}
