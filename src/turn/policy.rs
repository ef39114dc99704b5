//! Peer address policy: which peers a relay may talk to. Deny by default for every
//! loopback, private, link-local, metadata, multicast and special range, in every spelling.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// An IPv4 or IPv6 network in CIDR notation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parse `a.b.c.d/n`, `x::y/n`, or a bare address (a host route).
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a
            .trim()
            .parse()
            .map_err(|_| format!("`{s}` is not an IP address or CIDR"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("`{s}` has a prefix length outside 0..={max}"))?,
            None => max,
        };
        Ok(Cidr { addr, prefix })
    }

    /// Whether `ip` lies inside this network (IPv4-mapped IPv6 is compared as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u32::MAX << (32 - self.prefix)
                };
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u128::MAX << (128 - self.prefix)
                };
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// Reduce IPv6 spellings of IPv4 addresses (mapped, compatible, NAT64 well-known, 6to4)
/// to the IPv4 address they reach, so one v4 rule covers them all.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let seg = v6.segments();
            // ::ffff:a.b.c.d (mapped) and ::a.b.c.d (compatible, deprecated but routable by some stacks)
            if seg[0..5] == [0, 0, 0, 0, 0] && (seg[5] == 0xffff || seg[5] == 0) {
                let v4 = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
                // Keep :: and ::1 as IPv6 so their own rules apply.
                if seg[5] == 0xffff || u32::from(v4) > 1 {
                    return IpAddr::V4(v4);
                }
            }
            // 64:ff9b::/96 NAT64 well-known prefix.
            if seg[0..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                return IpAddr::V4(Ipv4Addr::new(o[12], o[13], o[14], o[15]));
            }
            // 2002::/16 6to4 embeds the IPv4 address in bits 16..48.
            if seg[0] == 0x2002 {
                return IpAddr::V4(Ipv4Addr::new(o[2], o[3], o[4], o[5]));
            }
            IpAddr::V6(v6)
        }
    }
}

/// Ranges denied unless explicitly allowed.
pub const DEFAULT_DENY: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "::/128",
    "::1/128",
    "fc00::/7",
    "fe80::/10",
    "ff00::/8",
];

/// Loopback ranges the embedded loopback-only default allows so a local demo works.
pub const LOOPBACK: &[&str] = &["127.0.0.0/8", "::1/128"];

/// Decides whether a peer address may be relayed to.
#[derive(Debug, Clone)]
pub struct PeerPolicy {
    allow: Vec<Cidr>,
    deny: Vec<Cidr>,
    /// The server's own non-loopback addresses: reachable only on relay ports (relay-to-relay),
    /// never on its HTTP, SSH or metrics ports.
    own: Vec<IpAddr>,
    relay_ports: std::ops::RangeInclusive<u16>,
}

impl PeerPolicy {
    /// Built-in deny list plus configured extras; invalid CIDRs were rejected by config validation.
    pub fn new(allow: &[String], deny: &[String], allow_loopback: bool) -> PeerPolicy {
        let mut allow: Vec<Cidr> = allow.iter().filter_map(|c| Cidr::parse(c).ok()).collect();
        if allow_loopback {
            allow.extend(LOOPBACK.iter().filter_map(|c| Cidr::parse(c).ok()));
        }
        let deny = DEFAULT_DENY
            .iter()
            .map(|s| s.to_string())
            .chain(deny.iter().cloned())
            .filter_map(|c| Cidr::parse(&c).ok())
            .collect();
        PeerPolicy {
            allow,
            deny,
            own: Vec::new(),
            // No own addresses yet, so the range is never consulted.
            relay_ports: 0..=u16::MAX,
        }
    }

    /// Deny the server's own addresses except on `relay_ports`, so relaying into the server
    /// itself (an SSRF) is refused while two clients on this server can still relay to each
    /// other. Loopback stays under the ordinary rules (denied unless allowed).
    pub fn set_own(&mut self, own: &[IpAddr], relay_ports: std::ops::RangeInclusive<u16>) {
        let mut v: Vec<IpAddr> = own
            .iter()
            .map(|i| canonical(*i))
            .filter(|i| !i.is_loopback() && !i.is_unspecified())
            .collect();
        v.sort();
        v.dedup();
        self.own = v;
        self.relay_ports = relay_ports;
    }

    /// Whether `ip` is one of the server's own addresses.
    pub fn is_own(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.own.contains(&ip)
    }

    /// Whether relaying to `peer` (address and port) is permitted: the IP rules, and for the
    /// server's own addresses, only its relay ports.
    pub fn permits_peer(&self, peer: std::net::SocketAddr) -> bool {
        if self.is_own(peer.ip()) {
            return self.relay_ports.contains(&peer.port());
        }
        self.permits(peer.ip())
    }

    /// The per-packet half of [`PeerPolicy::permits_peer`]: a permission is per IP, so a Send
    /// indication to one of our own addresses must still name a relay port.
    pub fn port_ok(&self, peer: std::net::SocketAddr) -> bool {
        self.own.is_empty() || !self.is_own(peer.ip()) || self.relay_ports.contains(&peer.port())
    }

    /// Whether relaying to `ip` is permitted.
    pub fn permits(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        if let IpAddr::V4(v4) = ip {
            if v4.is_broadcast() {
                return self.allow.iter().any(|c| c.contains(ip));
            }
        }
        if let IpAddr::V6(v6) = ip {
            if v6 == Ipv6Addr::UNSPECIFIED {
                return false;
            }
        }
        if self.allow.iter().any(|c| c.contains(ip)) {
            return true;
        }
        !self.deny.iter().any(|c| c.contains(ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn default_denies_every_special_range_in_every_spelling() {
        let p = PeerPolicy::new(&[], &[], false);
        for bad in [
            "127.0.0.1",
            "127.255.0.9",
            "0.0.0.0",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "169.254.169.254",
            "224.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:10.0.0.1",
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::",
            "2002:c0a8:0101::1",
        ] {
            assert!(!p.permits(ip(bad)), "{bad} must be denied");
        }
        for good in [
            "8.8.8.8",
            "172.32.0.1",
            "2001:4860:4860::8888",
            "::ffff:1.1.1.1",
        ] {
            assert!(p.permits(ip(good)), "{good} must be allowed");
        }
    }

    #[test]
    fn allow_and_deny_lists_apply() {
        let p = PeerPolicy::new(&["10.5.0.0/16".into()], &["203.0.113.0/24".into()], false);
        assert!(p.permits(ip("10.5.1.1")));
        assert!(!p.permits(ip("10.6.1.1")));
        assert!(!p.permits(ip("203.0.113.7")));
        assert!(!p.permits(ip("::ffff:203.0.113.7")));
        let lo = PeerPolicy::new(&[], &[], true);
        assert!(lo.permits(ip("127.0.0.1")));
        assert!(lo.permits(ip("::1")));
        assert!(!lo.permits(ip("10.0.0.1")));
    }

    #[test]
    fn own_addresses_only_on_relay_ports() {
        let mut p = PeerPolicy::new(&["203.0.113.0/24".into()], &[], true);
        p.set_own(
            &[ip("203.0.113.10"), ip("10.0.0.5"), ip("127.0.0.1")],
            49152..=65535,
        );
        let sa = |s: &str| s.parse::<std::net::SocketAddr>().unwrap();
        assert!(!p.permits_peer(sa("203.0.113.10:8080")), "own HTTP port");
        assert!(!p.permits_peer(sa("203.0.113.10:22")));
        assert!(!p.permits_peer(sa("[::ffff:203.0.113.10]:8080")));
        assert!(p.permits_peer(sa("203.0.113.10:50000")), "relay-to-relay");
        assert!(
            p.permits_peer(sa("10.0.0.5:50000")),
            "our relay on a private address"
        );
        assert!(!p.permits_peer(sa("10.0.0.6:50000")));
        assert!(p.permits_peer(sa("203.0.113.11:8080")), "another host");
        assert!(
            p.permits_peer(sa("127.0.0.1:3480")),
            "loopback keeps its own rule"
        );
        assert!(!p.port_ok(sa("203.0.113.10:9100")));
        assert!(p.port_ok(sa("203.0.113.10:49152")));
        assert!(p.port_ok(sa("198.51.100.1:9100")));
    }

    #[test]
    fn cidr_parse_errors() {
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("::/129").is_err());
        assert!(Cidr::parse("nope").is_err());
        assert!(Cidr::parse("1.2.3.4").unwrap().contains(ip("1.2.3.4")));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("9.9.9.9")));
    }
}
