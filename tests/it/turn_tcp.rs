//! TURN over TCP on the 3478 listener: coturn's `turnutils_uclient -t` relays with no loss,
//! and a client that stops reading cannot slow relaying for another.

use crate::support::stream_turn::{error_code, StreamTurn};
use crate::support::turn_common;
use std::net::SocketAddr;
use std::time::Duration;

use switchboard::stun::codec::{attr, method, Class, Message};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use turn_common::*;

fn tcp_addr(s: &switchboard::RunningServer) -> SocketAddr {
    s.bound().tcp[0]
}

fn assert_clean(r: &Report, want: u64) {
    assert_eq!(r.sent, want, "messages sent\n{}", r.output);
    assert_eq!(r.received, want, "messages echoed back\n{}", r.output);
    assert_eq!(r.lost, 0, "lost packets\n{}", r.output);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uclient_over_tcp_with_channels_and_rtcp_pair() {
    let server = start("max_allocations_per_user = 100").await;
    let peer = start_peer().await;
    let r = uclient(
        tcp_addr(&server),
        peer.port,
        &["-t", "-W", SECRET, "-n", "30", "-l", "120", "-z", "5"],
    )
    .await;
    assert_clean(&r, 60);
    let text = server.shared().metrics.render();
    assert!(
        metric(
            &text,
            "switchboard_turn_allocations_created_total{transport=\"tcp\"}"
        ) >= 2
    );
    // The peer's echoes reach the clients through the shards' event loops, counted under the
    // clients' transport, with nothing dropped on the way.
    let by_tcp =
        "switchboard_turn_relayed_transport_bytes_total{direction=\"to_client\",transport=\"tcp\"}";
    assert!(metric_reaches(&server, by_tcp, 60 * 120).await >= 60 * 120);
    let text = server.shared().metrics.render();
    assert_eq!(
        metric(
            &text,
            "switchboard_turn_relayed_transport_bytes_total{direction=\"to_client\",transport=\"udp\"}"
        ),
        0
    );
    assert_eq!(
        metric(
            &text,
            "switchboard_dropped_total{reason=\"client_send_full\"}"
        ),
        0
    );
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uclient_over_tcp_with_send_indications_and_ten_clients() {
    let server = start("max_allocations_per_user = 100").await;
    let peer = start_peer().await;
    let r = uclient(
        tcp_addr(&server),
        peer.port,
        &[
            "-t", "-s", "-u", USER, "-w", PASS, "-m", "10", "-n", "10", "-l", "120", "-z", "5",
        ],
    )
    .await;
    assert_clean(&r, 100);
    server.shutdown();
}

/// A TURN client on a TCP connection whose receive side can be left unread.
type TcpTurn = StreamTurn<TcpStream>;

impl TcpTurn {
    /// Connect with REST credentials minted for `name` from the shared secret.
    async fn connect_as(server: SocketAddr, name: &str) -> TcpTurn {
        let mut t = TcpTurn::connect(server).await;
        let user = format!("{}:{name}", switchboard::auth::unix_now() + 3600);
        t.pass = switchboard::auth::rest_password(SECRET.as_bytes(), &user);
        t.user = user;
        t
    }

    async fn connect(server: SocketAddr) -> TcpTurn {
        // A tiny receive buffer makes a client that stops reading stall quickly.
        let sock = tokio::net::TcpSocket::new_v4().expect("socket");
        sock.set_recv_buffer_size(4096).expect("rcvbuf");
        let s = sock.connect(server).await.expect("connect");
        TcpTurn::new(s)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_tcp_client_does_not_slow_another() {
    let server = start("max_allocations_per_user = 100\ntcp_send_buffer_bytes = 8192").await;
    let echo = UdpSocket::bind("127.0.0.1:0").await.expect("bind echo");
    let echo_addr = echo.local_addr().expect("echo addr");
    tokio::spawn(async move {
        let mut b = vec![0u8; 2048];
        while let Ok((n, from)) = echo.recv_from(&mut b).await {
            let _ = echo.send_to(&b[..n], from).await;
        }
    });
    // The stalled client: allocates, binds a channel to the echo peer, then floods it and
    // never reads the echoes.
    let mut stalled = TcpTurn::connect(tcp_addr(&server)).await;
    let transport = udp_transport();
    stalled.request(method::ALLOCATE, &transport, None).await;
    let r = stalled.request(method::ALLOCATE, &transport, None).await;
    assert_eq!(Message::parse(&r).unwrap().class(), Class::Success);
    let r = stalled
        .request(
            method::CHANNEL_BIND,
            &[(attr::CHANNEL_NUMBER, vec![0x40, 0x00, 0, 0])],
            Some(echo_addr),
        )
        .await;
    assert_eq!(Message::parse(&r).unwrap().class(), Class::Success);
    let mut frame = vec![0x40, 0x00, 0x03, 0xE8];
    frame.extend_from_slice(&[0xAB; 1000]);
    let flood = tokio::spawn(async move {
        // Keep flooding (and never reading) until the test ends.
        loop {
            for _ in 0..64 {
                if stalled.s.write_all(&frame).await.is_err() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });
    let full = "switchboard_dropped_total{reason=\"client_send_full\"}";
    assert!(
        metric_reaches(&server, full, 1).await >= 1,
        "the stalled client's buffer filled and its packets were dropped"
    );
    // Meanwhile another TCP client relays without loss.
    let peer = start_peer().await;
    let r = uclient(
        tcp_addr(&server),
        peer.port,
        &[
            "-t", "-c", "-W", SECRET, "-n", "100", "-l", "120", "-z", "2",
        ],
    )
    .await;
    assert_clean(&r, 100);
    flood.abort();
    server.shutdown();
}

/// A TCP client's UDP relay socket costs no task of its own: a shard's event loop serves it
/// (the Allocate adds no task to the runtime), and peer data still reaches the client, in
/// order, through its connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_clients_relay_is_served_by_a_shard_not_a_task() {
    let server = start("max_allocations_per_user = 100").await;
    let echo = UdpSocket::bind("127.0.0.1:0").await.expect("bind echo");
    let echo_addr = echo.local_addr().expect("echo addr");
    tokio::spawn(async move {
        let mut b = vec![0u8; 2048];
        while let Ok((n, from)) = echo.recv_from(&mut b).await {
            let _ = echo.send_to(&b[..n], from).await;
        }
    });
    let rt = tokio::runtime::Handle::current().metrics();
    let mut c = TcpTurn::connect(tcp_addr(&server)).await;
    let transport = udp_transport();
    // The first request gets the nonce and gives the connection its session (its writer).
    let r = c.request(method::ALLOCATE, &transport, None).await;
    assert_eq!(error_code(&r), Some(401));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = rt.num_alive_tasks();
    let r = c.request(method::ALLOCATE, &transport, None).await;
    assert_eq!(Message::parse(&r).unwrap().class(), Class::Success);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = rt.num_alive_tasks();
    assert!(
        after <= before,
        "the allocation added {} task(s)",
        after - before
    );
    let r = c
        .request(
            method::CHANNEL_BIND,
            &[(attr::CHANNEL_NUMBER, vec![0x40, 0x00, 0, 0])],
            Some(echo_addr),
        )
        .await;
    assert_eq!(Message::parse(&r).unwrap().class(), Class::Success);
    for i in 0..50u8 {
        let mut frame = vec![0x40, 0x00, 0x00, 0x05, i, 1, 2, 3, 4, 0, 0, 0];
        c.s.write_all(&frame).await.expect("write");
        frame.truncate(9);
        let back = tokio::time::timeout(Duration::from_secs(2), c.read_frame())
            .await
            .expect("the echo comes back");
        assert_eq!(&back[..9], &frame[..], "echo {i}");
    }
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc6062_tcp_relay_between_two_uclient_sessions() {
    let server = start("max_allocations_per_user = 100").await;
    // -T: TCP allocations, client-to-client through Connect / ConnectionAttempt /
    // ConnectionBind, a data connection per peer.
    let r = uclient_to(
        tcp_addr(&server),
        "127.0.0.1",
        1,
        &[
            "-T", "-W", SECRET, "-m", "2", "-n", "20", "-l", "120", "-z", "5",
        ],
    )
    .await;
    assert_clean(&r, 40);
    // Data-connection bytes are counted when the pipe closes.
    let to_peer = "switchboard_turn_relayed_bytes_total{direction=\"to_peer\"}";
    assert!(metric_reaches(&server, to_peer, 1).await > 0);
    server.shutdown();
}

impl TcpTurn {
    /// The next indication of method `m` (responses and other frames are skipped).
    async fn indication(&mut self, m: u16) -> Vec<u8> {
        loop {
            let f = self.read_frame().await;
            if let Ok(msg) = Message::parse(&f) {
                if msg.method() == m && msg.class() == Class::Indication {
                    return f;
                }
            }
        }
    }

    /// A TCP allocation (RFC 6062) with a permission for `peer_ip`; returns the relay address.
    async fn tcp_allocation(&mut self, peer_ip: SocketAddr) -> SocketAddr {
        let r = self
            .authed(
                method::ALLOCATE,
                &[(attr::REQUESTED_TRANSPORT, vec![6, 0, 0, 0])],
                None,
            )
            .await;
        let relay = Message::parse(&r)
            .unwrap()
            .xor_address(attr::XOR_RELAYED_ADDRESS)
            .expect("relayed address")
            .unwrap();
        let r = self
            .authed(method::CREATE_PERMISSION, &[], Some(peer_ip))
            .await;
        assert_eq!(error_code(&r), None);
        relay
    }

    /// ConnectionBind for `id` on this (new) connection: the error code, if any.
    async fn bind(&mut self, id: u32) -> Option<u16> {
        let r = self
            .authed(
                method::CONNECTION_BIND,
                &[(attr::CONNECTION_ID, id.to_be_bytes().to_vec())],
                None,
            )
            .await;
        error_code(&r)
    }
}

fn connection_id(f: &[u8]) -> u32 {
    let m = Message::parse(f).unwrap();
    let v = m.get(attr::CONNECTION_ID).expect("CONNECTION-ID");
    u32::from_be_bytes(v.try_into().unwrap())
}

/// Read until EOF or error (true) or `wait` passes (false).
async fn closed_within(s: &mut TcpStream, wait: Duration) -> bool {
    let mut b = [0u8; 256];
    tokio::time::timeout(wait, async {
        loop {
            match s.read(&mut b).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc6062_connection_bind_hijack_is_refused_and_the_owner_still_served() {
    let server = start(
        "max_allocations_per_user = 100\nmax_pending_connections_per_allocation = 2\n\
         data_connection_idle_timeout_secs = 2",
    )
    .await;
    let srv = tcp_addr(&server);
    let peer_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let peer_ip = peer_listener.local_addr().unwrap();
    let mut victim = TcpTurn::connect_as(srv, "victim").await;
    let relay = victim.tcp_allocation(peer_ip).await;

    // A peer connects to the victim's relay: the victim hears of it.
    let mut peer = TcpStream::connect(relay).await.unwrap();
    let id = connection_id(&victim.indication(method::CONNECTION_ATTEMPT).await);

    // Another user with valid credentials of their own, who somehow knows the id: refused,
    // and the connection is closed after that single guess.
    let mut thief = TcpTurn::connect_as(srv, "mallory").await;
    assert_eq!(thief.bind(id).await, Some(400));
    assert!(
        closed_within(&mut thief.s, Duration::from_secs(2)).await,
        "closed after one failed bind"
    );
    let mut guesser = TcpTurn::connect_as(srv, "mallory").await;
    assert_eq!(guesser.bind(id ^ 0x5a5a).await, Some(400));
    assert!(closed_within(&mut guesser.s, Duration::from_secs(2)).await);
    let refused = "switchboard_dropped_total{reason=\"connection_bind_refused\"}";
    assert_eq!(metric_reaches(&server, refused, 2).await, 2);

    // The owner still binds the connection and data flows both ways.
    let mut data = TcpTurn::connect_as(srv, "victim").await;
    assert_eq!(data.bind(id).await, None);
    data.s.write_all(b"ping").await.unwrap();
    let mut b = [0u8; 4];
    peer.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"ping");
    peer.write_all(b"pong").await.unwrap();
    data.s.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"pong");

    // Idle for longer than data_connection_idle_timeout_secs: the pipe closes.
    assert!(
        closed_within(&mut peer, Duration::from_secs(5)).await,
        "idle pipe closed"
    );
    let idle = "switchboard_dropped_total{reason=\"data_connection_idle\"}";
    assert_eq!(metric_reaches(&server, idle, 1).await, 1);

    // Pending cap: two peer connections wait, the third is closed at once.
    let mut waiting = Vec::new();
    for _ in 0..2 {
        waiting.push(TcpStream::connect(relay).await.unwrap());
        victim.indication(method::CONNECTION_ATTEMPT).await;
    }
    let mut third = TcpStream::connect(relay).await.unwrap();
    assert!(
        closed_within(&mut third, Duration::from_secs(2)).await,
        "over the cap: closed"
    );
    let cap = "switchboard_dropped_total{reason=\"peer_connections_per_allocation\"}";
    assert_eq!(metric_reaches(&server, cap, 1).await, 1);

    drop(waiting);

    // A bound pipe ends with its allocation (Refresh with LIFETIME 0 deletes it).
    let mut victim2 = TcpTurn::connect_as(srv, "victim").await;
    let relay2 = victim2.tcp_allocation(peer_ip).await;
    let mut peer2 = TcpStream::connect(relay2).await.unwrap();
    let id2 = connection_id(&victim2.indication(method::CONNECTION_ATTEMPT).await);
    let mut data2 = TcpTurn::connect_as(srv, "victim").await;
    assert_eq!(data2.bind(id2).await, None);
    let r = victim2
        .authed(
            method::REFRESH,
            &[(attr::LIFETIME, 0u32.to_be_bytes().to_vec())],
            None,
        )
        .await;
    assert_eq!(error_code(&r), None);
    assert!(
        closed_within(&mut peer2, Duration::from_secs(2)).await,
        "pipe ends with its allocation"
    );
    assert!(closed_within(&mut data2.s, Duration::from_secs(2)).await);
    let gone = "switchboard_dropped_total{reason=\"data_connection_allocation_gone\"}";
    assert_eq!(metric_reaches(&server, gone, 1).await, 1);
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc6062_data_connection_keeps_the_allocation_bandwidth_cap() {
    let server = start("max_allocations_per_user = 100\nmax_bps_per_allocation = 50000").await;
    let srv = tcp_addr(&server);
    let peer_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut owner = TcpTurn::connect_as(srv, "bulk").await;
    let relay = owner
        .tcp_allocation(peer_listener.local_addr().unwrap())
        .await;
    let mut peer = TcpStream::connect(relay).await.unwrap();
    let id = connection_id(&owner.indication(method::CONNECTION_ATTEMPT).await);
    let mut data = TcpTurn::connect_as(srv, "bulk").await;
    assert_eq!(data.bind(id).await, None);
    // 150 kB at 50 kB/s with one second of burst: at least 2 s, where loopback takes ms.
    let t0 = std::time::Instant::now();
    let writer = tokio::spawn(async move {
        data.s.write_all(&vec![7u8; 150_000]).await.unwrap();
        data
    });
    let mut got = vec![0u8; 150_000];
    peer.read_exact(&mut got).await.unwrap();
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(1800), "took {took:?}");
    assert!(took < Duration::from_secs(6), "took {took:?}");
    assert!(got.iter().all(|b| *b == 7));
    let _data = writer.await.unwrap();
    server.shutdown();
}
