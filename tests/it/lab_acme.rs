//! ACME on the shared port, in the network lab, against `pebble` (Let's Encrypt's test CA)
//! doing real TLS-ALPN-01 validations (`PEBBLE_VA_ALWAYS_VALID` unset) of
//! `turn.example.com:443`, which its host resolves to the server.
//!
//! - The server starts with no certificate at all, orders one, and serves it: `openssl
//!   s_client` on 443 sees pebble's intermediate as the issuer.
//! - Pebble issues 20-second certificates, so the renewal (at 2/3 of the lifetime, or
//!   `renew_before_secs` ahead) comes within seconds: the served certificate changes while a
//!   TURN-over-TLS allocation (coturn's `turnutils_uclient -S` on 443, relaying to a public
//!   echo peer) and a WSS signaling socket stay up, and both still work after it.
//! - A restart serves the cached certificate at once and orders nothing.
//! - With pebble stopped at renewal time, the old certificate keeps serving and
//!   `switchboard_acme_renewals_total{result="error"}` and `switchboard_acme_renewal_failing`
//!   rise; once a (fresh) pebble is back, the renewal goes through and the alarm clears.

use crate::support::lab;
use crate::support::lab_ca;
use crate::support::turn_common;

use futures_util::{SinkExt, StreamExt};
use lab::{sa, Host, Lab, PEER, SERVER};
use serde_json::{json, Value};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

const DOMAIN: &str = "turn.example.com";
/// Lifetime of pebble's certificates in these tests (seconds).
const VALIDITY: u64 = 20;

/// A CA and a certificate for pebble's own HTTPS listener (`pebble.lab`), in `dir`: the
/// server trusts the CA through `tls.acme.directory_ca_file`.
fn pebble_tls(dir: &Path) {
    lab_ca::ca_and_leaf(dir, "lab directory CA", "pebble.lab", "pebble");
}

/// Pebble on the public host: ACME on :14000, its management API (roots) on :15000,
/// validating TLS-ALPN-01 on port 443 of whatever the names resolve to.
fn start_pebble(lab: &mut Lab) {
    let dir = lab.dir.path().to_path_buf();
    pebble_tls(&dir);
    let cfg = dir.join("pebble.json");
    std::fs::write(
        &cfg,
        json!({"pebble": {
            "listenAddress": format!("{PEER}:14000"),
            "managementListenAddress": format!("{PEER}:15000"),
            "certificate": dir.join("pebble.crt"),
            "privateKey": dir.join("pebble.key"),
            "httpPort": 80,
            "tlsPort": 443,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
            "certificateValidityPeriod": VALIDITY,
        }})
        .to_string(),
    )
    .expect("pebble config");
    // The validator's resolver reads the hosts file: the name leads to the server.
    lab.etc_file(
        Host::Peer,
        "hosts",
        &format!("127.0.0.1 localhost\n{SERVER} {DOMAIN}\n"),
    );
    run_pebble(lab, "pebble");
}

/// Start pebble (configured by [`start_pebble`]) as process `name`; a fresh pebble has new
/// roots and knows no account.
fn run_pebble(lab: &mut Lab, name: &str) {
    let cfg = lab.dir.path().join("pebble.json").display().to_string();
    lab.spawn(
        Host::Peer,
        name,
        "env",
        &[
            // Real validation, no random sleeps; every order validates again (no reuse of
            // earlier authorizations), and no deliberately rejected nonces.
            "PEBBLE_VA_NOSLEEP=1",
            "PEBBLE_AUTHZREUSE=0",
            "PEBBLE_WFE_NONCEREJECT=0",
            "pebble",
            "-config",
            &cfg,
        ],
    );
    let t = Instant::now();
    while lab.tcp(Host::Peer, sa(PEER, 14000)).is_err() {
        assert!(
            lab.running(name) && t.elapsed() < Duration::from_secs(15),
            "pebble did not start:\n{}",
            lab.log(name)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The server with `[tls.acme]` against pebble and no certificate of its own.
fn start_server(lab: &mut Lab) {
    let dir = lab.dir.path().to_path_buf();
    lab.etc_file(
        Host::Server,
        "hosts",
        &format!("127.0.0.1 localhost\n{PEER} pebble.lab\n"),
    );
    let config = format!(
        "[http]\nlisten = \"0.0.0.0:8080\"\n\
         [turn]\nlisten = [\"0.0.0.0:3478\"]\nrealm = \"example.com\"\n\
         [shared_port]\nlisten = [\"0.0.0.0:443\"]\n\
         [tls.acme]\ndomains = [\"{DOMAIN}\"]\ncontact = [\"mailto:ops@example.com\"]\n\
         directory = \"https://pebble.lab:14000/dir\"\ndirectory_ca_file = \"{}\"\n\
         cache_dir = \"{}\"\nrenew_before_secs = 8\nretry_min_secs = 1\nretry_max_secs = 2\n\
         [auth]\nbackends = [\"open\"]\nallow_open_on_public = true\n\
         turn_secrets = [\"lab-secret\"]\n\
         [public]\nhost = \"{DOMAIN}\"\n",
        dir.join("ca.crt").display(),
        dir.join("acme").display(),
    );
    lab.start_switchboard(&config, &[], sa(SERVER, 8080));
}

/// What `openssl s_client` sees on the shared port from the public host: the certificate's
/// `issuer=` and `serial=` lines, or `None` when no handshake completes.
fn served(lab: &Lab) -> Option<(String, String)> {
    let out = lab.output(
        Host::Peer,
        "sh",
        &[
            "-c",
            &format!(
                "openssl s_client -connect {SERVER}:443 -servername {DOMAIN} -alpn http/1.1 \
                 </dev/null 2>/dev/null | openssl x509 -noout -issuer -serial"
            ),
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let line = |p: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(p))
            .map(str::to_string)
    };
    Some((line("issuer=")?, line("serial=")?))
}

fn metrics(lab: &Lab) -> String {
    lab.http(Host::Peer, sa(SERVER, 8080), "GET", "/metrics", &[], "")
        .1
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(f64::NAN)
}

/// Poll `f` every 200 ms until it gives `Some`, for at most `secs`.
fn wait_for<T>(secs: u64, what: &str, lab: &Lab, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < end,
            "{what} within {secs} s\n---- switchboard ----\n{}\n---- restarted ----\n{}\n\
             ---- pebble ----\n{}",
            lab.log("switchboard"),
            lab.log("restarted"),
            lab.log("pebble")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The first certificate: none at start, then pebble's, within a few seconds.
fn first_certificate(lab: &Lab) -> (String, String) {
    let (issuer, serial) = wait_for(15, "a certificate from pebble on 443", lab, || served(lab));
    assert!(issuer.contains("Pebble Intermediate CA"), "{issuer}");
    let m = metrics(lab);
    assert_eq!(
        metric(&m, "switchboard_acme_renewals_total{result=\"ok\"}"),
        1.0,
        "{m}"
    );
    assert_eq!(metric(&m, "switchboard_acme_renewal_failing"), 0.0, "{m}");
    let expiry = metric(&m, "switchboard_tls_cert_expiry_seconds");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as f64;
    assert!(
        expiry > now && expiry <= now + VALIDITY as f64 + 2.0,
        "expiry {expiry}, now {now}"
    );
    (issuer, serial)
}

/// A TLS connection to the shared port from home 1 that verifies the served chain against
/// pebble's root (fetched from its management API).
async fn wss(
    lab: &Lab,
    token: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let out = lab.output(
        Host::Peer,
        "curl",
        &["-sk", &format!("https://{PEER}:15000/roots/0")],
    );
    let mut roots = rustls::RootCertStore::empty();
    use rustls_pki_types::pem::PemObject;
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(&out.stdout) {
        roots.add(c.expect("pebble root PEM")).expect("pebble root");
    }
    assert!(!roots.is_empty(), "no pebble root: {out:?}");
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = lab.tcp(Host::Home1, sa(SERVER, 443)).expect("tcp to 443");
    tcp.set_nonblocking(true).expect("nonblocking");
    let tcp = tokio::net::TcpStream::from_std(tcp).expect("tokio tcp");
    let name = rustls_pki_types::ServerName::try_from(DOMAIN).expect("name");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .expect("TLS to 443 verified against pebble's root");
    let (mut ws, _) = tokio_tungstenite::client_async(format!("wss://{DOMAIN}/v1/ws"), tls)
        .await
        .expect("WSS upgrade on 443");
    send(&mut ws, json!({"type": "hello", "token": token, "id": 1})).await;
    assert_eq!(recv_type(&mut ws, "welcome").await["type"], "welcome");
    ws
}

async fn send<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>, v: Value)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    ws.send(Message::Text(v.to_string().into()))
        .await
        .expect("ws send");
}

async fn recv_type<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>, ty: &str) -> Value
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap_or_else(|_| panic!("no {ty} frame within 5 s"))
            .expect("socket open")
            .expect("frame");
        if let Message::Text(t) = m {
            let v: Value = serde_json::from_str(&t).expect("json frame");
            if v["type"] == ty {
                return v;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_from_pebble_then_renewed_under_live_turn_tls_and_wss() {
    let Some(mut lab) = Lab::start("acme_certificate_and_renewal") else {
        return;
    };
    start_pebble(&mut lab);
    start_server(&mut lab);
    let (issuer, first) = first_certificate(&lab);
    println!("first certificate: issuer={issuer} serial={first}");

    // Live sessions on the first certificate: WSS signaling and a TURN-over-TLS allocation.
    let (status, login) = lab.http(
        Host::Home1,
        sa(SERVER, 8080),
        "POST",
        "/v1/login",
        &[],
        r#"{"name":"Ann"}"#,
    );
    assert_eq!(status, 200, "{login}");
    let body = &login[login.find("\r\n\r\n").expect("body") + 4..];
    let token = serde_json::from_str::<Value>(body).expect("login json")["token"]
        .as_str()
        .expect("token")
        .to_string();
    let mut ws = wss(&lab, &token).await;
    lab.spawn(
        Host::Peer,
        "peer",
        "turnutils_peer",
        &["-L", PEER, "-p", "3480"],
    );
    // 80 datagrams 300 ms apart: 24 s over one TLS connection on 443, through home 1's NAT.
    lab.spawn(
        Host::Home1,
        "uclient",
        "turnutils_uclient",
        &[
            "-t",
            "-S",
            "-p",
            "443",
            "-W",
            "lab-secret",
            "-e",
            PEER,
            "-r",
            "3480",
            "-n",
            "80",
            "-l",
            "120",
            "-z",
            "300",
            SERVER,
        ],
    );

    // The renewal: a different certificate from the same CA, while both sessions are up.
    let (issuer2, second) = wait_for(25, "a renewed certificate", &lab, || {
        served(&lab).filter(|(_, s)| *s != first)
    });
    assert!(issuer2.contains("Pebble Intermediate CA"), "{issuer2}");
    assert!(
        lab.running("uclient"),
        "the TURN client ended before the renewal; it proves nothing:\n{}",
        lab.log("uclient")
    );
    println!("renewed: serial {first} -> {second}");
    let m = metrics(&lab);
    assert!(
        metric(&m, "switchboard_acme_renewals_total{result=\"ok\"}") >= 2.0,
        "{m}"
    );

    // The WSS socket opened on the old certificate still works.
    send(&mut ws, json!({"type": "create", "id": "c"})).await;
    let created = recv_type(&mut ws, "created").await;
    assert!(created["room"].is_string(), "{created}");
    // And the allocation relayed every datagram, before and after the swap.
    assert!(
        lab.wait_exit("uclient", Duration::from_secs(30)),
        "uclient did not finish:\n{}",
        lab.log("uclient")
    );
    let r = turn_common::parse_report(&lab.log("uclient"));
    println!(
        "TURN over TLS across the renewal: sent {}, received {}, lost {}",
        r.sent, r.received, r.lost
    );
    assert!(r.sent >= 80, "{}", r.output);
    assert_eq!(r.received, r.sent, "{}", r.output);
    assert_eq!(r.lost, 0, "{}", r.output);
    let m = metrics(&lab);
    assert!(
        metric(
            &m,
            "switchboard_turn_allocations_created_total{transport=\"tls\"}"
        ) >= 1.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_from_cache_then_pebble_gone_keeps_the_old_certificate_until_it_is_back() {
    let Some(mut lab) = Lab::start("acme_renewal_failure") else {
        return;
    };
    start_pebble(&mut lab);
    start_server(&mut lab);
    let (issuer, serial) = first_certificate(&lab);
    let expiry = metric(&metrics(&lab), "switchboard_tls_cert_expiry_seconds");

    // A restart (a crash, even) serves the cached certificate at once and orders nothing.
    lab.signal("switchboard", nix::sys::signal::Signal::SIGKILL);
    assert!(lab.wait_exit("switchboard", Duration::from_secs(5)));
    let config = lab.dir.path().join("switchboard.toml");
    lab.spawn_switchboard(Host::Server, "restarted", "server", &config);
    wait_for(20, "the restarted server", &lab, || {
        lab.tcp(Host::Server, sa(SERVER, 8080)).ok()
    });
    assert_eq!(served(&lab), Some((issuer.clone(), serial.clone())));
    let m = metrics(&lab);
    assert_eq!(
        metric(&m, "switchboard_tls_cert_expiry_seconds"),
        expiry,
        "{m}"
    );
    for r in ["ok", "error"] {
        let name = format!("switchboard_acme_renewals_total{{result=\"{r}\"}}");
        assert_eq!(metric(&m, &name), 0.0, "{m}");
    }
    assert!(
        lab.log("restarted")
            .contains("ACME: serving the cached certificate"),
        "{}",
        lab.log("restarted")
    );

    lab.signal("pebble", nix::sys::signal::Signal::SIGKILL);
    assert!(
        lab.wait_exit("pebble", Duration::from_secs(5)),
        "pebble still runs"
    );

    // The renewal time comes (2/3 of 20 s) and the order fails: the failure is counted and
    // flagged, and retried.
    let m = wait_for(25, "a failed renewal in the metrics", &lab, || {
        let m = metrics(&lab);
        (metric(&m, "switchboard_acme_renewals_total{result=\"error\"}") >= 2.0).then_some(m)
    });
    assert_eq!(metric(&m, "switchboard_acme_renewal_failing"), 1.0, "{m}");
    assert_eq!(
        metric(&m, "switchboard_acme_renewals_total{result=\"ok\"}"),
        0.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "switchboard_tls_cert_expiry_seconds"),
        expiry,
        "{m}"
    );
    // Meanwhile the old certificate is still served.
    assert_eq!(served(&lab), Some((issuer, serial.clone())));
    let log = lab.log("restarted");
    assert!(
        log.contains("ACME: order failed; any served certificate stays"),
        "{log}"
    );

    // The CA comes back (a fresh pebble that knows no account): the next attempts make a new
    // account, the renewal succeeds and the alarm clears.
    run_pebble(&mut lab, "pebble-again");
    let (issuer2, _) = wait_for(20, "a renewal once the CA is back", &lab, || {
        served(&lab).filter(|(_, s)| *s != serial)
    });
    assert!(issuer2.contains("Pebble Intermediate CA"), "{issuer2}");
    let m = metrics(&lab);
    assert_eq!(metric(&m, "switchboard_acme_renewal_failing"), 0.0, "{m}");
    assert_eq!(
        metric(&m, "switchboard_acme_renewals_total{result=\"ok\"}"),
        1.0,
        "{m}"
    );
    assert!(
        metric(&m, "switchboard_tls_cert_expiry_seconds") > expiry,
        "{m}"
    );
}
