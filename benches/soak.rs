//! Soak: the real server binary under steady mixed load for a long time, sampled at a fixed
//! interval into a CSV, to show that memory, file descriptors, allocations and rooms stay flat
//! and that nothing is left behind at the end.
//!
//! Load, all at once:
//! - TURN relay: a set of allocations (each with a channel to an echo peer) carries paced
//!   ChannelData at `--rate` packets per second each way, in rounds of `--round` seconds;
//!   after every round a tenth of the set is released and replaced;
//! - allocation churn: `--churn` allocations per second are created (with a ChannelBind), held
//!   for a couple of seconds and released, continuously;
//! - signaling: `--ws` WebSockets in rooms of two; each pair logs in, creates and joins a room,
//!   exchanges signals, drops one socket and resumes it with its token and last `seq`, idles
//!   (answering pings), then both leave and the cycle starts again.
//!
//! Every `--sample` seconds a row goes to `--csv`: elapsed seconds, the server's RSS and open
//! fds (`/proc/<pid>`), the allocations, rooms and WebSockets its `/metrics` reports, the
//! packets sent and relayed in the interval and their loss, and the client-side counters. At
//! the end every client stops, the grace periods pass, and the leftovers are reported.
//!
//! `cargo bench --bench soak -- [--minutes 30] [--sample 60] [--rate 20000] [--allocs 50]
//! [--churn 20] [--ws 2000] [--csv soak.csv] [--bin PATH]`; `benches/soak.sh` runs it and plots
//! the CSV. `cargo test` runs this target without `--bench`: a few seconds at a tiny load.

#[allow(dead_code)]
#[path = "relay_load.rs"]
mod relay_load;
#[allow(dead_code)]
#[path = "sigload.rs"]
mod sigload;

use futures_util::{SinkExt, StreamExt};
use relay_load::{Echo, Session};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message as WsMsg;

const LO: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
/// The relay bench's TURN secret (its REST usernames are signed with it).
const SECRET: &str = "bench-secret";

#[derive(Clone, Debug)]
struct Opts {
    secs: f64,
    sample: f64,
    rate: u64,
    allocs: usize,
    churn: f64,
    ws: usize,
    round: f64,
    size: usize,
    csv: String,
    bin: String,
    /// `signaling.resume_grace_secs` and `signaling.empty_room_grace_secs` of the server.
    grace: u64,
}

fn parse_opts(bench: bool) -> Opts {
    let mut o = if bench {
        Opts {
            secs: 30.0 * 60.0,
            sample: 60.0,
            rate: 20_000,
            allocs: 50,
            churn: 20.0,
            ws: 2000,
            round: 5.0,
            size: 120,
            csv: "soak.csv".into(),
            bin: String::new(),
            grace: 10,
        }
    } else {
        Opts {
            secs: 6.0,
            sample: 2.0,
            rate: 500,
            allocs: 4,
            churn: 2.0,
            ws: 8,
            round: 1.0,
            size: 60,
            csv: std::env::temp_dir()
                .join(format!("soak-smoke-{}.csv", std::process::id()))
                .to_string_lossy()
                .into_owned(),
            bin: String::new(),
            grace: 1,
        }
    };
    o.bin = env!("CARGO_BIN_EXE_switchboard").into();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut v = || it.next().cloned().unwrap_or_default();
        match a.as_str() {
            "--minutes" => o.secs = v().parse::<f64>().map(|m| m * 60.0).unwrap_or(o.secs),
            "--secs" => o.secs = v().parse().unwrap_or(o.secs),
            "--sample" => o.sample = v().parse().unwrap_or(o.sample),
            "--rate" => o.rate = v().parse().unwrap_or(o.rate),
            "--allocs" => o.allocs = v().parse().unwrap_or(o.allocs),
            "--churn" => o.churn = v().parse().unwrap_or(o.churn),
            "--ws" => o.ws = v().parse().unwrap_or(o.ws),
            "--round" => o.round = v().parse().unwrap_or(o.round),
            "--size" => o.size = v().parse().unwrap_or(o.size),
            "--csv" => o.csv = v(),
            "--bin" => o.bin = v(),
            "--grace" => o.grace = v().parse().unwrap_or(o.grace),
            _ => {}
        }
    }
    o
}

/// Counters the load threads add to and the sampler reads.
#[derive(Default)]
struct Counts {
    sent: AtomicU64,
    to_peer: AtomicU64,
    back: AtomicU64,
    allocs_created: AtomicU64,
    allocs_released: AtomicU64,
    alloc_errors: AtomicU64,
    ws_open: AtomicU64,
    ws_cycles: AtomicU64,
    ws_resumes: AtomicU64,
    ws_signals: AtomicU64,
    ws_errors: AtomicU64,
}

struct ServerProc {
    child: Child,
    turn: SocketAddr,
    http: SocketAddr,
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server(o: &Opts, dir: &std::path::Path) -> Result<ServerProc, String> {
    let turn = relay_load::free_port();
    let http = relay_load::free_port();
    let g = o.grace;
    let cfg = format!(
        "[turn]\nlisten = [\"127.0.0.1:{turn}\"]\nrealm = \"switchboard\"\n\
         max_allocations_per_user = 100000\nmax_allocations = 100000\n\
         relay_port_min = 20000\nrelay_port_max = 32000\n\
         [http]\nlisten = \"127.0.0.1:{http}\"\ndemo = false\n[log]\nlevel = \"warn\"\n\
         [auth]\nturn_secrets = [\"{SECRET}\"]\nlogin_rate_per_minute = 100000000\n\
         [signaling]\nmax_connections_per_ip = 100000\nmax_rooms = 100000\n\
         max_rooms_per_user = 100000\nresume_grace_secs = {g}\nempty_room_grace_secs = {g}\n"
    );
    let path = dir.join("switchboard.toml");
    std::fs::write(&path, cfg).map_err(|e| e.to_string())?;
    let log = std::fs::File::create(dir.join("switchboard.log")).map_err(|e| e.to_string())?;
    let child = Command::new(&o.bin)
        .arg("--config")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("{}: {e} (build it with `cargo build --release`)", o.bin))?;
    let s = ServerProc {
        child,
        turn: SocketAddr::new(LO, turn),
        http: SocketAddr::new(LO, http),
    };
    if !relay_load::wait_udp(s.turn, true) {
        return Err("the server did not answer STUN".into());
    }
    for _ in 0..100 {
        if metrics_text(s.http).is_ok() {
            return Ok(s);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err("the server did not answer HTTP".into())
}

/// `GET /metrics` over a plain socket.
fn metrics_text(http: SocketAddr) -> Result<String, String> {
    let mut t = std::net::TcpStream::connect_timeout(&http, Duration::from_secs(5))
        .map_err(|e| e.to_string())?;
    t.set_read_timeout(Some(Duration::from_secs(10))).ok();
    write!(
        t,
        "GET /metrics HTTP/1.1\r\nHost: {http}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut s = String::new();
    t.read_to_string(&mut s).map_err(|e| e.to_string())?;
    Ok(s)
}

/// Sum of every sample of `name` (any labels).
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with(' ') || r.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// What the server says it holds: (allocations, rooms, WebSockets).
fn server_state(http: SocketAddr) -> (f64, f64, f64) {
    let m = metrics_text(http).unwrap_or_default();
    (
        metric(&m, "switchboard_turn_allocations_active"),
        metric(&m, "switchboard_rooms_active"),
        metric(&m, "switchboard_ws_connections_active"),
    )
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// TURN: paced relay rounds over a rotating set, and a churn of short-lived allocations.

fn relay_loop(o: Opts, server: SocketAddr, echo: Arc<Echo>, c: Arc<Counts>, stop: Arc<AtomicBool>) {
    let mut next_user = 0usize;
    let mut fresh = |n: usize, c: &Counts| -> Vec<Session> {
        let mut v = Vec::new();
        for _ in 0..n {
            next_user += 1;
            match relay_load::allocate(server, next_user % 1000)
                .and_then(|s| relay_load::channel_bind(&s, echo.addr).map(|_| s))
            {
                Ok(s) => {
                    c.allocs_created.fetch_add(1, Relaxed);
                    v.push(s);
                }
                Err(_) => {
                    c.alloc_errors.fetch_add(1, Relaxed);
                }
            }
        }
        v
    };
    let mut set = fresh(o.allocs, &c);
    while !stop.load(Relaxed) && !set.is_empty() {
        let socks: Vec<UdpSocket> = set.iter().filter_map(|s| s.sock.try_clone().ok()).collect();
        for s in &socks {
            let _ = s.set_nonblocking(true);
        }
        let t = relay_load::traffic(&socks, &echo, o.rate, o.round, o.size);
        drop(socks);
        c.sent.fetch_add(t.sent, Relaxed);
        c.to_peer.fetch_add(t.to_peer, Relaxed);
        c.back.fetch_add(t.back, Relaxed);
        // Rotate a tenth of the set: release the oldest, allocate as many new.
        let k = (set.len() / 10).max(1);
        for s in set.drain(..k) {
            relay_load::release(&s);
            c.allocs_released.fetch_add(1, Relaxed);
        }
        let mut more = fresh(k, &c);
        set.append(&mut more);
    }
    for s in set.drain(..) {
        relay_load::release(&s);
        c.allocs_released.fetch_add(1, Relaxed);
    }
}

fn churn_loop(
    o: Opts,
    server: SocketAddr,
    echo: SocketAddr,
    c: Arc<Counts>,
    stop: Arc<AtomicBool>,
) {
    let gap = Duration::from_secs_f64(1.0 / o.churn.max(0.01));
    let hold = Duration::from_secs(2);
    let mut held: std::collections::VecDeque<(Instant, Session)> = Default::default();
    let mut i = 10_000usize;
    let mut next = Instant::now();
    while !stop.load(Relaxed) {
        i += 1;
        match relay_load::allocate(server, 10_000 + i % 1000)
            .and_then(|s| relay_load::channel_bind(&s, echo).map(|_| s))
        {
            Ok(s) => {
                c.allocs_created.fetch_add(1, Relaxed);
                held.push_back((Instant::now() + hold, s));
            }
            Err(_) => {
                c.alloc_errors.fetch_add(1, Relaxed);
            }
        }
        while held.front().is_some_and(|(t, _)| *t <= Instant::now()) {
            if let Some((_, s)) = held.pop_front() {
                relay_load::release(&s);
                c.allocs_released.fetch_add(1, Relaxed);
            }
        }
        next += gap;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now;
        }
    }
    for (_, s) in held {
        relay_load::release(&s);
        c.allocs_released.fetch_add(1, Relaxed);
    }
}

// ---------------------------------------------------------------------------------------------
// Signaling: pairs that join, signal, drop, resume, idle and leave, over and over.

type Error = sigload::Error;

/// A socket and the highest `seq` it has seen (what a resume presents as `lastSeq`); it counts
/// itself in `ws_open` while it lives.
struct Peer {
    ws: sigload::Ws,
    seq: u64,
    c: Arc<Counts>,
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.c.ws_open.fetch_sub(1, Relaxed);
    }
}

impl Peer {
    /// Open a socket authenticated with a session `token` (a resume must present the same
    /// user as the seat, so the pair keeps its tokens) and wait for `ice-servers`.
    async fn open(s: &sigload::Server, token: &str, c: &Arc<Counts>) -> Result<Peer, Error> {
        let ws = sigload::open_ws(s, "/v1/ws", Some(format!("switchboard.v1, {token}"))).await?;
        c.ws_open.fetch_add(1, Relaxed);
        let mut p = Peer {
            ws,
            seq: 0,
            c: c.clone(),
        };
        p.until("ice-servers").await?;
        Ok(p)
    }
    async fn send(&mut self, v: Value) -> Result<(), Error> {
        self.ws.send(WsMsg::Text(v.to_string().into())).await?;
        Ok(())
    }
    async fn next(&mut self) -> Result<Value, Error> {
        loop {
            let m = tokio::time::timeout(Duration::from_secs(30), self.ws.next())
                .await
                .map_err(|_| "no frame within 30 s")?
                .ok_or("socket closed")??;
            if let WsMsg::Text(t) = m {
                let v: Value = serde_json::from_str(&t)?;
                if let Some(s) = v["seq"].as_u64() {
                    self.seq = self.seq.max(s);
                }
                return Ok(v);
            }
        }
    }
    async fn until(&mut self, ty: &str) -> Result<Value, Error> {
        loop {
            let v = self.next().await?;
            if v["type"] == ty {
                return Ok(v);
            }
            if v["type"] == "error" {
                return Err(format!("server error: {v}").into());
            }
        }
    }
}

/// Read both sockets (so pings are answered) for `d`.
async fn idle(a: &mut Peer, b: &mut Peer, d: Duration) -> Result<(), Error> {
    let end = tokio::time::sleep(d);
    tokio::pin!(end);
    loop {
        tokio::select! {
            _ = &mut end => return Ok(()),
            r = a.next() => { r?; }
            r = b.next() => { r?; }
        }
    }
}

/// One cycle of a pair: join, signal, drop and resume, idle, leave. Sockets close when their
/// `Peer` drops, on every path.
async fn cycle(
    s: &sigload::Server,
    tag: &str,
    idle_for: Duration,
    c: &Arc<Counts>,
) -> Result<(), Error> {
    let at = sigload::login(s, &format!("{tag}a")).await?;
    let bt = sigload::login(s, &format!("{tag}b")).await?;
    let mut a = Peer::open(s, &at, c).await?;
    a.send(json!({"type": "create"})).await?;
    let room = a.until("created").await?["room"]
        .as_str()
        .ok_or("no room")?
        .to_string();
    a.send(json!({"type": "join", "room": room})).await?;
    a.until("joined").await?;
    let mut b = Peer::open(s, &bt, c).await?;
    b.send(json!({"type": "join", "room": room})).await?;
    let token = b.until("joined").await?["resumeToken"]
        .as_str()
        .ok_or("no resumeToken")?
        .to_string();
    a.until("peer-joined").await?;
    for n in 0..3 {
        a.send(json!({"type": "signal", "data": {"n": n, "sdp": "v=0 offer"}}))
            .await?;
        b.until("signal").await?;
        b.send(json!({"type": "signal", "data": {"n": n, "sdp": "v=0 answer"}}))
            .await?;
        a.until("signal").await?;
        c.ws_signals.fetch_add(2, Relaxed);
    }
    // b drops without leaving; a hears it and signals into the gap; b resumes and gets it.
    let last = b.seq;
    drop(b);
    a.until("peer-reconnecting").await?;
    a.send(json!({"type": "signal", "data": {"missed": true}}))
        .await?;
    let mut b = Peer::open(s, &bt, c).await?;
    b.send(json!({"type": "resume", "resumeToken": token, "lastSeq": last}))
        .await?;
    b.until("resumed").await?;
    b.until("signal").await?;
    a.until("peer-resumed").await?;
    c.ws_resumes.fetch_add(1, Relaxed);
    idle(&mut a, &mut b, idle_for).await?;
    b.send(json!({"type": "leave"})).await?;
    b.until("left").await?;
    a.send(json!({"type": "leave"})).await?;
    a.until("left").await?;
    Ok(())
}

async fn signaling(o: Opts, http: SocketAddr, pid: u32, c: Arc<Counts>, stop: Arc<AtomicBool>) {
    let s = sigload::Server {
        target: sigload::Target::Switchboard,
        addr: http,
        pid,
        src: LO,
        peerjs_path: "",
    };
    let pairs = (o.ws / 2).max(1);
    let mut tasks = Vec::new();
    for p in 0..pairs {
        let (s, c, stop) = (s.clone(), c.clone(), stop.clone());
        // Stagger the start over ten seconds so logins do not arrive in one burst.
        let delay = Duration::from_millis((p as u64 * 10_000) / pairs as u64);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let mut n = 0u64;
            while !stop.load(Relaxed) {
                n += 1;
                let idle_for =
                    Duration::from_millis(5_000 + (p as u64 * 7919 + n * 104_729) % 25_000);
                let idle_for = if o.secs < 60.0 {
                    Duration::from_millis(300)
                } else {
                    idle_for
                };
                match cycle(&s, &format!("p{p}c{n}"), idle_for, &c).await {
                    Ok(()) => {
                        c.ws_cycles.fetch_add(1, Relaxed);
                    }
                    Err(e) => {
                        if c.ws_errors.fetch_add(1, Relaxed) < 5 {
                            eprintln!("pair {p}: {e}");
                        }
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

// ---------------------------------------------------------------------------------------------

fn run(o: &Opts) -> Result<bool, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let server = start_server(o, dir.path())?;
    let pid = server.child.id();
    let echo = Arc::new(Echo::start());
    let counts = Arc::new(Counts::default());
    let stop = Arc::new(AtomicBool::new(false));
    println!(
        "soak: {:.0} s, sample every {:.0} s; TURN {} pkt/s each way over {} allocations \
         (a tenth replaced every {:.0} s round), {} churned allocations/s; {} WebSockets",
        o.secs, o.sample, o.rate, o.allocs, o.round, o.churn, o.ws
    );
    let relay = {
        let (o, e, c, s) = (o.clone(), echo.clone(), counts.clone(), stop.clone());
        let addr = server.turn;
        std::thread::spawn(move || relay_loop(o, addr, e, c, s))
    };
    let churn = {
        let (o, c, s) = (o.clone(), counts.clone(), stop.clone());
        let (addr, e) = (server.turn, echo.addr);
        std::thread::spawn(move || churn_loop(o, addr, e, c, s))
    };
    let sig = {
        let (o, c, s) = (o.clone(), counts.clone(), stop.clone());
        let http = server.http;
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(signaling(o, http, pid, c, s));
        })
    };

    let mut csv = std::fs::File::create(&o.csv).map_err(|e| format!("{}: {e}", o.csv))?;
    writeln!(
        csv,
        "elapsed_s,rss_kib,fds,allocations,rooms,ws_open,ws_client,pkts_sent,pkts_to_peer,\
         pkts_back,loss_pct,allocs_created,allocs_released,alloc_errors,ws_cycles,ws_resumes,\
         ws_signals,ws_errors"
    )
    .map_err(|e| e.to_string())?;
    println!("  min   RSS MiB  fds  allocs  rooms  ws    loss%   cycles resumes errors");
    let start = Instant::now();
    let mut last = (0u64, 0u64, 0u64);
    let mut rows: Vec<(f64, u64, usize)> = Vec::new();
    let mut k = 1u64;
    loop {
        let due = start + Duration::from_secs_f64(o.sample * k as f64);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        k += 1;
        let el = start.elapsed().as_secs_f64();
        let rss = relay_load::rss_kib(pid);
        let nfd = fds(pid);
        let (allocs, rooms, ws) = server_state(server.http);
        let cur = (
            counts.sent.load(Relaxed),
            counts.to_peer.load(Relaxed),
            counts.back.load(Relaxed),
        );
        let (sent, to_peer, back) = (cur.0 - last.0, cur.1 - last.1, cur.2 - last.2);
        last = cur;
        let loss = if sent == 0 {
            0.0
        } else {
            (2 * sent).saturating_sub(to_peer + back) as f64 * 100.0 / (2 * sent) as f64
        };
        let g = |a: &AtomicU64| a.load(Relaxed);
        writeln!(
            csv,
            "{el:.1},{rss},{nfd},{allocs},{rooms},{ws},{},{sent},{to_peer},{back},{loss:.4},{},{},{},{},{},{},{}",
            g(&counts.ws_open),
            g(&counts.allocs_created),
            g(&counts.allocs_released),
            g(&counts.alloc_errors),
            g(&counts.ws_cycles),
            g(&counts.ws_resumes),
            g(&counts.ws_signals),
            g(&counts.ws_errors),
        )
        .map_err(|e| e.to_string())?;
        let _ = csv.flush();
        println!(
            "{:5.1} {:9.1} {nfd:4} {allocs:7} {rooms:6} {ws:5} {loss:7.3} {:8} {:7} {:6}",
            el / 60.0,
            rss as f64 / 1024.0,
            g(&counts.ws_cycles),
            g(&counts.ws_resumes),
            g(&counts.ws_errors),
        );
        rows.push((el, rss, nfd));
        if el >= o.secs {
            break;
        }
    }
    stop.store(true, Relaxed);
    let _ = relay.join();
    let _ = churn.join();
    let _ = sig.join();
    // Every client is gone: wait out the resume and empty-room graces, then look.
    std::thread::sleep(Duration::from_secs(2 * o.grace + 3));
    let (allocs, rooms, ws) = server_state(server.http);
    let rss_end = relay_load::rss_kib(pid);
    let fds_end = fds(pid);
    // Flatness after warm-up: the first fifth of the run (at least one sample) is warm-up.
    let warm = rows.len() / 5;
    let after: Vec<&(f64, u64, usize)> = rows.iter().skip(warm.max(1)).collect();
    let spread = |v: Vec<f64>| {
        let (lo, hi) = v
            .iter()
            .fold((f64::MAX, f64::MIN), |(l, h), x| (l.min(*x), h.max(*x)));
        if lo > 0.0 && lo < f64::MAX {
            (lo, hi, (hi - lo) * 100.0 / lo)
        } else {
            (0.0, 0.0, 0.0)
        }
    };
    let (rlo, rhi, rsp) = spread(after.iter().map(|r| r.1 as f64 / 1024.0).collect());
    let (flo, fhi, fsp) = spread(after.iter().map(|r| r.2 as f64).collect());
    let total_sent = counts.sent.load(Relaxed);
    let total_relayed = counts.to_peer.load(Relaxed) + counts.back.load(Relaxed);
    println!(
        "after warm-up ({} of {} samples): RSS {rlo:.1}..{rhi:.1} MiB ({rsp:.1}% spread), \
         fds {flo:.0}..{fhi:.0} ({fsp:.1}% spread)",
        after.len(),
        rows.len()
    );
    println!(
        "relay: {total_sent} packets each way, loss {:.4}% overall; allocations created {}, \
         released {}, refused {}; WebSocket cycles {}, resumes {}, signals {}, errors {}",
        if total_sent == 0 {
            0.0
        } else {
            (2 * total_sent).saturating_sub(total_relayed) as f64 * 100.0 / (2 * total_sent) as f64
        },
        counts.allocs_created.load(Relaxed),
        counts.allocs_released.load(Relaxed),
        counts.alloc_errors.load(Relaxed),
        counts.ws_cycles.load(Relaxed),
        counts.ws_resumes.load(Relaxed),
        counts.ws_signals.load(Relaxed),
        counts.ws_errors.load(Relaxed),
    );
    println!(
        "at the end, {}s after the last client: allocations {allocs}, rooms {rooms}, \
         WebSockets {ws}; RSS {:.1} MiB, fds {fds_end}",
        2 * o.grace + 3,
        rss_end as f64 / 1024.0
    );
    println!("CSV: {}", o.csv);
    Ok(allocs == 0.0 && rooms == 0.0 && ws == 0.0 && rows.len() >= 2)
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let o = parse_opts(bench);
    relay_load::raise_nofile(65_536);
    sigload::raise_nofile();
    match run(&o) {
        Ok(true) => {}
        Ok(false) => {
            eprintln!("soak: something was left behind (see above)");
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("soak: {e}");
            std::process::exit(1);
        }
    }
    if !bench {
        let _ = std::fs::remove_file(&o.csv);
    }
}
