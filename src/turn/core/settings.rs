//! Relay addressing, limits and peer policy, derived from the `[turn]` section once.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crate::config::TurnConfig;
use crate::turn::policy::PeerPolicy;

/// Relay addressing and policy derived from config once.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Realm of the long-term credential mechanism.
    pub realm: String,
    /// Where IPv4 relay sockets bind; `None`: no IPv4 relays.
    pub relay_v4: Option<RelayBind>,
    /// Where IPv6 relay sockets bind; `None`: no IPv6 relays.
    pub relay_v6: Option<RelayBind>,
    /// `turn.relay_ip`: public address per local relay address (`None`: every local address).
    pub relay_map: Vec<(IpAddr, Option<IpAddr>)>,
    /// Relay port range.
    pub port_min: u16,
    /// Relay port range.
    pub port_max: u16,
    /// Default allocation lifetime.
    pub default_lifetime: u32,
    /// Longest lifetime granted per Allocate/Refresh.
    pub max_lifetime: u32,
    /// Absolute cap on an allocation's age, however often it is refreshed (seconds).
    pub max_age: u64,
    /// Nonce validity.
    pub nonce_lifetime: u64,
    /// Per-user allocation quota.
    pub max_per_user: u32,
    /// Process-wide allocation cap.
    pub max_total: u32,
    /// Per-allocation bandwidth cap, bytes per second.
    pub max_bps: u64,
    /// Where draining servers send new clients.
    pub alternate: Option<SocketAddr>,
    /// Peer filter.
    pub policy: PeerPolicy,
    /// SOFTWARE attribute.
    pub software: String,
    /// `turn.relay_ip = "auto"`: relayed addresses come from discovery ([`Live`]).
    pub relay_auto: bool,
    /// What discovery and cluster membership learn while the server runs.
    pub live: Arc<crate::turn::members::Live>,
}

impl Settings {
    /// Derive settings from the `[turn]` section; `allow_loopback` comes from the server
    /// (loopback-only deployments with no explicit allow list).
    pub fn from_config(t: &TurnConfig, allow_loopback: bool) -> Settings {
        let ips = || t.listen.iter().chain(t.tls_listen.iter()).map(|a| a.ip());
        let listen_v4 = ips().find(|i| i.is_ipv4());
        let listen_v6 = ips().find(|i| i.is_ipv6());
        // An unspecified listen address means "bind what the request reached"; an explicit
        // wildcard relay_bind stays a wildcard (config validation demands a relay_ip then).
        let how = |explicit: Option<IpAddr>, listen: Option<IpAddr>| match (explicit, listen) {
            (Some(b), _) => Some(RelayBind::Fixed(b)),
            (None, Some(l)) if l.is_unspecified() => Some(RelayBind::Local),
            (None, Some(l)) => Some(RelayBind::Fixed(l)),
            (None, None) => None,
        };
        Settings {
            realm: t.realm.clone(),
            relay_v4: how(t.relay_bind.filter(|i| i.is_ipv4()), listen_v4),
            relay_v6: how(
                t.relay_bind_v6.or(t.relay_bind.filter(|i| i.is_ipv6())),
                listen_v6,
            ),
            relay_map: t
                .relay_ip
                .iter()
                .filter(|r| !r.is_auto())
                .map(|r| (r.public, r.private))
                .collect(),
            port_min: t.relay_port_min,
            port_max: t.relay_port_max,
            default_lifetime: t.default_lifetime_secs,
            max_lifetime: t.max_lifetime_secs,
            max_age: t.max_allocation_age_secs,
            nonce_lifetime: t.nonce_lifetime_secs as u64,
            max_per_user: t.max_allocations_per_user,
            max_total: t.max_allocations,
            max_bps: t.max_bps_per_allocation,
            alternate: t.alternate_server,
            policy: PeerPolicy::new(&t.allow_peers, &t.deny_peers, allow_loopback),
            software: t.software.clone(),
            relay_auto: t.relay_auto(),
            live: Arc::new(crate::turn::members::Live {
                capacity: u64::from(if t.capacity_allocations == 0 {
                    t.max_allocations
                } else {
                    t.capacity_allocations
                }),
                ..Default::default()
            }),
        }
    }
}

impl Settings {
    /// Bind address and advertised address for a new relay of one family, for a client whose
    /// request reached `local`; `None` when no relay of that family can be offered.
    pub fn relay_addr(&self, v6: bool, local: Option<IpAddr>) -> Option<(IpAddr, IpAddr)> {
        let bind = match (if v6 { self.relay_v6 } else { self.relay_v4 })? {
            RelayBind::Fixed(ip) => ip,
            RelayBind::Local => local
                .map(crate::turn::policy::canonical)
                .filter(|l| l.is_ipv6() == v6 && !l.is_unspecified())?,
        };
        Some((bind, self.advertised(bind)?))
    }

    /// The address clients are told for a relay bound to `bind`: its `relay_ip` mapping,
    /// else `bind` itself; `None` for an unmapped wildcard (refused by config validation).
    pub fn advertised(&self, bind: IpAddr) -> Option<IpAddr> {
        let found = |map: &[(IpAddr, Option<IpAddr>)]| {
            let exact = map.iter().find(|(_, l)| *l == Some(bind));
            let any = || {
                map.iter()
                    .find(|(p, l)| l.is_none() && p.is_ipv4() == bind.is_ipv4())
            };
            exact.or_else(any).map(|(p, _)| *p)
        };
        // Discovered pairs name the local address that asked; a relay bound elsewhere (or on
        // a wildcard) of the same family still sits behind the same 1:1 NAT.
        let discovered = || {
            if !self.relay_auto {
                return None;
            }
            let d = self.live.discovered.load();
            found(&d).or_else(|| {
                d.iter()
                    .find(|(p, _)| p.is_ipv4() == bind.is_ipv4())
                    .map(|(p, _)| *p)
            })
        };
        match found(&self.relay_map).or_else(discovered) {
            Some(p) => Some(p),
            None => (!bind.is_unspecified()).then_some(bind),
        }
    }
}

/// How relay sockets of one address family find their local address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayBind {
    /// Always this address (`turn.relay_bind`, or a specific listen address).
    Fixed(IpAddr),
    /// The address the client's request reached (wildcard listeners), as the kernel says.
    Local,
}
