//! Socket shells for the STUN/TURN port: they read bytes, hand them to the sans-IO
//! cores, and write back what the cores decide. Nothing clever lives here.

#[doc(hidden)]
#[cfg(any(test, feature = "testing"))]
pub mod harness;
pub mod shard;
pub mod tcp;
pub mod tls;
pub mod udp;

use std::sync::Arc;

/// The handles the STUN/TURN listeners use, and nothing else. `shared.rs` builds it once from
/// the server's state, so this part never sees the signaling service, the cluster or the HTTP
/// side, and a listener can be built in a test without them.
#[derive(Debug)]
pub struct Deps {
    /// `[turn]`: listener timeouts, the relay switch, SOFTWARE, the shard count.
    pub config: crate::config::TurnConfig,
    /// `tls.max_concurrent_handshakes`: TLS handshakes in flight on each `turns:` listener.
    pub max_tls_handshakes: usize,
    /// Credential checks and revocations.
    pub auth: Arc<crate::auth::Auth>,
    /// The metrics registry.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Draining and shutdown.
    pub lifecycle: Arc<crate::lifecycle::Lifecycle>,
    /// TURN relay settings and the process-wide quota/port pool.
    pub turn: TurnShared,
    /// Global and per-IP caps on TCP/TLS connections to the STUN/TURN ports.
    pub streams: Arc<tcp::StreamLimits>,
    /// The kernel fast path for ChannelData, when `turn.kernel_offload` enabled it.
    pub offload: Option<Arc<crate::turn::offload::Offload>>,
    /// Allocation events for the app backend (a no-op handle when none is configured).
    pub webhooks: crate::webhooks::Webhooks,
}

/// TURN state shared by every STUN/TURN listener.
#[derive(Debug, Clone)]
pub struct TurnShared {
    /// Relay addressing, limits and peer policy, derived from config once.
    pub settings: Arc<crate::turn::core::Settings>,
    /// Allocation quotas, used relay ports and the nonce key.
    pub pool: Arc<crate::turn::core::Pool>,
    /// RFC 6062 peer connections waiting for ConnectionBind.
    pub conns: Arc<crate::turn::relay::Conns>,
    /// The UDP shards that serve TCP/TLS clients' relay sockets on their event loops.
    pub stream_hosts: Arc<shard::StreamHosts>,
}

impl TurnShared {
    /// The relay settings (with this host's own addresses in the peer policy), an empty pool
    /// and an empty RFC 6062 waiting list, from the configuration.
    pub fn new(config: &crate::config::Config) -> TurnShared {
        let allow_loopback = config.loopback_only() && config.turn.allow_peers.is_empty();
        if allow_loopback && config.turn.relay {
            tracing::info!(
                "every listener is on loopback and turn.allow_peers is empty: \
                 the TURN relay allows loopback peers (127.0.0.0/8, ::1) for local use"
            );
        }
        let mut settings = crate::turn::core::Settings::from_config(&config.turn, allow_loopback);
        let t = &config.turn;
        let mut own = host_addresses();
        own.extend(t.listen.iter().chain(&t.tls_listen).map(|a| a.ip()));
        own.extend(t.relay_bind.iter().chain(&t.relay_bind_v6));
        own.extend(
            t.relay_ip
                .iter()
                .flat_map(|r| [Some(r.public), r.private])
                .flatten(),
        );
        own.push(config.http.listen.ip());
        settings
            .policy
            .set_own(&own, t.relay_port_min..=t.relay_port_max);
        TurnShared {
            settings: Arc::new(settings),
            pool: Arc::new(crate::turn::members::shared_nonce_key(config).map_or_else(
                crate::turn::core::Pool::new,
                crate::turn::core::Pool::with_nonce_key,
            )),
            conns: Arc::new(crate::turn::relay::Conns::new(
                config.turn.max_pending_connections_per_allocation,
            )),
            stream_hosts: Arc::default(),
        }
    }
}

/// Every address on this host's interfaces, for the peer policy's "own addresses" rule.
/// Best effort: an enumeration error yields only what the configuration names.
pub fn host_addresses() -> Vec<std::net::IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addrs
        .filter_map(|i| i.address)
        .filter_map(|a| {
            a.as_sockaddr_in()
                .map(|s| std::net::IpAddr::V4(s.ip().into()))
                .or_else(|| a.as_sockaddr_in6().map(|s| std::net::IpAddr::V6(s.ip())))
        })
        .collect()
}

/// What the first bytes of a packet on the STUN/TURN port are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A STUN message (top bits 00 and the magic cookie).
    Stun,
    /// TURN ChannelData (top bits 01).
    ChannelData,
    /// Anything else: dropped.
    Other,
}

/// Demultiplex by the first byte (RFC 7983 style) and the magic cookie.
pub fn classify(buf: &[u8]) -> Kind {
    match buf.first() {
        Some(b) if b & 0xC0 == 0 && crate::stun::codec::looks_like_stun(buf) => Kind::Stun,
        Some(b) if b & 0xC0 == 0x40 && buf.len() >= 4 => Kind::ChannelData,
        _ => Kind::Other,
    }
}

/// Answer a Binding request into `out`, counting the outcome.
pub(crate) fn answer_binding(
    metrics: &crate::metrics::Metrics,
    msg: &crate::stun::Message<'_>,
    src: std::net::SocketAddr,
    local: Option<std::net::SocketAddr>,
    software: &str,
    mapped_address: bool,
    out: &mut Vec<u8>,
) {
    let o = crate::stun::binding::respond(msg, src, local, software, mapped_address, out);
    if o != crate::stun::binding::Outcome::Ignored {
        metrics.stun_requests.with_label_values(&[o.label()]).inc();
    }
}

/// With `turn.relay = false`, TURN methods are unknown methods (RFC 8489 §6.3.1): 400.
pub(crate) fn refuse_relay_disabled(
    metrics: &crate::metrics::Metrics,
    msg: &crate::stun::Message<'_>,
    out: &mut Vec<u8>,
) {
    use crate::stun::{Class, Encoder};
    if msg.class() != Class::Request {
        return;
    }
    let tid = msg.transaction_id();
    let mut e = Encoder::new(out, msg.method(), Class::Error, &tid);
    e.error_code(400, "Bad Request: TURN relay disabled");
    e.finish();
    metrics.turn_errors.with_label_values(&["400"]).inc();
}

/// A relay socket the shells can send a client's payload through.
pub(crate) trait SendToPeer {
    /// Send `payload` to `peer`; false when the datagram was dropped.
    fn send_to_peer(&self, payload: &[u8], peer: std::net::SocketAddr) -> bool;
}

impl SendToPeer for crate::turn::relay::AnyRelay {
    fn send_to_peer(&self, payload: &[u8], peer: std::net::SocketAddr) -> bool {
        crate::turn::relay::AnyRelay::send_to_peer(self, payload, peer)
    }
}

/// Client-to-peer counters a shell accumulates and flushes once per batch.
#[derive(Debug, Default)]
pub(crate) struct PeerCounts {
    pub packets: u64,
    pub bytes: u64,
    pub no_route: u64,
}

impl PeerCounts {
    fn relayed(&mut self, sent: Option<(bool, usize)>) {
        match sent {
            Some((true, n)) => {
                self.packets += 1;
                self.bytes += n as u64;
            }
            _ => self.no_route += 1,
        }
    }

    /// Add the counts to the registry (`transport`: the clients' transport) and reset them.
    pub fn flush(&mut self, m: &crate::metrics::Metrics, transport: &'static str) {
        let c = std::mem::take(self);
        if c.packets > 0 {
            m.relay_packets_to_peer.inc_by(c.packets);
            m.relay_bytes_to_peer.inc_by(c.bytes);
            m.relay_bytes_by_transport
                .to_peer(transport)
                .inc_by(c.bytes);
        }
        if c.no_route > 0 {
            m.drops
                .with_label_values(&["no_permission"])
                .inc_by(c.no_route);
        }
    }
}

/// Forward the allocations `table` created and ended to the webhooks: the table only queues
/// them, so every shell calls this after handling requests, timeouts, revocations and close.
pub(crate) fn forward_events<R: crate::turn::core::Relay>(
    table: &mut crate::turn::core::Table<R>,
    hooks: &crate::webhooks::Webhooks,
) {
    use crate::turn::core::Event;
    while let Some(e) = table.poll_event() {
        if !hooks.enabled() {
            continue;
        }
        match e {
            Event::Created {
                allocation,
                user,
                transport,
                relay,
            } => hooks.emit(
                &allocation.clone(),
                crate::webhooks::Event::AllocationCreated {
                    allocation,
                    user,
                    transport: transport.to_string(),
                    relay_transport: relay.label().to_string(),
                },
            ),
            Event::Ended {
                allocation,
                user,
                transport,
                relay,
                reason,
                created,
                usage,
            } => hooks.allocation_ended(crate::webhooks::AllocationEnd {
                allocation: &allocation,
                user: &user,
                transport,
                relay_transport: relay.label(),
                reason: reason.label(),
                created,
                usage: &usage,
            }),
        }
    }
}

/// What a shell needs to know about the port a message arrived on.
pub(crate) struct PortCtx<'a> {
    pub metrics: &'a crate::metrics::Metrics,
    pub software: &'a str,
    /// `turn.mapped_address`: MAPPED-ADDRESS in Binding responses too.
    pub mapped_address: bool,
    /// The local address the client reached (RESPONSE-ORIGIN of Binding responses).
    pub local: Option<std::net::SocketAddr>,
}

/// The one request dispatch of the STUN/TURN port, shared by the UDP shards and the stream
/// connections: ChannelData and Send indications are relayed to the peer, Binding is answered,
/// TURN requests go to the allocation table (or get 400 with the relay off). A response, if
/// any, is appended to `out`; the table's outcome comes back for what the shell finishes: a
/// relay socket to bind ([`Outcome::Bind`](crate::turn::core::Outcome::Bind), answered with
/// `Table::bound`) and the stream-only methods (RFC 6062 Connect and ConnectionBind).
#[allow(clippy::too_many_arguments)]
pub(crate) fn dispatch<R>(
    ctx: &PortCtx<'_>,
    table: Option<&mut crate::turn::core::Table<R>>,
    env: impl FnOnce() -> crate::turn::core::Env,
    now: std::time::Instant,
    client: std::net::SocketAddr,
    pkt: &[u8],
    out: &mut Vec<u8>,
    counts: &mut PeerCounts,
) -> Option<crate::turn::core::Outcome>
where
    R: crate::turn::core::Relay + SendToPeer,
{
    match classify(pkt) {
        Kind::ChannelData => {
            relay_channel_data(table, now, client, pkt, counts);
            None
        }
        Kind::Other => {
            ctx.metrics.drops.with_label_values(&["not_stun"]).inc();
            None
        }
        Kind::Stun => match crate::stun::Message::parse(pkt) {
            Ok(msg) => dispatch_stun(ctx, table, env, now, client, &msg, out, counts),
            Err(e) => {
                ctx.metrics
                    .stun_requests
                    .with_label_values(&["malformed"])
                    .inc();
                tracing::trace!(%client, error = %e, "malformed STUN message");
                None
            }
        },
    }
}

/// Client-to-peer ChannelData: relay it if the client's allocation has the channel.
pub(crate) fn relay_channel_data<R>(
    table: Option<&mut crate::turn::core::Table<R>>,
    now: std::time::Instant,
    client: std::net::SocketAddr,
    pkt: &[u8],
    counts: &mut PeerCounts,
) where
    R: crate::turn::core::Relay + SendToPeer,
{
    let sent = table
        .and_then(|t| t.channel_data(now, client, pkt))
        .map(|(relay, peer, data)| (relay.send_to_peer(data, peer), data.len()));
    counts.relayed(sent);
}

/// [`dispatch`] for a STUN message the shell has already parsed (stream shells parse first to
/// decide whether the connection has proven itself).
#[allow(clippy::too_many_arguments)]
pub(crate) fn dispatch_stun<R>(
    ctx: &PortCtx<'_>,
    table: Option<&mut crate::turn::core::Table<R>>,
    env: impl FnOnce() -> crate::turn::core::Env,
    now: std::time::Instant,
    client: std::net::SocketAddr,
    msg: &crate::stun::Message<'_>,
    out: &mut Vec<u8>,
    counts: &mut PeerCounts,
) -> Option<crate::turn::core::Outcome>
where
    R: crate::turn::core::Relay + SendToPeer,
{
    use crate::stun::codec::{method, Class};
    if msg.method() == method::SEND && msg.class() == Class::Indication {
        let sent = table
            .and_then(|t| t.send_indication(now, client, msg))
            .map(|(relay, peer, data)| (relay.send_to_peer(data, peer), data.len()));
        counts.relayed(sent);
        return None;
    }
    if msg.method() == method::BINDING {
        answer_binding(
            ctx.metrics,
            msg,
            client,
            ctx.local,
            ctx.software,
            ctx.mapped_address,
            out,
        );
        return None;
    }
    match table {
        Some(t) => Some(t.handle_request(env(), client, msg, out)),
        None => {
            refuse_relay_disabled(ctx.metrics, msg, out);
            None
        }
    }
}
