//! TURN over TLS on the shared port (443 in production) against a dedicated `turns:` port and
//! against coturn's `turns:`, in one run, on loopback:
//!
//! - **time to the first relayed packet**: TCP connect, TLS handshake, Allocate (401, then
//!   authenticated), ChannelBind, one ChannelData out to a UDP echo peer and back; median and
//!   90th percentile over `--runs` fresh connections;
//! - **relay efficiency**: one allocation relays `--packets` ChannelData of `--size` bytes to the
//!   echo peer and back, `--window` in flight; the server process's CPU time (utime + stime from
//!   /proc) per relayed packet (each datagram counts twice: out and back).
//!
//! ```text
//! cargo build --release --bin switchboard
//! cargo bench --bench turn_tls_443 -- --bin target/release/switchboard [--runs 50] \
//!     [--packets 200000] [--size 160] [--window 32]
//! ```
//!
//! Without `--bench` (as `cargo test --all-targets` runs it) it is a smoke run: one first
//! packet through an in-process server's shared port.

#[path = "../tests/support/cert.rs"]
mod cert;
#[path = "../tests/support/turn_common.rs"]
mod turn_common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, ServerName};
use rustls_pki_types::pem::PemObject;
use switchboard::stun::codec::{attr, long_term_key, method, Class, Encoder, Message};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SECRET: &str = "bench-secret";
const REALM: &str = "bench";

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

fn arg(name: &str) -> Option<String> {
    let a: Vec<String> = std::env::args().collect();
    a.iter()
        .position(|x| x == name)
        .and_then(|i| a.get(i + 1).cloned())
}

fn num(name: &str, default: usize) -> usize {
    arg(name).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn connector(ca: &std::path::Path) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).expect("cert") {
        roots.add(c.expect("pem")).expect("root");
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"stun.turn".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

async fn read_frame(s: &mut Tls) -> Vec<u8> {
    let mut f = vec![0u8; 4];
    s.read_exact(&mut f).await.expect("read header");
    let len = u16::from_be_bytes([f[2], f[3]]) as usize;
    let body = if f[0] & 0xC0 == 0 {
        16 + len
    } else {
        (len + 3) & !3
    };
    f.resize(4 + body, 0);
    s.read_exact(&mut f[4..]).await.expect("read body");
    f
}

/// One TURN request with REST credentials, retried once with the nonce of a 401.
async fn request(s: &mut Tls, m: u16, attrs: &[(u16, Vec<u8>)], peer: Option<SocketAddr>) {
    let user = format!("{}:bench", switchboard::auth::unix_now() + 3600);
    let pass = switchboard::auth::rest_password(SECRET.as_bytes(), &user);
    let mut nonce: Option<Vec<u8>> = None;
    for tid in [[1u8; 12], [2u8; 12]] {
        let mut buf = Vec::new();
        let mut e = Encoder::new(&mut buf, m, Class::Request, &tid);
        for (t, v) in attrs {
            e.attr(*t, v);
        }
        if let Some(p) = peer {
            e.xor_address(attr::XOR_PEER_ADDRESS, p);
        }
        if let Some(n) = &nonce {
            e.attr(attr::USERNAME, user.as_bytes());
            e.attr(attr::REALM, REALM.as_bytes());
            e.attr(attr::NONCE, n);
            e.integrity(&long_term_key(&user, REALM, &pass));
        }
        e.finish();
        s.write_all(&buf).await.expect("write");
        let f = read_frame(s).await;
        let msg = Message::parse(&f).expect("response");
        match msg.class() {
            Class::Success => return,
            _ if nonce.is_none() => nonce = msg.get(attr::NONCE).map(<[u8]>::to_vec),
            _ => panic!("TURN request {m:#x} refused"),
        }
    }
    panic!("no success");
}

/// Connect, allocate, bind channel 0x4000 to `peer`.
async fn session(to: SocketAddr, tls: &tokio_rustls::TlsConnector, peer: SocketAddr) -> Tls {
    let tcp = TcpStream::connect(to).await.expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    let mut s = tls
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("TLS handshake");
    request(
        &mut s,
        method::ALLOCATE,
        &[(attr::REQUESTED_TRANSPORT, vec![17, 0, 0, 0])],
        None,
    )
    .await;
    request(
        &mut s,
        method::CHANNEL_BIND,
        &[(attr::CHANNEL_NUMBER, vec![0x40, 0, 0, 0])],
        Some(peer),
    )
    .await;
    s
}

fn channel_data(size: usize, tag: u8) -> Vec<u8> {
    let mut cd = vec![0x40, 0x00];
    cd.extend_from_slice(&(size as u16).to_be_bytes());
    cd.extend(std::iter::repeat_n(tag, size));
    cd.resize((cd.len() + 3) & !3, 0);
    cd
}

async fn next_channel_data(s: &mut Tls) -> Vec<u8> {
    loop {
        let f = read_frame(s).await;
        if f[0] & 0xC0 == 0x40 {
            return f;
        }
    }
}

/// Time from the TCP connect to the first echoed ChannelData.
async fn first_packet(
    to: SocketAddr,
    tls: &tokio_rustls::TlsConnector,
    peer: SocketAddr,
) -> Duration {
    let t = Instant::now();
    let mut s = session(to, tls, peer).await;
    s.write_all(&channel_data(100, 7)).await.expect("send");
    tokio::time::timeout(Duration::from_secs(5), next_channel_data(&mut s))
        .await
        .expect("first packet relayed");
    t.elapsed()
}

/// utime + stime of a process, from /proc (clock ticks of 10 ms).
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    // After the command name: state is field 3, utime 14 and stime 15 (proc(5)).
    let f: Vec<&str> = after.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (tick(11) + tick(12)) as f64 / 100.0
}

/// Relay `packets` datagrams with `window` in flight; (seconds, server CPU seconds, lost).
async fn efficiency(
    mut s: Tls,
    pid: u32,
    packets: usize,
    size: usize,
    window: usize,
) -> (f64, f64, usize) {
    let cd = channel_data(size, 9);
    let cpu0 = cpu_secs(pid);
    let t = Instant::now();
    let mut sent = 0;
    let mut got = 0;
    let mut lost = 0;
    while got < packets {
        let mut burst = Vec::new();
        while sent < packets && sent - got < window {
            burst.extend_from_slice(&cd);
            sent += 1;
        }
        if !burst.is_empty() {
            s.write_all(&burst).await.expect("send");
        }
        match tokio::time::timeout(Duration::from_secs(2), next_channel_data(&mut s)).await {
            Ok(_) => got += 1,
            // A lost datagram (UDP on loopback under load): send on.
            Err(_) => {
                lost += sent - got;
                got = sent;
            }
        }
    }
    (t.elapsed().as_secs_f64(), cpu_secs(pid) - cpu0, lost)
}

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn wait_tcp(a: SocketAddr) {
    for _ in 0..200 {
        if TcpStream::connect(a).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{a} never listened");
}

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i].as_secs_f64() * 1000.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = cert::make_cert(dir.path(), "localhost");
    let tls = connector(&cert);
    let peer = turn_common::echo_peer().await;
    if !std::env::args().any(|a| a == "--bench") {
        // Smoke run: the in-process server's shared port relays one packet.
        let text = format!(
            "[http]\nlisten = \"127.0.0.1:0\"\n[turn]\nlisten = [\"127.0.0.1:0\"]\nrealm = \"{REALM}\"\n\
             [shared_port]\nlisten = [\"127.0.0.1:0\"]\n\
             [tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n[auth]\nturn_secrets = [\"{SECRET}\"]\n",
            cert.display(),
            key.display()
        );
        let cfg = switchboard::Config::from_toml(&text).expect("config");
        let srv = switchboard::Server::new(cfg).start().await.expect("start");
        let t = first_packet(srv.bound().shared[0], &tls, peer).await;
        println!("smoke: first relayed packet over TLS on the shared port in {t:?}");
        srv.shutdown();
        return;
    }
    let runs = num("--runs", 50);
    let packets = num("--packets", 200_000);
    let size = num("--size", 160);
    let window = num("--window", 32);
    let bin = arg("--bin").unwrap_or_else(|| "target/release/switchboard".into());

    let (udp, tls_port, shared, http) = (free_port(), free_port(), free_port(), free_port());
    let config = dir.path().join("switchboard.toml");
    std::fs::write(
        &config,
        format!(
            "[http]\nlisten = \"127.0.0.1:{http}\"\n\
             [turn]\nlisten = [\"127.0.0.1:{udp}\"]\ntcp = false\ntls_listen = [\"127.0.0.1:{tls_port}\"]\n\
             realm = \"{REALM}\"\nmax_allocations_per_user = 100000\nshards = 1\n\
             [shared_port]\nlisten = [\"127.0.0.1:{shared}\"]\n\
             [tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n\
             [auth]\nturn_secrets = [\"{SECRET}\"]\nbackends = [\"open\"]\n",
            cert.display(),
            key.display()
        ),
    )
    .expect("config");
    let sb = Proc(
        Command::new(&bin)
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{bin}: {e} (cargo build --release --bin switchboard)")),
    );
    let (cp, ctls) = (free_port(), free_port());
    let coturn = Proc(
        Command::new("turnserver")
            .args(["-n", "--no-dtls", "--no-cli", "--no-udp", "--no-tcp-relay"])
            .args(["--listening-ip", "127.0.0.1", "--relay-ip", "127.0.0.1"])
            .args([
                "-p",
                &cp.to_string(),
                "--tls-listening-port",
                &ctls.to_string(),
            ])
            .arg(format!("--cert={}", cert.display()))
            .arg(format!("--pkey={}", key.display()))
            .args([
                "--use-auth-secret",
                &format!("--static-auth-secret={SECRET}"),
            ])
            .args(["-r", REALM, "--allow-loopback-peers", "--no-stdout-log"])
            .args(["--log-file=/dev/null", "--user-quota=0", "--total-quota=0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("turnserver (coturn)"),
    );
    let a = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
    for p in [tls_port, shared, ctls] {
        wait_tcp(a(p)).await;
    }
    let targets = [
        (
            "switchboard shared port (ALPN stun.turn)",
            a(shared),
            sb.0.id(),
        ),
        ("switchboard dedicated turns: port", a(tls_port), sb.0.id()),
        ("coturn turns: port", a(ctls), coturn.0.id()),
    ];
    println!(
        "TURN over TLS on loopback: {runs} first packets, then {packets} x {size} B ChannelData \
         with {window} in flight, per target"
    );
    println!("| target | first relayed packet, median | p90 | relay: packets/s each way | server CPU per relayed packet |");
    println!("|---|---|---|---|---|");
    for (name, to, pid) in targets {
        let mut times = Vec::with_capacity(runs);
        for _ in 0..runs {
            times.push(first_packet(to, &tls, peer).await);
        }
        let s = session(to, &tls, peer).await;
        let (secs, cpu, lost) = efficiency(s, pid, packets, size, window).await;
        println!(
            "| {name} | {:.2} ms | {:.2} ms | {:.0} ({lost} lost) | {:.2} µs |",
            pct(&mut times, 0.5),
            pct(&mut times, 0.9),
            packets as f64 / secs,
            cpu * 1e6 / (2 * packets) as f64
        );
    }
}
