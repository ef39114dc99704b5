//! Bad credentials, bad peers, quotas and malformed requests get the RFC's error codes, and
//! the server keeps serving everyone afterwards.

use crate::support::turn_common;
use std::net::SocketAddr;
use std::time::Duration;

use switchboard::stun::codec::{attr, long_term_key, method, Class};
use turn_common::*;

fn rest_user(expiry: u64) -> (String, String) {
    let user = format!("{expiry}:bob");
    let pass = switchboard::auth::rest_password(SECRET.as_bytes(), &user);
    (user, pass)
}

fn in_an_hour() -> u64 {
    switchboard::auth::unix_now() + 3600
}

#[tokio::test]
async fn expired_and_forged_credentials_get_401() {
    let server = start("").await;
    let addr = udp_addr(&server);
    let mut c = Raw::new(addr).await;
    let (user, pass) = rest_user(switchboard::auth::unix_now() - 5);
    let r = c.allocate(&user, &pass).await;
    assert_eq!(r.code(), Some(401), "expired REST username");
    assert!(r.msg().get(attr::NONCE).is_some());
    let (user, _) = rest_user(in_an_hour());
    let r = c.allocate(&user, "Zm9yZ2VkIHBhc3N3b3Jk").await;
    assert_eq!(r.code(), Some(401), "forged password");
    let r = c.allocate(USER, "not-the-password").await;
    assert_eq!(r.code(), Some(401), "wrong static password");
    assert!(Raw::server_alive(addr).await);
    // The same socket can still allocate with good credentials.
    let (user, pass) = rest_user(in_an_hour());
    let r = c.allocate(&user, &pass).await;
    assert_eq!(r.msg().class(), Class::Success);
    let text = server.shared().metrics.render();
    assert_eq!(
        metric(&text, "switchboard_auth_failures_total{reason=\"expired\"}"),
        1
    );
    assert!(
        metric(
            &text,
            "switchboard_auth_failures_total{reason=\"bad_signature\"}"
        ) >= 2
    );
    assert!(
        metric(
            &text,
            "switchboard_turn_error_responses_total{code=\"401\"}"
        ) >= 3
    );
    server.shutdown();
}

#[tokio::test]
async fn denied_peer_gets_403() {
    // An explicit allow list that does not cover loopback turns the loopback default off.
    let server = start("allow_peers = [\"192.0.2.0/24\"]").await;
    let addr = udp_addr(&server);
    let mut c = Raw::new(addr).await;
    assert_eq!(c.allocate(USER, PASS).await.msg().class(), Class::Success);
    let creds = Some((USER, PASS));
    for peer in [
        "127.0.0.1:9",
        "10.0.0.1:9",
        "169.254.169.254:80",
        "0.0.0.0:1",
    ] {
        let p: SocketAddr = peer.parse().unwrap();
        let r = c.request(method::CREATE_PERMISSION, &[], &[p], creds).await;
        assert_eq!(r.code(), Some(403), "CreatePermission to {peer}");
        let r = c
            .request(
                method::CHANNEL_BIND,
                &[(attr::CHANNEL_NUMBER, vec![0x40, 0x01, 0, 0])],
                &[p],
                creds,
            )
            .await;
        assert_eq!(r.code(), Some(403), "ChannelBind to {peer}");
    }
    let ok: SocketAddr = "192.0.2.7:9".parse().unwrap();
    let r = c
        .request(method::CREATE_PERMISSION, &[], &[ok], creds)
        .await;
    assert_eq!(r.msg().class(), Class::Success, "allowed peer");
    assert!(Raw::server_alive(addr).await);
    server.shutdown();
}

#[tokio::test]
async fn stale_nonce_gets_438_then_succeeds_with_the_fresh_one() {
    let server = start("nonce_lifetime_secs = 1").await;
    let addr = udp_addr(&server);
    let mut c = Raw::new(addr).await;
    c.challenge().await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = c
        .request(method::ALLOCATE, &udp_transport(), &[], Some((USER, PASS)))
        .await;
    assert_eq!(r.code(), Some(438));
    assert!(r.msg().get(attr::REALM).is_some());
    // `request` kept the fresh nonce from the 438.
    let r = c
        .request(method::ALLOCATE, &udp_transport(), &[], Some((USER, PASS)))
        .await;
    assert_eq!(r.msg().class(), Class::Success);
    server.shutdown();
}

#[tokio::test]
async fn per_user_quota_gets_486() {
    let server = start("max_allocations_per_user = 2").await;
    let addr = udp_addr(&server);
    let (user, pass) = rest_user(in_an_hour());
    let mut clients = Vec::new();
    for _ in 0..2 {
        let mut c = Raw::new(addr).await;
        assert_eq!(c.allocate(&user, &pass).await.msg().class(), Class::Success);
        clients.push(c);
    }
    let mut third = Raw::new(addr).await;
    let r = third.allocate(&user, &pass).await;
    assert_eq!(r.code(), Some(486));
    assert!(r
        .msg()
        .verify_integrity(&long_term_key(&user, "switchboard", &pass)));
    // Another user is unaffected; releasing one allocation frees the quota.
    let mut other = Raw::new(addr).await;
    assert_eq!(
        other.allocate(USER, PASS).await.msg().class(),
        Class::Success
    );
    let r = clients[0]
        .request(
            method::REFRESH,
            &[(attr::LIFETIME, vec![0, 0, 0, 0])],
            &[],
            Some((&user, &pass)),
        )
        .await;
    assert_eq!(r.msg().class(), Class::Success);
    let r = third
        .request(
            method::ALLOCATE,
            &udp_transport(),
            &[],
            Some((&user, &pass)),
        )
        .await;
    assert_eq!(r.msg().class(), Class::Success);
    server.shutdown();
}

#[tokio::test]
async fn malformed_attributes_get_400_and_the_server_keeps_serving() {
    let server = start("").await;
    let addr = udp_addr(&server);
    let mut c = Raw::new(addr).await;
    let creds = Some((USER, PASS));
    c.challenge().await;
    let r = c
        .request(
            method::ALLOCATE,
            &[(attr::REQUESTED_TRANSPORT, vec![17])],
            &[],
            creds,
        )
        .await;
    assert_eq!(r.code(), Some(400), "short REQUESTED-TRANSPORT");
    let r = c
        .request(
            method::ALLOCATE,
            &[
                (attr::REQUESTED_TRANSPORT, vec![17, 0, 0, 0]),
                (attr::LIFETIME, vec![1, 2]),
            ],
            &[],
            creds,
        )
        .await;
    assert_eq!(r.code(), Some(400), "short LIFETIME");
    let r = c
        .request(
            method::ALLOCATE,
            &[(attr::REQUESTED_TRANSPORT, vec![6, 0, 0, 0])],
            &[],
            creds,
        )
        .await;
    assert_eq!(r.code(), Some(442), "TCP relay over this transport");
    assert_eq!(
        c.request(method::ALLOCATE, &udp_transport(), &[], creds)
            .await
            .msg()
            .class(),
        Class::Success
    );
    let r = c
        .request(
            method::CREATE_PERMISSION,
            &[(attr::XOR_PEER_ADDRESS, vec![0, 9, 0, 0, 1, 2, 3, 4])],
            &[],
            creds,
        )
        .await;
    assert_eq!(
        r.code(),
        Some(400),
        "bad address family in XOR-PEER-ADDRESS"
    );
    let r = c
        .request(
            method::CHANNEL_BIND,
            &[(attr::CHANNEL_NUMBER, vec![0x40])],
            &["127.0.0.1:9".parse().unwrap()],
            creds,
        )
        .await;
    assert_eq!(r.code(), Some(400), "short CHANNEL-NUMBER");
    let r = c
        .request(
            method::CHANNEL_BIND,
            &[(attr::CHANNEL_NUMBER, vec![0x20, 0, 0, 0])],
            &["127.0.0.1:9".parse().unwrap()],
            creds,
        )
        .await;
    assert_eq!(r.code(), Some(400), "channel number out of range");
    let r = c
        .request(method::ALLOCATE, &udp_transport(), &[], creds)
        .await;
    assert_eq!(r.code(), Some(437), "second allocation on the same 5-tuple");
    let r = c
        .request(method::REFRESH, &[(0x7ff0, vec![0; 4])], &[], creds)
        .await;
    assert_eq!(
        r.code(),
        Some(420),
        "unknown comprehension-required attribute"
    );
    // Garbage datagrams are dropped without disturbing anyone.
    c.sock
        .send_to(b"\x00\x03\x00\x08garbage!", addr)
        .await
        .unwrap();
    c.sock
        .send_to(&[0x40, 0x00, 0xff, 0xff], addr)
        .await
        .unwrap();
    c.sock.send_to(&[0xff; 40], addr).await.unwrap();
    assert!(Raw::server_alive(addr).await);
    let r = c.request(method::REFRESH, &[], &[], creds).await;
    assert_eq!(r.msg().class(), Class::Success, "the allocation survived");
    server.shutdown();
}

#[tokio::test]
async fn relay_disabled_refuses_turn_methods_but_answers_binding() {
    let server = start("relay = false").await;
    let addr = udp_addr(&server);
    let mut c = Raw::new(addr).await;
    let r = c
        .request(method::ALLOCATE, &udp_transport(), &[], None)
        .await;
    assert_eq!(r.code(), Some(400));
    assert!(Raw::server_alive(addr).await);
    server.shutdown();
}
