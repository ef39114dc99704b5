//! The STUN/TURN port as a reflector (docs/security.md, "Reflection and amplification"):
//! how many bytes an unauthenticated request provokes, and a flood with a spoofed source in
//! the network lab, where the victim gets at most the configured budget while a real client
//! elsewhere still allocates and relays.

use crate::support::lab;

use lab::turn::Client;
use lab::{sa, Host, Lab, PEER, SERVER};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchboard::stun::{attr, method, Class, Encoder, Message};
use switchboard::{Config, Server};

/// The smallest Binding request: a bare header.
fn binding_request(tid: [u8; 12]) -> Vec<u8> {
    let mut out = Vec::new();
    Encoder::new(&mut out, method::BINDING, Class::Request, &tid).finish();
    out
}

/// An Allocate without credentials: header and REQUESTED-TRANSPORT (28 bytes).
fn bare_allocate(tid: [u8; 12]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut e = Encoder::new(&mut out, method::ALLOCATE, Class::Request, &tid);
    e.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    e.finish();
    out
}

/// Bytes answered to one Binding request and to one bare Allocate, on a server with `extra`
/// in its `[turn]` section.
async fn answer_sizes(extra: &str) -> ((usize, usize), (usize, usize)) {
    let toml =
        format!("[http]\nlisten = \"127.0.0.1:0\"\n[turn]\nlisten = [\"127.0.0.1:0\"]\n{extra}");
    let srv = Server::new(Config::from_toml(&toml).expect("config"))
        .start()
        .await
        .expect("server starts");
    let server = srv.bound().udp[0];
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut sizes = Vec::new();
    for req in [binding_request([1; 12]), bare_allocate([2; 12])] {
        sock.send_to(&req, server).await.unwrap();
        let mut buf = vec![0u8; 2048];
        let (n, _) = tokio::time::timeout(Duration::from_secs(5), sock.recv_from(&mut buf))
            .await
            .expect("answer within 5 s")
            .unwrap();
        let m = Message::parse(&buf[..n]).expect("a STUN answer");
        assert_eq!(m.transaction_id(), req[8..20]);
        sizes.push((req.len(), n));
    }
    (sizes[0], sizes[1])
}

fn factor((req, resp): (usize, usize)) -> f64 {
    resp as f64 / req as f64
}

/// The amplification factors of the embedded default, and of the settings that were the
/// default before (SOFTWARE with the version, MAPPED-ADDRESS for every request). Run with
/// `--nocapture` to see the numbers recorded in docs/security.md and docs/performance.md.
#[tokio::test]
async fn default_answers_amplify_less_than_the_old_ones() {
    let (b_new, a_new) = answer_sizes("").await;
    let (b_old, a_old) =
        answer_sizes("software = \"switchboard/0.1.0\"\nmapped_address = true\n").await;
    for (what, old, new) in [("Binding", b_old, b_new), ("Allocate 401", a_old, a_new)] {
        println!(
            "{what}: request {} B; answer {} B ({:.1}x) with the old settings, {} B ({:.1}x) by default",
            new.0,
            old.1,
            factor(old),
            new.1,
            factor(new)
        );
        assert!(new.1 < old.1, "{what}: the default answer is not leaner");
    }
    // Header, XOR-MAPPED-ADDRESS and RESPONSE-ORIGIN, nothing else.
    assert_eq!(b_new, (20, 44));
    assert!(factor(a_new) < factor(a_old));
}

/// A UDP socket in `h` that sends as `spoofed` (an address of another host): IP_TRANSPARENT
/// lets a root process bind an address it does not own.
fn spoofing_socket(lab: &Lab, h: Host, spoofed: SocketAddr) -> std::net::UdpSocket {
    lab.in_ns(h, move || {
        use socket2::{Domain, Protocol, Socket, Type};
        let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).expect("socket");
        s.set_ip_transparent_v4(true).expect("IP_TRANSPARENT");
        s.bind(&spoofed.into()).expect("bind the spoofed address");
        s.into()
    })
}

const RATE: u64 = 2000;
const BURST: u64 = 4000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_flood_reaches_the_victim_only_within_its_budget() {
    let Some(mut lab) = Lab::start("spoofed_flood_reaches_the_victim_only_within_its_budget")
    else {
        return;
    };
    let config = format!(
        r#"
[http]
listen = "0.0.0.0:8080"
[turn]
listen = ["0.0.0.0:3478"]
relay_port_min = 50000
relay_port_max = 50999
shards = 2
unauthenticated_bytes_per_second = {RATE}
unauthenticated_burst_bytes = {BURST}
[auth]
backends = ["open"]
allow_open_on_public = true
[auth.turn_users]
alice = "wonder"
"#
    );
    lab.start_switchboard(&config, &[], sa(SERVER, 8080));

    // The victim: the public host at PEER, counting every byte that reaches four ports.
    let ports: Vec<u16> = (40000..40004).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let got = Arc::new(AtomicU64::new(0));
    let mut victims = Vec::new();
    for &p in &ports {
        let s = lab.in_ns(Host::Peer, move || {
            std::net::UdpSocket::bind(sa(PEER, p)).expect("victim bind")
        });
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let (stop, got) = (stop.clone(), got.clone());
        victims.push(std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                if let Ok(n) = s.recv(&mut buf) {
                    got.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        }));
    }

    // The attacker: the proxy host, sending as the victim's ports, for three seconds.
    let socks: Vec<_> = ports
        .iter()
        .map(|&p| spoofing_socket(&lab, Host::Proxy, sa(PEER, p)))
        .collect();
    let server = sa(SERVER, 3478);
    let started = Instant::now();
    let flood = std::thread::spawn(move || {
        let (mut sent, mut sent_bytes, mut i) = (0u64, 0u64, 0u32);
        while started.elapsed() < Duration::from_secs(3) {
            for _ in 0..50 {
                i = i.wrapping_add(1);
                let mut tid = [0u8; 12];
                tid[..4].copy_from_slice(&i.to_be_bytes());
                let req = if i % 2 == 0 {
                    bare_allocate(tid)
                } else {
                    binding_request(tid)
                };
                if socks[i as usize % socks.len()]
                    .send_to(&req, server)
                    .is_ok()
                {
                    sent += 1;
                    sent_bytes += req.len() as u64;
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        (sent, sent_bytes)
    });

    // Meanwhile a real client behind home 1's NAT allocates and relays to a peer socket.
    let peer_sock = lab.udp(Host::Peer, &format!("{PEER}:3481"));
    let peer = sa(PEER, 3481);
    let mut c = Client::new(lab.udp(Host::Home1, "0.0.0.0:0"), server, "alice", "wonder");
    assert!(c.binding().await.addr(attr::XOR_MAPPED_ADDRESS).is_some());
    let r = c.allocate().await;
    assert_eq!(r.code(), None, "allocate during the flood");
    let relayed = r.addr(attr::XOR_RELAYED_ADDRESS).expect("relayed address");
    assert_eq!(
        c.permit(peer).await.code(),
        None,
        "permission during the flood"
    );
    c.send(peer, b"through the relay").await;
    let mut buf = [0u8; 256];
    let (n, from) = tokio::time::timeout(Duration::from_secs(5), peer_sock.recv_from(&mut buf))
        .await
        .expect("the peer hears the client")
        .unwrap();
    assert_eq!((&buf[..n], from), (&b"through the relay"[..], relayed));
    peer_sock.send_to(b"and back", relayed).await.unwrap();
    let (p, data, _) = c
        .recv_data(Duration::from_secs(5))
        .await
        .expect("the client hears the peer");
    assert_eq!((p, data.as_slice()), (peer, &b"and back"[..]));

    let (sent, sent_bytes) = flood.join().expect("flood thread");
    // Answers still in flight arrive within a second of the flood's end.
    std::thread::sleep(Duration::from_secs(1));
    let window = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for v in victims {
        v.join().unwrap();
    }
    let got = got.load(Ordering::Relaxed);
    let bound = BURST + (RATE as f64 * window) as u64;
    println!(
        "flood: {sent} requests ({sent_bytes} B) as {PEER} for 3 s; the victim got {got} B \
         in {window:.1} s (bound {bound} B)"
    );
    assert!(sent > 1000, "the flood hardly ran: {sent} requests");
    assert!(
        got > 0,
        "nothing reached the victim: was the flood answered at all?"
    );
    assert!(
        got <= bound,
        "the victim got {got} B, over the budget of {bound} B ({sent} spoofed requests)"
    );
    let (_, metrics) = lab.http(Host::Server, sa(SERVER, 8080), "GET", "/metrics", &[], "");
    let dropped: u64 = metrics
        .lines()
        .find(|l| l.starts_with("switchboard_dropped_total{reason=\"unauthenticated_rate\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(
        dropped > sent / 2,
        "dropped_total{{reason=\"unauthenticated_rate\"}} is {dropped} for {sent} requests"
    );
}
