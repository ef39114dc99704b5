//! TURN over TCP on the 3478 listener: coturn's `turnutils_uclient -t` relays with no loss,
//! and a client that stops reading cannot slow relaying for another.

mod turn_common;
use std::net::SocketAddr;
use std::time::Duration;

use switchboard::stun::codec::{attr, long_term_key, method, Class, Encoder, Message};
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
struct TcpTurn {
    s: TcpStream,
    nonce: Vec<u8>,
    tid: u8,
}

impl TcpTurn {
    async fn connect(server: SocketAddr) -> TcpTurn {
        // A tiny receive buffer makes a client that stops reading stall quickly.
        let sock = tokio::net::TcpSocket::new_v4().expect("socket");
        sock.set_recv_buffer_size(4096).expect("rcvbuf");
        let s = sock.connect(server).await.expect("connect");
        TcpTurn {
            s,
            nonce: Vec::new(),
            tid: 0,
        }
    }

    async fn read_frame(&mut self) -> Vec<u8> {
        let mut hdr = [0u8; 4];
        self.s.read_exact(&mut hdr).await.expect("read header");
        let len = u16::from_be_bytes([hdr[2], hdr[3]]) as usize;
        let body = if hdr[0] & 0xC0 == 0 {
            16 + len
        } else {
            (len + 3) & !3
        };
        let mut rest = vec![0u8; body];
        self.s.read_exact(&mut rest).await.expect("read body");
        let mut f = hdr.to_vec();
        f.extend_from_slice(&rest);
        f
    }

    async fn request(
        &mut self,
        m: u16,
        attrs: &[(u16, Vec<u8>)],
        peer: Option<SocketAddr>,
    ) -> Vec<u8> {
        self.tid += 1;
        let tid = [self.tid; 12];
        let mut buf = Vec::new();
        let mut e = Encoder::new(&mut buf, m, Class::Request, &tid);
        for (t, v) in attrs {
            e.attr(*t, v);
        }
        if let Some(p) = peer {
            e.xor_address(attr::XOR_PEER_ADDRESS, p);
        }
        if !self.nonce.is_empty() {
            e.attr(attr::USERNAME, USER.as_bytes());
            e.attr(attr::REALM, b"switchboard");
            e.attr(attr::NONCE, &self.nonce);
            e.integrity(&long_term_key(USER, "switchboard", PASS));
        }
        e.finish();
        self.s.write_all(&buf).await.expect("write");
        loop {
            let f = self.read_frame().await;
            if f.len() >= 20 && f[8..20] == tid {
                if let Some(n) = Message::parse(&f).ok().and_then(|m| m.get(attr::NONCE)) {
                    self.nonce = n.to_vec();
                }
                return f;
            }
        }
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
