//! The `iceServers` a client is handed at login and on refresh: every enabled STUN/TURN
//! listener, in the browser `RTCIceServer` shape, with fresh time-limited TURN credentials.

use serde::Serialize;
use std::net::{IpAddr, SocketAddr};

use crate::auth::TurnCredentials;
use crate::shared::Shared;
use crate::turn::members::{NodeRecord, NodeState};

/// Browsers accept more, but every URL costs a gathering round; coturn users expect ≤ 4.
pub const MAX_URLS: usize = 4;

/// One `RTCIceServer` dictionary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IceServer {
    /// `stun:`, `turn:` or `turns:` URIs.
    pub urls: Vec<String>,
    /// TURN username (absent for STUN).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// TURN password (absent for STUN).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

/// What a client needs to reach the media servers, plus the credentials minted for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IceConfig {
    /// The `iceServers` array.
    pub servers: Vec<IceServer>,
    /// The TURN credentials inside it, if the relay is enabled.
    pub credentials: Option<TurnCredentials>,
}

/// Host to put in URIs, always one a remote client can use:
/// 1. `public.host`;
/// 2. a specific STUN/TURN listen address, through its `turn.relay_ip` mapping;
/// 3. on a wildcard listener, the host the client used to reach the HTTP API (an IP literal
///    through its `turn.relay_ip` mapping; never `0.0.0.0` or `::`);
/// 4. a `turn.relay_ip` that maps every address; else loopback (local development).
pub fn public_host(shared: &Shared, request_host: Option<&str>) -> String {
    let s = &shared.turn.settings;
    match shared.config.public.host.as_deref() {
        Some("auto") => {
            if let Some(ip) = s
                .live
                .discovered_public(false)
                .or_else(|| s.live.discovered_public(true))
            {
                return host_of(ip);
            }
        }
        Some(h) => return h.to_string(),
        None => {}
    }
    let mapped = |ip: IpAddr| host_of(s.advertised(ip).unwrap_or(ip));
    let bound = shared.bound.get();
    let first = bound.and_then(|b| b.udp.first().or(b.tcp.first()).or(b.tls.first()).copied());
    if let Some(a) = first.filter(|a| !a.ip().is_unspecified()) {
        return mapped(a.ip());
    }
    if let Some(h) = request_host.and_then(strip_port) {
        match h.trim_matches(['[', ']']).parse::<IpAddr>() {
            Ok(ip) if !ip.is_unspecified() => return mapped(ip),
            Ok(_) => {}
            Err(_) => return h,
        }
    }
    if let Some((public, _)) = s.relay_map.iter().find(|(_, private)| private.is_none()) {
        return host_of(*public);
    }
    "127.0.0.1".into()
}

/// This node's own host for per-node URIs: `public.node_host` with its id, else its public
/// address (discovered, configured or bound).
pub fn own_host(shared: &Shared) -> String {
    if let (Some(t), Some(c)) = (&shared.config.public.node_host, &shared.cluster) {
        return t.replace("{node}", c.node());
    }
    let live = &shared.turn.settings.live;
    if shared.turn.settings.relay_auto {
        if let Some(ip) = live
            .discovered_public(false)
            .or_else(|| live.discovered_public(true))
        {
            return host_of(ip);
        }
    }
    public_host(shared, None)
}

/// This node's TURN membership record, less its state and load (the cluster shell adds
/// those): what other nodes hand out and redirect to.
pub fn own_record(shared: &Shared) -> NodeRecord {
    let host = own_host(shared);
    let (port, tls_port) = ports(shared);
    let mut addrs: Vec<IpAddr> = Vec::new();
    let s = &shared.turn.settings;
    for v6 in [false, true] {
        if let Some(ip) = s.live.discovered_public(v6) {
            addrs.push(ip);
        }
    }
    let bound = shared.bound.get().cloned().unwrap_or_default();
    for a in bound.udp.iter().chain(&bound.tcp).chain(&bound.tls) {
        let ip = if a.ip().is_unspecified() {
            // A wildcard listener: the family's catch-all mapping, if any.
            s.advertised(a.ip()).filter(|i| !i.is_unspecified())
        } else {
            s.advertised(a.ip())
        };
        if let Some(ip) = ip.filter(|i| !addrs.iter().any(|x| x.is_ipv6() == i.is_ipv6())) {
            addrs.push(ip);
        }
    }
    if let Ok(ip) = host.trim_matches(['[', ']']).parse::<IpAddr>() {
        if !addrs.iter().any(|x| x.is_ipv6() == ip.is_ipv6()) {
            addrs.push(ip);
        }
    }
    let c = &shared.config;
    let turns_host = c.public.turns_host.clone().unwrap_or_else(|| host.clone());
    let uris = turn_uris(c, &host, port, &turns_host, tls_port, shared_port(shared));
    NodeRecord {
        node: String::new(),
        state: NodeState::Ready,
        host,
        uris,
        addrs,
        port,
        tls_port: tls_port.unwrap_or(0),
        allocations: 0,
        capacity: 0,
        packets_per_sec: 0.0,
        cpu: 0.0,
        at_ms: 0,
    }
}

/// A record with nothing in it, for a server that is going away.
pub fn empty_record() -> NodeRecord {
    NodeRecord {
        node: String::new(),
        state: NodeState::Draining,
        host: String::new(),
        uris: Vec::new(),
        addrs: Vec::new(),
        port: 0,
        tls_port: 0,
        allocations: 0,
        capacity: 0,
        packets_per_sec: 0.0,
        cpu: 0.0,
        at_ms: 0,
    }
}

/// The advertised STUN/TURN port and TLS port (when a TLS listener exists).
fn ports(shared: &Shared) -> (u16, Option<u16>) {
    let c = &shared.config;
    let bound = shared.bound.get().cloned().unwrap_or_default();
    let port = c
        .public
        .turn_port
        .or(bound.udp.first().or(bound.tcp.first()).map(|a| a.port()))
        .or(c.turn.listen.first().map(|a| a.port()))
        .unwrap_or(3478);
    // turns: only when a TLS listener really exists; public.turns_port only renames its port.
    let tls_port = (!c.turn.tls_listen.is_empty()).then(|| {
        c.public
            .turns_port
            .or(bound.tls.first().map(|a| a.port()))
            .or(c.turn.tls_listen.first().map(|a| a.port()))
            .unwrap_or(5349)
    });
    (port, tls_port)
}

/// The shared port a login names (`shared_port.listen`, usually 443), when one is served.
fn shared_port(shared: &Shared) -> Option<u16> {
    let c = &shared.config;
    let bound = shared.bound.get().cloned().unwrap_or_default();
    (!c.shared_port.listen.is_empty()).then(|| {
        c.shared_port
            .public_port
            .or(bound.shared.first().map(|a| a.port()))
            .or(c.shared_port.listen.first().map(|a| a.port()))
            .unwrap_or(443)
    })
}

/// `turn:` (udp, tcp) and `turns:` URIs for one host, in the order a browser should try them:
/// UDP, then the shared port (usually 443: a network that lets out only TCP 443 still reaches
/// the relay), then the dedicated TCP/TLS ports, which are the first cut by `MAX_URLS`.
fn turn_uris(
    c: &crate::config::Config,
    host: &str,
    port: u16,
    turns_host: &str,
    tls_port: Option<u16>,
    shared_port: Option<u16>,
) -> Vec<String> {
    let mut urls = Vec::with_capacity(3);
    if c.turn.udp && !c.turn.listen.is_empty() {
        urls.push(format!("turn:{host}:{port}?transport=udp"));
    }
    if let Some(sp) = shared_port {
        urls.push(format!("turns:{turns_host}:{sp}?transport=tcp"));
        if c.shared_port.plain_turn {
            urls.push(format!("turn:{host}:{sp}?transport=tcp"));
        }
    }
    if c.turn.tcp && !c.turn.listen.is_empty() {
        urls.push(format!("turn:{host}:{port}?transport=tcp"));
    }
    if let Some(tp) = tls_port {
        // turns: needs a name the certificate covers; an IP works only with an IP SAN.
        urls.push(format!("turns:{turns_host}:{tp}?transport=tcp"));
    }
    urls
}

/// The host and ports a login points at: in cluster mode this node's own address
/// (`cluster.turn_placement = "self"`) or the least loaded ready node's; else `public_host`.
/// A refresh (`refresh`) keeps the node the user's login was pointed at, unless it drains.
fn placement(
    shared: &Shared,
    request_host: Option<&str>,
    user: &str,
    refresh: bool,
    until: u64,
) -> (String, u16, Option<u16>) {
    let (port, tls_port) = ports(shared);
    let Some(_) = &shared.cluster else {
        return (public_host(shared, request_host), port, tls_port);
    };
    if shared.config.cluster.turn_placement == crate::config::TurnPlacement::LeastLoaded {
        let now = crate::turn::members::unix_ms();
        let live = &shared.turn.settings.live;
        if let Some(n) = live.place_for(user, refresh, now, until) {
            let tls = (n.tls_port != 0).then_some(n.tls_port);
            return (n.host, n.port, tls.or(tls_port));
        }
    }
    (own_host(shared), port, tls_port)
}

fn host_of(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

/// `host:port` or `[v6]:port` or `host` → host (brackets kept for IPv6).
fn strip_port(h: &str) -> Option<String> {
    let h = h.trim();
    if h.is_empty() {
        return None;
    }
    if h.starts_with('[') {
        return h.find(']').map(|i| h[..=i].to_string());
    }
    if let Ok(a) = h.parse::<SocketAddr>() {
        return Some(host_of(a.ip()));
    }
    Some(match h.rsplit_once(':') {
        Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => host.to_string(),
        _ => h.to_string(),
    })
}

/// The `ice-servers` pushes of signaling connections: the same `iceServers` as at login.
impl crate::signaling::IceSource for Shared {
    fn ice_servers(
        &self,
        host: Option<&str>,
        user: &str,
        now_unix: u64,
        not_after: u64,
    ) -> crate::signaling::IceGrant {
        let c = ice_refresh(self, host, user, now_unix, not_after);
        crate::signaling::IceGrant {
            servers: serde_json::json!(c.servers),
            credentials: c.credentials,
        }
    }
}

/// Build `iceServers` for `user`, minting TURN credentials valid for the configured TTL.
pub fn ice_config(
    shared: &Shared,
    request_host: Option<&str>,
    user: &str,
    now_unix: u64,
) -> IceConfig {
    ice_config_until(shared, request_host, user, now_unix, None)
}

/// Like [`ice_config`], with TURN credentials that expire no later than `not_after` (Unix
/// time): the end of the login they are handed to.
pub fn ice_config_until(
    shared: &Shared,
    request_host: Option<&str>,
    user: &str,
    now_unix: u64,
    not_after: Option<u64>,
) -> IceConfig {
    ice_config_placed(shared, request_host, user, now_unix, not_after, false)
}

/// Like [`ice_config_until`] for a session that already has `iceServers` (the
/// `ice-servers` refreshes): in cluster mode it keeps the node its login was pointed at,
/// unless that node drains or left.
pub fn ice_refresh(
    shared: &Shared,
    request_host: Option<&str>,
    user: &str,
    now_unix: u64,
    not_after: u64,
) -> IceConfig {
    ice_config_placed(shared, request_host, user, now_unix, Some(not_after), true)
}

fn ice_config_placed(
    shared: &Shared,
    request_host: Option<&str>,
    user: &str,
    now_unix: u64,
    not_after: Option<u64>,
    refresh: bool,
) -> IceConfig {
    let c = &shared.config;
    let until = not_after.unwrap_or(now_unix + shared.auth.session_ttl());
    let (host, port, tls_port) = placement(shared, request_host, user, refresh, until);
    let turns_host = match (&shared.cluster, &c.public.turns_host) {
        (Some(_), Some(t)) => t.clone(),
        _ => host.clone(),
    };
    let has_udp = c.turn.udp && !c.turn.listen.is_empty();

    let mut servers = Vec::with_capacity(2);
    // Browsers speak `stun:` over UDP only; a TCP-only listener gets no STUN entry.
    if has_udp {
        servers.push(IceServer {
            urls: vec![format!("stun:{host}:{port}")],
            username: None,
            credential: None,
        });
    }
    let mut credentials = None;
    if c.turn.relay {
        let mut urls = turn_uris(c, &host, port, &turns_host, tls_port, shared_port(shared));
        let room = MAX_URLS.saturating_sub(servers.iter().map(|s| s.urls.len()).sum());
        urls.truncate(room);
        if !urls.is_empty() {
            let ttl = not_after.map_or(shared.auth.turn_ttl(), |end| {
                shared
                    .auth
                    .turn_ttl()
                    .min(end.saturating_sub(now_unix))
                    .max(1)
            });
            let cred = shared.auth.turn_credentials_for(Some(user), now_unix, ttl);
            servers.push(IceServer {
                urls,
                username: Some(cred.username.clone()),
                credential: Some(cred.password.clone()),
            });
            credentials = Some(cred);
        }
    }
    IceConfig {
        servers,
        credentials,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strip_port_handles_every_host_shape() {
        assert_eq!(
            strip_port("example.com:8080").as_deref(),
            Some("example.com")
        );
        assert_eq!(strip_port("example.com").as_deref(), Some("example.com"));
        assert_eq!(strip_port("[::1]:8080").as_deref(), Some("[::1]"));
        assert_eq!(strip_port("10.0.0.1:80").as_deref(), Some("10.0.0.1"));
        assert_eq!(strip_port(""), None);
    }
}
