//! Cluster TURN in the network lab (needs root): three switchboard nodes behind 1:1 NAT with
//! one shared configuration, a real redis-server and a STUN server (tests/support/lab/cluster.rs).
//! It measures what docs/performance.md reports:
//!
//! 1. placement balance: `--logins N` logins (`least_loaded`), each holding an allocation on
//!    the node it was handed, spread over the three nodes' HTTP;
//! 2. the client's cost of a redirect: with `--delay-ms D` of one-way delay (netem) on the
//!    client's link, `--trials N` Allocates straight to a ready node (challenge + signed
//!    Allocate) against the same through a draining node (challenge, 300 with a NONCE, one
//!    signed Allocate at the alternate, as libwebrtc follows it), medians;
//! 3. the time a SIGKILLed node takes to leave the membership that login answers come from.
//!
//! `cargo bench --bench cluster_turn` runs it; `cargo test --all-targets` runs this target
//! without `--bench`, a smoke run with 9 logins and 2 trials (skipped without root).

#[path = "../tests/support/lab/mod.rs"]
#[allow(unused_imports)]
mod lab;

use lab::cluster::{alternate_of, Cluster, PUBLIC};
use lab::Host;
use std::collections::HashMap;
use std::time::{Duration, Instant};

fn arg(name: &str, default: u64) -> u64 {
    let a: Vec<String> = std::env::args().collect();
    a.iter()
        .position(|x| x == name)
        .and_then(|i| a.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let logins = arg("--logins", if full { 300 } else { 9 }) as usize;
    let trials = arg("--trials", if full { 30 } else { 2 }) as usize;
    let delay = arg("--delay-ms", 10);
    let Some(mut c) = Cluster::start("bench cluster_turn", "") else {
        return;
    };

    // 1. Placement.
    let mut count: HashMap<String, usize> = HashMap::new();
    let mut held = Vec::new();
    let t0 = Instant::now();
    for i in 0..logins {
        let (host, user, pass) = c.login(i % 3, &format!("p{i}"));
        let mut cl = c.client(&host, &user, &pass);
        assert_eq!(cl.allocate().await.code(), None, "allocate {i}");
        *count.entry(host).or_default() += 1;
        held.push(cl);
    }
    let mean = logins as f64 / 3.0;
    let worst = PUBLIC
        .iter()
        .map(|ip| (count.get(*ip).copied().unwrap_or(0) as f64 - mean).abs() / mean * 100.0)
        .fold(0.0, f64::max);
    println!(
        "placement: {logins} logins with allocations in {:.1} s: {} / {} / {} (nodes 1/2/3), \
         worst deviation from the mean {worst:.1} %",
        t0.elapsed().as_secs_f64(),
        count.get(PUBLIC[0]).unwrap_or(&0),
        count.get(PUBLIC[1]).unwrap_or(&0),
        count.get(PUBLIC[2]).unwrap_or(&0),
    );
    // Free them, so that no later client meets one of their NAT mappings (437, or a cached
    // answer to a transaction id it happens to reuse).
    for mut cl in held {
        cl.request(
            switchboard::stun::codec::method::REFRESH,
            &[(switchboard::stun::codec::attr::LIFETIME, vec![0; 4])],
            None,
        )
        .await;
    }

    // 2. Redirect cost, with a one-way delay on the client's link.
    let netem = c.lab.exec_ok(
        Host::Home1,
        "tc",
        &[
            "qdisc",
            "add",
            "dev",
            "e0",
            "root",
            "netem",
            "delay",
            &format!("{delay}ms"),
        ],
    );
    let delay = if netem.is_ok() { delay } else { 0 };
    if let Err(e) = netem {
        println!("no netem ({e}): round trips are the lab's own (sub-millisecond)");
    }
    let (_, user, pass) = c.login(1, "direct");
    let mut direct = Vec::new();
    let mut rt_direct = 0;
    for _ in 0..trials {
        let mut cl = c.client(PUBLIC[1], &user, &pass);
        let t = Instant::now();
        assert_eq!(cl.allocate().await.code(), None);
        direct.push(t.elapsed());
        rt_direct = cl.transactions();
        // Stay under the per-user quota.
        cl.request(
            switchboard::stun::codec::method::REFRESH,
            &[(switchboard::stun::codec::attr::LIFETIME, vec![0; 4])],
            None,
        )
        .await;
    }
    // Node 1 drains, kept alive by one allocation.
    let (_, ku, kp) = c.login(1, "keep");
    let mut keep = c.client(PUBLIC[0], &ku, &kp);
    assert_eq!(keep.allocate().await.code(), None);
    c.lab.signal("node1", nix::sys::signal::Signal::SIGTERM);
    c.until(Duration::from_secs(3), "node-1 draining", |c| {
        c.nodes(1)
            .iter()
            .any(|n| n["node"] == "node-1" && n["state"] == "draining")
    });
    let mut redirected = Vec::new();
    let mut rt_redirected = 0;
    for _ in 0..trials {
        let mut cl = c.client(PUBLIC[0], &user, &pass);
        let t = Instant::now();
        let r = cl.allocate().await;
        assert_eq!(r.code(), Some(300));
        cl.server = alternate_of(&r);
        let r = cl.allocate_once().await;
        assert_eq!(r.code(), None, "one signed Allocate at the alternate");
        redirected.push(t.elapsed());
        rt_redirected = cl.transactions();
        cl.request(
            switchboard::stun::codec::method::REFRESH,
            &[(switchboard::stun::codec::attr::LIFETIME, vec![0; 4])],
            None,
        )
        .await;
    }
    let (d, r) = (median(direct), median(redirected));
    println!(
        "redirect: round trips to an allocation direct {rt_direct}, through a draining node \
         {rt_redirected}; one-way delay {delay} ms on the client link; Allocate median direct \
         {:.2} ms, redirected {:.2} ms, extra {:.2} ms ({trials} trials each)",
        d.as_secs_f64() * 1e3,
        r.as_secs_f64() * 1e3,
        (r.as_secs_f64() - d.as_secs_f64()) * 1e3
    );

    // 3. A killed node leaves the membership.
    c.lab.signal("node3", nix::sys::signal::Signal::SIGKILL);
    let t = Instant::now();
    c.until(Duration::from_secs(15), "node-3 gone", |c| {
        !c.nodes(1).iter().any(|n| n["node"] == "node-3")
    });
    println!(
        "node death: a SIGKILLed node left the login answers after {:.2} s (cluster.node_ttl_ms = 5000)",
        t.elapsed().as_secs_f64()
    );
}
