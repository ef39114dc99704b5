//! Nonces and the long-term credential checks, through the dispatcher.

use super::super::test_support::*;

#[test]
fn no_credentials_gets_401_with_realm_nonce_and_algorithms() {
    let mut h = harness(cfg());
    let r = h.challenge(client(1));
    let m = r.msg();
    assert_eq!(m.get(attr::REALM).unwrap(), REALM.as_bytes());
    assert!(m.get(attr::NONCE).unwrap().starts_with(b"obMatJos2"));
    assert_eq!(
        m.get(attr::PASSWORD_ALGORITHMS).unwrap(),
        &[0, 1, 0, 0, 0, 2, 0, 0]
    );
    assert!(!m.has_integrity());
    assert!(h.metric("switchboard_auth_failures_total{reason=\"missing\"} 1"));
    assert!(h.metric("switchboard_turn_error_responses_total{code=\"401\"} 1"));
}

#[test]
fn static_user_and_sha256_integrity() {
    let mut h = harness(cfg());
    let c = Creds {
        user: "alice".into(),
        pass: "wonder".into(),
        sha256: true,
    };
    let r = h.allocate(client(1), &c, 1);
    assert_eq!(r.outcome, Outcome::Success, "{:?}", r.code());
    let m = r.msg();
    assert!(m.verify_integrity_sha256(&long_term_key_sha256("alice", REALM, "wonder")));
    assert!(!m.has_integrity());
    let bad = Creds {
        pass: "nope".into(),
        ..c
    };
    let r = h.allocate(client(2), &bad, 2);
    assert_eq!(r.code(), Some(401));
    // Unknown PASSWORD-ALGORITHM is a bad request.
    h.challenge(client(3));
    let mut buf = Vec::new();
    let mut e = Encoder::new(&mut buf, method::ALLOCATE, Class::Request, &[4; 12]);
    e.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    e.attr(attr::USERNAME, b"alice");
    e.attr(attr::REALM, REALM.as_bytes());
    e.attr(attr::NONCE, &h.nonce);
    e.attr(attr::PASSWORD_ALGORITHM, &[0, 9, 0, 0]);
    e.integrity_sha256(&long_term_key_sha256("alice", REALM, "wonder"));
    e.finish();
    let msg = Message::parse(&buf).unwrap();
    let mut out = Vec::new();
    let o = h.request(client(3), &msg, &mut out);
    assert_eq!(o, Outcome::Error(400));
}

#[test]
fn wrong_expired_unknown_credentials_get_401() {
    let mut h = harness(cfg());
    let mut forged = rest(&h, 3600);
    forged.pass = "Zm9yZ2Vk".into();
    assert_eq!(h.allocate(client(1), &forged, 1).code(), Some(401));
    assert!(h.metric("switchboard_auth_failures_total{reason=\"bad_signature\"} 1"));
    let expired = rest(&h, -10);
    let r = h.allocate(client(2), &expired, 2);
    assert_eq!(r.code(), Some(401));
    assert!(r.msg().get(attr::NONCE).is_some());
    assert!(h.metric("switchboard_auth_failures_total{reason=\"expired\"} 1"));
    let unknown = Creds {
        user: "mallory".into(),
        pass: "x".into(),
        sha256: false,
    };
    assert_eq!(h.allocate(client(3), &unknown, 3).code(), Some(401));
    let wrong_realm = {
        let c = rest(&h, 3600);
        h.challenge(client(4));
        let mut buf = Vec::new();
        let mut e = Encoder::new(&mut buf, method::ALLOCATE, Class::Request, &[5; 12]);
        e.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        e.attr(attr::USERNAME, c.user.as_bytes());
        e.attr(attr::REALM, b"other");
        e.attr(attr::NONCE, &h.nonce);
        e.integrity(&long_term_key(&c.user, "other", &c.pass));
        e.finish();
        buf
    };
    let msg = Message::parse(&wrong_realm).unwrap();
    let mut out = Vec::new();
    assert_eq!(h.request(client(4), &msg, &mut out), Outcome::Error(401));
}

#[test]
fn integrity_without_username_is_400() {
    let mut h = harness(cfg());
    let mut buf = Vec::new();
    let mut e = Encoder::new(&mut buf, method::ALLOCATE, Class::Request, &[5; 12]);
    e.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    e.integrity(b"whatever");
    e.finish();
    let msg = Message::parse(&buf).unwrap();
    let mut out = Vec::new();
    assert_eq!(h.request(client(1), &msg, &mut out), Outcome::Error(400));
}

#[test]
fn stale_and_forged_nonces_get_438_with_fresh_nonce() {
    let mut h = harness(cfg());
    let c = rest(&h, 100_000);
    h.challenge(client(1));
    let old = h.nonce.clone();
    h.env.unix += 601;
    h.env.now += Duration::from_secs(601);
    let r = h.send(client(1), method::ALLOCATE, [1; 12], Some(&c), &udp(), &[]);
    assert_eq!(r.code(), Some(438));
    let fresh = r.msg().get(attr::NONCE).unwrap().to_vec();
    assert_ne!(fresh, old);
    assert_eq!(r.msg().get(attr::REALM).unwrap(), REALM.as_bytes());
    h.nonce = fresh;
    let r = h.send(client(1), method::ALLOCATE, [2; 12], Some(&c), &udp(), &[]);
    assert_eq!(r.outcome, Outcome::Success);
    // A nonce we never issued is refused the same way.
    h.nonce = b"obMatJos2gAAA0000000000000000000000000000000000".to_vec();
    let r = h.send(client(2), method::ALLOCATE, [3; 12], Some(&c), &udp(), &[]);
    assert_eq!(r.code(), Some(438));
    h.nonce = b"plain".to_vec();
    let r = h.send(client(2), method::ALLOCATE, [3; 12], Some(&c), &udp(), &[]);
    assert_eq!(r.code(), Some(438));
}

#[test]
fn requests_on_an_allocation_use_its_stored_key_even_after_expiry() {
    let mut h = harness(cfg());
    let c = rest(&h, 60);
    h.allocate(client(1), &c, 1);
    // The REST username expires; the allocation keeps refreshing with its stored key.
    h.env.unix += 120;
    h.env.now += Duration::from_secs(120);
    h.challenge(client(9));
    let life = vec![(attr::LIFETIME, 600u32.to_be_bytes().to_vec())];
    let r = h.send(client(1), method::REFRESH, [2; 12], Some(&c), &life, &[]);
    assert_eq!(r.outcome, Outcome::Success, "{:?}", r.code());
    // A new allocation with the same expired username is refused.
    assert_eq!(h.allocate(client(2), &c, 3).code(), Some(401));
    // Another user's valid credentials on this 5-tuple are 441.
    let other = rest(&h, 3600);
    let r = h.send(
        client(1),
        method::REFRESH,
        [4; 12],
        Some(&other),
        &life,
        &[],
    );
    assert_eq!(r.code(), Some(441));
    // The right username with a wrong password is 401.
    let forged = Creds {
        pass: "bad".into(),
        ..c.clone()
    };
    let r = h.send(
        client(1),
        method::REFRESH,
        [5; 12],
        Some(&forged),
        &life,
        &[],
    );
    assert_eq!(r.code(), Some(401));
}
