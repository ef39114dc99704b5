//! The network lab: Linux network namespaces that look like production, so address bugs that
//! loopback hides show up in tests.
//!
//! ```text
//!                       wan (bridge br0, 203.0.113.0/24, documentation range)
//!   ┌──────────────┬──────────────┬──────────────┬──────────────┬──────────────┐
//!  server         peer          proxy         router1        router2        router3
//!  .10 (+ .11)    .30           .40           .21            .22            .23
//!                                              │ NAT          │ NAT          │ full-cone NAT
//!                                             home1          home2          home3
//!                                             192.168.1.10   192.168.2.10   192.168.3.10
//! ```
//!
//! Routers 1 and 2 MASQUERADE with `--random-fully` (endpoint-dependent mapping) and drop
//! anything unsolicited, so no direct path joins home 1 and home 2. Router 3 is a full cone:
//! SNAT that keeps the port (one mapping for every destination) and DNAT of any inbound UDP
//! back to home 3, so a host anywhere can reach home 3 at its server-reflexive address.
//!
//! Every namespace is named `sblab-p<pid>n<counter>-<role>`, so labs of two tests or two
//! processes never collide; veth pairs are created inside the namespaces, so their names never
//! touch the default namespace. Nothing is routed to the machine's real interfaces. Dropping
//! the [`Lab`] (also while unwinding from a panic) kills every process it started and deletes
//! every namespace; labs left behind by a killed test process are swept at the next start.
//!
//! Building a lab needs root and `ip`/`iptables`. Without them [`Lab::start`] prints why and
//! returns `None`, so the test passes as skipped, unless `CI=true` or `SWITCHBOARD_LAB=require`
//! is set: then a lab that cannot be built fails the test.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The server's (first) public address.
pub const SERVER: &str = "203.0.113.10";
/// The server's second address (multi-homed tests add it).
pub const SERVER2: &str = "203.0.113.11";
/// A host on the public segment (echo peers, direct clients).
pub const PEER: &str = "203.0.113.30";
/// The reverse proxy host.
pub const PROXY: &str = "203.0.113.40";
/// The public (NAT) address of home 1.
pub const ROUTER1: &str = "203.0.113.21";
/// The public (NAT) address of home 2.
pub const ROUTER2: &str = "203.0.113.22";
/// The private address of the host in home 1.
pub const HOME1: &str = "192.168.1.10";
/// The private address of the host in home 2.
pub const HOME2: &str = "192.168.2.10";
/// The public (full-cone NAT) address of home 3.
pub const ROUTER3: &str = "203.0.113.23";
/// The private address of the host in home 3.
pub const HOME3: &str = "192.168.3.10";

/// A host of the lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host {
    /// The public segment's bridge.
    Wan,
    /// The switchboard host.
    Server,
    /// A public host.
    Peer,
    /// The reverse proxy host.
    Proxy,
    /// NAT router of home 1.
    Router1,
    /// Client host in home 1.
    Home1,
    /// NAT router of home 2.
    Router2,
    /// Client host in home 2.
    Home2,
    /// Full-cone NAT router of home 3.
    Router3,
    /// Client host in home 3.
    Home3,
    /// The 1:1 NAT gateway of cluster node `n` (see [`Lab::add_nat_node`]).
    Gw(u8),
    /// Cluster node `n`, on a private address behind its gateway.
    Node(u8),
}

const ALL: [Host; 10] = [
    Host::Wan,
    Host::Server,
    Host::Peer,
    Host::Proxy,
    Host::Router1,
    Host::Home1,
    Host::Router2,
    Host::Home2,
    Host::Router3,
    Host::Home3,
];

impl Host {
    fn role(self) -> std::borrow::Cow<'static, str> {
        std::borrow::Cow::Borrowed(match self {
            Host::Gw(n) => return format!("gw{n}").into(),
            Host::Node(n) => return format!("node{n}").into(),
            Host::Wan => "wan",
            Host::Server => "server",
            Host::Peer => "peer",
            Host::Proxy => "proxy",
            Host::Router1 => "router1",
            Host::Home1 => "home1",
            Host::Router2 => "router2",
            Host::Home2 => "home2",
            Host::Router3 => "router3",
            Host::Home3 => "home3",
        })
    }
}

/// Namespace name prefix shared by every lab.
pub const PREFIX: &str = "sblab-";
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A built lab; dropping it tears everything down.
pub struct Lab {
    /// Unique part of the namespace names.
    pub id: String,
    children: Vec<(String, Child)>,
    /// Scratch directory for config files and process logs.
    pub dir: tempfile::TempDir,
    etc: Vec<PathBuf>,
    built: Vec<String>,
    forwards: Vec<(SocketAddr, Arc<AtomicBool>)>,
}

/// Whether a lab that cannot be built must fail the test instead of skipping it.
pub fn required() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
        || std::env::var("SWITCHBOARD_LAB").is_ok_and(|v| v == "require")
}

fn run_ok(cmd: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{cmd} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Delete `sblab-p<pid>…` namespaces whose process is gone (a test killed mid-run).
fn sweep_stale() {
    let Ok(rd) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(rest) = name.strip_prefix("sblab-p") else {
            continue;
        };
        let pid: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        if !pid.is_empty() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = run_ok("ip", &["netns", "del", &name]);
            let _ = std::fs::remove_dir_all(format!("/etc/netns/{name}"));
        }
    }
}

impl Lab {
    /// Build a lab, or explain why not and return `None` (the caller returns: skipped).
    /// Panics instead when [`required`] says the lab must exist.
    pub fn start(test: &str) -> Option<Lab> {
        match Lab::build() {
            Ok(l) => Some(l),
            Err(e) if required() => {
                panic!("{test}: the network lab cannot be built ({e}); CI must run as root with iproute2 and iptables (scripts/install-test-deps.sh)")
            }
            Err(e) => {
                eprintln!(
                    "SKIPPED {test}: network lab unavailable ({e}). Run as root with iproute2 and \
                     iptables; set SWITCHBOARD_LAB=require to make this a failure."
                );
                None
            }
        }
    }

    fn build() -> Result<Lab, String> {
        if !nix::unistd::Uid::effective().is_root() {
            return Err("not root".into());
        }
        run_ok("ip", &["-V"]).map_err(|e| format!("no `ip`: {e}"))?;
        run_ok("iptables", &["-V"]).map_err(|e| format!("no `iptables`: {e}"))?;
        sweep_stale();
        let id = format!(
            "p{}n{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let mut lab = Lab {
            id,
            children: Vec::new(),
            dir: tempfile::tempdir().map_err(|e| e.to_string())?,
            etc: Vec::new(),
            built: Vec::new(),
            forwards: Vec::new(),
        };
        // From here on, Drop cleans up whatever was made, also when a step fails.
        for h in ALL {
            let ns = lab.ns(h);
            run_ok("ip", &["netns", "add", &ns])?;
            lab.built.push(ns.clone());
            run_ok("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        }
        let wan = lab.ns(Host::Wan);
        lab.ip(Host::Wan, "link add br0 type bridge")?;
        lab.ip(Host::Wan, "link set br0 up")?;
        for (h, addr, port) in [
            (Host::Server, SERVER, "p-server"),
            (Host::Peer, PEER, "p-peer"),
            (Host::Proxy, PROXY, "p-proxy"),
            (Host::Router1, ROUTER1, "p-r1"),
            (Host::Router2, ROUTER2, "p-r2"),
            (Host::Router3, ROUTER3, "p-r3"),
        ] {
            let ns = lab.ns(h);
            run_ok(
                "ip",
                &[
                    "link", "add", "e0", "netns", &ns, "type", "veth", "peer", "name", port,
                    "netns", &wan,
                ],
            )?;
            lab.ip(Host::Wan, &format!("link set {port} master br0 up"))?;
            lab.ip(h, &format!("addr add {addr}/24 dev e0"))?;
            lab.ip(h, "link set e0 up")?;
        }
        for (router, home, lan) in [
            (Host::Router1, Host::Home1, "192.168.1"),
            (Host::Router2, Host::Home2, "192.168.2"),
            (Host::Router3, Host::Home3, "192.168.3"),
        ] {
            let (r, h) = (lab.ns(router), lab.ns(home));
            run_ok(
                "ip",
                &[
                    "link", "add", "l0", "netns", &r, "type", "veth", "peer", "name", "e0",
                    "netns", &h,
                ],
            )?;
            lab.ip(router, &format!("addr add {lan}.1/24 dev l0"))?;
            lab.ip(router, "link set l0 up")?;
            lab.ip(home, &format!("addr add {lan}.10/24 dev e0"))?;
            lab.ip(home, "link set e0 up")?;
            lab.ip(home, &format!("route add default via {lan}.1"))?;
            lab.exec_ok(router, "sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
            if router == Host::Router3 {
                lab.full_cone(router, HOME3, ROUTER3)?;
                continue;
            }
            // Endpoint-dependent mapping: a new random port per destination, so a srflx
            // address learnt from the server is useless to the other home.
            lab.exec_ok(
                router,
                "iptables",
                &[
                    "-t",
                    "nat",
                    "-A",
                    "POSTROUTING",
                    "-o",
                    "e0",
                    "-j",
                    "MASQUERADE",
                    "--random-fully",
                ],
            )?;
            // Nothing unsolicited gets into the home.
            lab.exec_ok(
                router,
                "iptables",
                &[
                    "-A",
                    "FORWARD",
                    "-i",
                    "e0",
                    "-m",
                    "conntrack",
                    "!",
                    "--ctstate",
                    "ESTABLISHED,RELATED",
                    "-j",
                    "DROP",
                ],
            )?;
        }
        Ok(lab)
    }

    /// Full-cone NAT on `router`: outgoing UDP keeps its port behind `public` whatever the
    /// destination (endpoint-independent mapping), and any inbound UDP to `public` goes to
    /// `inside` on the same port (endpoint-independent filtering). Other traffic is
    /// masqueraded and filtered like the other homes.
    fn full_cone(&self, router: Host, inside: &str, public: &str) -> Result<(), String> {
        let nat = |args: &[&str]| {
            let mut a = vec!["-t", "nat", "-A"];
            a.extend_from_slice(args);
            self.exec_ok(router, "iptables", &a)
        };
        nat(&[
            "POSTROUTING",
            "-o",
            "e0",
            "-p",
            "udp",
            "-s",
            inside,
            "-j",
            "SNAT",
            "--to-source",
            public,
        ])?;
        nat(&["POSTROUTING", "-o", "e0", "-j", "MASQUERADE"])?;
        nat(&[
            "PREROUTING",
            "-i",
            "e0",
            "-p",
            "udp",
            "-d",
            public,
            "-j",
            "DNAT",
            "--to-destination",
            inside,
        ])?;
        self.exec_ok(
            router,
            "iptables",
            &[
                "-A", "FORWARD", "-i", "e0", "-p", "udp", "-d", inside, "-j", "ACCEPT",
            ],
        )?;
        self.exec_ok(
            router,
            "iptables",
            &[
                "-A",
                "FORWARD",
                "-i",
                "e0",
                "-m",
                "conntrack",
                "!",
                "--ctstate",
                "ESTABLISHED,RELATED",
                "-j",
                "DROP",
            ],
        )
    }

    /// Cluster node `n` (1..=9) behind a 1:1 NAT, like a cloud VM with an elastic address:
    /// the node holds only `10.0.<n>.10`, and its gateway maps `203.0.113.1<n>` to it both
    /// ways (DNAT in, SNAT out, ports kept). Returns `(public, private)`.
    pub fn add_nat_node(&mut self, n: u8) -> Result<(String, String), String> {
        assert!((1..=9).contains(&n), "node numbers are 1..=9");
        let public = format!("203.0.113.1{n}");
        let private = format!("10.0.{n}.10");
        let (gw, node) = (Host::Gw(n), Host::Node(n));
        for h in [gw, node] {
            let ns = self.ns(h);
            run_ok("ip", &["netns", "add", &ns])?;
            self.built.push(ns.clone());
            run_ok("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        }
        let (wan, g, nd) = (self.ns(Host::Wan), self.ns(gw), self.ns(node));
        let port = format!("p-gw{n}");
        run_ok(
            "ip",
            &[
                "link", "add", "e0", "netns", &g, "type", "veth", "peer", "name", &port, "netns",
                &wan,
            ],
        )?;
        self.ip(Host::Wan, &format!("link set {port} master br0 up"))?;
        self.ip(gw, &format!("addr add {public}/24 dev e0"))?;
        self.ip(gw, "link set e0 up")?;
        run_ok(
            "ip",
            &[
                "link", "add", "l0", "netns", &g, "type", "veth", "peer", "name", "e0", "netns",
                &nd,
            ],
        )?;
        self.ip(gw, &format!("addr add 10.0.{n}.1/24 dev l0"))?;
        self.ip(gw, "link set l0 up")?;
        self.ip(node, &format!("addr add {private}/24 dev e0"))?;
        self.ip(node, "link set e0 up")?;
        self.ip(node, &format!("route add default via 10.0.{n}.1"))?;
        self.exec_ok(gw, "sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        self.one_to_one_nat(gw, &public, &private)?;
        Ok((public, private))
    }

    /// Move node `n`'s 1:1 NAT to another public address (an elastic address re-assigned):
    /// the gateway takes `public` and maps it, and only it, to the node both ways.
    pub fn renat_node(&mut self, n: u8, public: &str) -> Result<(), String> {
        let gw = Host::Gw(n);
        let private = format!("10.0.{n}.10");
        self.ip(gw, &format!("addr add {public}/24 dev e0"))?;
        self.exec_ok(gw, "iptables", &["-t", "nat", "-F"])?;
        // Old mappings would keep the old address for flows already seen.
        let _ = self.exec_ok(gw, "conntrack", &["-F"]);
        self.one_to_one_nat(gw, public, &private)
    }

    /// The 1:1 NAT of a node's gateway: `public` maps to `private` inbound (DNAT) and the
    /// node's traffic leaves as `public` (SNAT).
    fn one_to_one_nat(&self, gw: Host, public: &str, private: &str) -> Result<(), String> {
        let nat = |args: &[&str]| {
            let mut a = vec!["-t", "nat", "-A"];
            a.extend_from_slice(args);
            self.exec_ok(gw, "iptables", &a)
        };
        nat(&[
            "PREROUTING",
            "-i",
            "e0",
            "-d",
            public,
            "-j",
            "DNAT",
            "--to-destination",
            private,
        ])?;
        nat(&[
            "POSTROUTING",
            "-o",
            "e0",
            "-s",
            private,
            "-j",
            "SNAT",
            "--to-source",
            public,
        ])
    }

    /// Start the real `switchboard` binary in `h` as process `name`, in a UTS namespace of
    /// its own whose host name is `hostname` (a separate machine has its own), with
    /// `config` and no `SWITCHBOARD_*` variable from the test's environment.
    pub fn spawn_switchboard(&mut self, h: Host, name: &str, hostname: &str, config: &Path) {
        let log = self.dir.path().join(format!("{name}.log"));
        let f = std::fs::File::create(&log).expect("log file");
        let mut cmd = self.command(h, "unshare");
        cmd.args([
            "--uts",
            "sh",
            "-c",
            "hostname \"$0\" && exec \"$@\"",
            hostname,
        ])
        .arg(env!("CARGO_BIN_EXE_switchboard"))
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "info,switchboard=debug")
        .stdout(f.try_clone().expect("log"))
        .stderr(f)
        .process_group(0);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("SWITCHBOARD_") {
                cmd.env_remove(k);
            }
        }
        let child = cmd.spawn().expect("start switchboard");
        self.children.push((name.to_string(), child));
    }

    /// A switchboard that answers only STUN Binding on the public segment (`PEER:3478`), as
    /// a public STUN server would: what `"auto"` addresses ask. Returns its `stun:` URI.
    pub fn stun_server(&mut self) -> String {
        let cfg = self.dir.path().join("stun.toml");
        std::fs::write(
            &cfg,
            format!(
                "[http]\nlisten = \"{PEER}:8090\"\n[turn]\nlisten = [\"{PEER}:3478\"]\n\
                 relay = false\n[auth]\nbackends = [\"open\"]\nallow_open_on_public = true\n"
            ),
        )
        .expect("stun config");
        self.spawn_switchboard(Host::Peer, "stun", "stun", &cfg);
        let t = Instant::now();
        while self.tcp(Host::Peer, sa(PEER, 8090)).is_err() {
            assert!(
                self.running("stun") && t.elapsed() < Duration::from_secs(15),
                "the lab STUN server did not start:\n{}",
                self.log("stun")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        format!("stun:{PEER}:3478")
    }

    /// The namespace name of `h`.
    pub fn ns(&self, h: Host) -> String {
        format!("{PREFIX}{}-{}", self.id, h.role())
    }

    /// `ip -n <ns> <args>`.
    pub fn ip(&self, h: Host, args: &str) -> Result<(), String> {
        let ns = self.ns(h);
        let mut a = vec!["-n", ns.as_str()];
        a.extend(args.split_whitespace());
        run_ok("ip", &a)
    }

    /// Run a command inside `h` and require success.
    pub fn exec_ok(&self, h: Host, cmd: &str, args: &[&str]) -> Result<(), String> {
        let ns = self.ns(h);
        let mut a = vec!["netns", "exec", ns.as_str(), cmd];
        a.extend_from_slice(args);
        run_ok("ip", &a)
    }

    /// A command that runs inside `h` (`ip netns exec`).
    pub fn command(&self, h: Host, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(h), program]);
        c.stdin(Stdio::null());
        c
    }

    /// Run a command inside `h` to completion.
    pub fn output(&self, h: Host, program: &str, args: &[&str]) -> Output {
        self.command(h, program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program} in {}: {e}", self.ns(h)))
    }

    /// Start a long-running process inside `h`; its output goes to `<dir>/<name>.log` and it
    /// is killed when the lab is dropped.
    pub fn spawn(&mut self, h: Host, name: &str, program: &str, args: &[&str]) {
        let log = self.dir.path().join(format!("{name}.log"));
        let f = std::fs::File::create(&log).expect("log file");
        let child = self
            .command(h, program)
            .args(args)
            .stdout(f.try_clone().expect("log file"))
            .stderr(f)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program} in {}: {e}", self.ns(h)));
        self.children.push((name.to_string(), child));
    }

    /// The log of a process started with [`Lab::spawn`].
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Whether the named process is still running.
    pub fn running(&mut self, name: &str) -> bool {
        self.children
            .iter_mut()
            .find(|(n, _)| n == name)
            .is_some_and(|(_, c)| matches!(c.try_wait(), Ok(None)))
    }

    /// Wait up to `wait` for the named process to exit; true when it has.
    pub fn wait_exit(&mut self, name: &str, wait: Duration) -> bool {
        let Some((_, c)) = self.children.iter_mut().find(|(n, _)| n == name) else {
            panic!("no process named {name}");
        };
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            if matches!(c.try_wait(), Ok(Some(_))) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// The exit code of a process started with [`Lab::spawn`] once it has exited; -1 while
    /// it runs or when a signal ended it.
    pub fn exit_code(&mut self, name: &str) -> i32 {
        self.children
            .iter_mut()
            .find(|(n, _)| n == name)
            .and_then(|(_, c)| c.try_wait().ok().flatten())
            .and_then(|s| s.code())
            .unwrap_or(-1)
    }

    /// Send `sig` to the named process started by the lab (SIGHUP to reload a server).
    pub fn signal(&self, name: &str, sig: nix::sys::signal::Signal) {
        let (_, c) = self
            .children
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no lab process named {name}"));
        // `ip netns exec` execs the program, so the child's pid is the program's own.
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), sig)
            .unwrap_or_else(|e| panic!("cannot signal {name}: {e}"));
    }

    /// Wait until the log of the named process contains `needle` (10 s), and return the log.
    pub fn wait_log(&self, name: &str, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.log(name);
            if log.contains(needle) {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in the log of {name}:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A file mounted over `/etc/<name>` for processes started in `h` (e.g. `hosts`).
    pub fn etc_file(&mut self, h: Host, name: &str, text: &str) {
        let d = PathBuf::from(format!("/etc/netns/{}", self.ns(h)));
        std::fs::create_dir_all(&d).expect("/etc/netns dir");
        std::fs::write(d.join(name), text).expect("etc file");
        self.etc.push(d);
    }

    /// Run `f` on a thread that has entered `h`'s network namespace: sockets it opens live
    /// there for good, and can be used from any thread afterwards.
    pub fn in_ns<T: Send + 'static>(&self, h: Host, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.ns(h));
        std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            let fd = std::fs::File::open(&path).expect("namespace file");
            nix::sched::setns(fd.as_raw_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("namespace thread")
    }

    /// A TCP port on the test's own loopback that leads to `127.0.0.1:port` inside `h`: each
    /// accepted connection is matched by one opened inside `h`, and bytes are copied both ways.
    /// This is how a test reaches a control port inside a lab host (chromedriver) without
    /// routing anything into the lab; the traffic of the lab hosts stays inside it.
    pub fn forward_tcp(&mut self, h: Host, port: u16) -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("forward listener");
        let local = listener.local_addr().expect("forward address");
        let stop = Arc::new(AtomicBool::new(false));
        self.forwards.push((local, stop.clone()));
        let ns = format!("/run/netns/{}", self.ns(h));
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(outer) = conn else { continue };
                let ns = ns.clone();
                std::thread::spawn(move || {
                    let inner = std::thread::spawn(move || {
                        use std::os::fd::AsRawFd;
                        let fd = std::fs::File::open(&ns)?;
                        nix::sched::setns(fd.as_raw_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                            .map_err(std::io::Error::from)?;
                        std::net::TcpStream::connect(("127.0.0.1", port))
                    })
                    .join();
                    let Ok(Ok(inner)) = inner else { return };
                    splice(outer, inner);
                });
            }
        });
        local
    }

    /// A UDP socket bound in `h` (port 0 = any), as a tokio socket.
    pub fn udp(&self, h: Host, bind: &str) -> tokio::net::UdpSocket {
        let bind: SocketAddr = bind.parse().expect("bind address");
        let s = self.in_ns(h, move || {
            std::net::UdpSocket::bind(bind).expect("udp bind")
        });
        s.set_nonblocking(true).expect("nonblocking");
        tokio::net::UdpSocket::from_std(s).expect("tokio socket")
    }

    /// A TCP connection opened from `h`.
    pub fn tcp(&self, h: Host, to: SocketAddr) -> std::io::Result<std::net::TcpStream> {
        self.in_ns(h, move || {
            std::net::TcpStream::connect_timeout(&to, Duration::from_secs(3))
        })
    }

    /// One HTTP/1.1 request from `h`: `(status, headers and body as text)`.
    pub fn http(
        &self,
        h: Host,
        to: SocketAddr,
        method: &str,
        path: &str,
        extra_headers: &[(&str, &str)],
        body: &str,
    ) -> (u16, String) {
        let mut s = self
            .tcp(h, to)
            .unwrap_or_else(|e| panic!("HTTP connect to {to} from {h:?}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(10))).ok();
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {to}\r\nConnection: close\r\n");
        for (k, v) in extra_headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        if !body.is_empty() {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        req.push_str("\r\n");
        req.push_str(body);
        s.write_all(req.as_bytes()).expect("HTTP write");
        let mut resp = String::new();
        let _ = s.read_to_string(&mut resp);
        let status = resp
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (status, resp)
    }

    /// Write `config` to a file and start the real `switchboard` binary in the server
    /// namespace with it (and `env`), then wait until `http` answers.
    pub fn start_switchboard(&mut self, config: &str, env: &[(&str, &str)], http: SocketAddr) {
        let path = self.dir.path().join("switchboard.toml");
        std::fs::write(&path, config).expect("config file");
        let log = self.dir.path().join("switchboard.log");
        let f = std::fs::File::create(&log).expect("log file");
        let mut cmd = self.command(Host::Server, env!("CARGO_BIN_EXE_switchboard"));
        cmd.arg("--config")
            .arg(&path)
            .env("RUST_LOG", "info,switchboard=debug")
            .stdout(f.try_clone().expect("log"))
            .stderr(f)
            .process_group(0);
        // The test's own SWITCHBOARD_* variables (SWITCHBOARD_LAB=require) are not
        // config overrides: the server sees only `env`.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("SWITCHBOARD_") {
                cmd.env_remove(k);
            }
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("start switchboard");
        self.children.push(("switchboard".into(), child));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.tcp(Host::Server, http).is_ok() {
                return;
            }
            if !self.running("switchboard") || Instant::now() > deadline {
                panic!(
                    "switchboard did not come up in the lab:\n{}",
                    self.log("switchboard")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Copy bytes both ways between two connections until either side closes.
fn splice(a: std::net::TcpStream, b: std::net::TcpStream) {
    let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else {
        return;
    };
    let one = std::thread::spawn(move || {
        let (mut from, to) = (a, b2);
        let _ = std::io::copy(&mut from, &mut &to);
        let _ = to.shutdown(std::net::Shutdown::Write);
    });
    let (mut from, to) = (b, a2);
    let _ = std::io::copy(&mut from, &mut &to);
    let _ = to.shutdown(std::net::Shutdown::Write);
    let _ = one.join();
}

use std::os::unix::process::CommandExt;

impl Drop for Lab {
    fn drop(&mut self) {
        for (addr, stop) in &self.forwards {
            // Wake the accept loop so that it sees the flag and ends.
            stop.store(true, Ordering::Relaxed);
            let _ = std::net::TcpStream::connect_timeout(addr, Duration::from_millis(200));
        }
        for (_, c) in &mut self.children {
            // Each child leads its own process group: take `ip netns exec`'s child with it.
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in self.built.iter().rev() {
            if let Err(e) = run_ok("ip", &["netns", "del", ns]) {
                eprintln!("lab teardown: {e}");
            }
        }
        for d in &self.etc {
            let _ = std::fs::remove_dir_all(d);
        }
        if std::thread::panicking() {
            for (name, _) in &self.children {
                eprintln!("---- {name} log ----\n{}", self.log(name));
            }
        }
    }
}

/// `addr:port` of a lab constant.
pub fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse::<IpAddr>().expect("ip"), port)
}

pub mod cluster;
pub mod turn;
