//! The `iceServers` a client is handed at login and on refresh: every enabled STUN/TURN
//! listener, in the browser `RTCIceServer` shape, with fresh time-limited TURN credentials.

use serde::Serialize;
use std::net::{IpAddr, SocketAddr};

use crate::auth::TurnCredentials;
use crate::shared::Shared;

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
    if let Some(h) = &shared.config.public.host {
        return h.clone();
    }
    let s = &shared.turn.settings;
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
        let c = ice_config_until(self, host, user, now_unix, Some(not_after));
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
    let c = &shared.config;
    let host = public_host(shared, request_host);
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
    let has_udp = c.turn.udp && !c.turn.listen.is_empty();
    let has_tcp = c.turn.tcp && !c.turn.listen.is_empty();

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
        let mut urls = Vec::with_capacity(3);
        if has_udp {
            urls.push(format!("turn:{host}:{port}?transport=udp"));
        }
        // The shared port (usually 443) right after UDP: a browser tries UDP first, and a
        // network that lets out only TCP 443 still reaches the relay; the dedicated TCP/TLS
        // ports come last and are the first cut by MAX_URLS.
        let shared_port = (!c.shared_port.listen.is_empty()).then(|| {
            c.shared_port
                .public_port
                .or(bound.shared.first().map(|a| a.port()))
                .or(c.shared_port.listen.first().map(|a| a.port()))
                .unwrap_or(443)
        });
        if let Some(sp) = shared_port {
            urls.push(format!("turns:{host}:{sp}?transport=tcp"));
            if c.shared_port.plain_turn {
                urls.push(format!("turn:{host}:{sp}?transport=tcp"));
            }
        }
        if has_tcp {
            urls.push(format!("turn:{host}:{port}?transport=tcp"));
        }
        if let Some(tp) = tls_port {
            // turns: needs a name the certificate covers; an IP works only with an IP SAN.
            urls.push(format!("turns:{host}:{tp}?transport=tcp"));
        }
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
