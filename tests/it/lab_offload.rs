//! The kernel fast path for ChannelData (`turn.kernel_offload`) in the network lab: the eBPF
//! program passes the verifier of this kernel inside a namespace, relays installed channels
//! between a NATed home and a public peer in both directions while the user-space sockets
//! see nothing, counts per channel, and hands packets back to user space once an entry is
//! removed. The real binary falls back under `auto` and refuses to start under `on` when
//! the program cannot load. See tests/support/lab/mod.rs for the topology; like the other lab
//! tests these skip (loudly) where the lab cannot be built and fail there when CI=true.

use crate::support::lab;
use crate::support::turn_common;

use lab::{sa, Host, Lab, PEER, SERVER};
use std::time::{Duration, Instant};

/// A wildcard server like the shipped configs, with `kernel_offload` set by the test.
fn config(mode: &str) -> String {
    config_with(mode, "")
}

/// [`config`] with extra `[turn]` keys.
fn config_with(mode: &str, turn_extra: &str) -> String {
    format!(
        r#"
[http]
listen = "0.0.0.0:8080"
[turn]
listen = ["0.0.0.0:3478"]
relay_port_min = 50000
relay_port_max = 50999
kernel_offload = "{mode}"
{turn_extra}
[auth]
backends = ["open"]
allow_open_on_public = true
[auth.turn_users]
alice = "wonder"
"#
    )
}

/// Start the real binary in the server namespace without CAP_BPF, CAP_NET_ADMIN,
/// CAP_SYS_ADMIN and CAP_PERFMON (bounding and inheritable sets), as an unprivileged
/// deployment would run it; its log is `lab.log("switchboard")`.
fn start_without_bpf_caps(lab: &mut Lab, config: &str) {
    let path = lab.dir.path().join("switchboard.toml");
    std::fs::write(&path, config).expect("config file");
    let drop = "-bpf,-net_admin,-sys_admin,-perfmon";
    lab.spawn(
        Host::Server,
        "switchboard",
        "setpriv",
        &[
            "--inh-caps",
            drop,
            "--bounding-set",
            drop,
            "--",
            env!("CARGO_BIN_EXE_switchboard"),
            "--config",
            path.to_str().expect("utf-8 path"),
        ],
    );
}

/// Wait until the process `name` exits or HTTP answers: `Some(exit code)` or `None` (up).
fn wait_up_or_exit(lab: &mut Lab, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        if lab.tcp(Host::Server, sa(SERVER, 8080)).is_ok() {
            return None;
        }
        if !lab.running("switchboard") {
            // `ip netns exec` passes the exit status through.
            return Some(lab.exit_code("switchboard"));
        }
        assert!(
            Instant::now() < deadline,
            "switchboard neither came up nor exited:\n{}",
            lab.log("switchboard")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// coturn's client from home 1 through the server to a public echo peer: every echo back.
fn uclient_relays(lab: &mut Lab) -> turn_common::Report {
    lab.spawn(
        Host::Peer,
        "peer",
        "turnutils_peer",
        &["-L", PEER, "-p", "3480"],
    );
    std::thread::sleep(Duration::from_millis(200));
    let out = lab.output(
        Host::Home1,
        "turnutils_uclient",
        &[
            "-e", PEER, "-r", "3480", "-u", "alice", "-w", "wonder", "-n", "20", "-l", "120", "-c",
            SERVER,
        ],
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let rep = turn_common::parse_report(&text);
    assert!(rep.sent > 0, "uclient sent nothing:\n{text}");
    assert_eq!(rep.received, rep.sent, "echoes lost:\n{text}");
    rep
}

#[test]
fn auto_falls_back_to_user_space_when_the_program_cannot_load() {
    let Some(mut lab) = Lab::start("auto_falls_back_when_the_program_cannot_load") else {
        return;
    };
    start_without_bpf_caps(&mut lab, &config("auto"));
    assert_eq!(
        wait_up_or_exit(&mut lab, Duration::from_secs(20)),
        None,
        "auto must start without the capabilities:\n{}",
        lab.log("switchboard")
    );
    let log = lab.log("switchboard");
    assert_eq!(
        log.matches("kernel offload unavailable").count(),
        1,
        "one line says why:\n{log}"
    );
    uclient_relays(&mut lab);
}

#[test]
fn on_refuses_to_start_when_the_program_cannot_load() {
    let Some(mut lab) = Lab::start("on_refuses_to_start_when_the_program_cannot_load") else {
        return;
    };
    start_without_bpf_caps(&mut lab, &config("on"));
    assert_eq!(
        wait_up_or_exit(&mut lab, Duration::from_secs(20)),
        Some(2),
        "on without the capabilities is a configuration error:\n{}",
        lab.log("switchboard")
    );
    assert!(
        lab.log("switchboard").contains("kernel_offload"),
        "the error names the setting:\n{}",
        lab.log("switchboard")
    );
}

#[cfg(feature = "kernel-offload")]
mod kernel {
    use super::*;
    use lab::ROUTER1;
    use std::net::{SocketAddr, SocketAddrV4};
    use switchboard::turn::offload::{ChannelRoute, Offload};
    use tokio::net::UdpSocket;

    const CHANNEL: u16 = 0x4001;
    const RELAY_PORT: u16 = 50000;

    fn v4(a: SocketAddr) -> SocketAddrV4 {
        match a {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(a) => panic!("IPv4 expected, got {a}"),
        }
    }

    fn channel_data(channel: u16, payload: &[u8], pad: bool) -> Vec<u8> {
        let mut f = channel.to_be_bytes().to_vec();
        f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        f.extend_from_slice(payload);
        if pad {
            while f.len() % 4 != 0 {
                f.push(0);
            }
        }
        f
    }

    /// The `InCsumErrors` count of UDP in a lab host (/proc/net/snmp is per namespace).
    fn udp_checksum_errors(lab: &Lab, h: Host) -> u64 {
        let out = lab.output(h, "cat", &["/proc/net/snmp"]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let mut lines = text.lines().filter(|l| l.starts_with("Udp:"));
        let (names, values) = (lines.next().unwrap_or(""), lines.next().unwrap_or(""));
        names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(n, _)| *n == "InCsumErrors")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or_else(|| panic!("no InCsumErrors in /proc/net/snmp:\n{text}"))
    }

    /// Nothing more arrives on `s` within `wait`.
    async fn silent(s: &UdpSocket, wait: Duration) -> Result<(), (usize, SocketAddr)> {
        let mut b = [0u8; 2048];
        match tokio::time::timeout(wait, s.recv_from(&mut b)).await {
            Ok(Ok((n, from))) => Err((n, from)),
            _ => Ok(()),
        }
    }

    async fn recv(s: &UdpSocket, what: &str) -> (Vec<u8>, SocketAddr) {
        let mut b = vec![0u8; 2048];
        let (n, from) = tokio::time::timeout(Duration::from_secs(3), s.recv_from(&mut b))
            .await
            .unwrap_or_else(|_| panic!("{what}: nothing arrived"))
            .expect("recv");
        b.truncate(n);
        (b, from)
    }

    fn start_offload(lab: &Lab, addr: &str) -> Offload {
        let ip = addr.parse().expect("ip");
        lab.in_ns(Host::Server, move || Offload::start(&[ip]))
            .expect("the program loads through the verifier and attaches in the namespace")
    }

    #[test]
    fn the_program_passes_the_verifier_and_attaches_to_the_listener_interface() {
        let Some(lab) = Lab::start("offload_program_loads") else {
            return;
        };
        let o = start_offload(&lab, SERVER);
        assert_eq!(o.interfaces(), vec!["e0".to_string()]);
        drop(o);
        // A wildcard listener means every interface with an IPv4 address but loopback.
        let o = start_offload(&lab, "0.0.0.0");
        assert_eq!(o.interfaces(), vec!["e0".to_string()]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn installed_channels_are_relayed_by_the_kernel_and_removed_ones_by_user_space() {
        let Some(lab) = Lab::start("offload_relays_in_the_kernel") else {
            return;
        };
        // Senders checksum in software: a checksum-offloaded (CHECKSUM_PARTIAL) datagram,
        // which only locally generated traffic carries, stays with user space (see
        // bpf/turn_offload.c), and receivers then verify every checksum the program wrote.
        for h in [Host::Home1, Host::Peer] {
            lab.exec_ok(h, "ethtool", &["-K", "e0", "tx", "off"])
                .expect("ethtool -K e0 tx off");
        }
        // The user-space halves the kernel stands in for: the TURN listener and a relay socket.
        let listener = lab.udp(Host::Server, &format!("{SERVER}:3478"));
        let relay = lab.udp(Host::Server, &format!("{SERVER}:{RELAY_PORT}"));
        let home = lab.udp(Host::Home1, "0.0.0.0:0");
        let peer = lab.udp(Host::Peer, &format!("{PEER}:40000"));
        let offload = start_offload(&lab, SERVER);

        // The client's address as the server sees it, behind its NAT.
        home.send_to(b"hello", sa(SERVER, 3478)).await.unwrap();
        let (_, client) = recv(&listener, "hello at the listener").await;
        assert_eq!(client.ip().to_string(), ROUTER1);
        let route = ChannelRoute {
            client: v4(client),
            listener: v4(sa(SERVER, 3478)),
            channel: CHANNEL,
            relay: v4(sa(SERVER, RELAY_PORT)),
            peer: v4(sa(PEER, 40000)),
        };
        // Relay to relay (a peer on this host) must be delivered locally: user space keeps it.
        let local_peer = ChannelRoute {
            peer: v4(sa(SERVER, RELAY_PORT + 1)),
            channel: 0x4003,
            ..route
        };
        assert!(matches!(
            offload.install(&local_peer),
            Err(switchboard::turn::offload::OffloadError::LocalPeer(_))
        ));
        assert!(offload.is_empty());
        offload.install(&route).expect("install");
        assert_eq!(offload.len(), 1);
        let csum_errors = (
            udp_checksum_errors(&lab, Host::Peer),
            udp_checksum_errors(&lab, Host::Home1),
            udp_checksum_errors(&lab, Host::Router1),
        );

        // Client -> peer: odd and even sizes, with and without the optional padding.
        let mut up_bytes = 0u64;
        let sizes = [1usize, 2, 3, 4, 5, 17, 100, 333, 1000, 1400];
        for (i, &n) in sizes.iter().enumerate() {
            let payload: Vec<u8> = (0..n).map(|b| (b * 7 + i) as u8).collect();
            home.send_to(
                &channel_data(CHANNEL, &payload, i % 2 == 1),
                sa(SERVER, 3478),
            )
            .await
            .unwrap();
            let (got, from) = recv(&peer, "ChannelData relayed to the peer").await;
            assert_eq!(got, payload, "payload of {n} bytes");
            assert_eq!(from, sa(SERVER, RELAY_PORT), "sent from the relay address");
            up_bytes += n as u64;
        }
        // A channel that is not installed is not the kernel's.
        home.send_to(&channel_data(0x4002, b"other", false), sa(SERVER, 3478))
            .await
            .unwrap();
        let (got, _) = recv(&listener, "unknown channel reaches user space").await;
        assert_eq!(&got[..2], &0x4002u16.to_be_bytes());

        // Peer -> client.
        let mut down_bytes = 0u64;
        for (i, &n) in sizes.iter().enumerate() {
            let payload: Vec<u8> = (0..n).map(|b| (b * 3 + i) as u8).collect();
            peer.send_to(&payload, sa(SERVER, RELAY_PORT))
                .await
                .unwrap();
            let (got, from) = recv(&home, "ChannelData framed for the client").await;
            assert_eq!(from, sa(SERVER, 3478), "sent from the listener address");
            assert_eq!(
                got,
                channel_data(CHANNEL, &payload, false),
                "{n} bytes framed"
            );
            down_bytes += n as u64;
        }

        // User space saw none of it.
        assert_eq!(
            silent(&listener, Duration::from_millis(300)).await,
            Ok(()),
            "the listener saw offloaded ChannelData"
        );
        assert_eq!(
            silent(&relay, Duration::from_millis(100)).await,
            Ok(()),
            "the relay socket saw offloaded peer data"
        );
        // Every checksum the program wrote was verified and right.
        assert_eq!(
            (
                udp_checksum_errors(&lab, Host::Peer),
                udp_checksum_errors(&lab, Host::Home1),
                udp_checksum_errors(&lab, Host::Router1),
            ),
            csum_errors,
            "UDP checksum errors after the kernel rewrote datagrams"
        );

        // Per-channel counters, read as deltas.
        let d = offload.take_deltas();
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0].0, route);
        let c = d[0].1;
        assert_eq!(
            (c.up_packets, c.up_bytes, c.down_packets, c.down_bytes),
            (sizes.len() as u64, up_bytes, sizes.len() as u64, down_bytes)
        );
        assert!(
            offload.take_deltas().is_empty(),
            "a second read has no delta"
        );

        // One more each way, then removal: what was not yet read comes back with it.
        home.send_to(&channel_data(CHANNEL, b"last", false), sa(SERVER, 3478))
            .await
            .unwrap();
        recv(&peer, "last upstream").await;
        let last = offload.remove(&route).expect("was installed");
        assert_eq!((last.up_packets, last.up_bytes), (1, 4));
        assert!(offload.is_empty());

        // Removed: both directions are user space's again.
        let frame = channel_data(CHANNEL, b"after removal", false);
        home.send_to(&frame, sa(SERVER, 3478)).await.unwrap();
        let (got, from) = recv(&listener, "ChannelData back in user space").await;
        assert_eq!((got, from), (frame, client));
        peer.send_to(b"peer after removal", sa(SERVER, RELAY_PORT))
            .await
            .unwrap();
        let (got, _) = recv(&relay, "peer data back in user space").await;
        assert_eq!(got, b"peer after removal");
        assert_eq!(silent(&peer, Duration::from_millis(200)).await, Ok(()));
        assert_eq!(silent(&home, Duration::from_millis(100)).await, Ok(()));

        // Installed again (a refresh after expiry): the kernel has it back.
        offload.install(&route).expect("reinstall");
        home.send_to(&channel_data(CHANNEL, b"again", false), sa(SERVER, 3478))
            .await
            .unwrap();
        let (got, _) = recv(&peer, "relayed again after reinstall").await;
        assert_eq!(got, b"again");
        assert_eq!(silent(&listener, Duration::from_millis(200)).await, Ok(()));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn checksum_offloaded_datagrams_stay_in_user_space() {
        let Some(lab) = Lab::start("offload_leaves_partial_checksums") else {
            return;
        };
        // Default veth offloads: the home's datagrams carry CHECKSUM_PARTIAL all the way.
        let listener = lab.udp(Host::Server, &format!("{SERVER}:3478"));
        let home = lab.udp(Host::Home1, "0.0.0.0:0");
        let peer = lab.udp(Host::Peer, &format!("{PEER}:40000"));
        let offload = start_offload(&lab, SERVER);
        home.send_to(b"hello", sa(SERVER, 3478)).await.unwrap();
        let (_, client) = recv(&listener, "hello").await;
        offload
            .install(&ChannelRoute {
                client: v4(client),
                listener: v4(sa(SERVER, 3478)),
                channel: CHANNEL,
                relay: v4(sa(SERVER, RELAY_PORT)),
                peer: v4(sa(PEER, 40000)),
            })
            .unwrap();
        let frame = channel_data(CHANNEL, b"partial", false);
        home.send_to(&frame, sa(SERVER, 3478)).await.unwrap();
        let (got, _) = recv(&listener, "a partial-checksum datagram in user space").await;
        assert_eq!(got, frame);
        assert_eq!(silent(&peer, Duration::from_millis(200)).await, Ok(()));
    }

    /// The control plane's side: published views go into the kernel, and a permission
    /// expiry, a channel expiry and the allocation's delete each take the route back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn published_views_drive_the_kernel_entries() {
        use std::sync::Arc;
        use std::time::Instant;
        use switchboard::metrics::Metrics;
        use switchboard::turn::core::View;
        use switchboard::turn::offload::ChannelSync;

        let Some(lab) = Lab::start("offload_views_drive_entries") else {
            return;
        };
        for h in [Host::Home1, Host::Peer] {
            lab.exec_ok(h, "ethtool", &["-K", "e0", "tx", "off"])
                .expect("ethtool -K e0 tx off");
        }
        let listener = lab.udp(Host::Server, &format!("{SERVER}:3478"));
        let relay = lab.udp(Host::Server, &format!("{SERVER}:{RELAY_PORT}"));
        let home = lab.udp(Host::Home1, "0.0.0.0:0");
        let peer = lab.udp(Host::Peer, &format!("{PEER}:40000"));
        let offload = Arc::new(start_offload(&lab, "0.0.0.0"));
        let metrics = Arc::new(Metrics::new());
        home.send_to(b"hello", sa(SERVER, 3478)).await.unwrap();
        let (_, client) = recv(&listener, "hello").await;

        let now = Instant::now();
        let hour = Duration::from_secs(3600);
        let live = View {
            client: Some(client),
            perms: vec![(PEER.parse().unwrap(), now + hour)],
            channels: vec![(sa(PEER, 40000), CHANNEL, now + hour)],
            max_bps: 0,
            local: Some(SERVER.parse().unwrap()),
            owner: None,
            usage: Default::default(),
            transport: "udp",
        };
        // The wildcard listener, as in the shipped configs.
        let sync = ChannelSync::new(
            offload.clone(),
            Some(metrics.clone()),
            sa(SERVER, RELAY_PORT),
            "0.0.0.0:3478".parse().unwrap(),
        );
        let frame = channel_data(CHANNEL, b"via the view", false);
        let kernel_relays = |expect: bool, what: &'static str| {
            let (home, peer, listener, frame) = (&home, &peer, &listener, frame.clone());
            async move {
                home.send_to(&frame, sa(SERVER, 3478)).await.unwrap();
                if expect {
                    let (got, _) = recv(peer, what).await;
                    assert_eq!(got, b"via the view", "{what}");
                    assert_eq!(
                        silent(listener, Duration::from_millis(100)).await,
                        Ok(()),
                        "{what}"
                    );
                } else {
                    let (got, _) = recv(listener, what).await;
                    assert_eq!(got, frame, "{what}");
                    assert_eq!(
                        silent(peer, Duration::from_millis(100)).await,
                        Ok(()),
                        "{what}"
                    );
                }
            }
        };

        sync.publish(&live, Instant::now());
        assert_eq!(sync.installed().len(), 1);
        kernel_relays(true, "ChannelBind published: the kernel relays").await;
        // Published again unchanged (a refresh): the route and its counters stay.
        sync.publish(&live, Instant::now());
        kernel_relays(true, "refreshed: still the kernel").await;

        // The permission is gone (expired, republished): user space would drop, so the
        // kernel must not relay either.
        let mut no_perm = live.clone();
        no_perm.perms.clear();
        sync.publish(&no_perm, Instant::now());
        assert!(offload.is_empty());
        kernel_relays(false, "permission gone: back to user space").await;
        // The two kernel-relayed datagrams reached the metrics and the allocation's usage
        // when the route was removed.
        assert_eq!(metrics.relay_packets_to_peer.get(), 2);
        assert_eq!(metrics.offload_packets_to_peer.get(), 2);
        assert_eq!(
            live.usage
                .packets_to_peer
                .load(std::sync::atomic::Ordering::Relaxed),
            2
        );

        // Bound again, then the channel expires: published views carry only live channels,
        // and one that has run out is not installed even before the table republishes.
        sync.publish(&live, Instant::now());
        kernel_relays(true, "bound again after removal").await;
        let mut expiring = live.clone();
        expiring.channels[0].2 = Instant::now() + Duration::from_millis(300);
        sync.publish(&expiring, Instant::now());
        tokio::time::sleep(Duration::from_millis(400)).await;
        sync.publish(&expiring, Instant::now());
        assert!(offload.is_empty());
        kernel_relays(false, "channel expired: back to user space").await;

        // Allocation deleted: the relay drops its sync and every route goes.
        sync.publish(&live, Instant::now());
        assert_eq!(offload.len(), 1);
        kernel_relays(true, "bound once more").await;
        drop(sync);
        assert!(offload.is_empty());
        kernel_relays(false, "allocation deleted: back to user space").await;
        assert_eq!(metrics.relay_packets_to_peer.get(), 4);
        // And the relay socket gets peer data again.
        peer.send_to(b"to the relay", sa(SERVER, RELAY_PORT))
            .await
            .unwrap();
        let (got, _) = recv(&relay, "peer data in user space").await;
        assert_eq!(got, b"to the relay");
    }

    /// Start the real binary with the offload on; home 1 and the peer checksum in software
    /// (as hosts on other machines' NICs do), so their datagrams are the kernel's to relay.
    fn start_offloaded(lab: &mut Lab, turn_extra: &str) {
        for h in [Host::Home1, Host::Peer] {
            lab.exec_ok(h, "ethtool", &["-K", "e0", "tx", "off"])
                .expect("ethtool -K e0 tx off");
        }
        lab.start_switchboard(&config_with("on", turn_extra), &[], sa(SERVER, 8080));
    }

    /// `(relayed by the kernel, relayed in all)` packets in `direction`, from /metrics once
    /// the once-a-second reader of the kernel counters has run.
    fn relayed(lab: &Lab, direction: &str) -> (u64, u64) {
        let (_, m) = lab.http(Host::Peer, sa(SERVER, 8080), "GET", "/metrics", &[], "");
        let sample = |name: &str| {
            turn_common::metric(
                &m,
                &format!("switchboard_{name}{{direction=\"{direction}\"}}"),
            )
        };
        (
            sample("turn_offload_relayed_packets_total"),
            sample("turn_relayed_packets_total"),
        )
    }

    #[test]
    fn uclient_through_a_nat_is_relayed_by_the_kernel_and_not_by_user_space() {
        let Some(mut lab) = Lab::start("offload_uclient_in_the_kernel") else {
            return;
        };
        start_offloaded(&mut lab, "");
        let log = lab.log("switchboard");
        assert!(
            log.contains("turn kernel offload active") && log.contains("e0"),
            "{log}"
        );
        let rep = uclient_relays(&mut lab);
        std::thread::sleep(Duration::from_millis(1500));
        for dir in ["to_peer", "to_client"] {
            let (kernel, all) = relayed(&lab, dir);
            assert!(
                kernel >= rep.sent,
                "{dir}: the kernel relayed {kernel} of {} sent\n{}",
                rep.sent,
                lab.log("switchboard")
            );
            assert_eq!(kernel, all, "{dir}: user space relayed ChannelData too");
        }
    }

    /// A raw TURN client in home 1 with a channel to the public peer: the relay address.
    async fn bind_channel(raw: &mut turn_common::Raw) -> SocketAddr {
        use switchboard::stun::codec::{attr, method, Class};
        let r = raw.allocate("alice", "wonder").await;
        assert_eq!(r.msg().class(), Class::Success, "allocate: {:?}", r.code());
        let relay = r
            .msg()
            .xor_address(attr::XOR_RELAYED_ADDRESS)
            .expect("XOR-RELAYED-ADDRESS")
            .expect("decodes");
        let r = raw
            .request(
                method::CHANNEL_BIND,
                &[(attr::CHANNEL_NUMBER, vec![0x40, 0x01, 0, 0])],
                &[sa(PEER, 40000)],
                Some(("alice", "wonder")),
            )
            .await;
        assert_eq!(
            r.msg().class(),
            Class::Success,
            "channel bind: {:?}",
            r.code()
        );
        relay
    }

    /// One datagram each way between home and peer: both relayed, or both dropped.
    async fn both_ways(
        home: &UdpSocket,
        peer: &UdpSocket,
        relay: SocketAddr,
        expect: bool,
        what: &str,
    ) {
        let up = channel_data(CHANNEL, what.as_bytes(), false);
        home.send_to(&up, sa(SERVER, 3478)).await.unwrap();
        peer.send_to(what.as_bytes(), relay).await.unwrap();
        if expect {
            let (got, from) = recv(peer, what).await;
            assert_eq!((got.as_slice(), from), (what.as_bytes(), relay), "{what}");
            let (got, _) = recv(home, what).await;
            assert_eq!(got, channel_data(CHANNEL, what.as_bytes(), false), "{what}");
        } else {
            assert_eq!(
                silent(peer, Duration::from_millis(300)).await,
                Ok(()),
                "{what}"
            );
            assert_eq!(
                silent(home, Duration::from_millis(100)).await,
                Ok(()),
                "{what}"
            );
        }
    }

    /// The real server takes routes back on expiry (after a failed refresh) and on a
    /// Refresh with LIFETIME 0: a datagram afterwards is relayed neither by the kernel nor
    /// by user space.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn expiry_and_delete_take_the_kernel_routes_back() {
        use switchboard::stun::codec::{attr, method, Class};
        let Some(mut lab) = Lab::start("offload_expiry_and_delete") else {
            return;
        };
        // Allocations that ask for no LIFETIME get two seconds.
        start_offloaded(&mut lab, "default_lifetime_secs = 2");
        let peer = lab.udp(Host::Peer, &format!("{PEER}:40000"));
        let server = sa(SERVER, 3478);

        // Expiry: bound, relayed by the kernel, a refresh that fails, then the lifetime ends.
        let mut raw = turn_common::Raw::on(lab.udp(Host::Home1, "0.0.0.0:0"), server);
        let t0 = Instant::now();
        let relay = bind_channel(&mut raw).await;
        both_ways(&raw.sock, &peer, relay, true, "before expiry").await;
        let r = raw
            .request(
                method::REFRESH,
                &[],
                &[],
                Some(("alice", "not the password")),
            )
            .await;
        assert_eq!(r.code(), Some(401), "the refresh fails");
        tokio::time::sleep(
            (t0 + Duration::from_millis(2600)).saturating_duration_since(Instant::now()),
        )
        .await;
        both_ways(&raw.sock, &peer, relay, false, "after expiry").await;
        tokio::time::sleep(Duration::from_millis(1200)).await;
        for dir in ["to_peer", "to_client"] {
            assert_eq!(
                relayed(&lab, dir),
                (1, 1),
                "{dir}: one datagram, by the kernel"
            );
        }

        // Delete: a Refresh with LIFETIME 0 from a fresh 5-tuple's allocation.
        let mut raw = turn_common::Raw::on(lab.udp(Host::Home1, "0.0.0.0:0"), server);
        let relay = bind_channel(&mut raw).await;
        both_ways(&raw.sock, &peer, relay, true, "before delete").await;
        let r = raw
            .request(
                method::REFRESH,
                &[(attr::LIFETIME, vec![0, 0, 0, 0])],
                &[],
                Some(("alice", "wonder")),
            )
            .await;
        assert_eq!(r.msg().class(), Class::Success, "refresh 0: {:?}", r.code());
        both_ways(&raw.sock, &peer, relay, false, "after delete").await;
        tokio::time::sleep(Duration::from_millis(1200)).await;
        for dir in ["to_peer", "to_client"] {
            assert_eq!(
                relayed(&lab, dir),
                (2, 2),
                "{dir}: two datagrams, by the kernel"
            );
        }
    }

    /// On kernels before 6.6 the program hangs off the clsact qdisc, which outlives a process
    /// killed by SIGKILL. `kernel_offload_attach = "clsact"` gets that attachment on any
    /// kernel: after the SIGKILL the kernel may go on relaying the bound channel, but only
    /// until the route's deadline (at most KERNEL_LEASE after the last renewal), then never.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn after_a_sigkill_the_kernel_stops_relaying_by_the_routes_deadline() {
        use switchboard::turn::offload::KERNEL_LEASE;
        let Some(mut lab) = Lab::start("offload_sigkill_deadline") else {
            return;
        };
        start_offloaded(&mut lab, "kernel_offload_attach = \"clsact\"");
        let peer = lab.udp(Host::Peer, &format!("{PEER}:40000"));
        let mut raw = turn_common::Raw::on(lab.udp(Host::Home1, "0.0.0.0:0"), sa(SERVER, 3478));
        let relay = bind_channel(&mut raw).await;
        both_ways(&raw.sock, &peer, relay, true, "before the kill").await;

        lab.signal("switchboard", nix::sys::signal::Signal::SIGKILL);
        assert!(
            lab.wait_exit("switchboard", Duration::from_secs(10)),
            "the server did not die"
        );
        let killed = Instant::now();
        // The route was installed (or last renewed) before the kill: its deadline is at most
        // KERNEL_LEASE from now. Probe both directions until well after it.
        let end = killed + KERNEL_LEASE + Duration::from_secs(3);
        let (mut first, mut last) = (None, None);
        let up = channel_data(CHANNEL, b"after the kill", false);
        let mut b = [0u8; 2048];
        while Instant::now() < end {
            raw.sock.send_to(&up, sa(SERVER, 3478)).await.unwrap();
            peer.send_to(b"after the kill", relay).await.unwrap();
            let deadline = tokio::time::Instant::now() + Duration::from_millis(250);
            while let Ok(Ok((n, _))) =
                tokio::time::timeout_at(deadline, peer.recv_from(&mut b)).await
            {
                if &b[..n] == b"after the kill" {
                    first.get_or_insert_with(Instant::now);
                    last = Some(Instant::now());
                }
            }
            while let Ok(Ok((n, _))) =
                tokio::time::timeout(Duration::from_millis(1), raw.sock.recv_from(&mut b)).await
            {
                if b[..n] == channel_data(CHANNEL, b"after the kill", false)[..] {
                    last = Some(Instant::now());
                }
            }
        }
        let first = first.expect(
            "nothing relayed right after the SIGKILL: the clsact attachment did not outlive \
             the process, so this test shows nothing",
        );
        assert!(first < killed + Duration::from_secs(2));
        let last = last.expect("relayed after the kill");
        assert!(
            last <= killed + KERNEL_LEASE + Duration::from_millis(500),
            "the kernel still relayed {:.1?} after the SIGKILL (lease {KERNEL_LEASE:?})",
            last - killed
        );
    }

    /// Every exit that runs (here SIGTERM, which drains and returns from `main`) detaches a
    /// clsact attachment: no tc filter is left and nothing is relayed afterwards.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_clean_exit_detaches_the_clsact_program() {
        let Some(mut lab) = Lab::start("offload_exit_detaches") else {
            return;
        };
        start_offloaded(&mut lab, "kernel_offload_attach = \"clsact\"");
        let filters = |lab: &Lab| {
            let out = lab.output(
                Host::Server,
                "tc",
                &["filter", "show", "dev", "e0", "ingress"],
            );
            String::from_utf8_lossy(&out.stdout).to_string()
        };
        assert!(filters(&lab).contains("turn_ingress"), "{}", filters(&lab));
        let peer = lab.udp(Host::Peer, &format!("{PEER}:40000"));
        let mut raw = turn_common::Raw::on(lab.udp(Host::Home1, "0.0.0.0:0"), sa(SERVER, 3478));
        let relay = bind_channel(&mut raw).await;
        both_ways(&raw.sock, &peer, relay, true, "before the exit").await;
        // A second SIGTERM ends the drain at once (an allocation is still open).
        lab.signal("switchboard", nix::sys::signal::Signal::SIGTERM);
        std::thread::sleep(Duration::from_millis(300));
        lab.signal("switchboard", nix::sys::signal::Signal::SIGTERM);
        assert!(
            lab.wait_exit("switchboard", Duration::from_secs(10)),
            "the server did not exit:\n{}",
            lab.log("switchboard")
        );
        assert_eq!(
            lab.exit_code("switchboard"),
            0,
            "{}",
            lab.log("switchboard")
        );
        assert!(
            !filters(&lab).contains("turn_ingress"),
            "the program is still attached after the exit:\n{}",
            filters(&lab)
        );
        both_ways(&raw.sock, &peer, relay, false, "after the exit").await;
    }
}
