//! Allocate, Refresh, permissions, channels, the data path and timers, through the dispatcher.

use super::super::test_support::*;

#[test]
fn allocate_success_with_rest_credentials() {
    let mut h = harness(cfg());
    let c = rest(&h, 3600);
    let r = h.allocate(client(1), &c, 1);
    assert_eq!(r.outcome, Outcome::Success, "{:?}", r.code());
    let m = r.msg();
    assert_eq!(m.class(), Class::Success);
    let relayed = m.xor_address(attr::XOR_RELAYED_ADDRESS).unwrap().unwrap();
    assert_eq!(relayed.ip(), IpAddr::from([127, 0, 0, 1]));
    assert!((50000..=50009).contains(&relayed.port()));
    assert_eq!(
        m.xor_address(attr::XOR_MAPPED_ADDRESS).unwrap().unwrap(),
        client(1)
    );
    assert_eq!(decode_u32(m.get(attr::LIFETIME).unwrap()).unwrap(), 600);
    assert!(m.verify_integrity(&long_term_key(&c.user, REALM, &c.pass)));
    assert!(m.has_fingerprint());
    assert_eq!(h.t.relayed_address(client(1)), Some(relayed));
    assert_eq!(h.view().client, Some(client(1)));
    assert!(h.metric("switchboard_turn_allocations_active{transport=\"udp\"} 1"));
    assert!(h.metric("switchboard_turn_allocations_created_total{transport=\"udp\"} 1"));
}

#[test]
fn allocate_errors_transport_family_and_malformed() {
    let mut h = harness(cfg());
    let c = rest(&h, 3600);
    h.challenge(client(1));
    let tcp = vec![(attr::REQUESTED_TRANSPORT, vec![6, 0, 0, 0])];
    let r = h.send(client(1), method::ALLOCATE, [1; 12], Some(&c), &tcp, &[]);
    assert_eq!(r.code(), Some(442));
    assert!(r
        .msg()
        .verify_integrity(&long_term_key(&c.user, REALM, &c.pass)));
    let r = h.send(client(1), method::ALLOCATE, [2; 12], Some(&c), &[], &[]);
    assert_eq!(r.code(), Some(400), "missing REQUESTED-TRANSPORT");
    let bad_len = vec![(attr::REQUESTED_TRANSPORT, vec![17, 0])];
    let r = h.send(
        client(1),
        method::ALLOCATE,
        [3; 12],
        Some(&c),
        &bad_len,
        &[],
    );
    assert_eq!(r.code(), Some(400));
    let mut a = udp();
    a.push((attr::LIFETIME, vec![0, 0, 1]));
    let r = h.send(client(1), method::ALLOCATE, [4; 12], Some(&c), &a, &[]);
    assert_eq!(r.code(), Some(400), "short LIFETIME");
    let mut a = udp();
    a.push((attr::REQUESTED_ADDRESS_FAMILY, vec![2, 0, 0, 0]));
    let r = h.send(client(1), method::ALLOCATE, [5; 12], Some(&c), &a, &[]);
    assert_eq!(r.code(), Some(440), "no IPv6 relay address configured");
    let mut a = udp();
    a.push((attr::REQUESTED_ADDRESS_FAMILY, vec![7, 0, 0, 0]));
    let r = h.send(client(1), method::ALLOCATE, [6; 12], Some(&c), &a, &[]);
    assert_eq!(r.code(), Some(440));
    let mut a = udp();
    a.push((attr::RESERVATION_TOKEN, vec![1; 8]));
    a.push((attr::EVEN_PORT, vec![0]));
    let r = h.send(client(1), method::ALLOCATE, [7; 12], Some(&c), &a, &[]);
    assert_eq!(r.code(), Some(400), "EVEN-PORT with RESERVATION-TOKEN");
    let mut a = udp();
    a.push((attr::RESERVATION_TOKEN, vec![1; 8]));
    let r = h.send(client(1), method::ALLOCATE, [8; 12], Some(&c), &a, &[]);
    assert_eq!(r.code(), Some(508), "unknown reservation token");
    let mut a = udp();
    a.push((0x7777, vec![1, 2, 3, 4]));
    let r = h.send(client(1), method::ALLOCATE, [10; 12], Some(&c), &a, &[]);
    assert_eq!(r.code(), Some(420));
    assert_eq!(
        r.msg().get(attr::UNKNOWN_ATTRIBUTES).unwrap(),
        &[0x77, 0x77]
    );
    // After all that, a good request still works.
    let r = h.send(client(1), method::ALLOCATE, [11; 12], Some(&c), &udp(), &[]);
    assert_eq!(r.outcome, Outcome::Success);
    assert_eq!(h.t.len(), 1);
}

#[test]
fn lifetime_is_clamped_and_dont_fragment_accepted() {
    let mut h = harness(cfg());
    let c = rest(&h, 3600);
    h.challenge(client(1));
    let mut a = udp();
    a.push((attr::LIFETIME, 99_999u32.to_be_bytes().to_vec()));
    a.push((attr::DONT_FRAGMENT, vec![]));
    let r = h.send(client(1), method::ALLOCATE, [1; 12], Some(&c), &a, &[]);
    assert_eq!(
        decode_u32(r.msg().get(attr::LIFETIME).unwrap()).unwrap(),
        3600
    );
    let mut a = udp();
    a.push((attr::LIFETIME, 5u32.to_be_bytes().to_vec()));
    let r = h.send(client(2), method::ALLOCATE, [2; 12], Some(&c), &a, &[]);
    assert_eq!(
        decode_u32(r.msg().get(attr::LIFETIME).unwrap()).unwrap(),
        600
    );
    // LIFETIME 0 on Allocate is a short request, not a delete: the default, and it lives.
    let mut a = udp();
    a.push((attr::LIFETIME, 0u32.to_be_bytes().to_vec()));
    let r = h.send(client(3), method::ALLOCATE, [3; 12], Some(&c), &a, &[]);
    assert_eq!(r.outcome, Outcome::Success);
    assert_eq!(
        decode_u32(r.msg().get(attr::LIFETIME).unwrap()).unwrap(),
        600
    );
    h.t.handle_timeout(h.env);
    assert!(h.t.relayed_address(client(3)).is_some());
}

#[test]
fn second_allocate_is_437_but_retransmit_gets_cached_response() {
    let mut h = harness(cfg());
    let c = rest(&h, 3600);
    let first = h.allocate(client(1), &c, 1);
    assert_eq!(first.outcome, Outcome::Success);
    let again = h.send(client(1), method::ALLOCATE, [1; 12], Some(&c), &udp(), &[]);
    assert_eq!(again.outcome, Outcome::Retransmit);
    assert_eq!(again.raw, first.raw);
    let other = h.send(client(1), method::ALLOCATE, [2; 12], Some(&c), &udp(), &[]);
    assert_eq!(other.code(), Some(437));
    assert_eq!(h.t.len(), 1);
}

#[test]
fn refresh_extends_and_zero_deletes() {
    let mut h = harness(cfg());
    let c = rest(&h, 3600);
    h.allocate(client(1), &c, 1);
    let port = h.t.relayed_address(client(1)).unwrap().port();
    assert!(h.open.lock().unwrap().contains(&port));
    let life = |v: u32| vec![(attr::LIFETIME, v.to_be_bytes().to_vec())];
    let r = h.send(
        client(1),
        method::REFRESH,
        [2; 12],
        Some(&c),
        &life(1200),
        &[],
    );
    assert_eq!(r.outcome, Outcome::Success);
    assert_eq!(
        decode_u32(r.msg().get(attr::LIFETIME).unwrap()).unwrap(),
        1200
    );
    let r = h.send(client(1), method::REFRESH, [3; 12], Some(&c), &life(0), &[]);
    assert_eq!(decode_u32(r.msg().get(attr::LIFETIME).unwrap()).unwrap(), 0);
    assert!(h.t.is_empty());
    assert!(
        !h.open.lock().unwrap().contains(&port),
        "relay socket freed"
    );
    assert!(h.metric("switchboard_turn_allocations_deleted_total{reason=\"refreshed_zero\"} 1"));
    let r = h.send(
        client(1),
        method::REFRESH,
        [4; 12],
        Some(&c),
        &life(600),
        &[],
    );
    assert_eq!(r.code(), Some(437), "no allocation");
    let fam = vec![(attr::REQUESTED_ADDRESS_FAMILY, vec![2, 0, 0, 0])];
    h.allocate(client(2), &c, 5);
    let r = h.send(client(2), method::REFRESH, [6; 12], Some(&c), &fam, &[]);
    assert_eq!(r.code(), Some(443));
}

#[test]
fn create_permission_several_peers_denied_and_mismatch() {
    let mut h = harness(cfg());
    let c = rest(&h, 3600);
    h.allocate(client(1), &c, 1);
    let r = h.send(
        client(1),
        method::CREATE_PERMISSION,
        [2; 12],
        Some(&c),
        &[],
        &[
            peer(1000),
            SocketAddr::from(([127, 0, 0, 2], 1)),
            peer(2000),
        ],
    );
    assert_eq!(r.outcome, Outcome::Success, "{:?}", r.code());
    let v = h.view();
    assert_eq!(v.perms.len(), 2);
    assert!(v.permits(IpAddr::from([127, 0, 0, 2]), h.env.now));
    assert!(h.metric("switchboard_turn_permissions_active 2"));
    let r = h.permit(client(1), &c, 3, SocketAddr::from(([10, 0, 0, 1], 5)));
    assert_eq!(r.code(), Some(403));
    let r = h.permit(
        client(1),
        &c,
        4,
        SocketAddr::from(([169, 254, 169, 254], 80)),
    );
    assert_eq!(r.code(), Some(403));
    let r = h.permit(client(1), &c, 5, "[2001:db8::1]:5".parse().unwrap());
    assert_eq!(r.code(), Some(443));
    let r = h.send(
        client(1),
        method::CREATE_PERMISSION,
        [6; 12],
        Some(&c),
        &[],
        &[],
    );
    assert_eq!(r.code(), Some(400), "no XOR-PEER-ADDRESS");
    let r = h.send(
        client(1),
        method::CREATE_PERMISSION,
        [7; 12],
        Some(&c),
        &[(attr::XOR_PEER_ADDRESS, vec![0, 1, 0])],
        &[],
    );
    assert_eq!(r.code(), Some(400), "malformed XOR-PEER-ADDRESS");
    let r = h.permit(client(2), &c, 8, peer(1));
    assert_eq!(r.code(), Some(437), "no allocation on this 5-tuple");
}

#[test]
fn permission_cap_is_all_or_nothing_and_refreshes_still_fit() {
    let mut h = harness(cfg());
    let c = rest(&h, 3600);
    h.allocate(client(1), &c, 1);
    let at = |a: u8, b: u8| SocketAddr::from(([127, 1, a, b], 9));
    let mut tid = 2u8;
    let mut create = |h: &mut H, peers: &[SocketAddr]| {
        tid += 1;
        h.send(
            client(1),
            method::CREATE_PERMISSION,
            [tid; 12],
            Some(&c),
            &[],
            peers,
        )
    };
    // One short of the cap.
    let first: Vec<SocketAddr> = (1..MAX_PERMISSIONS)
        .map(|i| at((i / 250) as u8, (i % 250) as u8 + 1))
        .collect();
    assert_eq!(create(&mut h, &first).outcome, Outcome::Success);
    assert_eq!(h.view().perms.len(), MAX_PERMISSIONS - 1);
    // Two new peers would pass the cap: refused whole, nothing granted.
    let two = [at(9, 1), at(9, 2)];
    assert_eq!(create(&mut h, &two).code(), Some(508));
    assert_eq!(h.view().perms.len(), MAX_PERMISSIONS - 1);
    assert!(!h.view().permits(at(9, 1).ip(), h.env.now));
    // A known peer plus one new one reaches it exactly.
    assert_eq!(
        create(&mut h, &[first[0], at(9, 1)]).outcome,
        Outcome::Success
    );
    assert_eq!(h.view().perms.len(), MAX_PERMISSIONS);
    // At the cap, refreshing held permissions still works; any new one is refused.
    assert_eq!(create(&mut h, &first[..3]).outcome, Outcome::Success);
    assert_eq!(create(&mut h, &[at(9, 3)]).code(), Some(508));
    assert!(h.metric(&format!(
        "switchboard_turn_permissions_active {MAX_PERMISSIONS}"
    )));
}

#[test]
fn permissions_expire_after_300_seconds_unless_refreshed() {
    let mut h = harness(cfg());
    let c = rest(&h, 100_000);
    h.allocate(client(1), &c, 1);
    h.permit(client(1), &c, 2, peer(1));
    let deadline = h.t.next_deadline().unwrap();
    assert_eq!(deadline, h.env.now + PERMISSION_LIFETIME);
    h.env.now = deadline;
    h.t.handle_timeout(h.env);
    assert!(h.view().perms.is_empty());
    assert!(h.metric("switchboard_turn_permissions_active 0"));
    let send = send_ind(peer(1), b"x");
    let m = Message::parse(&send).unwrap();
    assert!(h.t.send_indication(h.env.now, client(1), &m).is_none());
}

#[test]
fn channel_bind_rules_and_channel_data() {
    let mut h = harness(cfg());
    let c = rest(&h, 100_000);
    h.allocate(client(1), &c, 1);
    let r = h.send(
        client(1),
        method::CHANNEL_BIND,
        [2; 12],
        Some(&c),
        &chan_attr(0x4000),
        &[peer(1000)],
    );
    assert_eq!(r.outcome, Outcome::Success, "{:?}", r.code());
    let v = h.view();
    assert_eq!(v.channel_for(peer(1000), h.env.now), Some(0x4000));
    assert!(
        v.permits(peer(1000).ip(), h.env.now),
        "bind installs permission"
    );
    // The bound peer gets ChannelData; another port of the same IP (permitted by the IP-wide
    // permission) gets Data indications; an IP without a permission gets nothing.
    assert_eq!(v.route(peer(1000), h.env.now), PeerRoute::Channel(0x4000));
    let same_ip = SocketAddr::new(peer(1000).ip(), peer(1000).port() + 1);
    assert_eq!(v.route(same_ip, h.env.now), PeerRoute::Indication);
    let stranger = SocketAddr::from(([192, 0, 2, 99], peer(1000).port()));
    assert_eq!(v.route(stranger, h.env.now), PeerRoute::Denied);
    let later = h.env.now + CHANNEL_LIFETIME + Duration::from_secs(1);
    assert_eq!(v.route(peer(1000), later), PeerRoute::Denied, "all expired");
    // Rebinding the same pair refreshes it.
    let r = h.send(
        client(1),
        method::CHANNEL_BIND,
        [3; 12],
        Some(&c),
        &chan_attr(0x4000),
        &[peer(1000)],
    );
    assert_eq!(r.outcome, Outcome::Success);
    for (tid, num, p, code) in [
        (4u8, 0x4000u16, peer(1001), 400u16), // channel bound to another peer
        (5, 0x4001, peer(1000), 400),         // peer bound to another channel
        (6, 0x3FFF, peer(1002), 400),         // below the range
        (7, 0x8000, peer(1002), 400),         // above the range
        (8, 0x4002, SocketAddr::from(([10, 1, 1, 1], 1)), 403),
        (9, 0x4003, "[::1]:5".parse().unwrap(), 443),
    ] {
        let r = h.send(
            client(1),
            method::CHANNEL_BIND,
            [tid; 12],
            Some(&c),
            &chan_attr(num),
            &[p],
        );
        assert_eq!(r.code(), Some(code), "channel {num:#x} peer {p}");
    }
    let r = h.send(
        client(1),
        method::CHANNEL_BIND,
        [10; 12],
        Some(&c),
        &[],
        &[peer(1003)],
    );
    assert_eq!(r.code(), Some(400), "missing CHANNEL-NUMBER");
    let r = h.send(
        client(1),
        method::CHANNEL_BIND,
        [11; 12],
        Some(&c),
        &chan_attr(0x4005),
        &[],
    );
    assert_eq!(r.code(), Some(400), "missing XOR-PEER-ADDRESS");
    // ChannelData goes to the bound peer; unknown channels and other clients are dropped.
    let pkt = [0x40, 0x00, 0x00, 0x03, b'a', b'b', b'c', 0];
    let (relay, to, data) = h.t.channel_data(h.env.now, client(1), &pkt).unwrap();
    assert_eq!((to, data), (peer(1000), &b"abc"[..]));
    assert_eq!(relay.local_addr(), h.view_relay());
    assert!(h
        .t
        .channel_data(h.env.now, client(1), &[0x40, 0x01, 0, 1, 9])
        .is_none());
    assert!(h.t.channel_data(h.env.now, client(2), &pkt).is_none());
    assert!(h
        .t
        .channel_data(h.env.now, client(1), &[0x40, 0x00, 0, 9, 1])
        .is_none());
    assert!(h.metric("switchboard_turn_channels_active 1"));
    // Expiry: after 600 s the channel stops relaying and is in cool-down for 300 s.
    let life = vec![(attr::LIFETIME, 3600u32.to_be_bytes().to_vec())];
    let r = h.send(client(1), method::REFRESH, [20; 12], Some(&c), &life, &[]);
    assert_eq!(r.outcome, Outcome::Success);
    h.env.now += CHANNEL_LIFETIME;
    h.env.unix += CHANNEL_LIFETIME.as_secs();
    h.t.handle_timeout(h.env);
    h.challenge(client(9));
    assert!(h.t.channel_data(h.env.now, client(1), &pkt).is_none());
    assert!(h.metric("switchboard_turn_channels_active 0"));
    let r = h.send(
        client(1),
        method::CHANNEL_BIND,
        [12; 12],
        Some(&c),
        &chan_attr(0x4000),
        &[peer(1009)],
    );
    assert_eq!(
        r.code(),
        Some(400),
        "cool-down keeps the number for its peer"
    );
    let r = h.send(
        client(1),
        method::CHANNEL_BIND,
        [13; 12],
        Some(&c),
        &chan_attr(0x4000),
        &[peer(1000)],
    );
    assert_eq!(r.outcome, Outcome::Success, "same pair may rebind");
    assert!(h.metric("switchboard_turn_channels_active 1"));
}

#[test]
fn send_indication_needs_permission_and_respects_bandwidth_cap() {
    let mut t = cfg();
    t.max_bps_per_allocation = 100;
    let mut h = harness(t);
    let c = rest(&h, 100_000);
    h.allocate(client(1), &c, 1);
    let ind = send_ind(peer(7), &[1u8; 60]);
    let m = Message::parse(&ind).unwrap();
    assert!(
        h.t.send_indication(h.env.now, client(1), &m).is_none(),
        "no permission yet"
    );
    h.permit(client(1), &c, 2, peer(7));
    let (_, to, data) = h.t.send_indication(h.env.now, client(1), &m).unwrap();
    assert_eq!((to, data.len()), (peer(7), 60));
    assert!(
        h.t.send_indication(h.env.now, client(1), &m).is_none(),
        "over 100 B/s"
    );
    let later = h.env.now + Duration::from_secs(1);
    assert!(h.t.send_indication(later, client(1), &m).is_some());
    assert!(h.t.send_indication(later, client(2), &m).is_none());
}

#[test]
fn allocation_expires_and_frees_socket_and_quota() {
    let mut h = harness(cfg());
    let c = rest(&h, 100_000);
    h.allocate(client(1), &c, 1);
    let port = h.t.relayed_address(client(1)).unwrap().port();
    h.env.now += Duration::from_secs(600);
    h.t.handle_timeout(h.env);
    assert!(h.t.is_empty());
    assert!(!h.open.lock().unwrap().contains(&port));
    assert_eq!(h.t.next_deadline(), None);
    assert!(h.metric("switchboard_turn_allocations_deleted_total{reason=\"expired\"} 1"));
    assert!(h.metric("switchboard_turn_allocations_active{transport=\"udp\"} 0"));
    assert_eq!(h.t.pool.total(), 0);
}

#[test]
fn draining_refuses_new_allocations() {
    let mut h = harness(cfg());
    let c = rest(&h, 3600);
    h.allocate(client(1), &c, 1);
    h.env.draining = true;
    assert_eq!(h.allocate(client(2), &c, 2).code(), Some(508));
    // Existing allocations still refresh.
    let r = h.send(client(1), method::REFRESH, [3; 12], Some(&c), &[], &[]);
    assert_eq!(r.outcome, Outcome::Success);
    let mut t = cfg();
    t.alternate_server = Some("192.0.2.9:3478".parse().unwrap());
    let mut h = harness(t);
    h.env.draining = true;
    let r = h.allocate(client(1), &c, 1);
    assert_eq!(r.code(), Some(300));
    let alt = r.msg().get(attr::ALTERNATE_SERVER).unwrap().to_vec();
    assert_eq!(
        crate::stun::codec::decode_address(&alt).unwrap(),
        "192.0.2.9:3478".parse().unwrap()
    );
}

#[test]
fn advertised_relay_ip_differs_from_bind_ip() {
    let mut t = cfg();
    t.relay_bind = Some("127.0.0.1".parse().unwrap());
    t.relay_ip = vec!["203.0.113.10".parse().unwrap()];
    let mut h = harness(t);
    let c = rest(&h, 3600);
    let r = h.allocate(client(1), &c, 1);
    let relayed = r
        .msg()
        .xor_address(attr::XOR_RELAYED_ADDRESS)
        .unwrap()
        .unwrap();
    assert_eq!(relayed.ip(), "203.0.113.10".parse::<IpAddr>().unwrap());
    assert_eq!(h.view_relay().port(), relayed.port());
}

#[test]
fn wildcard_listener_binds_and_reports_the_address_the_request_reached() {
    let mut t = cfg();
    t.listen = vec!["0.0.0.0:3478".parse().unwrap()];
    let mut h = harness(t.clone());
    let c = rest(&h, 3600);
    // No local address known: nothing truthful to report, so no relay (never 0.0.0.0).
    assert_eq!(h.allocate(client(1), &c, 1).code(), Some(440));
    for (n, local) in [(10, "203.0.113.10"), (11, "203.0.113.11")] {
        h.env.local = Some(local.parse().unwrap());
        let r = h.allocate(client(n), &c, 2);
        let relayed = r
            .msg()
            .xor_address(attr::XOR_RELAYED_ADDRESS)
            .unwrap()
            .unwrap();
        assert_eq!(relayed.ip().to_string(), local);
        assert_eq!(
            *h.last_bind.lock().unwrap(),
            Some(relayed),
            "bound where reported"
        );
        assert_eq!(h.view().local, Some(local.parse().unwrap()));
    }
    // 1:1 NAT: the private address the request reached maps to its public pair.
    t.relay_ip = vec![
        "198.51.100.1/10.0.0.5".parse().unwrap(),
        "198.51.100.2/10.0.1.5".parse().unwrap(),
    ];
    let mut h = harness(t);
    let c = rest(&h, 3600);
    for (n, local, public) in [
        (20, "10.0.0.5", "198.51.100.1"),
        (21, "10.0.1.5", "198.51.100.2"),
    ] {
        h.env.local = Some(local.parse().unwrap());
        let r = h.allocate(client(n), &c, 3);
        let relayed = r
            .msg()
            .xor_address(attr::XOR_RELAYED_ADDRESS)
            .unwrap()
            .unwrap();
        assert_eq!(relayed.ip().to_string(), public);
        let bound = h.last_bind.lock().unwrap().unwrap();
        assert_eq!(bound.ip().to_string(), local);
    }
}

#[test]
fn relay_to_own_address_only_on_relay_ports() {
    let mut t = cfg();
    t.allow_peers.push("203.0.113.0/24".into());
    let mut s = Settings::from_config(&t, false);
    s.policy
        .set_own(&["203.0.113.10".parse().unwrap()], 50000..=50009);
    let mut h = harness(t);
    h.t.settings = Arc::new(s);
    let c = rest(&h, 3600);
    h.allocate(client(1), &c, 1);
    let own_http: SocketAddr = "203.0.113.10:8080".parse().unwrap();
    let own_relay: SocketAddr = "203.0.113.10:50003".parse().unwrap();
    let r = h.permit(client(1), &c, 2, own_http);
    assert_eq!(r.code(), Some(403));
    let r = h.permit(client(1), &c, 3, own_relay);
    assert_eq!(r.code(), None);
    let ch = vec![(attr::CHANNEL_NUMBER, vec![0x40, 0x00, 0, 0])];
    let r = h.send(
        client(1),
        method::CHANNEL_BIND,
        [4; 12],
        Some(&c),
        &ch,
        &[own_http],
    );
    assert_eq!(r.code(), Some(403));
    // A Send indication to the permitted IP but a non-relay port is dropped.
    let mut buf = Vec::new();
    let mut e = Encoder::new(&mut buf, method::SEND, Class::Indication, &[5; 12]);
    e.xor_address(attr::XOR_PEER_ADDRESS, own_http);
    e.attr(attr::DATA, b"GET / HTTP/1.0");
    e.finish();
    let m = Message::parse(&buf).unwrap();
    let now = h.env.now;
    assert!(h.t.send_indication(now, client(1), &m).is_none());
}

#[test]
fn dont_fragment_is_applied_or_answered_420() {
    let mut h = harness(cfg());
    let c = rest(&h, 3600);
    let mut a = udp();
    a.push((attr::DONT_FRAGMENT, vec![]));
    h.challenge(client(1));
    let r = h.send(client(1), method::ALLOCATE, [1; 12], Some(&c), &a, &[]);
    assert_eq!(r.outcome, Outcome::Success, "DF set on the relay socket");
    // A relay that cannot set DF: 420 naming DONT-FRAGMENT, nothing kept.
    h.no_df = true;
    h.challenge(client(2));
    let r = h.send(client(2), method::ALLOCATE, [2; 12], Some(&c), &a, &[]);
    assert_eq!(r.code(), Some(420));
    assert_eq!(
        r.msg().get(attr::UNKNOWN_ATTRIBUTES).unwrap(),
        &[0x00, 0x1A]
    );
    assert!(r
        .msg()
        .verify_integrity(&long_term_key(&c.user, REALM, &c.pass)));
    assert_eq!(h.t.len(), 1);
    assert_eq!(
        h.open.lock().unwrap().len(),
        1,
        "the refused relay socket is closed"
    );
    // Without DF the same client is served, and the quota was given back.
    let r = h.send(client(2), method::ALLOCATE, [3; 12], Some(&c), &udp(), &[]);
    assert_eq!(r.outcome, Outcome::Success);
    assert!(h.metric("switchboard_turn_error_responses_total{code=\"420\"} 1"));
}

#[test]
fn refresh_never_extends_an_allocation_past_its_maximum_age() {
    let mut t = cfg();
    t.max_allocation_age_secs = 1000;
    let mut h = harness(t);
    let c = rest(&h, 3600);
    h.allocate(client(1), &c, 1);
    h.allocate(client(2), &c, 2);
    let life = vec![(attr::LIFETIME, 600u32.to_be_bytes().to_vec())];
    // Refreshed every 300 s, as a client does: granted lifetimes shrink to the cap.
    let mut granted = Vec::new();
    for i in 0..3u8 {
        h.env.now += Duration::from_secs(300);
        let r = h.send(
            client(1),
            method::REFRESH,
            [10 + i; 12],
            Some(&c),
            &life,
            &[],
        );
        assert_eq!(r.outcome, Outcome::Success);
        granted.push(decode_u32(r.msg().get(attr::LIFETIME).unwrap()).unwrap());
        let r = h.send(
            client(2),
            method::REFRESH,
            [20 + i; 12],
            Some(&c),
            &life,
            &[],
        );
        assert_eq!(r.outcome, Outcome::Success);
    }
    assert_eq!(granted, [600, 400, 100]);
    // At the cap a refresh is refused and the allocation is gone.
    h.env.now += Duration::from_secs(100);
    let r = h.send(client(1), method::REFRESH, [30; 12], Some(&c), &life, &[]);
    assert_eq!(r.code(), Some(437));
    assert_eq!(h.t.relayed_address(client(1)), None);
    // The other one, not refreshed again, expires at the cap on its timer.
    h.t.handle_timeout(h.env);
    assert!(h.t.is_empty());
    assert!(h.metric("switchboard_turn_allocations_deleted_total{reason=\"max_age\"} 2"));
    // A fresh Allocate with valid credentials is served at once.
    let r = h.allocate(client(1), &c, 40);
    assert_eq!(r.outcome, Outcome::Success);
}

#[test]
fn timer_queue_follows_each_allocations_earliest_deadline() {
    let mut h = harness(cfg());
    let c = rest(&h, 100_000);
    let t0 = h.env.now;
    h.allocate(client(1), &c, 1);
    // Default lifetime is the only deadline.
    let life = Duration::from_secs(cfg().default_lifetime_secs as u64);
    assert_eq!(h.t.next_deadline(), Some(t0 + life));
    h.env.now += Duration::from_secs(10);
    h.allocate(client(2), &c, 2);
    h.permit(client(2), &c, 3, peer(1));
    let perm_due = h.env.now + PERMISSION_LIFETIME;
    assert_eq!(h.t.next_deadline(), Some((t0 + life).min(perm_due)));
    // Early calls are harmless: nothing is due, nothing changes.
    h.t.handle_timeout(h.env);
    assert_eq!(h.t.len(), 2);
    // Refresh of client 1 moves its deadline; the queue now shows client 2's.
    h.send(
        client(1),
        method::REFRESH,
        [4; 12],
        Some(&c),
        &[(attr::LIFETIME, 3600u32.to_be_bytes().to_vec())],
        &[],
    );
    let c2_alloc = h.env.now - Duration::from_secs(0) + life;
    assert_eq!(h.t.next_deadline(), Some(perm_due.min(c2_alloc)));
    // Refresh 0 removes client 1's entry from the queue.
    h.send(
        client(1),
        method::REFRESH,
        [5; 12],
        Some(&c),
        &[(attr::LIFETIME, 0u32.to_be_bytes().to_vec())],
        &[],
    );
    assert_eq!(h.t.len(), 1);
    assert_eq!(h.t.next_deadline(), Some(perm_due.min(c2_alloc)));
    h.env.now = c2_alloc.max(perm_due);
    h.t.handle_timeout(h.env);
    assert!(h.t.is_empty());
    assert_eq!(h.t.next_deadline(), None);
}

#[test]
fn mass_expiry_deletes_every_allocation_in_one_pass() {
    let mut t = cfg();
    t.relay_port_min = 40000;
    t.relay_port_max = 49999;
    t.max_allocations_per_user = 100_000;
    let mut h = harness(t);
    let c = rest(&h, 100_000);
    let n = 3000u16;
    for i in 0..n {
        let r = h.allocate(client(1000 + i), &c, 1);
        assert_eq!(r.outcome, Outcome::Success);
    }
    assert_eq!(h.t.len(), n as usize);
    let due = h.t.next_deadline().unwrap();
    h.env.now = due + Duration::from_secs(3600);
    let start = std::time::Instant::now();
    h.t.handle_timeout(h.env);
    let took = start.elapsed();
    assert!(h.t.is_empty());
    assert_eq!(h.t.next_deadline(), None);
    assert!(h.metric("switchboard_turn_allocations_deleted_total{reason=\"expired\"} 3000"));
    // O(n log n): 3000 deletions take milliseconds, not the seconds a rescan per deletion did.
    assert!(took < Duration::from_secs(2), "mass expiry took {took:?}");
}

#[test]
fn channel_cooldown_is_a_deadline_of_its_own() {
    let mut h = harness(cfg());
    let c = rest(&h, 100_000);
    h.allocate(client(1), &c, 1);
    h.send(
        client(1),
        method::REFRESH,
        [2; 12],
        Some(&c),
        &[(attr::LIFETIME, 3600u32.to_be_bytes().to_vec())],
        &[],
    );
    h.send(
        client(1),
        method::CHANNEL_BIND,
        [3; 12],
        Some(&c),
        &chan_attr(0x4001),
        &[peer(7)],
    );
    let bound = h.env.now;
    // The permission the channel installed expires first.
    assert_eq!(h.t.next_deadline(), Some(bound + PERMISSION_LIFETIME));
    h.env.now = bound + PERMISSION_LIFETIME;
    h.t.handle_timeout(h.env);
    assert_eq!(h.t.next_deadline(), Some(bound + CHANNEL_LIFETIME));
    h.env.now = bound + CHANNEL_LIFETIME;
    h.t.handle_timeout(h.env);
    assert!(h.view().channels.is_empty());
    // The expired binding stays reserved through its cool-down, which is the next deadline.
    assert_eq!(
        h.t.next_deadline(),
        Some(bound + CHANNEL_LIFETIME + CHANNEL_COOLDOWN)
    );
    h.env.now = bound + CHANNEL_LIFETIME + CHANNEL_COOLDOWN;
    h.t.handle_timeout(h.env);
    assert_eq!(h.t.next_deadline(), Some(bound + Duration::from_secs(3600)));
}

/// The clock jumps: `now` handed in an hour before anything was scheduled (a caller's stale
/// instant), the wall clock stepped back and forward (NTP), and a forward jump past every
/// deadline at once (a suspended host). Nothing fires early, everything fires once, nonces
/// from the "future" are refused with a fresh one, and a step of the wall clock never moves a
/// lifetime, which runs on the monotonic clock.
#[test]
fn clock_jumps_backwards_and_forwards() {
    let mut h = harness(cfg());
    let c = rest(&h, 100_000);
    let t0 = h.env.now;
    assert_eq!(h.allocate(client(1), &c, 1).outcome, Outcome::Success);
    let r = h.send(
        client(1),
        method::CHANNEL_BIND,
        [2; 12],
        Some(&c),
        &chan_attr(0x4001),
        &[peer(7)],
    );
    assert_eq!(r.outcome, Outcome::Success);
    let due = h.t.next_deadline().unwrap();
    assert_eq!(due, t0 + PERMISSION_LIFETIME);

    // Backwards: a `now` from before the allocation existed expires nothing and moves no
    // deadline; ChannelData stamped then is still relayed (the permission is live).
    let mut back = h.env;
    back.now = t0.checked_sub(Duration::from_secs(3600)).unwrap_or(t0);
    h.t.handle_timeout(back);
    assert_eq!(h.t.len(), 1);
    assert_eq!(h.t.next_deadline(), Some(due));
    let cd = [0x40, 0x01, 0, 2, 0xaa, 0xbb];
    assert!(h.t.channel_data(back.now, client(1), &cd).is_some());

    // The wall clock steps back an hour: the nonce the client holds now looks issued in the
    // future, so it is stale (438 with a fresh nonce), and the retry succeeds.
    h.env.unix -= 3600;
    let life = vec![(attr::LIFETIME, 600u32.to_be_bytes().to_vec())];
    let r = h.send(client(1), method::REFRESH, [3; 12], Some(&c), &life, &[]);
    assert_eq!(r.code(), Some(438));
    h.nonce = r.msg().get(attr::NONCE).unwrap().to_vec();
    let r = h.send(client(1), method::REFRESH, [4; 12], Some(&c), &life, &[]);
    assert_eq!(r.outcome, Outcome::Success);
    // Forward two days on the wall clock only: the REST credential has expired for new
    // allocations, but the lifetime runs on the monotonic clock, so nothing is due.
    h.env.unix += 3600 + 200_000;
    h.t.handle_timeout(h.env);
    assert_eq!(h.t.len(), 1);
    assert_eq!(h.t.next_deadline(), Some(due));
    h.challenge(client(2));
    let r = h.send(client(2), method::ALLOCATE, [5; 12], Some(&c), &udp(), &[]);
    assert_eq!(r.code(), Some(401));

    // Forward a day on the monotonic clock: everything expires in one pass, once, as
    // "expired" (its lifetime ended long before its maximum age would have).
    h.env.now = t0 + Duration::from_secs(86_400);
    h.t.handle_timeout(h.env);
    assert!(h.t.is_empty());
    assert_eq!(h.t.next_deadline(), None);
    assert!(h.metric("switchboard_turn_allocations_deleted_total{reason=\"expired\"} 1"));
    assert!(!h.metric("switchboard_turn_allocations_deleted_total{reason=\"max_age\"} 1"));
    assert!(h.metric("switchboard_turn_permissions_active 0"));
    assert!(h.metric("switchboard_turn_channels_active 0"));
    assert_eq!(h.t.pool.total(), 0);
    assert!(h.open.lock().unwrap().is_empty());
    h.t.handle_timeout(h.env);
    assert!(h.metric("switchboard_turn_allocations_deleted_total{reason=\"expired\"} 1"));
}

/// A maximum age past what an `Instant` can represent is no cap, not a panic on Refresh.
#[test]
fn huge_maximum_age_does_not_overflow() {
    let mut t = cfg();
    t.max_allocation_age_secs = u64::MAX;
    let mut h = harness(t);
    let c = rest(&h, 100_000);
    assert_eq!(h.allocate(client(1), &c, 1).outcome, Outcome::Success);
    let life = vec![(attr::LIFETIME, 600u32.to_be_bytes().to_vec())];
    let r = h.send(client(1), method::REFRESH, [2; 12], Some(&c), &life, &[]);
    assert_eq!(r.outcome, Outcome::Success);
    h.env.now += Duration::from_secs(600);
    h.t.handle_timeout(h.env);
    assert!(h.t.is_empty());
}

fn cluster_of(h: &H, me: &str, nodes: &[(&str, &str, crate::turn::members::NodeState)]) {
    use crate::turn::members::{ClusterId, NodeRecord, Snapshot};
    let live = &h.t.settings.live;
    let _ = live.cluster.set(ClusterId {
        me: me.into(),
        tls_domain: None,
    });
    live.set_members(Snapshot {
        nodes: nodes
            .iter()
            .map(|(id, ip, state)| NodeRecord {
                node: id.to_string(),
                state: *state,
                host: ip.to_string(),
                uris: vec![],
                addrs: vec![ip.parse().unwrap()],
                port: 3478,
                tls_port: 0,
                allocations: 0,
                capacity: 100,
                packets_per_sec: 0.0,
                cpu: 0.0,
                at_ms: 0,
            })
            .collect(),
    });
}

#[test]
fn draining_cluster_node_redirects_to_a_ready_node_and_counts_it() {
    use crate::turn::members::NodeState::*;
    let mut h = harness(cfg());
    let c = rest(&h, 3600);
    cluster_of(
        &h,
        "a",
        &[
            ("a", "203.0.113.11", Ready),
            ("b", "203.0.113.12", Draining),
            ("c", "203.0.113.13", Ready),
        ],
    );
    assert_eq!(h.allocate(client(1), &c, 1).outcome, Outcome::Success);
    h.env.draining = true;
    let r = h.allocate(client(2), &c, 2);
    assert_eq!(r.code(), Some(300));
    let alt = r.msg().get(attr::ALTERNATE_SERVER).unwrap().to_vec();
    assert_eq!(
        crate::stun::codec::decode_address(&alt).unwrap(),
        "203.0.113.13:3478".parse().unwrap(),
        "the ready node, not the draining one"
    );
    assert_eq!(
        h.metrics
            .turn_redirects
            .with_label_values(&["draining"])
            .get(),
        1
    );
    // No ready node with room: 508, as outside cluster mode.
    cluster_of(&h, "a", &[("a", "203.0.113.11", Draining)]);
    assert_eq!(h.allocate(client(3), &c, 3).code(), Some(508));
}

#[test]
fn full_cluster_node_redirects_at_its_capacity() {
    use crate::turn::members::NodeState::*;
    let mut t = cfg();
    t.capacity_allocations = 1;
    let mut h = harness(t);
    let c = rest(&h, 3600);
    assert_eq!(h.allocate(client(1), &c, 1).outcome, Outcome::Success);
    // Outside cluster mode the soft capacity changes nothing.
    assert_eq!(h.allocate(client(2), &c, 2).outcome, Outcome::Success);
    cluster_of(
        &h,
        "a",
        &[("a", "203.0.113.11", Ready), ("b", "203.0.113.12", Ready)],
    );
    let r = h.allocate(client(3), &c, 3);
    assert_eq!(r.code(), Some(300));
    assert_eq!(
        h.metrics
            .turn_redirects
            .with_label_values(&["capacity"])
            .get(),
        1
    );
}

#[test]
fn allocations_on_other_nodes_count_towards_the_user_quota() {
    let mut t = cfg();
    t.max_allocations_per_user = 2;
    let mut h = harness(t);
    let c = rest(&h, 3600);
    assert_eq!(h.allocate(client(1), &c, 1).outcome, Outcome::Success);
    let user = super::super::ports::quota_name(&c.user).to_string();
    h.t.pool.set_remote([(user, 1)].into());
    assert_eq!(h.allocate(client(2), &c, 2).code(), Some(486));
    h.t.pool.set_remote(Default::default());
    assert_eq!(h.allocate(client(3), &c, 3).outcome, Outcome::Success);
}

#[test]
fn relay_ip_auto_reports_the_discovered_public_address() {
    let mut t = cfg();
    t.relay_bind = Some("127.0.0.1".parse().unwrap());
    t.relay_ip = vec![crate::config::RelayIp::AUTO];
    let mut h = harness(t);
    let c = rest(&h, 3600);
    h.t.settings
        .live
        .discovered
        .store(std::sync::Arc::new(vec![(
            "203.0.113.11".parse().unwrap(),
            Some("10.1.0.10".parse().unwrap()),
        )]));
    let r = h.allocate(client(1), &c, 1);
    let relayed = r
        .msg()
        .xor_address(attr::XOR_RELAYED_ADDRESS)
        .unwrap()
        .unwrap();
    assert_eq!(relayed.ip(), "203.0.113.11".parse::<IpAddr>().unwrap());
}

#[test]
fn tls_redirect_names_the_tls_port_and_the_domain() {
    use crate::turn::members::{ClusterId, NodeRecord, NodeState, Snapshot};
    let mut h = harness_on(cfg(), "tls");
    let c = rest(&h, 3600);
    let live = &h.t.settings.live;
    let _ = live.cluster.set(ClusterId {
        me: "a".into(),
        tls_domain: Some("turn.example.com".into()),
    });
    let node = |id: &str, ip: &str, tls_port| NodeRecord {
        node: id.into(),
        state: NodeState::Ready,
        host: ip.into(),
        uris: vec![],
        addrs: vec![ip.parse().unwrap()],
        port: 3478,
        tls_port,
        allocations: 0,
        capacity: 10,
        packets_per_sec: 0.0,
        cpu: 0.0,
        at_ms: 0,
    };
    live.set_members(Snapshot {
        nodes: vec![
            node("a", "203.0.113.11", 5349),
            node("b", "203.0.113.12", 0),
            node("c", "203.0.113.13", 443),
        ],
    });
    h.env.draining = true;
    let r = h.allocate(client(1), &c, 1);
    assert_eq!(r.code(), Some(300));
    let m = r.msg();
    let alt = crate::stun::codec::decode_address(m.get(attr::ALTERNATE_SERVER).unwrap()).unwrap();
    assert_eq!(
        alt,
        "203.0.113.13:443".parse().unwrap(),
        "b has no TLS listener"
    );
    assert_eq!(
        m.get(attr::ALTERNATE_DOMAIN),
        Some(&b"turn.example.com"[..])
    );
    // REALM and NONCE, for the client to sign its Allocate at the alternate at once.
    assert!(m.get(attr::NONCE).is_some() && m.get(attr::REALM).is_some());
}
