//! Floods of unauthenticated TCP and TLS connections on the STUN/TURN ports and on the shared
//! port (`shared_port.listen`), against the real in-process server: the per-IP and global caps hold, idle strangers cost a few bytes each
//! and are closed at the first-message deadline however they trickle, stalled TLS handshakes
//! cannot exceed their cap, and a legitimate client is served during and after each flood.
//!
//! The figures printed here (`cargo test --release --test attack_streams -- --nocapture`)
//! are the ones in docs/security.md.

use rustls::pki_types::{CertificateDer, ServerName};
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchboard::stun::{binding, Message};
use switchboard::{Config, RunningServer, Server};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

#[path = "support/cert.rs"]
mod cert;

/// Which port a flood targets: the dedicated STUN/TURN port, or the shared port (443 in
/// production), where every connection is classified before it reaches TURN or HTTP.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Port {
    Dedicated,
    Shared,
}

impl Port {
    /// Config for the shared port (with a fresh certificate in `dir`), or nothing.
    fn config(self, dir: &std::path::Path) -> String {
        match self {
            Port::Dedicated => String::new(),
            Port::Shared => {
                let (c, k) = cert::make_cert(dir, "shared");
                format!(
                    "[shared_port]\nlisten = [\"127.0.0.1:0\"]\n\
                     [tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
                    c.display(),
                    k.display()
                )
            }
        }
    }

    /// The plain-TCP target.
    fn addr(self, srv: &RunningServer) -> SocketAddr {
        match self {
            Port::Dedicated => srv.bound().tcp[0],
            Port::Shared => srv.bound().shared[0],
        }
    }

    /// The gauge of open connections on this port.
    fn open_gauge(self) -> &'static str {
        match self {
            Port::Dedicated => "switchboard_stream_connections_active{transport=\"tcp\"}",
            Port::Shared => "switchboard_stream_connections_active{transport=\"shared\"}",
        }
    }
}

/// The global-cap tests measure the process's RSS, so they run alone: they take this lock for
/// writing, every other test of this file for reading.
static RSS: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

async fn start(first_message_secs: u64, extra_turn: &str, extra: &str) -> RunningServer {
    let text = format!(
        "[http]\nlisten = \"127.0.0.1:0\"\n[turn]\nlisten = [\"127.0.0.1:0\"]\nudp = false\n\
         stream_first_message_timeout_secs = {first_message_secs}\ntcp_idle_timeout_secs = 2\n\
         {extra_turn}\n{extra}"
    );
    Server::new(Config::from_toml(&text).expect("valid config"))
        .start()
        .await
        .expect("server starts")
}

fn metric(srv: &RunningServer, sample: &str) -> u64 {
    srv.shared()
        .metrics
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or(0)
}

/// A TCP connection from a chosen loopback source address (127.0.0.0/8 is all local).
async fn connect_from(src: Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::new(IpAddr::V4(src), 0))?;
    s.connect(to).await
}

async fn binding_over<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) {
    let mut req = Vec::new();
    binding::request(&rand::random::<[u8; 12]>(), true, &mut req);
    s.write_all(&req).await.expect("send binding");
    let mut hdr = [0u8; 20];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut hdr))
        .await
        .expect("binding answered in time")
        .expect("binding answered");
    let len = u16::from_be_bytes([hdr[2], hdr[3]]) as usize;
    let mut all = hdr.to_vec();
    all.resize(20 + len, 0);
    s.read_exact(&mut all[20..]).await.expect("whole answer");
    let m = Message::parse(&all).expect("valid response");
    assert_eq!(m.transaction_id(), req[8..20]);
}

/// One Binding that may fail (the connection may have been dropped under a flood).
async fn try_binding<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> bool {
    let mut req = Vec::new();
    binding::request(&rand::random::<[u8; 12]>(), true, &mut req);
    if s.write_all(&req).await.is_err() {
        return false;
    }
    let mut hdr = [0u8; 20];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut hdr)).await,
        Ok(Ok(_))
    )
}

/// A legitimate client from its own address: one Binding over a fresh TCP connection.
async fn legit_binding(to: SocketAddr) -> Duration {
    let t = Instant::now();
    let mut s = connect_from(Ipv4Addr::new(127, 0, 0, 9), to)
        .await
        .expect("legit connect");
    binding_over(&mut s).await;
    t.elapsed()
}

/// Whether the server has closed `s` (EOF or reset) within `within`.
async fn closed_by_server(s: &mut TcpStream, within: Duration) -> bool {
    let mut b = [0u8; 64];
    matches!(
        tokio::time::timeout(within, s.read(&mut b)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Open-file budget of this process: the test and the server share it, two per connection.
fn fd_budget() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(1024)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_gets_only_its_share_of_stream_connections() {
    per_ip_cap(Port::Dedicated).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_gets_only_its_share_of_the_shared_port() {
    per_ip_cap(Port::Shared).await;
}

async fn per_ip_cap(port: Port) {
    let _shared = RSS.read().await;
    let dir = tempfile::tempdir().unwrap();
    let srv = start(
        2,
        "max_stream_connections_per_ip = 64",
        &port.config(dir.path()),
    )
    .await;
    let to = port.addr(&srv);
    let attacker = Ipv4Addr::new(127, 0, 0, 1);
    let mut held = Vec::new();
    for _ in 0..1000 {
        if let Ok(mut s) = connect_from(attacker, to).await {
            let _ = s.write_all(&[0x00]).await;
            held.push(s);
        }
    }
    // The server closes everything past the 64th at once.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let refused = metric(
        &srv,
        "switchboard_dropped_total{reason=\"stream_per_ip_limit\"}",
    );
    assert!(refused >= 900, "refused {refused}");
    let open = metric(&srv, port.open_gauge());
    assert!(open <= 64, "open {open}");
    // Another address is served during the flood.
    legit_binding(to).await;
    // Trickling one byte every 500 ms does not move the 2 s first-message deadline.
    let mut trickler = connect_from(Ipv4Addr::new(127, 0, 0, 10), to)
        .await
        .unwrap();
    let t0 = Instant::now();
    let mut closed = false;
    // Two bytes of a STUN header, then nothing that completes a message.
    for b in [0x00u8, 0x01, 0x00, 0x08, 0x21, 0x12, 0xa4, 0x42] {
        if trickler.write_all(&[b]).await.is_err() {
            closed = true;
            break;
        }
        if closed_by_server(&mut trickler, Duration::from_millis(500)).await {
            closed = true;
            break;
        }
    }
    assert!(
        closed || closed_by_server(&mut trickler, Duration::from_secs(2)).await,
        "trickler survived"
    );
    let took = t0.elapsed();
    assert!(took < Duration::from_millis(3500), "closed after {took:?}");
    // The 64 held idle connections are gone after the deadline, and the address is free again.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(metric(&srv, port.open_gauge()), 0);
    assert!(
        metric(
            &srv,
            "switchboard_dropped_total{reason=\"stream_first_message_timeout\"}"
        ) >= 64
    );
    drop(held);
    let mut again = connect_from(attacker, to).await.unwrap();
    binding_over(&mut again).await;
    srv.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_from_many_addresses_cost_little_and_stop_at_the_global_cap() {
    global_cap(Port::Dedicated).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_on_the_shared_port_cost_little_and_stop_at_the_global_cap() {
    global_cap(Port::Shared).await;
}

async fn global_cap(port: Port) {
    // The RSS measured here is the whole test process's: no other test of this file may run.
    let _alone = RSS.write().await;
    let dir = tempfile::tempdir().unwrap();
    // Two descriptors per connection (both ends live in this process): stay well inside.
    let n = 5000usize.min(fd_budget().saturating_sub(512) / 2);
    let cap = n - 500;
    let srv = start(
        30,
        // Each listener's accept loop holds one slot while it waits: serve the shared port alone.
        &format!(
            "max_stream_connections = {cap}\nmax_stream_connections_per_ip = 64\ntcp = {}",
            port == Port::Dedicated
        ),
        &port.config(dir.path()),
    )
    .await;
    let to = port.addr(&srv);
    legit_binding(to).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = rss_kib();
    let mut held = Vec::with_capacity(n);
    for i in 0..n {
        let src = Ipv4Addr::new(127, 1, (i / 50 / 250) as u8, (i / 50 % 250 + 1) as u8);
        if let Ok(mut s) = connect_from(src, to).await {
            let _ = s.write_all(&[0x00]).await;
            held.push(s);
        }
    }
    // Let the server accept up to its cap.
    let mut open = 0;
    for _ in 0..100 {
        open = metric(&srv, port.open_gauge());
        if open as usize >= cap {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = rss_kib();
    assert_eq!(open as usize, cap, "the global cap holds");
    assert!(
        metric(
            &srv,
            "switchboard_dropped_total{reason=\"stream_global_limit\"}"
        ) >= 1
    );
    let per_conn = (after.saturating_sub(before) * 1024) / cap as u64;
    println!(
        "idle TCP flood ({port:?} port): {n} connections from {} addresses, {cap} admitted; RSS {before} KiB -> {after} KiB \
         (+{} KiB, {per_conn} bytes per admitted connection, both ends in one process)",
        n.div_ceil(50),
        after.saturating_sub(before)
    );
    assert!(per_conn < 4096, "{per_conn} bytes per idle connection");
    // At the global cap new connections wait in the backlog: release some and the
    // legitimate client gets in.
    held.truncate(cap - 10);
    let t = tokio::time::timeout(Duration::from_secs(5), legit_binding(to))
        .await
        .expect("legit client served once slots free up");
    println!("legit binding at the cap took {t:?}");
    drop(held);
    srv.shutdown();
}

fn connector(ca: &std::path::Path) -> tokio_rustls::TlsConnector {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_tls_handshakes_are_capped_and_time_out() {
    stalled_handshakes(Port::Dedicated).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_tls_handshakes_on_the_shared_port_are_capped_and_time_out() {
    stalled_handshakes(Port::Shared).await;
}

async fn stalled_handshakes(port: Port) {
    let _shared = RSS.read().await;
    let dir = tempfile::tempdir().unwrap();
    let (c, k) = cert::make_cert(dir.path(), "turns");
    let srv = start(
        2,
        "tls_listen = [\"127.0.0.1:0\"]",
        &format!(
            "[shared_port]\nlisten = [\"127.0.0.1:0\"]\n\
             [tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\nmax_concurrent_handshakes = 8\n",
            c.display(),
            k.display()
        ),
    )
    .await;
    let (to, gauge) = match port {
        Port::Dedicated => (
            srv.bound().tls[0],
            "switchboard_tls_handshakes_active{listener=\"turns\"}",
        ),
        Port::Shared => (
            srv.bound().shared[0],
            "switchboard_tls_handshakes_active{listener=\"shared\"}",
        ),
    };
    // 200 stalled handshakes from 20 addresses: half silent, half sending the first byte of
    // a ClientHello and nothing more (those take handshake permits).
    let mut stalled = Vec::new();
    for i in 0..200u32 {
        if let Ok(mut s) = connect_from(Ipv4Addr::new(127, 2, 0, (i % 20 + 1) as u8), to).await {
            if i % 2 == 0 {
                let _ = s.write_all(&[0x16]).await;
            }
            stalled.push(s);
        }
    }
    let mut peak = 0;
    let t0 = Instant::now();
    // A legitimate client retries (as browsers do) until it is served.
    let legit = tokio::spawn({
        let c = c.clone();
        async move {
            let t = Instant::now();
            let mut tries = 0;
            loop {
                tries += 1;
                assert!(
                    t.elapsed() < Duration::from_secs(15),
                    "legit TLS client never served"
                );
                let Ok(tcp) = connect_from(Ipv4Addr::new(127, 0, 0, 9), to).await else {
                    continue;
                };
                let name = ServerName::try_from("localhost").unwrap();
                let Ok(Ok(mut tls)) =
                    tokio::time::timeout(Duration::from_secs(6), connector(&c).connect(name, tcp))
                        .await
                else {
                    continue;
                };
                if try_binding(&mut tls).await {
                    return (t.elapsed(), tries);
                }
            }
        }
    });
    while !legit.is_finished() && t0.elapsed() < Duration::from_secs(30) {
        peak = peak.max(metric(&srv, gauge));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (took, tries) = legit.await.unwrap();
    println!(
        "TLS handshake flood ({port:?} port): 200 stalled, peak {peak} in progress (cap 8); \
         legit client served after {took:?} ({tries} tries)"
    );
    assert!(peak <= 8, "peak {peak}");
    assert!(
        peak >= 4,
        "the stalled handshakes did take permits: peak {peak}"
    );
    assert!(
        metric(
            &srv,
            "switchboard_dropped_total{reason=\"tls_handshake_timeout\"}"
        ) >= 8
    );
    drop(stalled);
    srv.shutdown();
}
