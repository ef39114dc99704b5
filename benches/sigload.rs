//! Signaling load tool: holds many WebSockets in rooms of two and measures a server's memory
//! per connection, and relays paced, timestamped signals between pairs to measure latency,
//! loss, order and server CPU per 1,000 messages. It speaks switchboard's protocol and the
//! PeerJS server's, so both run through the same client in the same run.
//!
//! In cluster mode it puts the two peers of each pair on different nodes, so that every signal
//! crosses Redis, and measures that next to a single node in the same run.
//!
//! `cargo bench --bench sigload -- <mode> [--key value]…` (see `usage()`); `cargo test` runs a
//! tiny smoke run against an in-process switchboard instead.

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

pub(crate) type Ws = WebSocketStream<TcpStream>;
type Tx = SplitSink<Ws, Message>;
type Rx = SplitStream<Ws>;
pub(crate) type Error = Box<dyn std::error::Error + Send + Sync>;

fn usage() -> &'static str {
    "sigload hold     --target sb|peerjs --addr HOST:PORT --pid PID --n N [--src IP] [--secs S]\n\
     sigload latency  --target sb|peerjs --addr HOST:PORT --pid PID [--idle M] [--pairs P]\n\
                      [--rate MSGS_PER_S] [--secs S] [--src IP]\n\
     sigload compare  --sb HOST:PORT/PID [--sb-peerjs HOST:PORT/PID] --peerjs HOST:PORT/PID [--n N] [--pairs P]\n\
                      [--rate R[,R2…]] [--secs S]   (hold N, then latency at each rate while\n\
                      the N stay connected; prints a markdown table with ratios)\n\
     sigload cluster  --single HOST:PORT/PID --nodes HOST:PORT/PID,HOST:PORT/PID [--pairs P]\n\
                      [--rate R[,R2…]] [--secs S]   (latency on the single node, with both peers\n\
                      on the first cluster node, and with them on different cluster nodes;\n\
                      prints a markdown table with ratios to the single node)"
}

/// Which server protocol to speak.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Target {
    Switchboard,
    PeerJs,
}

#[derive(Clone, Debug)]
pub(crate) struct Server {
    pub(crate) target: Target,
    pub(crate) addr: SocketAddr,
    pub(crate) pid: u32,
    /// Source IP for this server's client sockets (any 127/8 address): separate source IPs
    /// keep each run's ephemeral ports (and TIME_WAIT) apart.
    pub(crate) src: IpAddr,
    /// Where a PeerJS-protocol server serves its `path` option: "" for the PeerJS server's
    /// default `/`, "/peerjs" for switchboard's `[peerjs]`.
    pub(crate) peerjs_path: &'static str,
}

fn ws_config() -> WebSocketConfig {
    // The client holds up to ~20k sockets: keep its own buffers small.
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_message_size(Some(1 << 20))
}

async fn tcp(s: &Server) -> Result<TcpStream, Error> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(s.src, 0))?;
    Ok(sock.connect(s.addr).await?)
}

/// Minimal HTTP/1.1 POST on loopback (the login), so the tool needs no HTTP client stack.
pub(crate) async fn login(s: &Server, name: &str) -> Result<String, Error> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = json!({ "name": name }).to_string();
    let mut t = tcp(s).await?;
    let req = format!(
        "POST /v1/login HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        s.addr,
        body.len()
    );
    t.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    t.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf);
    let (_, json) = text.split_once("\r\n\r\n").ok_or("no HTTP body")?;
    let v: Value =
        serde_json::from_str(json.trim()).map_err(|e| format!("login answer {text:?}: {e}"))?;
    Ok(v["token"].as_str().ok_or("no token in login")?.to_string())
}

pub(crate) async fn open_ws(s: &Server, path: &str, protocol: Option<String>) -> Result<Ws, Error> {
    let mut req = format!("ws://{}{path}", s.addr).into_client_request()?;
    if let Some(p) = protocol {
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", p.parse()?);
    }
    let stream = tcp(s).await?;
    let (ws, _) =
        tokio_tungstenite::client_async_with_config(req, stream, Some(ws_config())).await?;
    Ok(ws)
}

async fn next_json(ws: &mut Ws) -> Result<Value, Error> {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .map_err(|_| "no frame within 30 s")?
            .ok_or("socket closed")??;
        if let Message::Text(t) = m {
            return Ok(serde_json::from_str(&t)?);
        }
    }
}

async fn until_type(ws: &mut Ws, ty: &str) -> Result<Value, Error> {
    loop {
        let v = next_json(ws).await?;
        if v["type"] == ty {
            return Ok(v);
        }
        if v["type"] == "error" {
            return Err(format!("server error: {v}").into());
        }
    }
}

/// One connected pair: both sockets, and the address each uses for the other.
struct Pair {
    a: Ws,
    b: Ws,
    /// PeerJS addresses messages by destination id; switchboard relays to the other peer.
    a_id: String,
    b_id: String,
}

async fn sb_peer(s: &Server, name: &str) -> Result<Ws, Error> {
    let token = login(s, name).await?;
    let mut ws = open_ws(s, "/v1/ws", Some(format!("switchboard.v1, {token}"))).await?;
    until_type(&mut ws, "ice-servers").await?;
    Ok(ws)
}

async fn make_pair(s: &Server, tag: &str) -> Result<Pair, Error> {
    make_pair_on(s, s, tag).await
}

/// A pair whose first peer (which creates the room) is on `s` and whose second is on `sb`:
/// with two cluster nodes, the room lives on `s` and the second peer's node forwards.
async fn make_pair_on(s: &Server, sb: &Server, tag: &str) -> Result<Pair, Error> {
    match s.target {
        Target::Switchboard => {
            let mut a = sb_peer(s, &format!("{tag}a")).await?;
            a.send(Message::Text(json!({"type": "create"}).to_string().into()))
                .await?;
            let room = until_type(&mut a, "created").await?["room"]
                .as_str()
                .ok_or("no room")?
                .to_string();
            let join = json!({"type": "join", "room": room}).to_string();
            a.send(Message::Text(join.clone().into())).await?;
            until_type(&mut a, "joined").await?;
            let mut b = sb_peer(sb, &format!("{tag}b")).await?;
            b.send(Message::Text(join.into())).await?;
            until_type(&mut b, "joined").await?;
            until_type(&mut a, "peer-joined").await?;
            Ok(Pair {
                a,
                b,
                a_id: String::new(),
                b_id: String::new(),
            })
        }
        Target::PeerJs => {
            let (a_id, b_id) = (format!("{tag}a"), format!("{tag}b"));
            let p = s.peerjs_path;
            let mut a =
                open_ws(s, &format!("{p}/peerjs?key=peerjs&id={a_id}&token=t"), None).await?;
            until_type(&mut a, "OPEN").await?;
            let mut b =
                open_ws(s, &format!("{p}/peerjs?key=peerjs&id={b_id}&token=t"), None).await?;
            until_type(&mut b, "OPEN").await?;
            Ok(Pair { a, b, a_id, b_id })
        }
    }
}

/// Keep a socket read (pings answered, frames discarded) until the task is aborted.
fn hold_socket(mut ws: Ws) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move { while let Some(Ok(_)) = ws.next().await {} })
}

fn proc_status_kib(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(key))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// utime + stime of a process, in clock ticks (100 per second on Linux).
fn cpu_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = s.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

const TICK_MS: f64 = 10.0;

/// Held idle connections and what they cost.
struct Held {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    conns: usize,
    rss_before_kib: u64,
    rss_after_kib: u64,
}

impl Held {
    fn per_conn_kib(&self) -> f64 {
        if self.conns == 0 {
            return 0.0;
        }
        (self.rss_after_kib.saturating_sub(self.rss_before_kib)) as f64 / self.conns as f64
    }
}

async fn hold(s: &Server, n: usize, tag: &str) -> Result<Held, Error> {
    let rss_before_kib = proc_status_kib(s.pid, "VmRSS:").unwrap_or(0);
    let pairs = n / 2;
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let mut joins = Vec::with_capacity(pairs);
    for i in 0..pairs {
        let (s, sem, tag) = (s.clone(), sem.clone(), tag.to_string());
        joins.push(tokio::spawn(async move {
            let _p = sem.acquire_owned().await?;
            make_pair(&s, &format!("{tag}{i}x")).await
        }));
    }
    let mut tasks = Vec::with_capacity(n);
    for j in joins {
        let p = j.await??;
        tasks.push(hold_socket(p.a));
        tasks.push(hold_socket(p.b));
    }
    // Let the server settle (allocator, lazily grown buffers) before reading RSS.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after_kib = proc_status_kib(s.pid, "VmRSS:").unwrap_or(0);
    Ok(Held {
        conns: tasks.len(),
        tasks,
        rss_before_kib,
        rss_after_kib,
    })
}

/// What a latency run measured.
#[derive(Debug, Default)]
struct LatencyReport {
    rate: u64,
    sent: u64,
    received: u64,
    reordered: u64,
    altered: u64,
    achieved_rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
    cpu_ms_per_1000: f64,
}

const PAD: &str = "v=0 o=- 4611731400430051336 2 IN IP4 127.0.0.1 s=- t=0 0 a=group:BUNDLE 0 \
                   a=candidate:1 1 udp 2122260223 192.0.2.1 54321 typ host generation 0 ufrag x";

struct Shared {
    start: Instant,
    /// Messages scheduled before this are counted for loss and order but not for latency.
    warm_until_ns: AtomicU64,
    lat_ns: Mutex<Vec<u64>>,
    received: AtomicU64,
    reordered: AtomicU64,
    altered: AtomicU64,
}

/// Read a pair member's socket: check payload, per-sender order, and record latency.
fn reader(mut rx: Rx, target: Target, sh: Arc<Shared>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut last: Option<u64> = None;
        while let Some(Ok(m)) = rx.next().await {
            let Message::Text(t) = m else { continue };
            let Ok(v) = serde_json::from_str::<Value>(&t) else {
                continue;
            };
            let d = match target {
                Target::Switchboard if v["type"] == "signal" => &v["data"],
                Target::PeerJs if v["type"] == "CANDIDATE" => &v["payload"],
                _ => continue,
            };
            let now = sh.start.elapsed().as_nanos() as u64;
            let (Some(ts), Some(seq)) = (d["t"].as_u64(), d["s"].as_u64()) else {
                sh.altered.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            if d["p"] != PAD {
                sh.altered.fetch_add(1, Ordering::Relaxed);
            }
            if last.is_some_and(|l| seq <= l) {
                sh.reordered.fetch_add(1, Ordering::Relaxed);
            }
            last = Some(seq);
            sh.received.fetch_add(1, Ordering::Relaxed);
            if ts < sh.warm_until_ns.load(Ordering::Relaxed) {
                continue;
            }
            if let Ok(mut l) = sh.lat_ns.lock() {
                l.push(now.saturating_sub(ts));
            }
        }
    })
}

fn writer(mut tx: Tx, mut q: mpsc::UnboundedReceiver<String>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(m) = q.recv().await {
            if tx.feed(Message::Text(m.into())).await.is_err() {
                return;
            }
            while let Ok(m) = q.try_recv() {
                if tx.feed(Message::Text(m.into())).await.is_err() {
                    return;
                }
            }
            if tx.flush().await.is_err() {
                return;
            }
        }
    })
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64 / 1e6
}

async fn latency(
    s: &Server,
    pairs: usize,
    rate: u64,
    secs: f64,
    tag: &str,
) -> Result<LatencyReport, Error> {
    latency_on(s, s, pairs, rate, secs, tag).await
}

/// CPU ticks of every distinct process among the servers.
fn cpu_ticks_of(servers: &[&Server]) -> u64 {
    let mut pids: Vec<u32> = servers.iter().map(|s| s.pid).collect();
    pids.sort_unstable();
    pids.dedup();
    pids.iter().filter_map(|p| cpu_ticks(*p)).sum()
}

/// [`latency`] with each pair's first peer on `s` and its second on `sb`; the CPU figure is
/// the sum over both processes.
async fn latency_on(
    s: &Server,
    sb: &Server,
    pairs: usize,
    rate: u64,
    secs: f64,
    tag: &str,
) -> Result<LatencyReport, Error> {
    let start = Instant::now();
    // The first second (or tenth of a short run) warms up connections and allocators.
    let warm = Duration::from_secs_f64((secs / 10.0).min(1.0));
    let sh = Arc::new(Shared {
        start,
        warm_until_ns: AtomicU64::new(u64::MAX),
        lat_ns: Mutex::new(Vec::with_capacity((rate as f64 * secs) as usize + 16)),
        received: AtomicU64::new(0),
        reordered: AtomicU64::new(0),
        altered: AtomicU64::new(0),
    });
    // Senders: both sides of every pair, each with its destination.
    let mut senders: Vec<(mpsc::UnboundedSender<String>, String)> = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..pairs {
        let p = make_pair_on(s, sb, &format!("{tag}{i}l")).await?;
        for (ws, dst) in [(p.a, p.b_id), (p.b, p.a_id)] {
            let (tx, rx) = ws.split();
            let (q, qr) = mpsc::unbounded_channel();
            tasks.push(writer(tx, qr));
            tasks.push(reader(rx, s.target, sh.clone()));
            senders.push((q, dst));
        }
    }
    let cpu0 = cpu_ticks_of(&[s, sb]);
    let t0 = Instant::now();
    sh.warm_until_ns.store(
        (t0 + warm).saturating_duration_since(start).as_nanos() as u64,
        Ordering::Relaxed,
    );
    let total = (rate as f64 * secs) as u64;
    let mut seqs = vec![0u64; senders.len()];
    let mut sent = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    while sent < total {
        tick.tick().await;
        // Messages due by now, each stamped with its scheduled time (no coordinated omission).
        let due = ((t0.elapsed().as_secs_f64() * rate as f64) as u64).min(total);
        while sent < due {
            let k = (sent as usize) % senders.len();
            let sched = t0 + Duration::from_secs_f64(sent as f64 / rate as f64);
            let ts = sched.saturating_duration_since(sh.start).as_nanos() as u64;
            let data = json!({"t": ts, "s": seqs[k], "p": PAD});
            seqs[k] += 1;
            let (q, dst) = &senders[k];
            let frame = match s.target {
                Target::Switchboard => json!({"type": "signal", "data": data}),
                Target::PeerJs => json!({"type": "CANDIDATE", "dst": dst, "payload": data}),
            };
            let _ = q.send(frame.to_string());
            sent += 1;
        }
    }
    let send_secs = t0.elapsed().as_secs_f64();
    // Drain: wait until everything arrived or nothing arrives for a while.
    let mut last = sh.received.load(Ordering::Relaxed);
    let mut quiet = Instant::now();
    while last < sent && quiet.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = sh.received.load(Ordering::Relaxed);
        if now != last {
            last = now;
            quiet = Instant::now();
        }
    }
    let all_secs = t0.elapsed().as_secs_f64();
    let cpu1 = cpu_ticks_of(&[s, sb]);
    drop(senders);
    for t in tasks {
        t.abort();
    }
    let mut lat = std::mem::take(&mut *sh.lat_ns.lock().map_err(|_| "poisoned")?);
    lat.sort_unstable();
    let received = sh.received.load(Ordering::Relaxed);
    Ok(LatencyReport {
        rate,
        sent,
        received,
        reordered: sh.reordered.load(Ordering::Relaxed),
        altered: sh.altered.load(Ordering::Relaxed),
        achieved_rate: received as f64 / all_secs.max(send_secs),
        p50_ms: percentile(&lat, 0.50),
        p99_ms: percentile(&lat, 0.99),
        p999_ms: percentile(&lat, 0.999),
        max_ms: lat.last().map_or(f64::NAN, |m| *m as f64 / 1e6),
        cpu_ms_per_1000: (cpu1.saturating_sub(cpu0)) as f64 * TICK_MS / received.max(1) as f64
            * 1000.0,
    })
}

pub(crate) fn raise_nofile() {
    // SAFETY: getrlimit/setrlimit only read and write the `rlimit` struct we pass, which lives
    // on this stack frame for the duration of each call.
    unsafe {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

fn parse_server(target: Target, spec: &str, src: &str) -> Result<Server, Error> {
    let (addr, pid) = spec.split_once('/').ok_or("expected HOST:PORT/PID")?;
    Ok(Server {
        target,
        addr: addr.parse()?,
        pid: pid.parse()?,
        src: src.parse()?,
        peerjs_path: "",
    })
}

fn print_latency(name: &str, r: &LatencyReport) {
    println!(
        "{name}: rate {} sent {} received {} loss {} reordered {} altered {} achieved {:.0}/s \
         p50 {:.3} ms p99 {:.3} ms p99.9 {:.3} ms max {:.3} ms cpu {:.1} ms/1000",
        r.rate,
        r.sent,
        r.received,
        r.sent - r.received.min(r.sent),
        r.reordered,
        r.altered,
        r.achieved_rate,
        r.p50_ms,
        r.p99_ms,
        r.p999_ms,
        r.max_ms,
        r.cpu_ms_per_1000
    );
}

async fn compare(args: &HashMap<String, String>) -> Result<(), Error> {
    let get = |k: &str, d: &str| args.get(k).cloned().unwrap_or_else(|| d.to_string());
    let n: usize = get("n", "1000").parse()?;
    let pairs: usize = get("pairs", "250").parse()?;
    let secs: f64 = get("secs", "10").parse()?;
    let rates: Vec<u64> = get("rate", "5000,20000")
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let mut servers = vec![(
        "switchboard /v1/ws",
        parse_server(Target::Switchboard, &get("sb", ""), "127.0.10.1")?,
    )];
    if let Some(spec) = args.get("sb-peerjs") {
        // switchboard's [peerjs] protocol, on its own process, spoken exactly as to PeerJS.
        let mut s = parse_server(Target::PeerJs, spec, "127.0.30.1")?;
        s.peerjs_path = "/peerjs";
        servers.push(("switchboard PeerJS protocol", s));
    }
    servers.push((
        "PeerJS server",
        parse_server(Target::PeerJs, &get("peerjs", ""), "127.0.20.1")?,
    ));
    let mut results = Vec::new();
    for (name, s) in &servers {
        eprintln!("{name}: holding {n} connections");
        let held = hold(s, n, "h").await?;
        eprintln!(
            "{name}: {} connections, RSS {} -> {} KiB, {:.2} KiB per connection",
            held.conns,
            held.rss_before_kib,
            held.rss_after_kib,
            held.per_conn_kib()
        );
        let mut lats = Vec::new();
        for (i, r) in rates.iter().enumerate() {
            let rep = latency(s, pairs, *r, secs, &format!("l{i}r")).await?;
            print_latency(name, &rep);
            lats.push(rep);
        }
        results.push((held.per_conn_kib(), held.conns, lats));
        for t in held.tasks {
            t.abort();
        }
        // Let the closed sockets go before the next server's run.
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    // Ratios of each switchboard column to the PeerJS server (the last column).
    let pj = results.len() - 1;
    let ratio = |a: f64, b: f64| {
        if b > 0.0 {
            format!("{:.2}×", a / b)
        } else {
            "–".into()
        }
    };
    let row = |k: String, vals: Vec<f64>| {
        let mut cells: Vec<String> = vals.iter().map(|x| format!("{x:.3}")).collect();
        for x in &vals[..pj] {
            cells.push(ratio(*x, vals[pj]));
        }
        (k, cells)
    };
    let mut rows: Vec<(String, Vec<String>)> = Vec::new();
    rows.push(row(
        format!("RSS per idle connection ({} held), KiB", results[0].1),
        results.iter().map(|r| r.0).collect(),
    ));
    for (i, r) in rates.iter().enumerate() {
        let label = format!("{r} msgs/s, {pairs} pairs, {} idle", results[0].1);
        let col = |f: &dyn Fn(&LatencyReport) -> f64| -> Vec<f64> {
            results.iter().map(|x| f(&x.2[i])).collect()
        };
        rows.push(row(format!("{label}: p50 ms"), col(&|a| a.p50_ms)));
        rows.push(row(format!("{label}: p99 ms"), col(&|a| a.p99_ms)));
        rows.push(row(format!("{label}: p99.9 ms"), col(&|a| a.p999_ms)));
        rows.push(row(format!("{label}: max ms"), col(&|a| a.max_ms)));
        rows.push(row(
            format!("{label}: server CPU ms per 1,000 msgs"),
            col(&|a| a.cpu_ms_per_1000),
        ));
        rows.push(row(
            format!("{label}: achieved msgs/s"),
            col(&|a| a.achieved_rate),
        ));
        let mut cells: Vec<String> = results
            .iter()
            .map(|x| {
                let a = &x.2[i];
                format!(
                    "{} / {} / {}",
                    a.sent - a.received.min(a.sent),
                    a.reordered,
                    a.altered
                )
            })
            .collect();
        cells.extend((0..pj).map(|_| String::new()));
        rows.push((format!("{label}: lost / reordered / altered"), cells));
    }
    let names: Vec<&str> = servers.iter().map(|(n, _)| *n).collect();
    let mut head = format!("\n| | {} |", names.join(" | "));
    for n in &names[..pj] {
        head.push_str(&format!(" {n} ÷ PeerJS |"));
    }
    println!("{head}");
    println!("|{}", "---|".repeat(1 + names.len() + pj));
    for (k, v) in rows {
        println!("| {k} | {} |", v.join(" | "));
    }
    Ok(())
}

/// Cross-node latency next to the single node's, in one run: a single-node switchboard, then
/// pairs with both peers on the first cluster node, then pairs split over two nodes.
async fn cluster(args: &HashMap<String, String>) -> Result<(), Error> {
    let get = |k: &str, d: &str| args.get(k).cloned().unwrap_or_else(|| d.to_string());
    let pairs: usize = get("pairs", "250").parse()?;
    let secs: f64 = get("secs", "10").parse()?;
    let rates: Vec<u64> = get("rate", "5000")
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let single = parse_server(Target::Switchboard, &get("single", ""), "127.0.30.1")?;
    let nodes = get("nodes", "");
    let (n1, n2) = nodes.split_once(',').ok_or("--nodes needs two nodes")?;
    let n1 = parse_server(Target::Switchboard, n1, "127.0.31.1")?;
    let n2 = parse_server(Target::Switchboard, n2, "127.0.32.1")?;
    let runs: [(&str, &Server, &Server); 3] = [
        ("single node", &single, &single),
        ("cluster, same node", &n1, &n1),
        ("cluster, cross-node", &n1, &n2),
    ];
    let mut table: Vec<Vec<LatencyReport>> = Vec::new();
    for (i, r) in rates.iter().enumerate() {
        let mut row = Vec::new();
        for (j, (name, a, b)) in runs.iter().enumerate() {
            let rep = latency_on(a, b, pairs, *r, secs, &format!("c{i}{j}r")).await?;
            print_latency(name, &rep);
            row.push(rep);
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        table.push(row);
    }
    let ratio = |a: f64, b: f64| {
        if b > 0.0 {
            format!("{:.2}×", a / b)
        } else {
            "–".into()
        }
    };
    println!(
        "\n| | single node | cluster, same node | cluster, cross-node | cross-node / single |\n\
         |---|---|---|---|---|"
    );
    for (r, row) in rates.iter().zip(&table) {
        let (s1, same, cross) = (&row[0], &row[1], &row[2]);
        let label = format!("{r} msgs/s, {pairs} pairs");
        for (what, f) in [
            (
                "p50 ms",
                (|x: &LatencyReport| x.p50_ms) as fn(&LatencyReport) -> f64,
            ),
            ("p99 ms", |x| x.p99_ms),
            ("p99.9 ms", |x| x.p999_ms),
            ("max ms", |x| x.max_ms),
            ("server CPU ms per 1,000 msgs (all nodes)", |x| {
                x.cpu_ms_per_1000
            }),
            ("achieved msgs/s", |x| x.achieved_rate),
        ] {
            println!(
                "| {label}: {what} | {:.3} | {:.3} | {:.3} | {} |",
                f(s1),
                f(same),
                f(cross),
                ratio(f(cross), f(s1))
            );
        }
        let lost = |x: &LatencyReport| {
            format!(
                "{} / {} / {}",
                x.sent - x.received.min(x.sent),
                x.reordered,
                x.altered
            )
        };
        println!(
            "| {label}: lost / reordered / altered | {} | {} | {} | |",
            lost(s1),
            lost(same),
            lost(cross)
        );
    }
    Ok(())
}

async fn run(mode: &str, args: HashMap<String, String>) -> Result<(), Error> {
    if mode == "compare" {
        return compare(&args).await;
    }
    if mode == "cluster" {
        return cluster(&args).await;
    }
    let get = |k: &str, d: &str| args.get(k).cloned().unwrap_or_else(|| d.to_string());
    let target = match get("target", "sb").as_str() {
        "sb" | "switchboard" => Target::Switchboard,
        "peerjs" => Target::PeerJs,
        t => return Err(format!("unknown target {t}").into()),
    };
    let s = Server {
        target,
        addr: get("addr", "127.0.0.1:8080").parse()?,
        pid: get("pid", "0").parse()?,
        src: get("src", "127.0.0.1").parse()?,
        peerjs_path: if get("peerjs-path", "") == "/peerjs" {
            "/peerjs"
        } else {
            ""
        },
    };
    match mode {
        "hold" => {
            let held = hold(&s, get("n", "1000").parse()?, "h").await?;
            println!(
                "{} connections, RSS {} -> {} KiB, {:.2} KiB per connection",
                held.conns,
                held.rss_before_kib,
                held.rss_after_kib,
                held.per_conn_kib()
            );
            tokio::time::sleep(Duration::from_secs_f64(get("secs", "0").parse()?)).await;
        }
        "latency" => {
            let idle: usize = get("idle", "0").parse()?;
            let held = hold(&s, idle, "i").await?;
            let r = latency(
                &s,
                get("pairs", "250").parse()?,
                get("rate", "5000").parse()?,
                get("secs", "10").parse()?,
                "l",
            )
            .await?;
            print_latency("latency", &r);
            drop(held);
        }
        _ => return Err(usage().into()),
    }
    Ok(())
}

/// `cargo test` runs bench targets without `--bench`: a tiny run against an in-process
/// switchboard proves the tool and the server agree, and takes about two seconds.
async fn smoke() -> Result<(), Error> {
    let text = "[http]\nlisten = \"127.0.0.1:0\"\n[turn]\nlisten = [\"127.0.0.1:0\"]\n\
                [auth]\nlogin_rate_per_minute = 100000\n";
    let srv = switchboard::Server::new(switchboard::Config::from_toml(text)?)
        .start()
        .await?;
    let s = Server {
        target: Target::Switchboard,
        addr: srv.http_addr(),
        pid: std::process::id(),
        src: "127.0.0.1".parse()?,
        peerjs_path: "",
    };
    let held = hold(&s, 8, "h").await?;
    assert_eq!(held.conns, 8);
    let r = latency(&s, 2, 200, 0.5, "l").await?;
    print_latency("smoke", &r);
    assert_eq!((r.received, r.reordered, r.altered), (r.sent, 0, 0));
    srv.shutdown();
    srv.wait().await;
    // The same through switchboard's PeerJS protocol, spoken as to the PeerJS server.
    let text = "[http]\nlisten = \"127.0.0.1:0\"\n[turn]\nlisten = [\"127.0.0.1:0\"]\n\
                [peerjs]\nenabled = true\nauth = \"open\"\n";
    let srv = switchboard::Server::new(switchboard::Config::from_toml(text)?)
        .start()
        .await?;
    let s = Server {
        target: Target::PeerJs,
        addr: srv.http_addr(),
        pid: std::process::id(),
        src: "127.0.0.1".parse()?,
        peerjs_path: "/peerjs",
    };
    let held = hold(&s, 8, "h").await?;
    assert_eq!(held.conns, 8);
    let r = latency(&s, 2, 200, 0.5, "l").await?;
    print_latency("smoke peerjs", &r);
    assert_eq!((r.received, r.reordered, r.altered), (r.sent, 0, 0));
    srv.shutdown();
    srv.wait().await;
    Ok(())
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let bench = argv.iter().any(|a| a == "--bench");
    let rest: Vec<&String> = argv.iter().filter(|a| *a != "--bench").collect();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = if !bench {
        rt.block_on(smoke())
    } else {
        raise_nofile();
        let Some(mode) = rest.first() else {
            eprintln!("{}", usage());
            std::process::exit(2);
        };
        let mut args = HashMap::new();
        let mut it = rest[1..].iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            args.insert(k.trim_start_matches("--").to_string(), v.to_string());
        }
        rt.block_on(run(mode, args))
    };
    if let Err(e) = result {
        eprintln!("sigload: {e}");
        std::process::exit(1);
    }
}
