//! The sans-IO TURN allocation table (RFC 8656 with the RFC 8489 long-term credential
//! mechanism): allocations, permissions, channels, lifetimes, nonces, quotas and peer policy.
//!
//! It never touches a socket or the clock. Callers pass [`Env`] (the current `Instant`, the
//! Unix time for credential expiry, and whether the server is draining) and the parsed
//! request; the table writes the response into a caller-owned buffer. Relay sockets are
//! opened through a caller-supplied `bind` function and kept as an opaque [`Relay`] handle,
//! so dropping an allocation frees its socket.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::auth::{hmac_sha256, Auth, AuthError};
use crate::config::TurnConfig;
use crate::metrics::Metrics;
use crate::stun::codec::{
    attr, decode_u32, long_term_key, long_term_key_sha256, method, Class, Encoder, Message,
};
use crate::turn::allocation::{Alg, Alloc, Chan, Expiry, Key};
use crate::turn::policy::PeerPolicy;

/// Permission lifetime (RFC 8656 §9).
pub const PERMISSION_LIFETIME: Duration = Duration::from_secs(300);
/// Channel binding lifetime (RFC 8656 §12).
pub const CHANNEL_LIFETIME: Duration = Duration::from_secs(600);
/// How long an expired channel number and peer stay unavailable for rebinding (RFC 8656 §12).
pub const CHANNEL_COOLDOWN: Duration = Duration::from_secs(300);
/// How long an EVEN-PORT reservation is kept (RFC 8656 §7.2: about 30 seconds).
pub const RESERVATION_LIFETIME: Duration = Duration::from_secs(30);
/// Channel numbers accepted in ChannelBind. RFC 8656 allows 0x4000–0x4FFF and reserves the
/// rest, but RFC 5766 allowed up to 0x7FFF and coturn's clients still pick numbers there; the
/// upper part only matters to the client's own demultiplexing, so we accept it, like coturn.
pub const CHANNEL_NUMBERS: std::ops::RangeInclusive<u16> = 0x4000..=0x7FFF;
/// Permissions one allocation may hold, so one client cannot grow the table without bound.
pub const MAX_PERMISSIONS: usize = 256;
/// Channels one allocation may bind (the protocol allows 4096).
pub const MAX_CHANNELS: usize = 256;
/// Prefix marking an RFC 8489 nonce that carries the security feature set; `gAAA` sets the
/// "password algorithms" bit, so clients may use MESSAGE-INTEGRITY-SHA256.
const NONCE_COOKIE: &str = "obMatJos2gAAA";
/// PASSWORD-ALGORITHM numbers (RFC 8489 §18.5).
const ALG_MD5: u16 = 0x0001;
const ALG_SHA256: u16 = 0x0002;
/// UDP in REQUESTED-TRANSPORT.
const PROTO_UDP: u8 = 17;
/// TCP in REQUESTED-TRANSPORT (RFC 6062).
const PROTO_TCP: u8 = 6;

/// What kind of relay socket an allocation needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayKind {
    /// A UDP socket (RFC 8656).
    Udp,
    /// A TCP listening socket with a data connection per peer (RFC 6062).
    Tcp,
}

/// Attributes a TURN request may carry that this table understands.
const KNOWN: &[u16] = &[
    attr::USERNAME,
    attr::MESSAGE_INTEGRITY,
    attr::MESSAGE_INTEGRITY_SHA256,
    attr::REALM,
    attr::NONCE,
    attr::PASSWORD_ALGORITHM,
    attr::LIFETIME,
    attr::REQUESTED_TRANSPORT,
    attr::DONT_FRAGMENT,
    attr::EVEN_PORT,
    attr::RESERVATION_TOKEN,
    attr::REQUESTED_ADDRESS_FAMILY,
    attr::XOR_PEER_ADDRESS,
    attr::CHANNEL_NUMBER,
    attr::DATA,
    attr::SOFTWARE,
    attr::FINGERPRINT,
    attr::PRIORITY,
    attr::PADDING,
    attr::CONNECTION_ID,
];

/// What the caller knows about "now"; the table never reads a clock.
#[derive(Debug, Clone, Copy)]
pub struct Env {
    /// Monotonic time for lifetimes.
    pub now: Instant,
    /// Seconds since the Unix epoch, for credential expiry and nonces.
    pub unix: u64,
    /// The server is draining: new allocations are refused.
    pub draining: bool,
    /// The local address the request reached (IP_PKTINFO, or the accepted socket's address):
    /// relays bind it when the listener is a wildcard, and UDP replies leave from it.
    pub local: Option<IpAddr>,
}

/// A relay socket as the table sees it: an address and a place to publish what it may relay.
pub trait Relay: Send + 'static {
    /// Where the relay delivers peer data (the client's transport), set when an allocation
    /// takes the socket.
    type Sink: Clone;
    /// The address the socket is bound to.
    fn local_addr(&self) -> SocketAddr;
    /// Deliver peer data through `sink` from now on.
    fn attach(&self, sink: &Self::Sink);
    /// Make a new permission/channel snapshot visible to the peer-to-client path.
    fn publish(&self, view: Arc<View>);
    /// Set the DF bit on everything relayed to peers (DONT-FRAGMENT); an error makes the
    /// Allocate fail with 420, as RFC 8656 §7.2 asks of servers that cannot.
    fn set_dont_fragment(&self) -> std::io::Result<()> {
        Err(std::io::ErrorKind::Unsupported.into())
    }
}

/// Immutable snapshot of one allocation's permissions and channels, read by the relay task
/// on every peer packet (swapped, never mutated, so readers take no lock).
#[derive(Debug, Clone, Default)]
pub struct View {
    /// Where peer data goes; `None` while the socket is only reserved (EVEN-PORT).
    pub client: Option<SocketAddr>,
    /// Installed permissions: peer IP and expiry.
    pub perms: Vec<(IpAddr, Instant)>,
    /// Bound channels: peer, channel number, expiry.
    pub channels: Vec<(SocketAddr, u16, Instant)>,
    /// Bandwidth cap in bytes per second, 0 = unlimited.
    pub max_bps: u64,
    /// The server address the client sends to, so peer data reaches it from that address.
    pub local: Option<IpAddr>,
    /// Username of the credential the allocation was made with: only a ConnectionBind
    /// authenticated as the same user may claim its RFC 6062 peer connections.
    pub owner: Option<Arc<str>>,
    /// The allocation's relay usage, for its `allocation.ended` webhook.
    pub usage: Arc<crate::webhooks::Usage>,
    /// The client's transport (`udp|tcp|tls`), for the relayed-bytes metric.
    pub transport: &'static str,
}

impl View {
    /// Whether a live permission covers `ip`.
    pub fn permits(&self, ip: IpAddr, now: Instant) -> bool {
        self.perms.iter().any(|(p, exp)| *p == ip && *exp > now)
    }
    /// The live channel bound to `peer`, if any.
    pub fn channel_for(&self, peer: SocketAddr, now: Instant) -> Option<u16> {
        self.channels
            .iter()
            .find(|(p, _, exp)| *p == peer && *exp > now)
            .map(|(_, c, _)| *c)
    }
}

/// A token bucket for the optional per-allocation bandwidth cap (one second of burst).
#[derive(Debug, Clone)]
pub struct Bucket {
    rate: u64,
    tokens: u64,
    last: Instant,
}

impl Bucket {
    /// A bucket allowing `rate` bytes per second; 0 disables the cap.
    pub fn new(rate: u64, now: Instant) -> Bucket {
        Bucket {
            rate,
            tokens: rate,
            last: now,
        }
    }
    /// The rate in bytes per second (0: no cap).
    pub fn rate(&self) -> u64 {
        self.rate
    }
    /// Take `n` bytes if the budget allows.
    pub fn allow(&mut self, now: Instant, n: usize) -> bool {
        if self.rate == 0 {
            return true;
        }
        let el = now.saturating_duration_since(self.last);
        let add = (el.as_micros() as u64).saturating_mul(self.rate) / 1_000_000;
        if add > 0 {
            self.tokens = (self.tokens + add).min(self.rate);
            self.last = now;
        }
        if self.tokens >= n as u64 {
            self.tokens -= n as u64;
            true
        } else {
            false
        }
    }
}

/// Counters shared by every table of the process: allocation quotas, used relay ports and the
/// nonce key. Only control messages touch it, so a plain mutex is the clear choice.
#[derive(Debug)]
pub struct Pool {
    inner: Mutex<PoolInner>,
    nonce_key: [u8; 32],
}

#[derive(Default)]
struct PoolInner {
    total: u32,
    per_user: HashMap<String, u32>,
    ports: HashSet<u16>,
    /// EVEN-PORT reservations: token → (relay socket, expiry). Shared because the client
    /// redeems the token on another 5-tuple (another connection, for stream transports).
    reservations: HashMap<[u8; 8], (Box<dyn std::any::Any + Send>, u16, Instant)>,
}

impl std::fmt::Debug for PoolInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolInner")
            .field("total", &self.total)
            .field("ports", &self.ports.len())
            .field("reservations", &self.reservations.len())
            .finish()
    }
}

impl Default for Pool {
    fn default() -> Self {
        Pool::new()
    }
}

impl Pool {
    /// A fresh pool with a random nonce key.
    pub fn new() -> Pool {
        Pool {
            inner: Mutex::new(PoolInner::default()),
            nonce_key: rand::random(),
        }
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, PoolInner> {
        // A poisoned lock only means another table panicked mid-update of plain counters.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
    /// Allocations currently counted process-wide.
    pub fn total(&self) -> u32 {
        self.lock().total
    }
}

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
            relay_map: t.relay_ip.iter().map(|r| (r.public, r.private)).collect(),
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
        let exact = self.relay_map.iter().find(|(_, l)| *l == Some(bind));
        let any = || {
            self.relay_map
                .iter()
                .find(|(p, l)| l.is_none() && p.is_ipv4() == bind.is_ipv4())
        };
        match exact.or_else(any) {
            Some((p, _)) => Some(*p),
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

/// Why an allocation went away, as a metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteReason {
    /// Its lifetime ran out.
    Expired,
    /// Refresh with LIFETIME 0.
    RefreshedZero,
    /// The server shut down.
    Shutdown,
    /// The client's connection closed (stream transports).
    Closed,
    /// It reached `turn.max_allocation_age_secs`.
    MaxAge,
    /// The user was revoked through the server API.
    Revoked,
}

impl DeleteReason {
    fn label(self) -> &'static str {
        match self {
            DeleteReason::Expired => "expired",
            DeleteReason::RefreshedZero => "refreshed_zero",
            DeleteReason::Shutdown => "shutdown",
            DeleteReason::Closed => "closed",
            DeleteReason::MaxAge => "max_age",
            DeleteReason::Revoked => "revoked",
        }
    }
}

/// What a request turned into, for the caller's logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A success response was written.
    Success,
    /// An error response with this code was written.
    Error(u16),
    /// A cached response to a retransmitted Allocate was written.
    Retransmit,
    /// Nothing to answer.
    Ignored,
    /// RFC 6062 Connect accepted: the shell opens a TCP connection to this peer and reports
    /// back with [`Table::connect_done`]; nothing was written yet.
    Connect(SocketAddr),
    /// RFC 6062 ConnectionBind authenticated: a success response was written; the shell must
    /// claim this connection id (or answer 400 instead) and turn the stream into a data pipe.
    ConnectionBind(u32),
}

/// An early answer: error code and whether the request was authenticated.
struct Reject {
    code: u16,
    reason: &'static str,
}

fn reject(code: u16, reason: &'static str) -> Reject {
    Reject { code, reason }
}

/// One allocation table: all allocations of one listener (UDP socket) or connection (stream).
pub struct Table<R: Relay> {
    settings: Arc<Settings>,
    auth: Arc<Auth>,
    metrics: Arc<Metrics>,
    pool: Arc<Pool>,
    transport: &'static str,
    allocs: HashMap<SocketAddr, Alloc<R>>,
    /// Reservations this table made, ordered by expiry, for their deadline and clean-up.
    reserved: BTreeSet<(Instant, [u8; 8])>,
    /// One entry per allocation: its earliest deadline. Why: finding the next deadline and
    /// expiring what is due costs O(log n) per allocation instead of a scan of every
    /// allocation, permission and channel after each request.
    timers: BTreeSet<(Instant, SocketAddr)>,
    sink: R::Sink,
    /// The client reaches this table over a stream (TCP/TLS), so TCP relays are allowed.
    stream: bool,
    /// Username that the last ConnectionBind on this (data) connection authenticated as.
    bind_user: Option<String>,
    events: crate::webhooks::Webhooks,
}

impl<R: Relay> Table<R> {
    /// An empty table; `transport` (`udp|tcp|tls`) labels its metrics.
    pub fn new(
        settings: Arc<Settings>,
        auth: Arc<Auth>,
        metrics: Arc<Metrics>,
        pool: Arc<Pool>,
        transport: &'static str,
        sink: R::Sink,
    ) -> Table<R> {
        Table {
            settings,
            auth,
            metrics,
            pool,
            transport,
            allocs: HashMap::new(),
            reserved: BTreeSet::new(),
            timers: BTreeSet::new(),
            sink,
            stream: false,
            bind_user: None,
            events: crate::webhooks::Webhooks::disabled(),
        }
    }

    /// Report allocations created and ended (with their usage) to `events`.
    pub fn set_events(&mut self, events: crate::webhooks::Webhooks) {
        self.events = events;
    }

    /// End now every allocation whose user was revoked since its credential was issued;
    /// returns how many ended.
    pub fn sweep_revoked(&mut self) -> usize {
        let gone: Vec<SocketAddr> = self
            .allocs
            .iter()
            .filter(|(_, a)| self.auth.turn_user_revoked(&a.key.username))
            .map(|(c, _)| *c)
            .collect();
        for c in &gone {
            self.delete(*c, DeleteReason::Revoked);
        }
        gone.len()
    }

    /// Mark this table as serving a stream connection, which may ask for TCP relays.
    pub fn set_stream(&mut self) {
        self.stream = true;
    }

    /// Number of live allocations in this table.
    pub fn len(&self) -> usize {
        self.allocs.len()
    }

    /// Whether the table holds no allocation.
    pub fn is_empty(&self) -> bool {
        self.allocs.is_empty()
    }

    /// The earliest instant at which [`Table::handle_timeout`] has work to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        let a = self.timers.first().map(|(t, _)| *t);
        let r = self.reserved.first().map(|(t, _)| *t);
        match (a, r) {
            (Some(a), Some(r)) => Some(a.min(r)),
            (a, r) => a.or(r),
        }
    }

    /// Put the allocation of `client` in the timer queue at its current earliest deadline.
    fn reschedule(&mut self, client: SocketAddr) {
        let Some(a) = self.allocs.get_mut(&client) else {
            return;
        };
        let d = a.poll_timeout();
        if a.timer != Some(d) {
            if let Some(old) = a.timer.replace(d) {
                self.timers.remove(&(old, client));
            }
            self.timers.insert((d, client));
        }
    }

    /// The relay socket of `client`'s allocation (the shell hands its RFC 6062 peer
    /// connections the allocation's limits and lifetime).
    pub fn relay(&self, client: SocketAddr) -> Option<&R> {
        self.allocs.get(&client).map(|a| &a.relay)
    }

    /// The username the last successful ConnectionBind authenticated as: the shell lets it
    /// claim only connections of an allocation made by the same user.
    pub fn bind_user(&self) -> Option<&str> {
        self.bind_user.as_deref()
    }

    /// The relayed address advertised for the allocation of `client`, if any.
    pub fn relayed_address(&self, client: SocketAddr) -> Option<SocketAddr> {
        self.allocs.get(&client).map(|a| a.advertised)
    }

    /// Handle one STUN request (Allocate, Refresh, CreatePermission, ChannelBind) from
    /// `client`, appending the response to `out`. `bind` opens a relay socket on an address.
    pub fn handle_request(
        &mut self,
        env: Env,
        client: SocketAddr,
        msg: &Message<'_>,
        out: &mut Vec<u8>,
        bind: &mut dyn FnMut(SocketAddr, RelayKind) -> std::io::Result<R>,
    ) -> Outcome {
        if msg.class() != Class::Request {
            return Outcome::Ignored;
        }
        let m = msg.method();
        let tcp_methods = self.stream && matches!(m, method::CONNECT | method::CONNECTION_BIND);
        if !tcp_methods
            && !matches!(
                m,
                method::ALLOCATE
                    | method::REFRESH
                    | method::CREATE_PERMISSION
                    | method::CHANNEL_BIND
            )
        {
            return self.error(out, msg, None, Alg::Md5, reject(400, "Bad Request"), env);
        }
        // A retransmitted Allocate gets the cached response before anything else.
        if m == method::ALLOCATE {
            if let Some(a) = self.allocs.get(&client) {
                if a.alloc_tid == msg.transaction_id() && !a.alloc_resp.is_empty() {
                    out.extend_from_slice(&a.alloc_resp);
                    return Outcome::Retransmit;
                }
            }
        }
        let (key, alg) = match self.authenticate(env, client, msg) {
            Ok(k) => k,
            Err(r) => return self.error(out, msg, None, Alg::Md5, r, env),
        };
        let mut unknown = [0u16; 8];
        let n = msg.unknown_required(KNOWN, &mut unknown);
        if n > 0 {
            let tid = msg.transaction_id();
            let mut e = Encoder::new(out, m, Class::Error, &tid);
            e.error_code(420, "Unknown Attribute");
            e.unknown_attributes(&unknown[..n]);
            sign(&mut e, &key, alg);
            finish(e, msg);
            self.count_error(420);
            return Outcome::Error(420);
        }
        if m == method::CONNECT {
            return match self.connect(env, client, msg, alg) {
                Ok(peer) => Outcome::Connect(peer),
                Err(rej) => self.error(out, msg, Some(&key), alg, rej, env),
            };
        }
        if m == method::CONNECTION_BIND {
            let id = match msg.get(attr::CONNECTION_ID).map(decode_u32) {
                Some(Ok(id)) if self.allocs.is_empty() => id,
                _ => return self.error(out, msg, Some(&key), alg, reject(400, "Bad Request"), env),
            };
            self.signed_success(out, method::CONNECTION_BIND, None, msg, &key, alg);
            self.bind_user = Some(key.username.clone());
            return Outcome::ConnectionBind(id);
        }
        let r = match m {
            method::ALLOCATE => self.allocate(env, client, msg, &key, alg, out, bind),
            method::REFRESH => self.refresh(env, client, msg, &key, alg, out),
            method::CREATE_PERMISSION => self.create_permission(env, client, msg, &key, alg, out),
            _ => self.channel_bind(env, client, msg, &key, alg, out),
        };
        self.reschedule(client);
        match r {
            Ok(()) => Outcome::Success,
            Err(rej) => self.error(out, msg, Some(&key), alg, rej, env),
        }
    }

    fn count_error(&self, code: u16) {
        let mut b = itoa_buf();
        self.metrics
            .turn_errors
            .with_label_values(&[fmt_code(code, &mut b)])
            .inc();
    }

    fn error(
        &self,
        out: &mut Vec<u8>,
        msg: &Message<'_>,
        key: Option<&Key>,
        alg: Alg,
        r: Reject,
        env: Env,
    ) -> Outcome {
        tracing::debug!(
            method = msg.method(),
            code = r.code,
            reason = r.reason,
            "TURN error response"
        );
        let tid = msg.transaction_id();
        let mut e = Encoder::new(out, msg.method(), Class::Error, &tid);
        e.error_code(r.code, r.reason);
        match r.code {
            401 | 438 => {
                e.attr(attr::REALM, self.settings.realm.as_bytes());
                let nonce = self.make_nonce(env.unix);
                e.attr(attr::NONCE, nonce.as_bytes());
                let mut algs = [0u8; 8];
                algs[0..2].copy_from_slice(&ALG_MD5.to_be_bytes());
                algs[4..6].copy_from_slice(&ALG_SHA256.to_be_bytes());
                e.attr(attr::PASSWORD_ALGORITHMS, &algs);
            }
            300 => {
                if let Some(alt) = self.settings.alternate {
                    e.address(attr::ALTERNATE_SERVER, alt);
                }
            }
            // Only DONT-FRAGMENT reaches here as an unsupported attribute.
            420 => {
                e.unknown_attributes(&[attr::DONT_FRAGMENT]);
            }
            _ => {}
        }
        e.attr(attr::SOFTWARE, self.settings.software.as_bytes());
        if let Some(k) = key {
            sign(&mut e, k, alg);
        }
        finish(e, msg);
        self.count_error(r.code);
        Outcome::Error(r.code)
    }

    fn make_nonce(&self, unix: u64) -> String {
        let mac = hmac_sha256(&self.pool.nonce_key, &unix.to_be_bytes());
        let mut s = String::with_capacity(NONCE_COOKIE.len() + 32);
        s.push_str(NONCE_COOKIE);
        s.push_str(&format!("{unix:016x}"));
        for b in &mac[..8] {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    /// Whether a nonce is ours and still fresh.
    fn nonce_fresh(&self, nonce: &[u8], unix: u64) -> Result<(), Reject> {
        let stale = reject(438, "Stale Nonce");
        let s = std::str::from_utf8(nonce).map_err(|_| reject(438, "Stale Nonce"))?;
        let rest = s
            .strip_prefix(NONCE_COOKIE)
            .ok_or(reject(438, "Stale Nonce"))?;
        if rest.len() != 32 {
            return Err(stale);
        }
        let ts = u64::from_str_radix(&rest[..16], 16).map_err(|_| reject(438, "Stale Nonce"))?;
        let want = self.make_nonce(ts);
        if !crate::auth::secret_eq(want.as_bytes(), s.as_bytes()) {
            return Err(stale);
        }
        if ts > unix.saturating_add(5) || unix.saturating_sub(ts) >= self.settings.nonce_lifetime {
            return Err(stale);
        }
        Ok(())
    }

    fn auth_fail(&self, e: AuthError) -> Reject {
        self.metrics
            .auth_failures
            .with_label_values(&[e.reason()])
            .inc();
        reject(401, "Unauthorized")
    }

    /// RFC 8489 §9.2.4 long-term credential checks.
    fn authenticate(
        &self,
        env: Env,
        client: SocketAddr,
        msg: &Message<'_>,
    ) -> Result<(Key, Alg), Reject> {
        if !msg.has_integrity() && !msg.has_integrity_sha256() {
            return Err(self.auth_fail(AuthError::Missing));
        }
        let (Some(user), Some(realm), Some(nonce)) = (
            msg.get(attr::USERNAME),
            msg.get(attr::REALM),
            msg.get(attr::NONCE),
        ) else {
            return Err(reject(400, "Bad Request"));
        };
        let alg = if msg.has_integrity_sha256() {
            Alg::Sha256
        } else {
            Alg::Md5
        };
        if let Some(pa) = msg.get(attr::PASSWORD_ALGORITHM) {
            let num = pa.get(0..2).map(|b| u16::from_be_bytes([b[0], b[1]]));
            match (num, alg) {
                (Some(ALG_MD5), Alg::Md5) | (Some(ALG_SHA256), Alg::Sha256) => {}
                (Some(ALG_MD5 | ALG_SHA256), _) if msg.has_integrity() => {}
                _ => return Err(reject(400, "Bad Request")),
            }
        }
        self.nonce_fresh(nonce, env.unix)?;
        let user = std::str::from_utf8(user).map_err(|_| self.auth_fail(AuthError::Malformed))?;
        if realm != self.settings.realm.as_bytes() {
            return Err(self.auth_fail(AuthError::UnknownUser));
        }
        let verify = |k: &Key| match alg {
            Alg::Md5 => msg.verify_integrity(&k.md5),
            Alg::Sha256 => msg.verify_integrity_sha256(&k.sha256),
        };
        // Requests on an existing allocation are checked with the key it was created with.
        if let Some(a) = self.allocs.get(&client) {
            if msg.method() != method::ALLOCATE {
                if a.key.username != user {
                    self.metrics
                        .auth_failures
                        .with_label_values(&["wrong_credentials"])
                        .inc();
                    return Err(reject(441, "Wrong Credentials"));
                }
                if !verify(&a.key) {
                    return Err(self.auth_fail(AuthError::BadSignature));
                }
                return Ok((a.key.clone(), alg));
            }
        }
        let passwords = self
            .auth
            .turn_passwords(user, Some(env.unix))
            .map_err(|e| self.auth_fail(e))?;
        let realm = self.settings.realm.as_str();
        for pw in passwords {
            let k = Key {
                username: user.to_string(),
                md5: long_term_key(user, realm, &pw),
                sha256: long_term_key_sha256(user, realm, &pw),
            };
            if verify(&k) {
                return Ok((k, alg));
            }
        }
        Err(self.auth_fail(AuthError::BadSignature))
    }

    #[allow(clippy::too_many_arguments)]
    fn allocate(
        &mut self,
        env: Env,
        client: SocketAddr,
        msg: &Message<'_>,
        key: &Key,
        alg: Alg,
        out: &mut Vec<u8>,
        bind: &mut dyn FnMut(SocketAddr, RelayKind) -> std::io::Result<R>,
    ) -> Result<(), Reject> {
        if self.allocs.contains_key(&client) {
            return Err(reject(437, "Allocation Mismatch"));
        }
        let proto = msg
            .get(attr::REQUESTED_TRANSPORT)
            .ok_or(reject(400, "Bad Request"))?;
        if proto.len() != 4 {
            return Err(reject(400, "Bad Request"));
        }
        let kind = match proto[0] {
            PROTO_UDP => RelayKind::Udp,
            PROTO_TCP if self.stream => RelayKind::Tcp,
            _ => return Err(reject(442, "Unsupported Transport Protocol")),
        };
        if kind == RelayKind::Tcp
            && (msg.get(attr::DONT_FRAGMENT).is_some()
                || msg.get(attr::EVEN_PORT).is_some()
                || msg.get(attr::RESERVATION_TOKEN).is_some())
        {
            return Err(reject(400, "Bad Request"));
        }
        if let Some(df) = msg.get(attr::DONT_FRAGMENT) {
            if !df.is_empty() {
                return Err(reject(400, "Bad Request"));
            }
        }
        let token = msg.get(attr::RESERVATION_TOKEN);
        let even = msg.get(attr::EVEN_PORT);
        let family = msg.get(attr::REQUESTED_ADDRESS_FAMILY);
        if token.is_some() && (even.is_some() || family.is_some()) {
            return Err(reject(400, "Bad Request"));
        }
        let token: Option<[u8; 8]> = match token {
            Some(t) => Some(t.try_into().map_err(|_| reject(400, "Bad Request"))?),
            None => None,
        };
        let reserve_next = match even {
            Some([b]) => b & 0x80 != 0,
            Some(_) => return Err(reject(400, "Bad Request")),
            None => false,
        };
        let v6 = match family {
            None => false,
            Some([0x01, 0, 0, 0]) => false,
            Some([0x02, 0, 0, 0]) => true,
            Some(v) if v.len() == 4 && v[1..] == [0, 0, 0] => {
                return Err(reject(440, "Address Family not Supported"))
            }
            Some(_) => return Err(reject(400, "Bad Request")),
        };
        let lifetime = self
            .lifetime(msg)?
            .min(self.settings.max_age.min(u32::MAX as u64) as u32);
        if env.draining {
            return Err(if self.settings.alternate.is_some() {
                reject(300, "Try Alternate")
            } else {
                reject(508, "Insufficient Capacity")
            });
        }
        let (bind_ip, adv_ip) = match token {
            Some(_) => (IpAddr::from([0u8; 4]), IpAddr::from([0u8; 4])),
            None => self
                .settings
                .relay_addr(v6, env.local)
                .ok_or(reject(440, "Address Family not Supported"))?,
        };
        let quota_user = quota_name(&key.username).to_string();
        {
            let mut p = self.pool.lock();
            if p.per_user.get(&quota_user).copied().unwrap_or(0) >= self.settings.max_per_user {
                drop(p);
                self.metrics
                    .turn_allocations_deleted
                    .with_label_values(&["quota"])
                    .inc();
                return Err(reject(486, "Allocation Quota Reached"));
            }
            if p.total >= self.settings.max_total {
                return Err(reject(508, "Insufficient Capacity"));
            }
            p.total += 1;
            *p.per_user.entry(quota_user.clone()).or_insert(0) += 1;
        }
        let mut new_token = None;
        let relay = match token {
            Some(t) => {
                let taken = self.pool.lock().reservations.remove(&t);
                match taken {
                    Some((r, _, exp)) if exp > env.now => r
                        .downcast::<R>()
                        .map(|b| *b)
                        .map_err(|_| reject(508, "Insufficient Capacity")),
                    Some((_, port, _)) => {
                        self.release_port(port);
                        Err(reject(508, "Insufficient Capacity"))
                    }
                    None => Err(reject(508, "Insufficient Capacity")),
                }
            }
            None => self
                .open_relay(env, bind_ip, kind, even.is_some(), reserve_next, bind)
                .map(|(r, t)| {
                    new_token = t;
                    r
                }),
        };
        let relay = match relay {
            Ok(r) => r,
            Err(e) => {
                self.unquota(&quota_user);
                return Err(e);
            }
        };
        if msg.get(attr::DONT_FRAGMENT).is_some() {
            if let Err(e) = relay.set_dont_fragment() {
                tracing::debug!(error = %e, "DONT-FRAGMENT cannot be applied; 420");
                let port = relay.local_addr().port();
                drop(relay);
                self.release_port(port);
                self.unquota(&quota_user);
                return Err(reject(420, "Unknown Attribute"));
            }
        }
        relay.attach(&self.sink);
        let local = relay.local_addr();
        let adv_ip = if token.is_some() {
            self.settings.advertised(local.ip()).unwrap_or(local.ip())
        } else {
            adv_ip
        };
        let advertised = SocketAddr::new(adv_ip, local.port());
        let span = tracing::info_span!("allocation", %client, relay = %advertised, transport = self.transport);
        span.in_scope(|| tracing::debug!(lifetime, user = %quota_user, "allocation created"));
        let tid = msg.transaction_id();
        let start = out.len();
        {
            let mut e = Encoder::new(out, method::ALLOCATE, Class::Success, &tid);
            e.xor_address(attr::XOR_RELAYED_ADDRESS, advertised);
            e.xor_address(attr::XOR_MAPPED_ADDRESS, client);
            e.u32_attr(attr::LIFETIME, lifetime);
            if let Some(t) = new_token {
                e.attr(attr::RESERVATION_TOKEN, &t);
            }
            e.attr(attr::SOFTWARE, self.settings.software.as_bytes());
            sign(&mut e, key, alg);
            finish(e, msg);
        }
        let a = Alloc {
            relay,
            kind,
            pending_connect: None,
            advertised,
            client_local: env.local,
            expires: env.now + Duration::from_secs(lifetime as u64),
            born: env.now,
            key: key.clone(),
            quota_user,
            perms: Vec::new(),
            chans: Vec::new(),
            alloc_tid: tid,
            alloc_resp: out[start..].to_vec(),
            bucket: Bucket::new(self.settings.max_bps, env.now),
            span,
            id: crate::webhooks::new_id(),
            created: env.now,
            usage: Arc::default(),
            timer: None,
        };
        if self.events.enabled() {
            self.events.emit(
                &a.id,
                crate::webhooks::Event::AllocationCreated {
                    allocation: a.id.clone(),
                    user: a.quota_user.clone(),
                    transport: self.transport.to_string(),
                    relay_transport: kind_label(kind).to_string(),
                },
            );
        }
        self.publish(client, &a);
        self.allocs.insert(client, a);
        self.reschedule(client);
        self.metrics
            .turn_allocations_created
            .with_label_values(&[self.transport])
            .inc();
        self.metrics
            .turn_allocations_active
            .with_label_values(&[self.transport])
            .inc();
        Ok(())
    }

    fn unquota(&self, user: &str) {
        let mut p = self.pool.lock();
        p.total = p.total.saturating_sub(1);
        if let Some(n) = p.per_user.get_mut(user) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                p.per_user.remove(user);
            }
        }
    }

    fn release_port(&self, port: u16) {
        self.pool.lock().ports.remove(&port);
    }

    /// Pick free ports (even, and the next one reserved, when asked) and bind them.
    fn open_relay(
        &mut self,
        env: Env,
        ip: IpAddr,
        kind: RelayKind,
        even: bool,
        pair: bool,
        bind: &mut dyn FnMut(SocketAddr, RelayKind) -> std::io::Result<R>,
    ) -> Result<(R, Option<[u8; 8]>), Reject> {
        let (lo, hi) = (self.settings.port_min as u32, self.settings.port_max as u32);
        let span = hi - lo + 1;
        let exhausted = reject(508, "Insufficient Capacity");
        for _ in 0..32 {
            let picked = {
                let mut p = self.pool.lock();
                let start: u32 = rand::random::<u32>() % span;
                let mut found = None;
                for i in 0..span {
                    let port = lo + (start + i) % span;
                    if even && port % 2 == 1 {
                        continue;
                    }
                    if p.ports.contains(&(port as u16)) {
                        continue;
                    }
                    if pair && (port + 1 > hi || p.ports.contains(&((port + 1) as u16))) {
                        continue;
                    }
                    found = Some(port as u16);
                    break;
                }
                let port = found.ok_or(reject(508, "Insufficient Capacity"))?;
                p.ports.insert(port);
                if pair {
                    p.ports.insert(port + 1);
                }
                port
            };
            let r = match bind(SocketAddr::new(ip, picked), kind) {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(port = picked, error = %e, "relay port busy, trying another");
                    // Leave a port another process holds marked as used for this table's
                    // lifetime would leak it; release it and rely on the random start.
                    self.release_port(picked);
                    if pair {
                        self.release_port(picked + 1);
                    }
                    continue;
                }
            };
            let mut token = None;
            if pair {
                match bind(SocketAddr::new(ip, picked + 1), kind) {
                    Ok(second) => {
                        let t: [u8; 8] = rand::random();
                        let exp = env.now + RESERVATION_LIFETIME;
                        self.pool
                            .lock()
                            .reservations
                            .insert(t, (Box::new(second), picked + 1, exp));
                        self.reserved.insert((exp, t));
                        token = Some(t);
                    }
                    Err(_) => {
                        drop(r);
                        self.release_port(picked);
                        self.release_port(picked + 1);
                        continue;
                    }
                }
            }
            return Ok((r, token));
        }
        Err(exhausted)
    }

    fn lifetime(&self, msg: &Message<'_>) -> Result<u32, Reject> {
        match msg.get(attr::LIFETIME) {
            None => Ok(self.settings.default_lifetime),
            Some(v) => {
                let l = decode_u32(v).map_err(|_| reject(400, "Bad Request"))?;
                if l == 0 {
                    return Ok(0);
                }
                Ok(l.clamp(self.settings.default_lifetime, self.settings.max_lifetime))
            }
        }
    }

    fn refresh(
        &mut self,
        env: Env,
        client: SocketAddr,
        msg: &Message<'_>,
        key: &Key,
        alg: Alg,
        out: &mut Vec<u8>,
    ) -> Result<(), Reject> {
        let lifetime = self.lifetime(msg)?;
        let Some(a) = self.allocs.get_mut(&client) else {
            return Err(reject(437, "Allocation Mismatch"));
        };
        if let Some(f) = msg.get(attr::REQUESTED_ADDRESS_FAMILY) {
            let want_v6 = match f {
                [0x01, 0, 0, 0] => false,
                [0x02, 0, 0, 0] => true,
                _ => return Err(reject(400, "Bad Request")),
            };
            if want_v6 != a.advertised.is_ipv6() {
                return Err(reject(443, "Peer Address Family Mismatch"));
            }
        }
        // However often it is refreshed, an allocation ends at its maximum age.
        let end = a.born + Duration::from_secs(self.settings.max_age);
        let left = end.saturating_duration_since(env.now).as_secs();
        if lifetime > 0 && left == 0 {
            self.delete(client, DeleteReason::MaxAge);
            return Err(reject(437, "Allocation Mismatch: maximum age reached"));
        }
        let lifetime = (lifetime as u64).min(left) as u32;
        if lifetime == 0 {
            self.delete(client, DeleteReason::RefreshedZero);
        } else {
            a.expires = (env.now + Duration::from_secs(lifetime as u64)).min(end);
            a.span
                .in_scope(|| tracing::debug!(lifetime, "allocation refreshed"));
        }
        self.signed_success(out, method::REFRESH, Some(lifetime), msg, key, alg);
        Ok(())
    }

    /// Validate an XOR-PEER-ADDRESS against the allocation's family and the peer policy.
    fn check_peer(&self, a: &Alloc<R>, peer: SocketAddr) -> Result<(), Reject> {
        if peer.is_ipv6() != a.advertised.is_ipv6() {
            return Err(reject(443, "Peer Address Family Mismatch"));
        }
        if !self.settings.policy.permits_peer(peer) {
            return Err(reject(403, "Forbidden"));
        }
        Ok(())
    }

    fn create_permission(
        &mut self,
        env: Env,
        client: SocketAddr,
        msg: &Message<'_>,
        key: &Key,
        alg: Alg,
        out: &mut Vec<u8>,
    ) -> Result<(), Reject> {
        let Some(a) = self.allocs.get(&client) else {
            return Err(reject(437, "Allocation Mismatch"));
        };
        let mut peers: Vec<IpAddr> = Vec::new();
        for p in msg.xor_addresses(attr::XOR_PEER_ADDRESS) {
            let p = p.map_err(|_| reject(400, "Bad Request"))?;
            self.check_peer(a, p)?;
            if !peers.contains(&p.ip()) {
                peers.push(p.ip());
            }
        }
        if peers.is_empty() {
            return Err(reject(400, "Bad Request"));
        }
        let new = peers
            .iter()
            .filter(|ip| !a.perms.iter().any(|(p, _)| p == *ip))
            .count();
        if a.perms.len() + new > MAX_PERMISSIONS {
            return Err(reject(508, "Insufficient Capacity"));
        }
        let Some(a) = self.allocs.get_mut(&client) else {
            return Err(reject(437, "Allocation Mismatch"));
        };
        let exp = env.now + PERMISSION_LIFETIME;
        let mut added = 0;
        for ip in peers {
            match a.perms.iter_mut().find(|(p, _)| *p == ip) {
                Some(p) => p.1 = exp,
                None => {
                    a.perms.push((ip, exp));
                    added += 1;
                }
            }
        }
        self.metrics.turn_permissions_active.add(added);
        if let Some(a) = self.allocs.get(&client) {
            self.publish(client, a);
        }
        self.signed_success(out, method::CREATE_PERMISSION, None, msg, key, alg);
        Ok(())
    }

    /// A success response carrying only LIFETIME (if given) and SOFTWARE, signed with the
    /// allocation's key and closed like the request (FINGERPRINT when it had one).
    fn signed_success(
        &self,
        out: &mut Vec<u8>,
        m: u16,
        lifetime: Option<u32>,
        msg: &Message<'_>,
        key: &Key,
        alg: Alg,
    ) {
        let mut e = Encoder::new(out, m, Class::Success, &msg.transaction_id());
        if let Some(l) = lifetime {
            e.u32_attr(attr::LIFETIME, l);
        }
        e.attr(attr::SOFTWARE, self.settings.software.as_bytes());
        sign(&mut e, key, alg);
        finish(e, msg);
    }

    fn channel_bind(
        &mut self,
        env: Env,
        client: SocketAddr,
        msg: &Message<'_>,
        key: &Key,
        alg: Alg,
        out: &mut Vec<u8>,
    ) -> Result<(), Reject> {
        let Some(a) = self.allocs.get(&client) else {
            return Err(reject(437, "Allocation Mismatch"));
        };
        if a.kind != RelayKind::Udp {
            // Channels carry datagrams; a TCP relay uses data connections (RFC 6062 §5).
            return Err(reject(400, "Bad Request"));
        }
        let num = msg
            .get(attr::CHANNEL_NUMBER)
            .ok_or(reject(400, "Bad Request"))?;
        if num.len() != 4 {
            return Err(reject(400, "Bad Request"));
        }
        let num = u16::from_be_bytes([num[0], num[1]]);
        if !CHANNEL_NUMBERS.contains(&num) {
            return Err(reject(400, "Bad Request"));
        }
        let peer = msg
            .xor_address(attr::XOR_PEER_ADDRESS)
            .ok_or(reject(400, "Bad Request"))?
            .map_err(|_| reject(400, "Bad Request"))?;
        // RFC 8656 §11.2: a channel number is bound to one peer and a peer to one channel,
        // including during the cool-down after expiry.
        for c in &a.chans {
            if (c.num == num) != (c.peer == peer) {
                tracing::debug!(channel = num, %peer, bound = c.num, bound_peer = %c.peer, "channel rebind refused");
                return Err(reject(400, "Bad Request"));
            }
        }
        self.check_peer(a, peer)?;
        let existing = a.chans.iter().any(|c| c.num == num);
        if !existing && a.chans.len() >= MAX_CHANNELS {
            return Err(reject(508, "Insufficient Capacity"));
        }
        let Some(a) = self.allocs.get_mut(&client) else {
            return Err(reject(437, "Allocation Mismatch"));
        };
        let exp = env.now + CHANNEL_LIFETIME;
        match a.chans.iter_mut().find(|c| c.num == num) {
            Some(c) => {
                if c.cooldown_until.take().is_some() {
                    self.metrics.turn_channels_active.inc();
                }
                c.expires = exp;
            }
            None => {
                a.chans.push(Chan {
                    num,
                    peer,
                    expires: exp,
                    cooldown_until: None,
                });
                self.metrics.turn_channels_active.inc();
            }
        }
        let pexp = env.now + PERMISSION_LIFETIME;
        match a.perms.iter_mut().find(|(p, _)| *p == peer.ip()) {
            Some(p) => p.1 = p.1.max(pexp),
            None => {
                a.perms.push((peer.ip(), pexp));
                self.metrics.turn_permissions_active.inc();
            }
        }
        a.span
            .in_scope(|| tracing::debug!(channel = num, %peer, "channel bound"));
        if let Some(a) = self.allocs.get(&client) {
            self.publish(client, a);
        }
        self.signed_success(out, method::CHANNEL_BIND, None, msg, key, alg);
        Ok(())
    }

    /// RFC 6062 §5.2 Connect: validate, install a permission for the peer, and leave the TCP
    /// connect to the shell.
    fn connect(
        &mut self,
        env: Env,
        client: SocketAddr,
        msg: &Message<'_>,
        alg: Alg,
    ) -> Result<SocketAddr, Reject> {
        let Some(a) = self.allocs.get(&client) else {
            return Err(reject(437, "Allocation Mismatch"));
        };
        if a.kind != RelayKind::Tcp {
            return Err(reject(400, "Bad Request"));
        }
        let peer = msg
            .xor_address(attr::XOR_PEER_ADDRESS)
            .ok_or(reject(400, "Bad Request"))?
            .map_err(|_| reject(400, "Bad Request"))?;
        self.check_peer(a, peer)?;
        if a.pending_connect.is_some() {
            return Err(reject(446, "Connection Already Exists"));
        }
        let Some(a) = self.allocs.get_mut(&client) else {
            return Err(reject(437, "Allocation Mismatch"));
        };
        let exp = env.now + PERMISSION_LIFETIME;
        match a.perms.iter_mut().find(|(p, _)| *p == peer.ip()) {
            Some(p) => p.1 = p.1.max(exp),
            None => {
                if a.perms.len() >= MAX_PERMISSIONS {
                    return Err(reject(508, "Insufficient Capacity"));
                }
                a.perms.push((peer.ip(), exp));
                self.metrics.turn_permissions_active.inc();
            }
        }
        a.pending_connect = Some((msg.transaction_id(), msg.has_fingerprint(), alg));
        if let Some(a) = self.allocs.get(&client) {
            self.publish(client, a);
        }
        self.reschedule(client);
        Ok(peer)
    }

    /// The shell's TCP connect for a Connect request finished: answer with CONNECTION-ID, or
    /// 447 Connection Timeout or Failure.
    pub fn connect_done(
        &mut self,
        client: SocketAddr,
        result: Option<u32>,
        out: &mut Vec<u8>,
    ) -> Outcome {
        let Some(a) = self.allocs.get_mut(&client) else {
            return Outcome::Ignored;
        };
        let Some((tid, fp, alg)) = a.pending_connect.take() else {
            return Outcome::Ignored;
        };
        let key = a.key.clone();
        let (class, code) = match result {
            Some(_) => (Class::Success, None),
            None => (Class::Error, Some(447)),
        };
        let mut e = Encoder::new(out, method::CONNECT, class, &tid);
        match (result, code) {
            (Some(id), _) => {
                e.u32_attr(attr::CONNECTION_ID, id);
            }
            (None, Some(c)) => {
                e.error_code(c, "Connection Timeout or Failure");
            }
            _ => {}
        }
        e.attr(attr::SOFTWARE, self.settings.software.as_bytes());
        sign(&mut e, &key, alg);
        if fp {
            e.finish_with_fingerprint();
        } else {
            e.finish();
        }
        match code {
            Some(c) => {
                self.count_error(c);
                Outcome::Error(c)
            }
            None => Outcome::Success,
        }
    }

    fn publish(&self, client: SocketAddr, a: &Alloc<R>) {
        let view = View {
            client: Some(client),
            perms: a.perms.clone(),
            channels: a
                .chans
                .iter()
                .filter(|c| c.cooldown_until.is_none())
                .map(|c| (c.peer, c.num, c.expires))
                .collect(),
            max_bps: self.settings.max_bps,
            local: a.client_local,
            owner: Some(Arc::from(a.key.username.as_str())),
            usage: a.usage.clone(),
            transport: self.transport,
        };
        a.relay.publish(Arc::new(view));
    }

    /// Client-to-peer relay for a Send indication: `(relay, peer, payload)` or `None` to drop.
    pub fn send_indication<'m>(
        &mut self,
        now: Instant,
        client: SocketAddr,
        msg: &Message<'m>,
    ) -> Option<(&R, SocketAddr, &'m [u8])> {
        if msg.method() != method::SEND || msg.class() != Class::Indication {
            return None;
        }
        let a = self.allocs.get_mut(&client)?;
        let peer = msg.xor_address(attr::XOR_PEER_ADDRESS)?.ok()?;
        let data = msg.get(attr::DATA)?;
        if !a.perms.iter().any(|(p, e)| *p == peer.ip() && *e > now)
            || !self.settings.policy.port_ok(peer)
        {
            return None;
        }
        if !a.bucket.allow(now, data.len()) {
            return None;
        }
        a.usage.to_peer(1, data.len() as u64);
        Some((&a.relay, peer, data))
    }

    /// Client-to-peer relay for ChannelData: `(relay, peer, payload)` or `None` to drop.
    pub fn channel_data<'p>(
        &mut self,
        now: Instant,
        client: SocketAddr,
        pkt: &'p [u8],
    ) -> Option<(&R, SocketAddr, &'p [u8])> {
        if pkt.len() < 4 {
            return None;
        }
        let num = u16::from_be_bytes([pkt[0], pkt[1]]);
        let len = u16::from_be_bytes([pkt[2], pkt[3]]) as usize;
        let payload = pkt.get(4..4 + len)?;
        let a = self.allocs.get_mut(&client)?;
        let c = a
            .chans
            .iter()
            .find(|c| c.num == num && c.cooldown_until.is_none() && c.expires > now)?;
        let peer = c.peer;
        if !a.perms.iter().any(|(p, e)| *p == peer.ip() && *e > now) {
            return None;
        }
        if !a.bucket.allow(now, payload.len()) {
            return None;
        }
        a.usage.to_peer(1, payload.len() as u64);
        Some((&a.relay, peer, payload))
    }

    /// Expire allocations, permissions, channels and reservations due at `env.now`. Only
    /// allocations whose deadline has come are looked at; calling it early does nothing.
    pub fn handle_timeout(&mut self, env: Env) {
        let now = env.now;
        let mut perms_gone = 0i64;
        let mut chans_gone = 0i64;
        while let Some(&(t, client)) = self.timers.first() {
            if t > now {
                break;
            }
            self.timers.pop_first();
            let Some(a) = self.allocs.get_mut(&client) else {
                continue;
            };
            a.timer = None;
            match a.handle_timeout(now) {
                Expiry::Expired => {
                    let aged = now.saturating_duration_since(a.born)
                        >= Duration::from_secs(self.settings.max_age);
                    let reason = if aged {
                        DeleteReason::MaxAge
                    } else {
                        DeleteReason::Expired
                    };
                    self.delete(client, reason);
                    continue;
                }
                Expiry::Changed { perms, chans } => {
                    perms_gone += perms;
                    chans_gone += chans;
                    if let Some(a) = self.allocs.get(&client) {
                        self.publish(client, a);
                    }
                }
                Expiry::Nothing => {}
            }
            self.reschedule(client);
        }
        self.metrics.turn_permissions_active.sub(perms_gone);
        self.metrics.turn_channels_active.sub(chans_gone);
        let mut due = Vec::new();
        while let Some(&(t, token)) = self.reserved.first() {
            if t > now {
                break;
            }
            self.reserved.pop_first();
            due.push(token);
        }
        if !due.is_empty() {
            self.drop_reservations(&due);
        }
    }

    /// Remove the allocation of `client` (connection closed, or shutdown), freeing its socket.
    pub fn delete(&mut self, client: SocketAddr, reason: DeleteReason) -> bool {
        let Some(a) = self.allocs.remove(&client) else {
            return false;
        };
        a.span
            .in_scope(|| tracing::debug!(reason = reason.label(), "allocation deleted"));
        self.metrics
            .turn_permissions_active
            .sub(a.perms.len() as i64);
        self.metrics.turn_channels_active.sub(
            a.chans
                .iter()
                .filter(|c| c.cooldown_until.is_none())
                .count() as i64,
        );
        self.metrics
            .turn_allocations_deleted
            .with_label_values(&[reason.label()])
            .inc();
        self.metrics
            .turn_allocations_active
            .with_label_values(&[self.transport])
            .dec();
        self.unquota(&a.quota_user);
        self.release_port(a.relay.local_addr().port());
        self.events
            .allocation_ended(crate::webhooks::AllocationEnd {
                allocation: &a.id,
                user: &a.quota_user,
                transport: self.transport,
                relay_transport: kind_label(a.kind),
                reason: reason.label(),
                created: a.created,
                usage: &a.usage,
            });
        if let Some(t) = a.timer {
            self.timers.remove(&(t, client));
        }
        drop(a);
        true
    }

    /// Delete every allocation (server shutdown or connection close).
    pub fn clear(&mut self, reason: DeleteReason) {
        let all: Vec<SocketAddr> = self.allocs.keys().copied().collect();
        for c in all {
            self.delete(c, reason);
        }
        let mine: Vec<[u8; 8]> = std::mem::take(&mut self.reserved)
            .into_iter()
            .map(|(_, t)| t)
            .collect();
        self.drop_reservations(&mine);
    }

    /// Release reservations (if not redeemed yet) and their ports.
    fn drop_reservations(&self, tokens: &[[u8; 8]]) {
        let mut gone = Vec::new();
        {
            let mut p = self.pool.lock();
            for t in tokens {
                if let Some((r, port, _)) = p.reservations.remove(t) {
                    p.ports.remove(&port);
                    gone.push(r);
                }
            }
        }
        // Sockets close outside the lock.
        drop(gone);
    }
}

impl<R: Relay> Drop for Table<R> {
    fn drop(&mut self) {
        self.clear(DeleteReason::Shutdown);
    }
}

fn kind_label(k: RelayKind) -> &'static str {
    match k {
        RelayKind::Udp => "udp",
        RelayKind::Tcp => "tcp",
    }
}

/// The name a per-user quota counts: the user part of a REST `expiry:user` name, else the name.
fn quota_name(username: &str) -> &str {
    match username.split_once(':') {
        Some((exp, user)) if exp.bytes().all(|b| b.is_ascii_digit()) && !user.is_empty() => user,
        _ => username,
    }
}

fn sign(e: &mut Encoder<'_>, key: &Key, alg: Alg) {
    match alg {
        Alg::Md5 => e.integrity(&key.md5),
        Alg::Sha256 => e.integrity_sha256(&key.sha256),
    };
}

fn finish(e: Encoder<'_>, req: &Message<'_>) {
    if req.has_fingerprint() {
        e.finish_with_fingerprint()
    } else {
        e.finish()
    }
}

fn itoa_buf() -> [u8; 3] {
    [b'0'; 3]
}

fn fmt_code(code: u16, b: &mut [u8; 3]) -> &str {
    let c = code.min(699);
    b[0] = b'0' + (c / 100) as u8;
    b[1] = b'0' + (c / 10 % 10) as u8;
    b[2] = b'0' + (c % 10) as u8;
    std::str::from_utf8(b).unwrap_or("000")
}

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
