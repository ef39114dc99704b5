//! TURN relay load generator: a minimal forwarder (one socket each side, the physical
//! limit), a bare recvmmsg/sendmmsg forwarder (no TURN, a TURN relay's socket topology),
//! coturn and switchboard measured side by side in one run.
//!
//! `cargo bench --bench relay_load` runs the full measurement (see docs/performance.md);
//! `cargo test --all-targets` runs this target without `--bench`, which is a smoke run of a
//! few hundred packets through the bare and minimal forwarders, video-like bursts through the
//! bare one, and switchboard's TURN over TCP and TLS.
//!
//! Options (after `--`): `--rates 50000,100000,200000` (packets per second each way),
//! `--allocs 50`, `--secs 4`, `--size 120`, `--alloc-count 2000` (allocations-per-second
//! phase; 0 leaves it and the memory phase out), `--rss-count 10000` (memory phase),
//! `--servers minimal,bare,coturn,switchboard` (default `bare,coturn,switchboard`; add
//! `switchboard@PATH` to measure another build in the same run), `--bin PATH` (switchboard
//! binary, default the release build next to this bench), `--shards N` (switchboard
//! `turn.shards`), `--repeat N` (N pairings: the server list N times per load, with the median
//! of each pairing's ratios).
//!
//! `--video FLOWS,FPS,PKTS,SIZE` replaces the evenly paced load with video-like bursts: per
//! flow (one allocation each), FPS frames a second, each PKTS ChannelData packets of SIZE
//! payload bytes, the last two thirds as long. A client sends each frame with one GSO
//! `sendmsg` and reads with GRO on, and the echo peer answers a frame as GSO messages, as
//! their kernels would; the bare and minimal forwarders use neither GRO nor GSO.
//!
//! `--transport tcp|tls` makes the clients speak TURN over TCP or TLS (ChannelData framed on
//! the stream, padded to 4 bytes; the relays stay UDP) to switchboard (`turn.tls_listen`) and
//! coturn (its TCP port, `--tls-listening-port`), with a self-signed certificate from
//! `openssl`; the UDP-only forwarders are left out.
//!
//! `--lab` runs the same measurement over veth interfaces instead of loopback: the load
//! generator, the server and the echo peer each get a network namespace (`sblab-rl<pid>-*`,
//! removed on exit) on one bridge, with software checksums on the generator's and the peer's
//! interfaces. That is where the kernel offload applies (never on `lo`): add
//! `switchboard-offload` to `--servers` (switchboard with `turn.kernel_offload = "on"`; the
//! binary must be built with `--features kernel-offload`; needs root). The table then adds
//! machine-wide busy CPU per relayed packet (/proc/stat: softirq work is invisible to
//! per-process CPU) and its ratios to the bare forwarder's.
//!
//! `--idle-probe` measures the machine's spare capacity instead of trusting its accounting:
//! one `SCHED_IDLE` spinner pinned to each CPU counts loop turns, calibrated on a quiet
//! machine right before each measurement (the method of Andrew Morton's `cyclesoak`). CPU
//! used = CPUs × seconds × (1 − turns during the run / turns in as long quiet). Where work
//! runs in softirq from a sender's system call (what an in-kernel relay does) the tick-based
//! /proc/stat misses much of it on some virtual machines; the probe does not. Add `direct`
//! to `--servers`: the generator sends straight to the echo peer, no relay, so the CPU it
//! uses is the load tool's own; each relay's cost is then its CPU used less `direct`'s, per
//! relayed packet. With the probe on, the /proc/stat columns count its spinning too: read the
//! probe's own table.

use std::collections::HashMap;
use std::io::Write;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};
use switchboard::stun::codec::{attr, long_term_key, method, Class, Encoder, Message};
use switchboard::udp_batch::{set_gro, RecvBatch, SendQueue, UdpSocketState, RECV_BATCH};

const SECRET: &str = "bench-secret";
const REALM: &str = "switchboard";
/// Concurrent clients in the allocation phases.
const ALLOC_CLIENTS: usize = 8;
const LO: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
/// Lab addresses (documentation range): generator, server, echo peer.
const LAB_CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(203, 0, 113, 21));
const LAB_SERVER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(203, 0, 113, 10));
const LAB_PEER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(203, 0, 113, 30));

/// Where each party lives: all on loopback, or in the namespaces of `--lab`.
static LAB: std::sync::OnceLock<Option<LabNet>> = std::sync::OnceLock::new();

fn lab() -> Option<&'static LabNet> {
    LAB.get().and_then(Option::as_ref)
}
/// The generator's address.
fn client_ip() -> IpAddr {
    if lab().is_some() {
        LAB_CLIENT
    } else {
        LO
    }
}
/// The servers' address.
fn server_ip() -> IpAddr {
    if lab().is_some() {
        LAB_SERVER
    } else {
        LO
    }
}
/// A command run in the server's namespace under `--lab`.
fn server_cmd(program: &str) -> Command {
    match lab() {
        Some(l) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &l.ns("srv"), program]);
            c
        }
        None => Command::new(program),
    }
}

/// The namespaces of `--lab`: `sw` holds the bridge; `cli`, `srv` and `peer` one veth each.
/// Dropping it deletes them (also on an error return or a panic's unwind).
struct LabNet {
    prefix: String,
}

fn sh(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl LabNet {
    fn ns(&self, h: &str) -> String {
        format!("{}{h}", self.prefix)
    }
    fn start() -> Result<LabNet, String> {
        let l = LabNet {
            prefix: format!("sblab-rl{}-", std::process::id()),
        };
        for h in ["sw", "cli", "srv", "peer"] {
            sh(&["ip", "netns", "add", &l.ns(h)])?;
        }
        let sw = l.ns("sw");
        sh(&["ip", "-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        sh(&["ip", "-n", &sw, "link", "set", "br0", "up"])?;
        for (h, ip) in [("cli", LAB_CLIENT), ("srv", LAB_SERVER), ("peer", LAB_PEER)] {
            let ns = l.ns(h);
            let port = format!("{h}0");
            sh(&[
                "ip", "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "e0",
                "netns", &ns,
            ])?;
            sh(&["ip", "-n", &sw, "link", "set", &port, "master", "br0", "up"])?;
            sh(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                "e0",
            ])?;
            sh(&["ip", "-n", &ns, "link", "set", "e0", "up"])?;
            sh(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
            if h != "srv" {
                // Datagrams with a checksum still to compute (CHECKSUM_PARTIAL) stay with
                // user space in the offload; hosts on other machines send complete ones.
                sh(&[
                    "ip", "netns", "exec", &ns, "ethtool", "-K", "e0", "tx", "off",
                ])?;
            }
        }
        Ok(l)
    }
    /// Move the calling thread into namespace `h`; sockets it opens from now on live there.
    fn enter(&self, h: &str) -> Result<(), String> {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(format!("/var/run/netns/{}", self.ns(h)))
            .map_err(|e| e.to_string())?;
        #[allow(unsafe_code)]
        // SAFETY: setns only reads the descriptor, which `f` keeps open for the call.
        let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        if r == 0 {
            Ok(())
        } else {
            Err(format!(
                "setns {}: {}",
                self.ns(h),
                std::io::Error::last_os_error()
            ))
        }
    }
}

impl LabNet {
    fn cleanup(&self) {
        for h in ["cli", "srv", "peer", "sw"] {
            let _ = sh(&["ip", "netns", "del", &self.ns(h)]);
        }
    }
}

impl Drop for LabNet {
    fn drop(&mut self) {
        self.cleanup();
    }
}

#[derive(Clone, Debug)]
struct Opts {
    rates: Vec<u64>,
    allocs: usize,
    secs: f64,
    size: usize,
    alloc_count: usize,
    rss_count: usize,
    servers: Vec<String>,
    bin: Option<String>,
    shards: Option<usize>,
    smoke: bool,
    lab: bool,
    idle_probe: bool,
    /// `--video FLOWS,FPS,PKTS,SIZE`: bursts per flow instead of even pacing.
    video: Option<Video>,
    /// `--transport udp|tcp|tls`: how the generator reaches the TURN servers.
    transport: Transport,
    /// `--repeat N`: run every server N times per load (pairings), for medians of ratios.
    repeat: usize,
}

/// The video-like load: per flow, `fps` frames a second, each a burst of `pkts` ChannelData
/// packets of `size` payload bytes but the last, which is shorter (two thirds).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Video {
    flows: usize,
    fps: u32,
    pkts: usize,
    size: usize,
}

impl Video {
    fn last_size(&self) -> usize {
        (self.size * 2 / 3).max(16)
    }
    /// Packets a second each way.
    fn rate(&self) -> u64 {
        self.flows as u64 * self.fps as u64 * self.pkts as u64
    }
}

/// The clients' transport to the TURN server (the relay side is UDP in every case).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    Udp,
    Tcp,
    Tls,
}

/// One measured load: evenly paced packets, or video-like bursts.
#[derive(Clone, Copy, Debug)]
enum Load {
    Paced { rate: u64, size: usize },
    Video(Video),
}

impl Load {
    fn rate(&self) -> u64 {
        match self {
            Load::Paced { rate, .. } => *rate,
            Load::Video(v) => v.rate(),
        }
    }
    fn label(&self) -> String {
        match self {
            Load::Paced { rate, .. } => format!("{}k paced", rate / 1000),
            Load::Video(v) => format!(
                "video {}x{}fps x{} ({} pkt/s)",
                v.flows,
                v.fps,
                v.pkts,
                v.rate()
            ),
        }
    }
}

fn parse_opts() -> Opts {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut o = Opts {
        rates: vec![50_000, 100_000, 200_000],
        allocs: 50,
        secs: 4.0,
        size: 120,
        alloc_count: 2000,
        rss_count: 10_000,
        servers: vec!["bare".into(), "coturn".into(), "switchboard".into()],
        bin: None,
        shards: None,
        smoke: !args.iter().any(|a| a == "--bench"),
        lab: false,
        idle_probe: false,
        video: None,
        transport: Transport::Udp,
        repeat: 1,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut v = || it.next().cloned().unwrap_or_default();
        match a.as_str() {
            "--rates" => o.rates = v().split(',').filter_map(|s| s.parse().ok()).collect(),
            "--allocs" => o.allocs = v().parse().unwrap_or(o.allocs),
            "--secs" => o.secs = v().parse().unwrap_or(o.secs),
            "--size" => o.size = v().parse().unwrap_or(o.size),
            "--alloc-count" => o.alloc_count = v().parse().unwrap_or(o.alloc_count),
            "--rss-count" => o.rss_count = v().parse().unwrap_or(o.rss_count),
            "--servers" => o.servers = v().split(',').map(String::from).collect(),
            "--bin" => o.bin = Some(v()),
            "--shards" => o.shards = v().parse().ok(),
            "--lab" => o.lab = true,
            "--idle-probe" => o.idle_probe = true,
            "--video" => {
                let v: Vec<usize> = v().split(',').filter_map(|s| s.parse().ok()).collect();
                if let [flows, fps, pkts, size] = v[..] {
                    o.video = Some(Video {
                        flows,
                        fps: fps as u32,
                        pkts,
                        size: size.max(16),
                    });
                    o.allocs = flows;
                }
            }
            "--transport" => {
                o.transport = match v().as_str() {
                    "tcp" => Transport::Tcp,
                    "tls" => Transport::Tls,
                    _ => Transport::Udp,
                }
            }
            "--repeat" => o.repeat = v().parse().unwrap_or(1).max(1),
            _ => {}
        }
    }
    o
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--forwarder") {
        let port: u16 = args[2].parse().expect("port");
        forwarder(port);
        return;
    }
    if args.get(1).map(String::as_str) == Some("--minimal") {
        let port: u16 = args[2].parse().expect("port");
        minimal(port);
        return;
    }
    raise_nofile(20_000);
    let o = parse_opts();
    if o.smoke {
        smoke();
        return;
    }
    if o.lab {
        match LabNet::start() {
            Ok(l) => {
                let _ = LAB.set(Some(l));
            }
            Err(e) => {
                eprintln!("relay_load --lab: {e}");
                std::process::exit(1);
            }
        }
    } else {
        let _ = LAB.set(None);
    }
    // Statics are never dropped: this guard deletes the namespaces, also on a panic.
    struct Cleanup;
    impl Drop for Cleanup {
        fn drop(&mut self) {
            if let Some(l) = lab() {
                l.cleanup();
            }
        }
    }
    let guard = Cleanup;
    let r = run(&o);
    drop(guard);
    if let Err(e) = r {
        eprintln!("relay_load: {e}");
        std::process::exit(1);
    }
}

/// Keep open files under 20,000 per process, but allow that many (10k allocations need one
/// client socket each here and one relay socket each in the server).
pub(crate) fn raise_nofile(n: u64) {
    #[allow(unsafe_code)]
    // SAFETY: setrlimit reads a live local rlimit struct.
    unsafe {
        let r = libc::rlimit {
            rlim_cur: n,
            rlim_max: n,
        };
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
    }
}

// ---------------------------------------------------------------------------------------------
// /proc readings

fn clk_tck() -> f64 {
    #[allow(unsafe_code)]
    // SAFETY: sysconf has no memory effects.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// utime+stime of a process or thread stat file, in seconds.
fn cpu_of(path: &str) -> f64 {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    // The command name may contain spaces; fields restart after the closing parenthesis.
    let rest = s.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields 14 and 15 of stat are at 11 and 12 after the state field (field 3).
    (t(11) + t(12)) / clk_tck()
}

fn proc_cpu(pid: u32) -> f64 {
    cpu_of(&format!("/proc/{pid}/stat"))
}

/// Per-thread CPU seconds of a process, by thread name.
fn thread_cpu(pid: u32) -> Vec<(String, f64)> {
    let mut v = Vec::new();
    if let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for e in rd.flatten() {
            let p = e.path();
            let name = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
            v.push((
                name.trim().to_string(),
                cpu_of(&p.join("stat").to_string_lossy()),
            ));
        }
    }
    v
}

/// (busy, total) jiffies of the whole machine from /proc/stat.
fn machine_cpu() -> (f64, f64) {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = s.lines().next().unwrap_or("");
    let f: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: f64 = f.iter().sum();
    let idle = f.get(3).copied().unwrap_or(0.0) + f.get(4).copied().unwrap_or(0.0);
    ((total - idle) / clk_tck(), total / clk_tck())
}

pub(crate) fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|x| x.parse().ok())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Echo peer: one socket, batched both ways.

/// Receive buffers that hold a GRO-coalesced read (up to 64 datagrams, 64 KiB).
const GRO_BUF: usize = 65_536;

pub(crate) struct Echo {
    pub(crate) addr: SocketAddr,
    count: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Echo {
    /// The evenly paced load's peer: one datagram per message (the video-like load's peer
    /// answers a burst from one relay as GSO messages, as a peer's kernel sending a video
    /// frame would).
    pub(crate) fn start() -> Echo {
        Echo::start_with(false)
    }

    /// An echo peer that answers a burst with GSO messages when `gso`.
    pub(crate) fn start_with(gso: bool) -> Echo {
        let ip = if lab().is_some() { LAB_PEER } else { LO };
        let sock = UdpSocket::bind((ip, 0)).expect("echo bind");
        let sref = socket2::SockRef::from(&sock);
        let _ = sref.set_recv_buffer_size(8 << 20);
        let _ = sref.set_send_buffer_size(8 << 20);
        let addr = sock.local_addr().expect("echo addr");
        let state = UdpSocketState::new((&sock).into()).expect("echo state");
        sock.set_nonblocking(true).expect("nonblocking");
        let count = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (c, s) = (count.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("echo".into())
            .spawn(move || {
                let mut poll = Poll::new().expect("poll");
                let mut ms = mio::net::UdpSocket::from_std(sock);
                poll.registry()
                    .register(&mut ms, Token(0), Interest::READABLE)
                    .expect("register");
                let mut ev = Events::with_capacity(8);
                let mut rb = RecvBatch::new(GRO_BUF);
                let mut q = SendQueue::new(2048);
                q.set_gso(gso);
                while !s.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = poll.poll(&mut ev, Some(Duration::from_millis(50)));
                    while let Ok(n) = rb.recv(&state, &ms) {
                        let mut k = 0;
                        for (d, from, _) in rb.iter() {
                            if q.is_full() {
                                q.flush(&ms);
                            }
                            q.push(d, from, None);
                            k += 1;
                        }
                        c.fetch_add(k, std::sync::atomic::Ordering::Relaxed);
                        q.flush(&ms);
                        if n < RECV_BATCH {
                            break;
                        }
                    }
                }
            })
            .expect("spawn echo");
        Echo {
            addr,
            count,
            stop,
            thread: Some(thread),
        }
    }
    pub(crate) fn received(&self) -> u64 {
        self.count.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Bare forwarder: the TURN data path's socket topology (one front socket, one relay socket per
// client, batched syscalls) with no TURN at all.

fn forwarder(port: u16) {
    let n = num_cpus();
    let socks: Vec<std::net::UdpSocket> = (0..n).map(|_| reuseport_bind(port)).collect();
    let threads: Vec<_> = socks
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            std::thread::Builder::new()
                .name(format!("fwd-{i}"))
                .spawn(move || forwarder_shard(s))
                .expect("spawn")
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
}

/// The bare forwarder's address (`FWD_IP`, loopback by default).
fn fwd_ip() -> IpAddr {
    std::env::var("FWD_IP")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(LO)
}

fn reuseport_bind(port: u16) -> UdpSocket {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).expect("socket");
    s.set_reuse_port(true).expect("reuseport");
    s.bind(&SocketAddr::new(fwd_ip(), port).into())
        .expect("forwarder bind");
    s.into()
}

/// One forwarder thread: its own SO_REUSEPORT socket on the port, its own relay sockets. It
/// uses neither GRO nor GSO: the plain batched reference.
fn forwarder_shard(front: UdpSocket) {
    let sref = socket2::SockRef::from(&front);
    let _ = sref.set_recv_buffer_size(4 << 20);
    let _ = sref.set_send_buffer_size(4 << 20);
    let state = UdpSocketState::new((&front).into()).expect("state");
    set_gro(&front, false);
    front.set_nonblocking(true).expect("nonblocking");
    let mut front = mio::net::UdpSocket::from_std(front);
    let mut poll = Poll::new().expect("poll");
    poll.registry()
        .register(&mut front, Token(usize::MAX), Interest::READABLE)
        .expect("register");
    // client -> relay index; relay index -> (socket, client, peer)
    let mut by_client: HashMap<SocketAddr, usize> = HashMap::new();
    let mut relays: Vec<(mio::net::UdpSocket, SocketAddr, Option<SocketAddr>)> = Vec::new();
    let mut ev = Events::with_capacity(1024);
    let mut rb = RecvBatch::new(2048);
    let mut to_clients = SendQueue::new(2048);
    let mut to_peer = SendQueue::new(2048);
    to_clients.set_gso(false);
    to_peer.set_gso(false);
    let peer: SocketAddr = std::env::var("FWD_PEER")
        .ok()
        .and_then(|s| s.parse().ok())
        .expect("FWD_PEER");
    loop {
        let _ = poll.poll(&mut ev, None);
        for e in ev.iter() {
            let t = e.token().0;
            if t == usize::MAX {
                while let Ok(got) = rb.recv(&state, &front) {
                    for (d, from, _) in rb.iter() {
                        if d.len() < 4 {
                            continue;
                        }
                        let i = *by_client.entry(from).or_insert_with(|| {
                            let s = UdpSocket::bind((fwd_ip(), 0)).expect("relay bind");
                            s.set_nonblocking(true).expect("nb");
                            let mut s = mio::net::UdpSocket::from_std(s);
                            poll.registry()
                                .register(&mut s, Token(relays.len()), Interest::READABLE)
                                .expect("register");
                            relays.push((s, from, Some(peer)));
                            relays.len() - 1
                        });
                        let (s, _, p) = &relays[i];
                        if let Some(p) = p {
                            to_peer.push(&d[4..], *p, None);
                            to_peer.flush(s);
                        }
                    }
                    // A short batch means the socket is empty: no extra failing syscall.
                    if got < RECV_BATCH {
                        break;
                    }
                }
            } else if let Some((s, client, _)) = relays.get(t) {
                while let Ok(got) = rb.recv(&state, s) {
                    for (d, _, _) in rb.iter() {
                        if to_clients.is_full() {
                            to_clients.flush(&front);
                        }
                        if let Some(slot) = to_clients.slot_mut() {
                            let n = d.len().min(slot.len() - 4);
                            slot[0..2].copy_from_slice(&0x4000u16.to_be_bytes());
                            slot[2..4].copy_from_slice(&(n as u16).to_be_bytes());
                            slot[4..4 + n].copy_from_slice(&d[..n]);
                            to_clients.commit(4 + n, *client, None);
                        }
                    }
                    if got < RECV_BATCH {
                        break;
                    }
                }
            }
        }
        to_clients.flush(&front);
    }
}

// ---------------------------------------------------------------------------------------------
// Minimal forwarder: the physical limit. One socket towards the clients, one towards the
// peer, batches of 32 recvmmsg/sendmmsg, one thread, no GRO or GSO, and none of a TURN
// relay's per-client sockets. The peer's answers are told apart by the flow index the load
// generator writes into each payload (bytes 8..12 after the ChannelData header), a table
// lookup like a relay's.

fn minimal(port: u16) {
    let front = reuseport_bind(port);
    let back = UdpSocket::bind((fwd_ip(), 0)).expect("back bind");
    for s in [&front, &back] {
        let r = socket2::SockRef::from(s);
        let _ = r.set_recv_buffer_size(4 << 20);
        let _ = r.set_send_buffer_size(4 << 20);
        s.set_nonblocking(true).expect("nonblocking");
    }
    let state = UdpSocketState::new((&front).into()).expect("state");
    set_gro(&front, false);
    set_gro(&back, false);
    let peer: SocketAddr = std::env::var("FWD_PEER")
        .ok()
        .and_then(|s| s.parse().ok())
        .expect("FWD_PEER");
    let mut front = mio::net::UdpSocket::from_std(front);
    let mut back = mio::net::UdpSocket::from_std(back);
    let mut poll = Poll::new().expect("poll");
    poll.registry()
        .register(&mut front, Token(0), Interest::READABLE)
        .expect("register");
    poll.registry()
        .register(&mut back, Token(1), Interest::READABLE)
        .expect("register");
    let mut clients: Vec<Option<SocketAddr>> = Vec::new();
    let mut ev = Events::with_capacity(8);
    let mut rb = RecvBatch::new(2048);
    let mut to_clients = SendQueue::new(2048);
    let mut to_peer = SendQueue::new(2048);
    to_clients.set_gso(false);
    to_peer.set_gso(false);
    let flow = |d: &[u8]| -> Option<usize> {
        d.get(8..12)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    loop {
        let _ = poll.poll(&mut ev, None);
        // Each ready socket until a short batch says it is drained (edge-triggered readiness).
        let mut more = [false; 2];
        for e in ev.iter() {
            more[e.token().0 & 1] = true;
        }
        while more[0] || more[1] {
            if more[0] {
                more[0] = false;
                if let Ok(got) = rb.recv(&state, &front) {
                    more[0] = got == RECV_BATCH;
                    for (d, from, _) in rb.iter() {
                        let Some(i) = d.get(4..).and_then(flow).filter(|i| *i < 1 << 16) else {
                            continue;
                        };
                        if clients.len() <= i {
                            clients.resize(i + 1, None);
                        }
                        clients[i] = Some(from);
                        if to_peer.is_full() {
                            to_peer.flush(&back);
                        }
                        to_peer.push(&d[4..], peer, None);
                    }
                    to_peer.flush(&back);
                }
            }
            if more[1] {
                more[1] = false;
                if let Ok(got) = rb.recv(&state, &back) {
                    more[1] = got == RECV_BATCH;
                    for (d, _, _) in rb.iter() {
                        let Some(Some(client)) = flow(d).and_then(|i| clients.get(i)) else {
                            continue;
                        };
                        if to_clients.is_full() {
                            to_clients.flush(&front);
                        }
                        if let Some(slot) = to_clients.slot_mut() {
                            let n = d.len().min(slot.len() - 4);
                            slot[0..2].copy_from_slice(&0x4000u16.to_be_bytes());
                            slot[2..4].copy_from_slice(&(n as u16).to_be_bytes());
                            slot[4..4 + n].copy_from_slice(&d[..n]);
                            to_clients.commit(4 + n, *client, None);
                        }
                    }
                    to_clients.flush(&front);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// TURN client (long-term credentials over REST usernames).

pub(crate) struct Session {
    pub(crate) sock: UdpSocket,
    user: String,
    key: [u8; 16],
    nonce: Vec<u8>,
    realm: Vec<u8>,
}

fn tid() -> [u8; 12] {
    rand::random()
}

fn rest_user(i: usize) -> (String, String) {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        + 3600;
    let user = format!("{exp}:b{i}");
    let pass = switchboard::auth::rest_password(SECRET.as_bytes(), &user);
    (user, pass)
}

/// One request/response on a blocking socket with retransmissions.
fn transact(sock: &UdpSocket, req: &[u8], want_tid: &[u8; 12], buf: &mut [u8]) -> Option<usize> {
    for _ in 0..4 {
        sock.send(req).ok()?;
        let until = Instant::now() + Duration::from_millis(500);
        while Instant::now() < until {
            match sock.recv(buf) {
                Ok(n) => {
                    if let Ok(m) = Message::parse(&buf[..n]) {
                        if &m.transaction_id() == want_tid {
                            return Some(n);
                        }
                    }
                }
                Err(_) => break,
            }
        }
    }
    None
}

fn error_code(m: &Message<'_>) -> Option<u16> {
    m.get(attr::ERROR_CODE)
        .filter(|v| v.len() >= 4)
        .map(|v| (v[2] & 7) as u16 * 100 + v[3] as u16)
}

fn signed(s: &Session, meth: u16, t: &[u8; 12], f: impl FnOnce(&mut Encoder<'_>)) -> Vec<u8> {
    signed_by(&s.user, &s.key, &s.realm, &s.nonce, meth, t, f)
}

fn signed_by(
    user: &str,
    key: &[u8; 16],
    realm: &[u8],
    nonce: &[u8],
    meth: u16,
    t: &[u8; 12],
    f: impl FnOnce(&mut Encoder<'_>),
) -> Vec<u8> {
    let mut out = Vec::with_capacity(200);
    let mut e = Encoder::new(&mut out, meth, Class::Request, t);
    f(&mut e);
    e.attr(attr::USERNAME, user.as_bytes());
    e.attr(attr::REALM, realm);
    e.attr(attr::NONCE, nonce);
    e.integrity(key);
    e.finish_with_fingerprint();
    out
}

/// Allocate on `server` with the two-round long-term auth exchange. A 437 means the kernel
/// gave this client socket a port whose 5-tuple still has an allocation (a server may keep a
/// deleted one for a while): take another socket.
pub(crate) fn allocate(server: SocketAddr, i: usize) -> Result<Session, String> {
    let mut last = String::new();
    let mut held = Vec::new();
    for _ in 0..8 {
        match allocate_once(server, i) {
            Ok(s) => return Ok(s),
            Err((e, Some(sock))) => {
                last = e;
                held.push(sock);
            }
            Err((e, None)) => return Err(e),
        }
    }
    Err(last)
}

type AllocErr = (String, Option<UdpSocket>);

fn allocate_once(server: SocketAddr, i: usize) -> Result<Session, AllocErr> {
    let err = |e: String| (e, None);
    let sock = UdpSocket::bind((client_ip(), 0)).map_err(|e| err(e.to_string()))?;
    sock.connect(server).map_err(|e| err(e.to_string()))?;
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(|e| err(e.to_string()))?;
    let (user, pass) = rest_user(i);
    let mut buf = vec![0u8; 2048];
    let t = tid();
    let mut req = Vec::new();
    {
        let mut e = Encoder::new(&mut req, method::ALLOCATE, Class::Request, &t);
        e.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        e.finish_with_fingerprint();
    }
    let n = transact(&sock, &req, &t, &mut buf).ok_or(err("no answer to Allocate".into()))?;
    let m = Message::parse(&buf[..n]).map_err(|e| err(e.to_string()))?;
    if error_code(&m) == Some(437) {
        return Err(("437 on a reused 5-tuple".into(), Some(sock)));
    }
    let realm = m
        .get(attr::REALM)
        .ok_or_else(|| err(format!("no REALM in {:?} {:?}", m.class(), error_code(&m))))?
        .to_vec();
    let nonce = m.get(attr::NONCE).ok_or(err("no NONCE".into()))?.to_vec();
    let realm_s = String::from_utf8_lossy(&realm).to_string();
    let key = long_term_key(&user, &realm_s, &pass);
    let s = Session {
        sock,
        user,
        key,
        nonce,
        realm,
    };
    let t = tid();
    let req = signed(&s, method::ALLOCATE, &t, |e| {
        e.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    });
    let n =
        transact(&s.sock, &req, &t, &mut buf).ok_or(err("no answer to signed Allocate".into()))?;
    let m = Message::parse(&buf[..n]).map_err(|e| err(e.to_string()))?;
    if m.class() != Class::Success {
        if error_code(&m) == Some(437) {
            return Err(("437 on a reused 5-tuple".into(), Some(s.sock)));
        }
        return Err(err(format!("Allocate refused: {:?}", error_code(&m))));
    }
    Ok(s)
}

pub(crate) fn channel_bind(s: &Session, peer: SocketAddr) -> Result<(), String> {
    let t = tid();
    let req = signed(s, method::CHANNEL_BIND, &t, |e| {
        e.u32_attr(attr::CHANNEL_NUMBER, 0x4000 << 16);
        e.xor_address(attr::XOR_PEER_ADDRESS, peer);
    });
    let mut buf = vec![0u8; 2048];
    let n = transact(&s.sock, &req, &t, &mut buf).ok_or("no answer to ChannelBind")?;
    let m = Message::parse(&buf[..n]).map_err(|e| e.to_string())?;
    if m.class() != Class::Success {
        return Err(format!("ChannelBind refused: {:?}", error_code(&m)));
    }
    Ok(())
}

pub(crate) fn release(s: &Session) {
    let t = tid();
    let req = signed(s, method::REFRESH, &t, |e| {
        e.u32_attr(attr::LIFETIME, 0);
    });
    let mut buf = vec![0u8; 2048];
    let _ = transact(&s.sock, &req, &t, &mut buf);
}

/// Allocate `n` sessions with `threads` concurrent clients; returns them and the seconds taken.
fn allocate_many(
    server: SocketAddr,
    n: usize,
    base: usize,
    threads: usize,
) -> Result<(Vec<Session>, f64), String> {
    let start = Instant::now();
    let per = n.div_ceil(threads);
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            std::thread::spawn(move || {
                let mut v = Vec::new();
                for i in t * per..((t + 1) * per).min(n) {
                    v.push(allocate(server, base + i)?);
                }
                Ok::<_, String>(v)
            })
        })
        .collect();
    let mut all = Vec::with_capacity(n);
    for h in handles {
        all.extend(h.join().map_err(|_| "allocator panicked")??);
    }
    Ok((all, start.elapsed().as_secs_f64()))
}

fn release_many(sessions: Vec<Session>, threads: usize) {
    let per = sessions.len().div_ceil(threads).max(1);
    let mut chunks: Vec<Vec<Session>> = Vec::new();
    let mut it = sessions.into_iter().peekable();
    while it.peek().is_some() {
        chunks.push(it.by_ref().take(per).collect());
    }
    let hs: Vec<_> = chunks
        .into_iter()
        .map(|c| std::thread::spawn(move || c.iter().for_each(release)))
        .collect();
    for h in hs {
        let _ = h.join();
    }
}

// ---------------------------------------------------------------------------------------------
// Paced ChannelData traffic.

#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Traffic {
    pub(crate) sent: u64,
    pub(crate) to_peer: u64,
    pub(crate) back: u64,
}

/// Send `rate` evenly paced ChannelData packets per second spread over `socks` for `secs`
/// (benches/soak.rs's load).
#[allow(dead_code)]
pub(crate) fn traffic(
    socks: &[UdpSocket],
    echo: &Echo,
    rate: u64,
    secs: f64,
    size: usize,
) -> Traffic {
    traffic_load(socks, echo, Load::Paced { rate, size }, secs)
}

/// Send `load`'s ChannelData packets over `socks` for `secs`, count what the echo peer and
/// the clients receive. Each payload starts with a sequence number and the flow's index (the
/// minimal forwarder's routing key). The video-like load sends each frame as one GSO message
/// where the kernel has GSO, and reads with GRO, as clients' kernels and NICs would.
fn traffic_load(socks: &[UdpSocket], echo: &Echo, load: Load, secs: f64) -> Traffic {
    let video = matches!(load, Load::Video(_));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let back = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    // Receiver: all client sockets in one poll, batched reads.
    let clones: Vec<UdpSocket> = socks
        .iter()
        .map(|s| s.try_clone().expect("clone"))
        .collect();
    let (st, bk) = (stop.clone(), back.clone());
    let rx = std::thread::Builder::new()
        .name("rx".into())
        .spawn(move || {
            let mut poll = Poll::new().expect("poll");
            let state = UdpSocketState::new((&clones[0]).into()).expect("state");
            let mut ms: Vec<mio::net::UdpSocket> = clones
                .into_iter()
                .map(|s| {
                    s.set_nonblocking(true).expect("nb");
                    mio::net::UdpSocket::from_std(s)
                })
                .collect();
            for (i, s) in ms.iter_mut().enumerate() {
                poll.registry()
                    .register(s, Token(i), Interest::READABLE)
                    .expect("register");
            }
            if video {
                for s in &ms {
                    set_gro(s, true);
                }
            }
            let mut ev = Events::with_capacity(1024);
            let mut rb = RecvBatch::new(GRO_BUF);
            let mut n = 0u64;
            // Read what is already queued, then follow readiness.
            for s in &ms {
                while rb.recv(&state, s).is_ok() {
                    n += rb.iter().count() as u64;
                }
            }
            while !st.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = poll.poll(&mut ev, Some(Duration::from_millis(20)));
                for e in ev.iter() {
                    let s = &ms[e.token().0];
                    while let Ok(got) = rb.recv(&state, s) {
                        n += rb.iter().count() as u64;
                        if got < RECV_BATCH {
                            break;
                        }
                    }
                }
                bk.store(n, std::sync::atomic::Ordering::Relaxed);
            }
            bk.store(n, std::sync::atomic::Ordering::Relaxed);
        })
        .expect("spawn rx");
    let echo0 = echo.received();
    let size = match load {
        Load::Paced { size, .. } => size,
        Load::Video(v) => v.size,
    };
    let mut payload = vec![0u8; 4 + size.max(12)];
    let mut queues: Vec<SendQueue> = socks
        .iter()
        .map(|_| {
            let mut q = SendQueue::new(4 + size.max(12));
            q.set_gso(video);
            q
        })
        .collect();
    let peers: Vec<SocketAddr> = socks
        .iter()
        .map(|s| s.peer_addr().expect("connected"))
        .collect();
    let start = Instant::now();
    let tick = Duration::from_micros(500);
    let mut sent = 0u64;
    let mut next = start;
    let mut put = |q: &mut SendQueue, flow: usize, seq: u64, len: usize| {
        payload[0..2].copy_from_slice(&0x4000u16.to_be_bytes());
        payload[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        payload[4..12].copy_from_slice(&seq.to_be_bytes());
        payload[12..16].copy_from_slice(&(flow as u32).to_be_bytes());
        q.push(&payload[..4 + len], peers[flow], None);
    };
    match load {
        Load::Paced { rate, size } => {
            let total = (rate as f64 * secs) as u64;
            let mut rr = 0usize;
            while sent < total {
                let due = ((start.elapsed().as_secs_f64() * rate as f64) as u64).min(total);
                while sent < due {
                    let i = rr % socks.len();
                    rr += 1;
                    if queues[i].is_full() {
                        queues[i].flush(&socks[i]);
                    }
                    put(&mut queues[i], i, sent, size.max(12));
                    sent += 1;
                }
                for (q, s) in queues.iter_mut().zip(socks) {
                    if !q.is_empty() {
                        q.flush(s);
                    }
                }
                next += tick;
                let now = Instant::now();
                if next > now {
                    std::thread::sleep(next - now);
                }
            }
        }
        Load::Video(v) => {
            // Flows start spread over one frame interval, then keep their own cadence.
            let interval = Duration::from_secs_f64(1.0 / v.fps.max(1) as f64);
            let frames = ((secs * v.fps as f64) as u64).max(1);
            let n = socks.len();
            let mut due: Vec<Instant> = (0..n)
                .map(|i| start + interval.mul_f64(i as f64 / n as f64))
                .collect();
            let mut done = vec![0u64; n];
            while done.iter().any(|d| *d < frames) {
                let now = Instant::now();
                for i in 0..n {
                    while done[i] < frames && due[i] <= now {
                        for k in 0..v.pkts {
                            let len = if k + 1 == v.pkts && v.pkts > 1 {
                                v.last_size()
                            } else {
                                v.size
                            };
                            if queues[i].is_full() {
                                queues[i].flush(&socks[i]);
                            }
                            put(&mut queues[i], i, sent, len);
                            sent += 1;
                        }
                        queues[i].flush(&socks[i]);
                        done[i] += 1;
                        due[i] += interval;
                    }
                }
                next += tick;
                let now = Instant::now();
                if next > now {
                    std::thread::sleep(next - now);
                }
            }
        }
    }
    // Drain: wait until nothing new arrives for 300 ms.
    let mut last = (0, 0);
    for _ in 0..40 {
        std::thread::sleep(Duration::from_millis(100));
        let now = (
            echo.received(),
            back.load(std::sync::atomic::Ordering::Relaxed),
        );
        if now == last && now.1 >= sent {
            break;
        }
        if now == last {
            std::thread::sleep(Duration::from_millis(200));
            let again = (
                echo.received(),
                back.load(std::sync::atomic::Ordering::Relaxed),
            );
            if again == now {
                break;
            }
        }
        last = now;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = rx.join();
    Traffic {
        sent,
        to_peer: echo.received() - echo0,
        back: back.load(std::sync::atomic::Ordering::Relaxed),
    }
}

// ---------------------------------------------------------------------------------------------
// TURN over TCP and TLS clients: the control exchange and ChannelData framed on the stream
// (RFC 8656 §12.5: padded to 4 bytes), with a UDP relay towards the peer.

/// A blocking client connection, for the allocation exchange.
enum Conn {
    Tcp(std::net::TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>>),
}

impl std::io::Read for Conn {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(b),
            Conn::Tls(s) => s.read(b),
        }
    }
}

impl std::io::Write for Conn {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(b),
            Conn::Tls(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Tcp(s) => s.flush(),
            Conn::Tls(s) => s.flush(),
        }
    }
}

/// A client config that trusts the bench's self-signed certificate.
fn tls_client(cert: &str) -> Result<std::sync::Arc<rustls::ClientConfig>, String> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(cert).map_err(|e| e.to_string())? {
        roots
            .add(c.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(std::sync::Arc::new(cfg))
}

/// Bytes a frame at the head of `b` takes on the stream (STUN message, or ChannelData with
/// its padding), once its 4-byte head is there.
fn frame_len(b: &[u8]) -> Option<usize> {
    let len = u16::from_be_bytes([*b.get(2)?, *b.get(3)?]) as usize;
    Some(if b[0] & 0xC0 == 0x40 {
        4 + len.div_ceil(4) * 4
    } else {
        20 + len
    })
}

/// Read one whole frame into `buf`.
fn read_frame(c: &mut Conn, buf: &mut Vec<u8>) -> std::io::Result<()> {
    use std::io::Read;
    buf.resize(4, 0);
    c.read_exact(&mut buf[..4])?;
    let n = frame_len(buf).unwrap_or(4);
    buf.resize(n, 0);
    c.read_exact(&mut buf[4..])
}

/// One request and its answer on a stream (no retransmissions: the stream is reliable).
fn stream_transact(c: &mut Conn, req: &[u8], want: &[u8; 12]) -> Result<Vec<u8>, String> {
    use std::io::Write;
    c.write_all(req).map_err(|e| e.to_string())?;
    c.flush().map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    for _ in 0..16 {
        read_frame(c, &mut buf).map_err(|e| e.to_string())?;
        if let Ok(m) = Message::parse(&buf) {
            if &m.transaction_id() == want {
                return Ok(buf);
            }
        }
    }
    Err("no answer on the stream".into())
}

/// Connect over `transport` (TLS: to the server's TLS address), Allocate a UDP relay and bind
/// channel 0x4000 to `peer`.
fn stream_allocate(
    s: &Server,
    transport: Transport,
    tls: Option<&std::sync::Arc<rustls::ClientConfig>>,
    i: usize,
    peer: SocketAddr,
) -> Result<Conn, String> {
    let addr = match transport {
        Transport::Tls => s.tls.ok_or("no TLS listener")?,
        _ => s.addr,
    };
    let tcp = std::net::TcpStream::connect(addr).map_err(|e| format!("{addr}: {e}"))?;
    tcp.set_nodelay(true).ok();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).ok();
    let mut c = match (transport, tls) {
        (Transport::Tls, Some(cfg)) => {
            let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
            let conn = rustls::ClientConnection::new(cfg.clone(), name.to_owned())
                .map_err(|e| e.to_string())?;
            Conn::Tls(Box::new(rustls::StreamOwned::new(conn, tcp)))
        }
        _ => Conn::Tcp(tcp),
    };
    let (user, pass) = rest_user(i);
    let t = tid();
    let mut req = Vec::new();
    {
        let mut e = Encoder::new(&mut req, method::ALLOCATE, Class::Request, &t);
        e.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        e.finish_with_fingerprint();
    }
    let ans = stream_transact(&mut c, &req, &t)?;
    let m = Message::parse(&ans).map_err(|e| e.to_string())?;
    let realm = m.get(attr::REALM).ok_or("no REALM")?.to_vec();
    let nonce = m.get(attr::NONCE).ok_or("no NONCE")?.to_vec();
    let key = long_term_key(&user, &String::from_utf8_lossy(&realm), &pass);
    let t = tid();
    let req = signed_by(&user, &key, &realm, &nonce, method::ALLOCATE, &t, |e| {
        e.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    });
    let ans = stream_transact(&mut c, &req, &t)?;
    let m = Message::parse(&ans).map_err(|e| e.to_string())?;
    if m.class() != Class::Success {
        return Err(format!("Allocate refused: {:?}", error_code(&m)));
    }
    let t = tid();
    let req = signed_by(&user, &key, &realm, &nonce, method::CHANNEL_BIND, &t, |e| {
        e.u32_attr(attr::CHANNEL_NUMBER, 0x4000 << 16);
        e.xor_address(attr::XOR_PEER_ADDRESS, peer);
    });
    let ans = stream_transact(&mut c, &req, &t)?;
    let m = Message::parse(&ans).map_err(|e| e.to_string())?;
    if m.class() != Class::Success {
        return Err(format!("ChannelBind refused: {:?}", error_code(&m)));
    }
    Ok(c)
}

/// A client stream during the traffic phase: non-blocking, frames queued and read in bulk.
struct Live {
    sock: mio::net::TcpStream,
    tls: Option<rustls::ClientConnection>,
    out: Vec<u8>,
    inb: Vec<u8>,
}

impl Live {
    fn new(c: Conn) -> Live {
        let (sock, tls) = match c {
            Conn::Tcp(s) => (s, None),
            Conn::Tls(b) => {
                let rustls::StreamOwned { mut conn, sock } = *b;
                conn.set_buffer_limit(None);
                (sock, Some(conn))
            }
        };
        sock.set_nonblocking(true).expect("nonblocking");
        Live {
            sock: mio::net::TcpStream::from_std(sock),
            tls,
            out: Vec::new(),
            inb: Vec::new(),
        }
    }

    fn queue(&mut self, frame: &[u8]) {
        use std::io::Write;
        match &mut self.tls {
            Some(t) => {
                let _ = t.writer().write_all(frame);
            }
            None => self.out.extend_from_slice(frame),
        }
    }

    /// Write what the socket takes now.
    fn flush(&mut self) {
        use std::io::Write;
        match &mut self.tls {
            Some(t) => {
                while t.wants_write() {
                    match t.write_tls(&mut self.sock) {
                        Ok(n) if n > 0 => {}
                        _ => break,
                    }
                }
            }
            None => {
                let mut at = 0;
                while at < self.out.len() {
                    match self.sock.write(&self.out[at..]) {
                        Ok(n) if n > 0 => at += n,
                        _ => break,
                    }
                }
                self.out.drain(..at);
            }
        }
    }

    /// Read everything there is; returns the ChannelData frames completed.
    fn read(&mut self, tmp: &mut [u8]) -> u64 {
        use std::io::Read;
        match &mut self.tls {
            Some(t) => loop {
                match t.read_tls(&mut self.sock) {
                    Ok(n) if n > 0 => {
                        if t.process_new_packets().is_err() {
                            break;
                        }
                        while let Ok(n) = t.reader().read(tmp) {
                            if n == 0 {
                                break;
                            }
                            self.inb.extend_from_slice(&tmp[..n]);
                        }
                    }
                    _ => break,
                }
            },
            None => {
                while let Ok(n) = self.sock.read(tmp) {
                    if n == 0 {
                        break;
                    }
                    self.inb.extend_from_slice(&tmp[..n]);
                }
            }
        }
        let mut at = 0;
        let mut frames = 0;
        while let Some(n) = frame_len(&self.inb[at..]) {
            if self.inb.len() - at < n {
                break;
            }
            if self.inb[at] & 0xC0 == 0x40 {
                frames += 1;
            }
            at += n;
        }
        self.inb.drain(..at);
        frames
    }
}

/// [`traffic_load`] over streams: ChannelData frames padded to 4 bytes on each client's
/// connection, one thread sending and reading all of them.
fn stream_traffic(conns: Vec<Conn>, echo: &Echo, load: Load, secs: f64) -> Traffic {
    let mut lives: Vec<Live> = conns.into_iter().map(Live::new).collect();
    let mut poll = Poll::new().expect("poll");
    for (i, l) in lives.iter_mut().enumerate() {
        poll.registry()
            .register(
                &mut l.sock,
                Token(i),
                Interest::READABLE | Interest::WRITABLE,
            )
            .expect("register");
    }
    let mut ev = Events::with_capacity(1024);
    let mut tmp = vec![0u8; 1 << 16];
    let echo0 = echo.received();
    let mut back = 0u64;
    let size = match load {
        Load::Paced { size, .. } => size,
        Load::Video(v) => v.size,
    }
    .max(12);
    let mut frame = vec![0u8; 4 + size + 3];
    let mut put = |l: &mut Live, flow: usize, seq: u64, len: usize| {
        frame[0..2].copy_from_slice(&0x4000u16.to_be_bytes());
        frame[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        frame[4..12].copy_from_slice(&seq.to_be_bytes());
        frame[12..16].copy_from_slice(&(flow as u32).to_be_bytes());
        l.queue(&frame[..4 + len.div_ceil(4) * 4]);
    };
    let n = lives.len();
    let start = Instant::now();
    let tick = Duration::from_micros(500);
    let mut next = start;
    let mut sent = 0u64;
    let mut rr = 0usize;
    let (total, interval, frames) = match load {
        Load::Paced { rate, .. } => ((rate as f64 * secs) as u64, Duration::ZERO, 0),
        Load::Video(v) => {
            let frames = ((secs * v.fps as f64) as u64).max(1);
            (
                frames * v.pkts as u64 * n as u64,
                Duration::from_secs_f64(1.0 / v.fps.max(1) as f64),
                frames,
            )
        }
    };
    let mut due: Vec<Instant> = (0..n)
        .map(|i| start + interval.mul_f64(i as f64 / n as f64))
        .collect();
    let mut done = vec![0u64; n];
    let mut quiet_since: Option<(Instant, u64, u64)> = None;
    loop {
        let now = Instant::now();
        if sent < total {
            match load {
                Load::Paced { rate, .. } => {
                    let want = ((start.elapsed().as_secs_f64() * rate as f64) as u64).min(total);
                    while sent < want {
                        let i = rr % n;
                        rr += 1;
                        put(&mut lives[i], i, sent, size);
                        sent += 1;
                    }
                }
                Load::Video(v) => {
                    for i in 0..n {
                        while done[i] < frames && due[i] <= now {
                            for k in 0..v.pkts {
                                let len = if k + 1 == v.pkts && v.pkts > 1 {
                                    v.last_size()
                                } else {
                                    v.size
                                };
                                put(&mut lives[i], i, sent, len);
                                sent += 1;
                            }
                            done[i] += 1;
                            due[i] += interval;
                        }
                    }
                }
            }
            for l in &mut lives {
                l.flush();
            }
        } else {
            // Drain: until nothing new arrives for 300 ms (4 s at most).
            let seen = (echo.received(), back);
            match quiet_since {
                Some((t, a, b)) if (a, b) == seen => {
                    if t.elapsed() > Duration::from_millis(300)
                        || (b >= sent && t.elapsed() > Duration::from_millis(100))
                    {
                        break;
                    }
                }
                _ => quiet_since = Some((now, seen.0, seen.1)),
            }
            if start.elapsed() > Duration::from_secs_f64(secs + 4.0) {
                break;
            }
        }
        next += tick;
        let now = Instant::now();
        if next < now {
            next = now;
        }
        // Read (and finish writes) until the next tick.
        loop {
            let left = next.saturating_duration_since(Instant::now());
            let _ = poll.poll(&mut ev, Some(left));
            for e in ev.iter() {
                let l = &mut lives[e.token().0];
                if e.is_readable() {
                    back += l.read(&mut tmp);
                }
                if e.is_writable() {
                    l.flush();
                }
            }
            if Instant::now() >= next {
                break;
            }
        }
    }
    Traffic {
        sent,
        to_peer: echo.received() - echo0,
        back,
    }
}

// ---------------------------------------------------------------------------------------------
// Servers under test.

struct Server {
    name: String,
    addr: SocketAddr,
    child: Child,
    turn: bool,
    /// Its TURN-over-TLS address, when the run's transport is TLS.
    tls: Option<SocketAddr>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn free_port() -> u16 {
    // Bind UDP and TCP on the same port so both servers' listeners fit.
    for _ in 0..64 {
        let u = UdpSocket::bind((client_ip(), 0)).expect("bind");
        let p = u.local_addr().expect("addr").port();
        if std::net::TcpListener::bind((client_ip(), p)).is_ok() {
            return p;
        }
    }
    panic!("no free port");
}

pub(crate) fn wait_udp(addr: SocketAddr, turn: bool) -> bool {
    let s = UdpSocket::bind((client_ip(), 0)).expect("bind");
    s.set_read_timeout(Some(Duration::from_millis(100))).ok();
    let mut buf = [0u8; 1500];
    for _ in 0..100 {
        let t = tid();
        let mut req = Vec::new();
        if turn {
            Encoder::new(&mut req, method::BINDING, Class::Request, &t).finish();
        } else {
            req.extend_from_slice(&[0x40, 0, 0, 0]);
        }
        if turn {
            let _ = s.send_to(&req, addr);
            if s.recv_from(&mut buf).is_ok() {
                return true;
            }
        } else {
            // The bare forwarder answers nothing; it is up once its port is taken (in the
            // lab its namespace is another: give it a moment).
            if lab().is_some() {
                std::thread::sleep(Duration::from_millis(500));
                return true;
            }
            if UdpSocket::bind(addr).is_err() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    false
}

/// One of this tool's own forwarders (`bare` or `minimal`, run as `--forwarder`/`--minimal`
/// of this executable), relaying to `peer`.
fn start_forwarder(kind: &str, peer: SocketAddr, dir: &std::path::Path) -> Server {
    let port = free_port();
    let log = std::fs::File::create(dir.join(format!("{kind}.log"))).expect("log");
    let exe = std::env::current_exe().expect("exe");
    let flag = if kind == "minimal" {
        "--minimal"
    } else {
        "--forwarder"
    };
    let child = server_cmd(&exe.to_string_lossy())
        .args([flag, &port.to_string()])
        .env("FWD_PEER", peer.to_string())
        .env("FWD_IP", server_ip().to_string())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn forwarder");
    let addr = SocketAddr::new(server_ip(), port);
    wait_udp(addr, false);
    Server {
        name: kind.into(),
        addr,
        child,
        turn: false,
        tls: None,
    }
}

/// A self-signed certificate for 127.0.0.1 (TURN over TLS), made by `openssl`: (cert, key).
fn make_cert(dir: &std::path::Path) -> Result<(String, String), String> {
    let cert = dir.join("bench.crt");
    let key = dir.join("bench.key");
    let st = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
        .args(["-subj", "/CN=localhost", "-addext"])
        .args(["subjectAltName=DNS:localhost,IP:127.0.0.1,IP:203.0.113.10"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .map_err(|e| format!("openssl: {e}"))?;
    if !st.success() {
        return Err("openssl could not make a certificate".into());
    }
    Ok((
        cert.to_string_lossy().to_string(),
        key.to_string_lossy().to_string(),
    ))
}

/// coturn; with `tls` (cert, key) also TURN over TLS on a port of its own (plain TCP is on
/// the main port either way).
fn start_coturn(dir: &std::path::Path, tls: Option<&(String, String)>) -> Result<Server, String> {
    let port = free_port();
    let log = dir.join("coturn.log");
    let ip = server_ip().to_string();
    let tls_port = tls.map(|_| free_port());
    let tls_args: Vec<String> = match (tls, tls_port) {
        (Some((cert, key)), Some(p)) => vec![
            "--tls-listening-port".into(),
            p.to_string(),
            format!("--cert={cert}"),
            format!("--pkey={key}"),
        ],
        _ => vec!["--no-tls".into()],
    };
    let child = server_cmd("turnserver")
        .args(&tls_args)
        .args([
            "-n",
            "--no-dtls",
            "--no-cli",
            "--no-tcp-relay",
            "--listening-ip",
            &ip,
            "--relay-ip",
            &ip,
            "-p",
            &port.to_string(),
            "--use-auth-secret",
            &format!("--static-auth-secret={SECRET}"),
            "-r",
            REALM,
            "--allow-loopback-peers",
            "--min-port",
            "49152",
            "--max-port",
            "65535",
            "--no-stdout-log",
            "--simple-log",
            &format!("--log-file={}", log.display()),
            &format!("--pidfile={}", dir.join("coturn.pid").display()),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("turnserver: {e} (install coturn)"))?;
    let addr = SocketAddr::new(server_ip(), port);
    if !wait_udp(addr, true) {
        return Err("coturn did not answer".into());
    }
    Ok(Server {
        name: "coturn".into(),
        addr,
        child,
        turn: true,
        tls: tls_port.map(|p| SocketAddr::new(server_ip(), p)),
    })
}

/// switchboard, with `turn.kernel_offload = "on"` when `offload`.
fn start_switchboard(
    o: &Opts,
    dir: &std::path::Path,
    offload: bool,
    tls: Option<&(String, String)>,
) -> Result<Server, String> {
    let name = if offload {
        "switchboard-offload"
    } else {
        "switchboard"
    };
    let bin = o.bin.clone().unwrap_or_else(|| {
        let exe = std::env::current_exe().expect("exe");
        // target/release/deps/relay_load-… → target/release/switchboard
        exe.parent()
            .and_then(|p| p.parent())
            .map(|p| p.join("switchboard").to_string_lossy().to_string())
            .unwrap_or_default()
    });
    let port = free_port();
    let http = free_port();
    let shards = o
        .shards
        .map(|n| format!("shards = {n}\n"))
        .unwrap_or_default();
    let ip = server_ip();
    let mode = if offload { "on" } else { "off" };
    // The default login backend is refused off loopback; the lab is namespaces only.
    let open = if lab().is_some() {
        "allow_open_on_public = true\n"
    } else {
        ""
    };
    let tls_port = tls.map(|_| free_port());
    let (tls_listen, tls_files) = match (tls, tls_port) {
        (Some((cert, key)), Some(p)) => (
            format!("tls_listen = [\"{ip}:{p}\"]\n"),
            format!("[tls]\ncert_file = \"{cert}\"\nkey_file = \"{key}\"\n"),
        ),
        _ => (String::new(), String::new()),
    };
    let cfg = format!(
        "[turn]\nlisten = [\"{ip}:{port}\"]\nrealm = \"{REALM}\"\nkernel_offload = \"{mode}\"\n{tls_listen}\
         max_allocations_per_user = 100000\nmax_allocations = 100000\n\
         relay_port_min = 20000\nrelay_port_max = 32000\n{shards}\
         [http]\nlisten = \"{ip}:{http}\"\n[log]\nlevel = \"warn\"\n\
         [auth]\nturn_secrets = [\"{SECRET}\"]\n{open}{tls_files}"
    );
    let path = dir.join(format!("{name}-{port}.toml"));
    std::fs::write(&path, cfg).map_err(|e| e.to_string())?;
    let log_path = dir.join(format!("{name}-{port}.log"));
    let log = std::fs::File::create(&log_path).map_err(|e| e.to_string())?;
    let child = server_cmd(&bin)
        .arg("--config")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("{bin}: {e} (run `cargo build --release` first)"))?;
    let addr = SocketAddr::new(ip, port);
    if !wait_udp(addr, true) {
        return Err(format!(
            "{name} did not answer: {}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        ));
    }
    Ok(Server {
        name: name.into(),
        addr,
        child,
        turn: true,
        tls: tls_port.map(|p| SocketAddr::new(ip, p)),
    })
}

/// Sessions for the traffic phase: TURN allocations with a channel each, or plain sockets for
/// the bare forwarder.
fn setup(s: &Server, n: usize, echo: SocketAddr, base: usize) -> Result<Vec<Session>, String> {
    if !s.turn {
        return (0..n)
            .map(|_| {
                let sock = UdpSocket::bind((client_ip(), 0)).map_err(|e| e.to_string())?;
                sock.connect(s.addr).map_err(|e| e.to_string())?;
                Ok(Session {
                    sock,
                    user: String::new(),
                    key: [0; 16],
                    nonce: Vec::new(),
                    realm: Vec::new(),
                })
            })
            .collect();
    }
    let (v, _) = allocate_many(s.addr, n, base, 4)?;
    for sess in &v {
        channel_bind(sess, echo)?;
    }
    Ok(v)
}

#[derive(Debug, Clone)]
struct Row {
    server: String,
    rate: u64,
    /// The load, in words.
    label: String,
    /// Which repetition of the server list (`--repeat`).
    pairing: usize,
    t: Traffic,
    cpu: f64,
    busy: f64,
    /// CPU-seconds the whole machine used, from the idle probe (`--idle-probe`).
    used: Option<f64>,
    threads: Vec<(String, f64)>,
}

/// The summaries compare servers at one rate, so each looks its rows up the same way.
fn row_at<'a>(rows: &'a [Row], rate: u64, server: &str) -> Option<&'a Row> {
    rows.iter().find(|r| r.rate == rate && r.server == server)
}

impl Row {
    fn relayed(&self) -> u64 {
        self.t.to_peer + self.t.back
    }
    fn loss(&self) -> f64 {
        let want = 2 * self.t.sent;
        if want == 0 {
            0.0
        } else {
            (want.saturating_sub(self.relayed())) as f64 * 100.0 / want as f64
        }
    }
    /// Machine-wide busy CPU (all processes, softirq included) per relayed packet, in µs.
    fn busy_per_pkt(&self) -> f64 {
        if self.relayed() > 0 {
            self.busy * 1e6 / self.relayed() as f64
        } else {
            0.0
        }
    }
    fn per_cpu(&self) -> f64 {
        if self.cpu > 0.0 {
            self.relayed() as f64 / self.cpu
        } else {
            0.0
        }
    }
}

/// One stream-transport measurement: `o.allocs` TCP or TLS clients, each with a UDP relay.
fn measure_stream(
    s: &Server,
    echo: &Echo,
    o: &Opts,
    load: Load,
    base: usize,
    tls: Option<&std::sync::Arc<rustls::ClientConfig>>,
) -> Result<Row, String> {
    let mut conns = Vec::with_capacity(o.allocs);
    for i in 0..o.allocs {
        conns.push(stream_allocate(s, o.transport, tls, base + i, echo.addr)?);
    }
    let pid = s.child.id();
    let c0 = proc_cpu(pid);
    let m0 = machine_cpu();
    let t = stream_traffic(conns, echo, load, o.secs);
    let c1 = proc_cpu(pid);
    let m1 = machine_cpu();
    Ok(Row {
        server: s.name.clone(),
        rate: load.rate(),
        label: load.label(),
        pairing: 0,
        t,
        cpu: c1 - c0,
        busy: m1.0 - m0.0,
        used: None,
        threads: Vec::new(),
    })
}

fn measure(
    s: &Server,
    echo: &Echo,
    o: &Opts,
    load: Load,
    base: usize,
    probe: Option<&mut IdleProbe>,
) -> Result<Row, String> {
    let rate = load.rate();
    let sessions = setup(s, o.allocs, echo.addr, base)?;
    let socks: Vec<UdpSocket> = sessions
        .iter()
        .map(|x| x.sock.try_clone().expect("clone"))
        .collect();
    for x in &socks {
        x.set_nonblocking(true).ok();
    }
    let pid = s.child.id();
    // Warm-up so the first packets' relay creation (bare) is not measured.
    let warm = match load {
        Load::Paced { size, .. } => Load::Paced { rate: 2000, size },
        v => v,
    };
    let _ = traffic_load(&socks, echo, warm, 0.2);
    let mut probe = probe;
    if let Some(p) = probe.as_deref_mut() {
        // The quiet rate right before, over as long as the run: the machine drifts.
        std::thread::sleep(Duration::from_millis(300));
        p.calibrate(Duration::from_secs_f64(o.secs.min(3.0)));
    }
    let p0 = probe.as_deref().map(IdleProbe::reading);
    let th0 = thread_cpu(pid);
    let c0 = proc_cpu(pid);
    let m0 = machine_cpu();
    let t = traffic_load(&socks, echo, load, o.secs);
    let c1 = proc_cpu(pid);
    let m1 = machine_cpu();
    let used = match (probe.as_deref(), p0) {
        (Some(p), Some(p0)) => Some(p.used(p0, p.reading())),
        _ => None,
    };
    let th1 = thread_cpu(pid);
    let mut threads: Vec<(String, f64)> = th1
        .iter()
        .map(|(n, c)| {
            let before: f64 = th0.iter().filter(|x| &x.0 == n).map(|x| x.1).sum();
            let after: f64 = th1.iter().filter(|x| &x.0 == n).map(|x| x.1).sum();
            let _ = c;
            (n.clone(), after - before)
        })
        .collect();
    threads.sort_by(|a, b| a.0.cmp(&b.0));
    threads.dedup_by(|a, b| a.0 == b.0);
    threads.retain(|x| x.1 > 0.005);
    drop(socks);
    if s.turn {
        release_many(sessions, 4);
    }
    Ok(Row {
        server: s.name.clone(),
        rate,
        label: load.label(),
        pairing: 0,
        t,
        cpu: c1 - c0,
        busy: m1.0 - m0.0,
        used,
        threads,
    })
}

/// The idle probe of `--idle-probe`: one `SCHED_IDLE` spinner per CPU, counting loop turns.
struct IdleProbe {
    turns: Vec<std::sync::Arc<std::sync::atomic::AtomicU64>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Loop turns per second of all spinners on the quiet machine.
    quiet: f64,
}

impl IdleProbe {
    fn start() -> IdleProbe {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let mut turns = Vec::new();
        let mut threads = Vec::new();
        for cpu in 0..num_cpus() {
            let t = std::sync::Arc::new(AtomicU64::new(0));
            let (t2, st) = (t.clone(), stop.clone());
            turns.push(t);
            threads.push(
                std::thread::Builder::new()
                    .name(format!("idle-probe-{cpu}"))
                    .spawn(move || {
                        // SAFETY: plain syscalls on this thread with initialised arguments:
                        // a zeroed cpu_set_t with one bit set, and a sched_param whose
                        // priority 0 is the only one SCHED_IDLE takes.
                        unsafe {
                            let mut set: libc::cpu_set_t = std::mem::zeroed();
                            libc::CPU_SET(cpu, &mut set);
                            libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set);
                            let param = libc::sched_param { sched_priority: 0 };
                            libc::sched_setscheduler(0, libc::SCHED_IDLE, &param);
                        }
                        let mut x = 0u64;
                        while !st.load(Relaxed) {
                            for _ in 0..4096 {
                                x = std::hint::black_box(x.wrapping_mul(6364136223846793005) + 1);
                            }
                            t2.fetch_add(1, Relaxed);
                        }
                    })
                    .expect("spawn idle probe"),
            );
        }
        IdleProbe {
            turns,
            stop,
            threads,
            quiet: 0.0,
        }
    }

    fn total(&self) -> u64 {
        self.turns
            .iter()
            .map(|t| t.load(std::sync::atomic::Ordering::Relaxed))
            .sum()
    }

    /// Measure the quiet rate over `d` (nothing else should run).
    fn calibrate(&mut self, d: Duration) {
        let (t0, c0) = (Instant::now(), self.total());
        std::thread::sleep(d);
        self.quiet = (self.total() - c0) as f64 / t0.elapsed().as_secs_f64();
    }

    /// CPU-seconds used by everything else between two readings `(instant, turns)`.
    fn used(&self, from: (Instant, u64), to: (Instant, u64)) -> f64 {
        let secs = (to.0 - from.0).as_secs_f64();
        if self.quiet <= 0.0 || secs <= 0.0 {
            return 0.0;
        }
        let spare = (to.1 - from.1) as f64 / (self.quiet * secs);
        (num_cpus() as f64 * secs * (1.0 - spare)).max(0.0)
    }

    fn reading(&self) -> (Instant, u64) {
        (Instant::now(), self.total())
    }
}

impl Drop for IdleProbe {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The `direct` baseline: no relay, the generator's sockets talk to the echo peer itself.
fn start_direct(echo: SocketAddr) -> Result<Server, String> {
    let child = Command::new("sleep")
        .arg("100000")
        .spawn()
        .map_err(|e| e.to_string())?;
    Ok(Server {
        name: "direct".into(),
        addr: echo,
        child,
        turn: false,
        tls: None,
    })
}

/// The idle probe's table: machine CPU used per relayed packet, and each relay's cost over the
/// `direct` baseline (the load tool alone), with ratios to the bare forwarder's cost.
fn print_idle_probe(rows: &[Row], rates: &[u64]) {
    println!("machine CPU used, from the idle probe (CPUs x seconds x (1 - spare)):");
    println!();
    println!(
        "| offered each way | server | relayed | loss | machine CPU-s used | µs used / pkt | \
         relay cost µs / pkt (less direct) | relay cost / bare's |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for &rate in rates {
        let at = |n: &str| row_at(rows, rate, n);
        let direct = at("direct").and_then(|d| d.used);
        // Per relayed packet, less the baseline's CPU for the same number of packets sent.
        let cost = |r: &Row| -> Option<f64> {
            let (u, d) = (r.used?, direct?);
            let dr = at("direct")?;
            if r.relayed() == 0 || dr.t.sent == 0 {
                return None;
            }
            let base = d * r.t.sent as f64 / dr.t.sent as f64;
            Some((u - base).max(0.0) * 1e6 / r.relayed() as f64)
        };
        let bare = at("bare").and_then(cost).filter(|b| *b > 0.0);
        for r in rows.iter().filter(|r| r.rate == rate) {
            let Some(u) = r.used else { continue };
            let c = if r.server == "direct" { None } else { cost(r) };
            println!(
                "| {}k | {} | {} | {:.3}% | {:.2} | {:.2} | {} | {} |",
                rate / 1000,
                r.server,
                r.relayed(),
                r.loss(),
                u,
                if r.relayed() > 0 {
                    u * 1e6 / r.relayed() as f64
                } else {
                    0.0
                },
                c.map(|c| format!("{c:.2}")).unwrap_or("-".into()),
                match (c, bare) {
                    (Some(c), Some(b)) => format!("{:.2}", c / b),
                    _ => "-".into(),
                }
            );
        }
    }
    println!();
}

fn num_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// The median of `v` (0 when empty).
fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

fn run(o: &Opts) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    // Under --lab: the echo peer's socket in the peer's namespace, everything else this
    // process opens in the generator's (threads inherit the namespace of their creator).
    if let Some(l) = lab() {
        l.enter("peer")?;
    }
    let echo = Echo::start_with(o.video.is_some());
    if let Some(l) = lab() {
        l.enter("cli")?;
    }
    let udp = o.transport == Transport::Udp;
    let tls = if o.transport == Transport::Tls {
        Some(make_cert(dir.path())?)
    } else {
        None
    };
    let client_tls = match &tls {
        Some((cert, _)) => Some(tls_client(cert)?),
        None => None,
    };
    let mut servers = Vec::new();
    for name in &o.servers {
        if !(udp || name == "coturn" || name.starts_with("switchboard")) {
            println!("({name} left out: it relays UDP clients only)");
            continue;
        }
        servers.push(match name.as_str() {
            "bare" => start_forwarder("bare", echo.addr, dir.path()),
            "minimal" => start_forwarder("minimal", echo.addr, dir.path()),
            "direct" => start_direct(echo.addr)?,
            "coturn" => start_coturn(dir.path(), tls.as_ref())?,
            "switchboard" => start_switchboard(o, dir.path(), false, tls.as_ref())?,
            // Another build in the same run: `switchboard@PATH`.
            other if other.starts_with("switchboard@") => {
                let path = &other["switchboard@".len()..];
                let mut o2 = o.clone();
                o2.bin = Some(path.to_string());
                let label = std::path::Path::new(path)
                    .file_name()
                    .map(|f| f.to_string_lossy().to_string())
                    .unwrap_or_default();
                let mut s = start_switchboard(&o2, dir.path(), false, tls.as_ref())?;
                s.name = format!("switchboard@{label}");
                s
            }
            "switchboard-offload" => start_switchboard(o, dir.path(), true, None)?,
            other => return Err(format!("unknown server {other}")),
        });
    }
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("")
        .trim()
        .to_string();
    println!(
        "machine: {} CPUs, {cpu_model}; load generator, echo peer and server share them",
        num_cpus()
    );
    let loads: Vec<Load> = match o.video {
        Some(v) => vec![Load::Video(v)],
        None => o
            .rates
            .iter()
            .map(|&rate| Load::Paced { rate, size: o.size })
            .collect(),
    };
    match o.video {
        Some(v) => println!(
            "load: {} flows over {:?}, each {} frames/s of {} packets ({} B, the last {} B), \
             {} s, {} pairing(s), echo peer",
            v.flows,
            o.transport,
            v.fps,
            v.pkts,
            v.size,
            v.last_size(),
            o.secs,
            o.repeat
        ),
        None => println!(
            "load: {} allocations x 1 channel over {:?}, {} B ChannelData, {} s per rate, \
             {} pairing(s), echo peer",
            o.allocs, o.transport, o.size, o.secs, o.repeat
        ),
    }
    println!();
    println!(
        "| load (each way) | pairing | server | sent | relayed (to peer + back) | loss | server CPU s | \
         relayed / server CPU-s | server µs CPU / pkt | machine busy CPU-s | machine busy µs / pkt |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let mut probe = o.idle_probe.then(IdleProbe::start);
    let mut rows = Vec::new();
    let mut base = 0;
    for &load in &loads {
        for pairing in 0..o.repeat {
            for s in &servers {
                let mut r = if udp {
                    measure(s, &echo, o, load, base, probe.as_mut())?
                } else {
                    measure_stream(s, &echo, o, load, base, client_tls.as_ref())?
                };
                r.pairing = pairing;
                base += o.allocs;
                println!(
                    "| {} | {} | {} | {} | {} ({} + {}) | {:.3}% | {:.2} | {:.0} | {:.2} | {:.2} | {:.2} |",
                    r.label,
                    pairing + 1,
                    r.server,
                    r.t.sent,
                    r.relayed(),
                    r.t.to_peer,
                    r.t.back,
                    r.loss(),
                    r.cpu,
                    r.per_cpu(),
                    if r.relayed() > 0 {
                        r.cpu * 1e6 / r.relayed() as f64
                    } else {
                        0.0
                    },
                    r.busy,
                    r.busy_per_pkt()
                );
                let _ = std::io::stdout().flush();
                rows.push(r);
            }
        }
    }
    println!();
    println!(
        "ratios of relayed packets per server CPU-second (and of machine busy µs per relayed \
         packet), each pairing's servers measured back to back; median over pairings [each]:"
    );
    for load in &loads {
        let rate = load.rate();
        let at = |p: usize, n: &str| {
            rows.iter()
                .find(|r| r.rate == rate && r.pairing == p && r.server == n)
        };
        for reference in ["bare", "minimal", "coturn"] {
            for s in &servers {
                if s.name == reference || at(0, reference).is_none() {
                    continue;
                }
                let (mut cpu, mut busy) = (Vec::new(), Vec::new());
                for p in 0..o.repeat {
                    if let (Some(x), Some(r)) = (at(p, &s.name), at(p, reference)) {
                        if r.per_cpu() > 0.0 {
                            cpu.push(x.per_cpu() / r.per_cpu());
                        }
                        if r.busy_per_pkt() > 0.0 {
                            busy.push(x.busy_per_pkt() / r.busy_per_pkt());
                        }
                    }
                }
                let each = |v: &[f64]| {
                    v.iter()
                        .map(|x| format!("{x:.2}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                println!(
                    "  {}: {}/{} = {:.2} [{}]; machine busy per packet {:.2} [{}]",
                    load.label(),
                    s.name,
                    reference,
                    median(cpu.clone()),
                    each(&cpu),
                    median(busy.clone()),
                    each(&busy)
                );
            }
        }
    }
    println!();
    if o.idle_probe {
        print_idle_probe(&rows, &o.rates);
    }
    println!("per-thread server CPU seconds during each switchboard run:");
    for r in rows
        .iter()
        .filter(|r| r.server.starts_with("switchboard") && udp)
    {
        let t: Vec<String> = r
            .threads
            .iter()
            .map(|(n, c)| format!("{n}={c:.2}"))
            .collect();
        println!(
            "  {} {} #{}: {}",
            r.label,
            r.server,
            r.pairing + 1,
            t.join(" ")
        );
    }
    if o.alloc_count == 0 || !udp {
        return Ok(());
    }
    // Allocations per second and memory per allocation.
    println!();
    println!(
        "| server | allocations/s ({ALLOC_CLIENTS} clients, long-term auth) | allocations per \
         server CPU-s | RSS per allocation at {} allocations |",
        o.rss_count
    );
    println!("|---|---|---|---|");
    let mut aps = HashMap::new();
    let mut aps_cpu = HashMap::new();
    let mut rss = HashMap::new();
    for s in servers.iter().filter(|s| s.turn) {
        let c0 = proc_cpu(s.child.id());
        let (v, secs) = allocate_many(s.addr, o.alloc_count, base, ALLOC_CLIENTS)?;
        let cpu = proc_cpu(s.child.id()) - c0;
        base += o.alloc_count;
        let rate = o.alloc_count as f64 / secs;
        let per_cpu = if cpu > 0.0 {
            o.alloc_count as f64 / cpu
        } else {
            0.0
        };
        release_many(v, 4);
        std::thread::sleep(Duration::from_millis(300));
        let before = rss_kib(s.child.id());
        let (v, _) = allocate_many(s.addr, o.rss_count, base, ALLOC_CLIENTS)?;
        base += o.rss_count;
        std::thread::sleep(Duration::from_millis(300));
        let after = rss_kib(s.child.id());
        let per = (after.saturating_sub(before)) as f64 * 1024.0 / o.rss_count.max(1) as f64;
        release_many(v, 4);
        println!(
            "| {} | {:.0} | {:.0} ({:.2} CPU-s) | {:.0} B ({} → {} KiB) |",
            s.name, rate, per_cpu, cpu, per, before, after
        );
        aps.insert(s.name.clone(), rate);
        aps_cpu.insert(s.name.clone(), per_cpu);
        rss.insert(s.name.clone(), per);
    }
    if let (Some(a), Some(b)) = (aps.get("switchboard"), aps.get("coturn")) {
        println!("allocations/s switchboard/coturn = {:.2}", a / b);
    }
    if let (Some(a), Some(b)) = (aps_cpu.get("switchboard"), aps_cpu.get("coturn")) {
        println!(
            "allocations per server CPU-s switchboard/coturn = {:.2}",
            a / b
        );
    }
    if let (Some(a), Some(b)) = (rss.get("switchboard"), rss.get("coturn")) {
        if *b > 0.0 {
            println!("memory per allocation switchboard/coturn = {:.2}", a / b);
        }
    }
    Ok(())
}

/// Under `cargo test --all-targets`: a few hundred packets through the bare and the minimal
/// forwarders (evenly paced), a second of video-like bursts through the bare forwarder, and
/// switchboard with TURN over TCP and over TLS, so every mode of the load tool is exercised
/// without minutes of load.
fn smoke() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut o = Opts {
        rates: vec![2000],
        allocs: 4,
        secs: 0.2,
        size: 120,
        alloc_count: 0,
        rss_count: 0,
        servers: vec![],
        bin: Some(env!("CARGO_BIN_EXE_switchboard").to_string()),
        shards: Some(1),
        smoke: true,
        lab: false,
        idle_probe: false,
        video: None,
        transport: Transport::Udp,
        repeat: 1,
    };
    let check = |what: &str, r: &Row| {
        assert!(r.t.sent >= 300, "{what}: {r:?}");
        assert!(r.relayed() > r.t.sent, "{what}: {r:?}");
        println!(
            "relay_load smoke, {what}: sent {} relayed {} loss {:.2}%",
            r.t.sent,
            r.relayed(),
            r.loss()
        );
    };
    let paced = Load::Paced {
        rate: 2000,
        size: 120,
    };
    {
        let echo = Echo::start();
        let s = start_forwarder("bare", echo.addr, dir.path());
        check(
            "bare",
            &measure(&s, &echo, &o, paced, 0, None).expect("bare"),
        );
        let s = start_forwarder("minimal", echo.addr, dir.path());
        check(
            "minimal",
            &measure(&s, &echo, &o, paced, 0, None).expect("minimal"),
        );
    }
    {
        let echo = Echo::start_with(true);
        let s = start_forwarder("bare", echo.addr, dir.path());
        let v = Load::Video(Video {
            flows: 4,
            fps: 30,
            pkts: 6,
            size: 1200,
        });
        o.secs = 0.5;
        check(
            "bare, video",
            &measure(&s, &echo, &o, v, 0, None).expect("video"),
        );
    }
    let echo = Echo::start();
    let tls = make_cert(dir.path()).expect("openssl makes a certificate");
    let client = tls_client(&tls.0).expect("client config");
    o.secs = 0.3;
    let s = start_switchboard(&o, dir.path(), false, Some(&tls)).expect("switchboard starts");
    for (t, name) in [
        (Transport::Tcp, "switchboard, TCP"),
        (Transport::Tls, "switchboard, TLS"),
    ] {
        o.transport = t;
        let r = measure_stream(&s, &echo, &o, paced, 100, Some(&client)).expect(name);
        assert_eq!(r.loss(), 0.0, "{name}: a stream loses nothing: {r:?}");
        check(name, &r);
    }
}
