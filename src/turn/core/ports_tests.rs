//! Quotas, the relay port pool and EVEN-PORT reservations, through the dispatcher.

use super::super::test_support::*;

#[test]
fn per_user_quota_486_and_total_508() {
    let mut t = cfg();
    t.max_allocations = 4;
    let mut h = harness(t);
    let c = rest(&h, 3600);
    for i in 1..=3 {
        assert_eq!(h.allocate(client(i), &c, i as u8).outcome, Outcome::Success);
    }
    let r = h.allocate(client(4), &c, 4);
    assert_eq!(r.code(), Some(486));
    assert!(r
        .msg()
        .verify_integrity(&long_term_key(&c.user, REALM, &c.pass)));
    // A fresh REST credential for the same user counts against the same quota.
    let c2 = rest(&h, 7200);
    assert_eq!(h.allocate(client(5), &c2, 5).code(), Some(486));
    let alice = Creds {
        user: "alice".into(),
        pass: "wonder".into(),
        sha256: false,
    };
    assert_eq!(h.allocate(client(6), &alice, 6).outcome, Outcome::Success);
    assert_eq!(h.allocate(client(7), &alice, 7).code(), Some(508));
    // Releasing one makes room again.
    h.t.delete(client(1), DeleteReason::Closed);
    assert_eq!(h.allocate(client(8), &c, 8).outcome, Outcome::Success);
}

#[test]
fn port_exhaustion_and_busy_ports_give_508() {
    let mut t = cfg();
    t.relay_port_min = 50000;
    t.relay_port_max = 50001;
    t.max_allocations_per_user = 10;
    let mut h = harness(t);
    h.busy.insert(50000);
    let c = rest(&h, 3600);
    assert_eq!(h.allocate(client(1), &c, 1).outcome, Outcome::Success);
    assert_eq!(h.t.relayed_address(client(1)).unwrap().port(), 50001);
    assert_eq!(h.allocate(client(2), &c, 2).code(), Some(508));
    assert_eq!(
        h.t.pool.total(),
        1,
        "refused allocation gives its quota back"
    );
}

#[test]
fn even_port_with_reservation() {
    let mut t = cfg();
    t.max_allocations_per_user = 10;
    let mut h = harness(t);
    let c = rest(&h, 3600);
    h.challenge(client(1));
    let mut a = udp();
    a.push((attr::EVEN_PORT, vec![0x80]));
    let r = h.send(client(1), method::ALLOCATE, [1; 12], Some(&c), &a, &[]);
    assert_eq!(r.outcome, Outcome::Success, "{:?}", r.code());
    let port = h.t.relayed_address(client(1)).unwrap().port();
    assert_eq!(port % 2, 0);
    let token = r.msg().get(attr::RESERVATION_TOKEN).unwrap().to_vec();
    assert_eq!(token.len(), 8);
    assert!(h.open.lock().unwrap().contains(&(port + 1)));
    let mut a = udp();
    a.push((attr::RESERVATION_TOKEN, token.clone()));
    let r = h.send(client(2), method::ALLOCATE, [2; 12], Some(&c), &a, &[]);
    assert_eq!(r.outcome, Outcome::Success, "{:?}", r.code());
    assert_eq!(h.t.relayed_address(client(2)).unwrap().port(), port + 1);
    let r = h.send(client(3), method::ALLOCATE, [3; 12], Some(&c), &a, &[]);
    assert_eq!(r.code(), Some(508), "token used up");
    // An unused reservation is released after 30 s.
    let mut a = udp();
    a.push((attr::EVEN_PORT, vec![0x80]));
    h.send(client(4), method::ALLOCATE, [4; 12], Some(&c), &a, &[]);
    let p4 = h.t.relayed_address(client(4)).unwrap().port();
    assert!(h.open.lock().unwrap().contains(&(p4 + 1)));
    h.env.now += RESERVATION_LIFETIME;
    h.t.handle_timeout(h.env);
    assert!(!h.open.lock().unwrap().contains(&(p4 + 1)));
    // EVEN-PORT without R: even port, no token.
    let mut a = udp();
    a.push((attr::EVEN_PORT, vec![0x00]));
    let r = h.send(client(5), method::ALLOCATE, [5; 12], Some(&c), &a, &[]);
    assert!(r.msg().get(attr::RESERVATION_TOKEN).is_none());
    assert_eq!(h.t.relayed_address(client(5)).unwrap().port() % 2, 0);
}
