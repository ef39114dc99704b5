//! STUN Binding over UDP and TCP against the in-process server, with an independent
//! client codec (webrtc-rs `stun`) and coturn's `turnutils_stunclient`.

use std::net::SocketAddr;
use std::time::Duration;
use stun::agent::TransactionId;
use stun::message::{
    Getter, Message as ClientMessage, BINDING_ERROR, BINDING_REQUEST, BINDING_SUCCESS,
};
use stun::xoraddr::XorMappedAddress;
use switchboard::{Config, RunningServer, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

async fn start(extra: &str) -> RunningServer {
    let toml = format!(
        "[http]\nlisten = \"127.0.0.1:0\"\n[turn]\nlisten = [\"127.0.0.1:0\", \"[::1]:0\"]\n{extra}"
    );
    let cfg = Config::from_toml(&toml).expect("test config is valid");
    Server::new(cfg).start().await.expect("server starts")
}

fn binding_request() -> ClientMessage {
    let mut m = ClientMessage::new();
    m.build(&[Box::new(TransactionId::new()), Box::new(BINDING_REQUEST)])
        .expect("build binding request");
    m
}

fn decode(buf: &[u8]) -> ClientMessage {
    let mut m = ClientMessage::new();
    m.raw = buf.to_vec();
    m.decode().expect("server sent a valid STUN message");
    m
}

fn mapped(m: &ClientMessage) -> SocketAddr {
    let mut x = XorMappedAddress::default();
    x.get_from(m).expect("XOR-MAPPED-ADDRESS present");
    SocketAddr::new(x.ip, x.port)
}

async fn udp_roundtrip(sock: &UdpSocket, server: SocketAddr, req: &[u8]) -> Vec<u8> {
    sock.send_to(req, server).await.expect("send");
    let mut buf = vec![0u8; 2048];
    let (n, from) = tokio::time::timeout(Duration::from_secs(5), sock.recv_from(&mut buf))
        .await
        .expect("answer within 5 s")
        .expect("recv");
    assert_eq!(from, server);
    buf.truncate(n);
    buf
}

#[tokio::test]
async fn udp_binding_reports_reflexive_address_on_v4_and_v6() {
    let srv = start("").await;
    let b = srv.bound();
    assert_eq!(b.udp.len(), 2);
    for &server in &b.udp {
        let bind: SocketAddr = if server.is_ipv4() {
            "127.0.0.1:0".parse().unwrap()
        } else {
            "[::1]:0".parse().unwrap()
        };
        let sock = UdpSocket::bind(bind).await.unwrap();
        let req = binding_request();
        let resp = decode(&udp_roundtrip(&sock, server, &req.raw).await);
        assert_eq!(resp.typ, BINDING_SUCCESS);
        assert_eq!(resp.transaction_id, req.transaction_id);
        assert_eq!(mapped(&resp), sock.local_addr().unwrap());
    }
    srv.shutdown();
    srv.wait().await;
}

#[tokio::test]
async fn garbage_burst_does_not_stop_the_listener() {
    let srv = start("").await;
    let server = srv.bound().udp[0];
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let valid = binding_request().raw;
    let mut rng_state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = || {
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        rng_state
    };
    for i in 0..10_000u32 {
        let len = (next() % 600) as usize;
        let mut pkt: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        // A third of the garbage looks like STUN (cookie, zero top bits) to reach the parser.
        if i % 3 == 0 && pkt.len() >= 20 {
            pkt[0] &= 0x3f;
            pkt[4..8].copy_from_slice(&0x2112_A442u32.to_be_bytes());
            // Sometimes a plausible header with a corrupted body.
            if i % 2 == 0 {
                let n = valid.len().min(pkt.len());
                pkt[..n].copy_from_slice(&valid[..n]);
                pkt[(next() as usize) % n] ^= 0xff;
            }
        }
        // Tolerate ENOBUFS-style send failures: the point is to flood the server.
        let _ = sock.send_to(&pkt, server).await;
    }
    // The next valid request is answered (retry in case the socket buffer overflowed).
    let mut buf = vec![0u8; 2048];
    let mut answered = None;
    for _ in 0..50 {
        sock.send_to(&valid, server).await.unwrap();
        if let Ok(Ok((n, _))) =
            tokio::time::timeout(Duration::from_millis(200), sock.recv_from(&mut buf)).await
        {
            let m = decode(&buf[..n]);
            if m.transaction_id.0 == valid[8..20] {
                answered = Some(m);
                break;
            }
        }
    }
    let m = answered.expect("valid request answered after the garbage burst");
    assert_eq!(mapped(&m), sock.local_addr().unwrap());
    let metrics = srv.shared().metrics.render();
    let malformed = metric(
        &metrics,
        "switchboard_stun_requests_total{result=\"malformed\"}",
    );
    assert!(malformed > 0.0, "malformed STUN counted: {malformed}");
    srv.shutdown();
    srv.wait().await;
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn unknown_comprehension_required_attribute_gets_420_over_udp() {
    let srv = start("").await;
    let server = srv.bound().udp[0];
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut req = Vec::new();
    let tid = [9u8; 12];
    let mut e = switchboard::stun::Encoder::new(
        &mut req,
        switchboard::stun::method::BINDING,
        switchboard::stun::Class::Request,
        &tid,
    );
    e.attr(0x0031, b"what");
    e.finish_with_fingerprint();
    let resp = decode(&udp_roundtrip(&sock, server, &req).await);
    assert_eq!(resp.typ, BINDING_ERROR);
    let mut code = stun::error_code::ErrorCodeAttribute::default();
    code.get_from(&resp).unwrap();
    assert_eq!(code.code.0, 420);
    let unknown = resp
        .get(stun::attributes::ATTR_UNKNOWN_ATTRIBUTES)
        .expect("UNKNOWN-ATTRIBUTES present");
    assert_eq!(unknown, vec![0x00, 0x31]);
    srv.shutdown();
    srv.wait().await;
}

#[tokio::test]
async fn tcp_binding_handles_split_and_pipelined_frames() {
    let srv = start("").await;
    let server = srv.bound().tcp[0];
    let mut s = TcpStream::connect(server).await.unwrap();
    let a = binding_request();
    let b = binding_request();
    // First request split across writes, second pipelined behind it.
    s.write_all(&a.raw[..7]).await.unwrap();
    s.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut rest = a.raw[7..].to_vec();
    rest.extend_from_slice(&b.raw);
    s.write_all(&rest).await.unwrap();
    for want in [&a, &b] {
        let resp = read_stun(&mut s).await;
        assert_eq!(resp.transaction_id, want.transaction_id);
        assert_eq!(mapped(&resp), s.local_addr().unwrap());
    }
    srv.shutdown();
    srv.wait().await;
}

async fn read_stun(s: &mut TcpStream) -> ClientMessage {
    let mut hdr = [0u8; 20];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut hdr))
        .await
        .expect("response within 5 s")
        .expect("read header");
    let len = u16::from_be_bytes([hdr[2], hdr[3]]) as usize;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.expect("read body");
    let mut all = hdr.to_vec();
    all.extend_from_slice(&body);
    decode(&all)
}

#[tokio::test]
async fn stalled_and_garbage_tcp_clients_do_not_block_others() {
    let srv = start("").await;
    let server = srv.bound().tcp[0];
    // A client that sends half a header and stalls.
    let mut stalled = TcpStream::connect(server).await.unwrap();
    stalled.write_all(&[0x00, 0x01, 0x00]).await.unwrap();
    // A client that sends garbage is disconnected.
    let mut junk = TcpStream::connect(server).await.unwrap();
    junk.write_all(b"\xff\xfe this is not STUN at all")
        .await
        .unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), junk.read(&mut buf))
        .await
        .expect("garbage client is closed promptly")
        .unwrap_or(0);
    assert_eq!(n, 0, "garbage client gets no answer, only a close");
    // A well-behaved client is still served meanwhile.
    let mut good = TcpStream::connect(server).await.unwrap();
    let req = binding_request();
    good.write_all(&req.raw).await.unwrap();
    let resp = read_stun(&mut good).await;
    assert_eq!(resp.transaction_id, req.transaction_id);
    srv.shutdown();
    srv.wait().await;
}

#[tokio::test]
async fn idle_tcp_connections_time_out() {
    let mut cfg = Config::from_toml(
        "[http]\nlisten = \"127.0.0.1:0\"\n[turn]\nlisten = [\"127.0.0.1:0\"]\ntcp_idle_timeout_secs = 1\n",
    )
    .unwrap();
    cfg.turn.udp = false;
    let srv = Server::new(cfg).start().await.unwrap();
    let server = srv.bound().tcp[0];
    let mut s = TcpStream::connect(server).await.unwrap();
    // One valid message, then silence: the idle timeout (not the first-message deadline).
    let req = binding_request();
    s.write_all(&req.raw).await.unwrap();
    read_stun(&mut s).await;
    let mut buf = [0u8; 4];
    // Generous bound: the server must close the silent connection on its own.
    let r = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await;
    assert!(
        matches!(r, Ok(Ok(0)) | Ok(Err(_))),
        "idle connection closed: {r:?}"
    );
    let metrics = srv.shared().metrics.render();
    assert_eq!(
        metric(
            &metrics,
            "switchboard_dropped_total{reason=\"stream_idle\"}"
        ),
        1.0
    );
    srv.shutdown();
    srv.wait().await;
}

#[tokio::test]
async fn http_probes_and_info() {
    let srv = start("").await;
    let base = format!("http://{}", srv.http_addr());
    let c = reqwest::Client::new();
    assert_eq!(
        c.get(format!("{base}/livez"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        c.get(format!("{base}/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let info: serde_json::Value = c
        .get(format!("{base}/v1/info"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(info["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(info["services"]["stun"]["udp"].as_array().unwrap().len(), 2);
    assert_eq!(
        c.get(format!("{base}/nope")).send().await.unwrap().status(),
        404
    );
    srv.shutdown();
    srv.wait().await;
}

/// coturn's own STUN client, a real third-party implementation.
#[tokio::test]
async fn turnutils_stunclient_interop() {
    if std::process::Command::new("turnutils_stunclient")
        .output()
        .is_err()
    {
        panic!("turnutils_stunclient missing: run scripts/install-test-deps.sh");
    }
    let srv = start("").await;
    for server in srv.bound().udp {
        let out = tokio::process::Command::new("turnutils_stunclient")
            .arg("-p")
            .arg(server.port().to_string())
            .arg(server.ip().to_string())
            .output()
            .await
            .expect("run turnutils_stunclient");
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        let line = text
            .lines()
            .find(|l| l.contains("UDP reflexive addr:"))
            .unwrap_or_else(|| panic!("no reflexive address in output:\n{text}"));
        // It prints `IP:PORT` for both families (no brackets around IPv6).
        let addr = line
            .rsplit("UDP reflexive addr:")
            .next()
            .map(str::trim)
            .and_then(|a| a.rsplit_once(':'))
            .and_then(|(ip, port)| Some(SocketAddr::new(ip.parse().ok()?, port.parse().ok()?)))
            .unwrap_or_else(|| panic!("unparsable address in {line:?}"));
        assert_eq!(addr.ip(), server.ip(), "{line}");
        assert_ne!(addr.port(), 0);
        assert_ne!(addr.port(), server.port());
    }
    let metrics = srv.shared().metrics.render();
    assert!(
        metric(
            &metrics,
            "switchboard_stun_requests_total{result=\"success\"}"
        ) >= 2.0
    );
    srv.shutdown();
    srv.wait().await;
}
