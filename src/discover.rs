//! Public address discovery for `turn.relay_ip = "auto"` and `public.host = "auto"`: a STUN
//! Binding against `public.discover_stun` tells the node the address the world sees, paired
//! with the local address that asked (the public/private form of `turn.relay_ip`). It runs
//! at start (no answer there stops the server) and every `public.discover_interval_secs`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;
use crate::lifecycle::Lifecycle;
use crate::stun::codec::{attr, method, Class, Encoder, Message};
use crate::turn::members::Live;

/// Why discovery found nothing.
#[derive(Debug, thiserror::Error)]
#[error("{key} = \"auto\": no STUN server in public.discover_stun answered with this node's public address")]
pub struct DiscoverError {
    /// The key that asked for discovery.
    pub key: &'static str,
}

/// Whether the configuration asks for discovery at all.
pub fn wanted(config: &Config) -> bool {
    config.turn.relay_auto() || config.public.host_auto()
}

/// One Binding against `target` from an unconnected socket of its family:
/// `(public, local)` where the answer came.
async fn ask(target: SocketAddr, wait: Duration) -> Option<(IpAddr, IpAddr)> {
    let bind: SocketAddr = if target.is_ipv6() {
        "[::]:0".parse().ok()?
    } else {
        "0.0.0.0:0".parse().ok()?
    };
    let sock = tokio::net::UdpSocket::bind(bind).await.ok()?;
    sock.connect(target).await.ok()?;
    let local = sock.local_addr().ok()?.ip();
    let tid: [u8; 12] = rand::random();
    let mut req = Vec::with_capacity(28);
    Encoder::new(&mut req, method::BINDING, Class::Request, &tid).finish_with_fingerprint();
    let mut buf = [0u8; 1500];
    for _ in 0..3 {
        sock.send(&req).await.ok()?;
        let deadline = tokio::time::Instant::now() + wait / 3;
        while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
            let Ok(m) = Message::parse(&buf[..n]) else {
                continue;
            };
            if m.transaction_id() != tid || m.class() != Class::Success {
                continue;
            }
            if let Some(Ok(a)) = m.xor_address(attr::XOR_MAPPED_ADDRESS) {
                return Some((crate::turn::policy::canonical(a.ip()), local));
            }
        }
    }
    None
}

/// Ask every server of `public.discover_stun` until each family has an answer:
/// `(public, local)` pairs, at most one per family.
pub async fn discover(servers: &[String]) -> Vec<(IpAddr, Option<IpAddr>)> {
    let mut found: Vec<(IpAddr, Option<IpAddr>)> = Vec::new();
    for uri in servers {
        let Some((host, port)) = crate::config::stun_target(uri) else {
            continue;
        };
        let Ok(addrs) = tokio::net::lookup_host((host.as_str(), port)).await else {
            tracing::debug!(server = %uri, "discovery: cannot resolve");
            continue;
        };
        for a in addrs {
            if found.iter().any(|(p, _)| p.is_ipv6() == a.is_ipv6()) {
                continue;
            }
            if let Some((public, local)) = ask(a, Duration::from_millis(1500)).await {
                found.push((public, Some(local)));
            }
        }
        if found.len() == 2 {
            break;
        }
    }
    found
}

/// The first discovery, before anything is bound; an error names the key that needs it.
pub async fn initial(config: &Config, live: &Live) -> Result<(), DiscoverError> {
    if !wanted(config) {
        return Ok(());
    }
    let found = discover(&config.public.discover_stun).await;
    if found.is_empty() {
        return Err(DiscoverError {
            key: if config.turn.relay_auto() {
                "turn.relay_ip"
            } else {
                "public.host"
            },
        });
    }
    for (p, l) in &found {
        tracing::info!(public = %p, local = ?l, "discovered this node's public address");
    }
    live.discovered.store(Arc::new(found));
    Ok(())
}

/// Rediscover every `public.discover_interval_secs` until shutdown; a change is logged and
/// applies to new allocations and login answers. A round with no answer keeps what was known.
pub async fn run(config: Arc<Config>, live: Arc<Live>, lifecycle: Arc<Lifecycle>) {
    if !wanted(&config) {
        return;
    }
    let every = Duration::from_secs(config.public.discover_interval_secs.max(10));
    let mut stop = lifecycle.subscribe();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let found = discover(&config.public.discover_stun).await;
        if found.is_empty() {
            tracing::warn!("public address discovery: no answer; keeping the last addresses");
            continue;
        }
        let old = live.discovered.load();
        if **old != found {
            tracing::warn!(old = ?**old, new = ?found, "this node's public address changed");
            live.discovered.store(Arc::new(found));
        }
    }
}
