//! The relay across a cluster, in the network lab: three switchboard nodes behind 1:1 NAT
//! (public 203.0.113.11–13, private 10.0.n.10, like cloud VMs with elastic addresses), one
//! shared configuration with no per-node edit, a real redis-server and a STUN server on the
//! public segment. Clients sit in a NATed home. See tests/support/lab/mod.rs for the topology.

use crate::support::lab;

use lab::cluster::{alternate_of, metric, Cluster, PUBLIC};
use lab::{sa, Host, PEER};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use switchboard::stun::codec::{attr, method};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn natted_nodes_discover_their_addresses_relay_with_them_and_logins_spread() {
    let Some(mut c) = Cluster::start("cluster_turn_discovery_and_placement", "") else {
        return;
    };
    c.lab.spawn(
        Host::Peer,
        "echo",
        "turnutils_peer",
        &["-L", PEER, "-p", "3480"],
    );
    std::thread::sleep(Duration::from_millis(300));

    // Each node learnt its own public address, with no per-node configuration.
    let nodes = c.nodes(1);
    for (i, ip) in PUBLIC.iter().enumerate() {
        let n = nodes
            .iter()
            .find(|n| n["node"] == format!("node-{}", i + 1))
            .unwrap_or_else(|| panic!("node-{} in {nodes:?}", i + 1));
        assert_eq!(n["addrs"][0], *ip, "{n}");
        assert_eq!(n["host"], *ip, "{n}");
        assert_eq!(n["uris"][0], format!("turn:{ip}:3478?transport=udp"), "{n}");
        assert_eq!(n["state"], "ready");
    }
    assert_eq!(
        metric(&c.metrics(0), "switchboard_cluster_nodes_ready"),
        3.0
    );
    assert_eq!(
        metric(
            &c.metrics(0),
            "switchboard_cluster_node_state{state=\"ready\"}"
        ),
        1.0
    );

    // Relay through each node: the relayed address carries that node's public address, and
    // data reaches a public peer and comes back.
    let (_, user, pass) = c.login(0, "relay");
    for ip in PUBLIC {
        let mut cl = c.client(ip, &user, &pass);
        let r = cl.allocate().await;
        assert_eq!(r.code(), None, "allocate on {ip}");
        let relayed = r.addr(attr::XOR_RELAYED_ADDRESS).unwrap();
        assert_eq!(relayed.ip().to_string(), ip, "relayed address of {ip}");
        assert_eq!(cl.permit(sa(PEER, 3480)).await.code(), None);
        cl.send(sa(PEER, 3480), b"hello").await;
        let (peer, data, _) = cl
            .recv_data(Duration::from_secs(3))
            .await
            .unwrap_or_else(|| panic!("no echo through {ip}"));
        assert_eq!((peer, data.as_slice()), (sa(PEER, 3480), &b"hello"[..]));
        // Free the slot (Refresh, LIFETIME 0).
        cl.request(method::REFRESH, &[(attr::LIFETIME, vec![0, 0, 0, 0])], None)
            .await;
    }

    // Placement: 300 logins, spread over the three nodes' HTTP, each holding an allocation
    // on the node it was handed.
    let mut count: HashMap<String, u32> = HashMap::new();
    let mut held = Vec::new();
    for i in 0..300 {
        let (host, user, pass) = c.login(i % 3, &format!("p{i}"));
        let mut cl = c.client(&host, &user, &pass);
        let r = cl.allocate().await;
        assert_eq!(r.code(), None, "allocate {i} on {host}");
        assert_eq!(
            r.addr(attr::XOR_RELAYED_ADDRESS).unwrap().ip().to_string(),
            host
        );
        *count.entry(host).or_default() += 1;
        held.push(cl);
    }
    eprintln!("placement of 300 logins: {count:?}");
    for ip in PUBLIC {
        let n = count.get(ip).copied().unwrap_or(0);
        assert!((85..=115).contains(&n), "{ip} got {n} of 300: {count:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_draining_node_keeps_relaying_redirects_new_allocates_and_exits_when_done() {
    let Some(mut c) = Cluster::start("cluster_turn_drain", "") else {
        return;
    };
    c.lab.spawn(
        Host::Peer,
        "echo",
        "turnutils_peer",
        &["-L", PEER, "-p", "3480"],
    );
    std::thread::sleep(Duration::from_millis(300));
    let a = PUBLIC[0];
    let (_, user, pass) = c.login(1, "drain");
    let mut flow = c.client(a, &user, &pass);
    assert_eq!(flow.allocate().await.code(), None);
    assert_eq!(flow.permit(sa(PEER, 3480)).await.code(), None);

    // A relayed flow: one packet every 50 ms, echoed by the peer; the longest gap between
    // two echoes is what the client would feel.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let flow_task = tokio::spawn(async move {
        let mut last = Instant::now();
        let mut worst = Duration::ZERO;
        let mut echoes = 0u32;
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            flow.send(sa(PEER, 3480), b"media").await;
            if flow.recv_data(Duration::from_millis(50)).await.is_some() {
                worst = worst.max(last.elapsed());
                last = Instant::now();
                echoes += 1;
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
        }
        worst = worst.max(last.elapsed());
        (flow, worst, echoes)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;

    // A session whose login pointed at node 1: its refreshes stay there while other logins
    // move on (round-robin among equals)…
    let token = (0..6)
        .map(|i| c.login_token(1, &format!("stay{i}")))
        .find(|(_, host)| host == a)
        .expect("a login on node-1")
        .0;
    for i in 0..4 {
        assert_eq!(
            c.refresh(1, &token),
            a,
            "refresh {i} keeps the session's node"
        );
        c.login(1, &format!("other{i}"));
    }

    c.lab.signal("node1", nix::sys::signal::Signal::SIGTERM);
    let t0 = Instant::now();
    c.until(
        Duration::from_secs(3),
        "node-1 draining in node-2's view",
        |c| {
            c.nodes(1)
                .iter()
                .any(|n| n["node"] == "node-1" && n["state"] == "draining")
        },
    );
    eprintln!("node-1 seen draining by node-2 after {:?}", t0.elapsed());
    let (st, _) = c
        .lab
        .http(Host::Home1, Cluster::http_of(0), "GET", "/readyz", &[], "");
    assert_eq!(st, 503, "readyz while draining");
    // …until it drains.
    assert_ne!(
        c.refresh(1, &token),
        a,
        "a refresh moves off the draining node"
    );
    // Logins anywhere stop pointing at it.
    for i in 0..12 {
        let (host, _, _) = c.login(1 + i % 2, &format!("d{i}"));
        assert_ne!(host, a, "a login handed out the draining node");
    }
    // An Allocate on the draining node gets 300 naming a ready node; following it works.
    let (_, u2, p2) = c.login(1, "newcomer");
    let mut nc = c.client(a, &u2, &p2);
    let r = nc.allocate().await;
    assert_eq!(r.code(), Some(300), "Allocate on a draining node");
    let alt = alternate_of(&r);
    assert!(
        [PUBLIC[1], PUBLIC[2]].contains(&alt.ip().to_string().as_str()) && alt.port() == 3478,
        "alternate {alt}"
    );
    // Follow it as libwebrtc does: the same socket, REALM and NONCE copied from the 300. The
    // nodes share the nonce key, so the alternate answers at once: one more round trip.
    nc.server = alt;
    let r = nc.allocate_once().await;
    assert_eq!(
        r.code(),
        None,
        "one signed Allocate at the alternate succeeds"
    );
    assert_eq!(
        r.addr(attr::XOR_RELAYED_ADDRESS).unwrap().ip(),
        alt.ip(),
        "relayed by the alternate node"
    );
    let m = c.metrics(0);
    assert_eq!(
        metric(&m, "switchboard_turn_redirects_total{reason=\"draining\"}"),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "switchboard_cluster_node_state{state=\"draining\"}"),
        1.0
    );

    // The flow goes on through the drain; then its allocation ends and the node exits 0.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(c.lab.running("node1"), "node-1 waits for its allocation");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut flow, worst, echoes) = flow_task.await.unwrap();
    eprintln!("relayed flow through the drain: {echoes} echoes, longest gap {worst:?}");
    assert!(echoes > 20, "the flow ran ({echoes} echoes)");
    assert!(
        worst < Duration::from_secs(1),
        "gap of {worst:?} in the relayed flow"
    );
    let r = flow
        .request(method::REFRESH, &[(attr::LIFETIME, vec![0, 0, 0, 0])], None)
        .await;
    assert_eq!(r.code(), None, "refresh on the draining node");
    c.until(Duration::from_secs(5), "node-1 exits", |c| {
        !c.lab.running("node1")
    });
    assert_eq!(c.lab.exit_code("node1"), 0, "{}", c.lab.log("node1"));
    // It left the membership at once (clean exit), not after the TTL.
    c.until(
        Duration::from_secs(2),
        "node-1 gone from the records",
        |c| !c.nodes(1).iter().any(|n| n["node"] == "node-1"),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_node_leaves_login_answers_within_the_membership_ttl() {
    let Some(mut c) = Cluster::start("cluster_turn_death", "") else {
        return;
    };
    // Before: logins hand out node 3 too.
    let mut seen = false;
    for i in 0..9 {
        seen |= c.login(0, &format!("b{i}")).0 == PUBLIC[2];
    }
    assert!(seen, "node-3 is handed out while alive");
    c.lab.signal("node3", nix::sys::signal::Signal::SIGKILL);
    let t0 = Instant::now();
    // Each node reads the records on its own schedule: the logins below go to both nodes, so
    // wait until neither lists node-3.
    c.until(
        Duration::from_secs(10),
        "node-3 gone from node-1's and node-2's records",
        |c| (0..2).all(|i| !c.nodes(i).iter().any(|n| n["node"] == "node-3")),
    );
    let gone = t0.elapsed();
    eprintln!("a killed node left the login answers after {gone:?} (node_ttl_ms = 5000)");
    for i in 0..30 {
        let (host, _, _) = c.login(i % 2, &format!("a{i}"));
        assert_ne!(host, PUBLIC[2], "login {i} handed out the dead node");
    }
    assert_eq!(
        metric(&c.metrics(0), "switchboard_cluster_nodes_ready"),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_per_user_quota_counts_across_nodes_and_per_node_while_redis_is_down() {
    let Some(mut c) = Cluster::start("cluster_turn_quota", "") else {
        return;
    };
    // max_allocations_per_user = 2: two on node 1…
    let (_, user, pass) = c.login(0, "q");
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut cl = c.client(PUBLIC[0], &user, &pass);
        assert_eq!(cl.allocate().await.code(), None);
        held.push(cl);
    }
    // …the third on the same node is refused…
    let mut third = c.client(PUBLIC[0], &user, &pass);
    assert_eq!(third.allocate().await.code(), Some(486));
    // …and so it is on node 2, once node 2 has read node 1's counts.
    c.until(
        Duration::from_secs(4),
        "node-2 sees node-1's allocations",
        |c| {
            c.nodes(1)
                .iter()
                .any(|n| n["node"] == "node-1" && n["allocations"] == 2)
        },
    );
    let mut other = c.client(PUBLIC[1], &user, &pass);
    assert_eq!(
        other.allocate().await.code(),
        Some(486),
        "over the quota on another node"
    );
    // Another user is not affected.
    let (_, u2, p2) = c.login(0, "r");
    let mut r = c.client(PUBLIC[1], &u2, &p2);
    assert_eq!(r.allocate().await.code(), None);

    // Redis goes away: relaying, logins and allocations go on; after one TTL the quota is
    // counted per node (documented in docs/operations.md) and logins point at the node itself.
    c.lab.signal("redis", nix::sys::signal::Signal::SIGKILL);
    tokio::time::sleep(Duration::from_millis(6500)).await;
    let mut again = c.client(PUBLIC[1], &user, &pass);
    assert_eq!(
        again.allocate().await.code(),
        None,
        "without Redis, node 2 counts only its own allocations of the user"
    );
    let mut local3 = c.client(PUBLIC[0], &user, &pass);
    assert_eq!(
        local3.allocate().await.code(),
        Some(486),
        "node 1 still counts its own"
    );
    for (i, ip) in PUBLIC.iter().enumerate() {
        assert_eq!(
            c.login(i, &format!("x{i}")).0,
            *ip,
            "self placement without Redis"
        );
    }
    assert_eq!(
        metric(&c.metrics(0), "switchboard_cluster_nodes_ready"),
        1.0
    );
}

/// `"auto"` with no STUN answer at start: exit 2 naming the key (no lab needed: nothing
/// answers on the discard port of loopback).
#[test]
fn auto_addresses_without_a_stun_answer_stop_the_server_with_exit_2() {
    for (key, cfg) in [
        (
            "turn.relay_ip",
            "[turn]\nlisten = [\"127.0.0.1:0\"]\nrelay_ip = \"auto\"\n[http]\nlisten = \"127.0.0.1:0\"\n[public]\ndiscover_stun = [\"stun:127.0.0.1:9\"]\n",
        ),
        (
            "public.host",
            "[turn]\nlisten = [\"127.0.0.1:0\"]\n[http]\nlisten = \"127.0.0.1:0\"\n[public]\nhost = \"auto\"\ndiscover_stun = [\"stun:127.0.0.1:9\"]\n",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, cfg).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .arg("--config")
            .arg(&p)
            .env_remove("SWITCHBOARD_LAB")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{key}: {err}");
        assert!(err.contains(key), "{key} named: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_node_redirects_to_a_node_with_room_and_leaves_placement() {
    let Some(mut c) = Cluster::start("cluster_turn_capacity", "capacity_allocations = 2") else {
        return;
    };
    let mut held = Vec::new();
    for u in ["f1", "f2"] {
        let (_, user, pass) = c.login(0, u);
        let mut cl = c.client(PUBLIC[0], &user, &pass);
        assert_eq!(cl.allocate().await.code(), None);
        held.push(cl);
    }
    // Full: the third Allocate on node 1 is sent to a node with room, in one more round trip.
    let (_, user, pass) = c.login(0, "f3");
    let mut cl = c.client(PUBLIC[0], &user, &pass);
    let r = cl.allocate().await;
    assert_eq!(r.code(), Some(300), "Allocate on a full node");
    let alt = alternate_of(&r);
    assert!(
        [PUBLIC[1], PUBLIC[2]].contains(&alt.ip().to_string().as_str()),
        "{alt}"
    );
    cl.server = alt;
    assert_eq!(cl.allocate_once().await.code(), None, "at the alternate");
    assert_eq!(
        metric(
            &c.metrics(0),
            "switchboard_turn_redirects_total{reason=\"capacity\"}"
        ),
        1.0
    );
    // Once the records say so, logins stop naming the full node.
    c.until(
        Duration::from_secs(4),
        "node-1 full in node-2's view",
        |c| {
            c.nodes(1)
                .iter()
                .any(|n| n["node"] == "node-1" && n["allocations"] == 2)
        },
    );
    for i in 0..9 {
        assert_ne!(
            c.login(1, &format!("g{i}")).0,
            PUBLIC[0],
            "login {i} named the full node"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_whose_public_address_changes_learns_it_and_hands_it_out() {
    let Some(mut c) = Cluster::start("cluster_turn_address_change", "") else {
        return;
    };
    const MOVED: &str = "203.0.113.19";
    c.lab.renat_node(3, MOVED).expect("re-NAT node 3");
    // discover_interval_secs = 10: within one interval and a refresh, the record says so…
    c.until(
        Duration::from_secs(15),
        "node-3 publishes its new address",
        // Logins below go through nodes 1 and 2: both must have read it.
        |c| {
            (0..2).all(|v| {
                c.nodes(v)
                    .iter()
                    .any(|n| n["node"] == "node-3" && n["addrs"][0] == MOVED && n["host"] == MOVED)
            })
        },
    );
    assert!(
        c.lab.log("node3").contains("public address changed"),
        "{}",
        c.lab.log("node3")
    );
    // …logins hand it out, and new allocations report it.
    let mut seen = false;
    for i in 0..6 {
        let host = c.login(i % 2, &format!("m{i}")).0;
        assert_ne!(host, PUBLIC[2], "a login named node 3's old address");
        seen |= host == MOVED;
    }
    assert!(seen, "logins name node 3 at its new address");
    let (_, user, pass) = c.login(0, "moved");
    let mut cl = c.client(MOVED, &user, &pass);
    let r = cl.allocate().await;
    assert_eq!(r.code(), None);
    assert_eq!(
        r.addr(attr::XOR_RELAYED_ADDRESS).unwrap().ip().to_string(),
        MOVED
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn per_node_names_go_into_login_answers_and_addresses_into_redirects() {
    let Some(c) = Cluster::start_with(
        "cluster_turn_node_names",
        "",
        "node_host = \"{node}.turn.example.com\"",
    ) else {
        return;
    };
    let mut hosts = std::collections::BTreeSet::new();
    for i in 0..9 {
        hosts.insert(c.login(i % 3, &format!("n{i}")).0);
    }
    let want: std::collections::BTreeSet<String> = (1..=3)
        .map(|n| format!("node-{n}.turn.example.com"))
        .collect();
    assert_eq!(hosts, want, "each node by its own name");
    // ALTERNATE-SERVER carries an address: the record keeps the public one too.
    let nodes = c.nodes(0);
    for n in &nodes {
        assert_eq!(
            n["host"],
            format!("{}.turn.example.com", n["node"].as_str().unwrap())
        );
        assert!(PUBLIC.contains(&n["addrs"][0].as_str().unwrap()), "{n}");
    }
}
