//! Three switchboard nodes behind 1:1 NAT in the lab, sharing one configuration, a real
//! redis-server and a STUN server on the public segment: what `tests/it/lab_cluster_turn.rs` and
//! `benches/cluster_turn.rs` drive.

use super::turn::{Client, Resp};
use super::{sa, Host, Lab, PEER};
use serde_json::Value;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use switchboard::stun::codec::{attr, decode_address};

/// The server API token of every node.
pub const ADMIN: &str = "lab-admin-token-0123456789";
/// The nodes' public addresses.
pub const PUBLIC: [&str; 3] = ["203.0.113.11", "203.0.113.12", "203.0.113.13"];

/// The one configuration every node runs, as a DaemonSet would hand it out.
pub fn node_config(extra_turn: &str, extra_public: &str) -> String {
    format!(
        r#"
[server]
drain_timeout_secs = 20
[http]
listen = "0.0.0.0:8080"
admin_api = true
[turn]
listen = ["0.0.0.0:3478"]
relay_ip = "auto"
relay_port_min = 50000
relay_port_max = 50999
max_allocations_per_user = 2
{extra_turn}
[public]
host = "auto"
discover_stun = ["stun:{PEER}:3478"]
discover_interval_secs = 10
{extra_public}
[auth]
backends = ["open"]
allow_open_on_public = true
login_rate_per_minute = 100000
session_keys = ["lab-cluster-session-key-0123456789"]
turn_secrets = ["lab-cluster-turn-secret"]
admin_tokens = ["{ADMIN}"]
[cluster]
redis_url = "redis://{PEER}:6379"
turn_placement = "least_loaded"
node_ttl_ms = 5000
"#
    )
}

/// The running nodes and their lab.
pub struct Cluster {
    /// The lab they run in.
    pub lab: Lab,
}

/// The JSON body of an HTTP answer.
pub fn body(resp: &str) -> Value {
    let b = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    serde_json::from_str(b).unwrap_or(Value::Null)
}

impl Cluster {
    /// Redis and STUN on the public segment, then three NATed nodes with the same config.
    pub fn start(test: &str, extra_turn: &str) -> Option<Cluster> {
        Cluster::start_with(test, extra_turn, "")
    }

    /// [`Cluster::start`] with extra keys in `[public]` too.
    pub fn start_with(test: &str, extra_turn: &str, extra_public: &str) -> Option<Cluster> {
        let mut lab = Lab::start(test)?;
        for n in 1..=3 {
            lab.add_nat_node(n).expect("NATed node");
        }
        lab.spawn(
            Host::Peer,
            "redis",
            "redis-server",
            &[
                "--bind",
                PEER,
                "--port",
                "6379",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
            ],
        );
        assert_eq!(lab.stun_server(), format!("stun:{PEER}:3478"));
        let t = Instant::now();
        while lab.tcp(Host::Peer, sa(PEER, 6379)).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(15),
                "redis and STUN start:\n{}",
                lab.log("stun")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let cfg = lab.dir.path().join("node.toml");
        std::fs::write(&cfg, node_config(extra_turn, extra_public)).unwrap();
        for n in 1..=3u8 {
            lab.spawn_switchboard(
                Host::Node(n),
                &format!("node{n}"),
                &format!("node-{n}"),
                &cfg,
            );
        }
        let mut c = Cluster { lab };
        for n in 0..3 {
            c.wait_http(n);
        }
        // Every node sees the three records.
        c.until(Duration::from_secs(10), "three ready nodes", |c| {
            (0..3).all(|n| c.nodes(n).iter().filter(|r| r["state"] == "ready").count() == 3)
        });
        Some(c)
    }

    /// HTTP address of node `n` (0-based).
    pub fn http_of(n: usize) -> SocketAddr {
        sa(PUBLIC[n], 8080)
    }

    /// Wait until node `n` answers HTTP.
    pub fn wait_http(&mut self, n: usize) {
        let t = Instant::now();
        while self.lab.tcp(Host::Home1, Self::http_of(n)).is_err() {
            let name = format!("node{}", n + 1);
            assert!(
                self.lab.running(&name) && t.elapsed() < Duration::from_secs(20),
                "{name} did not come up:\n{}",
                self.lab.log(&name)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Poll `f` every 100 ms until it holds; panic after `within`.
    pub fn until(&mut self, within: Duration, what: &str, mut f: impl FnMut(&mut Cluster) -> bool) {
        let t = Instant::now();
        while !f(self) {
            assert!(t.elapsed() < within, "not within {within:?}: {what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `GET /v1/admin/nodes` on node `n` (from the home, through its NAT).
    pub fn nodes(&self, n: usize) -> Vec<Value> {
        let auth = format!("Bearer {ADMIN}");
        let (st, r) = self.lab.http(
            Host::Home1,
            Self::http_of(n),
            "GET",
            "/v1/admin/nodes",
            &[("Authorization", &auth)],
            "",
        );
        assert_eq!(st, 200, "{r}");
        body(&r)["nodes"].as_array().cloned().unwrap_or_default()
    }

    /// Log in on node `n` as `name`: the TURN server handed out and its credentials.
    pub fn login(&self, n: usize, name: &str) -> (String, String, String) {
        turn_of(&self.login_answer(n, name))
    }

    /// Log in on node `n`: the session token and the TURN host handed out.
    pub fn login_token(&self, n: usize, name: &str) -> (String, String) {
        let v = self.login_answer(n, name);
        (v["token"].as_str().unwrap().to_string(), turn_of(&v).0)
    }

    /// The answer of `POST /v1/login` on node `n` as `name` (from the home, through its NAT).
    fn login_answer(&self, n: usize, name: &str) -> Value {
        let (st, r) = self.lab.http(
            Host::Home1,
            Self::http_of(n),
            "POST",
            "/v1/login",
            &[],
            &format!(r#"{{"name":"{name}"}}"#),
        );
        assert_eq!(st, 200, "{r}");
        body(&r)
    }

    /// `GET /v1/ice-servers` on node `n`: the TURN host of the refreshed `iceServers`.
    pub fn refresh(&self, n: usize, token: &str) -> String {
        let auth = format!("Bearer {token}");
        let (st, r) = self.lab.http(
            Host::Home1,
            Self::http_of(n),
            "GET",
            "/v1/ice-servers",
            &[("Authorization", &auth)],
            "",
        );
        assert_eq!(st, 200, "{r}");
        turn_of(&body(&r)).0
    }

    /// `/metrics` of node `n`.
    pub fn metrics(&self, n: usize) -> String {
        self.lab
            .http(Host::Home1, Self::http_of(n), "GET", "/metrics", &[], "")
            .1
    }

    /// A TURN client in home 1 for `server`.
    pub fn client(&self, server: &str, user: &str, pass: &str) -> Client {
        Client::new(
            self.lab.udp(Host::Home1, "0.0.0.0:0"),
            sa(server, 3478),
            user,
            pass,
        )
    }
}

/// The TURN server of a login or refresh answer: host of its first URI, username, password.
pub fn turn_of(v: &Value) -> (String, String, String) {
    let turn = v["iceServers"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["username"].is_string()))
        .cloned()
        .unwrap_or_else(|| panic!("no TURN server in {v}"));
    let url = turn["urls"][0].as_str().unwrap().to_string();
    let host = url
        .strip_prefix("turn:")
        .and_then(|u| u.split(':').next())
        .unwrap()
        .to_string();
    (
        host,
        turn["username"].as_str().unwrap().to_string(),
        turn["credential"].as_str().unwrap().to_string(),
    )
}

/// The value of the first sample of `name` (with labels, if given) in a scrape.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// ALTERNATE-SERVER of a 300 answer.
pub fn alternate_of(r: &Resp) -> SocketAddr {
    let v = r
        .msg()
        .get(attr::ALTERNATE_SERVER)
        .expect("ALTERNATE-SERVER")
        .to_vec();
    decode_address(&v).expect("an address")
}
