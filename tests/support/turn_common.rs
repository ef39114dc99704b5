//! Helpers shared by the TURN integration tests: an in-process server, echo peers (in-process,
//! and coturn's), `turnutils_uclient`, and a minimal raw STUN client for negative tests.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use switchboard::stun::codec::{attr, decode_error_code, long_term_key, Class, Encoder, Message};
use switchboard::{Config, RunningServer, Server};
use tokio::net::UdpSocket;

/// The REST secret and static user every test server accepts.
pub const SECRET: &str = "it-secret";
/// Static user name.
pub const USER: &str = "alice";
/// Static user password.
pub const PASS: &str = "wonder";

/// Start an in-process server on loopback ephemeral ports, with extra `[turn]` keys.
pub async fn start(turn_extra: &str) -> RunningServer {
    let listen = if turn_extra.contains("listen =") {
        ""
    } else {
        "listen = [\"127.0.0.1:0\"]\n"
    };
    let text = format!(
        "[turn]\n{listen}{turn_extra}\n\
         [http]\nlisten = \"127.0.0.1:0\"\n\
         [auth]\nturn_secrets = [\"{SECRET}\"]\n[auth.turn_users]\n{USER} = \"{PASS}\"\n"
    );
    let cfg = Config::from_toml(&text).expect("test config is valid");
    Server::new(cfg).start().await.expect("server starts")
}

/// The UDP STUN/TURN address of a running server.
pub fn udp_addr(s: &RunningServer) -> SocketAddr {
    s.bound().udp[0]
}

/// coturn's UDP echo peer, killed on drop.
pub struct Peer {
    child: Child,
    /// Its UDP port on 127.0.0.1.
    pub port: u16,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A UDP echo peer inside the test process, with the task that runs it (abort it to make the
/// peer vanish): for relays that need no `turnutils_peer`.
pub async fn echo_peer_task() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let s = UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind echo peer");
    let addr = s.local_addr().expect("echo peer addr");
    let h = tokio::spawn(async move {
        let mut b = [0u8; 2048];
        while let Ok((n, from)) = s.recv_from(&mut b).await {
            let _ = s.send_to(&b[..n], from).await;
        }
    });
    (addr, h)
}

/// A UDP echo peer inside the test process, for as long as the process runs.
pub async fn echo_peer() -> SocketAddr {
    echo_peer_task().await.0
}

/// Start `turnutils_peer` on a free loopback port and wait until it echoes.
pub async fn start_peer() -> Peer {
    start_peer_on("127.0.0.1").await
}

/// Start `turnutils_peer` on a free port of `host` (`127.0.0.1` or `::1`).
pub async fn start_peer_on(host: &str) -> Peer {
    let any: SocketAddr = SocketAddr::new(host.parse().expect("loopback ip"), 0);
    for _ in 0..20 {
        let port = {
            let s = std::net::UdpSocket::bind(any).expect("bind probe");
            s.local_addr().expect("probe addr").port()
        };
        let child = Command::new("turnutils_peer")
            .args(["-L", host, "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("turnutils_peer is installed (coturn package)");
        let peer = Peer { child, port };
        // The client also talks RTCP to port + 1, so both ports must echo.
        let probe = UdpSocket::bind(any).await.expect("bind");
        let mut ok = [false; 2];
        for _ in 0..50 {
            for (i, p) in [port, port.wrapping_add(1)].into_iter().enumerate() {
                if ok[i] {
                    continue;
                }
                let _ = probe.send_to(b"ping", SocketAddr::new(any.ip(), p)).await;
                let mut b = [0u8; 16];
                if let Ok(Ok((n, from))) =
                    tokio::time::timeout(Duration::from_millis(100), probe.recv_from(&mut b)).await
                {
                    if &b[..n] == b"ping" {
                        ok[(from.port() != port) as usize] = true;
                    }
                }
            }
            if ok == [true, true] {
                return peer;
            }
        }
        drop(peer);
    }
    panic!("turnutils_peer did not start");
}

/// What `turnutils_uclient` reported.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Messages sent to the peer through the relay.
    pub sent: u64,
    /// Messages received back.
    pub received: u64,
    /// Lost packets.
    pub lost: u64,
    /// The whole output, for assertion messages.
    pub output: String,
}

/// Run `turnutils_uclient` against `server` with an echo peer on `peer_port`.
pub async fn uclient(server: SocketAddr, peer_port: u16, args: &[&str]) -> Report {
    uclient_to(server, "127.0.0.1", peer_port, args).await
}

/// Run `turnutils_uclient` against `server` with an echo peer at `peer_host:peer_port`.
pub async fn uclient_to(
    server: SocketAddr,
    peer_host: &str,
    peer_port: u16,
    args: &[&str],
) -> Report {
    let mut cmd = Command::new("turnutils_uclient");
    cmd.args(["-e", peer_host, "-r", &peer_port.to_string()])
        .args(["-p", &server.port().to_string()])
        .args(args)
        .arg(server.ip().to_string());
    let out = tokio::task::spawn_blocking(move || {
        cmd.stdin(Stdio::null())
            .output()
            .expect("turnutils_uclient is installed (coturn package)")
    })
    .await
    .expect("uclient task");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    parse_report(&text)
}

fn number_after(line: &str, key: &str) -> Option<u64> {
    let i = line.find(key)? + key.len();
    let digits: String = line[i..]
        .chars()
        .skip_while(|c| *c == ' ')
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

/// Parse the summary lines of `turnutils_uclient`.
pub fn parse_report(text: &str) -> Report {
    let mut r = Report {
        output: text.to_string(),
        lost: u64::MAX,
        ..Default::default()
    };
    for line in text.lines() {
        if line.contains("start_mclient: tot_send_msgs=") {
            r.sent = number_after(line, "tot_send_msgs=").unwrap_or(0);
            r.received = number_after(line, "tot_recv_msgs=").unwrap_or(0);
        }
        if let Some(l) = number_after(line, "Total lost packets") {
            r.lost = l;
        }
    }
    r
}

/// A raw STUN/TURN client on a UDP socket, for requests real clients would never send.
pub struct Raw {
    /// The client socket.
    pub sock: UdpSocket,
    /// The server.
    pub server: SocketAddr,
    /// The last nonce the server gave.
    pub nonce: Vec<u8>,
    /// The realm.
    pub realm: String,
    tid: u8,
}

/// A decoded response.
pub struct Resp {
    /// Raw bytes.
    pub raw: Vec<u8>,
}

impl Resp {
    /// The parsed message.
    pub fn msg(&self) -> Message<'_> {
        Message::parse(&self.raw).expect("server sent valid STUN")
    }
    /// The error code, if an error response.
    pub fn code(&self) -> Option<u16> {
        let m = self.msg();
        if m.class() != Class::Error {
            return None;
        }
        m.get(attr::ERROR_CODE)
            .and_then(|v| decode_error_code(v).ok())
            .map(|(c, _)| c)
    }
}

impl Raw {
    /// A new client socket for `server`.
    pub async fn new(server: SocketAddr) -> Raw {
        Raw {
            sock: UdpSocket::bind("127.0.0.1:0").await.expect("bind"),
            server,
            nonce: Vec::new(),
            realm: "switchboard".into(),
            tid: 0,
        }
    }

    /// A client on an already bound socket (for example one inside a lab namespace).
    pub fn on(sock: UdpSocket, server: SocketAddr) -> Raw {
        Raw {
            sock,
            server,
            nonce: Vec::new(),
            realm: "switchboard".into(),
            tid: 0,
        }
    }

    /// Send one request and wait for the response with the same transaction id.
    pub async fn request(
        &mut self,
        method: u16,
        attrs: &[(u16, Vec<u8>)],
        peers: &[SocketAddr],
        creds: Option<(&str, &str)>,
    ) -> Resp {
        self.tid = self.tid.wrapping_add(1);
        let tid = [self.tid; 12];
        let mut buf = Vec::new();
        let mut e = Encoder::new(&mut buf, method, Class::Request, &tid);
        for (t, v) in attrs {
            e.attr(*t, v);
        }
        for p in peers {
            e.xor_address(attr::XOR_PEER_ADDRESS, *p);
        }
        if let Some((u, p)) = creds {
            e.attr(attr::USERNAME, u.as_bytes());
            e.attr(attr::REALM, self.realm.as_bytes());
            e.attr(attr::NONCE, &self.nonce);
            e.integrity(&long_term_key(u, &self.realm, p));
        }
        e.finish_with_fingerprint();
        for _ in 0..5 {
            self.sock.send_to(&buf, self.server).await.expect("send");
            let mut rb = vec![0u8; 2048];
            let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
            while let Ok(Ok((n, _))) =
                tokio::time::timeout_at(deadline, self.sock.recv_from(&mut rb)).await
            {
                if n >= 20 && rb[8..20] == tid {
                    let resp = Resp {
                        raw: rb[..n].to_vec(),
                    };
                    if let Some(v) = resp.msg().get(attr::NONCE) {
                        self.nonce = v.to_vec();
                    }
                    return resp;
                }
            }
        }
        panic!("no response from server");
    }

    /// Unauthenticated Allocate to learn realm and nonce; asserts the 401.
    pub async fn challenge(&mut self) {
        let r = self
            .request(
                switchboard::stun::codec::method::ALLOCATE,
                &udp_transport(),
                &[],
                None,
            )
            .await;
        assert_eq!(r.code(), Some(401));
    }

    /// Allocate with credentials (after a challenge).
    pub async fn allocate(&mut self, user: &str, pass: &str) -> Resp {
        self.challenge().await;
        self.request(
            switchboard::stun::codec::method::ALLOCATE,
            &udp_transport(),
            &[],
            Some((user, pass)),
        )
        .await
    }

    /// Whether the server still answers a Binding request on a fresh socket.
    pub async fn server_alive(server: SocketAddr) -> bool {
        let mut r = Raw::new(server).await;
        let resp = r
            .request(switchboard::stun::codec::method::BINDING, &[], &[], None)
            .await;
        resp.msg().class() == Class::Success
    }
}

/// REQUESTED-TRANSPORT UDP.
pub fn udp_transport() -> Vec<(u16, Vec<u8>)> {
    vec![(attr::REQUESTED_TRANSPORT, vec![17, 0, 0, 0])]
}

/// The value of one sample line of the Prometheus text (`name{labels}` exactly).
pub fn metric(text: &str, sample: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or(0)
}

/// Wait up to two seconds for a counter to reach `want` (relay counters are flushed per
/// batch, just after the packets themselves), and return the last value seen.
pub async fn metric_reaches(server: &RunningServer, sample: &str, want: u64) -> u64 {
    let mut v = 0;
    for _ in 0..100 {
        v = metric(&server.shared().metrics.render(), sample);
        if v >= want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    v
}
