//! Which client a request stands for, for per-IP limits: the connection's peer, unless that
//! peer is a trusted reverse proxy (`http.trusted_proxies`), in which case the nearest
//! untrusted hop of `Forwarded` (RFC 7239) or `X-Forwarded-For`. Headers from anyone else are
//! ignored, so a client cannot pick its own rate-limit bucket.

use axum::http::HeaderMap;
use std::net::{IpAddr, Ipv6Addr};

use crate::turn::policy::{canonical, Cidr};

/// The client address of a request that arrived from `peer`.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[String]) -> IpAddr {
    let peer = canonical(peer);
    if trusted.is_empty() {
        return peer;
    }
    let trusted: Vec<Cidr> = trusted.iter().filter_map(|c| Cidr::parse(c).ok()).collect();
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    if !is_trusted(peer) {
        return peer;
    }
    let hops = forwarded_for(headers);
    let hops = if hops.is_empty() {
        x_forwarded_for(headers)
    } else {
        hops
    };
    // Walk from the proxy nearest to us outwards; the first hop we do not trust is the
    // client. An unreadable hop ends the walk at the last address we could check.
    let mut client = peer;
    for hop in hops.iter().rev() {
        match hop {
            Some(ip) if is_trusted(*ip) => client = *ip,
            Some(ip) => return *ip,
            None => break,
        }
    }
    client
}

/// The key per-IP limits use: an IPv4 address, or the /64 an IPv6 address belongs to
/// (one subscriber usually holds a whole /64).
pub fn limit_key(ip: IpAddr) -> IpAddr {
    match canonical(ip) {
        IpAddr::V6(v6) => {
            let net = u128::from(v6) & (u128::MAX << 64);
            IpAddr::V6(Ipv6Addr::from(net))
        }
        v4 => v4,
    }
}

/// `for=` values of every `Forwarded` header, in order; `None` for ones that are not an IP.
fn forwarded_for(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    headers
        .get_all("forwarded")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|elem| {
            elem.split(';').find_map(|pair| {
                let (k, v) = pair.split_once('=')?;
                k.trim()
                    .eq_ignore_ascii_case("for")
                    .then(|| parse_node(v.trim().trim_matches('"')))
            })
        })
        .collect()
}

/// Entries of every `X-Forwarded-For` header, in order.
fn x_forwarded_for(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| parse_node(s.trim()))
        .collect()
}

/// `1.2.3.4`, `1.2.3.4:5678`, `[2001:db8::1]`, `[2001:db8::1]:443` or a bare IPv6 address.
fn parse_node(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    if let Ok(sa) = s.parse::<std::net::SocketAddr>() {
        return Some(canonical(sa.ip()));
    }
    let inner = s.strip_prefix('[')?.split(']').next()?;
    inner.parse::<IpAddr>().ok().map(canonical)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        m
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn headers_are_believed_only_from_trusted_proxies() {
        let trusted = vec!["10.0.0.0/8".to_string()];
        let spoof = h(&[("x-forwarded-for", "198.51.100.1")]);
        // Not a proxy: the header is ignored.
        assert_eq!(
            client_ip(ip("203.0.113.5"), &spoof, &trusted),
            ip("203.0.113.5")
        );
        assert_eq!(client_ip(ip("10.0.0.2"), &spoof, &[]), ip("10.0.0.2"));
        // Through our proxy: the client is the rightmost untrusted hop, whatever it prepended.
        let via = h(&[("x-forwarded-for", "1.1.1.1, 203.0.113.5, 10.0.0.3")]);
        assert_eq!(client_ip(ip("10.0.0.2"), &via, &trusted), ip("203.0.113.5"));
        let two = h(&[
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", "203.0.113.6"),
        ]);
        assert_eq!(client_ip(ip("10.0.0.2"), &two, &trusted), ip("203.0.113.6"));
        // Forwarded wins over X-Forwarded-For and takes every spelling of a node.
        let fwd = h(&[
            (
                "forwarded",
                "for=1.1.1.1, for=\"[2001:db8:cafe::17]:4711\";proto=https",
            ),
            ("x-forwarded-for", "203.0.113.9"),
        ]);
        assert_eq!(
            client_ip(ip("10.0.0.2"), &fwd, &trusted),
            ip("2001:db8:cafe::17")
        );
        let fwd = h(&[("Forwarded", "for=203.0.113.7:1234;by=10.0.0.2")]);
        assert_eq!(
            client_ip(ip("::ffff:10.0.0.2"), &fwd, &trusted),
            ip("203.0.113.7")
        );
        // Unreadable hop: stop at the last address checked.
        let junk = h(&[("x-forwarded-for", "203.0.113.5, unknown, 10.0.0.3")]);
        assert_eq!(client_ip(ip("10.0.0.2"), &junk, &trusted), ip("10.0.0.3"));
        // No header at all: the proxy itself.
        assert_eq!(client_ip(ip("10.0.0.2"), &h(&[]), &trusted), ip("10.0.0.2"));
    }

    #[test]
    fn ipv6_clients_are_keyed_by_their_64() {
        assert_eq!(limit_key(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(
            limit_key(ip("2001:db8:1:2:ffff::9")),
            limit_key(ip("2001:db8:1:2::1"))
        );
        assert_ne!(
            limit_key(ip("2001:db8:1:3::1")),
            limit_key(ip("2001:db8:1:2::1"))
        );
        assert_eq!(limit_key(ip("203.0.113.5")), ip("203.0.113.5"));
        assert_eq!(limit_key(ip("::ffff:203.0.113.5")), ip("203.0.113.5"));
    }
}
