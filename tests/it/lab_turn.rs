//! TURN in the network lab: a server on wildcard listeners behind the public segment, clients
//! in homes behind endpoint-dependent NATs, coturn's real clients and the shipped Kubernetes
//! configuration. See tests/support/lab/mod.rs for the topology; these tests skip (loudly) where the
//! lab cannot be built and fail there when CI=true.

use crate::support::lab;
use crate::support::turn_common;

use lab::turn::Client;
use lab::{sa, Host, Lab, PEER, ROUTER1, ROUTER2, SERVER, SERVER2};
use std::time::Duration;
use switchboard::stun::codec::attr;

/// A server on every interface, like the shipped configs, with a static TURN user.
const WILDCARD: &str = r#"
[http]
listen = "0.0.0.0:8080"
[turn]
listen = ["0.0.0.0:3478"]
relay_port_min = 50000
relay_port_max = 50999
[auth]
backends = ["open"]
allow_open_on_public = true
[auth.turn_users]
alice = "wonder"
"#;

fn client(lab: &Lab, h: Host, server: &str) -> Client {
    Client::new(lab.udp(h, "0.0.0.0:0"), sa(server, 3478), "alice", "wonder")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn natted_home_relays_through_a_wildcard_listener_with_the_public_address() {
    let Some(mut lab) = Lab::start("natted_home_relays_through_a_wildcard_listener") else {
        return;
    };
    lab.start_switchboard(WILDCARD, &[], sa(SERVER, 8080));
    lab.spawn(
        Host::Peer,
        "peer",
        "turnutils_peer",
        &["-L", PEER, "-p", "3480"],
    );

    // Our own client first: it sees every address exactly.
    let mut c = client(&lab, Host::Home1, SERVER);
    let b = c.binding().await;
    let mapped = b.addr(attr::XOR_MAPPED_ADDRESS).expect("mapped");
    assert_eq!(
        mapped.ip().to_string(),
        ROUTER1,
        "the home is behind its NAT"
    );
    let r = c.allocate().await;
    assert_eq!(r.code(), None, "allocate from the home");
    let relayed = r.addr(attr::XOR_RELAYED_ADDRESS).expect("relayed");
    assert_eq!(
        relayed.ip().to_string(),
        SERVER,
        "relayed address is the server's public address, not 0.0.0.0"
    );
    assert_eq!(r.from, sa(SERVER, 3478));

    // coturn's client through the same wildcard listener, relaying to a public echo peer.
    let out = lab.output(
        Host::Home1,
        "turnutils_uclient",
        &[
            "-e", PEER, "-r", "3480", "-u", "alice", "-w", "wonder", "-n", "20", "-l", "120", "-c",
            SERVER,
        ],
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let rep = turn_common::parse_report(&text);
    assert!(rep.sent > 0, "uclient sent nothing:\n{text}");
    assert_eq!(rep.received, rep.sent, "echoes lost:\n{text}");
    assert!(
        !text.contains("0.0.0.0:5"),
        "uclient was handed a wildcard relay address:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lab_nat_blocks_direct_paths_between_homes() {
    let Some(mut lab) = Lab::start("the_lab_nat_blocks_direct_paths_between_homes") else {
        return;
    };
    lab.start_switchboard(WILDCARD, &[], sa(SERVER, 8080));
    // Each home learns its server-reflexive address, then sends to the other's.
    let mut a = client(&lab, Host::Home1, SERVER);
    let mut b = client(&lab, Host::Home2, SERVER);
    let a_srflx = a.binding().await.addr(attr::XOR_MAPPED_ADDRESS).unwrap();
    let b_srflx = b.binding().await.addr(attr::XOR_MAPPED_ADDRESS).unwrap();
    assert_eq!(a_srflx.ip().to_string(), ROUTER1);
    assert_eq!(b_srflx.ip().to_string(), ROUTER2);
    let mut buf = [0u8; 64];
    for _ in 0..5 {
        a.sock.send_to(b"hole?", b_srflx).await.unwrap();
        b.sock.send_to(b"hole?", a_srflx).await.unwrap();
    }
    let got = tokio::time::timeout(Duration::from_secs(1), b.sock.recv_from(&mut buf)).await;
    assert!(
        got.is_err(),
        "a direct srflx path crossed the NATs: {got:?}"
    );
    let got = tokio::time::timeout(Duration::from_secs(1), a.sock.recv_from(&mut buf)).await;
    assert!(
        got.is_err(),
        "a direct srflx path crossed the NATs: {got:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_to_relay_works_and_relay_to_the_servers_own_ports_is_refused() {
    let Some(mut lab) = Lab::start("relay_to_relay_and_own_ports") else {
        return;
    };
    lab.start_switchboard(WILDCARD, &[], sa(SERVER, 8080));
    let mut a = client(&lab, Host::Home1, SERVER);
    let mut b = client(&lab, Host::Home2, SERVER);
    let ra = a.allocate().await.addr(attr::XOR_RELAYED_ADDRESS).unwrap();
    let rb = b.allocate().await.addr(attr::XOR_RELAYED_ADDRESS).unwrap();
    assert_eq!(ra.ip().to_string(), SERVER);
    assert_eq!(rb.ip().to_string(), SERVER);

    // SSRF: the server's HTTP port, STUN port and SSH are not peers.
    for port in [8080, 3478, 22] {
        let r = a.permit(sa(SERVER, port)).await;
        assert_eq!(r.code(), Some(403), "permission to our own port {port}");
        let r = a.channel_bind(sa(SERVER, port), 0x4001).await;
        assert_eq!(r.code(), Some(403), "channel to our own port {port}");
    }

    // Relay to relay: the most common relay-only call, between two NATed homes.
    assert_eq!(a.permit(rb).await.code(), None);
    assert_eq!(b.permit(ra).await.code(), None);
    a.send(rb, b"from home 1").await;
    let (peer, data, from) = b
        .recv_data(Duration::from_secs(3))
        .await
        .expect("A→B relayed");
    assert_eq!((peer, data.as_slice()), (ra, &b"from home 1"[..]));
    assert_eq!(from, sa(SERVER, 3478));
    b.send(ra, b"from home 2").await;
    let (peer, data, _) = a
        .recv_data(Duration::from_secs(3))
        .await
        .expect("B→A relayed");
    assert_eq!((peer, data.as_slice()), (rb, &b"from home 2"[..]));

    // A Send indication to a permitted own IP but a non-relay port goes nowhere.
    let http = lab.tcp(Host::Peer, sa(SERVER, 8080)).expect("HTTP is up");
    drop(http);
    a.send(sa(SERVER, 8080), b"GET /metrics HTTP/1.0\r\n\r\n")
        .await;
    let r = lab.http(Host::Peer, sa(SERVER, 8080), "GET", "/metrics", &[], "");
    assert!(
        r.1.contains("switchboard_"),
        "metrics readable from the lab"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_homed_server_answers_and_relays_from_the_address_each_client_used() {
    let Some(mut lab) = Lab::start("multi_homed_server") else {
        return;
    };
    lab.ip(Host::Server, &format!("addr add {SERVER2}/24 dev e0"))
        .expect("second address");
    lab.start_switchboard(WILDCARD, &[], sa(SERVER, 8080));
    lab.spawn(
        Host::Peer,
        "peer",
        "turnutils_peer",
        &["-L", PEER, "-p", "3480"],
    );
    for (server, h) in [
        (SERVER2, Host::Home2),
        (SERVER, Host::Home1),
        (SERVER2, Host::Peer),
    ] {
        let mut c = client(&lab, h, server);
        let b = c.binding().await;
        assert_eq!(b.from, sa(server, 3478), "Binding answered from {server}");
        let r = c.allocate().await;
        assert_eq!(r.code(), None);
        assert_eq!(r.from, sa(server, 3478), "Allocate answered from {server}");
        let relayed = r.addr(attr::XOR_RELAYED_ADDRESS).unwrap();
        assert_eq!(
            relayed.ip().to_string(),
            server,
            "relay on the address used"
        );
        // Peer data comes back from the address the client used, via a relay bound there.
        assert_eq!(c.permit(sa(PEER, 3480)).await.code(), None);
        // The echo peer may still be starting: ask a few times.
        let mut echo = None;
        for _ in 0..5 {
            c.send(sa(PEER, 3480), b"echo me").await;
            echo = c.recv_data(Duration::from_secs(1)).await;
            if echo.is_some() {
                break;
            }
        }
        let (peer, data, from) = echo.unwrap_or_else(|| panic!("no echo through {server}"));
        assert_eq!(peer, sa(PEER, 3480));
        assert_eq!(data, b"echo me");
        assert_eq!(from, sa(server, 3478), "relayed data leaves from {server}");
    }
}

/// The ConfigMap's switchboard.toml, exactly as shipped.
fn shipped_configmap_toml() -> String {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/kubernetes/configmap.yaml"
    ))
    .expect("configmap.yaml");
    let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).expect("yaml");
    doc["data"]["switchboard.toml"]
        .as_str()
        .expect("data.switchboard.toml")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipped_kubernetes_config_relays_between_natted_homes() {
    let Some(mut lab) = Lab::start("shipped_kubernetes_config") else {
        return;
    };
    let toml = shipped_configmap_toml();
    // The shipped STUN servers for relay_ip = "auto" are outside the lab: name the lab's.
    let stun = format!(r#"["{}"]"#, lab.stun_server());
    // The JWT key of secret.yaml is not in the lab: log in with the open backend instead.
    lab.start_switchboard(
        &toml,
        &[
            ("SWITCHBOARD_PUBLIC__DISCOVER_STUN", stun.as_str()),
            ("SWITCHBOARD_AUTH__BACKENDS", r#"["open"]"#),
            ("SWITCHBOARD_AUTH__ALLOW_OPEN_ON_PUBLIC", "true"),
            ("SWITCHBOARD_AUTH__TURN_SECRETS", r#"["lab-secret"]"#),
        ],
        sa(SERVER, 8080),
    );
    let mut relayed = Vec::new();
    let mut clients = Vec::new();
    for (h, name) in [(Host::Home1, "ann"), (Host::Home2, "bob")] {
        let (status, resp) = lab.http(
            h,
            sa(SERVER, 8080),
            "POST",
            "/v1/login",
            &[],
            &format!(r#"{{"name":"{name}"}}"#),
        );
        assert_eq!(status, 200, "login from {h:?}: {resp}");
        let body = &resp[resp.find("\r\n\r\n").expect("body") + 4..];
        let v: serde_json::Value = serde_json::from_str(body.trim()).expect("login JSON");
        let servers = v["iceServers"].as_array().expect("iceServers");
        let turn = servers
            .iter()
            .find(|s| s["username"].is_string())
            .expect("a TURN entry");
        let urls = turn["urls"].to_string();
        assert!(urls.contains("turn:turn.example.com:3478"), "{urls}");
        assert!(
            !urls.contains("0.0.0.0") && !urls.contains("127.0.0.1"),
            "{urls}"
        );
        let mut c = Client::new(
            lab.udp(h, "0.0.0.0:0"),
            sa(SERVER, 3478),
            turn["username"].as_str().unwrap(),
            turn["credential"].as_str().unwrap(),
        );
        let r = c.allocate().await;
        assert_eq!(r.code(), None, "allocate with the login's credentials");
        let ra = r.addr(attr::XOR_RELAYED_ADDRESS).unwrap();
        assert_eq!(ra.ip().to_string(), SERVER, "public relayed address");
        relayed.push(ra);
        clients.push(c);
    }
    let (b, a) = (clients.pop().unwrap(), clients.pop().unwrap());
    let (mut a, mut b) = (a, b);
    assert_eq!(a.permit(relayed[1]).await.code(), None);
    assert_eq!(b.permit(relayed[0]).await.code(), None);
    for i in 0..10u8 {
        a.send(relayed[1], &[i; 100]).await;
        let (_, data, _) = b.recv_data(Duration::from_secs(3)).await.expect("A→B");
        assert_eq!(data, vec![i; 100]);
        b.send(relayed[0], &[i; 50]).await;
        let (_, data, _) = a.recv_data(Duration::from_secs(3)).await.expect("B→A");
        assert_eq!(data, vec![i; 50]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ice_servers_carry_the_address_a_remote_client_used() {
    let Some(mut lab) = Lab::start("ice_servers_carry_the_public_address") else {
        return;
    };
    lab.ip(Host::Server, &format!("addr add {SERVER2}/24 dev e0"))
        .expect("second address");
    lab.start_switchboard(WILDCARD, &[], sa(SERVER, 8080));
    for (server, h) in [(SERVER, Host::Home1), (SERVER2, Host::Home2)] {
        let (status, resp) = lab.http(
            h,
            sa(server, 8080),
            "POST",
            "/v1/login",
            &[],
            r#"{"name":"carol"}"#,
        );
        assert_eq!(status, 200, "{resp}");
        assert!(resp.contains(&format!("stun:{server}:3478")), "{resp}");
        assert!(
            resp.contains(&format!("turn:{server}:3478?transport=udp")),
            "{resp}"
        );
        assert!(
            !resp.contains("0.0.0.0") && !resp.contains("127.0.0.1"),
            "{resp}"
        );
    }
}

/// Needs no lab: a wildcard relay bind with nothing to report stops the start-up (exit 2).
#[test]
fn wildcard_relay_bind_without_relay_ip_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        "[turn]\nlisten = [\"0.0.0.0:0\"]\nrelay_bind = \"0.0.0.0\"\n[http]\nlisten = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    // SWITCHBOARD_LAB (set by hand to require the lab) is the test's switch, not a config
    // override.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .arg("--config")
        .arg(&path)
        .env_remove("SWITCHBOARD_LAB")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("turn.relay_ip"), "{err}");
}
