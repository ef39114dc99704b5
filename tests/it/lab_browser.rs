//! Real browsers in the network lab: headless Chromium instances run inside the NATed homes
//! (chromedriver and Chromium started with `ip netns exec`), load the demo page from the
//! server's public address, call each other and decode video. The server runs the shipped
//! `deploy/kubernetes/configmap.yaml`.
//!
//! - With TURN, two homes behind endpoint-dependent NATs connect, and ICE picks a relay pair on
//!   its own (the page does not force relay).
//! - With `turn.relay = false` the same two homes must not connect: the page's watchdog gives up
//!   with its error. The full-cone home, on the same server, connects directly, so the failure
//!   is the NAT's doing and nothing else's.
//!
//! The test reaches each chromedriver through [`lab::Lab::forward_tcp`]; every packet of the
//! call stays inside the lab. One Chromium pair runs at a time.

use crate::support::lab;
use crate::support::rtc_stats;
use crate::support::webdriver;

use lab::{sa, Host, Lab, ROUTER3, SERVER};
use rtc_stats::{PC_STATS, PC_WRAPPER};
use serde_json::Value;
use std::time::Duration;
use webdriver::{Browser, Driver, Engine};

/// Where the homes load the demo page: the server's public address, plain HTTP.
const ORIGIN: &str = "http://203.0.113.10:8080";

use crate::support::browser_slot;

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

/// Start the shipped config in the lab. Only what names the operator's own deployment is
/// replaced, by environment as an operator would: the JWT key of secret.yaml becomes the open
/// login with a TURN secret, and the app's origin and signaling URL (app.example.com behind an
/// ingress) become the server's public address that the homes load the page from.
fn start_shipped(lab: &mut Lab, extra: &[(&str, &str)]) {
    let toml = shipped_configmap_toml();
    assert!(toml.contains("listen = [\"0.0.0.0:3478\"]"), "{toml}");
    let signaling = format!("ws://{SERVER}:8080/v1/ws");
    let origins = format!("[\"{ORIGIN}\"]");
    // The shipped STUN servers for relay_ip = "auto" are outside the lab: name the lab's.
    let stun = format!(r#"["{}"]"#, lab.stun_server());
    let mut env = vec![
        ("SWITCHBOARD_PUBLIC__DISCOVER_STUN", stun.as_str()),
        ("SWITCHBOARD_AUTH__BACKENDS", r#"["open"]"#),
        ("SWITCHBOARD_AUTH__ALLOW_OPEN_ON_PUBLIC", "true"),
        ("SWITCHBOARD_AUTH__TURN_SECRETS", r#"["lab-secret"]"#),
        ("SWITCHBOARD_PUBLIC__SIGNALING_URL", signaling.as_str()),
        ("SWITCHBOARD_HTTP__ALLOWED_ORIGINS", origins.as_str()),
    ];
    env.extend_from_slice(extra);
    lab.start_switchboard(&toml, &env, sa(SERVER, 8080));
}

/// chromedriver running inside a home, and the driver the test talks to it with.
struct Home {
    driver: Driver,
    profile: tempfile::TempDir,
}

/// Start chromedriver inside `h` (with the public host name of the config resolving to the
/// server there) and attach to it through a forwarded port.
async fn home(lab: &mut Lab, h: Host) -> Home {
    // Chromium looks STUN/TURN host names up fully qualified ("turn.example.com."), which
    // its hosts-file resolver matches only literally: list both spellings.
    lab.etc_file(
        h,
        "hosts",
        &format!("127.0.0.1 localhost\n{SERVER} turn.example.com turn.example.com.\n"),
    );
    let name = format!("chromedriver-{h:?}");
    let log = lab.dir.path().join(format!("{name}-verbose.log"));
    lab.spawn(
        h,
        &name,
        "chromedriver",
        &["--port=9515", &format!("--log-path={}", log.display())],
    );
    let local = lab.forward_tcp(h, 9515);
    Home {
        driver: Driver::attach(&format!("http://{local}")).await,
        profile: tempfile::tempdir().expect("profile dir"),
    }
}

/// A headless Firefox ESR inside `h` (fresh profile with [`webdriver::FIREFOX_LAB_PREFS`]),
/// driven over WebDriver BiDi through a forwarded port, with the connection wrapper installed.
/// `home`'s driver registers it for screenshots; the lab kills it when dropped.
async fn firefox(lab: &mut Lab, h: Host, home: &Home, label: &str) -> Browser {
    let dir = home.profile.path().join("firefox");
    std::fs::create_dir_all(&dir).expect("firefox profile dir");
    webdriver::firefox_profile(&dir, webdriver::FIREFOX_LAB_PREFS);
    let dir = dir.display().to_string();
    lab.spawn(
        h,
        &format!("firefox-{h:?}"),
        "firefox-esr",
        &[
            "--headless",
            "--no-remote",
            "--profile",
            &dir,
            "--remote-debugging-port=9222",
            "about:blank",
        ],
    );
    let local = lab.forward_tcp(h, 9222);
    let b = home
        .driver
        .firefox_attach(
            label,
            &format!("ws://{local}/session"),
            Some("127.0.0.1:9222"),
            None,
        )
        .await;
    b.add_init_script(PC_WRAPPER).await;
    b
}

/// A Chromium instance in `home` that may use the camera on the plain-HTTP demo origin, with
/// the connection wrapper installed.
async fn chromium(home: &Home, label: &str) -> Browser {
    let secure = format!("--unsafely-treat-insecure-origin-as-secure={ORIGIN}");
    let b = home
        .driver
        .browser(label, home.profile.path(), &[&secure])
        .await;
    b.add_init_script(PC_WRAPPER).await;
    b
}

async fn stats(b: &Browser) -> Value {
    b.js(PC_STATS).await
}

/// Media flows: ICE connected, video decoded, and the page says "in call" and names its path.
fn in_call(v: &Value) -> bool {
    matches!(v["ice"].as_str(), Some("connected" | "completed"))
        && v["frames"].as_u64() > Some(0)
        && v["page"] == "in call"
        && v["pagePath"].is_string()
}

/// A opens the page and starts a room; B opens the room's link. Returns the room.
async fn meet(a: &Browser, b: &Browser) -> String {
    a.go(&format!("{ORIGIN}/?name={}&auto=1", a.label())).await;
    let room = match a
        .poll("return window.sbState.room", Duration::from_secs(20))
        .await
    {
        Ok(r) => r,
        Err(v) => panic!("page {} made no room: {v}; {}", a.label(), stats(a).await),
    };
    let room = room.as_str().expect("room id").to_string();
    b.go(&format!("{ORIGIN}/?name={}&auto=1&room={room}", b.label()))
        .await;
    room
}

/// Wait until both pages are in the call; `Err` carries both pages' last stats.
async fn both_in_call(
    a: &Browser,
    b: &Browser,
    budget: Duration,
) -> Result<(Value, Value), String> {
    let end = tokio::time::Instant::now() + budget;
    loop {
        let (sa, sb) = tokio::join!(stats(a), stats(b));
        if in_call(&sa) && in_call(&sb) {
            return Ok((sa, sb));
        }
        if tokio::time::Instant::now() >= end {
            return Err(format!("{}: {sa}\n{}: {sb}", a.label(), b.label()));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A counter's value in a Prometheus scrape (0 when absent).
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_in_two_natted_homes_calls_over_the_relay_with_the_shipped_config() {
    let Some(mut lab) = Lab::start("chromium_in_two_natted_homes_calls_over_the_relay") else {
        return;
    };
    call_over_the_relay(&mut lab, &[], Engine::Chromium).await;
}

/// The same call with Firefox ESR in home 1 (over WebDriver BiDi) and Chromium in home 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firefox_and_chromium_in_two_natted_homes_call_over_the_relay() {
    let Some(mut lab) = Lab::start("firefox_and_chromium_in_two_natted_homes") else {
        return;
    };
    call_over_the_relay(&mut lab, &[], Engine::Firefox).await;
}

/// The same call with `turn.kernel_offload = "on"`: the eBPF program relays the media. The
/// homes checksum in software, as hosts behind a real NIC do (the program leaves datagrams
/// whose checksum a local sender left to offload to user space).
#[cfg(feature = "kernel-offload")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_call_through_the_kernel_offload() {
    let Some(mut lab) = Lab::start("chromium_call_through_the_kernel_offload") else {
        return;
    };
    for h in [Host::Home1, Host::Home2] {
        lab.exec_ok(h, "ethtool", &["-K", "e0", "tx", "off"])
            .expect("ethtool -K e0 tx off");
    }
    call_over_the_relay(
        &mut lab,
        &[("SWITCHBOARD_TURN__KERNEL_OFFLOAD", "on")],
        Engine::Chromium,
    )
    .await;
    assert!(
        lab.log("switchboard")
            .contains("turn kernel offload active"),
        "{}",
        lab.log("switchboard")
    );
    // The kernel counters reach /metrics once a second.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, m) = lab.http(Host::Peer, sa(SERVER, 8080), "GET", "/metrics", &[], "");
    for dir in ["to_peer", "to_client"] {
        let kernel = metric(
            &m,
            &format!("switchboard_turn_offload_relayed_packets_total{{direction=\"{dir}\"}}"),
        );
        let all = metric(
            &m,
            &format!("switchboard_turn_relayed_packets_total{{direction=\"{dir}\"}}"),
        );
        // Media goes through the kernel once the channel is mirrored into the maps; only
        // what comes before (and anything unusual) is left to user space.
        assert!(
            kernel > 100.0 && kernel >= all / 2.0,
            "{dir}: the kernel relayed {kernel} of {all}\n{m}"
        );
    }
}

/// Two browsers in the NATed homes (home 1's of engine `first`, home 2's Chromium) call each
/// other on the shipped config (with `extra` environment) and ICE settles on a relay; video
/// flows both ways.
async fn call_over_the_relay(lab: &mut Lab, extra: &[(&str, &str)], first: Engine) {
    let _slot = browser_slot().await;
    start_shipped(lab, extra);
    let h1 = home(lab, Host::Home1).await;
    let h2 = home(lab, Host::Home2).await;
    let a = match first {
        Engine::Chromium => chromium(&h1, "home1").await,
        Engine::Firefox => firefox(lab, Host::Home1, &h1, "home1").await,
    };
    let b = chromium(&h2, "home2").await;
    let drivers = [&h1.driver, &h2.driver];
    screenshots_on_panic(&drivers, "lab_relay", async {
        meet(&a, &b).await;
        both_in_call(&a, &b, Duration::from_secs(45))
            .await
            .unwrap_or_else(|e| panic!("no call between the NATed homes through TURN:\n{e}"));
        // Video keeps coming: a couple of seconds of it on both sides.
        let end = tokio::time::Instant::now() + Duration::from_secs(20);
        let (sa, sb) = loop {
            let (sa, sb) = tokio::join!(stats(&a), stats(&b));
            if sa["frames"].as_u64() > Some(60) && sb["frames"].as_u64() > Some(60) {
                break (sa, sb);
            }
            assert!(
                tokio::time::Instant::now() < end,
                "video stalled:\nhome1: {sa}\nhome2: {sb}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        println!("home1: {sa}\nhome2: {sb}");
        for (who, s) in [("home1", &sa), ("home2", &sb)] {
            // ICE chose the relay by itself (the page did not ask for relay only): the pair
            // has a relay candidate on one end or both (Chromium often sends from its NAT
            // mapping straight to the other side's relay), and every relay is the server's
            // public address.
            let local_relay = s["localType"] == "relay";
            let remote_relay = s["remoteType"] == "relay";
            assert!(
                local_relay || remote_relay,
                "{who}: no relay in the pair: {s}"
            );
            if local_relay {
                assert_eq!(s["localAddress"], SERVER, "{who}: {s}");
                assert_eq!(s["relayProtocol"], "udp", "{who}: {s}");
            }
            if remote_relay {
                assert_eq!(s["remoteAddress"], SERVER, "{who}: {s}");
            }
            let path = if local_relay {
                "relay over UDP"
            } else {
                "relay (the other side's)"
            };
            assert_eq!(s["pagePath"], path, "{who}: {s}");
            assert_eq!(s["error"], Value::Null, "{who}: {s}");
        }
    })
    .await;
    let (_, m) = lab.http(Host::Peer, sa(SERVER, 8080), "GET", "/metrics", &[], "");
    for dir in ["to_peer", "to_client"] {
        let n = metric(
            &m,
            &format!("switchboard_turn_relayed_packets_total{{direction=\"{dir}\"}}"),
        );
        assert!(n > 100.0, "relayed packets {dir}: {n}\n{m}");
    }
    a.quit().await;
    b.quit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_turn_natted_homes_cannot_call_but_a_full_cone_home_connects_directly() {
    let Some(mut lab) = Lab::start("without_turn_natted_homes_cannot_call") else {
        return;
    };
    let _slot = browser_slot().await;
    start_shipped(&mut lab, &[("SWITCHBOARD_TURN__RELAY", "false")]);
    let h1 = home(&mut lab, Host::Home1).await;
    let h2 = home(&mut lab, Host::Home2).await;
    let h3 = home(&mut lab, Host::Home3).await;
    let drivers = [&h1.driver, &h2.driver, &h3.driver];
    screenshots_on_panic(&drivers, "lab_no_turn", async {
        // Home 1 and home 2: both behind endpoint-dependent NATs. The pages must never get
        // into a call, and the watchdog must end the attempt with its error.
        let a = chromium(&h1, "home1").await;
        let b = chromium(&h2, "home2").await;
        meet(&a, &b).await;
        let end = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut seen_pcs = false;
        let (sa, sb) = loop {
            let (sa, sb) = tokio::join!(stats(&a), stats(&b));
            for (who, s) in [("home1", &sa), ("home2", &sb)] {
                assert!(
                    !matches!(s["ice"].as_str(), Some("connected" | "completed"))
                        && s["page"] != "in call",
                    "{who} connected between two endpoint-dependent NATs without TURN: {s}"
                );
            }
            seen_pcs |= sa["pcs"].as_u64() > Some(0) && sb["pcs"].as_u64() > Some(0);
            if sa["error"] == "ice_failed" || sb["error"] == "ice_failed" {
                break (sa, sb);
            }
            assert!(
                tokio::time::Instant::now() < end,
                "the watchdog did not give up in 60 s:\nhome1: {sa}\nhome2: {sb}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        println!("without TURN:\nhome1: {sa}\nhome2: {sb}");
        assert!(seen_pcs, "both pages tried to connect");
        let failed = if sa["error"] == "ice_failed" {
            &sa
        } else {
            &sb
        };
        let text = failed["errorText"].as_str().unwrap_or_default();
        assert!(
            text.starts_with("Could not connect to") && text.contains("ICE restarts"),
            "the page explains why it gave up: {failed}"
        );
        a.quit().await;
        b.quit().await;

        // Home 1 and the full-cone home 3, same server, still no TURN: a direct path works.
        let a = chromium(&h1, "home1").await;
        let c = chromium(&h3, "home3").await;
        meet(&a, &c).await;
        let (sa, sc) = both_in_call(&a, &c, Duration::from_secs(45))
            .await
            .unwrap_or_else(|e| panic!("no direct call to the full-cone home:\n{e}"));
        println!("full cone:\nhome1: {sa}\nhome3: {sc}");
        for (who, s) in [("home1", &sa), ("home3", &sc)] {
            assert_eq!(s["pagePath"], "direct", "{who}: {s}");
            assert_ne!(s["localType"], "relay", "{who}: {s}");
        }
        // Home 1 reaches home 3 at its full-cone mapping on router 3.
        assert_eq!(sa["remoteAddress"], ROUTER3, "{sa}");
        a.quit().await;
        c.quit().await;
    })
    .await;
    let (_, m) = lab.http(Host::Peer, sa(SERVER, 8080), "GET", "/metrics", &[], "");
    assert_eq!(
        metric(
            &m,
            "switchboard_turn_allocations_created_total{transport=\"udp\"}"
        ),
        0.0,
        "no relay without TURN"
    );
}

/// Run `body`; if it panics, save a screenshot of every page of every driver first.
async fn screenshots_on_panic<T>(
    drivers: &[&Driver],
    name: &str,
    body: impl std::future::Future<Output = T>,
) -> T {
    use futures_util::FutureExt;
    match std::panic::AssertUnwindSafe(body).catch_unwind().await {
        Ok(v) => v,
        Err(p) => {
            for d in drivers {
                d.screenshot_all(name).await;
            }
            std::panic::resume_unwind(p)
        }
    }
}
