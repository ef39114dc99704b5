//! A home behind a firewall that lets out only TCP 443, in the network lab: the real binary
//! serves the login, the demo page, WSS signaling and TURN over TLS on one port
//! (`shared_port.listen = ["0.0.0.0:443"]`), with a certificate from the lab's own CA that
//! Chromium trusts through an NSS database made with `certutil`.
//!
//! - Chromium in home 1 (443 only, iptables in its namespace) loads `https://turn.example.com/`,
//!   signals over `wss://` on 443 and calls NATed home 2 relay-only (`?relay=1`): the selected
//!   pair's local candidate in home 1 is a relay over TLS on the server's address.
//! - coturn's `turnutils_uclient` in home 1 relays 50/50 datagrams over plain TURN/TCP on 443
//!   to a public echo peer; towards 3478 it gets nothing through (control).
//! - Control: with 443 closed too (home 1 may reach only the HTTP port 8080 for the page and
//!   signaling), the same relay-only call never connects and the page gives up.
//!
//! `shared_port.plain_turn` is off for the browser tests: Chromium ranks TURN over TCP above TURN over TLS, so
//! with both on 443 it would pick plain TCP; the uclient test covers that path.

use crate::support::lab;
use crate::support::lab_ca;
use crate::support::rtc_stats;
use crate::support::turn_common;
use crate::support::webdriver;

use lab::{sa, Host, Lab, PEER, SERVER};
use rtc_stats::{PC_STATS, PC_WRAPPER};
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use webdriver::{Browser, Driver};

const HTTPS_ORIGIN: &str = "https://turn.example.com";
const HTTP_ORIGIN: &str = "http://203.0.113.10:8080";

use crate::support::browser_slot;

/// A lab CA and a server certificate for turn.example.com signed by it, in `dir`
/// (`ca.crt`, `server.crt`, `server.key`).
fn lab_ca(dir: &Path) {
    lab_ca::ca_and_leaf(dir, "switchboard lab CA", "turn.example.com", "server");
}

/// `$home/.pki/nssdb`, where Chromium on Linux looks for trusted CAs, trusting the lab CA.
fn nss_db(home: &Path, ca: &Path) {
    let db = home.join(".pki/nssdb");
    std::fs::create_dir_all(&db).expect("nssdb dir");
    let d = format!("sql:{}", db.display());
    for args in [
        vec!["-N", "-d", &d, "--empty-password"],
        vec![
            "-A",
            "-d",
            &d,
            "-n",
            "switchboard-lab-ca",
            "-t",
            "C,,",
            "-i",
            ca.to_str().expect("path"),
        ],
    ] {
        let out = Command::new("certutil")
            .args(&args)
            .output()
            .expect("certutil runs (libnss3-tools, scripts/install-test-deps.sh)");
        assert!(
            out.status.success(),
            "certutil {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn start_server(lab: &mut Lab, plain_turn: bool) {
    let dir = lab.dir.path().to_path_buf();
    lab_ca(&dir);
    let config = format!(
        "[http]\nlisten = \"0.0.0.0:8080\"\n\
         allowed_origins = [\"{HTTPS_ORIGIN}\", \"{HTTP_ORIGIN}\"]\n\
         [turn]\nlisten = [\"0.0.0.0:3478\"]\nrealm = \"example.com\"\n\
         [shared_port]\nlisten = [\"0.0.0.0:443\"]\nplain_turn = {plain_turn}\n\
         [tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n\
         [auth]\nbackends = [\"open\"]\nallow_open_on_public = true\n\
         turn_secrets = [\"lab-secret\"]\n\
         [public]\nhost = \"turn.example.com\"\n",
        dir.join("server.crt").display(),
        dir.join("server.key").display()
    );
    lab.start_switchboard(&config, &[], sa(SERVER, 8080));
}

/// Home 1 may open TCP connections to `port` only (plus loopback and answers).
fn firewall(lab: &Lab, port: u16) {
    let p = port.to_string();
    for rule in [
        vec!["-A", "OUTPUT", "-o", "lo", "-j", "ACCEPT"],
        vec![
            "-A",
            "OUTPUT",
            "-m",
            "conntrack",
            "--ctstate",
            "ESTABLISHED,RELATED",
            "-j",
            "ACCEPT",
        ],
        vec!["-A", "OUTPUT", "-p", "tcp", "--dport", &p, "-j", "ACCEPT"],
        // REJECT rather than DROP, so that blocked attempts fail fast (the test's budget).
        vec!["-A", "OUTPUT", "-j", "REJECT"],
    ] {
        lab.exec_ok(Host::Home1, "iptables", &rule)
            .expect("iptables in home 1");
    }
}

struct Home {
    driver: Driver,
    profile: tempfile::TempDir,
    _home: tempfile::TempDir,
}

/// chromedriver inside `h`, with a `$HOME` whose NSS database trusts the lab CA.
async fn home(lab: &mut Lab, h: Host) -> Home {
    lab.etc_file(
        h,
        "hosts",
        &format!("127.0.0.1 localhost\n{SERVER} turn.example.com turn.example.com.\n"),
    );
    let home_dir = tempfile::tempdir().expect("home dir");
    nss_db(home_dir.path(), &lab.dir.path().join("ca.crt"));
    let name = format!("chromedriver-{h:?}");
    let home_env = format!("HOME={}", home_dir.path().display());
    lab.spawn(h, &name, "env", &[&home_env, "chromedriver", "--port=9515"]);
    let local = lab.forward_tcp(h, 9515);
    Home {
        driver: Driver::attach(&format!("http://{local}")).await,
        profile: tempfile::tempdir().expect("profile dir"),
        _home: home_dir,
    }
}

async fn chromium(home: &Home, label: &str) -> Browser {
    let secure = format!("--unsafely-treat-insecure-origin-as-secure={HTTP_ORIGIN}");
    let b = home
        .driver
        .browser(label, home.profile.path(), &[&secure])
        .await;
    b.add_init_script(PC_WRAPPER).await;
    b
}

fn in_call(v: &Value) -> bool {
    matches!(v["ice"].as_str(), Some("connected" | "completed"))
        && v["frames"].as_u64() > Some(0)
        && v["page"] == "in call"
}

/// A starts a relay-only room on `origin`, B joins it; returns when B has the link.
async fn meet(a: &Browser, b: &Browser, origin: &str) {
    a.go(&format!("{origin}/?name=a&auto=1&relay=1")).await;
    let room = match a
        .poll("return window.sbState.room", Duration::from_secs(30))
        .await
    {
        Ok(r) => r,
        Err(v) => panic!(
            "page {} made no room: {v}; {}",
            a.label(),
            a.js(PC_STATS).await
        ),
    };
    let room = room.as_str().expect("room id").to_string();
    b.go(&format!("{origin}/?name=b&auto=1&relay=1&room={room}"))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_behind_a_443_only_firewall_calls_over_turn_tls_on_443() {
    let Some(mut lab) = Lab::start("chromium_behind_a_443_only_firewall") else {
        return;
    };
    let _slot = browser_slot().await;
    start_server(&mut lab, false);
    firewall(&lab, 443);
    let h1 = home(&mut lab, Host::Home1).await;
    let h2 = home(&mut lab, Host::Home2).await;
    let a = chromium(&h1, "home1").await;
    let b = chromium(&h2, "home2").await;
    meet(&a, &b, HTTPS_ORIGIN).await;
    let end = tokio::time::Instant::now() + Duration::from_secs(60);
    let (sa, sb) = loop {
        let (sa, sb) = tokio::join!(a.js(PC_STATS), b.js(PC_STATS));
        if in_call(&sa) && in_call(&sb) {
            break (sa, sb);
        }
        assert!(
            tokio::time::Instant::now() < end,
            "no call from behind the 443-only firewall:\nhome1: {sa}\nhome2: {sb}\n{}",
            lab.log("switchboard")
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    println!("443 only:\nhome1: {sa}\nhome2: {sb}");
    assert_eq!(sa["localType"], "relay", "{sa}");
    assert_eq!(sa["relayProtocol"], "tls", "{sa}");
    assert_eq!(sa["localAddress"], SERVER, "{sa}");
    assert_eq!(sb["localType"], "relay", "{sb}");
    // The page and the signaling socket came over 443 too: nothing else gets out of home 1.
    assert_eq!(a.js("return location.origin").await, HTTPS_ORIGIN);
    let (_, m) = lab.http(Host::Peer, sa_http(), "GET", "/metrics", &[], "");
    assert!(
        metric(
            &m,
            "switchboard_turn_allocations_created_total{transport=\"tls\"}"
        ) >= 1.0,
        "{m}"
    );
    a.quit().await;
    b.quit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_with_443_closed_too_the_relay_only_call_fails() {
    let Some(mut lab) = Lab::start("control_with_443_closed") else {
        return;
    };
    let _slot = browser_slot().await;
    start_server(&mut lab, false);
    // Only the HTTP port: the page and signaling work, every TURN port is closed.
    firewall(&lab, 8080);
    let h1 = home(&mut lab, Host::Home1).await;
    let h2 = home(&mut lab, Host::Home2).await;
    let a = chromium(&h1, "home1").await;
    let b = chromium(&h2, "home2").await;
    meet(&a, &b, HTTP_ORIGIN).await;
    let end = tokio::time::Instant::now() + Duration::from_secs(90);
    let (sa, sb) = loop {
        let (sa, sb) = tokio::join!(a.js(PC_STATS), b.js(PC_STATS));
        for (who, s) in [("home1", &sa), ("home2", &sb)] {
            assert!(
                !in_call(s),
                "{who} connected with every TURN port closed: {s}"
            );
        }
        if sa["error"] == "ice_failed" {
            break (sa, sb);
        }
        assert!(
            tokio::time::Instant::now() < end,
            "home 1's watchdog did not give up:\nhome1: {sa}\nhome2: {sb}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    println!("443 closed:\nhome1: {sa}\nhome2: {sb}");
    // Home 1 tried the 443 relay and could not reach it.
    let failed = if sa["error"] == "ice_failed" {
        &sa
    } else {
        &sb
    };
    let text = failed["errorText"].as_str().unwrap_or_default();
    assert!(
        text.contains("turns:turn.example.com:443?transport=tcp could not be reached"),
        "{failed}"
    );
    a.quit().await;
    b.quit().await;
}

fn sa_http() -> std::net::SocketAddr {
    sa(SERVER, 8080)
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// coturn's client in home 1 behind the 443-only firewall, relaying to a public echo peer.
fn uclient_from_home1(lab: &Lab, port: u16) -> turn_common::Report {
    let p = port.to_string();
    let out = lab.output(
        Host::Home1,
        "turnutils_uclient",
        &[
            "-t",
            "-p",
            &p,
            "-W",
            "lab-secret",
            "-e",
            PEER,
            "-r",
            "3480",
            "-n",
            "25",
            "-l",
            "120",
            "-z",
            "5",
            SERVER,
        ],
    );
    turn_common::parse_report(&format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uclient_behind_the_443_only_firewall_relays_over_plain_tcp_on_443() {
    let Some(mut lab) = Lab::start("uclient_behind_the_443_only_firewall") else {
        return;
    };
    start_server(&mut lab, true);
    lab.spawn(
        Host::Peer,
        "peer",
        "turnutils_peer",
        &["-L", PEER, "-p", "3480"],
    );
    firewall(&lab, 443);
    let r = uclient_from_home1(&lab, 443);
    assert_eq!(r.sent, 50, "{}", r.output);
    assert_eq!(r.received, 50, "{}", r.output);
    assert_eq!(r.lost, 0, "{}", r.output);
    // Control: the dedicated TURN port is closed by the same firewall.
    let r = uclient_from_home1(&lab, 3478);
    assert_eq!(r.received, 0, "3478 got through the firewall: {}", r.output);
    let (_, m) = lab.http(Host::Peer, sa_http(), "GET", "/metrics", &[], "");
    assert!(
        metric(
            &m,
            "switchboard_turn_allocations_created_total{transport=\"tcp\"}"
        ) >= 2.0,
        "{m}"
    );
}
