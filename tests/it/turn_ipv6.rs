//! IPv6 relays (RFC 6156): REQUESTED-ADDRESS-FAMILY IPv6 gets a relay on ::1, reached from
//! IPv4 and IPv6 client connections, over UDP and TCP, with no loss.

use crate::support::turn_common;
use std::net::SocketAddr;

use switchboard::stun::codec::{attr, method, Class};
use turn_common::*;

fn v6(s: &switchboard::RunningServer, tcp: bool) -> SocketAddr {
    let b = s.bound();
    let list = if tcp { b.tcp } else { b.udp };
    list.into_iter()
        .find(|a| a.is_ipv6())
        .expect("a v6 listener")
}

fn assert_clean(r: &Report, want: u64) {
    assert_eq!(r.sent, want, "{}", r.output);
    assert_eq!(r.received, want, "{}", r.output);
    assert_eq!(r.lost, 0, "{}", r.output);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_relays_from_v4_and_v6_clients() {
    // Both listeners on loopback; the v6 one also gives the v6 relay address.
    let server =
        start("listen = [\"127.0.0.1:0\", \"[::1]:0\"]\nmax_allocations_per_user = 100").await;
    let peer = start_peer_on("::1").await;
    let common = ["-x", "-W", SECRET, "-n", "20", "-l", "120", "-z", "5"];
    let r = uclient_to(udp_addr(&server), "::1", peer.port, &common).await;
    assert_clean(&r, 40);
    let r = uclient_to(v6(&server, false), "::1", peer.port, &common).await;
    assert_clean(&r, 40);
    let mut tcp = vec!["-t", "-s"];
    tcp.extend_from_slice(&common);
    let r = uclient_to(v6(&server, true), "::1", peer.port, &tcp).await;
    assert_clean(&r, 40);
    server.shutdown();
}

#[tokio::test]
async fn ipv6_relay_without_a_v6_address_is_440_and_family_mismatch_is_443() {
    let server = start("").await;
    let mut c = Raw::new(udp_addr(&server)).await;
    c.challenge().await;
    let mut attrs = udp_transport();
    attrs.push((attr::REQUESTED_ADDRESS_FAMILY, vec![2, 0, 0, 0]));
    let r = c
        .request(method::ALLOCATE, &attrs, &[], Some((USER, PASS)))
        .await;
    assert_eq!(r.code(), Some(440));
    let r = c
        .request(method::ALLOCATE, &udp_transport(), &[], Some((USER, PASS)))
        .await;
    assert_eq!(r.msg().class(), Class::Success);
    let r = c
        .request(
            method::CREATE_PERMISSION,
            &[],
            &["[::1]:9".parse().unwrap()],
            Some((USER, PASS)),
        )
        .await;
    assert_eq!(r.code(), Some(443), "IPv6 peer on an IPv4 relay");
    server.shutdown();
}
