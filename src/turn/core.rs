//! The sans-IO TURN allocation table (RFC 8656 with the RFC 8489 long-term credential
//! mechanism): allocations, permissions, channels, lifetimes, nonces, quotas and peer policy.
//!
//! It never touches a socket or the clock. Callers pass [`Env`] (the current `Instant`, the
//! Unix time for credential expiry, and whether the server is draining) and the parsed
//! request; the table writes the response into a caller-owned buffer. It opens no socket and
//! calls nothing back, as quinn-proto's endpoint: an Allocate that needs a relay socket returns
//! [`Outcome::Bind`] ("bind a relay on this address for this allocation"), the shell binds it
//! and hands the result to [`Table::bound`], which finishes the answer (or asks for another
//! port). The socket is then kept as an opaque [`Relay`] handle, so dropping an allocation
//! frees it. Allocations created and ended are queued as [`Event`]s that the shell drains with
//! [`Table::poll_event`] and forwards (webhooks).
//!
//! This file is the dispatcher: [`Table::handle_request`] checks the method and credentials,
//! then hands the request to the part that owns it:
//! - `credentials`: nonces and the long-term credential check;
//! - `ports`: the process-wide [`Pool`] of relay ports, EVEN-PORT reservations and quotas;
//! - `allocation`: one allocation's state machine (quinn-proto's connection to this
//!   endpoint), which may use the table's limits above it;
//! - `allocations`: allocation state (Allocate, Refresh, permissions, channels, the data
//!   path's lookups, timers and deletion);
//! - `rfc6062`: TCP relays (Connect, ConnectionBind);
//! - `settings`: relay addressing and limits derived from config.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use crate::auth::Auth;
use crate::metrics::Metrics;
use crate::stun::codec::{attr, method, Class, Encoder, Message};
use allocation::{Alg, Alloc, Key, Pending};

mod allocation;
mod allocations;
mod credentials;
mod ports;
mod rfc6062;
mod settings;
#[cfg(test)]
mod test_support;
mod to_client;
mod usage;

pub use allocations::{
    Bucket, PeerRoute, View, CHANNEL_COOLDOWN, CHANNEL_LIFETIME, CHANNEL_NUMBERS, MAX_CHANNELS,
    MAX_PERMISSIONS, PERMISSION_LIFETIME,
};
pub use ports::{Pool, PoolAudit, RESERVATION_LIFETIME};
pub use settings::{RelayBind, Settings};
pub use to_client::{to_client, Dropped, Frame, Tids, ToClient, HEADROOM};
pub use usage::{allocation_id, Usage};

use credentials::{close, finish, sign, ALG_MD5, ALG_SHA256};

/// One allocation as [`Table::audit`] reports it, for invariant checks outside the table.
#[doc(hidden)]
#[derive(Debug, Clone)]
pub struct AllocAudit {
    /// The client's transport address.
    pub client: SocketAddr,
    /// The name its quota counts.
    pub quota_user: String,
    /// When its lifetime ends.
    pub expires: Instant,
    /// The local address of its relay socket.
    pub relay: SocketAddr,
    /// Installed permissions: peer IP and expiry.
    pub perms: Vec<(IpAddr, Instant)>,
    /// Channels: number, peer, expiry, end of cool-down (after expiry).
    pub chans: Vec<(u16, SocketAddr, Instant, Option<Instant>)>,
}

/// What kind of relay socket an allocation needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayKind {
    /// A UDP socket (RFC 8656).
    Udp,
    /// A TCP listening socket with a data connection per peer (RFC 6062).
    Tcp,
}

impl RelayKind {
    /// `udp` or `tcp`, as metrics and webhooks name the relay transport.
    pub fn label(self) -> &'static str {
        kind_label(self)
    }
}

/// The table's request for a relay socket, answered with [`Table::bound`]: the shell opens
/// sockets, the table only picks the address (why: the core stays free of I/O and callbacks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bind {
    /// Which pending Allocate asked; [`Table::bound`] ignores a stale id.
    pub id: u64,
    /// The address to bind.
    pub addr: SocketAddr,
    /// UDP or TCP (RFC 6062) relay.
    pub kind: RelayKind,
}

/// An allocation came or went: what the shell reports to webhooks, returned rather than
/// pushed so the table holds no handle to the outside.
#[derive(Debug, Clone)]
pub enum Event {
    /// An Allocate succeeded.
    Created {
        /// Allocation id, unique within this process.
        allocation: String,
        /// The name its quota counts (the user part of a REST username).
        user: String,
        /// The client's transport (`udp|tcp|tls`).
        transport: &'static str,
        /// The relay transport.
        relay: RelayKind,
    },
    /// An allocation was deleted.
    Ended {
        /// Allocation id.
        allocation: String,
        /// The name its quota counted.
        user: String,
        /// The client's transport (`udp|tcp|tls`).
        transport: &'static str,
        /// The relay transport.
        relay: RelayKind,
        /// Why it ended.
        reason: DeleteReason,
        /// When it was created.
        created: Instant,
        /// Its relay usage (final: the relay was retired before the event was queued).
        usage: Arc<Usage>,
    },
}

/// A request as its answer needs it after the message itself is gone (a pending Allocate
/// finished in [`Table::bound`]).
#[derive(Debug, Clone, Copy)]
struct Req {
    method: u16,
    tid: [u8; 12],
    fingerprint: bool,
}

impl Req {
    fn of(msg: &Message<'_>) -> Req {
        Req {
            method: msg.method(),
            tid: msg.transaction_id(),
            fingerprint: msg.has_fingerprint(),
        }
    }
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
    /// The allocation is being deleted: stop relaying anywhere but user space (the kernel
    /// fast path gives its routes back) before its usage is reported.
    fn retire(&self) {}
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
    /// The metrics and webhook label.
    pub fn label(self) -> &'static str {
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
    /// Allocate needs a relay socket: the shell binds it and reports the result with
    /// [`Table::bound`], which writes the answer; nothing was written yet.
    Bind(Bind),
}

/// An early answer: error code and whether the request was authenticated.
struct Reject {
    code: u16,
    reason: &'static str,
    /// For 300: the node to try (else the static `turn.alternate_server`).
    alt: Option<crate::turn::members::Alternate>,
}

fn reject(code: u16, reason: &'static str) -> Reject {
    Reject {
        code,
        reason,
        alt: None,
    }
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
    /// The Allocate waiting for its relay socket (the shell answers before the next request).
    pending: Option<Pending<R>>,
    /// Id of the next [`Bind`].
    next_bind: u64,
    /// Allocations created and ended, until the shell drains them.
    events: VecDeque<Event>,
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
            pending: None,
            next_bind: 0,
            events: VecDeque::new(),
        }
    }

    /// The next allocation created or ended, for the shell to forward; shells drain this after
    /// every call that may create or delete allocations, so the queue stays short.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
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

    /// Every allocation with its lifetime, permissions and channels, so fuzzers and tests can
    /// check the table's invariants from outside.
    #[doc(hidden)]
    pub fn audit(&self) -> Vec<AllocAudit> {
        self.allocs
            .iter()
            .map(|(c, a)| AllocAudit {
                client: *c,
                quota_user: a.quota_user.clone(),
                expires: a.expires,
                relay: a.relay.local_addr(),
                perms: a.perms.clone(),
                chans: a
                    .chans
                    .iter()
                    .map(|c| (c.num, c.peer, c.expires, c.cooldown_until))
                    .collect(),
            })
            .collect()
    }

    /// The relayed address advertised for the allocation of `client`, if any.
    pub fn relayed_address(&self, client: SocketAddr) -> Option<SocketAddr> {
        self.allocs.get(&client).map(|a| a.advertised)
    }

    /// Handle one STUN request (Allocate, Refresh, CreatePermission, ChannelBind) from
    /// `client`, appending the response to `out`. An Allocate that needs a relay socket
    /// returns [`Outcome::Bind`] instead, answered by [`Table::bound`].
    pub fn handle_request(
        &mut self,
        env: Env,
        client: SocketAddr,
        msg: &Message<'_>,
        out: &mut Vec<u8>,
    ) -> Outcome {
        if msg.class() != Class::Request {
            return Outcome::Ignored;
        }
        // A shell that never answered a Bind: give its port and quota back.
        self.abandon_pending();
        let req = Req::of(msg);
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
            return self.error(out, req, None, Alg::Md5, reject(400, "Bad Request"), env);
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
            Err(r) => return self.error(out, req, None, Alg::Md5, r, env),
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
                Err(rej) => self.error(out, req, Some(&key), alg, rej, env),
            };
        }
        if m == method::CONNECTION_BIND {
            return self.connection_bind(env, msg, &key, alg, out);
        }
        let r = match m {
            method::ALLOCATE => match self.allocate(env, client, msg, &key, alg, out) {
                Ok(o) => return o,
                Err(rej) => Err(rej),
            },
            method::REFRESH => self.refresh(env, client, msg, &key, alg, out),
            method::CREATE_PERMISSION => self.create_permission(env, client, msg, &key, alg, out),
            _ => self.channel_bind(env, client, msg, &key, alg, out),
        };
        self.reschedule(client);
        match r {
            Ok(()) => Outcome::Success,
            Err(rej) => self.error(out, req, Some(&key), alg, rej, env),
        }
    }

    /// An Allocate on a draining or full node: 300 naming a ready node with room from the
    /// membership snapshot (same family as the client, the TLS name for `turns:`), else the
    /// static `turn.alternate_server` (300) or 508 while draining; `None` goes on here.
    fn try_alternate(&self, env: Env, client: SocketAddr) -> Option<Reject> {
        let live = &self.settings.live;
        let tls = self.transport == "tls";
        let v6 = crate::turn::policy::canonical(client.ip()).is_ipv6();
        let id = live.cluster.get();
        let total = if id.is_some() {
            u64::from(self.pool.total())
        } else {
            0
        };
        let pick = || {
            let id = id?;
            crate::turn::members::alternate(
                &live.members.load(),
                &id.me,
                v6,
                tls,
                id.tls_domain.as_deref(),
            )
        };
        let (why, alt) = crate::turn::members::redirect(env.draining, total, live.capacity, pick)?;
        if alt.is_none() && self.settings.alternate.is_none() {
            return Some(reject(508, "Insufficient Capacity"));
        }
        self.metrics
            .turn_redirects
            .with_label_values(&[why.label()])
            .inc();
        Some(Reject {
            code: 300,
            reason: "Try Alternate",
            alt,
        })
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
        req: Req,
        key: Option<&Key>,
        alg: Alg,
        r: Reject,
        env: Env,
    ) -> Outcome {
        tracing::debug!(
            method = req.method,
            code = r.code,
            reason = r.reason,
            "TURN error response"
        );
        let mut e = Encoder::new(out, req.method, Class::Error, &req.tid);
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
            300 => match &r.alt {
                Some(alt) => {
                    // libwebrtc copies REALM and NONCE from a 300 into its Allocate at the
                    // alternate; the cluster's nodes share the nonce key, so that Allocate
                    // needs no new challenge: the redirect costs one round trip.
                    e.attr(attr::REALM, self.settings.realm.as_bytes());
                    let nonce = self.make_nonce(env.unix);
                    e.attr(attr::NONCE, nonce.as_bytes());
                    e.address(attr::ALTERNATE_SERVER, alt.addr);
                    if let Some(d) = &alt.domain {
                        e.attr(attr::ALTERNATE_DOMAIN, d.as_bytes());
                    }
                }
                None => {
                    if let Some(alt) = self.settings.alternate {
                        e.address(attr::ALTERNATE_SERVER, alt);
                    }
                }
            },
            // Only DONT-FRAGMENT reaches here as an unsupported attribute.
            420 => {
                e.unknown_attributes(&[attr::DONT_FRAGMENT]);
            }
            _ => {}
        }
        e.software(&self.settings.software);
        if let Some(k) = key {
            sign(&mut e, k, alg);
        }
        close(e, req.fingerprint);
        self.count_error(r.code);
        Outcome::Error(r.code)
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
        e.software(&self.settings.software);
        sign(&mut e, key, alg);
        finish(e, msg);
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
