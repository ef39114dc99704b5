//! Kernel offload: does the once-a-second counter read (`Offload::take_deltas`) block the
//! shards' ChannelBind and expiry work (`install`/`remove`) at 10,000 channels?
//!
//! ```text
//! cargo bench --features kernel-offload --bench offload_lock [-- --routes 10000 --ops 20000 --every-ms 100]
//! ```
//!
//! Needs root (CAP_BPF, CAP_NET_ADMIN): the bench moves itself into a fresh network namespace
//! (`unshare`), attaches the program to that namespace's loopback, installs `--routes` channel
//! routes, then times `--ops` shard operations (a ChannelBind refresh: install of an installed
//! route, and an install + remove of a new one), first with no reader, then while another
//! thread calls `take_deltas`. It prints each operation's latency (median, p99,
//! max) and how long one `take_deltas` took. The reader runs every `--every-ms` (the server
//! does once a second; more often here so that a run sees many of them). Results:
//! docs/performance.md.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use switchboard::turn::offload::{ChannelRoute, Offload};

fn route(i: u32) -> ChannelRoute {
    ChannelRoute {
        client: SocketAddrV4::new(
            Ipv4Addr::new(198, 51, 100, (i % 250) as u8 + 1),
            20000 + (i / 250) as u16,
        ),
        listener: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 3478),
        channel: 0x4000 + (i % 0x1000) as u16,
        relay: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 30000 + (i % 30000) as u16),
        peer: SocketAddrV4::new(
            Ipv4Addr::new(203, 0, 113, 30),
            1024 + (i / 30000) as u16 * 1000 + (i % 1000) as u16,
        ),
    }
}

fn arg(name: &str, default: u32) -> u32 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Stats {
    p50: Duration,
    p99: Duration,
    p999: Duration,
    max: Duration,
    /// Operations that took over a millisecond.
    slow: usize,
    /// Time spent in all operations.
    total: Duration,
}

fn stats(mut v: Vec<Duration>) -> Stats {
    v.sort();
    let at = |q: f64| v[((v.len() - 1) as f64 * q) as usize];
    Stats {
        p50: at(0.5),
        p99: at(0.99),
        p999: at(0.999),
        max: *v.last().unwrap_or(&Duration::ZERO),
        slow: v.iter().filter(|d| **d > Duration::from_millis(1)).count(),
        total: v.iter().sum(),
    }
}

/// `ops` shard operations; the latency of each.
fn shard_ops(o: &Offload, routes: u32, ops: u32) -> Vec<Duration> {
    let mut lat = Vec::with_capacity(ops as usize * 2);
    for k in 0..ops {
        // A ChannelBind refresh of an installed channel.
        let r = route(k % routes);
        let t = Instant::now();
        o.install(&r).expect("refresh");
        lat.push(t.elapsed());
        // A new channel bound, then expired.
        let r = route(routes + k % 1000);
        let t = Instant::now();
        o.install(&r).expect("install");
        o.remove(&r);
        lat.push(t.elapsed());
        // The shards' pace is set by requests, not a tight loop.
        std::thread::sleep(Duration::from_micros(50));
    }
    lat
}

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return; // `cargo test --benches` runs benches with --test: nothing to check here.
    }
    let routes = arg("--routes", 10_000);
    let ops = arg("--ops", 20_000);
    let every = Duration::from_millis(arg("--every-ms", 100) as u64);
    if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET) {
        eprintln!("offload_lock needs root to make its own network namespace: {e}");
        std::process::exit(1);
    }
    let up = std::process::Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status();
    assert!(up.is_ok_and(|s| s.success()), "ip link set lo up");
    let o = Offload::start(&["127.0.0.1".parse().unwrap()]).expect("load and attach");
    for i in 0..routes {
        o.install(&route(i)).expect("install");
    }
    assert_eq!(o.len(), routes as usize);

    let quiet = stats(shard_ops(&o, routes, ops));
    println!("no reader: done");

    let o = Arc::new(o);
    let stop = Arc::new(AtomicBool::new(false));
    let (calls, busy) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let reader = {
        let (o, stop, calls, busy) = (o.clone(), stop.clone(), calls.clone(), busy.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                std::hint::black_box(o.take_deltas());
                let took = t.elapsed();
                busy.fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
                calls.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(every.saturating_sub(took));
            }
        })
    };
    let loaded = stats(shard_ops(&o, routes, ops));
    stop.store(true, Ordering::Relaxed);
    reader.join().expect("reader");
    let n = calls.load(Ordering::Relaxed).max(1);
    let per_call = Duration::from_nanos(busy.load(Ordering::Relaxed) / n);

    println!(
        "routes installed: {routes}; shard operations: {} per run",
        ops * 2
    );
    println!("take_deltas: {per_call:.2?} per call ({n} calls, one every {every:?})");
    println!(
        "{:<24} {:>9} {:>9} {:>9} {:>9} {:>7} {:>9}",
        "shard operations", "median", "p99", "p99.9", "max", ">1ms", "total"
    );
    for (what, s) in [("no reader", &quiet), ("take_deltas running", &loaded)] {
        println!(
            "{:<24} {:>9.1?} {:>9.1?} {:>9.1?} {:>9.1?} {:>7} {:>9.1?}",
            what, s.p50, s.p99, s.p999, s.max, s.slow, s.total
        );
    }
}
