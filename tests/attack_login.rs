//! A login flood against the real in-process server: wrong passwords from many addresses
//! at once. The argon2id checks never exceed their slots, blocking threads stay bounded,
//! excess attempts get 503 with Retry-After (or 429 per address), and a legitimate user who
//! honours Retry-After keeps logging in during and after the flood.
//!
//! `cargo test --release --test attack_login -- --nocapture` prints the figures recorded in
//! docs/security.md.

use serde_json::json;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchboard::{Config, RunningServer, Server};

async fn start(rate: u32, slots: usize) -> RunningServer {
    let hash = switchboard::auth::login::hash_password("correct horse").unwrap();
    let text = format!(
        "[http]\nlisten = \"127.0.0.1:0\"\n[turn]\nlisten = [\"127.0.0.1:0\"]\n\
         [auth]\nbackends = [\"users\"]\nlogin_rate_per_minute = {rate}\n\
         max_concurrent_password_checks = {slots}\n\
         [[auth.users]]\nname = \"ann\"\npassword_hash = \"{hash}\"\n"
    );
    Server::new(Config::from_toml(&text).unwrap())
        .start()
        .await
        .unwrap()
}

/// The two floods run one at a time: each reads the process-wide thread count, which the
/// other's blocking threads would inflate.
static FLOODS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn threads() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

fn client_from(ip: Ipv4Addr) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(IpAddr::V4(ip))
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    busy: AtomicU64,
    limited: AtomicU64,
    denied: AtomicU64,
}

/// Flood from `addrs` addresses with `per_addr` concurrent loops each, while a legitimate
/// user logs in from 127.0.0.1; returns (legit logins, legit 503s, flood tally, peak threads,
/// peak password checks, seconds).
async fn flood(
    srv: &RunningServer,
    addrs: u8,
    per_addr: usize,
    secs: u64,
) -> (u64, u64, Arc<Tally>, u64, u64) {
    let url = format!("http://{}/v1/login", srv.http_addr());
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let mut tasks = Vec::new();
    for a in 0..addrs {
        let client = client_from(Ipv4Addr::new(127, 3, 0, a + 1));
        for _ in 0..per_addr {
            let (client, url, stop, tally) =
                (client.clone(), url.clone(), stop.clone(), tally.clone());
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let Ok(r) = client
                        .post(&url)
                        .json(&json!({"username": "ann", "password": "guess"}))
                        .send()
                        .await
                    else {
                        continue;
                    };
                    let c = match r.status().as_u16() {
                        503 => {
                            assert!(r.headers().contains_key("retry-after"));
                            &tally.busy
                        }
                        429 => &tally.limited,
                        401 => &tally.denied,
                        _ => &tally.ok,
                    };
                    c.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
    }
    let legit = client_from(Ipv4Addr::new(127, 0, 0, 1));
    let (mut ok, mut busy) = (0u64, 0u64);
    let (mut peak_threads, mut peak_checks) = (0u64, 0u64);
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(secs) {
        let r = legit
            .post(&url)
            .json(&json!({"username": "ann", "password": "correct horse"}))
            .send()
            .await
            .unwrap();
        peak_threads = peak_threads.max(threads());
        peak_checks = peak_checks.max(srv.shared().metrics.password_checks_active.get() as u64);
        match r.status().as_u16() {
            200 => {
                ok += 1;
                // A person logs in now and then: at most 27 times in 8 s, inside the
                // per-address burst of 30 that the second flood runs under.
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            503 => {
                busy += 1;
                let after: u64 = r.headers()["retry-after"]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                tokio::time::sleep(Duration::from_secs(after)).await;
            }
            s => panic!(
                "legit login got {s}: {}",
                r.text().await.unwrap_or_default()
            ),
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    (ok, busy, tally, peak_threads, peak_checks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_checks_stay_bounded_under_a_flood_from_many_addresses() {
    let _one_at_a_time = FLOODS.lock().await;
    let slots = 2;
    let srv = start(1_000_000, slots).await;
    let base_threads = threads();
    let (ok, busy, t, peak_threads, peak_checks) = flood(&srv, 32, 4, 5).await;
    println!(
        "login flood, no per-IP limit, {slots} slots, 128 concurrent attackers from 32 addresses, 5 s: \
         legit {ok} logins ({:.1}/s), {busy} answered 503; attackers: {} denied (401), {} busy (503); \
         threads {base_threads} -> peak {peak_threads}; peak checks {peak_checks}",
        ok as f64 / 5.0,
        t.denied.load(Ordering::Relaxed),
        t.busy.load(Ordering::Relaxed),
    );
    assert!(peak_checks <= slots as u64);
    assert!(t.busy.load(Ordering::Relaxed) > 0, "the flood hit the cap");
    // With no per-address limit and more attackers than slots, a legitimate user competes
    // for free slots with everyone else: the figure is printed, not promised. What is
    // promised is that the excess is refused at once, not queued.
    // Blocking threads: at most one per slot beyond what the runtime already had.
    assert!(
        peak_threads <= base_threads + slots as u64 + 4,
        "{base_threads} -> {peak_threads}"
    );
    // After the flood the user logs in at once.
    let r = client_from(Ipv4Addr::new(127, 0, 0, 1))
        .post(format!("http://{}/v1/login", srv.http_addr()))
        .json(&json!({"username": "ann", "password": "correct horse"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    srv.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_address_limit_keeps_a_flood_from_reaching_the_password_checks() {
    let _one_at_a_time = FLOODS.lock().await;
    let srv = start(30, 2).await;
    let (ok, busy, t, _, peak_checks) = flood(&srv, 8, 4, 8).await;
    println!(
        "login flood, default 30/min per IP, 2 slots, 32 attackers from 8 addresses, 8 s: \
         legit {ok} logins ({:.1}/s), {busy} answered 503; attackers: {} denied, {} rate-limited (429), {} busy; peak checks {peak_checks}",
        ok as f64 / 8.0,
        t.denied.load(Ordering::Relaxed),
        t.limited.load(Ordering::Relaxed),
        t.busy.load(Ordering::Relaxed),
    );
    // Each attacking address gets its burst of 30 checks, then 429s that cost no hashing.
    assert!(t.denied.load(Ordering::Relaxed) <= 8 * 31);
    assert!(t.limited.load(Ordering::Relaxed) > 0);
    assert!(peak_checks <= 2);
    assert!(ok >= 2, "the legitimate user kept logging in: {ok}");
    srv.shutdown();
}
